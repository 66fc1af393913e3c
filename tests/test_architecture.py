"""The architecture's import contracts (pyproject.toml, [tool.importlinter]) hold on the
package, and they catch what they are for: a copy of the package with an upward import
planted in it, or an import cycle, breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports over the package copy in `tree`, with the project's contracts."""
    return subprocess.run([str(LINT), "--no-cache", str(ROOT / "pyproject.toml")],
                          cwd=tree, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tree)})


@pytest.fixture
def tree(tmp_path):
    shutil.copytree(ROOT / "crowdtrain", tmp_path / "crowdtrain",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def plant(tree: Path, module: str, line: str) -> None:
    p = tree / (module.replace(".", "/") + ".py")
    p.write_text(p.read_text() + f"\n{line}\n")


def test_the_package_keeps_its_contracts(tree):
    r = lint(tree)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("crowdtrain.run.data", "from crowdtrain.cli import main  # upward", "crowdtrain.cli"),
    ("crowdtrain.wire.codecs", "import crowdtrain.run.model  # upward", "crowdtrain.run"),
    ("crowdtrain.volunteer.worker", "from crowdtrain.coordinator import rules  # sideways",
     "crowdtrain.coordinator"),
])
def test_an_import_against_the_layers_breaks_them(tree, module, line, broken):
    plant(tree, module, line)
    r = lint(tree)
    assert r.returncode != 0
    layers = r.stdout.split("Broken contracts")[-1]
    assert f"is not allowed to import {broken}" in layers and f"- {module} -> " in layers, \
        r.stdout


def test_an_import_cycle_inside_a_package_breaks_them(tree):
    plant(tree, "crowdtrain.wire.protocol", "from crowdtrain.wire import codecs  # cycle")
    plant(tree, "crowdtrain.wire.codecs", "from crowdtrain.wire import protocol  # cycle")
    r = lint(tree)
    assert r.returncode != 0 and "1 kept, 1 broken" in r.stdout, r.stdout
    assert "No cycles are allowed in crowdtrain.wire" in r.stdout
    assert ".protocol -> .codecs" in r.stdout or ".codecs -> .protocol" in r.stdout
