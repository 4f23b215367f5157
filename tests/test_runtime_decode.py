"""The tiny MoE transformer decoding through AFD equals the same decode computed in place.

Every test: a random-weight `TinyMoEModel` saved with `save_pretrained`; FFN workers (one
thread each, `FFNWorker.run`) load their experts from that checkpoint with `load_banks`;
attention ranks (one thread each, each with its own prompts) decode through an
`AttentionEndpoint`. The reference is `decode` of the same prompts through `ColocatedMoE`,
which computes the MoE block in place in the order combine uses. With `batch_invariant`
experts the two are equal bit for bit (`torch.equal`), in float32 and in bf16.

Sessions hold different numbers of sequences (5, 2, 4, 3), so micro-batches carry
different token counts per session, and with M = 3 session 1 (2 sequences) sends an
empty micro-batch at every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from afd_threads import (
    RankThread,
    config,
    counters_when_served,
    deployment,
    ffn_workers,
    outcomes,
)

from afd_dispatch.fixtures.tiny_moe import ColocatedMoE, TinyMoEConfig, TinyMoEModel, decode
from afd_dispatch.kernels.reference import dequantize_rows, quantize_rows
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.ffn_worker import load_banks

PROMPT_LEN, STEPS = 2, 2  # 2 prompt steps + 2 generated tokens: 4 decode steps
SEQUENCES = (5, 2, 4, 3)  # sequences of session s
BS = 8  # max tokens per micro-batch and session (>= 5 sequences with M = 1)

Checkpoints = Callable[[TinyMoEConfig], tuple[TinyMoEModel, Path]]


def tiny(**changes: Any) -> TinyMoEConfig:
    base: dict[str, Any] = {
        "vocab_size": 32,
        "hidden_size": 32,  # a multiple of 32, as int8 quantization requires
        "num_layers": 2,
        "num_heads": 2,
        "num_experts": 6,
        "topk": 2,
        "moe_intermediate_size": 16,
        "shared_intermediate_size": 24,
        "max_positions": 16,
        "seed": 7,
    }
    base.update(changes)
    return TinyMoEConfig(**base)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """(model, checkpoint directory) per model config, each saved once."""
    cache: dict[TinyMoEConfig, tuple[TinyMoEModel, Path]] = {}

    def get(cfg: TinyMoEConfig) -> tuple[TinyMoEModel, Path]:
        if cfg not in cache:
            model = TinyMoEModel(cfg)
            path = tmp_path_factory.mktemp("tiny_moe")
            model.save_pretrained(path)
            cache[cfg] = (model, path)
        return cache[cfg]

    return get


def prompts_for(model: TinyMoEModel, num_attention_ranks: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    vocab = model.config.vocab_size
    return [
        torch.randint(0, vocab, (SEQUENCES[s], PROMPT_LEN), generator=g)
        for s in range(num_attention_ranks)
    ]


def afd_decode(
    model: TinyMoEModel,
    path: Path,
    prompts: list[torch.Tensor],
    num_ffn_ranks: int,
    dtype: torch.dtype,
    transport: str = "shm",
    **keys: Any,
) -> tuple[list[list[torch.Tensor]], list[dict[str, float]]]:
    """Each session's decode outputs, and each FFN rank's counters (`trace` on)."""
    cfg = config(len(prompts), num_ffn_ranks, max_tokens_per_micro_batch=BS, **keys)
    with (
        deployment(cfg, model.spec, dtype, transport) as dep,
        ffn_workers(dep, lambda rank: load_banks(path, dep, rank, True)) as workers,
    ):

        def session(s: int) -> Callable[[], list[torch.Tensor]]:
            return lambda: decode(
                model, AttentionEndpoint(dep, s), prompts[s], STEPS, cfg.micro_batch_num
            )

        ranks = [RankThread(f"attention-{s}", session(s)) for s in range(len(prompts))]
        for thread in ranks:
            thread.start()
        outputs = outcomes(ranks)
        passes = (PROMPT_LEN + STEPS) * model.config.num_layers * cfg.micro_batch_num
        counters = counters_when_served(workers, passes)
    return outputs, counters


def colocated_decode(
    model: TinyMoEModel,
    prompts: list[torch.Tensor],
    micro_batches: int,
    dtype: torch.dtype,
    quantize_inputs: bool = False,
) -> list[list[torch.Tensor]]:
    moe = ColocatedMoE(model.expert_banks(True), model.spec.num_shared_experts, dtype)
    endpoint = Int8Inputs(moe) if quantize_inputs else moe
    return [decode(model, endpoint, p, STEPS, micro_batches) for p in prompts]


class Int8Inputs:
    """`ColocatedMoE` fed what int8 A2F delivers: each token row quantized, dequantized."""

    def __init__(self, inner: ColocatedMoE) -> None:
        self.inner = inner

    def send(
        self,
        micro_batch: int,
        layer: int,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        q, scale = quantize_rows(hidden.to(torch.float32))
        rows = dequantize_rows(q, scale).to(hidden.dtype)
        self.inner.send(micro_batch, layer, rows, ids, weights)

    def receive(self, micro_batch: int) -> torch.Tensor:
        return self.inner.receive(micro_batch)


def assert_equal_runs(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for s, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == len(w) == PROMPT_LEN + STEPS
        for step, (a, b) in enumerate(zip(g, w, strict=True)):
            assert a.dtype == b.dtype and a.shape == b.shape == (SEQUENCES[s], a.shape[1])
            diff = (a.float() - b.float()).abs().max().item()
            assert torch.equal(a, b), f"session {s} step {step}: max |AFD - colocated| = {diff}"


@dataclass(frozen=True)
class Case:
    num_attention_ranks: int
    num_ffn_ranks: int
    micro_batches: int
    keys: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    transport: str = "shm"


REPLICATED: dict[str, Any] = {"expert_replicas": {0: 2, 3: 2}, "shared_expert_ranks": (2,)}
CASES = {
    # the main case: 2 attention ranks, 3 FFN ranks (rank 2 hosts only the shared expert,
    # experts 0 and 3 on both of ranks 0 and 1), ping-pong over two micro-batches
    "A2-F3-M2": Case(2, 3, 2, REPLICATED),
    # more FFN than attention ranks; the shared expert replicated on ranks 2 and 3
    "A1-F4-M2": Case(
        1,
        4,
        2,
        {"expert_replicas": {1: 2, 4: 2}, "shared_expert_ranks": (2, 3)},
        transport="inproc",
    ),
    # one FFN rank hosting everything, the shared expert included, for 4 attention ranks
    "A4-F1-M2": Case(4, 1, 2),
    "A2-F3-M1": Case(2, 3, 1, REPLICATED, transport="inproc"),
    # three slots in flight; FFN ranks 2..4 (ffn_start_rank_id = 2), attention ranks 0, 1
    "A2-F3-M3-start2": Case(
        2, 3, 3, {"ffn_start_rank_id": 2, "shared_expert_ranks": (4,), "expert_replicas": {5: 2}}
    ),
    # one window group of M = 1 per micro-batch (what A3's F2A requires)
    "A2-F3-M2-per-micro-batch": Case(2, 3, 2, {**REPLICATED, "window_groups": "per_micro_batch"}),
    # a model without a shared expert (Qwen3-MoE layout), every expert on two ranks
    "A2-F3-M2-no-shared": Case(
        2, 3, 2, {"expert_replicas": 2}, model={"shared_intermediate_size": 0}
    ),
    # bf16 model and activations. Exact, not approximate: both runs compute every expert in
    # bf16 on the same bf16 rows (tiles make each row's result independent of its batch),
    # round each expert row to bf16 (F2A carries bf16) and sum in float32 in the same order
    # before one rounding; the attention side runs the same bf16 code on the same inputs.
    "A2-F3-M2-bf16": Case(
        2, 3, 2, REPLICATED, model={"dtype": torch.bfloat16}, dtype=torch.bfloat16
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_afd_decode_equals_colocated(case: Case, checkpoints: Checkpoints) -> None:
    model, path = checkpoints(tiny(**case.model))
    prompts = prompts_for(model, case.num_attention_ranks)
    got, counters = afd_decode(
        model,
        path,
        prompts,
        case.num_ffn_ranks,
        case.dtype,
        case.transport,
        micro_batch_num=case.micro_batches,
        trace=True,
        **case.keys,
    )
    assert_equal_runs(got, colocated_decode(model, prompts, case.micro_batches, case.dtype))
    # the work went through the FFN ranks: each served every (step, layer, micro-batch)
    # (sync_flag 0 sends every header to every rank), and together they computed each
    # token's K routed rows and its shared row, once, at every layer and step
    passes = (PROMPT_LEN + STEPS) * model.config.num_layers
    slots = model.config.topk + model.spec.num_shared_experts
    assert [c["micro_batches_served_total"] for c in counters] == [
        passes * case.micro_batches
    ] * case.num_ffn_ranks
    rows = sum(c.get("rows_served_total", 0.0) for c in counters)
    assert rows == sum(SEQUENCES[: case.num_attention_ranks]) * slots * passes


def test_int8_decode(checkpoints: Checkpoints) -> None:
    """int8 A2F: exactly the colocated run on int8-rounded MoE inputs; near the float run.

    Exact part: the one thing int8 changes is that each MoE input row reaches the experts
    as q * scale (per-token int8). `Int8Inputs` applies the same rounding to the colocated
    run, and everything else is the float32 computation above, so equality is exact.

    Tolerance against the float run: rounding moves each input element by at most half a
    step, amax / 254, a relative error <= 1/254 = 0.39 % of the row's largest entry. The
    MoE block (RMSNorm'd inputs, weights scaled 1/sqrt(fan-in)) has a gain of order 1, its
    output is added to a residual stream every later layer and step re-normalises, so
    errors add up over the L = 2 MoE layers (and through the KV cache over the steps)
    rather than compound. We allow 4 * L / 254 (3.1 %) of the hidden states' largest
    magnitude per step; measured 0.78 %. The generated tokens must be the float run's
    (they are for this seed; a flipped token would make later steps incomparable, not
    show a runtime bug), and the error must be nonzero (int8 really was applied).
    """
    model, path = checkpoints(tiny())
    prompts = prompts_for(model, 2)
    got, _ = afd_decode(
        model,
        path,
        prompts,
        3,
        torch.float32,
        micro_batch_num=2,
        quant_mode="int8",
        **REPLICATED,
    )
    assert_equal_runs(got, colocated_decode(model, prompts, 2, torch.float32, True))

    float_run = colocated_decode(model, prompts, 2, torch.float32)
    tolerance = 4 * model.config.num_layers / 254
    head = model.weights["lm_head.weight"]
    worst = 0.0
    for g, w in zip(got, float_run, strict=True):
        for a, b in zip(g, w, strict=True):
            rel = ((a - b).abs().max() / b.abs().max()).item()
            worst = max(worst, rel)
            assert torch.equal((a @ head.T).argmax(-1), (b @ head.T).argmax(-1))
    assert 0 < worst <= tolerance, f"relative error {worst:.2e}, tolerance {tolerance:.2e}"
