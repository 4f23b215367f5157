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
