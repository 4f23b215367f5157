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
    d = data[m]  # (BS, E, H)
    acc = torch.zeros(layout.tokens, layout.hidden, dtype=torch.float32)
    for k in range(topk):
        acc = acc + d[:, k].to(torch.float32) * expert_scales[:, k : k + 1]
    for j in range(topk, layout.slots):
        acc = acc + d[:, j].to(torch.float32)
    y = acc.to(layout.dtype)
    info[m] = 0
    sc.put(ctx, sc.ATTN_MICRO_BATCH_ID, m)
    sc.put(ctx, sc.REF_READY_MICRO_BATCH, 0)
    return y, layer_id + 1


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
