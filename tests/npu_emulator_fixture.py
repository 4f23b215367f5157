"""The torch_npu emulator (tests/npu_emulator) in this process, for one test at a time.

`emulated_torch_npu(monkeypatch)` puts the emulator first on `sys.path`, imports it and, on
exit, unmaps every window it registered (`close_all`) and drops every `torch_npu*` module,
so tests that assert torch_npu is not importable (`npu_available()`, the binding tests'
stand-in) see no trace of it. Test modules wrap it in a fixture of their own.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

EMULATOR = str(Path(__file__).resolve().parent / "npu_emulator")


def _drop_torch_npu_modules() -> None:
    for name in [n for n in sys.modules if n == "torch_npu" or n.startswith("torch_npu.")]:
        del sys.modules[name]


@contextmanager
def emulated_torch_npu(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """`import torch_npu` finds the emulator inside the block; nothing of it after."""
    _drop_torch_npu_modules()  # e.g. a stand-in some other test left behind
    monkeypatch.syspath_prepend(EMULATOR)
    try:
        torch_npu = importlib.import_module("torch_npu")
        assert str(Path(torch_npu.__file__).resolve()).startswith(EMULATOR), torch_npu.__file__
        yield torch_npu
    finally:
        hccl = sys.modules.get("torch_npu._C._distributed_c10d")
        if hccl is not None:
            hccl.close_all()
        _drop_torch_npu_modules()
        # sys.path without the emulator at once (monkeypatch restores the rest later)
        sys.path[:] = [p for p in sys.path if p != EMULATOR]
        importlib.invalidate_caches()
