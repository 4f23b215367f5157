"""What a plan is: the per-layer budget of one micro-batch (`LayerBudget`, its `Phase`s),
what a step costs besides the MoE layers (`StepTerms`), and an AFD layout priced (`Plan`)
with what it reports. The formulas that fill them are in `cost`; `docs/planner.md` writes
them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from afd_dispatch.planner.memory import DieMemory
from afd_dispatch.planner.shape import (
    AFDLayout,
    Precision,
    Workload,
)


# -- the budget of one layer ----------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One phase of one micro-batch in one MoE layer: its time, what bounds it, the inputs."""

    name: str
    seconds: float
    bound: str
    detail: str


@dataclass(frozen=True)
class LayerBudget:
    """The five phases of one micro-batch in one MoE layer, and the pipelined period."""

    attention: Phase
    a2f: Phase
    ffn: Phase
    f2a: Phase
    combine: Phase
    micro_batches: int

    @property
    def phases(self) -> tuple[Phase, ...]:
        return (self.attention, self.a2f, self.ffn, self.f2a, self.combine)

    @property
    def attention_busy(self) -> float:
        """M * (t_attn + t_comb): the attention die's work per layer."""
        return self.micro_batches * (self.attention.seconds + self.combine.seconds)

    @property
    def ffn_busy(self) -> float:
        """M * t_ffn: the FFN die's work per layer."""
        return self.micro_batches * self.ffn.seconds

    @property
    def round_trip(self) -> float:
        """t_attn + t_a2f + t_ffn + t_f2a + t_comb: one micro-batch through the layer."""
        return sum(p.seconds for p in self.phases)

    @property
    def period(self) -> float:
        """T_layer = max(attention busy, FFN busy, round trip)."""
        return max(self.attention_busy, self.ffn_busy, self.round_trip)

    @property
    def limiter(self) -> str:
        """Which term sets the period."""
        terms = {
            "attention": self.attention_busy,
            "ffn": self.ffn_busy,
            "round trip": self.round_trip,
        }
        return max(terms, key=lambda k: terms[k])


@dataclass(frozen=True)
class StepTerms:
    """What a decode step costs besides its MoE layers' period: the same for an AFD plan
    and the EP baseline (`step_seconds`)."""

    moe_layers: int
    dense_layers: int
    dense_layer_s: float
    head_s: float
    step_overhead_s: float

    def step_seconds(self, period: float, micro_batches: int) -> float:
        """T_step = L_moe * T_layer + L_dense * M * t_dense + M * t_head + t_step."""
        m = micro_batches
        return (
            self.moe_layers * period
            + self.dense_layers * m * self.dense_layer_s
            + m * self.head_s
            + self.step_overhead_s
        )


@dataclass(frozen=True)
class Plan:
    """The model's answer for one layout: the layer budget, step time, memory, windows."""

    model: str
    hardware: str
    precision: Precision
    workload: Workload
    layout: AFDLayout
    budget: LayerBudget
    steps: StepTerms
    topk: int
    shared_slots: int
    hccl_buffsize_mb: int
    attention_memory: DieMemory
    ffn_memory: DieMemory
    usable_memory_gb: float
    experts_per_ffn_die: int
    active_experts_per_ffn_die: float
    weight_split: str = "experts"

    @property
    def step_s(self) -> float:
        """`StepTerms.step_seconds` with this plan's layer period and micro-batches."""
        return self.steps.step_seconds(self.budget.period, self.layout.micro_batches)

    @property
    def tpot_s(self) -> float:
        """Time per output token: every sequence gets one token per step."""
        return self.step_s

    @property
    def sequences_per_attention_die(self) -> int:
        return self.layout.micro_batches * self.layout.tokens

    @property
    def throughput_per_die(self) -> float:
        """A * M * BS / T_step / (A + F): decode tokens per second per deployed die."""
        lay = self.layout
        return lay.num_attention_ranks * self.sequences_per_attention_die / self.step_s / lay.dies

    @property
    def ffn_tokens_per_step(self) -> float:
        """A * M * BS / F: tokens per FFN die per step (the afd-plugin recipe's "FFN BS")."""
        lay = self.layout
        return lay.num_attention_ranks * self.sequences_per_attention_die / lay.num_ffn_ranks

    @property
    def ffn_rows_per_micro_batch(self) -> float:
        """A * BS * K / F_r: routed rows one FFN die's grouped GEMM gets per micro-batch."""
        lay = self.layout
        return lay.num_attention_ranks * lay.tokens * self.topk / lay.routed_dies

    @property
    def attention_memory_gb(self) -> float:
        """HBM an attention die fills, GB (1e9 bytes): `DieMemory.total` of its terms."""
        return self.attention_memory.total / 1e9

    @property
    def ffn_memory_gb(self) -> float:
        """HBM the fullest FFN die fills, GB (1e9 bytes)."""
        return self.ffn_memory.total / 1e9

    @property
    def fits(self) -> bool:
        """Whether every die's memory terms fit in its usable HBM
        (`HardwareProfile.usable_hbm_bytes`)."""
        return max(self.attention_memory_gb, self.ffn_memory_gb) <= self.usable_memory_gb

    def afd_config(self) -> dict[str, Any]:
        """The `--afd-config` object for this plan (one window group per micro-batch, as the
        A3 F2A op needs M = 1 per group; shared expert on the last ``shared_dies`` FFN
        ranks, or on the attention side)."""
        lay = self.layout
        config: dict[str, Any] = {
            "num_attention_ranks": lay.num_attention_ranks,
            "num_ffn_ranks": lay.num_ffn_ranks,
            "micro_batch_num": lay.micro_batches,
            "max_tokens_per_micro_batch": lay.tokens,
            "quant_mode": "int8" if self.precision.a2f == "int8" else "none",
            "window_groups": "per_micro_batch",
            "hccl_buffsize_mb": self.hccl_buffsize_mb,
            "backend": "npu",
        }
        if lay.shared_dies:
            config["shared_expert_ranks"] = list(range(lay.routed_dies, lay.num_ffn_ranks))
        elif self.shared_slots:
            config["shared_experts_on"] = "attention"
        return config

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form (times in ms, memory in GB)."""
        lay = self.layout
        return {
            "model": self.model,
            "hardware": self.hardware,
            "precision": vars(self.precision).copy(),
            "context": self.workload.context,
            "mean_context": self.workload.mean_context,
            "num_attention_ranks": lay.num_attention_ranks,
            "num_ffn_ranks": lay.num_ffn_ranks,
            "shared_expert_dies": lay.shared_dies,
            "micro_batches": lay.micro_batches,
            "bs_per_micro_batch": lay.tokens,
            "sequences_per_attention_die": self.sequences_per_attention_die,
            "ffn_tokens_per_step": self.ffn_tokens_per_step,
            "ffn_rows_per_micro_batch": self.ffn_rows_per_micro_batch,
            "experts_per_ffn_die": self.experts_per_ffn_die,
            "active_experts_per_ffn_die": self.active_experts_per_ffn_die,
            "hccl_buffsize_mb": self.hccl_buffsize_mb,
            "tpot_ms": self.tpot_s * 1e3,
            "throughput_per_die": self.throughput_per_die,
            "step_ms": self.step_s * 1e3,
            "layer": {
                **{p.name: p.seconds * 1e3 for p in self.budget.phases},
                "period": self.budget.period * 1e3,
                "limiter": self.budget.limiter,
            },
            "layer_bounds": {p.name: p.bound for p in self.budget.phases},
            "dense_layer_ms": self.steps.dense_layer_s * 1e3,
            "head_ms": self.steps.head_s * 1e3,
            "moe_layers": self.steps.moe_layers,
            "dense_layers": self.steps.dense_layers,
            "memory_gb": {
                "attention_die": self.attention_memory_gb,
                "ffn_die": self.ffn_memory_gb,
                "usable": self.usable_memory_gb,
                "weight_split": self.weight_split,
                "attention_die_terms": self.attention_memory.terms_gb(),
                "ffn_die_terms": self.ffn_memory.terms_gb(),
            },
            "afd_config": self.afd_config(),
        }
