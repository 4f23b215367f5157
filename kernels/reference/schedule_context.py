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
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from afd_dispatch.errors import check
from afd_dispatch.layout import align512
from afd_dispatch.windows import (
    WindowGroup,
    memory_generation,
    register_memory,
    resolve,
    resolve_address,
    unregister_memory,
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


class ScheduleContextHolder:
    """Owns one context tensor; mirrors `torch_npu._afd.ScheduleContextHolder`."""

    def __init__(
        self,
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
        *,
        storage: torch.Tensor | None = None,
    ) -> None:
        """`storage` (reference only): int8[1024] memory to keep the context in."""
        check(
            schedule_mode in (SCHEDULE_MODE_FFN, SCHEDULE_MODE_ATTENTION),
            "schedule_mode",
            "0 (FFN) or 1 (attention)",
            schedule_mode,
        )
        self._args = {
            "schedule_mode": schedule_mode,
            "session_num": session_num,
            "micro_batch_num": micro_batch_num,
            "micro_batch_size": micro_batch_size,
            "selected_expert_num": selected_expert_num,
            "expert_num": expert_num,
            "attn_to_ffn_token_size": attn_to_ffn_token_size,
            "ffn_to_attn_token_size": ffn_to_attn_token_size,
        }
        ffn = schedule_mode == SCHEDULE_MODE_FFN
        self._window = ffn_window if ffn else attention_window
        self._window_size = ffn_window_size if ffn else attention_window_size
        if storage is None:
            storage = torch.zeros(CONTEXT_BYTES, dtype=torch.int8)
        check_context_storage(storage)
        self._ctx = storage

    def init(self, resume: bool = False) -> None:
        """Check every size against the window's group, then fill the context.

        With `resume`, a context already in the storage for the same sizes keeps its FFN
        polling index / attention micro-batch id (a restarted worker carries on where its
        predecessor stopped); anything else starts fresh.
        """
        a = self._args
        carried = self._carried_position() if resume else None
        mode = a["schedule_mode"]
        ffn = mode == SCHEDULE_MODE_FFN
        name = "ffn_window" if ffn else "attention_window"
        group, rank, offset = resolve_address(self._window, name)
        check(offset == 0, name, "the start of a window", offset)
        role = "ffn" if ffn else "attention"
        check(group.topology.role_of(rank) == role, name, f"the window of an {role} rank", rank)
        layout = group.layout
        expected = {
            "session_num": layout.sessions,
            "micro_batch_num": layout.micro_batches,
            "micro_batch_size": layout.tokens,
            "selected_expert_num": layout.slots,
            # batching reads FFN-window slots at this stride: it must be the group's exactly
            "attn_to_ffn_token_size": layout.attn_to_ffn_token_size,
        }
        for key, want in expected.items():
            check(a[key] == want, key, f"{want} (group {group.name!r})", a[key])
        # No kernel reads ffn_to_attn_token_size (combine strides by H); torch_npu's holder
        # wants it a multiple of 512, so both the row size and its 512-rounding are taken.
        row = layout.ffn_to_attn_token_size
        allowed = sorted({row, align512(row)})
        check(
            a["ffn_to_attn_token_size"] in allowed,
            "ffn_to_attn_token_size",
            f"{' or '.join(map(str, allowed))} (group {group.name!r})",
            a["ffn_to_attn_token_size"],
        )
        check(a["expert_num"] >= 1, "expert_num", ">= 1", a["expert_num"])
        need = layout.ffn_window_bytes if ffn else layout.attn_window_bytes
        check(
            need <= self._window_size <= group.window_bytes(rank),
            f"{name}_size",
            f"in [{need}, {group.window_bytes(rank)}]",
            self._window_size,
        )
        ctx = self._ctx
        for key, field in (
            ("session_num", SESSION_NUM),
            ("micro_batch_num", MICRO_BATCH_NUM),
            ("micro_batch_size", MICRO_BATCH_SIZE),
            ("selected_expert_num", SELECTED_EXPERT_NUM),
            ("expert_num", EXPERT_NUM),
            ("attn_to_ffn_token_size", ATTN_TO_FFN_TOKEN_SIZE),
            ("ffn_to_attn_token_size", FFN_TO_ATTN_TOKEN_SIZE),
        ):
            put(ctx, field, a[key])
        put(ctx, SCHEDULE_MODE, mode)
        put(ctx, RUN_FLAG, 1)
        if ffn:
            put(ctx, FFN_INFO_BUF, self._window)
            put(ctx, FFN_INFO_BUF_SIZE, layout.ffn_info_bytes)
            put(ctx, FFN_DATA_BUF, self._window + layout.ffn_data_offset)
            put(ctx, FFN_DATA_BUF_SIZE, layout.ffn_data_bytes)
            put(ctx, FFN_POLLING_INDEX, 0)
            self._allocate_scheduler_buffers(layout.ffn_scheduler_buffer_bytes, group.timeout_s)
            put(ctx, FFN_OUT_NUM, 0)
        else:
            put(ctx, ATTN_INFO_BUF, self._window)
            put(ctx, ATTN_INFO_BUF_SIZE, layout.attn_info_bytes)
            put(ctx, ATTN_DATA_BUF, self._window + layout.attn_data_offset)
            put(ctx, ATTN_DATA_BUF_SIZE, layout.attn_window_bytes - layout.attn_data_offset)
            # combine consumes (id + 1) % M, so the first combine takes micro-batch 0 (inferred)
            put(ctx, ATTN_MICRO_BATCH_ID, layout.micro_batches - 1)
        if carried is not None:
            put(ctx, FFN_POLLING_INDEX if ffn else ATTN_MICRO_BATCH_ID, carried)
        else:
            put(ctx, REF_BATCHED_COUNT, 0)

    def _allocate_scheduler_buffers(self, sizes: tuple[int, ...], timeout_s: float) -> None:
        """Where `ffn_worker_scheduler_` publishes what it collected: like torch_npu's
        holder, one workspace with each buffer starting 512-byte aligned; the recorded
        sizes are the unaligned ones. It lives as long as the context tensor, which callers
        often keep without the holder."""
        self._release()
        starts, total = [], 0
        for size in sizes:
            starts.append(total)
            total += align512(size)
        workspace = torch.zeros(total, dtype=torch.uint8)
        base = register_memory(workspace, timeout_s=timeout_s)
        self._workspace = weakref.finalize(self._ctx, unregister_memory, base)
        for (field, size_field), start, size in zip(
            FFN_SCHEDULER_BUFFERS, starts, sizes, strict=True
        ):
            put(self._ctx, field, base + start)
            put(self._ctx, size_field, size)

    def _release(self) -> None:
        finalizer = getattr(self, "_workspace", None)
        if finalizer is not None:
            finalizer()

    def _carried_position(self) -> int | None:
        ctx, a = self._ctx, self._args
        fields = (
            (SCHEDULE_MODE, "schedule_mode"),
            (SESSION_NUM, "session_num"),
            (MICRO_BATCH_NUM, "micro_batch_num"),
            (MICRO_BATCH_SIZE, "micro_batch_size"),
            (SELECTED_EXPERT_NUM, "selected_expert_num"),
        )
        if any(get(ctx, field) != a[key] for field, key in fields):
            return None
        ffn = a["schedule_mode"] == SCHEDULE_MODE_FFN
        position = get(ctx, FFN_POLLING_INDEX if ffn else ATTN_MICRO_BATCH_ID)
        return position if 0 <= position < a["micro_batch_num"] else None

    def get_schedule_context_tensor(self) -> torch.Tensor:
        return self._ctx

    def stop_schedule(self) -> None:
        """Ask ops waiting on this context to give up (they raise `ScheduleStopped`)."""
        put(self._ctx, RUN_FLAG, 0)

    def get_schedule_context_info(self) -> str:
        ctx = self._ctx
        fields = {
            "schedule_mode": SCHEDULE_MODE,
            "session_num": SESSION_NUM,
            "micro_batch_num": MICRO_BATCH_NUM,
            "micro_batch_size": MICRO_BATCH_SIZE,
            "selected_expert_num": SELECTED_EXPERT_NUM,
            "run_flag": RUN_FLAG,
            "ffn_polling_index": FFN_POLLING_INDEX,
            "attention_micro_batch_id": ATTN_MICRO_BATCH_ID,
        }
        return ", ".join(f"{k}={get(ctx, f)}" for k, f in fields.items())


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
) -> ScheduleContextHolder:
    holder = ScheduleContextHolder(
        schedule_mode,
        session_num,
        micro_batch_num,
        micro_batch_size,
        selected_expert_num,
        expert_num,
        attn_to_ffn_token_size,
        ffn_to_attn_token_size,
        ffn_window,
        ffn_window_size,
        attention_window,
        attention_window_size,
    )
    holder.init()
    return holder


def context_for(
    group: WindowGroup, rank: int, expert_num: int = 1, persistent: bool = False
) -> ScheduleContextHolder:
    """The holder a rank of `group` needs, with every size taken from the group's layout.

    `persistent=True` keeps the context in the group's memory beside the rank's window
    (`WindowGroup.context_storage`) and resumes a context found there.
    """
    layout = group.layout
    ffn = group.topology.is_ffn(rank)
    address, size = group.address(rank), group.window_bytes(rank)
    holder = ScheduleContextHolder(
        SCHEDULE_MODE_FFN if ffn else SCHEDULE_MODE_ATTENTION,
        layout.sessions,
        layout.micro_batches,
        layout.tokens,
        layout.slots,
        expert_num,
        layout.attn_to_ffn_token_size,
        layout.ffn_to_attn_token_size,
        ffn_window=address if ffn else 0,
        ffn_window_size=size if ffn else 0,
        attention_window=0 if ffn else address,
        attention_window_size=0 if ffn else size,
        storage=group.context_storage(rank) if persistent else None,
    )
    holder.init(resume=persistent)
    return holder
