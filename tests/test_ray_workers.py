"""FFN workers as Ray actors (`FFNWorkerPool`) on a real local Ray: results, handshake, faults.

1. The tiny MoE decoder (random weights, shared expert, replicated experts) decodes through
   AFD with its FFN ranks as Ray actors, bit-identical (float32, batch_invariant) to the
   colocated run, for A > F, A < F and F = 1.
2. An FFN side started with another config or model is refused at `start()` with an
   `AFDHandshakeError` naming the field and both values; no actor of the pool survives the
   refusal and its placement group is removed.
3. Faults: (a) an FFN actor killed while idle between decode steps is restarted by Ray and
   the decode finishes bit-identical; (b) an actor killed in the middle of a decode: every
   attention rank either finishes bit-identical or raises `AFDTimeoutError` naming rank,
   session, micro-batch and missing flags, within its deadline; (c) a stopped pool leaves
   no actor alive, and neither does a driver that is SIGKILLed (its actors live on a
   separate `ray start --head`, so only Ray's owner-death cleanup can end them).

One local Ray serves the whole module (starting one costs seconds). Ray's token
authentication stays on: the separate head and the driver inherit this process's token
source (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`) and run with
`RAY_AUTH_MODE=token`. Every wait has a deadline; windows, pools, the head and the driver are
cleaned up in `finally` blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray._private.state import GlobalState
from ray._raylet import GcsClientOptions  # type: ignore[attr-defined]
from ray_cluster import ray_env, ray_head, read_line, wait_for

from afd_dispatch import AFDConfig, AFDTimeoutError
from afd_dispatch.config import ReferenceBackendConfig
from afd_dispatch.errors import AFDHandshakeError
from afd_dispatch.fixtures.tiny_moe import (
    ColocatedMoE,
    DecodeState,
    TinyMoEConfig,
    TinyMoEModel,
    decode,
)
from afd_dispatch.integrations.ray import FFNWorkerPool
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.pipeline import run_pipelined
from afd_dispatch.windows import WindowGroup

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BS = 8  # max_tokens_per_micro_batch
SEQS = 6  # sequences per attention rank
PROMPT_LEN = 3
STEPS = 3  # generated tokens after the prompt
WAIT_TIMEOUT_S = 30.0  # flag waits where nothing should fail (an actor restart fits in it)
STARTUP_TIMEOUT_S = 120.0  # actors importing torch on a loaded 2-core host
JOIN_S = 120.0  # a decode thread still alive after this is a hang
GONE_WITHIN_S = 30.0  # killed actors must be DEAD in Ray and their processes gone by then

# 3(b): the deadline under test and how late its error may come (the kill delay, the decode
# before the fault and one back-off sleep on a busy host: a hang bound, not a speed test)
FAULT_TIMEOUT_S = WAIT_TIMEOUT_S  # a restart (Ray worker start, torch import, experts) fits
LATE_BY_AT_MOST_S = 10.0
FAULT_TRIALS = int(os.environ.get("AFD_FAULT_TRIALS", "4"))
FAULT_STEPS = 6


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny: tuple[TinyMoEModel, Path]) -> tuple[TinyMoEModel, str]:
    """conftest's tiny model, its checkpoint dir as the str `FFNWorkerPool` takes."""
    model, path = tiny
    return model, str(path)


# -- helpers ------------------------------------------------------------------------------
def make_config(a: int, f: int, m: int, **keys: Any) -> AFDConfig:
    """A reference-backend, shared-memory config under a group name no other test uses."""
    keys.setdefault("wait_timeout_s", WAIT_TIMEOUT_S)
    keys.setdefault("group", f"ray{uuid.uuid4().hex[:12]}")
    return AFDConfig(
        num_attention_ranks=a,
        num_ffn_ranks=f,
        micro_batch_num=m,
        max_tokens_per_micro_batch=BS,
        backend="reference",
        reference=ReferenceBackendConfig(transport="shm"),
        startup_timeout_s=STARTUP_TIMEOUT_S,
        batch_invariant=True,
        **keys,
    )


@contextlib.contextmanager
def shm_windows(deployment: Deployment) -> Iterator[list[WindowGroup]]:
    groups = deployment.create_windows("shm")
    try:
        yield groups
    finally:
        for group in groups:
            group.close()


def make_prompts(a: int, seed: int, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (SEQS, PROMPT_LEN), generator=gen) for _ in range(a)]


def colocated(
    model: TinyMoEModel, prompts: list[torch.Tensor], m: int, steps: int = STEPS
) -> list[list[torch.Tensor]]:
    num_shared = model.spec.num_shared_experts
    return [
        decode(
            model, ColocatedMoE(model.expert_banks(True), num_shared, torch.float32), p, steps, m
        )
        for p in prompts
    ]


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@dataclasses.dataclass
class Outcome:
    """What one attention rank's decode ended with, and when (seconds after the start)."""

    hidden: list[torch.Tensor] | None = None
    error: BaseException | None = None
    elapsed_s: float = float("nan")


def decode_steps(
    model: TinyMoEModel,
    endpoint: AttentionEndpoint,
    prompts: torch.Tensor,
    steps: int,
    micro_batches: int,
    between_steps: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """`tiny_moe.decode`, with a hook called after each step (the same endpoint throughout)."""
    chunks = torch.tensor_split(prompts, micro_batches, dim=0)
    states = [DecodeState(tokens=c[:, 0].clone()) for c in chunks]
    outputs = []
    for step in range(prompts.shape[1] + steps):
        run_pipelined(model, endpoint, states)
        outputs.append(torch.cat([model.finish(s) for s in states]))
        if step + 1 < prompts.shape[1]:
            for s, c in zip(states, chunks, strict=True):
                s.tokens = c[:, step + 1].clone()
        if between_steps is not None:
            between_steps(step)
    return outputs


def decode_afd(
    model: TinyMoEModel,
    deployment: Deployment,
    prompts: list[torch.Tensor],
    steps: int = STEPS,
    between_steps: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Every attention rank decodes its prompts in its own thread; all joined (bounded)."""
    outcomes = [Outcome() for _ in prompts]
    start = time.monotonic()

    def attend(session: int) -> None:
        try:
            outcomes[session].hidden = decode_steps(
                model,
                AttentionEndpoint(deployment, session),
                prompts[session],
                steps,
                deployment.micro_batches,
                between_steps,
            )
        except BaseException as exc:  # the test inspects it
            outcomes[session].error = exc
        outcomes[session].elapsed_s = time.monotonic() - start

    threads = [
        threading.Thread(target=attend, args=(s,), name=f"attention-{s}", daemon=True)
        for s in range(len(prompts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, start + JOIN_S - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"attention threads {alive} still running after {JOIN_S} s: a hang"
    return outcomes


class GcsView:
    """Actors and placement groups of a cluster as its GCS records them.

    `ray.util.state` needs the dashboard, which the minimal Ray here does not have, so this
    reads Ray's GCS tables directly: the connected cluster's (`address=None`) or another
    cluster's by its GCS address (same token: this process's token source).
    """

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            self._state = ray._private.state.state
            self._own = False
        else:
            self._state = GlobalState()
            self._state._initialize_global_state(
                GcsClientOptions.create(
                    address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False
                )
            )
            self._own = True

    def actors(self, class_name: str = "FFNWorkerActor") -> dict[str, dict[str, Any]]:
        table = self._state.actor_table(None)
        return {k: v for k, v in table.items() if v["ActorClassName"] == class_name}

    def placement_groups(self) -> dict[str, str]:
        return {k: v["state"] for k, v in self._state.placement_group_table().items()}

    def close(self) -> None:
        if self._own:
            self._state.disconnect()


def process_gone(pid: int) -> bool:
    """No process `pid`, or only its zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def assert_actors_gone(gcs: GcsView, actor_ids: set[str], pids: set[int]) -> None:
    """Every actor in `actor_ids` is DEAD in the GCS and every process in `pids` exited."""
    assert actor_ids, "no actor ids to check"

    def alive() -> dict[str, str]:
        table = gcs.actors()
        states = {i: table[i]["State"] if i in table else "UNKNOWN" for i in actor_ids}
        return {i: s for i, s in states.items() if s != "DEAD"}

    wait_for(lambda: not alive(), GONE_WITHIN_S, lambda: f"actors not DEAD: {alive()}")
    wait_for(
        lambda: all(process_gone(p) for p in pids),
        GONE_WITHIN_S,
        lambda: f"actor processes still running: {[p for p in pids if not process_gone(p)]}",
    )


def assert_placement_groups_removed(gcs: GcsView, before: set[str], count: int) -> None:
    """Exactly `count` placement groups were made since `before`, and all are REMOVED."""
    made = set(gcs.placement_groups()) - before
    assert len(made) == count, made
    wait_for(
        lambda: all(gcs.placement_groups()[g] == "REMOVED" for g in made),
        GONE_WITHIN_S,
        lambda: f"placement groups {gcs.placement_groups()}",
    )


def assert_pool_gone(
    handles: dict[int, Any], info: dict[int, dict[str, Any]], groups_before: set[str]
) -> None:
    """After `pool.stop()`: no handle answers, the GCS says DEAD, the processes are gone,
    the pool's placement group is removed."""
    assert set(handles) == set(info)
    for handle in handles.values():
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.info.remote(), timeout=GONE_WITHIN_S)
    gcs = GcsView()
    assert_actors_gone(
        gcs, {i["actor_id"] for i in info.values()}, {i["pid"] for i in info.values()}
    )
    assert_placement_groups_removed(gcs, groups_before, 1)


# == 1. bit-identical to the colocated run ==================================================
DECODE_CASES = [
    # A, F, M, expert_replicas, shared_expert_ranks
    pytest.param(2, 3, 2, {0: 2, 3: 2}, (2,), id="A2-F3-M2"),
    pytest.param(1, 4, 3, 2, (3,), id="A1-F4-M3"),
    pytest.param(4, 1, 2, 1, (), id="A4-F1-M2"),
]


@pytest.mark.parametrize(("a", "f", "m", "replicas", "shared_ranks"), DECODE_CASES)
def test_decode_through_ray_actors_equals_colocated(
    local_ray: None,
    tiny: tuple[TinyMoEModel, str],
    a: int,
    f: int,
    m: int,
    replicas: int | dict[int, int],
    shared_ranks: tuple[int, ...],
) -> None:
    model, path = tiny
    cfg = make_config(
        a, f, m, expert_replicas=replicas, shared_expert_ranks=shared_ranks, trace=True
    )
    deployment = Deployment(cfg, model.spec, torch.float32)
    prompts = make_prompts(a, seed=a * 10 + f, vocab=model.config.vocab_size)
    expected = colocated(model, prompts, m)
    groups_before = set(GcsView().placement_groups())
    with shm_windows(deployment) as groups:
        pool = FFNWorkerPool(deployment, path, groups)
        with pool:
            info = pool.info()
            handles = dict(pool.actors)
            outcomes = decode_afd(model, deployment, prompts)
            spans, counters = pool.traces()
            # the metrics poll's call: the same counters, without shipping the spans
            assert spans and pool.counters() == counters
        assert_pool_gone(handles, info, groups_before)

    assert sorted(info) == list(deployment.topology.ffn_ranks)
    here = ray.get_runtime_context().get_node_id()
    for rank, i in info.items():
        assert i["rank"] == rank and i["serving"] and not i["restarted"]
        assert i["node_id"] == here
        # one torch thread per CPU Ray gave the actor (the pool's default: 1), however many
        # cores the host has: more would spin against the attention side's threads
        assert i["torch_threads"] == 1, i
        # at the owner's priority, not Ray's worker niceness 15 (which starved the FFN ranks
        # behind vLLM's engine core); without the privilege to raise it, it stays at 15
        can_raise = os.geteuid() == 0
        assert i["niceness"] == (os.getpriority(os.PRIO_PROCESS, 0) if can_raise else 15), i
    for session, outcome in enumerate(outcomes):
        assert outcome.error is None, f"session {session}: {outcome.error!r}"
        assert outcome.hidden is not None
        assert identical(outcome.hidden, expected[session]), f"session {session} differs"
    # every routed and shared row was served exactly once, somewhere
    layers, slots = len(model.moe_layers), model.spec.topk + model.spec.num_shared_experts
    rows = sum(c["rows_served_total"] for p, c in counters.items() if p.startswith("FFN "))
    assert rows == a * SEQS * (PROMPT_LEN + STEPS) * layers * slots


# == 2. the startup handshake ================================================================
HANDSHAKE_A, HANDSHAKE_F, HANDSHAKE_M = 1, 2, 2
HANDSHAKE_REPLICAS = {0: 2}


def _ffn_side(case: str, attention: AFDConfig) -> tuple[AFDConfig | None, TinyMoEConfig | None]:
    """(ffn_config, model config of the FFN's checkpoint) for one disagreement."""
    if case == "quant_mode":
        return dataclasses.replace(attention, quant_mode="int8"), None
    if case == "micro_batches":
        return dataclasses.replace(attention, micro_batch_num=3), None
    if case == "table_digest":
        return dataclasses.replace(attention, expert_replicas={1: 2}), None
    if case == "groups":
        return dataclasses.replace(attention, group=attention.group + "x"), None
    if case == "hidden":
        return None, TinyMoEConfig(hidden_size=32)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "field", ["quant_mode", "micro_batches", "table_digest", "groups", "hidden"]
)
def test_handshake_refuses_a_disagreeing_ffn_side(
    local_ray: None,
    tiny: tuple[TinyMoEModel, str],
    tmp_path: Path,
    field: str,
) -> None:
    model, path = tiny
    cfg = make_config(HANDSHAKE_A, HANDSHAKE_F, HANDSHAKE_M, expert_replicas=HANDSHAKE_REPLICAS)
    ffn_config, other_model = _ffn_side(field, cfg)
    ffn_path, ffn_spec = path, model.spec
    if other_model is not None:
        other = TinyMoEModel(other_model)
        other.save_pretrained(tmp_path)
        ffn_path, ffn_spec = str(tmp_path), MoESpec.from_pretrained(tmp_path)
    deployment = Deployment(cfg, model.spec, torch.float32)
    mine = deployment.params()
    theirs = Deployment(ffn_config or cfg, ffn_spec, torch.float32).params()
    gcs = GcsView()
    actors_before, groups_before = set(gcs.actors()), set(gcs.placement_groups())

    with shm_windows(deployment) as groups:
        pool = FFNWorkerPool(deployment, ffn_path, groups, ffn_config=ffn_config)
        with pytest.raises(AFDHandshakeError) as refused:
            pool.start()
        assert not pool.actors

    message = str(refused.value)
    first = deployment.topology.ffn_ranks[0]
    shown = f"{field}: attention side has {getattr(mine, field)!r}, "
    shown += f"FFN rank {first} has {getattr(theirs, field)!r}"
    assert getattr(mine, field) != getattr(theirs, field)
    assert shown in message, message
    # no actor of the refused pool is left, and its placement group is gone
    new_actors = {k: v for k, v in gcs.actors().items() if k not in actors_before}
    assert len(new_actors) == HANDSHAKE_F, new_actors
    assert_actors_gone(gcs, set(new_actors), {v["Pid"] for v in new_actors.values() if v["Pid"]})
    assert_placement_groups_removed(gcs, groups_before, 1)


# == 3(a). an actor killed while idle between decode steps ===================================
KILL_AFTER_STEP = 1  # after the second of PROMPT_LEN + STEPS decode steps


def test_actor_killed_between_steps_is_restarted_and_the_decode_continues(
    local_ray: None, tiny: tuple[TinyMoEModel, str]
) -> None:
    model, path = tiny
    cfg = make_config(
        2, 3, 2, expert_replicas={0: 2, 3: 2}, shared_expert_ranks=(2,), ffn_max_restarts=1
    )
    deployment = Deployment(cfg, model.spec, torch.float32)
    prompts = make_prompts(2, seed=7, vocab=model.config.vocab_size)
    expected = colocated(model, prompts, cfg.micro_batch_num)
    victim = 1
    # every attention rank waits here after step KILL_AFTER_STEP until the victim is dead,
    # so the kill lands while every FFN rank is idle (nothing in flight)
    pause = threading.Barrier(cfg.num_attention_ranks + 1, timeout=WAIT_TIMEOUT_S)
    killed: dict[str, Any] = {}

    def between_steps(step: int) -> None:
        if step == KILL_AFTER_STEP:
            pause.wait()
            pause.wait()

    groups_before = set(GcsView().placement_groups())
    with shm_windows(deployment) as groups:
        pool = FFNWorkerPool(deployment, path, groups)
        with pool:
            before = pool.info()
            handles = dict(pool.actors)

            def kill_when_idle() -> None:
                pause.wait()
                pool.kill(victim)
                old_pid = before[victim]["pid"]
                try:
                    wait_for(lambda: process_gone(old_pid), GONE_WITHIN_S, lambda: "old actor")
                    killed["gone"] = True
                finally:
                    pause.wait()

            killer = threading.Thread(target=kill_when_idle, daemon=True)
            killer.start()
            outcomes = decode_afd(model, deployment, prompts, between_steps=between_steps)
            killer.join(WAIT_TIMEOUT_S)
            assert not killer.is_alive()
            after = pool.info()
        assert_pool_gone(handles, after, groups_before)

    assert killed.get("gone"), "the killed actor's process did not exit"
    for session, outcome in enumerate(outcomes):
        assert outcome.error is None, f"session {session}: {outcome.error!r}"
        assert outcome.hidden is not None
        assert identical(outcome.hidden, expected[session]), f"session {session} differs"
    assert after[victim]["restarted"] and after[victim]["serving"]
    assert after[victim]["pid"] != before[victim]["pid"]
    assert after[victim]["actor_id"] == before[victim]["actor_id"]  # the same actor, restarted
    for rank in set(before) - {victim}:
        assert not after[rank]["restarted"] and after[rank]["pid"] == before[rank]["pid"]


# == 3(b). an actor killed in the middle of a decode ==========================================
def _timeout_names_the_wait(error: AFDTimeoutError, deployment: Deployment, session: int) -> bool:
    """The message names attention rank, session, micro-batch and what is missing."""
    prefix = (
        rf"attention rank {deployment.topology.attention_rank(session)} \(session {session}\) "
        rf"of group '{re.escape(deployment.config.group)}' "
    )
    combine = r"waited for the results of micro-batch \d+: \d+ of \d+ slot flags missing: "
    combine += r"\(token \d+, slot \d+\)"
    send = r"waited to send micro-batch \d+ \(layer \d+\): FFN ranks \[[\d, ]+\] still hold"
    return re.search(prefix + f"({combine}|{send})", str(error)) is not None


@pytest.fixture(scope="module")
def heavy(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyMoEModel, str]:
    """A model whose experts cost more than its attention, so that FFN actors are busy
    (batched rows in hand, results not yet sent) a good part of the time a kill may hit."""
    model = TinyMoEModel(
        TinyMoEConfig(moe_intermediate_size=512, shared_intermediate_size=512, seed=1)
    )
    path = tmp_path_factory.mktemp("heavy_moe")
    model.save_pretrained(path)
    return model, str(path)


def _kill_after(
    pool: FFNWorkerPool, victim: int, after_step: int, delay_s: float
) -> tuple[threading.Timer, Callable[[int], None]]:
    """A timer killing `victim` `delay_s` after the first attention rank ends `after_step`,
    and the `between_steps` hook that starts it (without holding the decode up)."""
    killer = threading.Timer(delay_s, pool.kill, args=(victim,))
    lock = threading.Lock()
    armed = [True]

    def hook(step: int) -> None:
        with lock:
            if step == after_step and armed[0]:
                armed[0] = False
                killer.start()

    return killer, hook


def test_actor_killed_mid_decode_finishes_right(
    local_ray: None, heavy: tuple[TinyMoEModel, str]
) -> None:
    """Each trial: after a random decode step of attention rank 0 plus a random delay, one
    FFN actor is killed (Ray restarts it) while the decode goes on. Each attention rank's
    run must end bit-identical to the colocated run, within the deadline: a micro-batch the
    victim had collected but not given back is redone by its successor (the FFN journal)."""
    model, path = heavy
    rng = random.Random(20261127)
    total_steps = PROMPT_LEN + FAULT_STEPS
    seen: list[str] = []
    for trial in range(FAULT_TRIALS):
        cfg = make_config(
            2,
            3,
            2,
            expert_replicas={0: 2, 3: 2},
            shared_expert_ranks=(2,),
            wait_timeout_s=FAULT_TIMEOUT_S,
            ffn_max_restarts=1,
        )
        deployment = Deployment(cfg, model.spec, torch.float32)
        prompts = make_prompts(2, seed=100 + trial, vocab=model.config.vocab_size)
        expected = colocated(model, prompts, cfg.micro_batch_num, FAULT_STEPS)
        victim = rng.choice(list(deployment.topology.ffn_ranks))
        after_step = rng.randrange(total_steps - 1)  # the kill lands before the last step
        delay = rng.uniform(0.0, 0.03)
        with shm_windows(deployment) as groups, FFNWorkerPool(deployment, path, groups) as pool:
            killer, kill_soon = _kill_after(pool, victim, after_step, delay)
            outcomes = decode_afd(model, deployment, prompts, FAULT_STEPS, kill_soon)
            killer.join(WAIT_TIMEOUT_S)
            assert killer.finished.is_set(), f"trial {trial}: the kill never fired"

        for session, outcome in enumerate(outcomes):
            label = f"trial {trial} (FFN {victim} killed after step {after_step} + "
            label += f"{delay * 1e3:.0f} ms), session {session}"
            assert outcome.elapsed_s < FAULT_TIMEOUT_S + LATE_BY_AT_MOST_S, (
                f"{label}: ended after {outcome.elapsed_s:.1f} s"
            )
            assert outcome.error is None, f"{label}: {outcome.error!r}"
            assert outcome.hidden is not None
            assert identical(outcome.hidden, expected[session]), f"{label}: WRONG result"
            seen.append(f"{label}: identical after {outcome.elapsed_s:.2f} s")
    print("\n".join(["", *seen]))


# == 3(c). no orphans: a stopped pool (above), a SIGKILLed driver (here) ======================
DRIVER = """
import json, sys, time
import torch
from afd_dispatch import AFDConfig
from afd_dispatch.integrations.ray import FFNWorkerPool
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.model.spec import MoESpec

address, model_path, group = sys.argv[1:4]
config = AFDConfig(
    num_attention_ranks=1, num_ffn_ranks=3, max_tokens_per_micro_batch=8,
    backend="reference", reference={"transport": "shm"}, group=group, ray_address=address,
    startup_timeout_s=120,
)
deployment = Deployment(config, MoESpec.from_pretrained(model_path), torch.float32)
groups = deployment.create_windows("shm")
pool = FFNWorkerPool(deployment, model_path, groups).start()
info = pool.info()
print(json.dumps({
    "actors": [i["actor_id"] for i in info.values()],
    "pids": [i["pid"] for i in info.values()],
    "serving": all(i["serving"] for i in info.values()),
    "shm_tokens": [g.spec.token for g in groups],
}), flush=True)
time.sleep(600)  # a driver that would keep its actors; the test SIGKILLs it
"""
DRIVER_START_S = 150.0


def test_sigkilled_driver_leaves_no_actor_alive(
    local_ray: None, tiny: tuple[TinyMoEModel, str], tmp_path: Path
) -> None:
    _, path = tiny
    stderr = tmp_path / "driver.err"
    report: dict[str, Any] = {}
    with ray_head() as address:
        gcs = GcsView(address)
        try:
            with open(stderr, "wb") as err:
                driver = subprocess.Popen(
                    [sys.executable, "-c", DRIVER, address, path, f"orphan{uuid.uuid4().hex[:8]}"],
                    stdout=subprocess.PIPE, stderr=err, env=ray_env(),
                )  # fmt: skip
            try:
                report = json.loads(read_line(driver, DRIVER_START_S, stderr))
                ids, pids = set(report["actors"]), set(report["pids"])
                assert report["serving"] and len(ids) == 3
                table = gcs.actors()
                assert {table[i]["State"] for i in ids} == {"ALIVE"}
                assert all(not process_gone(p) for p in pids)
                assert set(gcs.placement_groups().values()) == {"CREATED"}
                driver.send_signal(signal.SIGKILL)
                assert driver.wait(timeout=30) == -signal.SIGKILL
            finally:
                if driver.poll() is None:
                    driver.kill()
                    driver.wait(timeout=30)
                assert driver.stdout is not None
                driver.stdout.close()
            # the head lives on; Ray must end the dead driver's actors and placement group
            assert_actors_gone(gcs, ids, pids)
            wait_for(
                lambda: set(gcs.placement_groups().values()) == {"REMOVED"},
                GONE_WITHIN_S,
                lambda: f"placement groups {gcs.placement_groups()}",
            )
        finally:
            gcs.close()
            for token in report.get("shm_tokens", []):  # the killed driver could not unlink
                for leftover in Path("/dev/shm").glob(f"afd-{token}-*"):
                    leftover.unlink(missing_ok=True)
