"""`bench --level loop`: the runtime around the ops, attention side.

(a) Host overhead: `AttentionEndpoint.send` + `receive` per (layer, micro-batch) at a tiny
    shape (op work negligible) with an FFN worker thread serving, minus the time spent
    inside the op calls those same sends and receives make (A2F and combine, the combine's
    wait for the FFN side included), both measured in the same run. Eager mode.
(b) Pipelining: step time of M = 2 and 3 micro-batches in flight against M = 1, with
    balanced synthetic work: the attention side's `pre` burns real torch compute (a matmul
    chain), the FFN side runs real SwiGLU experts sized to take as long. The FFN worker
    runs in another *process* over shared-memory windows, one torch thread per side, so
    on two cores both sides really run at once. Headline: M = 2's step time over the ideal
    halving of M = 1's.
(c) Graph readiness: the attention-side AFD MoE call (padding, A2F and combine through
    the registered custom ops `torch.ops.afd.*`) compiled with
    `torch.compile(fullgraph=True)`; eager and compiled host overhead over the raw op
    implementations called with the same (pre-padded) arguments.
(d) Memory (`afd_dispatch.bench.memory`): an FFN worker process over 10,000 micro-batches,
    its resident set and Python heap before and after, its tensor allocations per
    micro-batch; and the peak resident set of each FFN process this level starts.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

import torch
import torch.nn.functional as F

from afd_dispatch.bench.report import (
    OtherLoad,
    Report,
    Row,
    Target,
    interleaved,
    median,
    peak_rss_row,
    process_memory,
    schedstat,
    timed,
    torch_threads,
)
from afd_dispatch.config import AFDConfig
from afd_dispatch.kernels import reference as ref
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.kernels.reference.attention_to_ffn import attention_to_ffn
from afd_dispatch.kernels.reference.attention_worker_combine import attention_worker_combine
from afd_dispatch.layout import FLAG_OFFSET, WindowLayout, token_dtype_code
from afd_dispatch.placement import build_expert_rank_table
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.checkpoint import ExpertWeights
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.experts import ExpertBank
from afd_dispatch.runtime.ffn_worker import FFNWorker
from afd_dispatch.runtime.model_spec import MoESpec
from afd_dispatch.runtime.pipeline import run_pipelined
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import (
    WindowGroupSpec,
    attach_window_group,
    create_window_group,
    get_window_group,
)

OVERHEAD_TARGET_US = 50.0
PIPELINE_TARGET = 1.2  # M = 2 step time / (M = 1 step time / 2)
WAIT_TIMEOUT_S = 60.0
START_TIMEOUT_S = 180.0  # spawning an interpreter that imports torch, on a busy host
JOIN_TIMEOUT_S = 30.0
CALL_SAMPLES = 10  # (c): samples per --repeat; one call is short and cheap
_names = itertools.count()


@dataclass(frozen=True)
class MoEShape:
    """A synthetic MoE model: L layers, all MoE, float32, no shared expert."""

    hidden: int  # H
    tokens: int  # tokens per step on the attention rank (all in one micro-batch at M = 1)
    topk: int  # K
    experts: int
    intermediate: int  # SwiGLU width of every expert
    layers: int

    def spec(self) -> MoESpec:
        return MoESpec(
            architecture="qwen3_moe",
            hidden_size=self.hidden,
            num_layers=self.layers,
            moe_layers=tuple(range(self.layers)),
            num_experts=self.experts,
            topk=self.topk,
            moe_intermediate_size=self.intermediate,
            dtype=torch.float32,
        )


# (a) and (c): tiny, so the ops' own work is small next to the host code around them.
TINY = MoEShape(hidden=64, tokens=8, topk=2, experts=4, intermediate=32, layers=4)
# (b): enough work per layer that AFD's per-message cost is a small part of a step. Two
# experts, top-2: each expert gets every token, so its matmuls keep a size where their cost
# stays about linear in the rows when a step is split into M micro-batches (with 8 experts
# of 32-64 rows, splitting alone cost the experts +40% at M = 2 on the CPU: a property of
# small matmuls, not of the AFD pipeline this measures).
PIPELINE_SHAPES = {
    "small": MoEShape(hidden=256, tokens=96, topk=2, experts=2, intermediate=256, layers=2),
    "decode": MoEShape(hidden=1024, tokens=384, topk=2, experts=2, intermediate=512, layers=4),
}


def make_banks(shape: MoEShape, seed: int = 0) -> dict[int, ExpertBank]:
    """Every layer's routed experts, random SwiGLU weights (1/sqrt(fan_in) scale)."""
    gen = torch.Generator().manual_seed(seed)
    h, i = shape.hidden, shape.intermediate

    def rand(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / math.sqrt(cols)

    return {
        layer: ExpertBank(
            shape.experts,
            {e: ExpertWeights(rand(i, h), rand(i, h), rand(h, i)) for e in range(shape.experts)},
        )
        for layer in range(shape.layers)
    }


def config_for(shape: MoEShape, micro_batches: int, tokens_per_slot: int) -> AFDConfig:
    """A = 1, F = 1, reference backend, under a group name no other run uses."""
    return AFDConfig(
        num_attention_workers=1,
        num_ffn_workers=1,
        micro_batch_num=micro_batches,
        max_tokens_per_micro_batch=tokens_per_slot,
        backend="reference",
        group=f"afdbench{os.getpid()}x{next(_names)}",
        wait_timeout_s=WAIT_TIMEOUT_S,
    )


def routing(tokens: int, shape: MoEShape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (tokens, K) int32 distinct per token, weights (tokens, K) float32 summing to 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, shape.experts, generator=gen).argsort(dim=1)[:, : shape.topk]
    weights = torch.rand(tokens, shape.topk, generator=gen) + 0.1
    return ids.to(torch.int32).contiguous(), weights / weights.sum(dim=1, keepdim=True)


# The reference link waits for a micro-batch's results (as combine would) before combine
# clears their flags; that wait is the op's, not the endpoint's
WAIT = "wait_for_next_results"


class TimedOps(types.ModuleType):
    """A backend module whose chosen ops add the seconds spent inside them to
    `seconds[op name]`."""

    def __init__(self, inner: types.ModuleType, timed_ops: Sequence[str]) -> None:
        super().__init__(f"{inner.__name__}.timed")
        self.seconds = dict.fromkeys(timed_ops, 0.0)
        for name in dir(inner):
            if not name.startswith("__"):
                setattr(self, name, getattr(inner, name))
        for name in timed_ops:
            setattr(self, name, self._timed(name, getattr(inner, name)))

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return call

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


# -- (a) host overhead of the endpoint -------------------------------------------------------
def solo_overhead(repeat: int, micro_batches: int = 2) -> float:
    """Seconds of host time per (layer, micro-batch) of send + receive with no FFN side:
    the window flags are written directly between the calls (untimed), so no op waits and
    no other thread competes for the GIL. The floor under `endpoint_overhead`."""
    shape = TINY
    dep = Deployment(config_for(shape, micro_batches, shape.tokens), shape.spec(), torch.float32)
    groups = dep.create_windows("inproc")
    try:
        ops = TimedOps(ref, ("npu_attention_to_ffn", "npu_attention_worker_combine", WAIT))
        endpoint = AttentionEndpoint(dep, 0, ops=ops)
        ffn_rank = dep.topology.ffn_ranks[0]
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(shape.tokens, shape.hidden, generator=gen)
        ids, weights = routing(shape.tokens, shape, seed=1)
        pairs = shape.layers * micro_batches
        samples = []
        for i in range(2 + repeat):
            ops.reset()
            host = 0.0
            for layer in range(shape.layers):
                for m, channel in enumerate(dep.channels):
                    group = get_window_group(channel.group)
                    group.ffn_views(ffn_rank)[0][0, channel.micro_batch, FLAG_OFFSET] = 0
                    t0 = time.perf_counter()
                    endpoint.send(m, layer, hidden, ids, weights)
                    t1 = time.perf_counter()
                    group.attn_views(endpoint.rank)[0][channel.micro_batch] = 1
                    t2 = time.perf_counter()
                    endpoint.receive(m)
                    host += (t1 - t0) + (time.perf_counter() - t2)
            if i >= 2:
                samples.append((host - sum(ops.seconds.values())) / pairs)
        return median(samples)
    finally:
        for g in groups:
            g.close()


def endpoint_overhead(repeat: int, micro_batches: int = 2) -> list[Row]:
    shape = TINY
    cfg = config_for(shape, micro_batches, shape.tokens)
    dep = Deployment(cfg, shape.spec(), torch.float32)
    groups = dep.create_windows("inproc")
    worker = FFNWorker(dep, dep.topology.ffn_ranks[0], make_banks(shape), ops=ref)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            worker.run()
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    thread = threading.Thread(target=serve, name="afd-bench-ffn", daemon=True)
    thread.start()
    try:
        a2f, combine = "npu_attention_to_ffn", "npu_attention_worker_combine"
        ops = TimedOps(ref, (a2f, combine, WAIT))
        endpoint = AttentionEndpoint(dep, 0, ops=ops)
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(shape.tokens, shape.hidden, generator=gen)
        ids, weights = routing(shape.tokens, shape, seed=1)
        pairs_per_round = shape.layers * micro_batches
        wide = torch.randn(shape.tokens * micro_batches, shape.hidden, generator=gen)
        wide_ids, wide_weights = routing(wide.shape[0], shape, seed=2)

        def pairs() -> tuple[float, float]:
            """(seconds in send, seconds in receive) of one round."""
            in_send = in_receive = 0.0
            for layer in range(shape.layers):
                for m in range(micro_batches):
                    t0 = time.perf_counter()
                    endpoint.send(m, layer, hidden, ids, weights)
                    t1 = time.perf_counter()
                    endpoint.receive(m)
                    in_receive += time.perf_counter() - t1
                    in_send += t1 - t0
            return in_send, in_receive

        def exchanges() -> None:
            for layer in range(shape.layers):
                endpoint.exchange(layer, wide, wide_ids, wide_weights)

        send_over, receive_over, walls, inside = [], [], [], []
        x_over, x_walls = [], []
        for i in range(2 + repeat):  # two warm-up rounds: first-call paths, back-off state
            ops.reset()
            in_send, in_receive = pairs()
            sent, combined = ops.seconds[a2f], ops.seconds[combine] + ops.seconds[WAIT]
            if i >= 2:
                send_over.append((in_send - sent) / pairs_per_round)
                receive_over.append((in_receive - combined) / pairs_per_round)
                walls.append((in_send + in_receive) / pairs_per_round)
                inside.append((sent + combined) / pairs_per_round)
            ops.reset()
            wall = timed(exchanges)
            if i >= 2:
                x_walls.append(wall / pairs_per_round)
                x_over.append((wall - sum(ops.seconds.values())) / pairs_per_round)
        if failure:
            raise failure[0]
    finally:
        worker.stop()
        thread.join(JOIN_TIMEOUT_S)
        for g in groups:
            g.close()
    where = (
        f"(H={shape.hidden}, BS={shape.tokens}, K={shape.topk}, M={micro_batches}, "
        "FFN worker thread)"
    )
    total = [a + b for a, b in zip(send_over, receive_over, strict=True)]
    return [
        Row(
            name="endpoint_overhead",
            value=median(total) * 1e6,
            unit="us",
            description="host time per (layer, micro-batch) of send(m) + receive(m) beyond "
            f"the A2F and combine calls they make {where}; no_ffn: the same with no FFN "
            "thread (flags written directly), i.e. without GIL contention",
            metrics={
                "send_us": median(send_over) * 1e6,
                "receive_us": median(receive_over) * 1e6,
                "wall_us": median(walls) * 1e6,
                "in_ops_us": median(inside) * 1e6,
                "no_ffn_us": solo_overhead(repeat, micro_batches) * 1e6,
            },
            target=Target("<=", OVERHEAD_TARGET_US),
        ),
        Row(
            name="exchange_overhead",
            value=median(x_over) * 1e6,
            unit="us",
            description=f"the same for exchange() of {micro_batches} slots (what the vLLM "
            f"plugin calls) {where}",
            metrics={"wall_us": median(x_walls) * 1e6},
        ),
    ]


# -- (b) pipelining with the FFN side in another process -------------------------------------
@dataclass
class BurnState:
    """One micro-batch of the synthetic model: its tokens and their fixed routing."""

    start: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    hidden: torch.Tensor | None = None
    residual: torch.Tensor | None = None


class BurnModel:
    """A `LayeredModel` whose attention part is `repeats` x (matmul H x H, tanh) per layer."""

    def __init__(self, shape: MoEShape, repeats: int, seed: int = 3) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(shape.hidden, shape.hidden, generator=gen) / math.sqrt(
            shape.hidden
        )
        self.repeats = repeats
        self.layers = tuple(range(shape.layers))

    @property
    def moe_layers(self) -> Sequence[int]:
        return self.layers

    def burn(self, h: torch.Tensor, repeats: int | None = None) -> torch.Tensor:
        for _ in range(self.repeats if repeats is None else repeats):
            h = torch.tanh(h @ self.weight)
        return h

    def pre(self, layer: int, state: BurnState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer == self.layers[0]:
            state.hidden = state.start
        assert state.hidden is not None
        state.residual = self.burn(state.hidden)
        return state.residual, state.ids, state.weights

    def post(self, layer: int, state: BurnState, moe_out: torch.Tensor) -> None:
        assert state.residual is not None
        state.hidden = state.residual + moe_out


def _serve_process(
    jobs: list[tuple[AFDConfig, MoESpec, list[WindowGroupSpec]]],
    shape: MoEShape,
    replies: Queue[str],
) -> None:
    """The FFN process: attach every deployment's windows, serve each in a thread (one
    torch thread in all) until the attention process stops them through the run flag."""
    try:
        torch.set_num_threads(1)
        groups = [attach_window_group(s) for _, _, specs in jobs for s in specs]
        threads = []
        for cfg, spec, _ in jobs:
            dep = Deployment(cfg, spec, torch.float32)
            for rank in dep.topology.ffn_ranks:
                worker = FFNWorker(dep, rank, make_banks(shape), ops=ref)
                threads.append(threading.Thread(target=worker.run, daemon=True))
        for t in threads:
            t.start()
        replies.put("ready")
        for t in threads:
            t.join()
        for g in groups:
            g.close()
    except BaseException:
        replies.put(traceback.format_exc())
        raise


class LocalWork:
    """The two sides' compute of one step, run here without AFD (one torch thread): the
    attention side's burn and the experts on the step's tokens, layer by layer."""

    def __init__(self, model: BurnModel, shape: MoEShape, ids: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(4)
        self.model = model
        self.layers = shape.layers
        self.x = torch.randn(shape.tokens, shape.hidden, generator=gen)
        self.bank = make_banks(shape)[0]
        flat = ids.reshape(-1).to(torch.int64)
        self.groups = [
            (e, self.x[(flat == e).nonzero().flatten() // shape.topk]) for e in range(shape.experts)
        ]

    def attention_layer(self, repeats: int | None = None) -> None:
        self.model.burn(self.x, repeats)

    def experts_layer(self) -> None:
        for e, rows in self.groups:
            self.bank.apply(e, rows)

    def attention_step(self) -> None:
        for _ in range(self.layers):
            self.attention_layer()

    def experts_step(self) -> None:
        for _ in range(self.layers):
            self.experts_layer()

    def balance(self) -> int:
        """The burn repeats that make one layer's attention as slow as its experts."""
        one, ffn = interleaved(
            [(_nothing, lambda: self.attention_layer(1)), (_nothing, self.experts_layer)], 5
        )
        return max(1, round(median(ffn) / median(one)))


def end_process(proc: BaseProcess) -> None:
    """Wait for a bench's helper process to end (its work was stopped), killing it if it
    does not within JOIN_TIMEOUT_S."""
    proc.join(JOIN_TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join(JOIN_TIMEOUT_S)


def _nothing() -> None:
    return None


def pipelining(shape: MoEShape, repeat: int, depths: Sequence[int] = (1, 2, 3)) -> list[Row]:
    """Step times at M = 1, 2, 3 against the ideal halving (call with one torch thread)."""
    model = BurnModel(shape, repeats=1)
    start = torch.randn(shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(5))
    ids, weights = routing(shape.tokens, shape, seed=6)
    local = LocalWork(model, shape, ids)
    model.repeats = local.balance()
    deps: dict[int, Deployment] = {}
    groups = []
    ctx = mp.get_context("spawn")
    replies: Queue[str] = ctx.Queue()
    proc = None
    try:
        for m in depths:
            per_slot = -(-shape.tokens // m)
            deps[m] = Deployment(config_for(shape, m, per_slot), shape.spec(), torch.float32)
            groups += deps[m].create_windows("shm")
        jobs = [
            (d.config, d.spec, [g.spec for g in groups if g.name in d.group_names])
            for d in deps.values()
        ]
        proc = ctx.Process(target=_serve_process, args=(jobs, shape, replies), daemon=True)
        proc.start()
        try:
            reply = replies.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            raise TimeoutError(f"FFN process not ready within {START_TIMEOUT_S:g} s") from None
        if reply != "ready":
            raise RuntimeError(f"FFN process failed:\n{reply}")
        endpoints = {m: AttentionEndpoint(d, 0, ops=ref) for m, d in deps.items()}
        states = {
            m: [
                BurnState(s, i, w)
                for s, i, w in zip(
                    torch.tensor_split(start, m),
                    torch.tensor_split(ids, m),
                    torch.tensor_split(weights, m),
                    strict=True,
                )
            ]
            for m in depths
        }
        assert proc.pid is not None
        meters = {m: CpuMeter(proc.pid) for m in depths}
        cases = [(_nothing, local.attention_step), (_nothing, local.experts_step)]
        cases += [
            (_nothing, meters[m].metered(_step(model, endpoints[m], states[m]))) for m in depths
        ]
        with OtherLoad([proc.pid]) as load:
            attn_samples, ffn_samples, *samples = interleaved(cases, repeat)
        # read while it is alive: its /proc entry goes with it
        ffn_memory = process_memory(proc.pid) if proc.pid is not None else None
    finally:
        for d in deps.values():
            for name in d.group_names:
                group = next(g for g in groups if g.name == name)
                for rank in d.topology.ffn_ranks:
                    sc.put(group.context_storage(rank), sc.RUN_FLAG, 0)
        if proc is not None:
            end_process(proc)
        for g in groups:
            g.close()
    steps = {m: median(s) for m, s in zip(depths, samples, strict=True)}
    attn_s, ffn_s = median(attn_samples), median(ffn_samples)
    ideal = steps[1] / 2
    rows = []
    for m in depths[1:]:
        busy_attn, busy_ffn = meters[m].medians()
        # Even with waits free, each side is busy for its own CPU time, and idles while
        # the other does the step's first (attention) or last (FFN) of L * M units
        units = shape.layers * m
        floor = max(busy_attn, busy_ffn) + min(busy_attn, busy_ffn) / units
        rows.append(
            Row(
                name=f"pipeline_m{m}",
                value=steps[m] / ideal,
                unit="x",
                description=(
                    f"step time with M={m} in flight / (M=1 step time / 2); 1.0 = attention "
                    "and experts fully overlapped; attn_only / experts_only: each side's "
                    "compute of a step run alone, without AFD, in the same rounds; "
                    "attn_busy / ffn_busy: CPU time of the attention thread and of the FFN "
                    "process per step of this M (AFD's copies and host code included); "
                    "floor: the step this M cannot beat over the same ideal, the busier "
                    "side's CPU time plus one of the other side's L*M units (pipeline fill "
                    "and drain); "
                    "other_load_cores: cores other processes kept busy meanwhile "
                    f"(H={shape.hidden}, {shape.tokens} tokens, "
                    f"K={shape.topk}, {shape.experts} experts of {shape.intermediate}, "
                    f"{shape.layers} layers, FFN worker process over shm, 1 thread per side)"
                ),
                metrics={
                    "step_m1_ms": steps[1] * 1e3,
                    f"step_m{m}_ms": steps[m] * 1e3,
                    "speedup": steps[1] / steps[m],
                    "attn_only_ms": attn_s * 1e3,
                    "experts_only_ms": ffn_s * 1e3,
                    "attn_busy_ms": busy_attn * 1e3,
                    "ffn_busy_ms": busy_ffn * 1e3,
                    "floor": floor / ideal,
                }
                | ({"other_load_cores": load.cores} if math.isfinite(load.cores) else {}),
                target=Target("<=", PIPELINE_TARGET) if m == 2 else None,
            )
        )
    if ffn_memory is not None:
        rows.append(
            peak_rss_row(
                "pipeline_ffn",
                f"the FFN process of pipeline_m* (experts of M={', '.join(map(str, depths))})",
                ffn_memory,
            )
        )
    return rows


class CpuMeter:
    """CPU seconds per call of a wrapped step: this thread's (`time.thread_time`) and the
    FFN process `pid`'s (`report.schedstat`), the first call dropped (warm-up)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []

    def metered(self, step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            own, ffn = time.thread_time(), schedstat(self.pid)[0]
            step()
            self.samples.append((time.thread_time() - own, schedstat(self.pid)[0] - ffn))

        return run

    def medians(self) -> tuple[float, float]:
        kept = self.samples[1:] or self.samples
        return median([a for a, _ in kept]), median([f for _, f in kept])


def _step(
    model: BurnModel, endpoint: AttentionEndpoint, states: list[BurnState]
) -> Callable[[], None]:
    def step() -> None:
        run_pipelined(model, endpoint, states)

    return step


# -- (c) torch.compile of the attention-side MoE call ----------------------------------------
class CompileCase:
    """The AFD MoE call of one micro-batch of n < BS tokens on in-process windows, with its
    window flags put back between calls so neither op waits."""

    def __init__(self, shape: MoEShape = TINY) -> None:
        self.shape = shape
        self.topology = RankTopology(1, 1)
        self.layout = WindowLayout(1, 1, shape.tokens, shape.topk, 0, shape.hidden, torch.float32)
        self.group = create_window_group(
            f"afd-bench-compile-{next(_names)}", self.topology, self.layout, "inproc"
        )
        self.table = build_expert_rank_table(self.topology, shape.experts)
        self.attn_rank = self.topology.attention_rank(0)
        self.ctx = ref.context_for(self.group, self.attn_rank).get_schedule_context_tensor()
        n = shape.tokens - 2  # a partial micro-batch: the padding is real work
        gen = torch.Generator().manual_seed(7)
        self.hidden = torch.randn(n, shape.hidden, generator=gen)
        self.ids, self.weights = routing(n, shape, seed=8)
        self.zero = torch.zeros(1, dtype=torch.int32)
        self.code = token_dtype_code(torch.float32)
        x, ids, mask, scales = self.pad(self.hidden, self.ids, self.weights)
        self.padded = (x, ids, mask, scales)

    def close(self) -> None:
        self.group.close()

    def pad(
        self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the endpoint does before A2F: pad to BS, mask the tail."""
        pad = self.shape.tokens - hidden.shape[0]
        x = F.pad(hidden, (0, 0, 0, pad)).unsqueeze(0)
        padded_ids = F.pad(ids, (0, 0, 0, pad)).unsqueeze(0)
        mask = (torch.arange(self.shape.tokens) < hidden.shape[0]).unsqueeze(0)
        scales = F.pad(weights, (0, 0, 0, pad))
        return x, padded_ids, mask, scales

    def reset(self) -> None:
        """FFN flag free (A2F sends at once), every result "arrived" (combine returns)."""
        self.group.ffn_views(self.topology.ffn_ranks[0])[0][:, :, FLAG_OFFSET] = 0
        self.group.attn_views(self.attn_rank)[0].fill_(1)

    def moe_call(
        self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, layer: torch.Tensor
    ) -> torch.Tensor:
        """Pad; `torch.ops.afd.npu_attention_to_ffn`; `..npu_attention_worker_combine`."""
        x, padded_ids, mask, scales = self.pad(hidden, ids, weights)
        shapes = self.layout.op_shapes
        torch.ops.afd.npu_attention_to_ffn(
            x, self.zero, self.zero, layer, padded_ids, self.table, self.group.name,
            self.topology.world_size, shapes["ffn_token_info_table_shape"],
            shapes["ffn_token_data_shape"], shapes["attn_token_info_table_shape"],
            self.shape.experts, active_mask=mask,
        )  # fmt: skip
        y, _ = torch.ops.afd.npu_attention_worker_combine(
            self.ctx, scales, layer, self.shape.hidden, token_dtype=self.code, need_schedule=1
        )
        return y[: hidden.shape[0]]

    def raw(self) -> torch.Tensor:
        """The two op implementations themselves, on pre-padded arguments: the op work."""
        x, ids, mask, scales = self.padded
        shapes = self.layout.op_shapes
        attention_to_ffn(
            x, self.zero, self.zero, self.zero, ids, self.table, self.group.name,
            self.topology.world_size, shapes["ffn_token_info_table_shape"],
            shapes["ffn_token_data_shape"], shapes["attn_token_info_table_shape"],
            self.shape.experts, active_mask=mask,
        )  # fmt: skip
        y, _ = attention_worker_combine(
            self.ctx, scales, self.zero, self.shape.hidden, token_dtype=self.code, need_schedule=1
        )
        return y


def compile_overhead(repeat: int) -> list[Row]:
    case = CompileCase()
    try:
        args = (case.hidden, case.ids, case.weights, case.zero)
        case.reset()
        eager_out = case.moe_call(*args)
        compiled = torch.compile(case.moe_call, fullgraph=True)
        case.reset()
        compile_s = timed(lambda: compiled(*args))
        case.reset()
        if not torch.equal(compiled(*args), eager_out):
            raise AssertionError("the compiled AFD MoE call returned other values than eager")
        raw_s, eager_s, compiled_s = interleaved(
            [
                (case.reset, case.raw),
                (case.reset, lambda: case.moe_call(*args)),
                (case.reset, lambda: compiled(*args)),
            ],
            CALL_SAMPLES * repeat,
            warmup=5,
        )
    finally:
        case.close()
    raw_t, eager_t, compiled_t = (median(s) for s in (raw_s, eager_s, compiled_s))
    described = (
        f"(H={TINY.hidden}, BS={TINY.tokens}, {TINY.tokens - 2} tokens, K={TINY.topk}; "
        "beyond the raw A2F + combine implementations on pre-padded arguments)"
    )
    common = {"raw_ops_us": raw_t * 1e6, "eager_us": eager_t * 1e6, "compiled_us": compiled_t * 1e6}
    return [
        Row(
            "eager_call_overhead",
            (eager_t - raw_t) * 1e6,
            "us",
            f"padding + torch.ops.afd dispatch of the MoE call, eager {described}",
            dict(common),
        ),
        Row(
            "compiled_call_overhead",
            (compiled_t - raw_t) * 1e6,
            "us",
            f"the same call under torch.compile(fullgraph=True) {described}",
            {**common, "compile_s": compile_s},
        ),
        Row(
            "compiled_vs_eager",
            compiled_t / eager_t,
            "x",
            "time of the compiled MoE call / the eager one (ops included)",
            dict(common),
        ),
    ]


def run(shape_name: str, repeat: int, memory_micro_batches: int | None = None) -> Report:
    """(a), (b), (c) and the FFN worker's memory (`afd_dispatch.bench.memory`, over
    `memory_micro_batches`, default 10,000), one torch thread per process."""
    from afd_dispatch.bench import memory  # it imports this module

    micro_batches = memory.MICRO_BATCHES if memory_micro_batches is None else memory_micro_batches
    with torch_threads(1):
        report = Report("loop", shape_name, repeat)
        report.rows += endpoint_overhead(repeat)
        report.rows += pipelining(PIPELINE_SHAPES[shape_name], repeat)
        report.rows += compile_overhead(repeat)
        memory.add_ffn_memory(report, micro_batches, min(memory.TRACED, micro_batches))
    report.notes.append(
        "us rows: medians of per-round differences measured in the same run; x rows: "
        "ratios of medians of interleaved runs"
    )
    return report
