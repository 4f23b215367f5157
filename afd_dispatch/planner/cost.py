"""The per-layer time model of an AFD deployment: roofline formulas for one MoE layer, the
micro-batch pipeline, and `evaluate`, which prices one layout (memory: `memory`).

Every formula here is written out, with its symbols, in `docs/planner.md`; the names below
follow it. Times are seconds, sizes bytes, rates per second. One *step* is one decode
iteration: every sequence on every attention die gets one new token.

The model, in one paragraph: an attention die holds M micro-batches of BS sequences each.
For each MoE layer and micro-batch it reads the layer's attention weights and the KV cache
of its BS sequences (time `t_attn`), sends every token's E = K + S expert rows to the FFN
dies (A2F, `t_a2f`), the FFN dies run their experts (`t_ffn`), send the rows back (F2A,
`t_f2a`) and the attention die sums them (`t_comb`). With M micro-batches in flight the
attention and FFN dies work on different micro-batches at once, so a layer takes

    T_layer = max(M * (t_attn + t_comb), M * t_ffn, t_attn + t_a2f + t_ffn + t_f2a + t_comb)

(each die's busy time, or one micro-batch's round trip, whichever is longer; with M = 1
the round trip is the sum of the phases). TPOT is the step time; throughput per die is
A * M * BS tokens per step over all A + F dies. A layout fits when every die's weights,
embedding, KV cache pool and windows (`DieMemory`) fit in its usable HBM
(`HardwareProfile.usable_hbm_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from afd_dispatch.layout import WindowLayout, a3_attn_to_ffn_token_size
from afd_dispatch.planner.hardware import HardwareProfile
from afd_dispatch.planner.memory import attention_die_memory, ffn_die_memory
from afd_dispatch.planner.plan import LayerBudget, Phase, Plan, StepTerms
from afd_dispatch.planner.shape import (
    HEAD_BYTES,
    RESULT_BYTES,
    AFDLayout,
    ModelShape,
    Precision,
    Workload,
)


def roofline(name: str, nbytes: float, flops: float, hw: HardwareProfile, rate: float) -> Phase:
    """max(bytes / B_hbm, flops / P): a kernel streams its bytes while it computes."""
    t_mem, t_cmp = nbytes / hw.hbm_bytes_per_s, flops / rate
    bound = "HBM" if t_mem >= t_cmp else "compute"
    detail = f"{nbytes / 1e6:.1f} MB, {flops / 1e9:.1f} GFLOP"
    return Phase(name, max(t_mem, t_cmp), bound, detail)


def link(name: str, nbytes: float, hw: HardwareProfile) -> Phase:
    """lambda + bytes / B_ic, bytes = the larger of what one die sends and one receives."""
    t = hw.message_latency_us * 1e-6 + nbytes / hw.link_bytes_per_s
    bound = "latency" if hw.message_latency_us * 1e-6 >= nbytes / hw.link_bytes_per_s else "link"
    return Phase(name, t, bound, f"{nbytes / 1e6:.2f} MB per die")


def _with_overhead(phase: Phase, hw: HardwareProfile) -> Phase:
    return replace(phase, seconds=phase.seconds + hw.layer_overhead_us * 1e-6)


def _weight_rate(hw: HardwareProfile, precision: Precision) -> float:
    return hw.int8_ops if precision.weights == "int8" else hw.bf16_flops


def active_experts(local: int, num_experts: int, topk: int, tokens: float) -> float:
    """Expected experts of one die that at least one of ``tokens`` tokens picks.

    Each token picks ``topk`` of ``num_experts``, so one expert stays idle with probability
    ``(1 - K/N) ** tokens``; a die hosting ``local`` experts reads the weights of
    ``local * (1 - (1 - K/N) ** tokens)`` of them (uniform routing assumed).
    """
    idle = (1.0 - topk / num_experts) ** tokens
    return local * (1.0 - idle)


def attention_phase(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    context: float,
    tokens: int,
    *,
    shared_here: bool,
    dense_mlp: bool = False,
) -> Phase:
    """t_attn for one micro-batch of ``tokens`` sequences in one layer.

    Bytes: the layer's attention weights (plus the router, plus the shared expert when the
    attention die runs it, plus the dense MLP on a dense layer) once, and every sequence's
    KV reads. Compute: 2 FLOPs per weight per token at the weight rate, plus the attention
    products at the bf16 rate. ``t_attn = max(bytes / B_hbm, compute) + BS * o_seq + o_layer``.
    """
    a = shape.attention
    params = a.params(shape.hidden)
    if dense_mlp:
        params += shape.dense_mlp_params
    else:
        params += shape.router_params + (shape.shared_params if shared_here else 0)
    kv = tokens * a.kv_bytes_read(context, precision.kv_bytes)
    nbytes = params * precision.weight_bytes + kv
    t_mem = nbytes / hw.hbm_bytes_per_s
    t_cmp = 2.0 * tokens * params / _weight_rate(hw, precision)
    t_cmp += tokens * a.core_flops(context) / hw.bf16_flops
    detail = f"KV {kv / 1e6:.1f} MB + weights {params * precision.weight_bytes / 1e6:.0f} MB"
    seconds = max(t_mem, t_cmp) + tokens * hw.sequence_overhead_us * 1e-6
    phase = Phase("attention", seconds, "HBM" if t_mem >= t_cmp else "compute", detail)
    return _with_overhead(phase, hw)


def expert_phase(
    name: str,
    hw: HardwareProfile,
    precision: Precision,
    *,
    rows: float,
    weights: float,
    params_per_row: int,
    row_bytes: int,
    hidden: int,
) -> Phase:
    """t_ffn of one FFN die: max(weights read, GEMM) plus the rows' own traffic.

    ``weights`` are the parameters the die reads (its active experts), each row costs
    ``2 * params_per_row`` FLOPs, and each row is read once as it arrived (``row_bytes``)
    and written back once in bf16.
    """
    nbytes = weights * precision.weight_bytes + rows * (row_bytes + hidden * RESULT_BYTES)
    flops = 2.0 * rows * params_per_row
    return _with_overhead(roofline(name, nbytes, flops, hw, _weight_rate(hw, precision)), hw)


def window_layout(
    shape: ModelShape, precision: Precision, layout: AFDLayout, shared_slots: int
) -> WindowLayout:
    """The layout of one window group, exactly as the runtime's `Deployment` builds it for
    A3 (backend "npu", ``window_groups = "per_micro_batch"``: one group of M = 1 per
    micro-batch, slots of A3 callers' 512-aligned stride)."""
    quant = precision.a2f == "int8"
    return WindowLayout(
        num_attention_ranks=layout.num_attention_ranks,
        micro_batches=1,
        tokens=layout.tokens,
        topk=shape.moe.topk,
        shared=shared_slots,
        hidden=shape.hidden,
        dtype=torch.bfloat16,
        quant=quant,
        attn_to_ffn_token_size=a3_attn_to_ffn_token_size(shape.hidden, torch.bfloat16, quant),
    )


def step_terms(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    context: float,
    tokens: int,
) -> StepTerms:
    """A dense layer and the lm_head for a micro-batch of `tokens` sequences."""
    dense = attention_phase(shape, hw, precision, context, tokens, shared_here=False,
                            dense_mlp=True)  # fmt: skip
    head = roofline(
        "head",
        shape.vocab_size * shape.hidden * HEAD_BYTES,
        2.0 * tokens * shape.vocab_size * shape.hidden,
        hw,
        hw.bf16_flops,
    )
    return StepTerms(
        moe_layers=shape.num_moe_layers,
        dense_layers=shape.num_dense_layers,
        dense_layer_s=dense.seconds,
        head_s=head.seconds,
        step_overhead_s=hw.step_overhead_ms * 1e-3,
    )


def evaluate(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    workload: Workload,
    layout: AFDLayout,
    *,
    active_experts_override: float | None = None,
    weight_split: str = "experts",
) -> Plan:
    """Price one AFD layout: the layer budget, the step, memory and HCCL_BUFFSIZE.

    ``weight_split`` (`WEIGHT_SPLITS`) says which dies hold the router, the dense layers'
    MLPs and the shared expert; it changes the memory check only. The phase times always
    price them where this project's runtime runs them (``"experts"``): on the attention
    die, or the shared expert on dedicated FFN dies.
    """
    moe = shape.moe
    h, k, n = shape.hidden, moe.topk, moe.num_experts
    a, bs, m = layout.num_attention_ranks, layout.tokens, layout.micro_batches
    f_r, f_s = layout.routed_dies, layout.shared_dies
    s = moe.num_shared_experts if f_s else 0  # shared slots sent over A2F
    shared_on_attention = moe.num_shared_experts > 0 and not f_s
    ctx = workload.mean_context
    # A3's combine needs one shared slot: without one on the FFN side a null slot travels
    # (as the runtime's NPU link sends it), so the windows always have K + 1 slots.
    win = window_layout(shape, precision, layout, max(s, 1))
    e = win.slots

    attn = attention_phase(shape, hw, precision, ctx, bs, shared_here=shared_on_attention)
    combine = roofline(
        "combine", bs * e * h * RESULT_BYTES + bs * h * RESULT_BYTES, 0.0, hw, hw.bf16_flops
    )

    routed_rows = a * bs * k / f_r
    shared_rows = a * bs * s / f_s if f_s else 0.0
    a2f_in = max(routed_rows, shared_rows) * win.attn_to_ffn_token_size
    a2f = link("a2f", max(bs * e * win.attn_to_ffn_token_size, a2f_in), hw)
    f2a_out = max(routed_rows, shared_rows) * win.ffn_to_attn_token_size
    f2a = link("f2a", max(f2a_out, bs * e * win.ffn_to_attn_token_size), hw)

    local = max(1, math.ceil(n / f_r))
    copies = max(1, f_r // n)  # replicas of an expert when F_r > N: attention ranks split over them
    if active_experts_override is not None:
        active = float(active_experts_override)
    else:
        active = active_experts(local, n, k, a * bs / copies)
    common = {"row_bytes": win.attn_to_ffn_token_size, "hidden": h}
    ffn = expert_phase(
        "ffn",
        hw,
        precision,
        rows=routed_rows,
        weights=active * shape.expert_params,
        params_per_row=shape.expert_params,
        **common,
    )
    if f_s:
        shared = expert_phase(
            "ffn",
            hw,
            precision,
            rows=shared_rows,
            weights=float(shape.shared_params),
            params_per_row=shape.shared_params,
            **common,
        )
        if shared.seconds > ffn.seconds:
            ffn = replace(shared, detail=shared.detail + " (shared-expert die)")

    buffsize = win.hccl_buffsize_mb
    windows = float(m * buffsize * 2**20)  # each micro-batch's group reserves HCCL_BUFFSIZE
    attn_mem = attention_die_memory(
        shape,
        precision,
        workload,
        sequences=m * bs,
        shared_here=shared_on_attention,
        windows=windows,
        weight_split=weight_split,
    )
    ffn_mem = ffn_die_memory(
        shape,
        precision,
        local_experts=local,
        shared_dies=f_s,
        windows=windows,
        weight_split=weight_split,
    )

    return Plan(
        model=shape.name,
        hardware=hw.name,
        precision=precision,
        workload=workload,
        layout=layout,
        budget=LayerBudget(attn, a2f, ffn, f2a, combine, m),
        steps=step_terms(shape, hw, precision, ctx, bs),
        topk=k,
        shared_slots=s,
        hccl_buffsize_mb=buffsize,
        attention_memory=attn_mem,
        ffn_memory=ffn_mem,
        usable_memory_gb=hw.usable_hbm_bytes / 1e9,
        experts_per_ffn_die=local,
        active_experts_per_ffn_die=active,
        weight_split=weight_split,
    )
