"""`npu_attention_to_ffn` on the CPU: route, (quantize,) write rows, ids, then headers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from afd_dispatch.contract import AttentionToFfnCall, check_attention_to_ffn
from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.kernels.reference.rows import move_rows, native, native_available, quantize_into
from afd_dispatch.layout import FLAG_OFFSET, LAYER_OFFSET, SLOTS_OFFSET, WindowLayout
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import WindowGroup, get_window_group, store_fence, wait_until
from afd_dispatch.windows.doorbell import Doorbell


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
    if call.sync_flag == 0 and scales is None and native_available():
        _send_native(x, expert_ids, expert_rank_table, windows, call)
        return
    global_ids = slot_experts(expert_ids[0, :n], call)
    source, per_slot = _source_rows(tokens, layout, scales, global_ids)
    table = expert_rank_table[0].to(torch.int64)
    count = table[global_ids, 0]
    if bool((count < 1).any()):  # a table changed behind its checked version
        g = int(global_ids[count < 1][0])
        raise AFDInputError(f"expert_rank_table row {g}", "a replica count >= 1", table[g].tolist())
    replica = s % count
    dest = table[global_ids, 1 + 2 * replica]
    local = table[global_ids, 2 + 2 * replica].to(torch.int32)

    receivers = [int(r) for r in torch.unique(dest)]
    headers = list(call.topology.ffn_ranks) if call.sync_flag == 0 else receivers
    views = {r: windows.ffn_views(r) for r in headers}
    all_info = _slot_views(windows, call).info
    _wait_until_consumed(windows, {r: all_info[r] for r in headers}, call)

    width, row_elems = layout.slots, layout.row_elems
    flat_dest = dest.reshape(-1)  # position p = t * E + e, also the row within (s, m)
    flat_local = local.reshape(-1)
    for r in receivers:
        info, data = views[r]
        positions = (flat_dest == r).nonzero().flatten()
        rows = data[s, m].view(layout.tokens * width, row_elems)
        if not layout.quant:  # x's H values start each slot; the rest of it stays untouched
            rows = rows[:, : layout.hidden]
        source_index = positions if per_slot else positions // width
        move_rows(rows, positions, source, source_index, positions.numel())
        info[s, m, SLOTS_OFFSET:].index_copy_(0, positions, flat_local[positions])
    _publish(windows, call, headers)


def _publish(windows: WindowGroup, call: AttentionToFfnCall, headers: Sequence[int]) -> None:
    """Write the layer id and flag the message on every header rank (its rows and ids are
    written), ring them, and pre-set this rank's result flags of the masked tokens, which
    get no results."""
    slot = _slot_views(windows, call)
    m = call.micro_batch
    for r in headers:
        slot.info[r][m, LAYER_OFFSET] = call.layer
    store_fence()  # rows, ids and layer before the flag that publishes them
    for r in headers:
        slot.info[r][m, FLAG_OFFSET] = 1
    store_fence()  # the flags before the rings that announce them
    for r in headers:
        bell = slot.bells[r]
        if bell is not None:
            bell.ring()
    slot.own_info[m, call.active_tokens :] = 1


@dataclass(frozen=True)
class _SlotViews:
    """What A2F touches for one (session, micro-batch), resolved once per window group:
    numpy views (the window's own memory) of each FFN rank's info rows of the session and of
    this rank's result flags, each FFN rank's doorbell, and the addresses the C loop takes."""

    info: dict[int, np.ndarray]  # FFN rank -> int32 [M, 2 + BS*E] of this session
    bells: dict[int, Doorbell | None]
    own_info: np.ndarray  # int32 [M, BS*E]: this attention rank's result flags
    data_rows: torch.Tensor  # int64 [F]: address of each FFN rank's (s, m) slot rows
    info_rows: torch.Tensor  # int64 [F]: address of each FFN rank's (s, m) info row
    touched: torch.Tensor  # uint8 [F], the C loop's scratch: which ranks got a row


def _slot_views(windows: WindowGroup, call: AttentionToFfnCall) -> _SlotViews:
    s, m = call.session, call.micro_batch
    key = ("a2f_slot", s, m)
    slot = windows.memo.get(key)
    if slot is None:
        ranks = list(call.topology.ffn_ranks)
        views = [windows.ffn_views(r) for r in ranks]
        own_info, _ = windows.attn_views(call.topology.attention_rank(s))
        slot = windows.memo[key] = _SlotViews(
            info={r: v[0][s].numpy() for r, v in zip(ranks, views, strict=True)},
            bells={r: windows.doorbell(r) for r in ranks},
            own_info=own_info.numpy(),
            data_rows=torch.tensor([v[1][s, m].data_ptr() for v in views], dtype=torch.int64),
            info_rows=torch.tensor([v[0][s, m].data_ptr() for v in views], dtype=torch.int64),
            touched=torch.zeros(len(ranks), dtype=torch.uint8),
        )
    return slot


def _send_native(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_rank_table: torch.Tensor,
    windows: WindowGroup,
    call: AttentionToFfnCall,
) -> None:
    """The same writes as the torch code above, the per-slot work in one C loop
    (`_native.a2f_scatter`): with sync_flag 0 (a header to every FFN rank, so every FFN
    rank is waited for up front) and rows per token (no per-expert smooth scales)."""
    layout, topology = call.layout, call.topology
    s, n = call.session, call.active_tokens
    slot = _slot_views(windows, call)
    headers = list(slot.info)
    tokens = x[0, :n]
    if layout.quant:
        source, _ = _source_rows(tokens, layout, None, None)
    else:
        source = tokens.contiguous()
    _wait_until_consumed(windows, slot.info, call)
    ids = expert_ids[0, :n].contiguous()
    table = expert_rank_table[0].to(torch.int64).contiguous()  # read per call: untrusted
    touched = slot.touched
    row_bytes = source.shape[1] * source.element_size()
    bad = native(
        "a2f_scatter",
        source.data_ptr(), row_bytes, 0, n, layout.topk, layout.slots, ids.data_ptr(),
        ids.element_size(), call.moe_expert_num, table.data_ptr(), table.shape[0],
        table.shape[1], s, topology.ffn_start_rank_id, len(headers), slot.data_rows.data_ptr(),
        slot.info_rows.data_ptr(), layout.attn_to_ffn_token_size, row_bytes, touched.data_ptr(),
    )  # fmt: skip
    if bad >= 0:
        t, e = divmod(bad, layout.slots)
        g = int(ids[t, e]) if e < layout.topk else call.moe_expert_num + e - layout.topk
        raise AFDInputError(
            f"expert_rank_table row {g} (slot {e} of token {t})",
            f"a replica count in [1, {(table.shape[1] - 1) // 2}] and FFN ranks in "
            f"[{topology.ffn_start_rank_id}, {topology.ffn_start_rank_id + len(headers)})",
            table[g].tolist(),
        )
    _publish(windows, call, headers)


def _source_rows(
    tokens: torch.Tensor,
    layout: WindowLayout,
    scales: torch.Tensor | None,
    global_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, bool]:
    """The window rows to send: (rows, one row per slot?).

    Without quant, each token's row is x itself. With quant, a row is H int8 values, the
    float32 scale at byte H and zeros to HS (bytes the hardware leaves unspecified); one
    row per token, or one per slot when smooth scales differ by expert.
    """
    if not layout.quant:
        return tokens, False
    per_slot = scales is not None
    rows = tokens.contiguous()
    if scales is not None:
        assert global_ids is not None, "per-expert scales need each slot's expert"
        xf = tokens.to(torch.float32).unsqueeze(1) * scales[0, global_ids]
        rows = xf.reshape(-1, layout.hidden)
    packed = torch.empty(rows.shape[0], layout.row_elems, dtype=torch.int8)
    check(quantize_into(rows, packed), "x", "finite values when quantizing", "inf/nan")
    return packed, per_slot


def slot_experts(ids: torch.Tensor, call: AttentionToFfnCall) -> torch.Tensor:
    """(n, E) global expert row of every slot: K routed ids, then the S shared rows."""
    n = ids.shape[0]
    first_shared = call.moe_expert_num
    shared = torch.arange(first_shared, first_shared + call.layout.shared).expand(n, -1)
    return torch.cat([ids.to(torch.int64), shared], dim=1)


# The argument each topology / layout field comes from, to name it when a call disagrees.
_TOPOLOGY_ARGUMENTS = {
    "num_attention_ranks": "ffn_token_info_table_shape[0] (A)",
    "world_size": "world_size",
    "ffn_start_rank_id": "ffn_start_rank_id",
}
_LAYOUT_ARGUMENTS = {
    "num_attention_ranks": "ffn_token_info_table_shape[0] (A)",
    "micro_batches": "attn_token_info_table_shape[0] (M)",
    "tokens": "x.shape[1] (BS)",
    "topk": "expert_ids.shape[2] (K)",
    "shared": "expert_rank_table.shape[1] (moe_expert_num + S)",
    "hidden": "x.shape[2] (H)",
    "dtype": "x.dtype",
    "quant": "quant_mode",
    "row_elems": "ffn_token_data_shape[4] (HS)",  # after dtype and quant: same element type
}


def check_group_matches(windows: WindowGroup, topology: RankTopology, layout: WindowLayout) -> None:
    """The op's arguments must describe the windows the group was created with (checked
    once per topology and layout object: the contract check hands out the same ones for
    the same call structure)."""
    seen = windows.memo.get("matches")
    if seen is not None and seen[0] is topology and seen[1] is layout:
        return
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
    windows.memo["matches"] = (topology, layout)


def _wait_until_consumed(
    windows: WindowGroup, info: dict[int, np.ndarray], call: AttentionToFfnCall
) -> None:
    """Back-pressure: every destination must have consumed our previous (s, m) message.

    `info`: each destination's info rows of this session (`_SlotViews.info`). All
    destinations are waited for before the first byte is written, so a timeout leaves no
    half-written message behind.
    """
    s, m = call.session, call.micro_batch

    def busy() -> list[int]:
        return [r for r, rows in info.items() if rows[m, FLAG_OFFSET] != 0]

    if not busy():
        store_fence()  # as `wait_until` does
        return  # the usual case: nothing to wait for, no wait to set up

    def describe() -> str:
        return (
            f"attention rank {call.topology.attention_rank(s)} (session {s}) of group "
            f"{windows.name!r} waited to send micro-batch {m} (layer {call.layer}): FFN ranks "
            f"{busy()} still hold its previous message (flag 1, not yet consumed)"
        )

    wait_until(lambda: not busy(), windows.timeout_s, describe)
