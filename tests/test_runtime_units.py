"""The runtime's parts one at a time: endpoint, MoE layer, router, experts, handshake, worker.

Everything runs in this process over in-process windows; FFN workers that must serve
concurrently run in threads (`afd_threads`), and every wait and join is bounded.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from afd_threads import (
    RankThread,
    config,
    counters_when_served,
    deployment,
    ffn_workers,
    receive_patiently,
)

from afd_dispatch import AFDInputError, get_window_group
from afd_dispatch.errors import AFDHandshakeError
from afd_dispatch.fixtures.tiny_moe import ColocatedMoE, TinyMoEConfig, TinyMoEModel
from afd_dispatch.kernels.reference import ffn_worker_batching as fwb
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.model.routing import RouterSpec, route
from afd_dispatch.runtime.attention import AFDMoELayer, AttentionEndpoint
from afd_dispatch.runtime.checkpoint import SharedExpertWeights
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.experts import ExpertBank, shared_expert, swiglu
from afd_dispatch.runtime.ffn_worker import FFNWorker
from afd_dispatch.runtime.trace import Tracer

H = 32


@pytest.fixture(scope="module")
def model() -> TinyMoEModel:
    return TinyMoEModel(
        TinyMoEConfig(
            vocab_size=16,
            hidden_size=H,
            num_layers=2,
            num_heads=2,
            num_experts=6,
            topk=2,
            moe_intermediate_size=16,
            shared_intermediate_size=24,
            max_positions=8,
            seed=5,
        )
    )


def rows_of(model: TinyMoEModel, tokens: int) -> int:
    """The rows an FFN rank hosting every expert serves for `tokens` tokens."""
    return tokens * (model.config.topk + model.spec.num_shared_experts)


def banks(model: TinyMoEModel) -> dict[int, ExpertBank]:
    """Every expert of every layer (an FFN rank given more than it hosts still serves)."""
    return model.expert_banks(True)


def colocated(model: TinyMoEModel) -> ColocatedMoE:
    return ColocatedMoE(banks(model), model.spec.num_shared_experts, torch.float32)


def moe_inputs(
    model: TinyMoEModel, tokens: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    ids, weights = route(torch.randn(tokens, model.config.num_experts, generator=g), model.router)
    return x, ids, weights


# -- AttentionEndpoint.exchange ------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokens", "micro_batches", "rounds"),
    [
        (21, 2, 3),  # T > M * BS = 8: three rounds of two slots, the last one part-filled
        (2, 3, 1),  # T < M: one token in slots 0 and 1, slot 2 sent empty
        (0, 2, 1),  # no tokens at all: every slot sent empty
    ],
)
def test_exchange_equals_colocated(
    model: TinyMoEModel, tokens: int, micro_batches: int, rounds: int
) -> None:
    cfg = config(1, 2, micro_batch_num=micro_batches, max_tokens_per_micro_batch=4, trace=True)
    reference = colocated(model)
    with (
        deployment(cfg, model.spec, torch.float32) as dep,
        ffn_workers(dep, lambda rank: banks(model)) as workers,
    ):
        endpoint = AttentionEndpoint(dep, 0)
        for layer in model.moe_layers:  # two exchanges: slots keep cycling in order
            x, ids, weights = moe_inputs(model, tokens, seed=layer)
            got = endpoint.exchange(layer, x, ids, weights)
            assert got.shape == (tokens, H)
            assert torch.equal(got, reference.moe(layer, x, ids, weights))
        expected = len(model.moe_layers) * rounds * micro_batches
        counters = counters_when_served(workers, expected)
    assert [c["micro_batches_served_total"] for c in counters] == [expected] * 2


def test_moe_layer_routes_from_logits(model: TinyMoEModel) -> None:
    """`AFDMoELayer` = route (softmax, or DeepSeek-V3 sigmoid + bias + groups) + exchange."""
    deepseek = RouterSpec(
        6, 2, "sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=3, topk_group=2
    )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, H, generator=g)
    logits = torch.randn(7, 6, generator=g)
    bias = torch.randn(6, generator=g)
    reference = colocated(model)
    cfg = config(1, 2, micro_batch_num=2, max_tokens_per_micro_batch=4)
    with (
        deployment(cfg, model.spec, torch.float32) as dep,
        ffn_workers(dep, lambda rank: banks(model)),
    ):
        endpoint = AttentionEndpoint(dep, 0)
        layer = AFDMoELayer(endpoint, 1, model.router)
        want = reference.moe(1, x, *route(logits, model.router))
        assert torch.equal(layer(x, logits), want)
        # precomputed ids and weights bypass the router (weights taken as float32)
        ids, weights = route(logits, model.router)
        assert torch.equal(layer(x, topk_ids=ids, topk_weights=weights.double()), want)

        grouped = AFDMoELayer(endpoint, 0, deepseek)
        want = reference.moe(0, x, *route(logits, deepseek, bias))
        assert torch.equal(grouped(x, logits, score_bias=bias), want)
        with pytest.raises(AFDInputError, match="router_logits"):
            layer(x)


# -- send / receive order ------------------------------------------------------------------
def test_out_of_order_send_receive_is_refused(model: TinyMoEModel) -> None:
    """Each refusal names the slot expected, and writes nothing to any window."""
    x, ids, weights = moe_inputs(model, 3, seed=0)
    cfg = config(1, 1, micro_batch_num=2, max_tokens_per_micro_batch=4)
    with deployment(cfg, model.spec, torch.float32) as dep:
        windows = get_window_group(dep.channels[0].group)
        endpoint = AttentionEndpoint(dep, 0)
        ffn_rank = dep.topology.ffn_ranks[0]

        def refused(call: Any, match: str) -> None:
            before = windows.read_window(ffn_rank)
            with pytest.raises(AFDInputError, match=match):
                call()
            assert windows.read_window(ffn_rank) == before

        refused(lambda: endpoint.receive(0), "a slot that was sent")
        refused(lambda: endpoint.send(1, 0, x, ids, weights), r"0 \(cyclic send order\)")
        big = torch.zeros(5, H)
        refused(lambda: endpoint.send(0, 0, big, ids, weights), "BS = 4")
        refused(lambda: endpoint.send(0, 0, x, ids[:2], weights), "topk_ids")

        endpoint.send(0, 0, x, ids, weights)
        refused(lambda: endpoint.send(0, 0, x, ids, weights), r"1 \(cyclic send order\)")
        refused(lambda: endpoint.receive(1), r"0 \(results come back in send order\)")
        refused(lambda: endpoint.exchange(0, x, ids, weights), "no micro-batch in flight")
        endpoint.send(1, 0, x, ids, weights)
        # both slots in flight: slot 0 is next in cyclic order but not yet received
        refused(lambda: endpoint.send(0, 0, x, ids, weights), "a slot whose result was received")


# -- routing --------------------------------------------------------------------------------
def direct_softmax_topk(
    logits: torch.Tensor, k: int, normalise: bool, scale: float
) -> tuple[list[list[int]], torch.Tensor]:
    ids, rows = [], []
    for row in logits.tolist():
        m = max(row)
        exp = [pow(2.718281828459045, v - m) for v in row]
        probs = [e / sum(exp) for e in exp]
        chosen = sorted(range(len(row)), key=lambda e: -probs[e])[:k]
        w = [probs[e] for e in chosen]
        if normalise:
            w = [v / sum(w) for v in w]
        ids.append(chosen)
        rows.append([v * scale for v in w])
    return ids, torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize(("normalise", "scale"), [(False, 1.0), (True, 1.0), (True, 2.5)])
def test_route_softmax_topk(normalise: bool, scale: float) -> None:
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    spec = RouterSpec(8, 3, norm_topk_prob=normalise, routed_scaling_factor=scale)
    ids, weights = route(logits, spec)
    want_ids, want_weights = direct_softmax_topk(logits.double(), 3, normalise, scale)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.tolist() == want_ids
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    if normalise:  # the scaling factor is folded into the weights combine multiplies by
        torch.testing.assert_close(weights.sum(-1), torch.full((32,), scale))


def direct_deepseek_v3(
    logits: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int, scale: float
) -> tuple[list[list[int]], torch.Tensor]:
    """noaux_tc written out token by token: groups by the sum of their 2 best biased
    scores, top-k of the biased scores among the kept groups, weights from the unbiased
    sigmoid scores, renormalised, times the scaling factor."""
    experts = logits.shape[1]
    per_group = experts // n_group
    ids, rows = [], []
    for row in logits.tolist():
        score = [1 / (1 + pow(2.718281828459045, -v)) for v in row]
        biased = [s + b for s, b in zip(score, bias.tolist(), strict=True)]
        group_score = [
            sum(sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)[:2])
            for g in range(n_group)
        ]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for e in range(experts) if e // per_group in kept]
        chosen = sorted(candidates, key=lambda e: -biased[e])[:k]
        w = [score[e] for e in chosen]
        ids.append(chosen)
        rows.append([v / sum(w) * scale for v in w])
    return ids, torch.tensor(rows, dtype=torch.float32)


def test_route_deepseek_v3_group_limited() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 16, generator=g)
    bias = 0.5 * torch.randn(16, generator=g)
    spec = RouterSpec(16, 4, "sigmoid", True, 2.5, n_group=4, topk_group=2)
    ids, weights = route(logits, spec, bias)
    want_ids, want_weights = direct_deepseek_v3(logits.double(), bias.double(), 4, 4, 2, 2.5)
    assert ids.tolist() == want_ids
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-6)
    # the groups and the bias both changed some choice (else this would test less)
    flat = RouterSpec(16, 4, "sigmoid", True, 2.5)
    assert route(logits, flat, bias)[0].tolist() != want_ids
    assert route(logits, spec)[0].tolist() != want_ids
    # softmax routing takes no groups: refused rather than silently ignored
    with pytest.raises(AFDInputError, match="n_group"):
        RouterSpec(16, 4, "softmax", n_group=4, topk_group=2)


# -- batch invariance of the experts --------------------------------------------------------
def expert_weights(seed: int, hidden: int = 64, inter: int = 32) -> SharedExpertWeights:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    return SharedExpertWeights(
        rand(inter, hidden), rand(inter, hidden), rand(hidden, inter), rand(1, hidden)
    )


ROW_COUNTS = (0, 1, 2, 3, 5, 8, 15, 16, 17, 33, 40)


def row_results(fn: Any, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, rows computed in some other batch, the same rows of the 40-row batch)."""
    full = fn(x)
    for n in ROW_COUNTS:
        yield f"first {n} rows", fn(x[:n]), full[:n]
    for i in (0, 17, 39):
        yield f"row {i} alone", fn(x[i : i + 1]), full[i : i + 1]
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    yield "permuted", fn(x[perm]), full[perm]
    others = torch.randn(9, x.shape[1], generator=torch.Generator().manual_seed(1))
    yield "after 9 other rows", fn(torch.cat([others, x]))[9:], full


@pytest.mark.parametrize("kind", ["swiglu", "shared_expert"])
def test_batch_invariant_experts(kind: str) -> None:
    w = expert_weights(4)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(5))

    def fn(rows: torch.Tensor) -> torch.Tensor:
        return swiglu(rows, w, True) if kind == "swiglu" else shared_expert(rows, w, True)

    for what, got, want in row_results(fn, x):
        assert torch.equal(got, want), what


# -- the handshake --------------------------------------------------------------------------
def test_params_equal_for_the_same_plan(model: TinyMoEModel) -> None:
    keys: dict[str, Any] = {"expert_replicas": {0: 2}, "shared_expert_ranks": (2,)}
    cfg = config(2, 3, **keys)
    a, b = Deployment(cfg, model.spec, torch.float32), Deployment(cfg, model.spec, torch.float32)
    assert a.params() == b.params()
    a.params().check_matches(b.params(), "attention", "FFN 1")  # no error
    params = a.params().to_dict()
    assert params["num_experts"] == 6 and params["shared"] == 1 and params["world_size"] == 5


@pytest.mark.parametrize(
    ("change", "dtype", "fields"),
    [
        ({"micro_batch_num": 3}, torch.float32, {"micro_batches": ("2", "3")}),
        ({"expert_replicas": {0: 2, 1: 2}}, torch.float32, {"table_digest": None}),
        ({}, torch.bfloat16, {"dtype": ("'torch.float32'", "'torch.bfloat16'")}),
        (
            {"max_tokens_per_micro_batch": 8, "quant_mode": "int8"},
            torch.float32,
            {"tokens": ("16", "8"), "quant_mode": ("0", "2")},
        ),
    ],
)
def test_params_mismatch_names_field_and_values(
    model: TinyMoEModel,
    change: dict[str, Any],
    dtype: torch.dtype,
    fields: dict[str, tuple[str, str] | None],
) -> None:
    keys: dict[str, Any] = {
        "micro_batch_num": 2,
        "max_tokens_per_micro_batch": 16,
        "expert_replicas": {0: 2},
        "shared_expert_ranks": (2,),
    }
    base = config(2, 3, **keys)
    mine = Deployment(base, model.spec, torch.float32).params()
    theirs = Deployment(dataclasses.replace(base, **change), model.spec, dtype).params()
    with pytest.raises(AFDHandshakeError) as info:
        mine.check_matches(theirs, "attention", "FFN 2")
    message = str(info.value)
    for name, values in fields.items():
        if values is None:
            values = (repr(getattr(mine, name)), repr(getattr(theirs, name)))
        assert f"{name}: attention has {values[0]}, FFN 2 has {values[1]}" in message
    named = {part.split(":")[0].strip() for part in message.split(": ", 1)[1].split("; ")}
    differing = {k for k, v in mine.to_dict().items() if theirs.to_dict()[k] != v}
    assert named == differing == set(fields)  # every differing field named, and no other


# -- the FFN worker -------------------------------------------------------------------------
def test_worker_stops_promptly_while_idle(model: TinyMoEModel) -> None:
    cfg = config(1, 1, micro_batch_num=2, max_tokens_per_micro_batch=4, wait_timeout_s=60.0)
    with deployment(cfg, model.spec, torch.float32) as dep:
        worker = FFNWorker(dep, 0, banks(model))
        thread = RankThread("ffn-0", worker.run)
        thread.start()
        try:
            time.sleep(0.2)  # inside the (60 s) wait for a micro-batch
            assert thread.is_alive()
            start = time.monotonic()
            worker.stop()
            thread.outcome(timeout_s=2.0)  # returns normally, no exception
            assert time.monotonic() - start < 1.0
        finally:
            worker.stop()
            thread.join(5.0)
        # stopped before it ever ran: run() returns at once
        early = FFNWorker(dep, 0, banks(model))
        early.stop()
        again = RankThread("ffn-0-early", early.run)
        again.start()
        again.outcome(timeout_s=2.0)


def test_worker_keeps_serving_after_idle_deadlines(
    model: TinyMoEModel, caplog: pytest.LogCaptureFixture
) -> None:
    """A deadline passing with no traffic is idleness, not an error: `run` keeps polling."""
    caplog.set_level(logging.DEBUG, logger="afd_dispatch.runtime.ffn_worker")
    idle_s = 0.3
    cfg = config(1, 1, micro_batch_num=2, max_tokens_per_micro_batch=4, wait_timeout_s=idle_s)
    x, ids, weights = moe_inputs(model, 3, seed=9)
    with (
        deployment(cfg, model.spec, torch.float32) as dep,
        ffn_workers(dep, lambda rank: banks(model)) as workers,
    ):
        time.sleep(4 * idle_s)  # several deadlines pass with nothing sent
        (_, thread) = workers[0]
        assert thread.is_alive() and thread.error is None
        idle = [r for r in caplog.records if "idle" in r.getMessage()]
        assert len(idle) >= 2  # the deadlines did pass (logged at debug level)
        endpoint = AttentionEndpoint(dep, 0)
        endpoint.send(0, 1, x, ids, weights)
        got = receive_patiently(endpoint, 0)
        assert torch.equal(got, colocated(model).moe(1, x, ids, weights))


@pytest.mark.parametrize("stopped", [False, True], ids=["dropped", "stopped"])
@pytest.mark.parametrize("window_groups", ["shared", "per_micro_batch"])
def test_restarted_worker_resumes_at_the_next_micro_batch(
    model: TinyMoEModel, window_groups: str, stopped: bool
) -> None:
    """Serve slot 0, replace the worker by a new one on the same windows: it serves 1."""
    cfg = config(
        1, 1, micro_batch_num=2, max_tokens_per_micro_batch=4, wait_timeout_s=3.0,
        window_groups=window_groups,
    )  # fmt: skip
    reference = colocated(model)
    inputs = [moe_inputs(model, 3, seed=s) for s in range(3)]
    with deployment(cfg, model.spec, torch.float32) as dep:
        endpoint = AttentionEndpoint(dep, 0)
        first = FFNWorker(dep, 0, banks(model))
        endpoint.send(0, 0, *inputs[0])
        assert first.serve_one() == 3 * 3  # K routed + 1 shared row per token
        assert torch.equal(endpoint.receive(0), reference.moe(0, *inputs[0]))
        if stopped:
            first.stop()
        del first
        gc.collect()

        tracer = Tracer("FFN 0 (restarted)")
        second = FFNWorker(dep, 0, banks(model), tracer=tracer)
        endpoint.send(1, 0, *inputs[1])
        assert second.serve_one() == 9  # slot 1, not a wait on the (empty) slot 0
        assert torch.equal(endpoint.receive(1), reference.moe(0, *inputs[1]))
        endpoint.send(0, 1, *inputs[2])  # and then around the cycle again
        assert second.serve_one() == 9
        assert torch.equal(endpoint.receive(0), reference.moe(1, *inputs[2]))
        spans, _ = tracer.snapshot()
        assert [(s.micro_batch, s.layer) for s in spans if s.name == "experts"] == [(1, 0), (0, 1)]


class Killed(BaseException):
    """Ends a call where a SIGKILL would have stopped the process (not an `Exception`, so
    nothing on the way catches it)."""


# Where batching's consumption of a micro-batch is cut: after emptying the slot ids (the
# fence before the flags), after clearing the flags (advancing the index), after advancing
# the polling index (the count).
CUT_BATCHING = {
    "ids_emptied": ("store_fence", None),
    "flags_cleared": ("advance_polling_index", None),
    "index_advanced": ("put", "REF_BATCHED_COUNT"),
}


def die_while_collecting(
    worker: FFNWorker, slot: int, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leave `worker`'s link as a process killed at `when` of collecting `slot` would."""
    link: Any = worker.link
    if when == "after_collect":  # collected and journaled; never given back
        assert link.collect(slot).count == 9
        return
    link._before_batching(slot)  # the info rows are copied; then it dies...
    ctx = link._ctx[slot]

    def batching() -> None:
        link.ops.npu_ffn_worker_batching(
            ctx, link.expert_num, link._max_out, token_dtype=link._token_dtype, need_schedule=1
        )

    if when == "inside_collect":  # ...once batching consumed the slot, before the journal
        batching()
    elif when in CUT_BATCHING:  # ...halfway through batching's consumption
        name, field = CUT_BATCHING[when]
        module = fwb if name == "store_fence" else sc
        real = getattr(module, name)
        target = getattr(sc, field) if field else None

        def dies(*args: Any) -> Any:
            if target is None or args[1] == target:
                raise Killed
            return real(*args)

        with monkeypatch.context() as patch:
            patch.setattr(module, name, dies)
            with pytest.raises(Killed):
                batching()


@pytest.mark.parametrize(
    "when", ["before_batching", *CUT_BATCHING, "inside_collect", "after_collect"]
)
@pytest.mark.parametrize("quant_mode", ["none", "int8"])
@pytest.mark.parametrize("window_groups", ["shared", "per_micro_batch"])
def test_worker_that_died_while_collecting_is_redone_by_its_successor(
    model: TinyMoEModel,
    window_groups: str,
    quant_mode: str,
    when: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker dies while collecting slot 1: before batching consumed the window's flags,
    at any step of batching's consumption, after it but before the journal recorded the
    batch, or after collecting (never given back). Its successor on the same windows
    serves slot 1 first, with the result an undisturbed worker gives, then goes on around
    the cycle."""
    cfg = config(
        1, 1, micro_batch_num=2, max_tokens_per_micro_batch=4, wait_timeout_s=3.0,
        window_groups=window_groups, quant_mode=quant_mode,
    )  # fmt: skip
    inputs = [moe_inputs(model, 3, seed=s) for s in range(3)]
    with deployment(cfg, model.spec, torch.float32) as dep:
        endpoint = AttentionEndpoint(dep, 0)
        first = FFNWorker(dep, 0, banks(model))
        endpoint.send(0, 0, *inputs[0])
        first.serve_one()
        undisturbed = endpoint.receive(0)
        endpoint.send(1, 0, *inputs[0])
        die_while_collecting(first, 1, when, monkeypatch)
        del first
        gc.collect()

        tracer = Tracer("FFN 0 (restarted)")
        second = FFNWorker(dep, 0, banks(model), tracer=tracer)
        assert second.serve_one() == 9  # slot 1 again
        assert torch.equal(endpoint.receive(1), undisturbed)
        endpoint.send(0, 1, *inputs[2])  # the cycle goes on: slot 0, then 1
        assert second.serve_one() == 9
        endpoint.receive(0)
        endpoint.send(1, 1, *inputs[1])
        assert second.serve_one() == 9
        endpoint.receive(1)
        third = FFNWorker(dep, 0, banks(model))  # everything was given back: nothing to redo
        assert third.link.pending() is None
        spans, _ = tracer.snapshot()
        assert [(s.micro_batch, s.layer) for s in spans if s.name == "experts"] == [
            (1, 0),
            (0, 1),
            (1, 1),
        ]


# (cut before the flags were cleared, the header is not consumed: the session cannot move on)
@pytest.mark.parametrize("when", ["flags_cleared", "index_advanced", "inside_collect"])
@pytest.mark.parametrize("window_groups", ["shared", "per_micro_batch"])
def test_a_session_that_moved_on_past_a_killed_collect_is_not_rewound(
    model: TinyMoEModel, window_groups: str, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slot 1 carries no tokens, so the session waits for nothing from the FFN rank: once
    batching consumed the header it moves on and sends its next messages, slot 1's into the
    very info row the dead worker journaled. The successor must not put the old header back
    over it (the message would be lost and the rank wait forever): it serves it."""
    cfg = config(
        1, 1, micro_batch_num=2, max_tokens_per_micro_batch=4, wait_timeout_s=3.0,
        window_groups=window_groups,
    )  # fmt: skip
    reference = colocated(model)
    x, ids, w = moe_inputs(model, 3, seed=1)
    y, ids2, w2 = moe_inputs(model, 3, seed=2)
    with deployment(cfg, model.spec, torch.float32) as dep:
        endpoint = AttentionEndpoint(dep, 0)
        first = FFNWorker(dep, 0, banks(model))
        endpoint.send(0, 0, x, ids, w)
        first.serve_one()
        endpoint.receive(0)
        endpoint.send(1, 0, x[:0], ids[:0], w[:0])
        die_while_collecting(first, 1, when, monkeypatch)
        del first
        gc.collect()
        assert endpoint.receive(1).shape == (0, H)  # nothing to wait for
        endpoint.send(0, 1, x, ids, w)
        endpoint.send(1, 1, y, ids2, w2)  # into the row the dead worker journaled
        second = FFNWorker(dep, 0, banks(model))
        assert sorted(second.serve_one() for _ in range(2)) == [rows_of(model, 3)] * 2
        assert torch.equal(endpoint.receive(0), reference.moe(1, x, ids, w))
        assert torch.equal(endpoint.receive(1), reference.moe(1, y, ids2, w2))


class CutF2A:
    """The reference ops, except that `npu_ffn_to_attention` delivers only the rows
    `delivers(row, session)` picks, and records how many rows each session got; with
    `dies`, it then raises `Killed`, as a process killed halfway through giving a
    micro-batch back (some result rows and flags written, the journal not cleared)."""

    def __init__(self, inner: Any, delivers: Any = lambda i, s: True, dies: bool = False) -> None:
        self.inner, self.delivers, self.dies = inner, delivers, dies
        self.rows_per_session: list[dict[int, int]] = []  # per call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def npu_ffn_to_attention(self, x: torch.Tensor, *ids_count: Any, **kwargs: Any) -> None:
        ids, count, rest = ids_count[:4], ids_count[4], ids_count[5:]
        sessions = ids[0][: int(count[0])].tolist()
        picked = [i for i, s in enumerate(sessions) if self.delivers(i, s)]
        self.rows_per_session.append(
            {s: sum(sessions[i] == s for i in picked) for s in sorted(set(sessions))}
        )
        index = torch.tensor(picked, dtype=torch.int64)
        self.inner.npu_ffn_to_attention(
            x.index_select(0, index), *(t.index_select(0, index) for t in ids),
            torch.tensor([len(picked)]), *rest, **kwargs,
        )  # fmt: skip
        if self.dies:
            raise Killed


# Which rows a worker killed inside give-back had delivered (row index, session)
GIVE_BACK_CUTS = {
    "nothing": lambda i, s: False,
    "first_half": lambda i, s: i % 2 == 0,
    "everything": lambda i, s: True,
    "session_0_only": lambda i, s: s == 0,
}


@dataclasses.dataclass
class TwoSessions:
    """A = 2, F = 1, M = 2 deployment whose FFN worker died inside give-back of slot 1."""

    dep: Deployment
    endpoints: list[AttentionEndpoint]
    inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    delivered: dict[int, int]  # rows per session the dead worker gave back


@contextmanager
def killed_inside_give_back(
    model: TinyMoEModel, window_groups: str, cut: str
) -> Iterator[TwoSessions]:
    """Both sessions send slot 0 (layer 0, inputs 0), served and received exactly; then
    slot 1 (layer 0, inputs 1), whose worker dies in F2A having given back `cut`'s rows.
    Inputs 2 and 3 are left for layer 1."""
    cfg = config(
        2, 1, micro_batch_num=2, max_tokens_per_micro_batch=4, wait_timeout_s=3.0,
        window_groups=window_groups,
    )  # fmt: skip
    reference = colocated(model)
    inputs = {(s, i): moe_inputs(model, 3, seed=10 * s + i) for s in range(2) for i in range(4)}
    with deployment(cfg, model.spec, torch.float32) as dep:
        endpoints = [AttentionEndpoint(dep, s) for s in range(2)]
        first = FFNWorker(dep, 0, banks(model))
        for s in (0, 1):
            endpoints[s].send(0, 0, *inputs[s, 0])
        first.serve_one()
        for s in (0, 1):
            assert torch.equal(endpoints[s].receive(0), reference.moe(0, *inputs[s, 0]))
            endpoints[s].send(1, 0, *inputs[s, 1])
        dying = first.link.ops = CutF2A(first.link.ops, GIVE_BACK_CUTS[cut], dies=True)
        with pytest.raises(Killed):
            first.serve_one()
        (delivered,) = dying.rows_per_session
        del first
        gc.collect()
        yield TwoSessions(dep, endpoints, inputs, delivered)


@pytest.mark.parametrize(
    ("cut", "session_0_moves_on"),
    # session 0 can combine (and move on) only once all of its rows arrived
    [(cut, False) for cut in GIVE_BACK_CUTS] + [("everything", True), ("session_0_only", True)],
)
@pytest.mark.parametrize("window_groups", ["shared", "per_micro_batch"])
def test_worker_killed_while_giving_back_redelivers_only_what_never_arrived(
    model: TinyMoEModel, window_groups: str, cut: str, session_0_moves_on: bool
) -> None:
    """Two sessions. FFN worker 1 dies inside `npu_ffn_to_attention` of slot 1, having
    delivered some of its rows. If session 0 got all of its rows it may combine them and
    send its next micro-batches, into the very window cells the dead batch came from,
    before a successor starts. The successor gives back only the rows that never arrived:
    every session gets each micro-batch's exact result once, and no session gets results
    it has already combined again (a second delivery would pose as its next micro-batch's
    results)."""
    reference = colocated(model)
    with killed_inside_give_back(model, window_groups, cut) as killed:
        dep, endpoints, inputs = killed.dep, killed.endpoints, killed.inputs
        delivered = killed.delivered

        def send(slot: int, layer: int, i: int, sessions: tuple[int, ...] = (0, 1)) -> None:
            for s in sessions:
                endpoints[s].send(slot, layer, *inputs[s, i])

        def receive(slot: int, layer: int, i: int, sessions: tuple[int, ...] = (0, 1)) -> None:
            for s in sessions:
                got = endpoints[s].receive(slot)
                assert torch.equal(got, reference.moe(layer, *inputs[s, i])), (s, slot, i)

        if session_0_moves_on:  # combine slot 1, then refill slot 0 and slot 1's cells
            receive(1, 0, 1, sessions=(0,))
            send(0, 1, 2, sessions=(0,))
            send(1, 1, 3, sessions=(0,))

        second = FFNWorker(dep, 0, banks(model))
        recording = second.link.ops = CutF2A(second.link.ops)
        if cut == "everything":
            assert second.link.pending() is None  # all of it arrived: nothing to redo
        else:
            assert second.serve_one() > 0  # slot 1 again
            (redelivered,) = recording.rows_per_session
            total = {s: rows_of(model, 3) for s in (0, 1)}
            assert redelivered == {s: total[s] - delivered.get(s, 0) for s in redelivered}
            assert set(redelivered) | {s for s, n in delivered.items() if n == total[s]} == {0, 1}
        if session_0_moves_on:  # its new slot 1 is not served: no result may pose as it
            channel = dep.channels[1]
            flags, _ = get_window_group(channel.group).attn_views(endpoints[0].rank)
            tokens = inputs[0, 3][0].shape[0]  # (rows past them are A2F's padding, flagged)
            assert int(flags[channel.window_micro_batch, :tokens].count_nonzero()) == 0
        receive(1, 0, 1, sessions=(1,) if session_0_moves_on else (0, 1))
        if not session_0_moves_on:
            send(0, 1, 2, sessions=(0,))
        send(0, 1, 2, sessions=(1,))
        assert second.serve_one() > 0  # slot 0
        receive(0, 1, 2)
        if not session_0_moves_on:
            send(1, 1, 3, sessions=(0,))
        send(1, 1, 3, sessions=(1,))
        assert second.serve_one() > 0  # slot 1
        receive(1, 1, 3)
        assert FFNWorker(dep, 0, banks(model)).link.pending() is None


@pytest.mark.parametrize("window_groups", ["shared", "per_micro_batch"])
def test_a_session_combining_while_the_successor_looks_is_not_redelivered(
    model: TinyMoEModel, window_groups: str
) -> None:
    """Session 0 got all of slot 1's rows from the dead worker; it combines just as the
    successor looks at its window (found by a reviewer: with the receipt count read before
    the flags, a combine in between read as "never delivered", and session 0's next slot 1
    received its previous results again). Only session 1's rows are given back."""
    reference = colocated(model)
    with killed_inside_give_back(model, window_groups, "session_0_only") as killed:
        dep, ep, inputs = killed.dep, killed.endpoints, killed.inputs
        group = get_window_group(dep.channels[1].group)
        real, combined = group.attn_views, []

        def attn_views(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
            if rank == ep[0].rank and not combined:  # session 0 combines right now
                combined.append(ep[0].receive(1))
            return real(rank)

        group.attn_views = attn_views  # type: ignore[method-assign]
        try:
            second = FFNWorker(dep, 0, banks(model))
        finally:
            del group.attn_views
        assert torch.equal(combined[0], reference.moe(0, *inputs[0, 1]))
        recording = second.link.ops = CutF2A(second.link.ops)
        ep[0].send(0, 1, *inputs[0, 2])
        ep[0].send(1, 1, *inputs[0, 3])  # refills slot 1's cells
        second.serve_one()  # the redo of slot 1
        assert recording.rows_per_session == [{1: rows_of(model, 3)}]  # session 1 only
        assert torch.equal(ep[1].receive(1), reference.moe(0, *inputs[1, 1]))
        ep[1].send(0, 1, *inputs[1, 2])
        second.serve_one()  # slot 0
        for s in (0, 1):
            assert torch.equal(ep[s].receive(0), reference.moe(1, *inputs[s, 2]))
        ep[1].send(1, 1, *inputs[1, 3])
        second.serve_one()  # slot 1
        for s in (0, 1):
            assert torch.equal(ep[s].receive(1), reference.moe(1, *inputs[s, 3]))


def test_fresh_windows_start_at_slot_zero(model: TinyMoEModel) -> None:
    """A worker on new windows starts at slot 0 even where a context storage was used
    before (the windows of a group are zeroed at creation)."""
    for _ in range(2):
        cfg = config(1, 1, micro_batch_num=2, max_tokens_per_micro_batch=4, wait_timeout_s=3.0)
        x, ids, weights = moe_inputs(model, 2, seed=0)
        with deployment(cfg, model.spec, torch.float32) as dep:
            endpoint = AttentionEndpoint(dep, 0)
            worker = FFNWorker(dep, 0, banks(model))
            endpoint.send(0, 0, x, ids, weights)
            assert worker.serve_one() == 6
            assert torch.equal(endpoint.receive(0), colocated(model).moe(0, x, ids, weights))
