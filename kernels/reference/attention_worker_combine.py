"""`npu_attention_worker_combine` and `attention_worker_scheduler_` on the CPU.

The weighted sum follows the kernel's float32 order exactly: acc = 0; acc += d_k * w_k for
k < K, one multiply and one add each (never fused); then each shared slot added unweighted;
one rounding to the output dtype at the end. A3 supports exactly one shared expert; the
reference adds S >= 0 of them in slot order.
"""

from __future__ import annotations

import torch

from afd_dispatch.contract import check_combine_args
from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.layout import token_dtype_code
from afd_dispatch.windows import WindowGroup, wait_until


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
    sc.check_context(ctx, sc.SCHEDULE_MODE_ATTENTION)
    windows, rank = sc.context_window(ctx, sc.SCHEDULE_MODE_ATTENTION)
    layout = windows.layout
    topk = check_combine_args(
        layout, expert_scales, layer_id, hidden_size, token_dtype, need_schedule,
        token_dtype_code(layout.dtype),
    )  # fmt: skip
    m = _next_micro_batch(ctx, layout.micro_batches)
    if need_schedule:
        wait_for_results(ctx, windows, rank, m)
    else:
        check(
            sc.get(ctx, sc.REF_READY_MICRO_BATCH) == m + 1,
            "need_schedule",
            f"1, or 0 after attention_worker_scheduler_ found micro-batch {m} ready",
            need_schedule,
        )
    info, data = windows.attn_views(rank)
    y = weighted_sum(data[m], expert_scales, topk, layout.dtype)
    info[m] = 0
    sc.put(ctx, sc.ATTN_MICRO_BATCH_ID, m)
    sc.put(ctx, sc.REF_READY_MICRO_BATCH, 0)
    return y, layer_id + 1


COMBINE_BLOCK_TOKENS = 32  # a block's float32 accumulator (32 x H) stays in cache


def weighted_sum(
    d: torch.Tensor, scales: torch.Tensor, topk: int, dtype: torch.dtype
) -> torch.Tensor:
    """y[t] = round(sum_k float32(d[t, k]) * w[t, k] + sum_shared float32(d[t, j])).

    One multiply and one add per slot, in slot order, never fused; done per block of
    tokens so the float32 temporaries stay in cache and memory sees one read of `d`.
    """
    tokens, slots, hidden = d.shape
    y = torch.empty(tokens, hidden, dtype=dtype)
    acc = torch.empty(COMBINE_BLOCK_TOKENS, hidden, dtype=torch.float32)
    term = torch.empty_like(acc)
    for lo in range(0, tokens, COMBINE_BLOCK_TOKENS):
        hi = min(tokens, lo + COMBINE_BLOCK_TOKENS)
        a, t = acc[: hi - lo], term[: hi - lo]
        a.zero_()
        for k in range(slots):
            t.copy_(d[lo:hi, k])
            if k < topk:
                t.mul_(scales[lo:hi, k : k + 1])
            a.add_(t)
        y[lo:hi].copy_(a)
    return y


def attention_worker_scheduler_(schedule_context: torch.Tensor) -> torch.Tensor:
    """Wait until every result of the next micro-batch has arrived and mark it ready."""
    ctx = schedule_context
    sc.check_context(ctx, sc.SCHEDULE_MODE_ATTENTION)
    windows, rank = sc.context_window(ctx, sc.SCHEDULE_MODE_ATTENTION)
    m = _next_micro_batch(ctx, windows.layout.micro_batches)
    wait_for_results(ctx, windows, rank, m)
    sc.put(ctx, sc.REF_READY_MICRO_BATCH, m + 1)
    return ctx


def wait_for_results(ctx: torch.Tensor, windows: WindowGroup, rank: int, m: int) -> None:
    info, _ = windows.attn_views(rank)
    flags = info[m]

    def describe() -> str:
        missing = (flags != 1).nonzero().tolist()
        shown = ", ".join(f"(token {t}, slot {e})" for t, e in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        return (
            f"attention rank {rank} (session {windows.topology.session_of(rank)}) of group "
            f"{windows.name!r} waited for the results of micro-batch {m}: {len(missing)} of "
            f"{flags.numel()} slot flags missing: {shown}{more}"
        )

    def ready() -> bool:
        # A corrupt flag would never turn 1: fail at once instead of at the deadline.
        if bool(((flags != 0) & (flags != 1)).any()):
            raise AFDInputError(
                f"attention rank {rank} window flags (micro-batch {m})",
                "0 or 1",
                sorted(set(flags.flatten().tolist())),
            )
        return bool((flags == 1).all())

    wait_until(
        ready,
        windows.timeout_s,
        describe,
        stopped=lambda: sc.get(ctx, sc.RUN_FLAG) == 0,
    )


def _next_micro_batch(ctx: torch.Tensor, micro_batches: int) -> int:
    last = sc.get(ctx, sc.ATTN_MICRO_BATCH_ID)
    check(
        0 <= last < micro_batches,
        "schedule_context micro_batch_id",
        f"in [0, {micro_batches})",
        last,
    )
    return (last + 1) % micro_batches
