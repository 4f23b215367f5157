"""The NPU link end to end on the torch_npu + HCCL emulator, ranks in separate processes.

Two attention processes and two FFN processes (the shared expert on FFN rank 1) set up one
HCCL communicator per micro-batch slot through a TCP rendezvous, register their windows,
make their schedule contexts through torch_npu's holder and decode a tiny Qwen2-MoE-like
model with H = 2880 (2H = 5760 is not a multiple of 512: slots are align512 strides) in
bf16, M = 2. The result equals the colocated model bit for bit (batch-invariant experts)
and the reference link's run; with int8 A2F it equals the reference link's int8 run and
the colocated model fed int8-rounded inputs. A model without shared experts rides a null
shared slot.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
from pathlib import Path
from typing import Any

import pytest
import torch
from afd_threads import RankThread, deployment, ffn_workers, outcomes
from npu_ranks import run_rank
from test_runtime_decode import Int8Inputs

from afd_dispatch import AFDConfig
from afd_dispatch.fixtures.tiny_moe import ColocatedMoE, TinyMoEConfig, TinyMoEModel, decode
from afd_dispatch.link.npu import serve_rendezvous
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.ffn_worker import load_banks

A, F, M, BS = 2, 2, 2, 4
PROMPT_LEN, STEPS = 2, 1
SEQUENCES = (3, 2)
TIMEOUT_S = 120.0
MODEL = TinyMoEConfig(
    vocab_size=32,
    hidden_size=2880,
    num_layers=2,
    num_heads=2,
    num_experts=4,
    topk=2,
    moe_intermediate_size=16,
    shared_intermediate_size=24,
    max_positions=16,
    dtype=torch.bfloat16,
    seed=5,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyMoEModel, Path]:
    model = TinyMoEModel(MODEL)
    path = tmp_path_factory.mktemp("tiny_npu")
    model.save_pretrained(path)
    return model, path


def prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, MODEL.vocab_size, (n, PROMPT_LEN), generator=g) for n in SEQUENCES]


def config_json(backend: str, **keys: Any) -> str:
    cfg = {
        "num_attention_ranks": A,
        "num_ffn_ranks": F,
        "micro_batch_num": M,
        "max_tokens_per_micro_batch": BS,
        "shared_expert_ranks": [F - 1],
        "backend": backend,
        "window_groups": "per_micro_batch",
        "batch_invariant": True,
        "wait_timeout_s": 60,
        "startup_timeout_s": 60,
        **keys,
    }
    import json

    return json.dumps(cfg)


def npu_decode(
    path: Path, model_cfg: TinyMoEConfig = MODEL, **keys: Any
) -> list[list[torch.Tensor]]:
    """Each session's outputs, every rank in its own process on the emulator."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    stop = ctx.Event()
    rendezvous, store = serve_rendezvous()
    cfg = config_json("npu", **keys)
    common = (cfg, model_cfg, str(path), "bfloat16", rendezvous)
    procs = []
    for s, p in enumerate(prompts()):
        args = ("attention", s, *common, p, STEPS, results, stop, TIMEOUT_S)
        procs.append(ctx.Process(target=run_rank, args=args, daemon=True))
    for r in range(F):
        args = ("ffn", r, *common, None, 0, results, stop, TIMEOUT_S)
        procs.append(ctx.Process(target=run_rank, args=args, daemon=True))
    for proc in procs:
        proc.start()
    outputs: dict[int, list[torch.Tensor]] = {}
    try:
        while len(outputs) < A:
            role, index, value = results.get(timeout=TIMEOUT_S)
            if isinstance(value, BaseException):
                raise AssertionError(f"{role} rank {index} failed") from value
            assert role == "attention", (role, index, value)
            outputs[index] = [
                torch.from_numpy(a).view(getattr(torch, d.removeprefix("torch."))) for d, a in value
            ]
        stop.set()
        for _ in range(F):
            role, index, value = results.get(timeout=TIMEOUT_S)
            assert value == "stopped", (role, index, value)
    except queue.Empty:
        raise AssertionError(f"no answer from the ranks within {TIMEOUT_S} s") from None
    finally:
        stop.set()
        for proc in procs:
            proc.join(TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
        del store
    assert all(proc.exitcode == 0 for proc in procs), [p.exitcode for p in procs]
    return [outputs[s] for s in range(A)]


def reference_decode(model: TinyMoEModel, path: Path, **keys: Any) -> list[list[torch.Tensor]]:
    """The same deployment through the reference link (ranks as threads, shared memory)."""
    cfg = AFDConfig.from_json(config_json("reference", **keys))
    with (
        deployment(cfg, model.spec, torch.bfloat16, "shm") as dep,
        ffn_workers(dep, lambda rank: load_banks(path, dep, rank, True)),
    ):
        ranks = [
            RankThread(
                f"attention-{s}",
                lambda s=s, p=p: decode(model, AttentionEndpoint(dep, s), p, STEPS, M),
            )
            for s, p in enumerate(prompts())
        ]
        for thread in ranks:
            thread.start()
        return outcomes(ranks)


def test_npu_link_decode_equals_colocated_and_the_reference_link(
    checkpoint: tuple[TinyMoEModel, Path],
) -> None:
    model, path = checkpoint
    got = npu_decode(path)
    moe = ColocatedMoE(model.expert_banks(True), model.spec.num_shared_experts, torch.bfloat16)
    want = [decode(model, moe, p, STEPS, M) for p in prompts()]
    reference = reference_decode(model, path)
    for s in range(A):
        assert len(got[s]) == PROMPT_LEN + STEPS
        for step, (g, w, r) in enumerate(zip(got[s], want[s], reference[s], strict=True)):
            assert torch.equal(g, w), f"session {s} step {step}: NPU link != colocated"
            assert torch.equal(r, w), f"session {s} step {step}: reference link != colocated"


def test_npu_link_int8_equals_the_reference_links_int8(
    checkpoint: tuple[TinyMoEModel, Path],
) -> None:
    model, path = checkpoint
    got = npu_decode(path, quant_mode="int8")
    reference = reference_decode(model, path, quant_mode="int8")
    # and exactly the colocated model fed what int8 A2F delivers (q * scale per token row),
    # the int8 bound of tests/test_runtime_decode.py
    moe = ColocatedMoE(model.expert_banks(True), model.spec.num_shared_experts, torch.bfloat16)
    want = [decode(model, Int8Inputs(moe), p, STEPS, M) for p in prompts()]
    for s in range(A):
        for step, (g, r, w) in enumerate(zip(got[s], reference[s], want[s], strict=True)):
            assert torch.equal(g, r), f"session {s} step {step}: int8 NPU link != reference"
            assert torch.equal(g, w), f"session {s} step {step}: int8 NPU link != colocated"


def test_a_model_without_shared_experts_rides_a_null_shared_slot(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A3's combine needs one shared slot (E = K + 1): the NPU link carries a null expert
    # (output 0) there, and the decode still equals the colocated model's.
    cfg = dataclasses.replace(MODEL, shared_intermediate_size=0)
    model = TinyMoEModel(cfg)
    path = tmp_path_factory.mktemp("tiny_npu_no_shared")
    model.save_pretrained(path)
    assert model.spec.num_shared_experts == 0
    got = npu_decode(path, cfg)
    moe = ColocatedMoE(model.expert_banks(True), 0, torch.bfloat16)
    for s, p in enumerate(prompts()):
        want = decode(model, moe, p, STEPS, M)
        for step, (g, w) in enumerate(zip(got[s], want, strict=True)):
            assert torch.equal(g, w), f"session {s} step {step}"
