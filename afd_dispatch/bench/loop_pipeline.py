"""`bench --level loop`, case (b): step time of M = 2 and 3 micro-batches in flight
against M = 1, balanced synthetic work, the FFN worker in another process."""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue

import torch

from afd_dispatch.bench.loop_shapes import (
    START_TIMEOUT_S,
    MoEShape,
    config_for,
    end_process,
    make_banks,
    routing,
)
from afd_dispatch.bench.report import (
    OtherLoad,
    Row,
    Target,
    interleaved,
    median,
    peak_rss_row,
    process_memory,
    schedstat,
)
from afd_dispatch.config import AFDConfig
from afd_dispatch.kernels import reference as ref
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.ffn_worker import FFNWorker
from afd_dispatch.runtime.pipeline import run_pipelined
from afd_dispatch.windows import WindowGroupSpec, attach_window_group

PIPELINE_TARGET = 1.2  # M = 2 step time / (M = 1 step time / 2)


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
