"""`bench --level loop`, case (c): the attention-side AFD MoE call under
`torch.compile(fullgraph=True)`, its host overhead against eager."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afd_dispatch.bench.loop_shapes import TINY, MoEShape, names, routing
from afd_dispatch.bench.report import Row, interleaved, median, timed
from afd_dispatch.kernels import reference as ref
from afd_dispatch.kernels.reference.attention_to_ffn import attention_to_ffn
from afd_dispatch.kernels.reference.attention_worker_combine import attention_worker_combine
from afd_dispatch.layout import FLAG_OFFSET, WindowLayout, token_dtype_code
from afd_dispatch.placement import build_expert_rank_table
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import create_window_group

CALL_SAMPLES = 10  # (c): samples per --repeat; one call is short and cheap


# -- (c) torch.compile of the attention-side MoE call ----------------------------------------
class CompileCase:
    """The AFD MoE call of one micro-batch of n < BS tokens on in-process windows, with its
    window flags put back between calls so neither op waits."""

    def __init__(self, shape: MoEShape = TINY) -> None:
        self.shape = shape
        self.topology = RankTopology(1, 1)
        self.layout = WindowLayout(1, 1, shape.tokens, shape.topk, 0, shape.hidden, torch.float32)
        self.group = create_window_group(
            f"afd-bench-compile-{next(names)}", self.topology, self.layout, "inproc"
        )
        self.table = build_expert_rank_table(self.topology, shape.experts)
        self.attn_rank = self.topology.attention_rank(0)
        self.ctx = ref.context_for(self.group, self.attn_rank).get_schedule_context_tensor()
        n = shape.tokens - 2  # a partial micro-batch: the padding is real work
        gen = torch.Generator().manual_seed(7)
        self.hidden = torch.randn(n, shape.hidden, generator=gen)
        self.ids, self.weights = routing(n, shape, seed=8)
        self.zero = torch.zeros(1, dtype=torch.int32)
        self.code = token_dtype_code(torch.float32)
        x, ids, mask, scales = self.pad(self.hidden, self.ids, self.weights)
        self.padded = (x, ids, mask, scales)

    def close(self) -> None:
        self.group.close()

    def pad(
        self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the endpoint does before A2F: pad to BS, mask the tail."""
        pad = self.shape.tokens - hidden.shape[0]
        x = F.pad(hidden, (0, 0, 0, pad)).unsqueeze(0)
        padded_ids = F.pad(ids, (0, 0, 0, pad)).unsqueeze(0)
        mask = (torch.arange(self.shape.tokens) < hidden.shape[0]).unsqueeze(0)
        scales = F.pad(weights, (0, 0, 0, pad))
        return x, padded_ids, mask, scales

    def reset(self) -> None:
        """FFN flag free (A2F sends at once), every result "arrived" (combine returns)."""
        self.group.ffn_views(self.topology.ffn_ranks[0])[0][:, :, FLAG_OFFSET] = 0
        self.group.attn_views(self.attn_rank)[0].fill_(1)

    def moe_call(
        self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, layer: torch.Tensor
    ) -> torch.Tensor:
        """Pad; `torch.ops.afd.npu_attention_to_ffn`; `..npu_attention_worker_combine`."""
        x, padded_ids, mask, scales = self.pad(hidden, ids, weights)
        shapes = self.layout.op_shapes
        torch.ops.afd.npu_attention_to_ffn(
            x, self.zero, self.zero, layer, padded_ids, self.table, self.group.name,
            self.topology.world_size, shapes["ffn_token_info_table_shape"],
            shapes["ffn_token_data_shape"], shapes["attn_token_info_table_shape"],
            self.shape.experts, active_mask=mask,
        )  # fmt: skip
        y, _ = torch.ops.afd.npu_attention_worker_combine(
            self.ctx, scales, layer, self.shape.hidden, token_dtype=self.code, need_schedule=1
        )
        return y[: hidden.shape[0]]

    def raw(self) -> torch.Tensor:
        """The two op implementations themselves, on pre-padded arguments: the op work."""
        x, ids, mask, scales = self.padded
        shapes = self.layout.op_shapes
        attention_to_ffn(
            x, self.zero, self.zero, self.zero, ids, self.table, self.group.name,
            self.topology.world_size, shapes["ffn_token_info_table_shape"],
            shapes["ffn_token_data_shape"], shapes["attn_token_info_table_shape"],
            self.shape.experts, active_mask=mask,
        )  # fmt: skip
        y, _ = attention_worker_combine(
            self.ctx, scales, self.zero, self.shape.hidden, token_dtype=self.code, need_schedule=1
        )
        return y


def compile_overhead(repeat: int) -> list[Row]:
    case = CompileCase()
    try:
        args = (case.hidden, case.ids, case.weights, case.zero)
        case.reset()
        eager_out = case.moe_call(*args)
        compiled = torch.compile(case.moe_call, fullgraph=True)
        case.reset()
        compile_s = timed(lambda: compiled(*args))
        case.reset()
        if not torch.equal(compiled(*args), eager_out):
            raise AssertionError("the compiled AFD MoE call returned other values than eager")
        raw_s, eager_s, compiled_s = interleaved(
            [
                (case.reset, case.raw),
                (case.reset, lambda: case.moe_call(*args)),
                (case.reset, lambda: compiled(*args)),
            ],
            CALL_SAMPLES * repeat,
            warmup=5,
        )
    finally:
        case.close()
    raw_t, eager_t, compiled_t = (median(s) for s in (raw_s, eager_s, compiled_s))
    described = (
        f"(H={TINY.hidden}, BS={TINY.tokens}, {TINY.tokens - 2} tokens, K={TINY.topk}; "
        "beyond the raw A2F + combine implementations on pre-padded arguments)"
    )
    common = {"raw_ops_us": raw_t * 1e6, "eager_us": eager_t * 1e6, "compiled_us": compiled_t * 1e6}
    return [
        Row(
            "eager_call_overhead",
            (eager_t - raw_t) * 1e6,
            "us",
            f"padding + torch.ops.afd dispatch of the MoE call, eager {described}",
            dict(common),
        ),
        Row(
            "compiled_call_overhead",
            (compiled_t - raw_t) * 1e6,
            "us",
            f"the same call under torch.compile(fullgraph=True) {described}",
            {**common, "compile_s": compile_s},
        ),
        Row(
            "compiled_vs_eager",
            compiled_t / eager_t,
            "x",
            "time of the compiled MoE call / the eager one (ops included)",
            dict(common),
        ),
    ]
