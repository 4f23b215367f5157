"""Scenarios against a real `vllm serve`: requests, concurrency, a server run and what it left.

Shared by the end-to-end modules that start servers one after the other (each takes
several GB): `run_server` starts one, runs a scenario on it, stops it and records what
the assertions need.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_leftovers import Footprint, processes, shm_files, wait_until

from afd_dispatch.integrations.vllm.launch import Server, vllm_server

MAX_TOKENS = 12
# tokens per request of the load a fault lands in: long enough that the requests still
# decode when the fault comes (a prompt and these stay under --max-model-len 512)
LOAD = 320
SENTENCE = "the quick brown fox jumps over a lazy dog while small birds sing at dawn"
WORDS = SENTENCE.split()
PROMPTS = tuple(" ".join(WORDS[i % 7 : i % 7 + 2 + i % 9]) + f" {i}" for i in range(16))
# ~400 tokens (this tokenizer: ~3 per word) + generated stay under --max-model-len 512
LONG = " ".join(["a lazy dog sleeps while the quick brown fox jumps over it"] * 11)
GONE_WITHIN_S = 60.0
SETTLE_S = 20.0


def afd_config(attention: int, ffn: int, **extra: Any) -> str:
    return json.dumps(
        {
            "num_attention_ranks": attention,
            "num_ffn_ranks": ffn,
            "micro_batch_num": 2,
            "max_tokens_per_micro_batch": 32,
            "batch_invariant": True,
            **extra,
        }
    )


@dataclass
class Record:
    """What one server run did: token ids per request label, counters, leftovers."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    counters_before: dict[tuple[str, str], float] = field(default_factory=dict)
    counters_after: dict[tuple[str, str], float] = field(default_factory=dict)
    footprint: Footprint | None = None
    gone: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    def sent(self, session: int) -> float:
        key = ("afd_tokens_sent_total", f"session={session}")
        return self.counters_after.get(key, 0.0) - self.counters_before.get(key, 0.0)


def complete(
    server: Server, prompt: str, rank: int | None = None, max_tokens: int = MAX_TOKENS
) -> list[int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    response = server.post("/v1/completions", body, timeout_s=600.0, data_parallel_rank=rank)
    return list(response["choices"][0]["token_ids"])


def concurrently(
    server: Server, jobs: Mapping[str, tuple[str, int | None, int]]
) -> dict[str, list[int]]:
    """{label: tokens} of requests {label: (prompt, DP rank or None, max_tokens)} sent all
    at once."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {k: pool.submit(complete, server, *job) for k, job in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def spread(max_tokens: int = MAX_TOKENS) -> dict[str, tuple[str, int | None, int]]:
    return {f"p{i}": (p, None, max_tokens) for i, p in enumerate(PROMPTS)}


def run_server(
    model: str,
    log: Path,
    config: str | None,
    extra: tuple[str, ...],
    scenario: Callable[[Server, Record], None],
) -> Record:
    """Start a server, run `scenario` on it, stop it, and record what it left."""
    record = Record()
    before, shm_before = processes(), shm_files()
    tmp = tempfile.mkdtemp(prefix="afdt-", dir="/tmp")  # short: Ray's socket paths
    server_pid = -1
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TMPDIR", tmp)
            with vllm_server(model, str(log), config, extra) as server:
                server_pid = server.process.pid
                record.footprint = Footprint.while_serving(before, shm_before, server_pid)
                scenario(server, record)
        if config is not None:
            assert record.footprint is not None
            record.gone = record.footprint.wait_gone(server_pid, GONE_WITHIN_S)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ffn_actor_pids(server: Server) -> set[int]:
    return {
        p.pid
        for p in processes().values()
        if p.sid == server.process.pid and p.cmdline.startswith("ray::FFNWorkerActor")
    }


def running_requests(server: Server) -> float:
    """vLLM's own count of requests in the running batch, over all its engines
    (`vllm:num_requests_running`)."""
    families = text_string_to_metric_families(server.get_text("/metrics"))
    samples = [s for f in families for s in f.samples if s.name == "vllm:num_requests_running"]
    return sum(s.value for s in samples)


@contextmanager
def fault_under_load(
    server: Server, requests: int, fault: Callable[[], None], landed: list[bool]
) -> Iterator[None]:
    """While the block runs a load, run `fault` in a thread once vLLM runs `requests`
    requests (not after a fixed delay: on a fast host a load can end before any delay).
    Appends to `landed` whether it came under load: vLLM reported `requests` running and
    the fault fired before the block (the load) ended. A fault whose count never came, or
    that would come after the block, is not fired at all: an actor killed at a random
    later moment would only confuse what the scenario does next."""
    ended = threading.Event()
    fired_at = [math.inf]

    def count() -> float:
        try:
            return running_requests(server)
        except OSError:  # /metrics unreachable for a moment: not yet
            return -1.0

    def run() -> None:
        reached = wait_until(lambda: ended.is_set() or count() >= requests, SETTLE_S, 0.2)
        if reached and not ended.is_set():
            fault()
            fired_at[0] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        ended_at = time.monotonic()
        ended.set()
        thread.join()
        landed.append(fired_at[0] < ended_at)
