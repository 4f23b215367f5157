"""The README's quick example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from afd_dispatch import destroy_window_group


def test_readme_quick_example_runs() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict[str, object] = {}
    try:
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    finally:
        destroy_window_group("g0")
    raw = namespace["raw"]
    assert isinstance(raw, bytes) and len(raw) > 0


def test_where_things_are_matches_the_tree() -> None:
    """Every path in the README's "Where things are" table exists; a bare file name is in
    the directory of the path before it in the same cell."""
    root = Path(__file__).parents[1]
    text = (root / "README.md").read_text()
    table = text.split("## Where things are", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]  # no header
    assert len(rows) > 20, rows
    checked = []
    for row in rows:
        where = row.rstrip(" |").rsplit(" | ", 1)[1]
        folder = root
        for name in re.findall(r"`([^`]+)`", where):
            if name.startswith("../") or " " in name or name == "...":
                continue  # outside the repository, or not a path
            path = root / name if "/" in name else folder / name
            assert path.exists(), f"README, Where things are: {name} ({row})"
            folder = path if path.is_dir() else path.parent
            checked.append(path)
    assert len(checked) > 40, checked
