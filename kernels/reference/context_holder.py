"""`ScheduleContextHolder`: builds and fills a schedule context, like torch_npu's holder.

`create_schedule_context_holder` mirrors `torch_npu._afd.create_schedule_context_holder`;
`context_for` builds the holder a rank of a window group needs. The context's byte layout
and the reads the ops make of it are in `schedule_context`.
"""

from __future__ import annotations

import weakref

import torch

from afd_dispatch.errors import check
from afd_dispatch.kernels.reference.schedule_context import (
    ATTN_DATA_BUF,
    ATTN_DATA_BUF_SIZE,
    ATTN_INFO_BUF,
    ATTN_INFO_BUF_SIZE,
    ATTN_MICRO_BATCH_ID,
    ATTN_TO_FFN_TOKEN_SIZE,
    CONTEXT_BYTES,
    EXPERT_NUM,
    FFN_DATA_BUF,
    FFN_DATA_BUF_SIZE,
    FFN_INFO_BUF,
    FFN_INFO_BUF_SIZE,
    FFN_OUT_NUM,
    FFN_POLLING_INDEX,
    FFN_SCHEDULER_BUFFERS,
    FFN_TO_ATTN_TOKEN_SIZE,
    MICRO_BATCH_NUM,
    MICRO_BATCH_SIZE,
    REF_BATCHED_COUNT,
    RUN_FLAG,
    SCHEDULE_MODE,
    SCHEDULE_MODE_ATTENTION,
    SCHEDULE_MODE_FFN,
    SELECTED_EXPERT_NUM,
    SESSION_NUM,
    check_context_storage,
    get,
    put,
)
from afd_dispatch.layout import align512
from afd_dispatch.windows import (
    WindowGroup,
    register_memory,
    resolve_address,
    unregister_memory,
)


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
            "session_num": layout.num_attention_ranks,
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
        layout.num_attention_ranks,
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
