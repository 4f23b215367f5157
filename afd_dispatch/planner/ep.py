"""The expert-parallel baseline without AFD: D dies each running attention and N / D
experts, priced with the same formulas (`evaluate_ep`) and sized as `search` sizes BS
(`search_ep`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from afd_dispatch.layout import MAX_TOKENS_PER_MICRO_BATCH
from afd_dispatch.planner.cost import (
    active_experts,
    attention_phase,
    expert_phase,
    link,
    roofline,
    step_terms,
)
from afd_dispatch.planner.hardware import HardwareProfile
from afd_dispatch.planner.memory import DieMemory, ep_die_memory
from afd_dispatch.planner.plan import LayerBudget, StepTerms
from afd_dispatch.planner.search import Target, largest, smallest
from afd_dispatch.planner.shape import (
    BYTES,
    RESULT_BYTES,
    ModelShape,
    Precision,
    Workload,
)


# -- the colocated baseline ---------------------------------------------------------------------
@dataclass(frozen=True)
class EPPlan:
    """Expert parallelism without AFD: D dies, each runs attention and N / D experts."""

    dies: int
    micro_batches: int
    tokens: int
    budget: LayerBudget
    steps: StepTerms
    memory: DieMemory
    usable_memory_gb: float

    @property
    def memory_gb(self) -> float:
        """HBM one die fills, GB (1e9 bytes): `DieMemory.total` of `ep_die_memory`."""
        return self.memory.total / 1e9

    @property
    def step_s(self) -> float:
        """As `Plan.step_s`; the layer period's busy terms share one die."""
        return self.steps.step_seconds(self.period, self.micro_batches)

    @property
    def period(self) -> float:
        """max(M * (t_attn + t_ffn + t_comb), round trip): attention and experts share a die."""
        b = self.budget
        busy = self.micro_batches * (b.attention.seconds + b.ffn.seconds + b.combine.seconds)
        return max(busy, b.round_trip)

    @property
    def throughput_per_die(self) -> float:
        return self.micro_batches * self.tokens / self.step_s

    @property
    def fits(self) -> bool:
        return self.memory_gb <= self.usable_memory_gb


def evaluate_ep(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    workload: Workload,
    *,
    dies: int,
    tokens: int,
    micro_batches: int = 1,
    active_experts_override: float | None = None,
) -> EPPlan:
    """Price the colocated EP deployment with the same formulas: the dispatch carries K
    rows per token (the shared expert runs locally), each die's experts get ``BS * K``
    rows when routing is balanced."""
    moe = shape.moe
    h, k, n = shape.hidden, moe.topk, moe.num_experts
    ctx = workload.mean_context
    shared = moe.num_shared_experts > 0
    attn = attention_phase(shape, hw, precision, ctx, tokens, shared_here=shared)
    row_in = h + 128 if precision.a2f == "int8" else h * BYTES[precision.a2f]
    dispatch = link("a2f", tokens * k * row_in, hw)
    back = link("f2a", tokens * k * h * RESULT_BYTES, hw)
    local = max(1, math.ceil(n / dies))
    active = (
        float(active_experts_override)
        if active_experts_override is not None
        else active_experts(local, n, k, dies * tokens)
    )
    ffn = expert_phase(
        "ffn",
        hw,
        precision,
        rows=float(tokens * k),
        weights=active * shape.expert_params,
        params_per_row=shape.expert_params,
        row_bytes=row_in,
        hidden=h,
    )
    combine = roofline("combine", tokens * (k + 2) * h * RESULT_BYTES, 0.0, hw, hw.bf16_flops)
    mem = ep_die_memory(
        shape, precision, workload, local_experts=local, sequences=micro_batches * tokens
    )
    return EPPlan(
        dies=dies,
        micro_batches=micro_batches,
        tokens=tokens,
        budget=LayerBudget(attn, dispatch, ffn, back, combine, micro_batches),
        steps=step_terms(shape, hw, precision, ctx, tokens),
        memory=mem,
        usable_memory_gb=hw.usable_hbm_bytes / 1e9,
    )


def search_ep(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    workload: Workload,
    target: Target,
    *,
    dies: int,
    max_tokens: int = MAX_TOKENS_PER_MICRO_BATCH,
) -> EPPlan | None:
    """The colocated EP baseline on ``dies`` dies (M = 1), BS picked as `search` picks it."""
    cache: dict[int, EPPlan] = {}

    def priced(bs: int) -> EPPlan:
        if bs not in cache:
            cache[bs] = evaluate_ep(shape, hw, precision, workload, dies=dies, tokens=bs)
        return cache[bs]

    def fits(bs: int) -> bool:
        return priced(bs).fits

    def within(bs: int) -> bool:
        return target.tpot_s is None or priced(bs).step_s <= target.tpot_s

    def reaches(bs: int) -> bool:
        goal = target.throughput_per_die
        return goal is None or priced(bs).throughput_per_die >= goal

    bs = largest(fits, max_tokens)
    if bs and target.tpot_s is not None:
        bs = largest(within, bs)
    elif bs and target.throughput_per_die is not None:
        bs = smallest(reaches, bs)
    return priced(bs) if bs else None
