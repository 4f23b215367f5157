"""Faults on the data path, in one process: the health board and what reads it.

1. A micro-batch an FFN rank cannot serve (a layer that is not a MoE layer of the model,
   sent past the attention endpoint's own check) is answered with zeros and reported on
   the board and in the log; the attention side's receive raises `AFDPeerError` naming the
   rank and the reason; the FFN loop goes on, and the next exchange is exact.
2. `AttentionEndpoint.send` refuses a layer that is not a MoE layer before writing.
3. Waits consult the board: they fail at once when an FFN rank FAILED (before anything is
   written, or in the middle of a wait), run past their deadline while a rank recovers,
   and name every FFN rank's state when they expire.
4. The board itself: rows read back across a shared-memory attach, values no writer of
   ours writes (another process wrote the board) read as unknown, never as healthy.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from afd_threads import RankThread, config, deployment, ffn_workers

from afd_dispatch import AFDConfig, AFDInputError, AFDTimeoutError, get_window_group
from afd_dispatch.errors import AFDPeerError, AFDRefusedError
from afd_dispatch.fixtures.tiny_moe import ColocatedMoE, TinyMoEConfig, TinyMoEModel
from afd_dispatch.layout import STATE_WORD, health_board_views
from afd_dispatch.link import attention_link
from afd_dispatch.model.routing import route
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.experts import ExpertBank
from afd_dispatch.runtime.ffn_worker import FFNWorker
from afd_dispatch.runtime.health import HealthBoard, RankState
from afd_dispatch.topology import RankTopology

H = 32


@pytest.fixture(scope="module")
def model() -> TinyMoEModel:
    """Two decoder layers; the tests below make layer 0 a dense one (mlp_only_layers [0])."""
    return TinyMoEModel(
        TinyMoEConfig(
            vocab_size=16, hidden_size=H, num_layers=2, num_heads=2, num_experts=6, topk=2,
            moe_intermediate_size=16, shared_intermediate_size=24, max_positions=8, seed=5,
        )
    )  # fmt: skip


def banks(model: TinyMoEModel) -> dict[int, ExpertBank]:
    return model.expert_banks(True)


def inputs(model: TinyMoEModel, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    ids, weights = route(torch.randn(tokens, model.config.num_experts, generator=g), model.router)
    return x, ids, weights


def expected(
    model: TinyMoEModel, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    return ColocatedMoE(banks(model), model.spec.num_shared_experts, torch.float32).moe(
        layer, x, ids, w
    )


def stale_rank_1(model: TinyMoEModel) -> Callable[[int], dict[int, ExpertBank]]:
    """Banks per FFN rank: rank 0 every layer's, rank 1 only layer 0's (it refuses layer 1)."""
    return lambda rank: banks(model) if rank == 0 else {0: banks(model)[0]}


@contextmanager
def deployment_and_board(cfg: AFDConfig, spec: MoESpec) -> Iterator[tuple[Deployment, HealthBoard]]:
    """A float32 deployment of `cfg` and the in-process health board its ranks report on."""
    with deployment(cfg, spec, torch.float32) as dep:
        yield dep, HealthBoard.create(dep.topology, "inproc")


@contextmanager
def served_by_a_stale_rank_1(model: TinyMoEModel) -> Iterator[AttentionEndpoint]:
    """Session 0's endpoint of A = 1, F = 2, M = 2, the FFN ranks serving `stale_rank_1`'s
    banks (rank 1 refuses layer 1) and reporting on the endpoint's board."""
    cfg = config(1, 2, micro_batch_num=2, max_tokens_per_micro_batch=4)
    with (
        deployment_and_board(cfg, model.spec) as (dep, board),
        ffn_workers(dep, stale_rank_1(model), board),
    ):
        yield AttentionEndpoint(dep, 0, health=board)


def ffn_windows(dep: Deployment) -> list[bytes]:
    groups = [get_window_group(name) for name in dep.group_names]
    return [g.read_window(r) for g in groups for r in dep.topology.ffn_ranks]


# -- 1 and 2: a micro-batch the FFN side cannot serve ----------------------------------------------
def test_refused_micro_batch_is_reported_and_serving_goes_on(
    model: TinyMoEModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="afd_dispatch.runtime.ffn_worker")
    cfg = config(1, 1, micro_batch_num=1, max_tokens_per_micro_batch=4)
    spec = dataclasses.replace(model.spec, moe_layers=(1,))
    x, ids, w = inputs(model, 3, seed=1)
    with deployment_and_board(cfg, spec) as (dep, board):
        board.set_state(0, RankState.UP, 0)
        only_layer_1 = {1: banks(model)[1]}
        worker = FFNWorker(dep, 0, only_layer_1, health=board)
        endpoint = AttentionEndpoint(dep, 0, health=board)
        thread = RankThread("ffn-0", worker.run)
        thread.start()
        try:
            # the endpoint refuses layer 0 itself, before writing anything
            with pytest.raises(
                AFDInputError, match=r"layer: expected a MoE layer of the model \[1\], got 0"
            ):
                endpoint.send(0, 0, x, ids, w)
            # sent past that check, straight through the link: the FFN rank must cope
            mask = torch.zeros(1, 4, dtype=torch.bool)
            mask[0, :3] = True
            padded = torch.zeros(1, 4, H)
            padded[0, :3] = x
            pad_ids = torch.zeros(1, 4, 2, dtype=torch.int32)
            pad_ids[0, :3] = ids
            link = attention_link(dep, 0)
            link.send(0, 0, padded, pad_ids, mask)
            y = link.receive(0, 0, torch.ones(4, 2))  # answered, not left waiting
            assert torch.equal(y[:3], torch.zeros(3, H))
            health = board.ffn(0)
            assert (health.refusals, health.refused_layer, health.refused_slot) == (1, 0, 0)
            assert "layer id from the window" in health.event and "got 0" in health.event
            assert health.link_failures == 0
            assert any(
                "FFN rank 0 refuses layer 0, micro-batch slot 0" in r.getMessage()
                for r in caplog.records
            )
            # the loop went on: a valid exchange of layer 1 is exact
            assert thread.is_alive() and thread.error is None
            got = AttentionEndpoint(dep, 0, health=board).exchange(1, x, ids, w)
            assert torch.equal(got, expected(model, 1, x, ids, w))
        finally:
            worker.stop()
            thread.join(10.0)
        thread.outcome(0)


def test_refusal_reaches_the_attention_side_naming_rank_and_reason(model: TinyMoEModel) -> None:
    """F = 2: rank 1 hosts no experts of layer 1 (a stale bank), rank 0 does."""
    x, ids, w = inputs(model, 7, seed=2)
    with served_by_a_stale_rank_1(model) as endpoint:
        with pytest.raises(
            AFDRefusedError,
            match=r"slot [01] was refused, its results are zeros \(FFN rank 1: AFDInputError",
        ):
            endpoint.exchange(1, x, ids, w)
        assert endpoint.idle()  # every slot came back: the endpoint is usable
        got = endpoint.exchange(0, x, ids, w)
        assert torch.equal(got, expected(model, 0, x, ids, w))


def desynchronised(endpoints: list[AttentionEndpoint], dep: Deployment, x, ids, w) -> None:  # type: ignore[no-untyped-def]
    """Session 0 sends layer 0, session 1 layer 1, into the same slot."""
    endpoints[0].send(0, 0, x, ids, w)
    endpoints[1].send(0, 1, x, ids, w)


def bad_local_id(endpoints: list[AttentionEndpoint], dep: Deployment, x, ids, w) -> None:  # type: ignore[no-untyped-def]
    """Both send layer 1; a slot id session 1 wrote in FFN rank 0's window is corrupted
    before session 0 sends (after, the worker may have batched the micro-batch already)."""
    endpoints[1].send(0, 1, x, ids, w)
    info, _ = get_window_group(dep.channels[0].group).ffn_views(dep.topology.ffn_ranks[0])
    slots = info[1, 0, 2:]  # [session, micro-batch, 2 + BS * E]
    slots[int((slots < 1_000_000).nonzero()[0])] = 99  # > expert_num, < the empty mark
    endpoints[0].send(0, 1, x, ids, w)


@pytest.mark.parametrize("bad", [desynchronised, bad_local_id], ids=lambda f: f.__name__)
def test_a_micro_batch_batching_refuses_is_answered_and_serving_goes_on(
    model: TinyMoEModel, bad: Callable[..., None]
) -> None:
    """A complete micro-batch whose window contents batching refuses (sessions that
    disagree on the layer; a local expert id out of range) is answered with zeros to every
    session and consumed, reported on the board, and the worker goes on: before, the
    worker's link failed on it, and a restarted worker met it again until its restart
    budget was spent."""
    cfg = config(2, 1, micro_batch_num=1, max_tokens_per_micro_batch=4)
    x, ids, w = inputs(model, 3, seed=3)
    with deployment_and_board(cfg, model.spec) as (dep, board):
        worker = FFNWorker(dep, dep.topology.ffn_ranks[0], banks(model), health=board)
        endpoints = [AttentionEndpoint(dep, s, health=board) for s in range(2)]
        thread = RankThread("ffn-0", worker.run)
        thread.start()
        try:
            bad(endpoints, dep, x, ids, w)
            rank = dep.topology.ffn_ranks[0]
            for e in endpoints:
                with pytest.raises(
                    AFDRefusedError,
                    match=rf"FFN rank {rank}: AFDBadMicroBatchError: FFN rank {rank} ",
                ):
                    e.receive(0)
            health = board.ffn(rank)
            assert (health.refusals, health.refused_layer, health.link_failures) == (1, -1, 0)
            assert thread.is_alive() and thread.error is None
            for e in endpoints:  # the next micro-batch is served exactly
                e.send(0, 1, x, ids, w)
            for e in endpoints:
                assert torch.equal(e.receive(0), expected(model, 1, x, ids, w))
        finally:
            worker.stop()
            thread.join(10.0)
        thread.outcome(0)


def test_pipelined_refusal_raises_at_the_refused_slot_only(model: TinyMoEModel) -> None:
    """M = 2, send/receive interleaved: slot 0 (layer 0) is served, slot 1 (layer 1) is
    refused by rank 1; receive(0) returns slot 0's exact result, receive(1) raises."""
    x, ids, w = inputs(model, 4, seed=7)
    with served_by_a_stale_rank_1(model) as endpoint:
        endpoint.send(0, 0, x, ids, w)
        endpoint.send(1, 1, x, ids, w)
        time.sleep(0.5)  # both slots served (and slot 1 refused) before either receive
        assert torch.equal(endpoint.receive(0), expected(model, 0, x, ids, w))
        with pytest.raises(AFDRefusedError, match=r"slot 1 was refused, .*FFN rank 1"):
            endpoint.receive(1)
        assert endpoint.idle()


# -- 3: waits that consult the board ---------------------------------------------------------------
def test_exchange_fails_at_once_when_an_ffn_rank_failed(model: TinyMoEModel) -> None:
    cfg = config(1, 2, micro_batch_num=2, max_tokens_per_micro_batch=4, wait_timeout_s=30.0)
    x, ids, w = inputs(model, 5, seed=3)
    with deployment_and_board(cfg, model.spec) as (dep, board):
        board.set_state(0, RankState.UP, 0)
        board.set_state(1, RankState.FAILED, 3, "its actor died and Ray will not restart it")
        endpoint = AttentionEndpoint(dep, 0, health=board)
        before = ffn_windows(dep)
        start = time.monotonic()
        with pytest.raises(
            AFDPeerError, match=r"FFN rank 1 failed for \d+\.\d s \(3 restarts\): its actor died"
        ):
            endpoint.exchange(1, x, ids, w)
        assert time.monotonic() - start < 1.0
        after = ffn_windows(dep)
        assert before == after  # refused before anything was written
        assert endpoint.idle()


def test_wait_fails_within_a_watch_period_when_a_rank_fails_meanwhile(model: TinyMoEModel) -> None:
    cfg = config(1, 1, micro_batch_num=1, max_tokens_per_micro_batch=4, wait_timeout_s=30.0)
    x, ids, w = inputs(model, 3, seed=4)
    with deployment_and_board(cfg, model.spec) as (dep, board):
        board.set_state(0, RankState.UP, 0)
        endpoint = AttentionEndpoint(dep, 0, health=board)
        endpoint.send(0, 1, x, ids, w)  # nobody serves it
        timer = threading.Timer(0.3, board.set_state, (0, RankState.FAILED, 0, "gone"))
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(AFDPeerError, match="FFN rank 0 failed"):
                endpoint.receive(0)
        finally:
            timer.cancel()
        assert time.monotonic() - start < 3.0  # not the 30 s deadline
        assert not endpoint.idle()  # the slot is lost: the caller knows the link is broken


def test_exchange_stops_at_once_when_a_rank_fails_midway(model: TinyMoEModel) -> None:
    """A failure seen inside a wait ends the exchange with that failure (not an ordering
    error from the slots after it)."""
    cfg = config(1, 1, micro_batch_num=2, max_tokens_per_micro_batch=4, wait_timeout_s=30.0)
    x, ids, w = inputs(model, 6, seed=8)
    with deployment_and_board(cfg, model.spec) as (dep, board):
        board.set_state(0, RankState.UP, 0)
        endpoint = AttentionEndpoint(dep, 0, health=board)
        timer = threading.Timer(0.3, board.set_state, (0, RankState.FAILED, 1, "gone for good"))
        timer.start()
        try:
            with pytest.raises(AFDPeerError, match=r"FFN rank 0 failed .*gone for good") as info:
                endpoint.exchange(1, x, ids, w)
        finally:
            timer.cancel()
        assert not isinstance(info.value, AFDRefusedError)


def test_a_recovery_that_never_ends_stops_extending(model: TinyMoEModel) -> None:
    """A rank RESTARTING forever: the wait runs past its deadline for at most
    ffn_stall_timeout_s + startup_timeout_s, then expires naming the rank's state."""
    cfg = config(
        1, 1, micro_batch_num=1, max_tokens_per_micro_batch=4, wait_timeout_s=0.3,
        ffn_stall_timeout_s=3.0, startup_timeout_s=0.5,
    )  # fmt: skip
    x, ids, w = inputs(model, 3, seed=9)
    with deployment_and_board(cfg, model.spec) as (dep, board):
        board.set_state(0, RankState.RESTARTING, 1, "killed after no answer")
        endpoint = AttentionEndpoint(dep, 0, health=board)
        endpoint.send(0, 1, x, ids, w)
        start = time.monotonic()
        with pytest.raises(
            AFDTimeoutError, match=r"FFN rank 0 restarting .*killed after no answer"
        ):
            endpoint.receive(0)
        took = time.monotonic() - start
        assert 3.5 <= took < 3.5 + 3.0, took  # extended, then bounded (one EXTEND_S of slack)


def test_wait_runs_past_its_deadline_while_a_rank_recovers(model: TinyMoEModel) -> None:
    cfg = config(1, 1, micro_batch_num=1, max_tokens_per_micro_batch=4, wait_timeout_s=0.5)
    x, ids, w = inputs(model, 3, seed=5)
    with deployment_and_board(cfg, model.spec) as (dep, board):
        board.set_state(0, RankState.RESTARTING, 1, "killed after no answer")
        endpoint = AttentionEndpoint(dep, 0, health=board)
        endpoint.send(0, 1, x, ids, w)

        def come_back() -> None:
            board.set_state(0, RankState.UP, 1)

        worker = FFNWorker(dep, 0, banks(model))
        thread = RankThread("ffn-0", worker.run)
        late = threading.Timer(2.0, lambda: (come_back(), thread.start()))
        late.start()
        try:
            got = endpoint.receive(0)  # 4 deadlines pass meanwhile
        finally:
            late.cancel()
            late.join()
            worker.stop()
            if thread.is_alive():
                thread.join(10.0)
        assert torch.equal(got, expected(model, 1, x, ids, w))


def test_expired_wait_names_every_ffn_rank_state(model: TinyMoEModel) -> None:
    cfg = config(1, 2, micro_batch_num=1, max_tokens_per_micro_batch=4, wait_timeout_s=0.3)
    x, ids, w = inputs(model, 3, seed=6)
    with deployment_and_board(cfg, model.spec) as (dep, board):
        for rank in dep.topology.ffn_ranks:
            board.set_state(rank, RankState.UP, rank)
        endpoint = AttentionEndpoint(dep, 0, health=board)
        endpoint.send(0, 1, x, ids, w)
        with pytest.raises(AFDTimeoutError) as info:
            endpoint.receive(0)
        message = str(info.value)
        assert "FFN rank 0 up (0 restarts); FFN rank 1 up (1 restarts)" in message
        assert "deadline 0.3 s passed" in message


# -- 4: the board ---------------------------------------------------------------------------------
def test_board_rows_read_back_through_a_shared_memory_attach() -> None:
    topology = RankTopology(3, 2)
    board = HealthBoard.create(topology, "shm")
    try:
        other = HealthBoard.attach(topology, str(board.token))
        assert [h.state for h in other.ffn_ranks()] == [RankState.STARTING] * 2
        board.set_state(1, RankState.STALLED, 2, "no answer to health probes for 3.0 s")
        board.report_refusal(0, 4, 1, "é" * 1000)  # longer than a row holds: cut, not spilled
        other.report_session_error(2, "AFDTimeoutError: late", broken=True)
        h1, h0 = other.ffn(1), other.ffn(0)
        assert (h1.state, h1.restarts, h1.detail) == (
            RankState.STALLED,
            2,
            "no answer to health probes for 3.0 s",
        )
        assert (h0.refusals, h0.refused_layer, h0.refused_slot) == (1, 4, 1) and set(h0.event) <= {
            "é",
            "\ufffd",
        }
        assert board.session(2) == dataclasses.replace(board.session(2), broken=True, errors=1)
        assert board.cannot_serve() and "attention session 2 stopped exchanging" in str(
            board.failed()
        )
        assert "FFN rank 1 stalled" in str(board.unhealthy())
        other.close()
    finally:
        board.close()


@pytest.mark.parametrize("value", [-1, 5, 2**40])
def test_board_values_no_writer_writes_read_as_unknown_and_failed(value: int) -> None:
    topology = RankTopology(1, 2)
    board = HealthBoard.create(topology, "inproc")
    for rank in topology.ffn_ranks:
        board.set_state(rank, RankState.UP, 0)
    assert not board.cannot_serve() and board.unhealthy() is None
    words, _ = health_board_views(board._transport.window(0), 2, 1)
    words[1, STATE_WORD] = value
    assert board.ffn(1).state is None
    assert board.cannot_serve()
    assert "FFN rank 1 in an unknown state" in str(board.failed())
