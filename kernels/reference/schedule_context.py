"""The schedule context: a 1024-byte record the batching and combine ops read and advance.

Its byte layout is torch_npu's packed `ScheduleContext` struct (common area at 0, control
at 128, attention area at 256, FFN area at 384), so a context can be inspected the same way
on both backends. Window "addresses" are reference window addresses
(`WindowGroup.address`). Three reference-only fields live in the struct's reserved tail
(bytes 640..): the layer id of the last batched micro-batch, a marker that the scheduler
op found a micro-batch ready, and how many micro-batches this context has batched (carried
over on resume, so a restarted FFN worker can tell which window group it serves next).
"""

from __future__ import annotations

import torch

from afd_dispatch.errors import check
from afd_dispatch.layout import align512
from afd_dispatch.windows import WindowGroup, resolve_address

CONTEXT_BYTES = 1024
SCHEDULE_MODE_FFN, SCHEDULE_MODE_ATTENTION = 0, 1

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
FFN_OUT_NUM = (576, 4)
REF_LAST_LAYER_ID = (640, 4)
REF_READY_MICRO_BATCH = (644, 4)  # micro-batch + 1 found ready by the scheduler op, or 0
REF_BATCHED_COUNT = (648, 8)  # micro-batches batched on this context since it was fresh


def get(ctx: torch.Tensor, field: tuple[int, int]) -> int:
    offset, width = field
    dtype = torch.int64 if width == 8 else torch.int32
    return int(ctx[offset : offset + width].view(dtype)[0])


def put(ctx: torch.Tensor, field: tuple[int, int], value: int) -> None:
    offset, width = field
    dtype = torch.int64 if width == 8 else torch.int32
    ctx[offset : offset + width].view(dtype)[0] = value


def check_context(ctx: torch.Tensor, mode: int) -> None:
    check_context_storage(ctx)
    seen = get(ctx, SCHEDULE_MODE)
    want = "FFN (0)" if mode == SCHEDULE_MODE_FFN else "attention (1)"
    check(seen == mode, "schedule_context schedule_mode", want, seen)


def last_batched_layer(schedule_context: torch.Tensor) -> int:
    """The layer id the last `npu_ffn_worker_batching` on this FFN context collected."""
    check_context(schedule_context, SCHEDULE_MODE_FFN)
    return get(schedule_context, REF_LAST_LAYER_ID)


def batched_micro_batches(schedule_context: torch.Tensor) -> int:
    """How many micro-batches `npu_ffn_worker_batching` has collected on this FFN context
    (a resumed context keeps counting where its predecessor stopped)."""
    check_context(schedule_context, SCHEDULE_MODE_FFN)
    return get(schedule_context, REF_BATCHED_COUNT)


def check_context_storage(storage: torch.Tensor) -> None:
    ok = (
        isinstance(storage, torch.Tensor)
        and storage.dtype == torch.int8
        and tuple(storage.shape) == (CONTEXT_BYTES,)
        and storage.is_contiguous()
    )
    check(ok, "schedule_context", f"an int8[{CONTEXT_BYTES}] context tensor", _describe(storage))


def context_window(ctx: torch.Tensor, mode: int) -> tuple[WindowGroup, int]:
    """(group, rank) of the window a checked context points at."""
    field = FFN_INFO_BUF if mode == SCHEDULE_MODE_FFN else ATTN_INFO_BUF
    group, rank, _ = resolve_address(get(ctx, field), "schedule_context window")
    return group, rank


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
            "attn_to_ffn_token_size": layout.a2f_row_bytes,
            "ffn_to_attn_token_size": layout.f2a_row_bytes,
        }
        for key, want in expected.items():
            # torch_npu's holder rounds token sizes up to 512 bytes; accept both spellings.
            allowed = {want, align512(want)} if key.endswith("token_size") else {want}
            shown = " or ".join(str(v) for v in sorted(allowed))
            check(a[key] in allowed, key, f"{shown} (group {group.name!r})", a[key])
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
        else:
            put(ctx, ATTN_INFO_BUF, self._window)
            put(ctx, ATTN_INFO_BUF_SIZE, layout.attn_info_bytes)
            put(ctx, ATTN_DATA_BUF, self._window + layout.attn_data_offset)
            put(ctx, ATTN_DATA_BUF_SIZE, layout.attn_window_bytes - layout.attn_data_offset)
            # combine consumes (id + 1) % M, so the first combine takes micro-batch 0 (inferred)
            put(ctx, ATTN_MICRO_BATCH_ID, layout.micro_batches - 1)
        put(ctx, REF_READY_MICRO_BATCH, 0)
        if carried is not None:
            put(ctx, FFN_POLLING_INDEX if ffn else ATTN_MICRO_BATCH_ID, carried)
        else:
            put(ctx, REF_BATCHED_COUNT, 0)

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
        layout.a2f_row_bytes,
        layout.f2a_row_bytes,
        ffn_window=address if ffn else 0,
        ffn_window_size=size if ffn else 0,
        attention_window=0 if ffn else address,
        attention_window_size=0 if ffn else size,
        storage=group.context_storage(rank) if persistent else None,
    )
    holder.init(resume=persistent)
    return holder
