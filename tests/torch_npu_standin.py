"""A recording stand-in for `torch_npu`, the one mock of this project.

torch_npu needs CANN and an Ascend device, so the NPU backend's tests put this module into
`sys.modules` instead. Each op binds its arguments to torch_npu's own signature (the
schemas of `kernels.schemas`, and the Python signature of
`torch_npu._afd.create_schedule_context_holder`), so a call that torch_npu would reject for
its calling convention fails here too; then it records the call exactly as made
(positional args, keyword args) and returns tensors of the shapes the real op returns.

The scheduler ops live in `torch_npu._afd`, as torch_npu 2.14 exposes them
(`torch_npu/utils/_afd_ops.py`, aliases of `torch.ops.npu.*`): the in-place ones return
their argument, the non-in-place ones a new tensor holding a copy of the context (torch_npu
copies the 1024 bytes and runs the in-place op on the copy), never the argument itself.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
import torch

from afd_dispatch.kernels.schemas import TORCH_NPU_SCHEMAS

_OUT_DTYPES = {0: torch.float16, 1: torch.bfloat16, 2: torch.int8}
CONTEXT_BYTES = 1024


@dataclass
class Call:
    """One call as the backend made it."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any = None


TORCH_NPU_OPS = (
    "npu_attention_to_ffn",
    "npu_ffn_worker_batching",
    "npu_ffn_to_attention",
    "npu_attention_worker_combine",
)
AFD_SCHEDULER_OPS = (
    "ffn_worker_scheduler_",
    "ffn_worker_scheduler",
    "attention_worker_scheduler_",
    "attention_worker_scheduler",
)


def schema_signature(name: str) -> inspect.Signature:
    """torch_npu's calling convention for op `name`, from its schema."""
    schema = torch._C.parse_schema(TORCH_NPU_SCHEMAS[name])
    params = []
    for arg in schema.arguments:
        kind = (
            inspect.Parameter.KEYWORD_ONLY
            if arg.kwarg_only
            else inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        default = arg.default_value if arg.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(arg.name, kind, default=default))
    return inspect.Signature(params)


def create_schedule_context_holder_signature(
    schedule_mode: int,
    session_num: int,
    micro_batch_num: int,
    micro_batch_size: int,
    selected_expert_num: int,
    expert_num: int,
    attn_to_ffn_token_size: int,
    ffn_to_attn_token_size: int,
    ffn_window: int = 0,
    ffn_window_size: int = 0,
    attention_window: int = 0,
    attention_window_size: int = 0,
) -> None:
    """The Python signature of `torch_npu._afd.create_schedule_context_holder`."""


class _Holder:
    """Like torch_npu's ScheduleContextHolder: owns one int8[1024] context tensor."""

    __slots__ = ("_ctx", "arguments", "stopped")

    def __init__(self, arguments: dict[str, Any]) -> None:
        self.arguments = arguments
        self._ctx = torch.zeros(CONTEXT_BYTES, dtype=torch.int8)
        self.stopped = False

    def get_schedule_context_tensor(self) -> torch.Tensor:
        # a new tensor object over the same memory on every call, as a C++ binding returns
        return self._ctx[:]

    def stop_schedule(self) -> None:
        self.stopped = True

    def get_schedule_context_info(self) -> str:
        return f"stand-in schedule context {self.arguments}"


class StandinHolder(_Holder):
    """The holder the stand-in returns by default; weakly referenceable, as torch_npu's is."""

    __slots__ = ("__weakref__",)


class SlottedHolder(_Holder):
    """A holder type without weak references (as some extension types are)."""

    __slots__ = ()


@dataclass
class TorchNpuStandin:
    """The `torch_npu` and `torch_npu._afd` modules, and the calls made to them."""

    calls: list[Call] = field(default_factory=list)
    holder_type: type[_Holder] = StandinHolder
    module: ModuleType = field(init=False)
    afd: ModuleType = field(init=False)

    def __post_init__(self) -> None:
        self.module = _module("torch_npu", package=True)
        self.afd = _module("torch_npu._afd", package=False)
        self.module._afd = self.afd  # type: ignore[attr-defined]
        for module, names in ((self.module, TORCH_NPU_OPS), (self.afd, AFD_SCHEDULER_OPS)):
            for name in names:
                setattr(module, name, self._op(name, schema_signature(name)))
        self.afd.create_schedule_context_holder = self._op(  # type: ignore[attr-defined]
            "create_schedule_context_holder",
            inspect.signature(create_schedule_context_holder_signature),
        )

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "torch_npu", self.module)
        monkeypatch.setitem(sys.modules, "torch_npu._afd", self.afd)

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def _op(self, name: str, signature: inspect.Signature) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)  # TypeError: not torch_npu's convention
            bound.apply_defaults()
            result = getattr(self, f"_result_{name}")(bound.arguments)
            self.calls.append(Call(name, args, dict(kwargs), result))
            return result

        op.__name__ = name
        return op

    # -- what each op returns ----------------------------------------------------------
    def _result_npu_attention_to_ffn(self, a: dict[str, Any]) -> None:
        return None

    def _result_npu_ffn_to_attention(self, a: dict[str, Any]) -> None:
        return None

    def _result_npu_ffn_worker_batching(self, a: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        sessions, tokens, slots, hidden = _ints(a["max_out_shape"])
        rows = sessions * tokens * slots
        ids = [torch.zeros(rows, dtype=torch.int32) for _ in range(4)]
        return (
            torch.zeros(rows, hidden, dtype=_OUT_DTYPES[a["token_dtype"]]),
            torch.zeros(a["expert_num"], 2, dtype=torch.int64),
            *ids,
            torch.zeros(rows, dtype=torch.float32),
            torch.zeros(1, dtype=torch.int64),
        )

    def _result_npu_attention_worker_combine(
        self, a: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = a["expert_scales"].shape[0]
        y = torch.zeros(tokens, a["hidden_size"], dtype=_OUT_DTYPES[a["token_dtype"]])
        return y, a["layer_id"] + 1

    def _result_ffn_worker_scheduler_(self, a: dict[str, Any]) -> torch.Tensor:
        return a["self"]

    def _result_attention_worker_scheduler_(self, a: dict[str, Any]) -> torch.Tensor:
        return a["self"]

    def _result_ffn_worker_scheduler(self, a: dict[str, Any]) -> torch.Tensor:
        return _context_copy(a["self"])

    def _result_attention_worker_scheduler(self, a: dict[str, Any]) -> torch.Tensor:
        return _context_copy(a["self"])

    def _result_create_schedule_context_holder(self, a: dict[str, Any]) -> _Holder:
        return self.holder_type(dict(a))


def _module(name: str, package: bool) -> ModuleType:
    module = ModuleType(name, "torch_npu stand-in for the NPU backend's tests")
    # a real spec, so importlib.util.find_spec (and load_backend("auto")) see the module
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=package)
    if package:
        module.__path__ = []
    return module


def _context_copy(ctx: torch.Tensor) -> torch.Tensor:
    """A new context tensor with the same 1024 bytes (torch_npu: empty_like + copy_)."""
    out = torch.empty_like(ctx, memory_format=torch.contiguous_format)
    out.copy_(ctx)
    return out


def _ints(shape: Sequence[int]) -> tuple[int, int, int, int]:
    a, b, c, d = (int(v) for v in shape)
    return a, b, c, d
