"""The op family across processes over shared-memory windows, its deadlines, its files.

(a) 2 attention + 2 FFN processes ("spawn") attach to one shm window group made by this
    process and run several steps x layers x 2 micro-batches in flight; the attention ranks
    check every combine output against a direct computation.
(b) A peer that never answers: batching and combine fail at their deadline with an
    `AFDTimeoutError` that names who waited and what is missing.
(c) The /dev/shm files: owner-only, named by a random token, unlinked by the owner's close.

Every wait here has a deadline (group timeout_s, Queue.get / join timeouts, the start
barrier), and children still alive when a test ends are killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import re
import secrets
import stat
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
import torch
from loop_harness import Harness

from afd_dispatch import (
    AFDInputError,
    AFDTimeoutError,
    RankTopology,
    WindowGroup,
    WindowGroupSpec,
    WindowLayout,
    attach_window_group,
    build_expert_rank_table,
    create_window_group,
    destroy_window_group,
    get_window_group,
)
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.windows.group import CONTEXT_STORAGE_BYTES

SPAWN = mp.get_context("spawn")
SHM_DIR = "/dev/shm"

# (a): the deployment every process agrees on
A, F, M, BS, H, K, S, ROUTED = 2, 2, 2, 4, 64, 2, 1, 6
REPLICAS = {0: 2, 3: 2}  # experts 0 and 3 on both FFN ranks: sessions pick replica s % 2
LAYERS, STEPS = 3, 2
OP_TIMEOUT_S = 10.0  # every flag wait of the ops
STARTUP_TIMEOUT_S = 120.0  # spawning 4 interpreters that import torch, on a loaded 2-core host
RUN_TIMEOUT_S = 180.0  # the whole exchange, startup included
JOIN_TIMEOUT_S = 10.0

# (b): the deadline whose expiry is tested, and how late the error may come (a hang bound,
# not a speed test: it covers one last sleep of the back-off and a busy host)
SHORT_TIMEOUT_S = 1.0
LATE_BY_AT_MOST_S = 3.0


# -- (a) shared by the parent and the workers -------------------------------------------------
def multiplier(g: int) -> float:
    """c_g of expert f_g(x) = x * c_g: a signed power of two, so every product is exact."""
    return (-1.0 if g % 2 else 1.0) * 2.0 ** (g % 5 - 2)


def expert(g: int, rows: torch.Tensor) -> torch.Tensor:
    return rows * multiplier(g)


def active_tokens(step: int, m: int, s: int) -> int:
    """Active prefix of (step, micro-batch, session): covers 0 (header only) up to BS."""
    return (3 * step + m + 2 * s) % (BS + 1)


def routing(step: int, m: int, s: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_ids (BS, K), weights (BS, K)) of one message, the same in every process."""
    gen = torch.Generator().manual_seed(((step * M + m) * A + s) * LAYERS + layer)
    ids = torch.rand(BS, ROUTED, generator=gen).argsort(dim=1)[:, :K].contiguous()
    weights = torch.rand(BS, K, generator=gen)
    return ids, weights / weights.sum(dim=1, keepdim=True)


def first_input(step: int, m: int, s: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 + (step * M + m) * A + s)
    return torch.randn(BS, H, generator=gen)


def direct(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k f_k(x) + f_shared(x) in the combine's float32 order (bit-exact)."""
    acc = torch.zeros_like(x)
    for k in range(K):
        c = torch.tensor([multiplier(int(g)) for g in ids[:, k]]).unsqueeze(1)
        acc = acc + (x * c) * weights[:, k : k + 1]
    for g in range(ROUTED, ROUTED + S):
        acc = acc + x * multiplier(g)
    return acc


def make_topology_and_table() -> tuple[RankTopology, WindowLayout, torch.Tensor]:
    topology = RankTopology(A, F)
    layout = WindowLayout(A, M, BS, K, S, H, torch.float32)
    return topology, layout, build_expert_rank_table(topology, ROUTED, S, REPLICAS)


def report_to_parent(
    spec: WindowGroupSpec, rank: int, who: str, results: Queue, work: Callable[[WindowGroup], int]
) -> None:
    """Runs a spawned rank's `work` on the attached group and puts ("ok", rank, its count) or
    ("error", rank, the traceback) on `results`, so the parent learns of a failure at once."""
    torch.set_num_threads(1)
    try:
        group = attach_window_group(spec)
        try:
            results.put(("ok", rank, work(group)))
        finally:
            group.close()
    except BaseException:
        results.put(("error", rank, f"{who}:\n{traceback.format_exc()}"))
        raise


def check_session(group: WindowGroup, table: torch.Tensor, s: int, barrier: Barrier) -> int:
    """Session s: per step, layers in sequence for each micro-batch, M = 2 in flight; returns
    the active tokens checked.

    The output of layer l is the input of layer l + 1 (active rows), as in a model, and
    micro-batch m + 1 is sent before micro-batch m is combined.
    """
    harness = Harness(group, table, ROUTED)
    barrier.wait(STARTUP_TIMEOUT_S)
    checked = 0
    for step in range(STEPS):
        x = {m: first_input(step, m, s) for m in range(M)}
        mask = {m: torch.arange(BS) < active_tokens(step, m, s) for m in range(M)}
        for m in range(M):
            harness.send(s, m, 0, x[m], routing(step, m, s, 0)[0], mask[m])
        for layer in range(LAYERS):
            for m in range(M):
                ids, weights = routing(step, m, s, layer)
                y = harness.combine(s, weights, layer)
                n = active_tokens(step, m, s)
                want = direct(x[m][:n], ids[:n], weights[:n])
                if not torch.equal(y[:n], want):
                    bad = (y[:n] != want).any(dim=1).nonzero().flatten().tolist()
                    raise AssertionError(
                        f"session {s} step {step} layer {layer} micro-batch {m}: "
                        f"tokens {bad} differ from the direct computation"
                    )
                checked += n
                if layer + 1 < LAYERS:
                    x[m] = torch.where(mask[m].unsqueeze(1), y, x[m])
                    next_ids = routing(step, m, s, layer + 1)[0]
                    harness.send(s, m, layer + 1, x[m], next_ids, mask[m])
    return checked


def serve_rank(group: WindowGroup, table: torch.Tensor, rank: int, barrier: Barrier) -> int:
    """FFN rank: batching -> experts -> F2A for every (step, layer, micro-batch) in order;
    returns the rows served."""
    harness = Harness(group, table, ROUTED)
    ctx = harness.ffn_ctx[rank].get_schedule_context_tensor()
    barrier.wait(STARTUP_TIMEOUT_S)
    served = 0
    for _step in range(STEPS):
        for layer in range(LAYERS):
            for _m in range(M):
                served += harness.serve(rank, expert)
                seen = sc.get(ctx, sc.REF_LAST_LAYER_ID)
                if seen != layer:
                    raise AssertionError(f"FFN rank {rank}: layer {seen}, want {layer}")
    return served


def attention_worker(
    spec: WindowGroupSpec, table: torch.Tensor, s: int, barrier: Barrier, results: Queue
) -> None:
    """The process of attention session s (`check_session`)."""
    work = partial(check_session, table=table, s=s, barrier=barrier)
    rank = spec.topology.attention_rank(s)
    report_to_parent(spec, rank, f"attention session {s}", results, work)


def ffn_worker(
    spec: WindowGroupSpec, table: torch.Tensor, rank: int, barrier: Barrier, results: Queue
) -> None:
    """The process of FFN rank `rank` (`serve_rank`)."""
    work = partial(serve_rank, table=table, rank=rank, barrier=barrier)
    report_to_parent(spec, rank, f"FFN rank {rank}", results, work)


def expected_reports(topology: RankTopology, table: torch.Tensor) -> dict[int, int]:
    """{rank: rows served (FFN) or active tokens checked (attention)} of the whole run."""
    want = dict.fromkeys(range(topology.world_size), 0)
    rows = table[0].tolist()
    for step in range(STEPS):
        for m in range(M):
            for s in range(A):
                n = active_tokens(step, m, s)
                want[topology.attention_rank(s)] += n * LAYERS
                for layer in range(LAYERS):
                    ids = routing(step, m, s, layer)[0][:n]
                    experts = ids.tolist() + [list(range(ROUTED, ROUTED + S))] * n
                    for g in (g for token in experts for g in token):
                        want[rows[g][1 + 2 * (s % rows[g][0])]] += 1
    return want


def collect(
    procs: dict[int, BaseProcess], results: Queue, deadline: float
) -> dict[int, tuple[str, Any]]:
    """One report per process; fails early when a process dies without reporting."""
    reports: dict[int, tuple[str, Any]] = {}
    while len(reports) < len(procs):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no report from ranks {sorted(set(procs) - set(reports))}: {reports}")
        try:
            status, rank, payload = results.get(timeout=min(left, 0.5))
            reports[rank] = (status, payload)
            continue
        except queue.Empty:
            pass
        dead = [r for r, p in procs.items() if r not in reports and p.exitcode not in (None, 0)]
        if dead:
            with contextlib.suppress(queue.Empty):  # a report may still be in the pipe
                status, rank, payload = results.get(timeout=1.0)
                reports[rank] = (status, payload)
            codes = {r: procs[r].exitcode for r in dead}
            pytest.fail(f"ranks {dead} exited with {codes} without reporting; {reports}")
    return reports


def shm_files(token: str) -> list[str]:
    return sorted(os.path.join(SHM_DIR, f) for f in os.listdir(SHM_DIR) if token in f)


def test_two_attention_and_two_ffn_processes_over_shm() -> None:
    topology, layout, table = make_topology_and_table()
    name = f"mp-loop-{uuid.uuid4().hex[:12]}"
    group = create_window_group(name, topology, layout, transport="shm", timeout_s=OP_TIMEOUT_S)
    token = group.spec.token
    assert token is not None
    procs: dict[int, BaseProcess] = {}
    try:
        barrier = SPAWN.Barrier(A + F)
        results: Queue = SPAWN.Queue()
        for r in topology.ffn_ranks:
            procs[r] = SPAWN.Process(
                target=ffn_worker, args=(group.spec, table, r, barrier, results), name=f"ffn{r}"
            )
        for s in range(A):
            r = topology.attention_rank(s)
            procs[r] = SPAWN.Process(
                target=attention_worker,
                args=(group.spec, table, s, barrier, results),
                name=f"attn{s}",
            )
        for p in procs.values():
            p.start()
        reports = collect(procs, results, time.monotonic() + RUN_TIMEOUT_S)
        for p in procs.values():
            p.join(timeout=JOIN_TIMEOUT_S)
        errors = [payload for status, payload in reports.values() if status != "ok"]
        assert not errors, "\n".join(errors)
        assert {r: p.exitcode for r, p in procs.items()} == dict.fromkeys(procs, 0)
        # Attention ranks checked every active token of every layer; FFN ranks served exactly
        # the slots the table routes to them (replica s % count) and nothing else.
        counts = {r: payload for r, (_, payload) in reports.items()}
        want = expected_reports(topology, table)
        assert counts == want
        assert all(want[r] > 0 for r in topology.ffn_ranks)
        # The children attached and closed; only the owner removes the files.
        assert len(shm_files(token)) == topology.world_size
        # Every message was consumed: the windows are idle again.
        for r in topology.ffn_ranks:
            assert int(group.ffn_views(r)[0][:, :, 0].abs().sum()) == 0
        for r in topology.attention_ranks:
            assert int(group.attn_views(r)[0].abs().sum()) == 0
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(timeout=JOIN_TIMEOUT_S)
        group.close()
    assert shm_files(token) == []


# -- (b) deadlines --------------------------------------------------------------------------
@contextlib.contextmanager
def short_deadline_group(ffn_start_rank_id: int) -> Iterator[tuple[WindowGroup, Harness]]:
    topology = RankTopology(2, 2, ffn_start_rank_id)
    layout = WindowLayout(2, 2, 4, 2, 0, 32, torch.float32)
    table = build_expert_rank_table(topology, 4, 0)
    name = f"mp-deadline-{uuid.uuid4().hex[:12]}"
    group = create_window_group(name, topology, layout, transport="shm", timeout_s=SHORT_TIMEOUT_S)
    try:
        yield group, Harness(group, table, 4)
    finally:
        group.close()


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, generator=gen)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])
    return x, ids, torch.rand(4, 2, generator=gen)


def full_round(harness: Harness, m: int) -> None:
    """Micro-batch m through every rank, so that the failure below is on another one."""
    topology = harness.group.topology
    for s in range(topology.num_attention_ranks):
        x, ids, _ = inputs(s)
        harness.send(s, m, 0, x, ids)
    for r in topology.ffn_ranks:
        harness.serve(r, expert)
    for s in range(topology.num_attention_ranks):
        harness.combine(s, inputs(s)[2], 0)


def timed(fn: Callable[..., object], *args: Any) -> tuple[AFDTimeoutError, float]:
    start = time.monotonic()
    with pytest.raises(AFDTimeoutError) as info:
        fn(*args)
    return info.value, time.monotonic() - start


@pytest.mark.parametrize("ffn_start_rank_id", [0, 1])
def test_batching_times_out_on_missing_sender(ffn_start_rank_id: int) -> None:
    with short_deadline_group(ffn_start_rank_id) as (group, harness):
        topology = group.topology
        full_round(harness, 0)
        x, ids, _ = inputs(0)
        harness.send(0, 1, 0, x, ids)  # session 1 never sends micro-batch 1
        ffn_rank = topology.ffn_ranks[1]
        err, elapsed = timed(harness.serve, ffn_rank, expert)
        assert SHORT_TIMEOUT_S <= elapsed < SHORT_TIMEOUT_S + LATE_BY_AT_MOST_S
        msg = str(err)
        assert f"FFN rank {ffn_rank} " in msg
        assert "micro-batch 1:" in msg
        assert "sessions [1]" in msg
        assert f"attention ranks [{topology.attention_rank(1)}]" in msg
        assert f"{SHORT_TIMEOUT_S:g} s" in msg
        # The failed wait consumed nothing: when the late sender arrives, a retry succeeds.
        info, _ = group.ffn_views(ffn_rank)
        assert info[:, 1, 0].tolist() == [1, 0]
        harness.send(1, 1, 0, *inputs(1)[:2])
        for r in topology.ffn_ranks:
            assert harness.serve(r, expert) > 0


@pytest.mark.parametrize("ffn_start_rank_id", [0, 1])
def test_combine_times_out_on_missing_results(ffn_start_rank_id: int) -> None:
    with short_deadline_group(ffn_start_rank_id) as (group, harness):
        topology = group.topology
        full_round(harness, 0)
        active = 3
        x, ids, weights = inputs(0)
        mask = torch.arange(4) < active
        harness.send(0, 1, 0, x, ids, mask)
        harness.send(1, 1, 0, *inputs(1)[:2])
        silent = topology.ffn_ranks[1]  # batches nothing, so its slots never come back
        harness.serve(topology.ffn_ranks[0], expert)
        rows = harness.table[0].tolist()
        missing = {
            (t, k) for t in range(active) for k in range(2) if rows[int(ids[t, k])][1] == silent
        }
        assert 0 < len(missing) <= 8  # the message lists the first 8
        rank = topology.attention_rank(0)
        err, elapsed = timed(harness.combine, 0, weights, 0)
        assert SHORT_TIMEOUT_S <= elapsed < SHORT_TIMEOUT_S + LATE_BY_AT_MOST_S
        msg = str(err)
        assert f"attention rank {rank} (session 0)" in msg
        assert "micro-batch 1:" in msg
        assert f"{len(missing)} of 8 slot flags missing" in msg
        listed = {(int(t), int(e)) for t, e in re.findall(r"\(token (\d+), slot (\d+)\)", msg)}
        assert listed == missing  # masked token 3 was pre-set, so it is not among them


# -- (c) the shared-memory files -------------------------------------------------------------
@pytest.mark.parametrize("how", ["close", "destroy_window_group"])
def test_shm_files_are_private_random_and_removed(how: str) -> None:
    topology, layout, _ = make_topology_and_table()
    name = f"mp-secret-{uuid.uuid4().hex[:12]}"
    group = create_window_group(name, topology, layout, transport="shm", timeout_s=OP_TIMEOUT_S)
    closed = False
    try:
        token = group.spec.token
        assert token is not None and re.fullmatch(r"[0-9a-f]{32}", token)  # 128 random bits
        files = shm_files(token)
        assert len(files) == topology.world_size
        for rank, path in enumerate(sorted(files, key=lambda p: int(p.rsplit("-", 1)[1]))):
            st = os.lstat(path)
            assert stat.S_ISREG(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.geteuid()
            # the window, then room for the rank's schedule context
            assert st.st_size >= group.window_bytes(rank) + CONTEXT_STORAGE_BYTES
            assert name not in os.path.basename(path)

        # The token is not a function of the name: the same name gets a new one next time.
        other = create_window_group(f"{name}-b", topology, layout, transport="shm", timeout_s=1.0)
        other_token = other.spec.token
        other.close()
        again = create_window_group(f"{name}-b", topology, layout, transport="shm", timeout_s=1.0)
        assert len({token, other_token, again.spec.token}) == 3
        again.close()

        # The right token attaches to the same bytes (under another name, in this process);
        # closing that view leaves the owner's files in place.
        view = attach_window_group(dataclasses.replace(group.spec, name=f"{name}-view"))
        view.window(1)[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        assert group.window(1)[:4].tolist() == [1, 2, 3, 4]
        view.close()
        assert len(shm_files(token)) == topology.world_size

        # A wrong token finds no file and creates none; a malformed one is refused outright.
        wrong = secrets.token_hex(16)
        with pytest.raises(FileNotFoundError):
            attach_window_group(dataclasses.replace(group.spec, name=f"{name}-w", token=wrong))
        assert shm_files(wrong) == []
        with pytest.raises(AFDInputError):
            get_window_group(f"{name}-w")
        for i, bad in enumerate(("../" + token[3:], "F" * 32, token[:-1], token + "0", name)):
            spec = dataclasses.replace(group.spec, name=f"{name}-x{i}", token=bad)
            with pytest.raises(ValueError, match="shared-memory token"):
                attach_window_group(spec)

        # A file someone made readable by others is refused.
        os.chmod(files[0], 0o644)
        try:
            with pytest.raises(PermissionError):
                attach_window_group(dataclasses.replace(group.spec, name=f"{name}-p"))
        finally:
            os.chmod(files[0], 0o600)

        if how == "close":
            group.close()
        else:
            destroy_window_group(name)
        closed = True
        assert shm_files(token) == []
        with pytest.raises(AFDInputError):
            get_window_group(name)
    finally:
        if not closed:
            group.close()
