"""Config, topology, placement and layout: the planning layer, on good input."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from afd_dispatch import (
    AFDConfig,
    RankTopology,
    WindowLayout,
    build_expert_rank_table,
    local_experts,
    validate_expert_rank_table,
)
from afd_dispatch.errors import AFDInputError


def test_config_parses_inline_json_and_files(tmp_path) -> None:
    text = json.dumps(
        {
            "num_attention_ranks": 2,
            "num_ffn_ranks": 3,
            "micro_batch_num": 3,
            "shared_expert_ranks": [2],
            "expert_replicas": {"0": 2, "5": 2},
            "quant_mode": "int8",
        }
    )
    inline = AFDConfig.from_json(text)
    path = tmp_path / "afd.json"
    path.write_text(text)
    assert AFDConfig.from_json(str(path)) == inline
    assert inline.shared_expert_ranks == (2,)
    assert inline.expert_replicas == {0: 2, 5: 2}
    assert inline.quant_mode_code == 2
    assert inline.world_size == 5
    assert AFDConfig.from_json(inline.to_json()) == inline


def test_config_is_frozen() -> None:
    cfg = AFDConfig(num_attention_ranks=1, num_ffn_ranks=1)
    with pytest.raises(AttributeError):
        cfg.micro_batch_num = 3  # type: ignore[misc]


@pytest.mark.parametrize(("a", "f", "start"), [(2, 3, 0), (1, 4, 0), (4, 1, 0), (3, 2, 2)])
def test_topology_puts_ffn_ranks_in_one_range(a: int, f: int, start: int) -> None:
    topo = RankTopology(a, f, start)
    assert list(topo.ffn_ranks) == list(range(start, start + f))
    assert sorted([*topo.ffn_ranks, *topo.attention_ranks]) == list(range(a + f))
    sessions = [topo.session_of(r) for r in topo.attention_ranks]
    assert sessions == list(range(a))
    assert all(
        topo.attention_rank(s) == r for s, r in zip(sessions, topo.attention_ranks, strict=True)
    )


def test_default_topology_has_attention_after_ffn() -> None:
    topo = RankTopology(2, 3)
    assert topo.attention_ranks == (3, 4)
    assert topo.role_of(0) == "ffn" and topo.role_of(4) == "attention"


def test_placement_spreads_routed_experts_and_replicas() -> None:
    topo = RankTopology(num_attention_ranks=2, num_ffn_ranks=4)
    table = build_expert_rank_table(topo, num_routed=8, replicas=2)
    validate_expert_rank_table(table, topo, 8)
    rows = table[0].tolist()
    for row in rows:
        ranks = [row[1 + 2 * i] for i in range(row[0])]
        assert row[0] == 2 and len(set(ranks)) == 2  # replicas on distinct ranks
    per_rank = Counter(row[1 + 2 * i] for row in rows for i in range(row[0]))
    assert set(per_rank.values()) == {4}  # 16 replicas over 4 ranks, evenly


def test_shared_experts_live_on_their_own_ranks() -> None:
    topo = RankTopology(num_attention_ranks=3, num_ffn_ranks=3)
    table = build_expert_rank_table(topo, 6, num_shared=1, shared_expert_ranks=[2])
    assert validate_expert_rank_table(table, topo, 6) == 1
    assert local_experts(table, 2) == {0: 6}  # only the shared row, on its own rank
    routed_ranks = {row[1] for row in table[0, :6].tolist()}
    assert routed_ranks == {0, 1}


def test_shared_expert_replicas_are_picked_by_session() -> None:
    topo = RankTopology(num_attention_ranks=4, num_ffn_ranks=3)
    table = build_expert_rank_table(topo, 2, num_shared=1, shared_expert_ranks=[1, 2])
    count, r0, _, r1, _ = table[0, 2].tolist()
    assert count == 2 and (r0, r1) == (1, 2)
    # replica = session_id % count: sessions 0, 2 use rank 1; sessions 1, 3 use rank 2
    assert [table[0, 2, 1 + 2 * (s % count)].item() for s in range(4)] == [1, 2, 1, 2]


def test_local_ids_count_up_per_rank() -> None:
    topo = RankTopology(1, 2)
    table = build_expert_rank_table(topo, 5, replicas={1: 2})
    for rank in topo.ffn_ranks:
        assert list(local_experts(table, rank)) == list(range(len(local_experts(table, rank))))


def test_layout_matches_the_spec_formulas() -> None:
    # DeepSeek-V3-like decode: A=4, M=2, BS=64, K=8, S=1, H=7168, int8 quant.
    layout = WindowLayout(4, 2, 64, 8, 1, 7168, torch.bfloat16, quant=True)
    info = 4 * 2 * (2 + 64 * 9) * 4  # 18496 bytes
    assert layout.ffn_info_bytes == info
    assert layout.ffn_data_offset == 18944  # 37 * 512
    assert layout.ffn_data_bytes == 4 * 2 * 64 * 9 * (7168 + 128) * 1
    assert layout.ffn_window_bytes == 18944 + layout.ffn_data_bytes
    assert layout.hccl_buffsize_mb == (info + layout.ffn_data_bytes) // 2**20 + 1
    assert layout.attn_info_bytes == 2 * 64 * 9 * 4
    assert layout.attn_data_offset == 4608
    assert layout.attn_window_bytes == 4608 + 2 * 64 * 9 * 7168 * 2
    layout.check_hccl_buffsize(200)


def test_hccl_check_refuses_a_window_that_does_not_fit() -> None:
    big = WindowLayout(64, 3, 512, 8, 1, 7168, torch.bfloat16)
    with pytest.raises(AFDInputError, match="HCCL_BUFFSIZE"):
        big.check_hccl_buffsize(200)


def test_views_cover_the_window_without_overlap() -> None:
    layout = WindowLayout(2, 2, 3, 2, 1, 64, torch.float16)
    window = torch.zeros(layout.ffn_window_bytes, dtype=torch.uint8)
    info, data = layout.ffn_views(window)
    info.fill_(-1)
    assert int(window[layout.ffn_info_bytes :].sum()) == 0
    data.fill_(1.0)
    assert int(window[: layout.ffn_info_bytes].to(torch.int64).sum()) == 255 * layout.ffn_info_bytes


def test_config_replicas_fit_the_ranks_left_for_routed_experts() -> None:
    with pytest.raises(AFDInputError, match=r"expert_replicas.*\[1, 2\]"):
        AFDConfig(
            num_attention_ranks=1, num_ffn_ranks=3, shared_expert_ranks=(2,), expert_replicas=3
        )
