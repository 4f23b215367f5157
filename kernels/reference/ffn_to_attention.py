"""`npu_ffn_to_attention` on the CPU: each result row goes home, then its flag."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from afd_dispatch.contract import check_ffn_to_attention
from afd_dispatch.errors import check
from afd_dispatch.kernels.reference.rows import move_rows, native, native_available
from afd_dispatch.windows import WindowGroup, get_window_group, store_fence


def ffn_to_attention(
    x: torch.Tensor,
    session_ids: torch.Tensor,
    micro_batch_ids: torch.Tensor,
    token_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    actual_token_num: torch.Tensor,
    group: str,
    world_size: int,
    token_info_table_shape: Sequence[int],
    token_data_shape: Sequence[int],
    *,
    attn_rank_table: torch.Tensor | None = None,
) -> None:
    # The C path checks every id itself (and hands a bad one back to the torch code, which
    # names it after the full check), so it needs only the structure and the row count.
    native = native_available()
    call = check_ffn_to_attention(
        x, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num,
        world_size, token_info_table_shape, token_data_shape, attn_rank_table, values=not native,
    )  # fmt: skip
    windows = get_window_group(group)
    topology, layout = windows.topology, windows.layout
    check(
        world_size == topology.world_size,
        "world_size",
        f"{topology.world_size} (group {group!r})",
        world_size,
    )
    expected = [layout.micro_batches, layout.tokens, layout.slots]
    check(
        [call.micro_batches, call.tokens, call.slots] == expected,
        "token_info_table_shape",
        f"{expected} (group {group!r})",
        list(token_info_table_shape),
    )
    check(
        call.hidden == layout.hidden,
        "x.shape[1] (H)",
        f"{layout.hidden} (group {group!r})",
        call.hidden,
    )
    check(x.dtype == layout.dtype, "x.dtype", f"{layout.dtype} (group {group!r})", x.dtype)
    if native:
        n = int(actual_token_num[0])
        ids = (session_ids, micro_batch_ids, token_ids, expert_offsets)
        if 0 <= n <= call.rows and _send_native(x, ids, n, attn_rank_table, windows):
            return
        call = check_ffn_to_attention(
            x, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num,
            world_size, token_info_table_shape, token_data_shape, attn_rank_table,
        )  # fmt: skip
    n = call.rows
    session_of_row = session_ids[:n].to(torch.int64)
    dest = (
        session_of_row
        if attn_rank_table is None
        else attn_rank_table.to(torch.int64)[session_of_row]
    )
    receivers = [int(r) for r in torch.unique(dest)]
    for r in receivers:
        check(
            not topology.is_ffn(r),
            "destination rank",
            f"an attention rank of group {group!r}, one of {list(topology.attention_ranks)}",
            r,
        )
    mb, tok, off = (t[:n].to(torch.int64) for t in (micro_batch_ids, token_ids, expert_offsets))
    positions = (mb * layout.tokens + tok) * layout.slots + off  # row in the [M, BS, E] grid
    written = []
    for r in receivers:
        rows = (dest == r).nonzero().flatten()
        info, data = windows.attn_views(r)
        where = positions[rows]
        move_rows(data.view(-1, layout.hidden), where, x, rows, rows.numel())
        written.append((info.view(-1), where))
    store_fence()  # result rows before the flags that announce them
    for flags, where in written:
        flags[where] = 1
    store_fence()  # the flags before the rings
    for r in receivers:
        windows.ring(r)


def _send_native(
    x: torch.Tensor,
    ids: tuple[torch.Tensor, ...],
    n: int,
    attn_rank_table: torch.Tensor | None,
    windows: WindowGroup,
) -> bool:
    """The writes above in one C loop (`_native.f2a_scatter`), then the rings; False, with
    nothing written, where it does not apply (ids not int32, rows not contiguous, an id or
    a destination out of range: the torch code then names it)."""
    if x.dtype != windows.layout.dtype or not x.is_contiguous():
        return False
    if any(t.dtype != torch.int32 or not t.is_contiguous() for t in ids):
        return False
    topology, layout = windows.topology, windows.layout
    targets = _session_targets(windows, attn_rank_table)
    if targets is None:
        return False
    index, data_rows, info_rows, _views = targets  # the views keep the windows mapped
    touched = np.zeros(data_rows.numel(), dtype=np.uint8)  # numpy: no torch call per flag
    bad = native(
        "f2a_scatter",
        x.data_ptr(), layout.hidden * x.element_size(), n, *(t.data_ptr() for t in ids),
        index.data_ptr(), index.numel(), data_rows.data_ptr(), info_rows.data_ptr(),
        layout.micro_batches, layout.tokens, layout.slots, touched.ctypes.data,
    )  # fmt: skip
    if bad >= 0:
        return False
    ranks = topology.attention_ranks
    for i in touched.nonzero()[0].tolist():
        windows.ring(ranks[i])
    return True


_KEPT_TABLES = 8  # attention-rank tables whose targets a group keeps


def _session_targets(
    windows: WindowGroup, attn_rank_table: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object] | None:
    """(attention-rank index per session, -1 where the session's rank is not an attention
    rank of the group; int64 addresses of each attention rank's result rows and flags; the
    views those addresses are in), or None for a table with a rank outside the world (the
    op's check refuses it). Kept for the last few tables of the group."""
    table = None if attn_rank_table is None else tuple(attn_rank_table.tolist())
    key = ("f2a_targets", table)
    if key not in windows.memo:
        ranks = windows.topology.attention_ranks
        # without a table, session ids are the ranks themselves (the op's default)
        by_session = table if table is not None else tuple(range(windows.topology.world_size))
        if any(not 0 <= r < windows.topology.world_size for r in by_session):
            return None
        index = [ranks.index(r) if r in ranks else -1 for r in by_session]
        views = [windows.attn_views(r) for r in ranks]
        kept = [k for k in windows.memo if isinstance(k, tuple) and k[0] == "f2a_targets"]
        for old in kept[: max(0, len(kept) - _KEPT_TABLES + 1)]:
            del windows.memo[old]
        windows.memo[key] = (
            torch.tensor(index, dtype=torch.int64),
            torch.tensor([v[1].data_ptr() for v in views], dtype=torch.int64),
            torch.tensor([v[0].data_ptr() for v in views], dtype=torch.int64),
            views,
        )
    targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor, object] = windows.memo[key]
    return targets
