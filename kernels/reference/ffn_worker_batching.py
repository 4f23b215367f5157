"""`npu_ffn_worker_batching` and `ffn_worker_scheduler_` on the CPU.

Collect micro-batch m (the context's polling index) from all A attention ranks, sort the
slots stably by local expert id, gather their rows, reset the slots and flags, advance.
Everything read from the window is checked: a corrupt id or flag raises instead of
indexing out of bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from afd_dispatch.contract import check_batching_args
from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.layout import (
    EMPTY_ID_THRESHOLD,
    EMPTY_LOCAL_ID,
    FLAG_OFFSET,
    LAYER_OFFSET,
    SLOTS_OFFSET,
    TOKEN_DTYPE_INT8,
    token_dtype_code,
)
from afd_dispatch.windows import WindowGroup, store_fence, wait_until


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
    sc.check_context(ctx, sc.SCHEDULE_MODE_FFN)
    windows, rank = sc.context_window(ctx, sc.SCHEDULE_MODE_FFN)
    layout = windows.layout
    expected = TOKEN_DTYPE_INT8 if layout.quant else token_dtype_code(layout.dtype)
    check_batching_args(
        layout, expert_num, max_out_shape, token_dtype, need_schedule, layer_num, expected
    )
    m = _polling_index(ctx, layout.micro_batches)
    if need_schedule:
        wait_for_micro_batch(ctx, windows, rank, m)
    else:
        check(
            sc.get(ctx, sc.REF_READY_MICRO_BATCH) == m + 1,
            "need_schedule",
            f"1, or 0 after ffn_worker_scheduler_ found micro-batch {m} ready",
            need_schedule,
        )

    info, data = windows.ffn_views(rank)
    rows = info[:, m]  # (A, 2 + BS*E)
    layer = _consistent_layer(rows, rank, m, layer_num)
    ids = rows[:, SLOTS_OFFSET:].reshape(-1)  # (s, t, e) order
    picked = (ids < EMPTY_ID_THRESHOLD).nonzero().flatten()
    keys = ids[picked]
    if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= expert_num):
        raise AFDInputError(
            f"FFN rank {rank} window, micro-batch {m} local expert ids",
            f"in [0, expert_num={expert_num}) or >= {EMPTY_ID_THRESHOLD} (empty)",
            f"min {int(keys.min())}, max {int(keys.max())}",
        )
    keys, order = torch.sort(keys, stable=True)
    picked = picked[order]
    n = picked.numel()

    tokens, slots, hidden = layout.tokens, layout.slots, layout.hidden
    capacity = layout.sessions * tokens * slots
    session = picked // (tokens * slots)
    token = picked // slots % tokens
    slot = picked % slots
    # row of (s, m, t, e) in the window's [A, M, BS, E] grid of HS-element rows
    window_rows = (session * layout.micro_batches + m) * (tokens * slots) + token * slots + slot
    data_rows = data.view(-1, layout.row_elems)
    # Rows past n stay unwritten, as on A3: zeroing them would cost more than the gather.
    y = torch.empty(capacity, hidden, dtype=layout.a2f_dtype)
    dynamic_scale = torch.zeros(capacity, dtype=torch.float32)
    if layout.quant:
        gathered = data_rows.index_select(0, window_rows)  # int8 rows: q, then the scale
        y[:n] = gathered[:, :hidden]
        dynamic_scale[:n] = (
            gathered[:, hidden : hidden + 4].contiguous().view(torch.float32).view(-1)
        )
    else:
        torch.index_select(data_rows, 0, window_rows, out=y[:n])
    experts, counts = torch.unique_consecutive(keys, return_counts=True)
    group_list = torch.zeros(expert_num, 2, dtype=torch.int64)
    group_list[: experts.numel(), 0] = experts
    group_list[: experts.numel(), 1] = counts
    outputs = [torch.zeros(capacity, dtype=torch.int32) for _ in range(4)]
    for out, values in zip(
        outputs, (session, torch.full_like(session, m), token, slot), strict=True
    ):
        out[:n] = values

    rows[:, SLOTS_OFFSET:] = EMPTY_LOCAL_ID
    store_fence()  # slots are empty again before a sender may see the free flag
    rows[:, FLAG_OFFSET] = 0
    sc.put(ctx, sc.FFN_POLLING_INDEX, (m + 1) % layout.micro_batches)
    sc.put(ctx, sc.REF_LAST_LAYER_ID, layer)
    sc.put(ctx, sc.REF_BATCHED_COUNT, sc.get(ctx, sc.REF_BATCHED_COUNT) + 1)
    sc.put(ctx, sc.REF_READY_MICRO_BATCH, 0)
    sc.put(ctx, sc.FFN_OUT_NUM, n)
    actual = torch.tensor([n], dtype=torch.int64)
    return (y, group_list, *outputs, dynamic_scale, actual)


def ffn_worker_scheduler_(
    schedule_context: torch.Tensor, *, sync_group_size: int = 1, execute_mode: int = 0
) -> torch.Tensor:
    """Wait until the micro-batch at the polling index is complete and mark it ready."""
    ctx = schedule_context
    sc.check_context(ctx, sc.SCHEDULE_MODE_FFN)
    check(
        sync_group_size == 1,
        "sync_group_size",
        "1 (the only value the reference models)",
        sync_group_size,
    )
    check(
        execute_mode == 0, "execute_mode", "0 (the only value the reference models)", execute_mode
    )
    windows, rank = sc.context_window(ctx, sc.SCHEDULE_MODE_FFN)
    m = _polling_index(ctx, windows.layout.micro_batches)
    wait_for_micro_batch(ctx, windows, rank, m)
    sc.put(ctx, sc.REF_READY_MICRO_BATCH, m + 1)
    return ctx


def wait_for_micro_batch(ctx: torch.Tensor, windows: WindowGroup, rank: int, m: int) -> None:
    info, _ = windows.ffn_views(rank)
    flags = info[:, m, FLAG_OFFSET]

    def ready() -> bool:
        # A corrupt flag would never turn 1: fail at once instead of at the deadline.
        if bool(((flags != 0) & (flags != 1)).any()):
            raise AFDInputError(
                f"FFN rank {rank} window flags (micro-batch {m})", "0 or 1", flags.tolist()
            )
        return bool((flags == 1).all())

    def describe() -> str:
        missing = (flags != 1).nonzero().flatten().tolist()
        ranks = [windows.topology.attention_rank(s) for s in missing]
        return (
            f"FFN rank {rank} of group {windows.name!r} waited for micro-batch {m}: header "
            f"flags still missing from sessions {missing} (attention ranks {ranks})"
        )

    wait_until(ready, windows.timeout_s, describe, stopped=lambda: sc.get(ctx, sc.RUN_FLAG) == 0)


def _polling_index(ctx: torch.Tensor, micro_batches: int) -> int:
    m = sc.get(ctx, sc.FFN_POLLING_INDEX)
    check(0 <= m < micro_batches, "schedule_context polling_index", f"in [0, {micro_batches})", m)
    return m


def _consistent_layer(rows: torch.Tensor, rank: int, m: int, layer_num: int) -> int:
    layers = rows[:, LAYER_OFFSET]
    layer = int(layers[0])
    check(
        bool((layers == layer).all()),
        f"FFN rank {rank} window layer ids (micro-batch {m})",
        "one layer id from every session",
        layers.tolist(),
    )
    if layer_num > 0:
        check(
            0 <= layer < layer_num,
            f"FFN rank {rank} window layer id",
            f"in [0, layer_num={layer_num})",
            layer,
        )
    return layer
