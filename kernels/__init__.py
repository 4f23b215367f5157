"""Backends of the A3 AFD op family.

`reference`: pure torch on any CPU, writing the same bytes into the same windows as the
hardware. `npu`: the same calling surface forwarding to torch_npu on Atlas A3, with the
contract checks of `afd_dispatch.contract` in front.

Every backend module exports the same names (`BACKEND_API`), so calling code is written
once and `load_backend` picks the module.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Literal, get_args

from afd_dispatch.errors import check

BACKEND_API = (
    "npu_attention_to_ffn",
    "npu_ffn_worker_batching",
    "npu_ffn_to_attention",
    "npu_attention_worker_combine",
    "ffn_worker_scheduler_",
    "ffn_worker_scheduler",
    "attention_worker_scheduler_",
    "attention_worker_scheduler",
    "create_schedule_context_holder",
)
Backend = Literal["auto", "reference", "npu"]
"""What `AFDConfig.backend` and `load_backend` take ("auto": "npu" where torch_npu exists)."""
BACKENDS: tuple[str, ...] = get_args(Backend)


def npu_available() -> bool:
    """True where torch_npu is installed (an Ascend host); it is never imported here."""
    return importlib.util.find_spec("torch_npu") is not None


def resolve_backend(name: str = "auto") -> str:
    """ "reference" or "npu": "auto" is "npu" where torch_npu exists, else "reference"."""
    check(name in BACKENDS, "backend", f"one of {list(BACKENDS)}", name)
    if name == "auto":
        return "npu" if npu_available() else "reference"
    return name


def load_backend(name: str = "auto") -> ModuleType:
    """The backend module for `name` (see `resolve_backend`)."""
    return importlib.import_module(f"afd_dispatch.kernels.{resolve_backend(name)}")
