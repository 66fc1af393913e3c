"""Who owns what: the ledger's SQL lives in run/ledger.py (everyone else asks it by name), the
run folder's file names in run/folder.py (`Run.ledger_path`, ...), and the HTTP transport asks
the `Coordinator`, never the ledger behind it. Read from the package's source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "crowdtrain"
SQL = re.compile(r"\b(SELECT\s|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM)")
CHECKED = sorted(PKG.rglob("*.py"))


def strings(path: Path) -> list[tuple[int, str]]:
    return [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(PKG.parent)}:{line}"


def test_only_the_ledger_spells_sql():
    assert CHECKED and not [where(p, n) for p in CHECKED if p != PKG / "run" / "ledger.py"
                            for n, s in strings(p) if SQL.search(s)]


def test_only_the_run_folder_spells_the_ledgers_file_name():
    own = {PKG / "run" / "folder.py", PKG / "run" / "ledger.py"}  # ledger.py: its docstring
    assert not [where(p, n) for p in CHECKED if p not in own
                for n, s in strings(p) if "ledger.sqlite" in s]


def test_the_transport_never_reaches_into_the_coordinators_ledger():
    tree = ast.parse((PKG / "coordinator" / "server.py").read_text())
    assert not [n.lineno for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and n.attr == "ledger"]
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and any("ledger" in a.name or a.name == "owner" for a in n.names)]
