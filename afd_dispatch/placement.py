"""Where each expert lives: building and checking `expert_rank_table`.

Row g of the (L=1, G, 1 + 2R) int32 table describes global expert g (routed experts
first, shared experts after them): `[count, rank_0, local_0, rank_1, local_1, ...]`.
Ranks are absolute communicator ranks; local ids number the experts one FFN rank hosts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.layout import EMPTY_ID_THRESHOLD, MAX_SHARED_EXPERTS
from afd_dispatch.topology import RankTopology

UNUSED = -1  # tail entries of a row; the ops ignore them


def build_expert_rank_table(
    topology: RankTopology,
    num_routed: int,
    num_shared: int = 0,
    replicas: int | Mapping[int, int] = 1,
    shared_expert_ranks: Sequence[int] = (),
) -> torch.Tensor:
    """Place experts on FFN ranks and return the (1, G, 1 + 2R) int32 table.

    Routed experts go round-robin over the FFN ranks that do not host shared experts, each
    replica of one expert on a different rank, so load and memory spread evenly. A shared
    expert is replicated on every rank of `shared_expert_ranks` (attention ranks then
    spread over them through `session_id % count`); with no such ranks it is placed like a
    routed expert. Local ids on a rank count up in placement order.
    """
    check(num_routed >= 1, "num_routed", ">= 1", num_routed)
    check(
        0 <= num_shared <= MAX_SHARED_EXPERTS,
        "num_shared",
        f"in [0, {MAX_SHARED_EXPERTS}]",
        num_shared,
    )
    shared_ranks = list(dict.fromkeys(shared_expert_ranks))
    for rank in shared_ranks:
        check(
            topology.is_ffn(rank),
            "shared_expert_ranks",
            f"FFN ranks in [{topology.ffn_ranks.start}, {topology.ffn_ranks.stop})",
            list(shared_expert_ranks),
        )
    check(
        not shared_ranks or num_shared > 0,
        "shared_expert_ranks",
        "empty when the model has no shared expert",
        list(shared_expert_ranks),
    )
    routed_ranks = [r for r in topology.ffn_ranks if r not in shared_ranks]
    check(
        len(routed_ranks) >= 1,
        "shared_expert_ranks",
        "at most F - 1 ranks, leaving one FFN rank for routed experts",
        list(shared_expert_ranks),
    )
    counts = _replica_counts(num_routed, replicas, len(routed_ranks))

    rows: list[list[tuple[int, int]]] = []
    next_local = {r: 0 for r in topology.ffn_ranks}
    cursor = 0

    def place(rank: int) -> tuple[int, int]:
        local = next_local[rank]
        next_local[rank] += 1
        return rank, local

    for count in counts:
        rows.append([place(routed_ranks[(cursor + i) % len(routed_ranks)]) for i in range(count)])
        cursor += count
    for _ in range(num_shared):
        if shared_ranks:
            rows.append([place(r) for r in shared_ranks])
        else:
            rows.append([place(routed_ranks[cursor % len(routed_ranks)])])
            cursor += 1

    width = max(len(r) for r in rows)
    table = torch.full((1, len(rows), 1 + 2 * width), UNUSED, dtype=torch.int32)
    for g, replicas_of_g in enumerate(rows):
        table[0, g, 0] = len(replicas_of_g)
        for i, (rank, local) in enumerate(replicas_of_g):
            table[0, g, 1 + 2 * i] = rank
            table[0, g, 2 + 2 * i] = local
    return table


def _replica_counts(
    num_routed: int, replicas: int | Mapping[int, int], num_ranks: int
) -> list[int]:
    if isinstance(replicas, Mapping):
        for g, c in replicas.items():
            check(0 <= g < num_routed, "expert_replicas", f"expert ids in [0, {num_routed})", g)
            check(1 <= c <= num_ranks, f"expert_replicas[{g}]", f"in [1, {num_ranks}]", c)
        return [replicas.get(g, 1) for g in range(num_routed)]
    check(1 <= replicas <= num_ranks, "expert_replicas", f"in [1, {num_ranks}]", replicas)
    return [replicas] * num_routed


def validate_expert_rank_table(
    table: torch.Tensor,
    topology: RankTopology,
    num_routed: int,
    argument: str = "expert_rank_table",
) -> int:
    """Check a table (untrusted input) against the topology; return S, its shared experts.

    Checked: int32, shape (1, num_routed + S, 1 + 2R) with 0 <= S <= 4 and R >= 1, every
    count in [1, R], every used rank an FFN rank, every local id in [0, 1e6), and each
    (rank, local id) pair naming one expert only.
    """
    if not isinstance(table, torch.Tensor):
        raise AFDInputError(argument, "an int32 tensor", type(table).__name__)
    check(table.dtype == torch.int32, f"{argument}.dtype", "torch.int32", table.dtype)
    check(table.dim() == 3, f"{argument}.dim()", "3 (L, G, 1 + 2R)", table.dim())
    layers, rows, width = table.shape
    check(layers == 1, f"{argument}.shape[0] (L)", "1", layers)
    shared = rows - num_routed
    check(
        0 <= shared <= MAX_SHARED_EXPERTS,
        f"{argument}.shape[1]",
        f"moe_expert_num + S = {num_routed} + [0..{MAX_SHARED_EXPERTS}]",
        rows,
    )
    check(width >= 3 and width % 2 == 1, f"{argument}.shape[2]", "1 + 2R with R >= 1", width)
    max_replicas = (width - 1) // 2
    t = table[0].to(torch.int64)
    counts = t[:, 0]
    bad = ((counts < 1) | (counts > max_replicas)).nonzero()
    if bad.numel():
        g = int(bad[0, 0])
        raise AFDInputError(
            f"{argument}[0, {g}, 0] (count)", f"in [1, {max_replicas}]", int(counts[g])
        )
    ranks = t[:, 1::2]
    locals_ = t[:, 2::2]
    # on the table's device: a CPU arange against an NPU table raises a device mismatch
    used = torch.arange(max_replicas, device=t.device).unsqueeze(0) < counts.unsqueeze(1)
    lo, hi = topology.ffn_ranks.start, topology.ffn_ranks.stop
    _check_replica_field(argument, used, ranks, 1, "rank", lo, hi, "an FFN rank in ")
    _check_replica_field(argument, used, locals_, 2, "local id", 0, EMPTY_ID_THRESHOLD, "in ")
    keys = (ranks * EMPTY_ID_THRESHOLD + locals_)[used]
    if torch.unique(keys).numel() != keys.numel():
        seen: dict[int, int] = {}
        for g in range(rows):
            for i in range(int(counts[g])):
                key = int(ranks[g, i]) * EMPTY_ID_THRESHOLD + int(locals_[g, i])
                if key in seen and seen[key] != g:
                    raise AFDInputError(
                        argument,
                        "local ids unique per rank",
                        f"rank {int(ranks[g, i])} local {int(locals_[g, i])} "
                        f"names experts {seen[key]} and {g}",
                    )
                seen[key] = g
    return shared


def _check_replica_field(
    argument: str,
    used: torch.Tensor,
    values: torch.Tensor,
    column: int,
    what: str,
    lo: int,
    hi: int,
    allowed: str,
) -> None:
    """Raise `AFDInputError` at the first used replica whose field is outside [lo, hi).

    `values` (G, R) is one field of every replica, at table column `column + 2 * i` for
    replica i; `used` (G, R) marks the replicas within each row's count. The error names
    that cell and allows `allowed` followed by the interval.
    """
    bad = (used & ((values < lo) | (values >= hi))).nonzero()
    if bad.numel():
        g, i = (int(v) for v in bad[0])
        raise AFDInputError(
            f"{argument}[0, {g}, {column + 2 * i}] ({what})",
            f"{allowed}[{lo}, {hi})",
            int(values[g, i]),
        )


def local_experts(table: torch.Tensor, rank: int) -> dict[int, int]:
    """{local id: global expert row} of the experts `rank` hosts (shared rows included)."""
    hosted: dict[int, int] = {}
    for g, row in enumerate(table[0].tolist()):
        for i in range(row[0]):
            if row[1 + 2 * i] == rank:
                hosted[row[2 + 2 * i]] = g
    return dict(sorted(hosted.items()))
