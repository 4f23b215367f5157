"""The schedule context: a 1024-byte record the batching, combine and scheduler ops read.

Its byte layout is torch_npu's packed `ScheduleContext` struct (common area at 0, control
at 128, attention area at 256, FFN area at 384, the FFN scheduler's outputs at 512;
torch_npu `csrc/afd/ScheduleContext.h`, ops-transformer `attention_ffn_schedule.h`), and
like the hardware's it holds addresses: of the windows' info and data regions, and of the
id buffers `ffn_worker_scheduler_` publishes into. Addresses are those of
`afd_dispatch.windows.memory`, so a context built by hand works as well as one made by a
holder. Two reference-only fields live in the struct's reserved tail (bytes 640..): the
layer id of the last micro-batch batched or scheduled, and how many micro-batches this
context has advanced past (carried over on resume, so a restarted FFN worker can tell which
window group it serves next).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from afd_dispatch.errors import check
from afd_dispatch.windows import (
    WindowGroup,
    memory_generation,
    resolve,
    window_of,
)

T = TypeVar("T")
CONTEXT_BYTES = 1024
SCHEDULE_MODE_FFN, SCHEDULE_MODE_ATTENTION = 0, 1
FFN_INFO_HEADER_WORDS = 2  # flag, layer id; then BS * E local expert ids

# (byte offset, width in bytes) of the fields we use
SESSION_NUM = (0, 4)
MICRO_BATCH_NUM = (4, 4)
MICRO_BATCH_SIZE = (8, 4)
SELECTED_EXPERT_NUM = (12, 4)
EXPERT_NUM = (16, 4)
ATTN_TO_FFN_TOKEN_SIZE = (20, 4)
FFN_TO_ATTN_TOKEN_SIZE = (24, 4)
SCHEDULE_MODE = (28, 4)
RUN_FLAG = (128, 4)
ATTN_INFO_BUF = (256, 8)
ATTN_INFO_BUF_SIZE = (264, 8)
ATTN_DATA_BUF = (272, 8)
ATTN_DATA_BUF_SIZE = (280, 8)
ATTN_MICRO_BATCH_ID = (288, 4)
FFN_INFO_BUF = (384, 8)
FFN_INFO_BUF_SIZE = (392, 8)
FFN_DATA_BUF = (400, 8)
FFN_DATA_BUF_SIZE = (408, 8)
FFN_POLLING_INDEX = (416, 8)
FFN_LAYER_IDS_BUF = (512, 8)
FFN_LAYER_IDS_BUF_SIZE = (520, 8)
FFN_SESSION_IDS_BUF = (528, 8)
FFN_SESSION_IDS_BUF_SIZE = (536, 8)
FFN_MICRO_BATCH_IDS_BUF = (544, 8)
FFN_MICRO_BATCH_IDS_BUF_SIZE = (552, 8)
FFN_EXPERT_IDS_BUF = (560, 8)
FFN_EXPERT_IDS_BUF_SIZE = (568, 8)
FFN_OUT_NUM = (576, 4)
REF_LAST_LAYER_ID = (640, 4)
REF_BATCHED_COUNT = (648, 8)  # micro-batches this context advanced past since it was fresh

# The FFN scheduler's output buffers, in the order torch_npu's holder lays them out.
FFN_SCHEDULER_BUFFERS = (
    (FFN_LAYER_IDS_BUF, FFN_LAYER_IDS_BUF_SIZE),
    (FFN_SESSION_IDS_BUF, FFN_SESSION_IDS_BUF_SIZE),
    (FFN_MICRO_BATCH_IDS_BUF, FFN_MICRO_BATCH_IDS_BUF_SIZE),
    (FFN_EXPERT_IDS_BUF, FFN_EXPERT_IDS_BUF_SIZE),
)
_FIELD_NAMES = {
    SESSION_NUM: "session_num",
    MICRO_BATCH_NUM: "micro_batch_num",
    MICRO_BATCH_SIZE: "micro_batch_size",
    SELECTED_EXPERT_NUM: "selected_expert_num",
    ATTN_TO_FFN_TOKEN_SIZE: "attn_to_ffn_token_size",
    ATTN_INFO_BUF: "attention.token_info_buf",
    ATTN_DATA_BUF: "attention.token_data_buf",
    ATTN_MICRO_BATCH_ID: "attention.micro_batch_id",
    FFN_INFO_BUF: "ffn.token_info_buf",
    FFN_DATA_BUF: "ffn.token_data_buf",
    FFN_POLLING_INDEX: "ffn.polling_index",
    FFN_LAYER_IDS_BUF: "ffn.layer_ids_buf",
    FFN_SESSION_IDS_BUF: "ffn.session_ids_buf",
    FFN_MICRO_BATCH_IDS_BUF: "ffn.micro_batch_ids_buf",
    FFN_EXPERT_IDS_BUF: "ffn.expert_ids_buf",
    FFN_OUT_NUM: "ffn.out_num",
}
_MAX_COUNT = 2**20  # any larger session / micro-batch / token / slot count is corrupt


_FORMATS = {4: "<i", 8: "<q"}  # the struct's little-endian int32 / int64 fields


def get(ctx: torch.Tensor, field: tuple[int, int]) -> int:
    offset, width = field
    # through the tensor's own memory (a NumPy view): a few hundred ns, where slicing and
    # viewing the tensor cost microseconds, and the ops read ~10 fields per call
    value: int = struct.unpack_from(_FORMATS[width], ctx.numpy().data, offset)[0]
    return value


def put(ctx: torch.Tensor, field: tuple[int, int], value: int) -> None:
    offset, width = field
    struct.pack_into(_FORMATS[width], ctx.numpy().data, offset, value)


def field_name(field: tuple[int, int]) -> str:
    """How errors name a context field: `schedule_context <torch_npu's field name>`."""
    return f"schedule_context {_FIELD_NAMES.get(field, str(field))}"


def count_field(ctx: torch.Tensor, field: tuple[int, int]) -> int:
    """A count from the (untrusted) context, checked to be in [1, 2**20]."""
    value = get(ctx, field)
    check(1 <= value <= _MAX_COUNT, field_name(field), f"in [1, {_MAX_COUNT}]", value)
    return value


def index_field(ctx: torch.Tensor, field: tuple[int, int], bound: int) -> int:
    """An index from the (untrusted) context, checked to be in [0, bound)."""
    value = get(ctx, field)
    check(0 <= value < bound, field_name(field), f"in [0, {bound})", value)
    return value


def check_context(ctx: torch.Tensor, mode: int) -> None:
    """The context tensor's type, and its schedule_mode (checked by the scheduler ops)."""
    check_context_storage(ctx)
    seen = get(ctx, SCHEDULE_MODE)
    want = "FFN (0)" if mode == SCHEDULE_MODE_FFN else "attention (1)"
    check(seen == mode, "schedule_context schedule_mode", want, seen)


@dataclass(frozen=True)
class Buffer:
    """A region a context field points at: its bytes, and the window it belongs to, if any."""

    data: torch.Tensor  # uint8 view of exactly the bytes asked for
    timeout_s: float
    window: tuple[WindowGroup, int] | None
    offset: int  # bytes from the start of the registered tensor (of the window)


def buffer(ctx: torch.Tensor, field: tuple[int, int], nbytes: int, align: int = 4) -> Buffer:
    """The `nbytes` that context `field` (an address) points at, resolved in registered
    memory; the address must be `align`-byte aligned for the values read there."""
    address = get(ctx, field)
    check(address % align == 0, field_name(field), f"an address aligned to {align} bytes", address)
    region, data = resolve(address, nbytes, field_name(field))
    return Buffer(data, region.timeout_s, window_of(region), address - region.start)


def sized_buffer(
    ctx: torch.Tensor,
    field: tuple[int, int],
    size_field: tuple[int, int],
    nbytes: int,
    align: int = 4,
) -> Buffer:
    """Like `buffer`, after checking the context's own size field covers `nbytes`."""
    size = get(ctx, size_field)
    check(size >= nbytes, f"{field_name(field)} size", f">= {nbytes} bytes", size)
    return buffer(ctx, field, nbytes, align)


_RESOLVED_LIMIT = 256  # contexts whose resolution is kept (more: start over)
_resolved: dict[tuple[object, ...], tuple[bytes, Any]] = {}
_resolved_generation = -1


# The bytes a resolution depends on: the counts, and an area's addresses and sizes; never
# the fields the ops advance (run flag, micro-batch id, polling index).
COUNTS_BYTES = (0, 32)
ATTN_ADDRESS_BYTES = (256, 32)
FFN_ADDRESS_BYTES = (384, 32)


def resolved(
    ctx: torch.Tensor,
    spans: tuple[tuple[int, int], ...],
    key: tuple[object, ...],
    resolve: Callable[[], T],
) -> T:
    """`resolve()`, or what it returned last time for this context and `key` when nothing
    it depends on changed: the context's bytes in `spans` ((offset, length) pairs) and the
    registered memory (`memory_generation`).

    Resolving a context (checking its counts and sizes, finding its window, building the
    views) costs about 100 us, and a decode step does it per micro-batch and layer. Any
    change of registered memory drops every kept resolution, so no view outlives its
    window for longer than until the next call.
    """
    global _resolved_generation
    generation = memory_generation()
    if generation != _resolved_generation or len(_resolved) >= _RESOLVED_LIMIT:
        _resolved.clear()
        _resolved_generation = generation
    raw = ctx.numpy().tobytes()
    static = b"".join(raw[a : a + n] for a, n in spans)
    full_key = (ctx.data_ptr(), *key)
    hit = _resolved.get(full_key)
    if hit is not None and hit[0] == static:
        return cast(T, hit[1])
    value = resolve()
    _resolved[full_key] = (static, value)
    return value


def check_window_offset(buf: Buffer, field: tuple[int, int], expected: int) -> None:
    """A context field pointing into a reference window must point where the layout puts it."""
    check(
        buf.offset == expected,
        field_name(field),
        f"the address of byte {expected} of its window (the window layout's region)",
        f"byte {buf.offset}",
    )


def last_batched_layer(schedule_context: torch.Tensor) -> int:
    """The layer id of the micro-batch the last `npu_ffn_worker_batching` (need_schedule=1)
    or `ffn_worker_scheduler_` on this FFN context collected (a reference-only field)."""
    check_context(schedule_context, SCHEDULE_MODE_FFN)
    return get(schedule_context, REF_LAST_LAYER_ID)


def batched_micro_batches(schedule_context: torch.Tensor) -> int:
    """How many micro-batches this FFN context's polling index has advanced past (a resumed
    context keeps counting where its predecessor stopped)."""
    check_context(schedule_context, SCHEDULE_MODE_FFN)
    return get(schedule_context, REF_BATCHED_COUNT)


def advance_polling_index(ctx: torch.Tensor, m: int, micro_batches: int, layer: int) -> None:
    """Record that micro-batch `m` was collected: the next one is polled next."""
    put(ctx, FFN_POLLING_INDEX, (m + 1) % micro_batches)
    put(ctx, REF_LAST_LAYER_ID, layer)
    put(ctx, REF_BATCHED_COUNT, get(ctx, REF_BATCHED_COUNT) + 1)


def check_context_storage(storage: torch.Tensor) -> None:
    ok = (
        isinstance(storage, torch.Tensor)
        and storage.dtype == torch.int8
        and tuple(storage.shape) == (CONTEXT_BYTES,)
        and storage.is_contiguous()
    )
    check(ok, "schedule_context", f"an int8[{CONTEXT_BYTES}] context tensor", _describe(storage))


def _describe(ctx: object) -> str:
    if isinstance(ctx, torch.Tensor):
        return f"{ctx.dtype} {tuple(ctx.shape)}"
    return type(ctx).__name__
