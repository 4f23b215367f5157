"""Lazy access to torch_npu: imported on the first forwarded call, never at module import.

Importing torch_npu initialises CANN, which fails (or takes seconds) on hosts without
Ascend drivers; the planning layer, `load_backend` and the tests must be able to import
this backend anywhere.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_HINT = (
    "afd_dispatch.kernels.npu forwards to torch_npu (Atlas A3 with CANN); it is not "
    "importable here. Use load_backend('reference') on hosts without an NPU."
)


def torch_npu() -> ModuleType:
    """The `torch_npu` module, imported now if this is the first call."""
    # No caching: after the first import this is one dict lookup in sys.modules, and
    # looking it up each time lets tests swap the module in and out.
    try:
        return importlib.import_module("torch_npu")
    except ModuleNotFoundError as exc:
        if exc.name not in ("torch_npu", None):
            raise  # torch_npu exists but one of its own dependencies is missing
        raise ModuleNotFoundError(_HINT, name="torch_npu") from exc


def torch_npu_afd() -> ModuleType:
    """`torch_npu._afd`, where torch_npu exposes the schedule context and the scheduler ops."""
    torch_npu()  # the parent first, so a missing torch_npu gets the hint above
    return importlib.import_module("torch_npu._afd")
