"""`npu_ffn_worker_batching` and `ffn_worker_scheduler_` on the CPU, driven by the context.

As on A3, everything but H, the token dtype and expert_num comes from the schedule context:
the counts (A, M, BS, E), the slot stride (`attn_to_ffn_token_size` bytes), and the
addresses of the FFN window's info and data regions and of the scheduler's id buffers
(ops-transformer `ffn_wb_get_schedule_context.h`, `ffn_wb_gather_out_all.h`).

- `need_schedule=1`: wait until all A sessions flagged micro-batch m (the polling index),
  take their slots, empty them (ids INT32_MAX, flag 0), advance the polling index.
- `need_schedule=0`: take the `out_num` sessions `ffn_worker_scheduler_` published (their
  session, micro-batch and expert ids); change nothing.

Either way the slots' local expert ids (< 1_000_000; the rest are empty) are sorted stably
and their rows gathered. Everything read from memory is checked: a corrupt id or flag raises
instead of indexing out of bounds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from afd_dispatch.contract import check_batching_call
from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.kernels.reference.rows import move_rows, native, native_available, output_buffer
from afd_dispatch.layout import (
    EMPTY_ID_THRESHOLD,
    EMPTY_LOCAL_ID,
    FLAG_OFFSET,
    LAYER_OFFSET,
    QUANT_SCALE_BYTES,
    SLOTS_OFFSET,
    TOKEN_DTYPE_INT8,
    dtype_of_code,
    token_dtype_code,
)
from afd_dispatch.windows import ScheduleStopped, WindowGroup, store_fence, wait_until
from afd_dispatch.windows.doorbell import Doorbell

# What the FFN scheduler leaves in a published slot: every byte 0x7F (ops-transformer
# `ffn_worker_scheduler_aicpu.cpp`); any id >= 1_000_000 reads as empty.
SCHEDULED_LOCAL_ID = 0x7F7F7F7F


@dataclass(frozen=True)
class FfnArea:
    """The FFN side of a context: counts, slot stride and the window's two regions."""

    num_attention_ranks: int
    micro_batches: int
    tokens: int
    slots: int
    token_size: int  # bytes between slots
    info: torch.Tensor | None  # int32 [A, M, 2 + BS*E]; None where the op reads no info
    data: torch.Tensor  # uint8 [A*M*BS*E, token_size]
    timeout_s: float
    window: tuple[WindowGroup, int] | None  # the reference window group and rank, if any

    @property
    def who(self) -> str:
        """Names the FFN side in errors."""
        if self.window is None:
            return "the FFN context's window"
        group, rank = self.window
        return f"FFN rank {rank} of group {group.name!r}"

    @property
    def doorbell(self) -> Doorbell | None:
        """The doorbell of the FFN window, rung when a header arrives."""
        return None if self.window is None else self.window[0].doorbell(self.window[1])

    @property
    def flags_and_ids(self) -> torch.Tensor:
        assert self.info is not None, "the info region was not resolved"
        return self.info

    @functools.cached_property
    def info_words(self) -> np.ndarray:
        """`flags_and_ids` as numpy (the same memory): its flag and id words are read and
        stored without a torch call each."""
        return self.flags_and_ids.numpy()


def ffn_area(ctx: torch.Tensor, with_info: bool) -> FfnArea:
    """Resolve the context's FFN area. `with_info`: also the info region, which only the
    polling paths read (need_schedule=0 batching reads the scheduler's id buffers instead,
    ops-transformer `ffn_wb_get_schedule_context.h`). Kept while the context's counts and
    FFN addresses and the registered memory stay the same (`schedule_context.resolved`)."""
    spans = (sc.COUNTS_BYTES, sc.FFN_ADDRESS_BYTES)
    return sc.resolved(ctx, spans, ("ffn", with_info), lambda: _ffn_area(ctx, with_info))


def _ffn_area(ctx: torch.Tensor, with_info: bool) -> FfnArea:
    a = sc.count_field(ctx, sc.SESSION_NUM)
    m = sc.count_field(ctx, sc.MICRO_BATCH_NUM)
    bs = sc.count_field(ctx, sc.MICRO_BATCH_SIZE)
    e = sc.count_field(ctx, sc.SELECTED_EXPERT_NUM)
    token_size = sc.count_field(ctx, sc.ATTN_TO_FFN_TOKEN_SIZE)
    info = None
    if with_info:
        width = SLOTS_OFFSET + bs * e
        region = sc.sized_buffer(ctx, sc.FFN_INFO_BUF, sc.FFN_INFO_BUF_SIZE, a * m * width * 4)
        info = region.data.view(torch.int32).view(a, m, width)
    data = sc.sized_buffer(
        ctx, sc.FFN_DATA_BUF, sc.FFN_DATA_BUF_SIZE, a * m * bs * e * token_size, align=1
    )
    if data.window is not None:  # a hand-built context aimed at a window must match its layout
        layout = data.window[0].layout
        for field, seen, want in (
            (sc.SESSION_NUM, a, layout.num_attention_ranks),
            (sc.MICRO_BATCH_NUM, m, layout.micro_batches),
            (sc.MICRO_BATCH_SIZE, bs, layout.tokens),
            (sc.SELECTED_EXPERT_NUM, e, layout.slots),
            (sc.ATTN_TO_FFN_TOKEN_SIZE, token_size, layout.attn_to_ffn_token_size),
        ):
            check(seen == want, sc.field_name(field), f"{want}, as in the window's group", seen)
        sc.check_window_offset(data, sc.FFN_DATA_BUF, layout.ffn_data_offset)
        if info is not None:
            sc.check_window_offset(region, sc.FFN_INFO_BUF, 0)
            check(
                region.window == data.window,
                sc.field_name(sc.FFN_INFO_BUF),
                "the window that ffn.token_data_buf points into",
                sc.get(ctx, sc.FFN_INFO_BUF),
            )
    return FfnArea(
        a, m, bs, e, token_size, info, data.data.view(-1, token_size), data.timeout_s, data.window
    )


def ffn_worker_batching(
    schedule_context: torch.Tensor,
    expert_num: int,
    max_out_shape: Sequence[int],
    *,
    token_dtype: int = 0,
    need_schedule: int = 0,
    layer_num: int = 0,
) -> tuple[torch.Tensor, ...]:
    ctx = schedule_context
    sc.check_context_storage(ctx)
    area = ffn_area(ctx, with_info=bool(need_schedule))
    hidden = check_batching_call(
        (area.num_attention_ranks, area.tokens, area.slots), expert_num, max_out_shape, token_dtype,
        need_schedule, layer_num,
    )  # fmt: skip
    _check_window_rows(area, hidden, token_dtype)
    quant = token_dtype == TOKEN_DTYPE_INT8
    out_dtype = torch.int8 if quant else dtype_of_code(token_dtype)
    elem = out_dtype.itemsize
    payload = hidden + QUANT_SCALE_BYTES if quant else hidden * elem
    check(
        area.token_size >= payload and area.token_size % elem == 0,
        sc.field_name(sc.ATTN_TO_FFN_TOKEN_SIZE),
        f">= {payload} bytes (a row of H = {hidden} with token_dtype {token_dtype}), "
        f"a multiple of {elem}",
        area.token_size,
    )
    data_address = sc.get(ctx, sc.FFN_DATA_BUF)
    check(
        data_address % elem == 0,
        sc.field_name(sc.FFN_DATA_BUF),
        f"{elem}-byte aligned",
        data_address,
    )

    per_session = area.tokens * area.slots
    if need_schedule:
        m = sc.index_field(ctx, sc.FFN_POLLING_INDEX, area.micro_batches)
        wait_for_micro_batch(ctx, area, m)
        layer = _consistent_layer(area, area.info_words[:, m], m, layer_num)
    capacity = area.num_attention_ranks * per_session
    # Rows past n stay unwritten, as on A3: zeroing them would cost more than the gather.
    y = output_buffer((capacity, hidden), out_dtype)
    group_list = torch.zeros(expert_num, 2, dtype=torch.int64)
    outputs = list(torch.zeros(4, capacity, dtype=torch.int32).unbind())  # one allocation
    dynamic_scale = torch.zeros(capacity, dtype=torch.float32)
    gathered = None
    if need_schedule and native_available():
        scales = dynamic_scale if quant else None
        gathered = _gather_native(area, m, expert_num, y, outputs, group_list, scales)
    gathered_natively = gathered is not None
    if gathered is None:  # the torch code; or the C loop found a bad id, which this names
        if need_schedule:
            ids = area.flags_and_ids[:, m, SLOTS_OFFSET:].reshape(-1)  # (s, t, e) order
            session_ids = torch.arange(area.num_attention_ranks, dtype=torch.int64)
            micro_batches = torch.full((area.num_attention_ranks,), m, dtype=torch.int64)
        else:
            ids, session_ids, micro_batches = _published(ctx, area)
        gathered = _gather(
            area, ids, session_ids, micro_batches, expert_num, y, outputs, group_list
        )
    n, window_rows = gathered
    if quant and not gathered_natively:
        scales = area.data[:, hidden : hidden + QUANT_SCALE_BYTES]
        move_rows(dynamic_scale.view(torch.uint8).view(-1, QUANT_SCALE_BYTES), None, scales,
                  window_rows, n, f"{area.who}: window row")  # fmt: skip

    if need_schedule:
        consume_micro_batch(ctx, area, m, layer)
    actual = torch.tensor([n], dtype=torch.int64)
    return (y, group_list, *outputs, dynamic_scale, actual)


def _gather(
    area: FfnArea,
    ids: torch.Tensor,
    session_ids: torch.Tensor,
    micro_batches: torch.Tensor,
    expert_num: int,
    y: torch.Tensor,
    outputs: list[torch.Tensor],
    group_list: torch.Tensor,
) -> tuple[int, torch.Tensor]:
    """Sort the slots with an id (`ids`, (s, t, e) order) stably by local expert, gather
    their rows into `y`, fill `outputs` and `group_list`; return (n, window rows)."""
    picked = (ids < EMPTY_ID_THRESHOLD).nonzero().flatten()
    keys = ids[picked]
    if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= expert_num):
        raise AFDInputError(
            f"{area.who}: local expert ids",
            f"in [0, expert_num={expert_num}) or >= {EMPTY_ID_THRESHOLD} (empty)",
            f"min {int(keys.min())}, max {int(keys.max())}",
        )
    keys, order = torch.sort(keys, stable=True)
    picked = picked[order]
    n = picked.numel()
    per_session = area.tokens * area.slots
    entry = picked // per_session  # which published session (RECV: the session itself)
    token = picked // area.slots % area.tokens
    slot = picked % area.slots
    session = session_ids[entry]
    micro_batch = micro_batches[entry]
    window_rows = ((session * area.micro_batches + micro_batch) * area.tokens + token) * area.slots
    window_rows += slot
    rows_of_values = area.data.view(y.dtype)[:, : y.shape[1]]  # each slot's first H values
    move_rows(y, None, rows_of_values, window_rows, n, f"{area.who}: window row")
    experts, counts = torch.unique_consecutive(keys, return_counts=True)
    group_list[: experts.numel(), 0] = experts
    group_list[: experts.numel(), 1] = counts
    for out, values in zip(outputs, (session, micro_batch, token, slot), strict=True):
        out[:n] = values
    return n, window_rows


def _gather_native(
    area: FfnArea,
    m: int,
    expert_num: int,
    y: torch.Tensor,
    outputs: list[torch.Tensor],
    group_list: torch.Tensor,
    scales: torch.Tensor | None,
) -> tuple[int, torch.Tensor] | None:
    """`_gather` of micro-batch m's info rows in one C loop (`_native.gather_batch`), with
    the int8 rows' scales into `scales`; None when an id is out of range (nothing written:
    `_gather` then names it)."""
    info = area.flags_and_ids  # int32 [A, M, width], contiguous
    width = info.shape[2]
    window_rows = torch.empty(y.shape[0], dtype=torch.int64)
    n = native(
        "gather_batch",
        info[0, m].data_ptr(), area.num_attention_ranks, area.micro_batches * width, SLOTS_OFFSET,
        area.tokens, area.slots, m, area.micro_batches, expert_num, EMPTY_ID_THRESHOLD,
        area.data.data_ptr(), area.token_size, y.shape[1] * y.element_size(), y.data_ptr(),
        *(out.data_ptr() for out in outputs), window_rows.data_ptr(), group_list.data_ptr(),
        0 if scales is None else scales.data_ptr(),
    )  # fmt: skip
    return None if n < 0 else (n, window_rows[:n])


def _published(ctx: torch.Tensor, area: FfnArea) -> tuple[torch.Tensor, ...]:
    """(slot ids (out_num*BS*E,), session (out_num,), micro-batch (out_num,)) published by
    `ffn_worker_scheduler_`, each checked against the context's counts."""
    out_num = sc.get(ctx, sc.FFN_OUT_NUM)
    check(
        0 <= out_num <= area.num_attention_ranks,
        sc.field_name(sc.FFN_OUT_NUM),
        f"in [0, session_num={area.num_attention_ranks}]",
        out_num,
    )
    if out_num == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return torch.zeros(0, dtype=torch.int32), empty, empty
    per_session = area.tokens * area.slots
    # copies: the scheduler may overwrite its buffers once this op returns
    ids, session_ids, micro_batches = (
        _int32_buffer(ctx, field, size_field, 4 * count).clone()
        for field, size_field, count in (
            (sc.FFN_EXPERT_IDS_BUF, sc.FFN_EXPERT_IDS_BUF_SIZE, out_num * per_session),
            (sc.FFN_SESSION_IDS_BUF, sc.FFN_SESSION_IDS_BUF_SIZE, out_num),
            (sc.FFN_MICRO_BATCH_IDS_BUF, sc.FFN_MICRO_BATCH_IDS_BUF_SIZE, out_num),
        )
    )
    for name, values, bound in (
        (sc.FFN_SESSION_IDS_BUF, session_ids, area.num_attention_ranks),
        (sc.FFN_MICRO_BATCH_IDS_BUF, micro_batches, area.micro_batches),
    ):
        lo, hi = int(values.min()), int(values.max())
        check(lo >= 0 and hi < bound, sc.field_name(name), f"ids in [0, {bound})", values.tolist())
    return ids, session_ids.to(torch.int64), micro_batches.to(torch.int64)


def _check_window_rows(area: FfnArea, hidden: int, token_dtype: int) -> None:
    """When the context points at a reference window, its group knows H and the row type."""
    if area.window is None:
        return
    layout = area.window[0].layout
    expected = TOKEN_DTYPE_INT8 if layout.quant else token_dtype_code(layout.dtype)
    shown = "int8 + scale" if layout.quant else str(layout.dtype)
    check(
        token_dtype == expected,
        "token_dtype",
        f"{expected} for this window group ({shown})",
        token_dtype,
    )
    check(
        hidden == layout.hidden,
        "max_out_shape[3] (H)",
        f"H = {layout.hidden} of this window group",
        hidden,
    )


def ffn_worker_scheduler_(
    schedule_context: torch.Tensor, *, sync_group_size: int = 1, execute_mode: int = 0
) -> torch.Tensor:
    """Collect ready sessions into the context's id buffers for `need_schedule=0` batching.

    As the A3 kernel (ops-transformer `ffn_worker_scheduler_aicpu.cpp`): sessions form
    groups of `sync_group_size` consecutive ones. With one group, wait until every session
    flagged micro-batch m (the polling index), publish them all and advance the index.
    With several, wait until some group has a micro-batch all its sessions flagged; every
    group then publishes its lowest such micro-batch. Publishing copies a session's layer
    id, session, micro-batch and slot ids into the next out_num slot of the id buffers and
    empties its window row (ids 0x7F7F7F7F, flag 0). A stopped context returns with out_num 0.
    """
    ctx = schedule_context
    sc.check_context(ctx, sc.SCHEDULE_MODE_FFN)
    area = ffn_area(ctx, with_info=True)
    a = area.num_attention_ranks
    check(
        isinstance(sync_group_size, int) and 1 <= sync_group_size <= a and a % sync_group_size == 0,
        "sync_group_size",
        f"a divisor of session_num = {a}",
        sync_group_size,
    )
    check(execute_mode == 0, "execute_mode", "0 (the only mode A3 runs)", execute_mode)
    m = sc.index_field(ctx, sc.FFN_POLLING_INDEX, area.micro_batches)
    per_session = area.tokens * area.slots
    outputs = [
        _int32_buffer(ctx, field, size_field, 4 * count)
        for (field, size_field), count in zip(
            sc.FFN_SCHEDULER_BUFFERS, (a, a, a, a * per_session), strict=True
        )
    ]
    groups = a // sync_group_size
    info = area.flags_and_ids
    flags = info[:, :, FLAG_OFFSET]  # (A, M)
    _check_flags(area, area.info_words[:, :, FLAG_OFFSET])
    if sc.get(ctx, sc.RUN_FLAG) == 0:
        return ctx  # the kernel polls only while its run flag is set: nothing is published
    sc.put(ctx, sc.FFN_OUT_NUM, 0)

    def ready_groups() -> list[tuple[int, int]]:
        """(group, lowest micro-batch all its sessions flagged) of every ready group."""
        if groups == 1:
            return [(0, m)] if bool((flags[:, m] == 1).all()) else []
        ready = (flags.view(groups, sync_group_size, -1) == 1).all(dim=1)  # (G, M)
        return [(g, int(row.nonzero()[0])) for g, row in enumerate(ready) if bool(row.any())]

    def describe() -> str:
        missing = (flags[:, m] != 1).nonzero().flatten().tolist()
        return (
            f"{area.who} waited for micro-batch {m}: header flags missing from sessions {missing}"
        )

    try:
        wait_until(
            lambda: bool(ready_groups()),
            area.timeout_s,
            describe,
            stopped=lambda: sc.get(ctx, sc.RUN_FLAG) == 0,
            doorbell=area.doorbell,
        )
    except ScheduleStopped:
        return ctx  # the kernel returns quietly when its run flag is cleared
    layer_ids, session_ids, micro_batch_ids, expert_ids = outputs
    out = 0
    layer = 0
    for g, mb in ready_groups():
        for s in range(g * sync_group_size, (g + 1) * sync_group_size):
            row = info[s, mb]
            if out == 0:
                layer = int(row[LAYER_OFFSET])
            layer_ids[out] = row[LAYER_OFFSET]
            session_ids[out] = s
            micro_batch_ids[out] = mb
            expert_ids[out * per_session : (out + 1) * per_session] = row[SLOTS_OFFSET:]
            row[SLOTS_OFFSET:] = SCHEDULED_LOCAL_ID
            store_fence()  # the slots are empty before a sender may see the free flag
            row[FLAG_OFFSET] = 0
            out += 1
    sc.put(ctx, sc.FFN_OUT_NUM, out)
    if groups == 1:
        sc.advance_polling_index(ctx, m, area.micro_batches, layer)
    else:
        sc.put(ctx, sc.REF_LAST_LAYER_ID, layer)
    return ctx


def ffn_worker_scheduler(
    schedule_context: torch.Tensor, *, sync_group_size: int = 1, execute_mode: int = 0
) -> torch.Tensor:
    """`ffn_worker_scheduler_` on a copy of the 1024-byte context, which it returns; the
    window and id buffers the context points at change as with the in-place op."""
    sc.check_context_storage(schedule_context)
    return ffn_worker_scheduler_(
        schedule_context.clone(), sync_group_size=sync_group_size, execute_mode=execute_mode
    )


def _int32_buffer(
    ctx: torch.Tensor, field: tuple[int, int], size_field: tuple[int, int], nbytes: int
) -> torch.Tensor:
    return sc.sized_buffer(ctx, field, size_field, nbytes).data.view(torch.int32)


def consume_micro_batch(ctx: torch.Tensor, area: FfnArea, m: int, layer: int) -> None:
    """What batching does with a micro-batch it collected (`need_schedule=1`): empty its
    slots, free its flags for the senders, and poll the next one."""
    rows = area.info_words[:, m]
    rows[:, SLOTS_OFFSET:] = EMPTY_LOCAL_ID
    store_fence()  # slots are empty again before a sender may see the free flag
    rows[:, FLAG_OFFSET] = 0
    sc.advance_polling_index(ctx, m, area.micro_batches, layer)


def wait_for_micro_batch(ctx: torch.Tensor, area: FfnArea, m: int) -> None:
    cells = area.info_words[:, m, FLAG_OFFSET]
    if (cells == 1).all():
        store_fence()  # as `wait_until` does: the rows are read only after the flags
        return  # already here (the usual case once the link waited): nothing to set up

    def ready() -> bool:
        if (cells == 1).all():
            return True
        _check_flags(area, cells)  # a corrupt flag would never turn 1: fail now
        return False

    def describe() -> str:
        missing = np.flatnonzero(cells != 1).tolist()
        return (
            f"{area.who} waited for micro-batch {m}: header flags still missing from "
            f"sessions {missing}{_attention_ranks(area, missing)}"
        )

    stopped = lambda: sc.get(ctx, sc.RUN_FLAG) == 0  # noqa: E731
    wait_until(ready, area.timeout_s, describe, stopped, area.doorbell)


def _attention_ranks(area: FfnArea, sessions: list[int]) -> str:
    if area.window is None:
        return ""
    topology = area.window[0].topology
    return f" (attention ranks {[topology.attention_rank(s) for s in sessions]})"


def _check_flags(area: FfnArea, flags: np.ndarray) -> None:
    # A corrupt flag would never turn 1: fail at once instead of at the deadline.
    if ((flags != 0) & (flags != 1)).any():
        raise AFDInputError(f"{area.who}: window flags", "0 or 1", flags.tolist())


def _consistent_layer(area: FfnArea, rows: np.ndarray, m: int, layer_num: int) -> int:
    layers = rows[:, LAYER_OFFSET].tolist()  # one read of the window's words
    layer = layers[0]
    if layers.count(layer) != len(layers):
        raise AFDInputError(
            f"{area.who}: window layer ids (micro-batch {m})",
            "one layer id from every session",
            layers,
        )
    if layer_num > 0:
        check(
            0 <= layer < layer_num,
            f"{area.who}: window layer id",
            f"in [0, layer_num={layer_num})",
            layer,
        )
    return layer
