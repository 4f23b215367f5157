"""`vllm serve MODEL --afd-config ...` end to end on the CPU: a real vLLM server per mode.

For each tiny checkpoint (Qwen3-MoE, and Qwen2-MoE with its gated shared expert; float32,
built offline), one module-scoped run starts, one after the other (never two at once: each
takes ~3 GB), a plain colocated `vllm serve` and an AFD one (one attention server, the
routed experts on two FFN Ray actors, expert 0 replicated on both), sends both the same
greedy requests and records what the assertions need, stopping every server in `finally`
(`vllm_server` does). The tests then check:

1. the AFD server's completion and chat token ids equal the colocated server's exactly
   (several prompts in one batch, one longer than a round of micro-batches);
2. the AFD server's `/metrics` carries the AFD counters of the attention rank and of both
   FFN ranks, and over the requests they moved exactly what the requests imply: every
   token the model ran, once per MoE layer, and top-k rows per token, split over both
   FFN ranks;
3. the colocated server has no AFD counters, no Ray and no AFD shared memory;
4. once a server stops, within a deadline: none of the `/dev/shm` files it had mapped
   (AFD's windows, vLLM's message queues), none of its processes (for AFD: raylet,
   gcs_server, the FFN actors ...) and none of its window janitors remain, nor its
   metrics directory. Other Ray instances, servers and janitors may run on the host: the
   server's own are the new processes (sets before / during) of its session (it starts in
   a new one; Ray's processes and the FFN actors stay in it), and the janitors of the
   `/dev/shm/afd-*` files its processes have mapped.

Each server gets a private short TMPDIR (Ray's session directory and the plugin's metrics
directory go there), so its leftovers can be told from anything else on the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from server_leftovers import (
    Footprint,
    Proc,
    ProcKey,
    afd_files,
    is_janitor,
    is_ray,
    processes,
    shm_files,
)

from afd_dispatch.fixtures.tiny_hf import build_tiny_model
from afd_dispatch.integrations.vllm.launch import (
    Server,
    afd_counters,
    settled_afd_counters,
    vllm_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ARCHS = ("qwen3_moe", "qwen2_moe")
NUM_FFN = 2
MOE_LAYERS = 2  # both decoder layers of the tiny checkpoints are MoE
TOP_K = 2
MICRO_BATCHES, TOKENS_PER_MICRO_BATCH = 2, 64
AFD_CONFIG = json.dumps(
    {
        "num_attention_ranks": 1,
        "num_ffn_ranks": NUM_FFN,
        "micro_batch_num": MICRO_BATCHES,
        "max_tokens_per_micro_batch": TOKENS_PER_MICRO_BATCH,
        "expert_replicas": {"0": NUM_FFN},
    }
)
MAX_TOKENS = 16
PROMPTS = (
    "the quick brown fox",
    "hello world",
    "a small model answers",
    # longer than one round of micro-batches (M * BS tokens): the exchange takes rounds
    " ".join(["the lazy dog sleeps while the quick brown fox jumps over it"] * 6),
)
CHATS = ("hello", "what does the bird say in the morning?")
GONE_WITHIN_S = 30.0  # a stopped server's processes and files must be gone by then
SETTLE_S = 20.0  # counters are published once a second; they settle well within this


# -- what one server run leaves to check -----------------------------------------------------
@dataclass
class Run:
    mode: str
    start_s: float = 0.0
    stop_s: float = 0.0
    completion: dict[str, Any] = field(default_factory=dict)
    chats: list[dict[str, Any]] = field(default_factory=list)
    metrics_text: str = ""
    counters_before: dict[tuple[str, str], float] = field(default_factory=dict)
    counters_after: dict[tuple[str, str], float] = field(default_factory=dict)
    own_processes: dict[ProcKey, Proc] = field(default_factory=dict)  # while serving
    new_shm: set[str] = field(default_factory=set)  # /dev/shm files it mapped, serving
    left_processes: dict[ProcKey, Proc] = field(default_factory=dict)  # after the deadline
    left_shm: set[str] = field(default_factory=set)
    left_metrics_dirs: list[str] = field(default_factory=list)


# -- /metrics --------------------------------------------------------------------------------
def settled_counters(server: Server) -> dict[tuple[str, str], float]:
    return settled_afd_counters(server, SETTLE_S)


def delta(run: Run, metric: str, label: str) -> float:
    key = (metric, label)
    assert key in run.counters_after, f"{metric}{{{label}}} not on /metrics"
    return run.counters_after[key] - run.counters_before.get(key, 0.0)


# -- one server run --------------------------------------------------------------------------
def serve_and_record(model: str, mode: str, log_dir: Path) -> Run:
    run = Run(mode)
    before = processes()
    shm_before = shm_files()
    private_tmp = tempfile.mkdtemp(prefix="afdt-", dir="/tmp")  # short: Ray's socket paths
    server_pid = -1
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TMPDIR", private_tmp)
            start = time.monotonic()
            config = AFD_CONFIG if mode == "afd" else None
            with vllm_server(model, str(log_dir / f"vllm-{mode}.log"), config) as server:
                server_pid = server.process.pid
                run.start_s = time.monotonic() - start
                print(f"\n{Path(model).name} {mode}: server ready in {run.start_s:.1f} s")
                if mode == "afd":
                    run.counters_before = settled_counters(server)
                run.completion = server.post(
                    "/v1/completions",
                    {
                        "prompt": list(PROMPTS),
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                        "return_token_ids": True,
                    },
                )
                run.chats = [
                    server.post(
                        "/v1/chat/completions",
                        {
                            "messages": [{"role": "user", "content": text}],
                            "max_tokens": MAX_TOKENS,
                            "temperature": 0,
                            "return_token_ids": True,
                        },
                    )
                    for text in CHATS
                ]
                if mode == "afd":
                    run.counters_after = settled_counters(server)
                run.metrics_text = server.get_text("/metrics")
                footprint = Footprint.while_serving(before, shm_before, server_pid)
                run.new_shm, run.own_processes = footprint.new_shm, footprint.own_processes
                stopping = time.monotonic()
            run.stop_s = time.monotonic() - stopping
        footprint.wait_gone(server_pid, GONE_WITHIN_S)
        run.left_processes = footprint.left_processes or {}
        run.left_shm = footprint.left_shm or set()
        own = run.own_processes
        run.left_metrics_dirs = sorted(
            name for name in os.listdir(private_tmp) if name.startswith("afd-metrics-")
        )
        print(
            f"{Path(model).name} {mode}: stopped in {run.stop_s:.1f} s; "
            f"{len(own)} processes of its own, {len(afd_files(run.new_shm))} AFD shm files "
            f"of {len(run.new_shm)} in /dev/shm; "
            f"usage {usage(run)}; AFD counter deltas "
            f"{ {k: v - run.counters_before.get(k, 0.0) for k, v in run.counters_after.items()} }"
        )
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)
    return run


@pytest.fixture(scope="module", params=ARCHS)
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Run]:
    """{"colocated": Run, "afd": Run} of one architecture, servers one after the other."""
    arch: str = request.param
    root = tmp_path_factory.mktemp(arch)
    model = root / f"tiny-{arch}"
    build_tiny_model(arch, str(model), seed=0, dtype="float32")
    return {mode: serve_and_record(str(model), mode, root) for mode in ("colocated", "afd")}


# -- helpers for the assertions --------------------------------------------------------------
def choices(response: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(response["choices"], key=lambda c: int(c["index"]))


def usage(run: Run) -> tuple[int, int, int]:
    """(prompt tokens, generated tokens, sequences) of all the run's requests."""
    responses = [run.completion, *run.chats]
    prompt = sum(int(r["usage"]["prompt_tokens"]) for r in responses)
    generated = sum(int(r["usage"]["completion_tokens"]) for r in responses)
    return prompt, generated, sum(len(r["choices"]) for r in responses)


# -- 1. tokens -------------------------------------------------------------------------------
def test_completion_tokens_equal_colocated(runs: dict[str, Run]) -> None:
    afd, colocated = choices(runs["afd"].completion), choices(runs["colocated"].completion)
    assert len(afd) == len(colocated) == len(PROMPTS)
    for i, (a, c) in enumerate(zip(afd, colocated, strict=True)):
        assert a["prompt_token_ids"] == c["prompt_token_ids"], i
        assert len(c["token_ids"]) == MAX_TOKENS, (i, c)  # greedy never stops early here
        assert a["token_ids"] == c["token_ids"], (
            f"prompt {i}: AFD {a['token_ids']} != colocated {c['token_ids']}"
        )
    # the comparison means something: the prompts get different continuations
    assert len({tuple(c["token_ids"]) for c in colocated}) == len(PROMPTS)
    # the long prompt needs more than one round of M micro-batches of BS tokens
    assert len(colocated[-1]["prompt_token_ids"]) > MICRO_BATCHES * TOKENS_PER_MICRO_BATCH


def test_chat_tokens_equal_colocated(runs: dict[str, Run]) -> None:
    for text, afd, colocated in zip(CHATS, runs["afd"].chats, runs["colocated"].chats, strict=True):
        (a,), (c,) = afd["choices"], colocated["choices"]
        assert afd["prompt_token_ids"] == colocated["prompt_token_ids"], text
        assert len(c["token_ids"]) == MAX_TOKENS, (text, c)
        assert a["token_ids"] == c["token_ids"], (
            f"chat {text!r}: AFD {a['token_ids']} != colocated {c['token_ids']}"
        )
        assert a["message"]["content"] == c["message"]["content"], text
    replies = [r["choices"][0]["token_ids"] for r in runs["colocated"].chats]
    assert replies[0] != replies[1]


# -- 2. AFD counters -------------------------------------------------------------------------
def test_afd_counters_on_metrics(runs: dict[str, Run]) -> None:
    run = runs["afd"]
    prompt, generated, sequences = usage(run)
    names = {name for name, _ in afd_counters(run.metrics_text)}
    assert {"afd_tokens_sent_total", "afd_rows_served_total"} <= names, sorted(names)
    assert "# TYPE afd_tokens_sent_total counter" in run.metrics_text

    sent = delta(run, "afd_tokens_sent_total", "session=0")
    # every token the model ran (prompts, and generated tokens but each sequence's last)
    ran = prompt + generated - sequences
    # crosses every MoE layer exactly once: no token lost, none sent twice, no padding
    assert sent >= prompt + generated, (sent, prompt, generated)
    assert sent == MOE_LAYERS * ran, (sent, prompt, generated, sequences)

    rows = {
        rank: delta(run, "afd_rows_served_total", f"ffn_rank={rank}") for rank in range(NUM_FFN)
    }
    batches = {
        rank: delta(run, "afd_micro_batches_served_total", f"ffn_rank={rank}")
        for rank in range(NUM_FFN)
    }
    assert all(r > 0 for r in rows.values()), rows  # both FFN ranks served experts
    assert all(b > 0 for b in batches.values()), batches
    # each token goes to its top-k experts, each (token, expert) row to one replica
    assert sum(rows.values()) == TOP_K * sent, (rows, sent)


# -- 3. the colocated server has no AFD ------------------------------------------------------
def test_colocated_server_has_no_afd(runs: dict[str, Run]) -> None:
    run = runs["colocated"]
    assert "vllm:" in run.metrics_text  # the scrape worked
    assert not re.search(r"^(# (HELP|TYPE) )?afd_", run.metrics_text, re.MULTILINE)
    assert not [p for p in run.own_processes.values() if is_ray(p)], run.own_processes
    assert run.new_shm  # vLLM's own message queues: the listing works
    assert not afd_files(run.new_shm), run.new_shm


# -- 4. an AFD server leaves nothing behind --------------------------------------------------
def test_afd_server_started_ray_and_windows(runs: dict[str, Run]) -> None:
    """What the cleanup test looks for was there: Ray, its FFN actors, the shm windows."""
    run = runs["afd"]
    names = [p.name for p in run.own_processes.values()]
    cmdlines = [p.cmdline for p in run.own_processes.values()]
    assert "raylet" in names and "gcs_server" in names, names
    assert sum("FFNWorkerActor" in c for c in cmdlines) == NUM_FFN, cmdlines
    windows = afd_files(run.new_shm)
    # one file per rank of the group, and the health board
    assert len(windows) == 1 + NUM_FFN + 1, run.new_shm
    assert any(is_janitor(p) for p in run.own_processes.values()), cmdlines


def test_afd_server_leaves_nothing(runs: dict[str, Run]) -> None:
    run = runs["afd"]
    assert not run.left_shm, f"/dev/shm files left after {GONE_WITHIN_S:g} s: {run.left_shm}"
    left = {f"{p.pid} {p.name}: {p.cmdline[:120]}" for p in run.left_processes.values()}
    assert not left, f"processes left after {GONE_WITHIN_S:g} s: {sorted(left)}"
    assert not run.left_metrics_dirs, run.left_metrics_dirs


def test_colocated_server_leaves_nothing(runs: dict[str, Run]) -> None:
    run = runs["colocated"]
    assert not run.left_shm, f"/dev/shm files left after {GONE_WITHIN_S:g} s: {run.left_shm}"
    assert not run.left_processes, run.left_processes
    assert not run.left_metrics_dirs, run.left_metrics_dirs
