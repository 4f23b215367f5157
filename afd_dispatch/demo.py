"""One MoE layer served through the whole op family, checked against colocated math.

Run `afd-dispatch demo`. One attention rank (session 0) routes two micro-batches of
tokens to two FFN ranks over shared-memory windows; each FFN rank batches its tokens per
local expert, runs SwiGLU experts and sends the rows back; combine sums them. The result
must equal the same MoE layer computed in place.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from afd_dispatch import (
    RankTopology,
    WindowLayout,
    build_expert_rank_table,
    create_window_group,
    local_experts,
)
from afd_dispatch.kernels import load_backend
from afd_dispatch.layout import token_dtype_code


def swiglu(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def run(micro_batches: int = 2, tokens: int = 4, hidden: int = 64, experts: int = 8) -> float:
    torch.manual_seed(0)
    topk, shared, inter = 2, 1, 32
    topo = RankTopology(num_attention=1, num_ffn=2)
    layout = WindowLayout(1, micro_batches, tokens, topk, shared, hidden, torch.float32)
    windows = create_window_group("afd-demo", topo, layout, transport="shm", timeout_s=10)
    ops = load_backend("reference")
    table = build_expert_rank_table(topo, experts, shared, replicas={0: 2})
    weights = [
        {k: torch.randn(*shape) / shape[1] ** 0.5 for k, shape in
         (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))}
        for _ in range(experts + shared)
    ]  # fmt: skip
    shapes = layout.op_shapes
    attn_ctx = ops.context_for(windows, topo.attention_rank(0))
    worst = 0.0
    try:
        batches = []
        for m in range(micro_batches):
            x = torch.randn(tokens, hidden)
            router = torch.randn(tokens, experts).softmax(-1)
            w, ids = router.topk(topk, dim=-1)
            batches.append((x, w, ids))
            ops.npu_attention_to_ffn(
                x[None], torch.tensor([0]), torch.tensor([m]), torch.tensor([0]), ids[None],
                table, windows.name, topo.world_size, shapes["ffn_token_info_table_shape"],
                shapes["ffn_token_data_shape"], shapes["attn_token_info_table_shape"], experts,
            )  # fmt: skip
        for rank in topo.ffn_ranks:
            hosted = local_experts(table, rank)
            ctx = ops.context_for(windows, rank, expert_num=len(hosted))
            for _ in range(micro_batches):
                y, groups, sess, mbs, toks, offs, _, n = ops.npu_ffn_worker_batching(
                    ctx.get_schedule_context_tensor(), len(hosted),
                    [1, tokens, layout.slots, hidden], token_dtype=token_dtype_code(torch.float32),
                    need_schedule=1,
                )  # fmt: skip
                out, start = torch.zeros_like(y), 0
                for local, count in groups.tolist()[: len(hosted)]:
                    if count:
                        rows = y[start : start + count]
                        out[start : start + count] = swiglu(weights[hosted[local]], rows)
                        start += count
                ops.npu_ffn_to_attention(
                    out, sess, mbs, toks, offs, n, windows.name, topo.world_size,
                    shapes["token_info_table_shape"], shapes["token_data_shape"],
                    attn_rank_table=torch.tensor(topo.attention_ranks),
                )  # fmt: skip
                print(f"FFN rank {rank}: served {int(n[0])} slots of micro-batch {int(mbs[0])}")
        for m, (x, w, ids) in enumerate(batches):
            y, _ = ops.npu_attention_worker_combine(
                attn_ctx.get_schedule_context_tensor(), w, torch.tensor([0]), hidden,
                token_dtype=token_dtype_code(torch.float32), need_schedule=1,
            )  # fmt: skip
            colocated = sum(
                w[:, k : k + 1]
                * torch.stack([swiglu(weights[int(g)], x[t]) for t, g in enumerate(ids[:, k])])
                for k in range(topk)
            ) + swiglu(weights[experts], x)
            diff = float((y - colocated).abs().max())
            worst = max(worst, diff)
            print(f"micro-batch {m}: max |AFD - colocated| = {diff:.2e}")
    finally:
        windows.close()
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd-dispatch demo", description=__doc__)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args(argv)
    worst = run(args.micro_batches, args.tokens)
    ok = worst < 1e-5
    print("AFD output matches the colocated MoE layer" if ok else "MISMATCH")
    return 0 if ok else 1
