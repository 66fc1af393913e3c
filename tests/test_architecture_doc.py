"""docs/ARCHITECTURE.md's folder map (the tree of crowdtrain/ that opens it) lists exactly
what the package holds: every module (.py file) and every folder (the subpackages, and data
folders such as coordinator/static/ and corpus/), each on a line of its own with a word on
what it owns. A subpackage's `__init__.py` goes with its folder's line; the top level's
`__init__.py` has a line of its own. Files other than modules inside a data folder (the
dashboard's static files, the corpus) are not listed one by one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "crowdtrain"
DOC = ROOT / "docs" / "ARCHITECTURE.md"

FENCE = re.compile(r"^\s*(```|~~~)")
# an entry: tree drawing (box characters, ASCII `|`, `+--`, `` `-- ``, spaces), then a module
# or folder name, then whitespace or the end of the line
ENTRY = re.compile(r"^(?P<prefix>[\s│├└─|+`\\-]*)(?P<name>[\w.-]+(?:\.py|/))(?:\s+(?P<text>.*))?$")


def fenced_blocks(text: str) -> list[list[str]]:
    """The lines of every fenced code block of a markdown text, in order."""
    blocks, block = [], None
    for line in text.splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
        elif block is not None:
            block.append(line)
    return blocks


def folder_map(text: str) -> list[str]:
    """The folder map's lines: the first fenced block whose first entry is `crowdtrain/`."""
    for block in fenced_blocks(text):
        entries = [m for m in map(ENTRY.match, block) if m]
        if entries and entries[0]["name"] == "crowdtrain/":
            return block
    raise AssertionError(f"{DOC.relative_to(ROOT)} has no folder map: a fenced code block "
                         "whose first line is `crowdtrain/`")


def parse_map(lines: list[str]) -> dict[str, str]:
    """Each entry's path relative to crowdtrain/ (folders end with '/'), with its text.

    Nesting follows the column where a name starts: an entry belongs to the nearest folder
    above it that starts further left."""
    entries: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (column, path) of the open folders, root first
    for line in lines:
        m = ENTRY.match(line)
        if not m:
            continue
        col, name = len(m["prefix"]), m["name"]
        while stack and stack[-1][0] >= col:
            stack.pop()
        if not stack:
            assert name == "crowdtrain/", f"folder map: {name!r} is outside crowdtrain/"
            stack.append((col, ""))
            continue
        path = stack[-1][1] + name
        assert path not in entries, f"folder map lists {path} twice"
        entries[path] = (m["text"] or "").strip()
        if name.endswith("/"):
            stack.append((col, path))
    return entries


def normalise(paths: set[str]) -> set[str]:
    """A subpackage's `__init__.py` is its folder's line."""
    return {p.removesuffix("__init__.py") if p.endswith("/__init__.py") else p for p in paths}


def package_tree() -> set[str]:
    """Every module and folder under crowdtrain/, relative to it (folders end with '/')."""
    found = set()
    for p in PKG.rglob("*"):
        rel = p.relative_to(PKG)
        if "__pycache__" in rel.parts or any(part.endswith(".egg-info") for part in rel.parts):
            continue
        if p.is_dir():
            found.add(rel.as_posix() + "/")
        elif p.suffix == ".py":
            found.add(rel.as_posix())
    return normalise(found)


def documented() -> dict[str, str]:
    return parse_map(folder_map(DOC.read_text(encoding="utf-8")))


def test_the_folder_map_opens_the_document():
    sections = re.split(r"^## ", DOC.read_text(encoding="utf-8"), flags=re.M)
    assert len(sections) > 1, "ARCHITECTURE.md has no sections"
    blocks = fenced_blocks(sections[1])
    assert blocks and [line.strip() for line in blocks[0] if line.strip()][:1] == \
        ["crowdtrain/"], "ARCHITECTURE.md's first section must hold the folder map first"


def test_the_folder_map_lists_every_module_and_folder_of_the_package():
    listed = normalise(set(documented()))
    actual = package_tree()
    missing, extra = sorted(actual - listed), sorted(listed - actual)
    assert not missing and not extra, (
        "docs/ARCHITECTURE.md's folder map differs from crowdtrain/:\n"
        f"  in the package, not in the map: {', '.join(missing) or '-'}\n"
        f"  in the map, not in the package: {', '.join(extra) or '-'}")


def test_every_entry_says_what_it_owns():
    bare = [path for path, text in documented().items() if not text]
    assert not bare, f"folder map entries with no description: {', '.join(bare)}"


def test_the_parser_reads_nesting_and_formats():
    lines = ["crowdtrain/", "├── __init__.py   version", "├── wire/   the contract",
             "│   ├── __init__.py   implied by wire/", "│   └── codecs.py   codecs",
             "|-- run/          ascii tree", "|   `-- data.py  data",
             "    corpus/   indented only"]
    got = parse_map(lines)
    assert set(got) == {"__init__.py", "wire/", "wire/__init__.py", "wire/codecs.py", "run/",
                        "run/data.py", "corpus/"}
    assert normalise(set(got)) == {"__init__.py", "wire/", "wire/codecs.py", "run/",
                                   "run/data.py", "corpus/"}
    assert folder_map("# A\n\n## Map\n\n```text\ncrowdtrain/\n└── x.py  x\n```\n") == \
        ["crowdtrain/", "└── x.py  x"]
