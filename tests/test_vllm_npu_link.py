"""`vllm serve --afd-config` over the NPU link, on the torch_npu + HCCL emulator.

The server process and its FFN Ray actors import the emulator as torch_npu (PYTHONPATH);
the attention worker serves the link's rendezvous, the actors join it, and every MoE layer
goes through HCCL windows and the torch_npu ops. A tiny Qwen2-MoE-like checkpoint with
H = 1024 (A3's ops take 1024 <= H <= 8192) in bf16 (A3 has no float32 path). vLLM runs the
shared expert itself, so the windows carry a null shared slot (A3's combine needs one).
The greedy tokens equal those of the same server over the reference link.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from npu_ranks import EMULATOR

from afd_dispatch.fixtures.tiny_hf import TinyShape, build_tiny_model
from afd_dispatch.integrations.vllm.launch import vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHAPE = TinyShape(hidden_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=128)
PROMPTS = ("the quick brown fox", "hello world", "a small model answers")
MAX_TOKENS = 8


def afd_config(backend: str) -> str | None:
    if backend == "colocated":
        return None
    keys = {"window_groups": "per_micro_batch"} if backend == "npu" else {}
    return json.dumps(
        {
            "num_attention_ranks": 1,
            "num_ffn_ranks": 2,
            "micro_batch_num": 2,
            "max_tokens_per_micro_batch": 16,
            "batch_invariant": True,
            "backend": backend,
            **keys,
        }
    )


def greedy_tokens(model: Path, log: Path, backend: str) -> list[list[int]]:
    with vllm_server(str(model), str(log), afd_config(backend), ["--dtype", "bfloat16"]) as s:
        response = s.post(
            "/v1/completions",
            {
                "prompt": list(PROMPTS),
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
    choices = sorted(response["choices"], key=lambda c: int(c["index"]))
    return [list(c["token_ids"]) for c in choices]


def test_vllm_over_the_npu_link_serves_the_reference_links_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "tiny-qwen2_moe-h1024"
    build_tiny_model("qwen2_moe", str(model), seed=0, dtype="bfloat16", shape=SHAPE)
    private_tmp = tempfile.mkdtemp(prefix="afdt-", dir="/tmp")  # short: Ray's socket paths
    monkeypatch.setenv("TMPDIR", private_tmp)
    colocated = greedy_tokens(model, tmp_path / "vllm-colocated.log", "colocated")
    reference = greedy_tokens(model, tmp_path / "vllm-reference.log", "reference")
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([EMULATOR, tests, os.environ.get("PYTHONPATH", "")])
    )
    call_log = tmp_path / "torch_npu_calls.log"
    monkeypatch.setenv("TORCH_NPU_EMULATOR_CALL_LOG", str(call_log))
    try:
        npu = greedy_tokens(model, tmp_path / "vllm-npu.log", "npu")
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)
    assert all(len(t) == MAX_TOKENS for t in reference)
    assert reference == colocated
    assert npu == reference
    # the server really went through the emulated torch_npu ops, on both sides
    calls = [line.split() for line in call_log.read_text().splitlines()]
    sent = {pid for op, pid in calls if op == "npu_attention_to_ffn"}
    served = {pid for op, pid in calls if op == "npu_ffn_worker_batching"}
    assert len(sent) == 1 and len(served) == 2 and not sent & served, (sent, served)
    assert {op for op, _ in calls} == {
        "npu_attention_to_ffn",
        "npu_ffn_worker_batching",
        "npu_ffn_to_attention",
        "npu_attention_worker_combine",
    }
