"""Fixed-capacity sends (the NPU link's workaround for A3 combine) give the same results.

On A3, combine returns stale rows when the token count changes between calls on one
context, so the NPU link always sends all BS rows: padding rows repeat valid rows (never
all-zero rows, which dynamic int8 quantization cannot scale) and carry zero combine
weights. Through the reference ops, the valid rows' results must be the same bits either
way, with and without int8 A2F, and for an empty micro-batch too.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from afd_dispatch import RankTopology, WindowLayout, build_expert_rank_table, create_window_group
from afd_dispatch.kernels.reference import (
    context_for,
    npu_attention_to_ffn,
    npu_attention_worker_combine,
    npu_ffn_to_attention,
    npu_ffn_worker_batching,
)
from afd_dispatch.link.npu import _pad_to_capacity
from afd_dispatch.placement import local_experts
from afd_dispatch.windows import destroy_window_group

A, F, BS, K, S, H, EXPERTS = 1, 2, 6, 2, 1, 64, 4


def round_trip(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, quant: bool
) -> torch.Tensor:
    """One micro-batch through A2F, batching, 'experts' (a fixed per-expert scaling, so
    every row's result depends on its own row and expert only), F2A and combine."""
    topology = RankTopology(A, F)
    layout = WindowLayout(A, 1, BS, K, S, H, torch.bfloat16, quant)
    name = f"fixed-{uuid.uuid4().hex[:12]}"
    group = create_window_group(name, topology, layout, timeout_s=5.0)
    try:
        table = build_expert_rank_table(topology, EXPERTS, S)
        shapes = layout.op_shapes
        one = lambda v: torch.tensor([v])  # noqa: E731
        npu_attention_to_ffn(
            x, one(0), one(0), one(1), ids, table, name, topology.world_size,
            shapes["ffn_token_info_table_shape"], shapes["ffn_token_data_shape"],
            shapes["attn_token_info_table_shape"], EXPERTS, active_mask=mask,
            quant_mode=2 if quant else 0,
        )  # fmt: skip
        for rank in topology.ffn_ranks:
            hosted = len(local_experts(table, rank))
            ctx = context_for(group, rank, max(1, hosted)).get_schedule_context_tensor()
            y, groups, sess, mbs, tok, off, scale, n = npu_ffn_worker_batching(
                ctx, max(1, hosted), [A, BS, K + S, H], token_dtype=2 if quant else 1,
                need_schedule=1,
            )  # fmt: skip
            rows = y.to(torch.float32) * scale.unsqueeze(-1) if quant else y.to(torch.float32)
            out = torch.zeros(A * BS * (K + S), H, dtype=torch.bfloat16)
            start = 0
            for local, count in groups.tolist():
                out[start : start + count] = (rows[start : start + count] * (local + 2)).bfloat16()
                start += count
            npu_ffn_to_attention(
                out, sess, mbs, tok, off, n, name, topology.world_size,
                shapes["token_info_table_shape"], shapes["token_data_shape"],
                attn_rank_table=torch.tensor(topology.attention_ranks),
            )  # fmt: skip
        ctx = context_for(group, topology.attention_rank(0)).get_schedule_context_tensor()
        y, _ = npu_attention_worker_combine(ctx, weights, one(1), H, token_dtype=1, need_schedule=1)
        return y
    finally:
        destroy_window_group(name)


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("n", [0, 1, 4, BS])
def test_padding_to_capacity_changes_no_valid_row(n: int, quant: bool) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, BS, H, generator=g).bfloat16()
    ids = torch.randint(0, EXPERTS, (1, BS, K), generator=g, dtype=torch.int32)
    weights = torch.rand(BS, K, generator=g)
    weights[n:] = 0  # the endpoint zeroes the weights of rows past its n tokens
    mask = torch.arange(BS).lt(n).unsqueeze(0)
    x[0, n:] = 0  # what an endpoint's staging rows hold past n: anything
    variable = round_trip(x, ids, weights, mask, quant)

    padded_x, padded_ids = x.clone(), ids.clone()
    _pad_to_capacity(padded_x, padded_ids, n, EXPERTS)
    assert bool((padded_x[0].abs().amax(dim=-1) > 0).all()), "no all-zero row is sent"
    fixed = round_trip(padded_x, padded_ids, weights, torch.ones(1, BS, dtype=torch.bool), quant)
    assert torch.equal(fixed[:n], variable[:n])
