"""Drives the whole op family for every rank of an in-process window group.

Used by the tests: one call runs A2F on every session, batching + experts + F2A on every
FFN rank, and combine on every session, for one (layer, micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from afd_dispatch import WindowGroup, build_expert_rank_table, local_experts
from afd_dispatch.kernels import reference as ref
from afd_dispatch.kernels.reference import dequantize_rows
from afd_dispatch.layout import TOKEN_DTYPE_INT8, token_dtype_code

# expert function: (global expert id, float32 rows (n, H)) -> float32 rows (n, H)
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Harness:
    group: WindowGroup
    table: torch.Tensor
    moe_expert_num: int
    quant_mode: int = 0
    sync_flag: int = 0

    def __post_init__(self) -> None:
        topo = self.group.topology
        self.ffn_ctx = {}
        self.attn_ctx = {}
        self.hosted = {}
        for r in topo.ffn_ranks:
            self.hosted[r] = local_experts(self.table, r)
            self.ffn_ctx[r] = ref.context_for(self.group, r, max(1, len(self.hosted[r])))
        for r in topo.attention_ranks:
            self.attn_ctx[r] = ref.context_for(self.group, r)

    def send(
        self,
        s: int,
        m: int,
        layer: int,
        x: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
    ) -> None:
        g, lay = self.group, self.group.layout
        shapes = lay.op_shapes
        ref.npu_attention_to_ffn(
            x.unsqueeze(0),
            torch.tensor([s]),
            torch.tensor([m]),
            torch.tensor([layer]),
            ids.unsqueeze(0),
            self.table,
            g.name,
            g.topology.world_size,
            shapes["ffn_token_info_table_shape"],
            shapes["ffn_token_data_shape"],
            shapes["attn_token_info_table_shape"],
            self.moe_expert_num,
            scales=scales,
            active_mask=None if mask is None else mask.unsqueeze(0),
            quant_mode=self.quant_mode,
            sync_flag=self.sync_flag,
            ffn_start_rank_id=g.topology.ffn_start_rank_id,
        )

    def serve(self, rank: int, expert: ExpertFn) -> int:
        """Batching -> per-expert function -> F2A on one FFN rank; returns rows served."""
        g, lay = self.group, self.group.layout
        hosted = self.hosted[rank]
        code = TOKEN_DTYPE_INT8 if lay.quant else token_dtype_code(lay.dtype)
        y, group_list, sess, mbs, toks, offs, dyn, n_t = ref.npu_ffn_worker_batching(
            self.ffn_ctx[rank].get_schedule_context_tensor(),
            max(1, len(hosted)),
            [lay.num_attention_ranks, lay.tokens, lay.slots, lay.hidden],
            token_dtype=code,
            need_schedule=1,
        )
        n = int(n_t[0])
        rows = dequantize_rows(y[:n], dyn[:n]) if lay.quant else y[:n].float()
        out = torch.zeros(y.shape[0], lay.hidden, dtype=lay.dtype)
        start = 0
        for local, count in group_list.tolist():
            if count == 0:
                break
            out[start : start + count] = expert(hosted[local], rows[start : start + count]).to(
                lay.dtype
            )
            start += count
        assert start == n
        shapes = lay.op_shapes
        ref.npu_ffn_to_attention(
            out,
            sess,
            mbs,
            toks,
            offs,
            n_t,
            g.name,
            g.topology.world_size,
            shapes["token_info_table_shape"],
            shapes["token_data_shape"],
            attn_rank_table=torch.tensor(g.topology.attention_ranks, dtype=torch.int32),
        )
        return n

    def combine(self, s: int, weights: torch.Tensor, layer: int) -> torch.Tensor:
        lay = self.group.layout
        rank = self.group.topology.attention_rank(s)
        y, nxt = ref.npu_attention_worker_combine(
            self.attn_ctx[rank].get_schedule_context_tensor(),
            weights.float(),
            torch.tensor([layer]),
            lay.hidden,
            token_dtype=token_dtype_code(lay.dtype),
            need_schedule=1,
        )
        assert int(nxt[0]) == layer + 1
        return y


def make_table(
    group: WindowGroup, moe_expert_num: int, replicas=1, shared_ranks=()
) -> torch.Tensor:
    return build_expert_rank_table(
        group.topology, moe_expert_num, group.layout.shared, replicas, shared_ranks
    )
