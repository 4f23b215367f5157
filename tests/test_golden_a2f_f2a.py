"""npu_attention_to_ffn / npu_ffn_to_attention after op-plugin's 16-rank tests.

Peer files followed (their grids and expected-window rules; no code taken):

* Ascend/op-plugin @ 517f2e7d0f20 (file versions 6a7b4d44 / 3500b236)
  `test/test_custom_ops/test_attention_to_ffn.py`: `test_op_plugin_attention_to_ffn`;
  `test/test_custom_ops/test_ffn_to_attention.py`: `test_op_plugin_ffn_to_attention`.
Upstream both are skipped (no torchair) and need 16 NPUs; here the 16 ranks are one
reference window group in this process.

Grid: world 16 = 5 FFN ranks + 11 attention ranks, bs 16, h 7168, k 8 routed + 1 shared
(moe_expert_num 8), M 1, layer 0, bf16, no quantization, no active_mask, sync_flag 0.
* attention_to_ffn: FFN ranks 0..4, attention ranks 5..15 (session = rank - 5). x uniform
  (-1024, 1024) in bf16; each token's 8 ids are a random permutation's first 8 of the 8
  experts; expert_rank_table (1, 9, 1 + 2R) with upstream's ranks: routed expert e gets
  1..4 replicas, each on one of the 4 MoE ranks (each rank a candidate twice); the shared
  expert's row is [1, rank 4, local 8]. Upstream draws each replica's local id from its
  rank's card {2r, 2r+1} afresh per expert, so two experts share a (rank, local id); the
  reference refuses such a table (`test_op_plugin_table_as_drawn_upstream_is_refused`),
  so the byte test numbers each (expert, replica)'s local id per rank instead.
  Expected FFN window of rank r (info int32 [11, 1, 2 + 16*9] at 0, data [11, 1, 16, 9, h]
  at align512(info bytes)), starting from a bare (zeroed) window as the golden assumes:
  replica i = session % count of the slot's expert; data row (s, 0, t, j) := x[s, t] and
  info entry 2 + t*9 + j := local id on the chosen rank; then flag 1 (and layer 0) in row
  (s, 0) of every FFN rank; every other byte stays 0.
  The golden computes the shared slot with expert row and slot index `expert_num - 1`
  (= 8), a known bug that only works because k == moe_expert_num here; the kernel uses
  row moe_expert_num + j and slot K + j for shared expert j, which is what we expect
  (the same numbers in this grid).
* ffn_to_attention: attention ranks 0..10, FFN ranks 11..15 (ffn_start_rank_id 11),
  attn_rank_table = arange(11). x [1584, h] bf16 uniform(-1024, 1024),
  actual_token_num = 1584 = 11 sessions x 16 tokens x 9 slots, session ids in blocks of
  144, micro-batch 0, token ids in blocks of 9, offsets 0..8; every FFN rank sends the same
  rows. Expected attention window of rank s: every flag [1, 16, 9] = 1 and data row
  (0, t, j) = x[s*144 + t*9 + j]. Windows of the other role stay unchanged.
Compared: every byte of every window of the group.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from golden_support import (
    align512,
    assert_same_bytes,
    f32_to_bf16,
    rng_for,
    uniform_f32,
)

from afd_dispatch import (
    AFDInputError,
    RankTopology,
    WindowGroup,
    WindowLayout,
    create_window_group,
    destroy_window_group,
)
from afd_dispatch.kernels.reference import npu_attention_to_ffn, npu_ffn_to_attention

WORLD, FFN_RANKS, ATTN_RANKS = 16, 5, 11
BS, H, TOPK, SHARED, MOE_EXPERTS, M = 16, 7168, 8, 1, 8, 1
E = TOPK + SHARED
MOE_RANKS, EXPERTS_PER_RANK = 4, 2


@contextmanager
def group_of(topology: RankTopology) -> Iterator[WindowGroup]:
    name = f"golden-{uuid.uuid4().hex[:8]}"
    layout = WindowLayout(ATTN_RANKS, M, BS, TOPK, SHARED, H, torch.bfloat16)
    group = create_window_group(name, topology, layout, timeout_s=10.0)
    try:
        yield group
    finally:
        destroy_window_group(name)


def bf16_uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """bf16 codes of float32 uniform(-1024, 1024) values."""
    count = int(np.prod(shape))
    return f32_to_bf16(uniform_f32(rng, count, -1024.0, 1024.0)).reshape(shape)


def expert_rank_table(rng: np.random.Generator, locals_per_rank_card: bool) -> np.ndarray:
    """(1, 9, 1 + 2R) int32, the ranks drawn the way upstream draws them.

    locals_per_rank_card=True is upstream's table exactly: each replica's local id is drawn
    from its rank's card {2r, 2r+1}, afresh for every expert, so two experts often share a
    (rank, local id). False gives each (expert, replica) its own local id on its rank
    (0, 1, 2, ... in drawing order), the same ranks and counts otherwise.
    """
    rows = []
    next_local = dict.fromkeys(range(MOE_RANKS), 0)
    for _ in range(MOE_EXPERTS):
        candidates = list(range(MOE_RANKS)) * 2
        card = {
            r: list(range(r * EXPERTS_PER_RANK, (r + 1) * EXPERTS_PER_RANK))
            for r in range(MOE_RANKS)
        }
        count = int(rng.integers(1, MOE_RANKS + 1))
        row = [count]
        for _ in range(count):
            rank = candidates.pop(int(rng.integers(0, len(candidates))))
            local = card[rank].pop(int(rng.integers(0, len(card[rank]))))
            if not locals_per_rank_card:
                local, next_local[rank] = next_local[rank], next_local[rank] + 1
            row += [rank, local]
        rows.append(row)
    rows.append([1, FFN_RANKS - 1, MOE_EXPERTS])  # the shared expert: rank 4, local 8
    width = max(len(r) for r in rows)
    table = np.zeros((1, len(rows), width), dtype=np.int32)
    for g, row in enumerate(rows):
        table[0, g, : len(row)] = row
    return table


def shares_a_local_id(table: np.ndarray) -> bool:
    seen: dict[tuple[int, int], int] = {}
    for g, row in enumerate(table[0]):
        for i in range(int(row[0])):
            key = (int(row[1 + 2 * i]), int(row[2 + 2 * i]))
            if seen.setdefault(key, g) != g:
                return True
    return False


def window_bytes(info: np.ndarray, data: np.ndarray) -> np.ndarray:
    """info int32 at byte 0, data at align512(info bytes), as one uint8 array."""
    start = align512(info.nbytes)
    out = np.zeros(start + data.nbytes, dtype=np.uint8)
    out[: info.nbytes] = info.reshape(-1).view(np.uint8)
    out[start:] = data.reshape(-1).view(np.uint8)
    return out


def read(group: WindowGroup, rank: int) -> np.ndarray:
    return np.frombuffer(group.read_window(rank), dtype=np.uint8)


def a2f_inputs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """x bf16 codes [11, 1, 16, h]; ids [11, 1, 16, 8]: each token's first 8 of a random
    permutation of the 8 routed experts."""
    x = bf16_uniform(rng, (ATTN_RANKS, 1, BS, H))
    perms = [rng.permutation(MOE_EXPERTS)[:TOPK] for _ in range(ATTN_RANKS * BS)]
    ids = np.stack(perms).astype(np.int32).reshape(ATTN_RANKS, 1, BS, TOPK)
    return x, ids


def send_all_sessions(
    group: WindowGroup, x: np.ndarray, ids: np.ndarray, table: np.ndarray
) -> None:
    for s in range(ATTN_RANKS):
        npu_attention_to_ffn(
            torch.from_numpy(x[s].view(np.int16)).view(torch.bfloat16),
            torch.tensor([s], dtype=torch.int32),
            torch.tensor([0], dtype=torch.int32),
            torch.tensor([0], dtype=torch.int32),
            torch.from_numpy(ids[s]),
            torch.from_numpy(table),
            group.name,
            WORLD,
            [ATTN_RANKS, M, 2 + BS * E],
            [ATTN_RANKS, M, BS, E, H],
            [M, BS, E],
            MOE_EXPERTS,
        )


def test_op_plugin_attention_to_ffn() -> None:
    rng = rng_for("op-plugin test_attention_to_ffn")
    x, ids = a2f_inputs(rng)
    table = expert_rank_table(rng, locals_per_rank_card=False)
    assert not shares_a_local_id(table)

    topology = RankTopology(num_attention_ranks=ATTN_RANKS, num_ffn_ranks=FFN_RANKS)
    assert list(topology.ffn_ranks) == list(range(FFN_RANKS))
    with group_of(topology) as group:
        for r in topology.ffn_ranks:
            group.window(r).zero_()  # a bare HCCL window, as upstream's golden assumes
        attn_before = {r: read(group, r).copy() for r in topology.attention_ranks}
        shapes = group.layout.op_shapes
        assert shapes["ffn_token_info_table_shape"] == [ATTN_RANKS, M, 2 + BS * E]
        assert shapes["ffn_token_data_shape"] == [ATTN_RANKS, M, BS, E, H]
        assert shapes["attn_token_info_table_shape"] == [M, BS, E]
        send_all_sessions(group, x, ids, table)

        info = np.zeros((FFN_RANKS, ATTN_RANKS, M, 2 + BS * E), dtype=np.int32)
        data = np.zeros((FFN_RANKS, ATTN_RANKS, M, BS, E, H), dtype=np.uint16)
        for s in range(ATTN_RANKS):
            for t in range(BS):
                for j in range(E):
                    # routed slots j < K: the token's expert; shared slot K + i: row 8 + i
                    g = int(ids[s, 0, t, j]) if j < TOPK else MOE_EXPERTS + (j - TOPK)
                    count = int(table[0, g, 0])
                    i = s % count
                    rank, local = int(table[0, g, 1 + 2 * i]), int(table[0, g, 2 + 2 * i])
                    data[rank, s, 0, t, j] = x[s, 0, t]
                    info[rank, s, 0, 2 + t * E + j] = local
        info[:, :, :, 0] = 1  # sync_flag 0: every FFN rank gets every session's flag
        info[:, :, :, 1] = 0  # layer 0
        for r in topology.ffn_ranks:
            assert_same_bytes(read(group, r), window_bytes(info[r], data[r]), f"FFN rank {r}")
        for r, before in attn_before.items():
            assert_same_bytes(read(group, r), before, f"attention rank {r}")


def test_op_plugin_table_as_drawn_upstream_is_refused() -> None:
    """Upstream's own table lets two experts share a (rank, local id) - a rank's card has 2
    local ids and each expert draws from it afresh. The A3 kernel does not look: it would
    write the golden's bytes. The reference refuses such a table (placement.py,
    "local ids unique per rank": the FFN side could not tell the experts apart) before
    writing anything, which is what this pins."""
    rng = rng_for("op-plugin test_attention_to_ffn")
    x, ids = a2f_inputs(rng)
    table = expert_rank_table(rng, locals_per_rank_card=True)
    assert shares_a_local_id(table)
    topology = RankTopology(num_attention_ranks=ATTN_RANKS, num_ffn_ranks=FFN_RANKS)
    with group_of(topology) as group:
        before = {r: read(group, r).copy() for r in range(WORLD)}
        with pytest.raises(AFDInputError, match="local ids unique per rank"):
            send_all_sessions(group, x, ids, table)
        for r, window in before.items():
            assert_same_bytes(read(group, r), window, f"rank {r}")


def test_op_plugin_ffn_to_attention() -> None:
    rng = rng_for("op-plugin test_ffn_to_attention")
    rows = BS * M * ATTN_RANKS * E  # 1584
    x = bf16_uniform(rng, (rows, H))
    sessions = np.repeat(np.arange(ATTN_RANKS, dtype=np.int32), BS * E)
    mbs = np.zeros(rows, dtype=np.int32)
    tokens = np.tile(np.repeat(np.arange(BS, dtype=np.int32), E), ATTN_RANKS * M)
    offsets = np.tile(np.arange(E, dtype=np.int32), rows // E)

    topology = RankTopology(
        num_attention_ranks=ATTN_RANKS, num_ffn_ranks=FFN_RANKS, ffn_start_rank_id=11
    )
    assert list(topology.attention_ranks) == list(range(ATTN_RANKS))
    with group_of(topology) as group:
        ffn_before = {r: read(group, r).copy() for r in topology.ffn_ranks}
        for _sender in topology.ffn_ranks:  # every FFN rank sends the same rows
            npu_ffn_to_attention(
                torch.from_numpy(x.view(np.int16)).view(torch.bfloat16),
                torch.from_numpy(sessions),
                torch.from_numpy(mbs),
                torch.from_numpy(tokens),
                torch.from_numpy(offsets),
                torch.tensor([rows], dtype=torch.int64),
                group.name,
                WORLD,
                [M, BS, E],
                [M, BS, E, H],
                attn_rank_table=torch.arange(ATTN_RANKS, dtype=torch.int32),
            )

        for r in topology.attention_ranks:
            info = np.ones((M, BS, E), dtype=np.int32)
            data = x[r * BS * E : (r + 1) * BS * E].reshape(M, BS, E, H)
            assert_same_bytes(read(group, r), window_bytes(info, data), f"attention rank {r}")
        for r, before in ffn_before.items():
            assert_same_bytes(read(group, r), before, f"FFN rank {r}")
