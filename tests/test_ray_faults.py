"""FFN faults on a real local Ray, seen from the attention side and the health board.

1. A frozen FFN actor (SIGSTOP, longer than `wait_timeout_s`): the board shows it stalled,
   the pool's supervisor kills it after `ffn_stall_timeout_s`, Ray restarts it, and the
   exchange that was waiting on it completes bit-identical (the restarted rank redoes the
   micro-batch). The restart is counted.
2. An FFN rank whose restart budget is spent: FAILED on the board, naming the budget; the
   next exchange fails at once with `AFDPeerError` naming the rank; `pool.info()` raises
   `AFDPeerError` naming the rank (not a bare Ray exception).
3. A restarted FFN actor that cannot load its checkpoint: the board, `pool.info()` and the
   attention side name the rank and the constructor's exception.
4. A pool Ray cannot place: `start()` fails within `startup_timeout_s`, naming the
   placement, the CPUs the cluster has free and what to change; nothing is left behind.
5. Ray's GCS frozen (SIGSTOP): a supervisor round gives up on the actor table after its
   deadline and names it; once the GCS answers again, the next rounds find the rank up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ray_cluster import wait_for

from afd_dispatch import AFDConfig, AFDTimeoutError, get_window_group
from afd_dispatch.config import ReferenceBackendConfig
from afd_dispatch.errors import AFDPeerError
from afd_dispatch.fixtures.tiny_moe import ColocatedMoE, TinyMoEModel
from afd_dispatch.integrations.ray import FFNWorkerPool
from afd_dispatch.integrations.ray import supervisor as supervisor_module
from afd_dispatch.integrations.ray.supervisor import Supervisor
from afd_dispatch.layout import FLAG_OFFSET
from afd_dispatch.model.routing import route
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.health import HealthBoard, RankState

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BS = 8
STARTUP_TIMEOUT_S = 120.0
STATE_WITHIN_S = 60.0  # for the supervisor to see a kill, a restart or a death


def make_config(**keys: Any) -> AFDConfig:
    keys.setdefault("wait_timeout_s", 30.0)
    return AFDConfig(
        num_attention_ranks=1, num_ffn_ranks=2, micro_batch_num=2,
        max_tokens_per_micro_batch=BS, backend="reference",
        reference=ReferenceBackendConfig(transport="shm"), startup_timeout_s=STARTUP_TIMEOUT_S,
        batch_invariant=True,
        group=f"rf{uuid.uuid4().hex[:12]}", **keys,
    )  # fmt: skip


@contextlib.contextmanager
def pool_of(
    cfg: AFDConfig, model: TinyMoEModel, path: Path
) -> Iterator[tuple[Deployment, FFNWorkerPool]]:
    dep = Deployment(cfg, MoESpec.from_pretrained(path), torch.float32)
    groups = dep.create_windows("shm")
    pool = FFNWorkerPool(dep, str(path), groups)
    try:
        pool.start()
        yield dep, pool
    finally:
        pool.stop()
        for group in groups:
            group.close()


def inputs(model: TinyMoEModel, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, model.config.hidden_size, generator=g)
    ids, w = route(torch.randn(tokens, model.config.num_experts, generator=g), model.router)
    return x, ids, w


def expected(
    model: TinyMoEModel, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    colocated = ColocatedMoE(model.expert_banks(True), model.spec.num_shared_experts, torch.float32)
    return colocated.moe(layer, x, ids, w)


def test_frozen_ffn_rank_is_replaced_and_the_waiting_exchange_completes(
    local_ray: None, tiny: tuple[TinyMoEModel, Path]
) -> None:
    model, path = tiny
    cfg = make_config(wait_timeout_s=2.0, ffn_stall_timeout_s=4.0)
    layer = model.moe_layers[0]
    with pool_of(cfg, model, path) as (dep, pool):
        board = pool.health
        assert board is not None
        wait_for(lambda: board.unhealthy() is None, STATE_WITHIN_S, lambda: str(board.unhealthy()))
        endpoint = AttentionEndpoint(dep, 0, health=board)
        x, ids, w = inputs(model, 12, seed=1)
        assert torch.equal(endpoint.exchange(layer, x, ids, w), expected(model, layer, x, ids, w))
        frozen_pid = int(pool.info()[1]["pid"])
        seen: set[str] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.1):
                h = board.ffn(1)
                seen.add(h.state.name if h.state is not None else "unknown")

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        os.kill(frozen_pid, signal.SIGSTOP)
        try:
            x, ids, w = inputs(model, 12, seed=2)
            start = time.monotonic()
            got = endpoint.exchange(layer, x, ids, w)  # waits out several 2 s deadlines
            took = time.monotonic() - start
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen_pid, signal.SIGCONT)
            stop.set()
            watcher.join(5.0)
        assert torch.equal(got, expected(model, layer, x, ids, w))
        assert took > cfg.ffn_stall_timeout_s  # it did wait for the replacement
        assert {"STALLED", "RESTARTING"} <= seen
        wait_for(
            lambda: board.ffn(1).state is RankState.UP, STATE_WITHIN_S, lambda: board.describe()
        )
        assert board.ffn(1).restarts == 1 and board.ffn(0).restarts == 0
        assert int(pool.info()[1]["pid"]) != frozen_pid
        counters = pool.traces(5.0)[1]
        assert counters["FFN 1"]["restarts_total"] == 1 and counters["pool"]["ffn_ranks_up"] == 2


def test_spent_restart_budget_fails_requests_at_once_naming_the_rank(
    local_ray: None, tiny: tuple[TinyMoEModel, Path]
) -> None:
    model, path = tiny
    cfg = make_config(ffn_max_restarts=0)
    layer = model.moe_layers[0]
    with pool_of(cfg, model, path) as (dep, pool):
        board = pool.health
        assert board is not None
        pool.kill(1)
        wait_for(lambda: board.ffn(1).state is RankState.FAILED, STATE_WITHIN_S, board.describe)
        assert "Ray will not restart it (ffn_max_restarts 0, 0 used)" in board.ffn(1).detail
        assert "FFN rank 1 failed" in str(board.unhealthy())
        endpoint = AttentionEndpoint(dep, 0, health=board)
        x, ids, w = inputs(model, 5, seed=3)
        start = time.monotonic()
        with pytest.raises(AFDPeerError, match=r"FFN rank 1 failed .*ffn_max_restarts 0"):
            endpoint.exchange(layer, x, ids, w)
        assert time.monotonic() - start < 1.0  # not the 30 s deadline
        with pytest.raises(AFDPeerError, match=r"^FFN rank 1: its actor died"):
            pool.info()


def test_restarts_are_counted_and_a_restarting_rank_is_not_failed(
    local_ray: None, tiny: tuple[TinyMoEModel, Path]
) -> None:
    """Budget 2: each of two kills leaves the rank UP again with one more restart (Ray's
    count, on the board and on /metrics' counters), never FAILED on the way; the exchange
    is exact; a third kill spends the budget: FAILED, saying so."""
    model, path = tiny
    cfg = make_config(ffn_max_restarts=2)
    with pool_of(cfg, model, path) as (dep, pool):
        board = pool.health
        assert board is not None
        wait_for(lambda: board.unhealthy() is None, STATE_WITHIN_S, lambda: str(board.unhealthy()))
        for kills in (1, 2):
            pool.kill(0)
            wait_for(
                lambda k=kills: (h := board.ffn(0)).state is RankState.UP and h.restarts == k,
                STATE_WITHIN_S,
                board.describe,
            )
        counters = pool.traces(5.0)[1]
        assert counters["FFN 0"]["restarts_total"] == 2 and counters["FFN 1"]["restarts_total"] == 0
        endpoint = AttentionEndpoint(dep, 0, health=board)
        x, ids, w = inputs(model, 9, seed=5)
        layer = model.moe_layers[0]
        assert torch.equal(endpoint.exchange(layer, x, ids, w), expected(model, layer, x, ids, w))
        pool.kill(0)
        wait_for(lambda: board.ffn(0).state is RankState.FAILED, STATE_WITHIN_S, board.describe)
        assert "(ffn_max_restarts 2, 2 used)" in board.ffn(0).detail


def test_restart_that_cannot_load_the_checkpoint_is_named(
    local_ray: None, tiny: tuple[TinyMoEModel, Path], tmp_path: Path
) -> None:
    model, original = tiny
    path = tmp_path / "checkpoint"
    shutil.copytree(original, path)
    cfg = make_config(ffn_max_restarts=2)
    with pool_of(cfg, model, path) as (dep, pool):
        board = pool.health
        assert board is not None
        for weights in path.glob("*.safetensors"):
            weights.unlink()  # the restarted actor finds no experts to load
        pool.kill(1)
        wait_for(lambda: board.ffn(1).state is RankState.FAILED, STATE_WITHIN_S, board.describe)
        detail = board.ffn(1).detail
        with pytest.raises(AFDPeerError) as info:
            pool.info()
        message = str(info.value)
        assert message.startswith("FFN rank 1: its actor died")
        assert "Unserializable" not in message
        for text in (detail, message):
            assert "its constructor raised" in text and "Error" in text, text
            assert "safetensors" in text or "checkpoint" in text, text
        endpoint = AttentionEndpoint(dep, 0, health=board)
        x, ids, w = inputs(model, 5, seed=4)
        with pytest.raises(AFDPeerError, match="FFN rank 1 failed"):
            endpoint.exchange(model.moe_layers[0], x, ids, w)


def test_a_rank_whose_link_failed_is_named_down_for_that_failure(
    local_ray: None, tiny: tuple[TinyMoEModel, Path]
) -> None:
    """A corrupt flag in FFN rank 1's window (a value no writer of ours writes) fails its
    link: the actor reports it and exits. With no restarts left the rank is FAILED, and
    the board and the attention side give the link failure as the reason, not Ray's
    generic account of a dead worker process."""
    model, path = tiny
    with pool_of(make_config(ffn_max_restarts=0), model, path) as (dep, pool):
        board = pool.health
        assert board is not None
        rank = dep.topology.ffn_ranks[1]
        info, _ = get_window_group(dep.channels[0].group).ffn_views(rank)
        info[0, dep.channels[0].window_micro_batch, FLAG_OFFSET] = 7
        wait_for(lambda: board.ffn(rank).state is RankState.FAILED, STATE_WITHIN_S, board.describe)
        detail = board.ffn(rank).detail
        assert "its link failed: AFDInputError" in detail and "window flags" in detail, detail
        endpoint = AttentionEndpoint(dep, 0, health=board)
        x, ids, w = inputs(model, 5, seed=5)
        with pytest.raises(AFDPeerError, match=f"FFN rank {rank} failed.*its link failed"):
            endpoint.exchange(model.moe_layers[0], x, ids, w)


def test_unplaceable_pool_times_out_naming_the_placement_and_the_cause(
    local_ray: None, tiny: tuple[TinyMoEModel, Path]
) -> None:
    """More CPUs per FFN rank than the cluster has: the placement group never becomes ready."""
    _, path = tiny
    cfg = dataclasses.replace(make_config(), startup_timeout_s=3.0)
    dep = Deployment(cfg, MoESpec.from_pretrained(path), torch.float32)
    groups = dep.create_windows("shm")
    try:
        pool = FFNWorkerPool(dep, str(path), groups, num_cpus=64)
        start = time.monotonic()
        with pytest.raises(AFDTimeoutError) as info:
            pool.start()
        assert time.monotonic() - start < 30.0
        message = str(info.value)
        assert "placement of 2 FFN ranks (64 CPU each" in message
        assert "no answer within 3 s" in message and "startup_timeout_s" in message
        assert re.search(r"the cluster has \d+ of \d+ CPUs free", message), message
        assert not pool.actors and pool.health is None  # nothing left behind
    finally:
        for group in groups:
            group.close()


def test_a_frozen_gcs_costs_the_supervisor_a_round_not_a_hang(
    local_ray: None,
    tiny: tuple[TinyMoEModel, Path],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psutil
    import ray

    class Answering:
        def info(self) -> dict[str, Any]:
            return {}

    actor: Any = ray.remote(Answering).remote()
    ray.get(actor.info.remote(), timeout=60)
    spec = MoESpec.from_pretrained(tiny[1])
    dep = Deployment(make_config(), spec, torch.float32)
    rank = dep.topology.ffn_ranks[0]
    board = HealthBoard.create(dep.topology, "inproc")
    try:
        supervisor = Supervisor({rank: actor}, board, dep.config)
        gcs = []
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a Ray worker may exit meanwhile
                if child.name() == "gcs_server":
                    gcs.append(child)
        assert len(gcs) == 1, gcs  # this module's own Ray
        monkeypatch.setattr(supervisor_module, "ACTOR_TABLE_TIMEOUT_S", 1.0)
        poller = threading.Thread(target=supervisor.poll)  # a hang must not hang the test
        gcs[0].suspend()
        try:
            with caplog.at_level(logging.WARNING):
                start = time.monotonic()
                poller.start()
                time.sleep(0.3)
                counted = supervisor.counters()  # the metrics do not wait for the GCS
                counters_took = time.monotonic() - start
                poller.join(timeout=10.0)
                took = time.monotonic() - start
        finally:
            gcs[0].resume()
            poller.join()
        assert counters_took < 0.9, counters_took  # before the round's deadline (1 s)
        assert counted["pool"]["ffn_ranks_up"] == 0.0, counted
        assert took < 5.0, took  # the deadline (1 s), not the GCS's silence
        assert f"FFN rank {rank} not checked this round" in caplog.text, caplog.text
        assert "actor table (the GCS)" in caplog.text and "within 1 s" in caplog.text
        wait_for(
            lambda: (supervisor.poll(), board.ffn(rank).state)[1] is RankState.UP,
            STATE_WITHIN_S,
            lambda: f"rank {rank} is {board.ffn(rank).state}",
        )
    finally:
        board.close()
        ray.kill(actor)
