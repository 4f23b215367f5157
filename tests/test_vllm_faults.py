"""FFN faults under a real `vllm serve --afd-config` (A = 1, F = 2), seen over HTTP.

One server (`ffn_max_restarts` 1 per actor, `wait_timeout_s` 5, `ffn_stall_timeout_s` 8)
goes through, in order:

Each fault comes once vLLM runs all the requests of its load, and the tests check that
it did, before the load ended.

1. an FFN actor SIGKILLed under 8 concurrent 320-token decodes: Ray restarts it, all 8
   complete with the colocated server's tokens;
2. the other FFN actor frozen (SIGSTOP) under 8 more, for longer than `wait_timeout_s`:
   `/health` answers 503 naming AFD and the stalled rank meanwhile, the supervisor kills
   the frozen actor after `ffn_stall_timeout_s`, Ray restarts it, every request completes
   with the colocated tokens, `/health` is 200 again; `/metrics` counts one restart per
   rank and two ranks up;
3. the first victim's successor SIGKILLed under 4 concurrent 320-token decodes
   (its restart budget is spent): those requests fail with 503 naming AFD (none returns
   its zero-filled tokens), `/health` says 503 and a new request fails at once with 503,
   both naming AFD and the rank; the server stays up; `/metrics` shows one rank up;
4. the engine core SIGKILLed: the server stops by itself with a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from server_leftovers import processes, wait_until
from vllm_scenarios import (
    GONE_WITHIN_S,
    LOAD,
    PROMPTS,
    SETTLE_S,
    Record,
    afd_config,
    concurrently,
    fault_under_load,
    ffn_actor_pids,
    run_server,
    running,
)

from afd_dispatch.integrations.vllm.launch import Server, afd_counters

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REQUESTS = 8
BACK_WITHIN_S = 90.0  # a Ray restart on a loaded 2-core host: Ray worker, torch, experts


def load() -> dict[str, tuple[str, int | None, int]]:
    return {f"p{i}": (PROMPTS[i], None, LOAD) for i in range(REQUESTS)}


def health(server: Server) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def watch_health(server: Server, stop: threading.Event, seen: list[tuple[int, str]]) -> None:
    while not stop.wait(0.5):
        seen.append(health(server))


def post_status(server: Server, max_tokens: int = 4) -> tuple[int, dict[str, Any], float]:
    """(HTTP status, JSON body, seconds) of one completion request."""
    start = time.monotonic()
    try:
        body = server.post(
            "/v1/completions",
            {"prompt": PROMPTS[0], "max_tokens": max_tokens, "ignore_eos": True},
            timeout_s=600,
        )
        return 200, body, time.monotonic() - start
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode()), time.monotonic() - start


def metrics(server: Server) -> dict[tuple[str, str], float]:
    return afd_counters(server.get_text("/metrics"))


def restarts(counted: dict[tuple[str, str], float]) -> float:
    return sum(v for (name, _), v in counted.items() if name == "afd_restarts_total")


def up(counted: dict[tuple[str, str], float]) -> float:
    return counted.get(("afd_ffn_ranks_up", "process=pool"), -1.0)


@pytest.fixture(scope="module")
def faults(vllm_model: str, logs: Path, colocated: dict[str, list[int]]) -> Record:
    def scenario(server: Server, record: Record) -> None:
        notes = record.notes
        actors = sorted(ffn_actor_pids(server))
        notes["actors"] = len(actors)
        first, second = actors
        landed: list[bool] = []  # per fault: whether it came while its load ran
        notes["landed"] = landed

        # 1. SIGKILL under load
        with fault_under_load(server, REQUESTS, partial(os.kill, first, signal.SIGKILL), landed):
            killed = concurrently(server, load())
        record.tokens |= {f"kill/{k}": v for k, v in killed.items()}
        notes["back_after_kill"] = wait_until(
            lambda: (
                not running(first) and len(ffn_actor_pids(server)) == 2 and health(server)[0] == 200
            ),
            BACK_WITHIN_S,
        )
        successor = (ffn_actor_pids(server) - {second}).pop()

        # 2. SIGSTOP under load, longer than wait_timeout_s
        seen: list[tuple[int, str]] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch_health, args=(server, stop, seen))
        watcher.start()

        freeze = partial(os.kill, second, signal.SIGSTOP)
        try:
            with fault_under_load(server, REQUESTS, freeze, landed):
                frozen = concurrently(server, load())
        finally:
            if running(second):
                os.kill(second, signal.SIGCONT)
        record.tokens |= {f"freeze/{k}": v for k, v in frozen.items()}
        notes["back_after_freeze"] = wait_until(lambda: health(server)[0] == 200, BACK_WITHIN_S)
        stop.set()
        watcher.join()
        notes["health_seen"] = seen
        notes["frozen_gone"] = not running(second)
        notes["restarts_counted"] = wait_until(
            lambda: restarts(metrics(server)) == 2 and up(metrics(server)) == 2, SETTLE_S
        )
        notes["metrics_after_freeze"] = metrics(server)

        # 3. the restart budget of the first victim's rank is spent, under load
        kill = partial(os.kill, successor, signal.SIGKILL)
        with fault_under_load(server, 4, kill, landed), ThreadPoolExecutor(4) as pool:
            notes["in_flight"] = list(pool.map(lambda i: post_status(server, LOAD), range(4)))
        # first restarting, then FAILED once Ray refuses the restart
        notes["failed_seen"] = wait_until(lambda: "failed" in health(server)[1], BACK_WITHIN_S)
        notes["failed_health"] = health(server)
        notes["failed_request"] = post_status(server)
        notes["alive_after_failure"] = server.process.poll() is None
        notes["ranks_up_after_failure"] = wait_until(lambda: up(metrics(server)) == 1, SETTLE_S)

        # 4. the engine dies: a non-zero exit
        engines = [
            p.pid
            for p in processes().values()
            if p.sid == server.process.pid and p.cmdline.startswith("VLLM::EngineCore")
        ]
        notes["engines"] = len(engines)
        os.kill(engines[0], signal.SIGKILL)
        notes["exited"] = wait_until(lambda: server.process.poll() is not None, GONE_WITHIN_S)
        notes["exit_status"] = server.process.returncode

    config = afd_config(1, 2, ffn_max_restarts=1, wait_timeout_s=5.0, ffn_stall_timeout_s=8.0)
    return run_server(vllm_model, logs / "faults.log", config, (), scenario)


def test_killed_ffn_actor_under_8_requests_all_complete(
    faults: Record, colocated: dict[str, list[int]]
) -> None:
    assert faults.notes["actors"] == 2
    assert faults.notes["landed"] == [True, True, True]  # every fault came under load
    kills = {k: v for k, v in faults.tokens.items() if k.startswith("kill/")}
    assert len(kills) == REQUESTS
    for label, tokens in kills.items():
        assert tokens == colocated[f"decode/{label.split('/')[1]}"], label
    assert faults.notes["back_after_kill"]


def test_frozen_ffn_actor_is_replaced_and_requests_complete(
    faults: Record, colocated: dict[str, list[int]]
) -> None:
    frozen = {k: v for k, v in faults.tokens.items() if k.startswith("freeze/")}
    assert len(frozen) == REQUESTS
    for label, tokens in frozen.items():
        assert tokens == colocated[f"decode/{label.split('/')[1]}"], label
    stalls = [text for status, text in faults.notes["health_seen"] if status == 503]
    assert stalls, faults.notes["health_seen"]  # /health reported the stall
    assert all("AFD: FFN rank" in text for text in stalls), stalls
    assert any("stalled" in text or "restarting" in text for text in stalls), stalls
    assert faults.notes["back_after_freeze"]  # healthy again once it is back
    assert faults.notes["frozen_gone"]  # killed and replaced, not merely resumed
    assert faults.notes["restarts_counted"], faults.notes["metrics_after_freeze"]
    counted = faults.notes["metrics_after_freeze"]
    assert counted[("afd_restarts_total", "ffn_rank=0")] == 1, counted  # one per rank
    assert counted[("afd_restarts_total", "ffn_rank=1")] == 1, counted


def test_spent_restart_budget_fails_requests_fast_and_the_server_stays_up(faults: Record) -> None:
    assert faults.notes["failed_seen"]
    status, text = faults.notes["failed_health"]
    assert status == 503 and "AFD" in text and "failed" in text and "FFN rank" in text, text
    status, body, took = faults.notes["failed_request"]
    assert status == 503, body
    assert "AFD" in body["error"]["message"] and "FFN rank" in body["error"]["message"]
    assert took < 5.0  # not the 5 s deadline per layer, not a hang
    assert faults.notes["alive_after_failure"]
    assert faults.notes["ranks_up_after_failure"]


def test_requests_in_flight_when_the_budget_is_spent_fail_naming_afd(faults: Record) -> None:
    outcomes = faults.notes["in_flight"]
    assert len(outcomes) == 4
    for status, body, _ in outcomes:
        assert status == 503, body  # none returned tokens computed from zeros
        assert body["error"]["message"].startswith("AFD: "), body


def test_dead_engine_exits_non_zero(faults: Record) -> None:
    assert faults.notes["engines"] == 1
    assert faults.notes["exited"]
    assert faults.notes["exit_status"] not in (0, None), faults.notes["exit_status"]


def test_server_with_faults_leaves_nothing(faults: Record) -> None:
    assert faults.footprint is not None
    assert faults.gone, (faults.footprint.left_processes, faults.footprint.left_shm)
