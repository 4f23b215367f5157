"""The loop level's synthetic MoE model and what its cases share: the shapes, random
expert banks and routing, an A = 1, F = 1 reference configuration per run, the timeouts,
and ending a helper process."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.checkpoint import ExpertWeights
from afd_dispatch.runtime.experts import ExpertBank

WAIT_TIMEOUT_S = 60.0
START_TIMEOUT_S = 180.0  # spawning an interpreter that imports torch, on a busy host
JOIN_TIMEOUT_S = 30.0
names = itertools.count()


@dataclass(frozen=True)
class MoEShape:
    """A synthetic MoE model: L layers, all MoE, float32, no shared expert."""

    hidden: int  # H
    tokens: int  # tokens per step on the attention rank (all in one micro-batch at M = 1)
    topk: int  # K
    experts: int
    intermediate: int  # SwiGLU width of every expert
    layers: int

    def spec(self) -> MoESpec:
        return MoESpec(
            architecture="qwen3_moe",
            hidden_size=self.hidden,
            num_layers=self.layers,
            moe_layers=tuple(range(self.layers)),
            num_experts=self.experts,
            topk=self.topk,
            moe_intermediate_size=self.intermediate,
            dtype=torch.float32,
        )


# (a) and (c): tiny, so the ops' own work is small next to the host code around them.
TINY = MoEShape(hidden=64, tokens=8, topk=2, experts=4, intermediate=32, layers=4)
# (b): enough work per layer that AFD's per-message cost is a small part of a step. Two
# experts, top-2: each expert gets every token, so its matmuls keep a size where their cost
# stays about linear in the rows when a step is split into M micro-batches (with 8 experts
# of 32-64 rows, splitting alone cost the experts +40% at M = 2 on the CPU: a property of
# small matmuls, not of the AFD pipeline this measures).
PIPELINE_SHAPES = {
    "small": MoEShape(hidden=256, tokens=96, topk=2, experts=2, intermediate=256, layers=2),
    "decode": MoEShape(hidden=1024, tokens=384, topk=2, experts=2, intermediate=512, layers=4),
}


def make_banks(shape: MoEShape, seed: int = 0) -> dict[int, ExpertBank]:
    """Every layer's routed experts, random SwiGLU weights (1/sqrt(fan_in) scale)."""
    gen = torch.Generator().manual_seed(seed)
    h, i = shape.hidden, shape.intermediate

    def rand(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / math.sqrt(cols)

    return {
        layer: ExpertBank(
            shape.experts,
            {e: ExpertWeights(rand(i, h), rand(i, h), rand(h, i)) for e in range(shape.experts)},
        )
        for layer in range(shape.layers)
    }


def config_for(shape: MoEShape, micro_batches: int, tokens_per_slot: int) -> AFDConfig:
    """A = 1, F = 1, reference backend, under a group name no other run uses."""
    return AFDConfig(
        num_attention_ranks=1,
        num_ffn_ranks=1,
        micro_batch_num=micro_batches,
        max_tokens_per_micro_batch=tokens_per_slot,
        backend="reference",
        group=f"afdbench{os.getpid()}x{next(names)}",
        wait_timeout_s=WAIT_TIMEOUT_S,
    )


def routing(tokens: int, shape: MoEShape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (tokens, K) int32 distinct per token, weights (tokens, K) float32 summing to 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, shape.experts, generator=gen).argsort(dim=1)[:, : shape.topk]
    weights = torch.rand(tokens, shape.topk, generator=gen) + 0.1
    return ids.to(torch.int32).contiguous(), weights / weights.sum(dim=1, keepdim=True)


def end_process(proc: BaseProcess) -> None:
    """Wait for a bench's helper process to end (its work was stopped), killing it if it
    does not within JOIN_TIMEOUT_S."""
    proc.join(JOIN_TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join(JOIN_TIMEOUT_S)
