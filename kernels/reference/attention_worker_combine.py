"""`npu_attention_worker_combine` and `attention_worker_scheduler_` on the CPU.

As on A3, combine reads its window through the context (the attention area's info and data
addresses, M and the micro-batch id), BS and K from `expert_scales` and H from
`hidden_size` (ops-transformer `attention_worker_combine`). Result rows sit H values apart
in `[M, BS, E, H]`. With `need_schedule=1` it consumes micro-batch (id + 1) % M: waits for
its flags, zeroes them after reading and stores the id; with `need_schedule=0` it reads
micro-batch `id` as it is (after `attention_worker_scheduler_`, which did the waiting) and
changes nothing.

The weighted sum follows the kernel's float32 order exactly: acc = 0; acc += d_k * w_k for
k < K, one multiply and one add each (never fused); then each shared slot added unweighted;
one rounding to the output dtype at the end. A3 has exactly one shared slot (E = K + 1,
which is what a context without `selected_expert_num` gets); the reference adds the
E - K >= 0 of a context that sets it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from afd_dispatch.contract import check_combine_call
from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.kernels.reference.rows import weighted_sum
from afd_dispatch.layout import WindowLayout, dtype_of_code, token_dtype_code
from afd_dispatch.windows import ScheduleStopped, store_fence, wait_until
from afd_dispatch.windows.doorbell import Doorbell


@dataclass(frozen=True)
class Flags:
    """The result flags of an attention window, int32 [M, BS, E], and whom to name."""

    cells: torch.Tensor
    timeout_s: float
    who: str
    doorbell: Doorbell | None = None  # of the window the flags are in, if a group's

    @functools.cached_property
    def words(self) -> np.ndarray:
        """`cells` as numpy (the same memory): reads and stores without a torch call each."""
        return self.cells.numpy()


def window_name(buffer: sc.Buffer, ctx: torch.Tensor, field: tuple[int, int]) -> str:
    if buffer.window is None:
        return f"the attention context's window at {sc.get(ctx, field):#x}"
    group, rank = buffer.window
    return (
        f"attention rank {rank} (session {group.topology.session_of(rank)}) of group {group.name!r}"
    )


def result_flags(ctx: torch.Tensor, micro_batches: int, tokens: int, slots: int) -> Flags:
    cells = micro_batches * tokens * slots
    info = sc.sized_buffer(ctx, sc.ATTN_INFO_BUF, sc.ATTN_INFO_BUF_SIZE, 4 * cells)
    if info.window is not None:
        sc.check_window_offset(info, sc.ATTN_INFO_BUF, 0)
    view = info.data.view(torch.int32).view(micro_batches, tokens, slots)
    bell = None if info.window is None else info.window[0].doorbell(info.window[1])
    return Flags(view, info.timeout_s, window_name(info, ctx, sc.ATTN_INFO_BUF), bell)


def combine_slots(ctx: torch.Tensor, tokens: int, topk: int) -> int:
    """E of a combine call: the context's selected_expert_num, or A3's K + 1 when unset."""
    slots = sc.get(ctx, sc.SELECTED_EXPERT_NUM) or topk + 1
    check(
        topk <= slots <= 2**20,
        "expert_scales.shape[1] (K)",
        f"<= the context's selected_expert_num = {slots} (routed slots come first)",
        topk,
    )
    context_tokens = sc.get(ctx, sc.MICRO_BATCH_SIZE)
    check(
        context_tokens in (0, tokens),
        "expert_scales.shape",
        f"(BS={context_tokens}, K): the context's micro_batch_size",
        (tokens, topk),
    )
    return slots


def result_rows(
    ctx: torch.Tensor, shape: tuple[int, int, int, int], topk: int, dtype: torch.dtype
) -> torch.Tensor:
    """The attention window's result rows [M, BS, E, H], H values apart (the kernel's stride)."""
    m, tokens, slots, hidden = shape
    data = sc.sized_buffer(
        ctx,
        sc.ATTN_DATA_BUF,
        sc.ATTN_DATA_BUF_SIZE,
        m * tokens * slots * hidden * dtype.itemsize,
        align=dtype.itemsize,
    )
    if data.window is not None:
        layout = data.window[0].layout
        _check_window(layout, topk, hidden, dtype)
        for field, seen, want in (
            (sc.MICRO_BATCH_NUM, m, layout.micro_batches),
            (sc.MICRO_BATCH_SIZE, tokens, layout.tokens),
            (sc.SELECTED_EXPERT_NUM, slots, layout.slots),
        ):
            check(seen == want, sc.field_name(field), f"{want}, as in the window's group", seen)
        sc.check_window_offset(data, sc.ATTN_DATA_BUF, layout.attn_data_offset)
    return data.data.view(dtype).view(shape)


def _check_window(layout: WindowLayout, topk: int, hidden: int, dtype: torch.dtype) -> None:
    """A reference window's group knows K, H and the result dtype: the call must agree."""
    check(
        topk == layout.topk,
        "expert_scales.shape[1] (K)",
        f"K = {layout.topk} of this window group (E = {layout.slots} slots)",
        topk,
    )
    check(
        hidden == layout.hidden, "hidden_size", f"H = {layout.hidden} of this window group", hidden
    )
    code = token_dtype_code(layout.dtype)
    check(
        dtype == layout.dtype,
        "token_dtype",
        f"{code} for this window group ({layout.dtype})",
        token_dtype_code(dtype),
    )


def attention_worker_combine(
    schedule_context: torch.Tensor,
    expert_scales: torch.Tensor,
    layer_id: torch.Tensor,
    hidden_size: int,
    *,
    token_dtype: int = 0,
    need_schedule: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = schedule_context
    sc.check_context_storage(ctx)
    tokens, topk = check_combine_call(
        expert_scales, layer_id, hidden_size, token_dtype, need_schedule
    )
    dtype = dtype_of_code(token_dtype)
    micro_batches, rows, flags = _resolved_area(
        ctx, tokens, topk, hidden_size, dtype, bool(need_schedule)
    )
    last = sc.index_field(ctx, sc.ATTN_MICRO_BATCH_ID, micro_batches)
    if flags is not None:
        m = (last + 1) % micro_batches
        wait_for_results(ctx, flags, m)
    else:  # the kernel reads no flags then (ops-transformer attention_worker_combine)
        m = last
    y = weighted_sum(rows[m], expert_scales, topk, dtype)
    if flags is not None:
        flags.words[m] = 0
        sc.put(ctx, sc.ATTN_MICRO_BATCH_ID, m)
    return y, layer_id + 1


def wait_for_next_results(
    schedule_context: torch.Tensor, expert_scales: torch.Tensor, hidden_size: int, token_dtype: int
) -> int:
    """Wait as `attention_worker_combine(..., need_schedule=1)` with these arguments would,
    until every result of the micro-batch it combines next has arrived, and return that
    micro-batch's index; nothing is changed. A caller that must act between the results'
    arrival and combine clearing their flags (the reference link's receipts) calls this
    first; combine then finds the flags set."""
    ctx = schedule_context
    tokens, topk = expert_scales.shape
    micro_batches, _, flags = _resolved_area(
        ctx, tokens, topk, hidden_size, dtype_of_code(token_dtype), True
    )
    assert flags is not None
    m = (sc.index_field(ctx, sc.ATTN_MICRO_BATCH_ID, micro_batches) + 1) % micro_batches
    wait_for_results(ctx, flags, m)
    return m


def _resolved_area(
    ctx: torch.Tensor, tokens: int, topk: int, hidden: int, dtype: torch.dtype, with_flags: bool
) -> tuple[int, torch.Tensor, Flags | None]:
    """`_combine_area`, kept while the context's counts and addresses stay the same."""
    return sc.resolved(
        ctx,
        (sc.COUNTS_BYTES, sc.ATTN_ADDRESS_BYTES),
        ("combine", tokens, topk, hidden, dtype, with_flags),
        lambda: _combine_area(ctx, tokens, topk, hidden, dtype, with_flags),
    )


def _combine_area(
    ctx: torch.Tensor, tokens: int, topk: int, hidden: int, dtype: torch.dtype, with_flags: bool
) -> tuple[int, torch.Tensor, Flags | None]:
    """(M, result rows [M, BS, E, H], result flags if `with_flags`) of an attention context."""
    slots = combine_slots(ctx, tokens, topk)
    micro_batches = sc.count_field(ctx, sc.MICRO_BATCH_NUM)
    rows = result_rows(ctx, (micro_batches, tokens, slots, hidden), topk, dtype)
    flags = result_flags(ctx, micro_batches, tokens, slots) if with_flags else None
    return micro_batches, rows, flags


def attention_worker_scheduler_(schedule_context: torch.Tensor) -> torch.Tensor:
    """Wait until every result of micro-batch (id + 1) % M arrived, zero its flags and make
    it the context's micro-batch id, for `need_schedule=0` combine (ops-transformer
    `attention_worker_scheduler_aicpu.cpp`). A stopped context returns unchanged."""
    ctx = schedule_context
    sc.check_context(ctx, sc.SCHEDULE_MODE_ATTENTION)
    tokens = sc.count_field(ctx, sc.MICRO_BATCH_SIZE)
    slots = sc.count_field(ctx, sc.SELECTED_EXPERT_NUM)
    micro_batches = sc.count_field(ctx, sc.MICRO_BATCH_NUM)
    flags = result_flags(ctx, micro_batches, tokens, slots)
    m = (sc.index_field(ctx, sc.ATTN_MICRO_BATCH_ID, micro_batches) + 1) % micro_batches
    if sc.get(ctx, sc.RUN_FLAG) == 0:
        return ctx  # the kernel polls only while its run flag is set
    try:
        wait_for_results(ctx, flags, m)
    except ScheduleStopped:
        return ctx  # the kernel returns quietly when its run flag is cleared
    flags.cells[m] = 0
    sc.put(ctx, sc.ATTN_MICRO_BATCH_ID, m)
    return ctx


def attention_worker_scheduler(schedule_context: torch.Tensor) -> torch.Tensor:
    """`attention_worker_scheduler_` on a copy of the context, which it returns; the flags it
    zeroes are the window's, as with the in-place op."""
    sc.check_context_storage(schedule_context)
    return attention_worker_scheduler_(schedule_context.clone())


def wait_for_results(ctx: torch.Tensor, flags: Flags, m: int) -> None:
    cells, words = flags.cells[m], flags.words[m]
    if (words == 1).all():
        store_fence()  # as `wait_until` does: the results are read only after the flags
        return  # already here (always, after the link's own wait): nothing to set up

    def describe() -> str:
        missing = (cells != 1).nonzero().tolist()
        shown = ", ".join(f"(token {t}, slot {e})" for t, e in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        return (
            f"{flags.who} waited for the results of micro-batch {m}: {len(missing)} of "
            f"{cells.numel()} slot flags missing: {shown}{more}"
        )

    def ready() -> bool:
        if (words == 1).all():
            return True
        # A corrupt flag would never turn 1: fail at once instead of at the deadline.
        if ((words != 0) & (words != 1)).any():
            raise AFDInputError(
                f"{flags.who}: window flags of micro-batch {m}",
                "0 or 1",
                sorted(set(cells.flatten().tolist())),
            )
        return False

    stopped = lambda: sc.get(ctx, sc.RUN_FLAG) == 0  # noqa: E731
    wait_until(ready, flags.timeout_s, describe, stopped, flags.doorbell)
