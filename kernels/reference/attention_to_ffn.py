"""`npu_attention_to_ffn` on the CPU: route, (quantize,) write rows, ids, then headers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from afd_dispatch.contract import AttentionToFfnCall, check_attention_to_ffn
from afd_dispatch.errors import check
from afd_dispatch.kernels.reference.quant import quantize_rows
from afd_dispatch.layout import FLAG_OFFSET, LAYER_OFFSET, SLOTS_OFFSET, WindowLayout
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import WindowGroup, get_window_group, store_fence, wait_until


def attention_to_ffn(
    x: torch.Tensor,
    session_id: torch.Tensor,
    micro_batch_id: torch.Tensor,
    layer_id: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_rank_table: torch.Tensor,
    group: str,
    world_size: int,
    ffn_token_info_table_shape: Sequence[int],
    ffn_token_data_shape: Sequence[int],
    attn_token_info_table_shape: Sequence[int],
    moe_expert_num: int,
    *,
    scales: torch.Tensor | None = None,
    active_mask: torch.Tensor | None = None,
    quant_mode: int = 0,
    sync_flag: int = 0,
    ffn_start_rank_id: int = 0,
) -> None:
    call = check_attention_to_ffn(
        x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, world_size,
        ffn_token_info_table_shape, ffn_token_data_shape, attn_token_info_table_shape,
        moe_expert_num, scales, active_mask, quant_mode, sync_flag, ffn_start_rank_id,
    )  # fmt: skip
    windows = get_window_group(group)
    check_group_matches(windows, call.topology, call.layout)
    n, s, m = call.active_tokens, call.session, call.micro_batch
    layout = call.layout
    tokens = x[0, :n]
    if layout.quant and n:
        check(bool(torch.isfinite(tokens).all()), "x", "finite values when quantizing", "inf/nan")

    global_ids = slot_experts(expert_ids[0, :n], call)
    table = expert_rank_table[0].to(torch.int64)
    count = table[global_ids, 0]
    replica = s % count
    dest = table[global_ids, 1 + 2 * replica]
    local = table[global_ids, 2 + 2 * replica].to(torch.int32)

    receivers = [int(r) for r in torch.unique(dest)]
    headers = list(call.topology.ffn_ranks) if call.sync_flag == 0 else receivers
    views = {r: windows.ffn_views(r) for r in headers}
    _wait_until_consumed(windows, views, call)

    if layout.quant:
        xf = tokens.to(torch.float32).unsqueeze(1)  # (n, 1, H): one row per token...
        if scales is not None:  # ...or one per slot when smooth scales differ by expert
            xf = xf * scales[0, global_ids]
        q, scale = quantize_rows(xf)
    width = layout.slots
    for r in receivers:
        info, data = views[r]
        t, e = (dest == r).nonzero(as_tuple=True)
        if layout.quant:
            qe = e if q.shape[1] > 1 else torch.zeros_like(e)
            rows = data[s, m]  # (BS, E, HS) int8
            rows[t, e, : layout.hidden] = q[t, qe]
            rows[t, e, layout.hidden : layout.hidden + 4] = (
                scale[t, qe].view(torch.int8).view(-1, 4)
            )
        else:
            data[s, m, t, e] = tokens[t]
        info[s, m, SLOTS_OFFSET + t * width + e] = local[t, e]
    for r in headers:
        views[r][0][s, m, LAYER_OFFSET] = call.layer
    store_fence()  # rows, ids and layer before the flag that publishes them
    for r in headers:
        views[r][0][s, m, FLAG_OFFSET] = 1

    # Masked tokens get no results; pre-set their flags so combine does not wait for them.
    own_info, _ = windows.attn_views(call.topology.attention_rank(s))
    own_info[m, n:] = 1


def slot_experts(ids: torch.Tensor, call: AttentionToFfnCall) -> torch.Tensor:
    """(n, E) global expert row of every slot: K routed ids, then the S shared rows."""
    n = ids.shape[0]
    first_shared = call.moe_expert_num
    shared = torch.arange(first_shared, first_shared + call.layout.shared).expand(n, -1)
    return torch.cat([ids.to(torch.int64), shared], dim=1)


# The argument each topology / layout field comes from, to name it when a call disagrees.
_TOPOLOGY_ARGUMENTS = {
    "num_attention": "ffn_token_info_table_shape[0] (A)",
    "world_size": "world_size",
    "ffn_start_rank_id": "ffn_start_rank_id",
}
_LAYOUT_ARGUMENTS = {
    "sessions": "ffn_token_info_table_shape[0] (A)",
    "micro_batches": "attn_token_info_table_shape[0] (M)",
    "tokens": "x.shape[1] (BS)",
    "topk": "expert_ids.shape[2] (K)",
    "shared": "expert_rank_table.shape[1] (moe_expert_num + S)",
    "hidden": "x.shape[2] (H)",
    "dtype": "x.dtype",
    "quant": "quant_mode",
}


def check_group_matches(windows: WindowGroup, topology: RankTopology, layout: WindowLayout) -> None:
    """The op's arguments must describe the windows the group was created with."""
    for fields, want, seen in (
        (_TOPOLOGY_ARGUMENTS, windows.topology, topology),
        (_LAYOUT_ARGUMENTS, windows.layout, layout),
    ):
        for name, argument in fields.items():
            expected, value = getattr(want, name), getattr(seen, name)
            check(
                value == expected,
                argument,
                f"{expected!r}, as in group {windows.name!r} ({name})",
                value,
            )


def _wait_until_consumed(
    windows: WindowGroup,
    views: dict[int, tuple[torch.Tensor, torch.Tensor]],
    call: AttentionToFfnCall,
) -> None:
    """Back-pressure: every destination must have consumed our previous (s, m) message.

    All destinations are waited for before the first byte is written, so a timeout leaves
    no half-written message behind.
    """
    s, m = call.session, call.micro_batch

    def busy() -> list[int]:
        return [r for r, (info, _) in views.items() if int(info[s, m, FLAG_OFFSET]) != 0]

    def describe() -> str:
        return (
            f"attention rank {call.topology.attention_rank(s)} (session {s}) of group "
            f"{windows.name!r} waited to send micro-batch {m} (layer {call.layer}): FFN ranks "
            f"{busy()} still hold its previous message (flag 1, not yet consumed)"
        )

    wait_until(lambda: not busy(), windows.timeout_s, describe)
