"""`vllm serve --data-parallel-size A --afd-config` end to end: every DP rank an AFD session.

One tiny Qwen3-MoE checkpoint (float32, built offline), batch-invariant experts. Servers
run one after the other (each takes several GB), each recording what its tests assert:

- a colocated DP = 1 server gives the reference tokens of every request;
- AFD, A:F = 2:1: 16 concurrent greedy requests (vLLM spreads them over both ranks);
  `/metrics` shows tokens sent by both sessions; after it stops nothing of it is left;
- AFD, A:F = 2:3 with expert 0 on every FFN rank: 16 concurrent requests; a burst pinned to
  rank 0 while rank 1 idles (rank 1 runs vLLM's dummy batches, sending empty micro-batches);
  one long prompt on rank 0 alongside short decodes on rank 1 (different numbers of
  exchange rounds, agreed from vLLM's DP token counts); an FFN actor SIGKILLed once vLLM
  runs all 16 requests of 320 tokens (Ray restarts it; every request completes, and the
  kill landed before the last one did);
- AFD, A:F = 3:2: 16 concurrent requests; then one engine core is SIGKILLed: the server
  goes down by itself, and nothing of it is left (FFN actors, Ray, windows, janitors).

Every AFD token must equal the colocated server's.
"""

from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path

import pytest
from server_leftovers import afd_files, processes, wait_until
from vllm_scenarios import (
    GONE_WITHIN_S,
    LOAD,
    LONG,
    MAX_TOKENS,
    PROMPTS,
    SETTLE_S,
    Record,
    afd_config,
    concurrently,
    fault_under_load,
    ffn_actor_pids,
    run_server,
    running,
    spread,
)

from afd_dispatch.integrations.vllm.launch import Server, settled_afd_counters

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def dp(size: int) -> tuple[str, ...]:
    return ("--data-parallel-size", str(size))


def spread_counted(server: Server, record: Record) -> None:
    """The 16 prompts at once (vLLM spreads them over the ranks), AFD counters around."""
    record.counters_before = settled_afd_counters(server, SETTLE_S)
    record.tokens = concurrently(server, spread())
    record.counters_after = settled_afd_counters(server, SETTLE_S)


# -- A:F = 2:1 -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def a2f1(vllm_model: str, logs: Path, colocated: dict[str, list[int]]) -> Record:
    return run_server(vllm_model, logs / "a2f1.log", afd_config(2, 1), dp(2), spread_counted)


def test_a2f1_tokens_equal_colocated(a2f1: Record, colocated: dict[str, list[int]]) -> None:
    assert len(a2f1.tokens) == len(PROMPTS)
    for label, tokens in a2f1.tokens.items():
        assert tokens == colocated[label], label


def test_a2f1_metrics_show_both_sessions(a2f1: Record) -> None:
    assert a2f1.sent(0) > 0 and a2f1.sent(1) > 0, a2f1.counters_after
    rows = ("afd_rows_served_total", "ffn_rank=0")
    served = a2f1.counters_after[rows] - a2f1.counters_before.get(rows, 0.0)
    assert served == 2 * (a2f1.sent(0) + a2f1.sent(1))  # top-2 rows of every token sent


def test_a2f1_leaves_nothing(a2f1: Record) -> None:
    footprint = a2f1.footprint
    assert footprint is not None
    assert any("FFNWorkerActor" in p.cmdline for p in footprint.own_processes.values())
    assert afd_files(footprint.new_shm)  # the windows were there
    assert a2f1.gone, (footprint.left_processes, footprint.left_shm)


# -- A:F = 2:3, a replicated expert ----------------------------------------------------------
@pytest.fixture(scope="module")
def a2f3(vllm_model: str, logs: Path, colocated: dict[str, list[int]]) -> Record:
    def scenario(server: Server, record: Record) -> None:
        record.tokens = {f"spread/{k}": v for k, v in concurrently(server, spread()).items()}
        burst = {f"p{i}": (PROMPTS[i], 0, MAX_TOKENS) for i in range(8)}  # rank 1 idles
        record.tokens |= {f"burst/{k}": v for k, v in concurrently(server, burst).items()}
        mixed = {"long": (LONG, 0, MAX_TOKENS)}
        mixed |= {f"p{i}": (PROMPTS[i], 1, MAX_TOKENS) for i in range(8, 16)}
        record.tokens |= {f"mixed/{k}": v for k, v in concurrently(server, mixed).items()}

        # an FFN actor SIGKILLed while 16 long decodes run: Ray restarts it, all complete
        actors = ffn_actor_pids(server)
        record.notes["actors"] = len(actors)
        victim = min(actors)
        landed: list[bool] = []
        with fault_under_load(
            server, len(PROMPTS), partial(os.kill, victim, signal.SIGKILL), landed
        ):
            load = concurrently(server, spread(LOAD))
        record.tokens |= {f"decode/{k}": v for k, v in load.items()}
        record.notes["killed_under_load"] = landed == [True]
        # Ray reaps the victim and renames its successor's process in its own time
        record.notes["restarted"] = wait_until(
            lambda: not running(victim) and len(ffn_actor_pids(server)) == 3, GONE_WITHIN_S
        )
        record.notes["actors_after"] = len(ffn_actor_pids(server))
        record.notes["victim_alive"] = running(victim)

    extra = {"expert_replicas": {"0": 3}}
    return run_server(vllm_model, logs / "a2f3.log", afd_config(2, 3, **extra), dp(2), scenario)


def test_a2f3_tokens_equal_colocated(a2f3: Record, colocated: dict[str, list[int]]) -> None:
    for label, tokens in a2f3.tokens.items():
        if label.startswith(("spread/", "burst/")):
            assert tokens == colocated[label.split("/")[1]], label
        elif label.startswith("decode/"):  # the load the FFN actor was killed under
            assert tokens == colocated[label], label
    assert sum(label.startswith("spread/") for label in a2f3.tokens) == len(PROMPTS)


def test_a2f3_burst_on_one_rank_completes(a2f3: Record, colocated: dict[str, list[int]]) -> None:
    burst = [label for label in a2f3.tokens if label.startswith("burst/")]
    assert len(burst) == 8


def test_a2f3_long_prompt_beside_short_decodes(
    a2f3: Record, colocated: dict[str, list[int]]
) -> None:
    assert a2f3.tokens["mixed/long"] == colocated["long"]
    for i in range(8, 16):
        assert a2f3.tokens[f"mixed/p{i}"] == colocated[f"p{i}"], i


def test_a2f3_ffn_actor_killed_under_load(a2f3: Record, colocated: dict[str, list[int]]) -> None:
    assert a2f3.notes["actors"] == 3
    assert a2f3.notes["killed_under_load"], a2f3.notes  # the decodes were still running
    assert a2f3.notes["restarted"], a2f3.notes  # the victim is gone, a successor serves
    assert not a2f3.notes["victim_alive"]
    assert a2f3.notes["actors_after"] == 3
    load = [label for label in a2f3.tokens if label.startswith("decode/")]
    assert len(load) == len(PROMPTS)  # every request completed, with the right tokens (above)
    assert all(len(a2f3.tokens[label]) == LOAD for label in load)


def test_a2f3_leaves_nothing(a2f3: Record) -> None:
    assert a2f3.footprint is not None
    assert a2f3.gone, (a2f3.footprint.left_processes, a2f3.footprint.left_shm)


# -- A:F = 3:2, then an engine core SIGKILLed --------------------------------------------------
@pytest.fixture(scope="module")
def a3f2(vllm_model: str, logs: Path, colocated: dict[str, list[int]]) -> Record:
    def scenario(server: Server, record: Record) -> None:
        spread_counted(server, record)
        engines = [
            p.pid
            for p in processes().values()
            if p.sid == server.process.pid and p.cmdline.startswith("VLLM::EngineCore_DP")
        ]
        record.notes["engines"] = len(engines)
        os.kill(max(engines), signal.SIGKILL)
        record.notes["server_exited"] = wait_until(
            lambda: server.process.poll() is not None, GONE_WITHIN_S
        )
        record.notes["exit_status"] = server.process.returncode

    return run_server(vllm_model, logs / "a3f2.log", afd_config(3, 2), dp(3), scenario)


def test_a3f2_tokens_equal_colocated(a3f2: Record, colocated: dict[str, list[int]]) -> None:
    assert len(a3f2.tokens) == len(PROMPTS)
    for label, tokens in a3f2.tokens.items():
        assert tokens == colocated[label], label
    assert all(a3f2.sent(s) > 0 for s in range(3)), a3f2.counters_after


def test_a3f2_engine_killed_leaves_nothing(a3f2: Record) -> None:
    assert a3f2.notes["engines"] == 3
    assert a3f2.notes["server_exited"]  # vLLM stops when an engine core dies
    assert a3f2.notes["exit_status"] not in (0, None), a3f2.notes  # and says it failed
    assert a3f2.footprint is not None
    assert a3f2.gone, (a3f2.footprint.left_processes, a3f2.footprint.left_shm)
