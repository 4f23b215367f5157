"""The reference kernels as torch custom ops `torch.ops.afd.*`, with torch_npu's schemas.

Registering them through `torch.library` gives callers torch_npu's exact calling surface
(names, defaults, keyword-only split are enforced by the dispatcher), lets
`torch.compile` trace through them (fake implementations give output shapes), and marks
the window-writing ops as ordered side effects so graphs never drop or reorder them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from afd_dispatch.kernels.reference.attention_to_ffn import attention_to_ffn
from afd_dispatch.kernels.reference.attention_worker_combine import (
    attention_worker_combine,
    attention_worker_scheduler,
    attention_worker_scheduler_,
)
from afd_dispatch.kernels.reference.ffn_to_attention import ffn_to_attention
from afd_dispatch.kernels.reference.ffn_worker_batching import (
    ffn_worker_batching,
    ffn_worker_scheduler,
    ffn_worker_scheduler_,
)
from afd_dispatch.kernels.schemas import TORCH_NPU_SCHEMAS
from afd_dispatch.layout import TOKEN_DTYPE_INT8, dtype_of_code

NAMESPACE = "afd"

_IMPLS: dict[str, Callable[..., Any]] = {
    "npu_attention_to_ffn": attention_to_ffn,
    "npu_ffn_worker_batching": ffn_worker_batching,
    "npu_ffn_to_attention": ffn_to_attention,
    "npu_attention_worker_combine": attention_worker_combine,
    "ffn_worker_scheduler_": ffn_worker_scheduler_,
    "ffn_worker_scheduler": ffn_worker_scheduler,
    "attention_worker_scheduler_": attention_worker_scheduler_,
    "attention_worker_scheduler": attention_worker_scheduler,
}


def _fake_batching(
    schedule_context: torch.Tensor,
    expert_num: int,
    max_out_shape: Sequence[int],
    *,
    token_dtype: int = 0,
    need_schedule: int = 0,
    layer_num: int = 0,
) -> tuple[torch.Tensor, ...]:
    a, bs, e, h = max_out_shape
    rows = a * bs * e
    dtype = torch.int8 if token_dtype == TOKEN_DTYPE_INT8 else dtype_of_code(token_dtype)
    new = schedule_context.new_empty
    ids = [new((rows,), dtype=torch.int32) for _ in range(4)]
    return (
        new((rows, h), dtype=dtype),
        new((expert_num, 2), dtype=torch.int64),
        *ids,
        new((rows,), dtype=torch.float32),
        new((1,), dtype=torch.int64),
    )


def _fake_combine(
    schedule_context: torch.Tensor,
    expert_scales: torch.Tensor,
    layer_id: torch.Tensor,
    hidden_size: int,
    *,
    token_dtype: int = 0,
    need_schedule: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    y = expert_scales.new_empty(
        (expert_scales.shape[0], hidden_size), dtype=dtype_of_code(token_dtype)
    )
    return y, torch.empty_like(layer_id)


def _fake_none(*args: object, **kwargs: object) -> None:
    return None


def _fake_identity(schedule_context: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return schedule_context


def _fake_copy(schedule_context: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return torch.empty_like(schedule_context)


_FAKES: dict[str, Callable[..., Any]] = {
    "npu_attention_to_ffn": _fake_none,
    "npu_ffn_worker_batching": _fake_batching,
    "npu_ffn_to_attention": _fake_none,
    "npu_attention_worker_combine": _fake_combine,
    "ffn_worker_scheduler_": _fake_identity,
    "ffn_worker_scheduler": _fake_copy,
    "attention_worker_scheduler_": _fake_identity,
    "attention_worker_scheduler": _fake_copy,
}


def _register() -> torch.library.Library:
    from torch._higher_order_ops.effects import _EffectType

    lib = torch.library.Library(NAMESPACE, "DEF")
    for name, schema in TORCH_NPU_SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _IMPLS[name], "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", _FAKES[name], lib=lib)
        if name in ("npu_attention_to_ffn", "npu_ffn_to_attention"):
            # They return nothing and write other ranks' windows: without an effect token
            # a compiled graph would drop them as dead code.
            torch.library._register_effectful_op(
                getattr(torch.ops.afd, name).default, _EffectType.ORDERED
            )
    return lib


_LIBRARY = _register()
