"""Schedule contexts on A3: created through torch_npu, remembered here by their sizes.

`npu_ffn_worker_batching` and `npu_attention_worker_combine` get nothing but the context
tensor, whose sizes (num_attention_ranks, micro-batches, tokens, slots, token bytes) live in device
memory. Reading them back would cost a device-to-host copy per call, so
`create_schedule_context_holder` records the sizes it was given, keyed by the context
tensor's device address, and the two ops check their arguments against that record.

A context this module did not create (made by calling torch_npu directly, or a view at an
offset) has no record: the ops then run only the checks that need no sizes (tensor type,
argument ranges, A3 limits) and forward the call.

A record lives as long as the holder that owns the context: the holder is referenced
weakly, and once it is gone its address may be reused by another allocation, so a record
whose holder died is dropped instead of being applied to a stranger.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.kernels.npu import a3
from afd_dispatch.kernels.npu._loader import torch_npu_afd
from afd_dispatch.layout import MAX_TOKENS_PER_MICRO_BATCH, MAX_TOPK, align512
from afd_dispatch.topology import MAX_RANKS_PER_ROLE

SCHEDULE_CONTEXT_BYTES = 1024  # sizeof(torch_npu::afd::ScheduleContext)
SCHEDULE_MODE_FFN, SCHEDULE_MODE_ATTENTION = 0, 1
_MODE_NAMES = {SCHEDULE_MODE_FFN: "FFN (0)", SCHEDULE_MODE_ATTENTION: "attention (1)"}
_INFO_WORD_BYTES = 4


@dataclass(frozen=True)
class ContextSizes:
    """The sizes one schedule context was created with (torch_npu's common area)."""

    schedule_mode: int
    session_num: int
    micro_batch_num: int
    micro_batch_size: int
    selected_expert_num: int
    expert_num: int
    attn_to_ffn_token_size: int
    ffn_to_attn_token_size: int
    window_size: int

    @property
    def mode_name(self) -> str:
        return _MODE_NAMES[self.schedule_mode]


@dataclass(frozen=True)
class _Record:
    sizes: ContextSizes
    holder: weakref.ref[Any] | None  # None: the holder type has no weak references
    kept: torch.Tensor | None  # then the context tensor is kept alive instead

    def stale(self) -> bool:
        return self.holder is not None and self.holder() is None


_records: dict[int, _Record] = {}
_lock = threading.Lock()  # holders may be created and ops called from several host threads


def recorded_context(schedule_context: torch.Tensor) -> ContextSizes | None:
    """The sizes `schedule_context` was created with here, or None for a context we did not
    create (or whose holder has been freed)."""
    key = schedule_context.data_ptr()
    with _lock:
        record = _records.get(key)
        if record is None:
            return None
        if record.stale():
            del _records[key]
            return None
        return record.sizes


def _remember(context: torch.Tensor, sizes: ContextSizes, holder: object) -> None:
    try:
        record = _Record(sizes, weakref.ref(holder), None)
    except TypeError:
        # No weak references to this holder type: keep its context tensor instead, so the
        # address cannot be handed to another allocation while the record exists.
        record = _Record(sizes, None, context)
    with _lock:
        _records[context.data_ptr()] = record


def inherit_record(source: torch.Tensor, copy: object) -> None:
    """Record `copy`, a new context tensor made from `source` (the non-in-place schedulers'
    result), with `source`'s sizes, for as long as the `copy` tensor object lives.

    The schedulers change only the polling index / micro-batch id and the published ids,
    never the sizes, so the copy's sizes are the source's. Nothing happens for a source
    without a record or a result that is not a separate context tensor.
    """
    sizes = recorded_context(source)
    if sizes is None or not isinstance(copy, torch.Tensor) or copy.data_ptr() == source.data_ptr():
        return
    # Keyed by the copy's address and dropped once the copy object is gone: a view of it
    # taken later is still recognised while the copy lives, and a freed address is never
    # vouched for.
    _remember(copy, sizes, copy)


def check_context_tensor(schedule_context: object) -> torch.Tensor:
    """The static checks every context argument gets: an int8[1024] contiguous tensor."""
    if (
        isinstance(schedule_context, torch.Tensor)
        and schedule_context.dtype == torch.int8
        and tuple(schedule_context.shape) == (SCHEDULE_CONTEXT_BYTES,)
        and schedule_context.is_contiguous()
    ):
        return schedule_context
    if isinstance(schedule_context, torch.Tensor):
        layout = "" if schedule_context.is_contiguous() else " non-contiguous"
        seen = f"{schedule_context.dtype} {tuple(schedule_context.shape)}{layout}"
    else:
        seen = type(schedule_context).__name__
    raise AFDInputError(
        "schedule_context",
        f"the contiguous int8[{SCHEDULE_CONTEXT_BYTES}] tensor of a ScheduleContextHolder",
        seen,
    )


def context_sizes(schedule_context: object, mode: int) -> ContextSizes | None:
    """Check a context argument; return its recorded sizes (None when not ours).

    A recorded context of the other mode is refused: an attention context handed to the
    FFN batching op would make it poll the attention window.
    """
    ctx = check_context_tensor(schedule_context)
    sizes = recorded_context(ctx)
    if sizes is not None:
        check(
            sizes.schedule_mode == mode,
            "schedule_context",
            f"a context created with schedule_mode {_MODE_NAMES[mode]}",
            f"schedule_mode {sizes.mode_name}",
        )
    return sizes


def check_holder_args(
    schedule_mode: int,
    session_num: int,
    micro_batch_num: int,
    micro_batch_size: int,
    selected_expert_num: int,
    expert_num: int,
    attn_to_ffn_token_size: int,
    ffn_to_attn_token_size: int,
    ffn_window: int,
    ffn_window_size: int,
    attention_window: int,
    attention_window_size: int,
) -> ContextSizes:
    """torch_npu's own host checks of a holder, plus the A3 limits of the ops that use it.

    torch_npu rejects these too, but with a log line and a bare failure; checked here they
    name the argument. The two token sizes are byte strides: torch_npu's holder
    (`torch_npu/csrc/afd/ScheduleContext.cpp`, CheckParams) wants multiples of 512 and
    neither rounds them nor compares them with H, so every multiple of 512 within
    `a3.token_size_bounds()` is accepted here (align512(H + 4) = 3072 and align512(2H) =
    6144 at H = 2880; 7680 and 14336 at H = 7168); whether a size holds the rows of a given
    H is checked by batching and combine against this record. Not checked: that the window
    belongs to a registered HCCL window group, and the size of its data area.
    """
    mode = a3.check_int(schedule_mode, "schedule_mode", SCHEDULE_MODE_FFN, SCHEDULE_MODE_ATTENTION)
    ffn = mode == SCHEDULE_MODE_FFN
    num_attention_ranks = a3.check_int(session_num, "session_num", 1, MAX_RANKS_PER_ROLE)
    # npu_ffn_to_attention, the only writer of an attention window, takes M == 1 on A3: an
    # attention context with more micro-batches would make combine wait for one that can
    # never arrive.
    micro_batches = a3.check_int(micro_batch_num, "micro_batch_num", 1, None if ffn else 1)
    tokens = a3.check_int(micro_batch_size, "micro_batch_size", 1, MAX_TOKENS_PER_MICRO_BATCH)
    # combine supports exactly one shared expert on A3, so an attention context has K + 1
    # slots with 1 <= K <= MAX_TOPK
    slots = a3.check_int(
        selected_expert_num,
        "selected_expert_num",
        1 if ffn else 2,
        a3.MAX_SLOTS if ffn else MAX_TOPK + 1,
    )
    a3.check_int(expert_num, "expert_num", 1)
    a2f_bounds, f2a_bounds = a3.token_size_bounds()
    a3.check_int(attn_to_ffn_token_size, "attn_to_ffn_token_size", 1)
    a3.check_int(ffn_to_attn_token_size, "ffn_to_attn_token_size", 1)
    a3.check_token_size(attn_to_ffn_token_size, "attn_to_ffn_token_size", a2f_bounds)
    a3.check_token_size(ffn_to_attn_token_size, "ffn_to_attn_token_size", f2a_bounds)

    name = "ffn_window" if ffn else "attention_window"
    window = ffn_window if ffn else attention_window
    size = ffn_window_size if ffn else attention_window_size
    a3.check_int(window, name, 1)
    per_row = tokens * slots + (2 if ffn else 0)  # FFN info rows start with [flag, layer]
    info = _INFO_WORD_BYTES * per_row * micro_batches * (num_attention_ranks if ffn else 1)
    a3.check_int(size, f"{name}_size", align512(info) + 1)
    return ContextSizes(
        mode,
        num_attention_ranks,
        micro_batches,
        tokens,
        slots,
        expert_num,
        attn_to_ffn_token_size,
        ffn_to_attn_token_size,
        size,
    )


def create_schedule_context_holder(
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
) -> Any:
    """`torch_npu._afd.create_schedule_context_holder`, checked and remembered.

    Arguments as torch_npu's: schedule_mode 0 (FFN rank) or 1 (attention rank); the token
    sizes are bytes per window slot, multiples of 512; the window of the chosen mode is the
    device address and byte size of this rank's registered HCCL window (the other mode's
    pair is ignored). Returns torch_npu's holder unchanged; its context tensor's sizes are
    recorded so batching and combine can check their arguments without reading the device.
    """
    sizes = check_holder_args(
        schedule_mode, session_num, micro_batch_num, micro_batch_size, selected_expert_num,
        expert_num, attn_to_ffn_token_size, ffn_to_attn_token_size, ffn_window,
        ffn_window_size, attention_window, attention_window_size,
    )  # fmt: skip
    holder = torch_npu_afd().create_schedule_context_holder(
        schedule_mode,
        session_num,
        micro_batch_num,
        micro_batch_size,
        selected_expert_num,
        expert_num,
        attn_to_ffn_token_size,
        ffn_to_attn_token_size,
        ffn_window=ffn_window,
        ffn_window_size=ffn_window_size,
        attention_window=attention_window,
        attention_window_size=attention_window_size,
    )
    _remember(holder.get_schedule_context_tensor(), sizes, holder)
    return holder


__all__ = [
    "ContextSizes",
    "check_context_tensor",
    "context_sizes",
    "create_schedule_context_holder",
    "inherit_record",
    "recorded_context",
]
