"""`bench --level loop`, memory: an FFN worker over 10,000 micro-batches holds its experts and
windows and nothing that grows.

A real `FFNWorker` serves in a spawned process over shared-memory windows; a real
`AttentionEndpoint` in this process sends it micro-batches (tiny shape, M = 2 in flight:
the run is about what the worker keeps, not how fast it computes). The FFN process calls
`serve_one` itself, exactly as many times as micro-batches are sent, in three phases:

1. its resident set (`VmRSS`) after a warm-up and after 10,000 micro-batches
   (`gc.collect()` before each reading): growth in MB, tensor data (torch's allocator, not
   Python's, so only here) included; and Python's heap blocks
   (`sys.getallocatedblocks()`) at the same two points;
2. Python's heap under `tracemalloc` over 4,000 more micro-batches (tracing makes this
   allocation-heavy loop several times slower, hence fewer): the heap held after them
   against the heap held before them, both after a traced warm-up, so objects merely
   replaced every micro-batch (a counter's float) are in both; the source lines that grew;
   and the most one micro-batch had allocated at once (its transient peak);
3. tensor allocations per micro-batch over a short sample (torch profiler,
   `profile_memory`): the hot path's allocation count and bytes, all given back to the
   allocator within the micro-batch when phase 1 shows no growth.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import queue
import sys
import time
import traceback
import tracemalloc
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

import torch

from afd_dispatch.bench.loop_shapes import (
    START_TIMEOUT_S,
    TINY,
    MoEShape,
    config_for,
    end_process,
    make_banks,
    routing,
)
from afd_dispatch.bench.report import (
    MB,
    ProcessMemory,
    Report,
    Row,
    Target,
    peak_rss_row,
    process_memory,
)
from afd_dispatch.config import AFDConfig
from afd_dispatch.kernels import reference as ref
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.ffn_worker import FFNWorker
from afd_dispatch.windows import WindowGroupSpec, attach_window_group

MICRO_BATCHES = 10_000  # phase 1, what the bench runs (tests may pass fewer)
TRACED = 4_000  # phase 2
WARMUP = 200  # micro-batches before phase 1's first reading: first-call paths, lazy caches
TRACED_WARMUP = 200  # traced micro-batches before phase 2's first snapshot
PROFILE_SAMPLE = 100  # phase 3
SLOTS = 2  # micro-batches in flight (M)
# 1 MB over 10,000 micro-batches is 100 bytes each: keeping even one small tensor per
# micro-batch (~200 bytes of TensorImpl and storage before its data) would exceed it, while
# glibc's arenas and the page-granular resident set leave some hundred kB of noise.
RSS_GROWTH_TARGET_MB = 1.0
# 64 kB over 4,000 micro-batches is 16 bytes each: one retained Python object per
# micro-batch (>= 16 bytes, 8 more for the pointer to it) exceeds it. What the FFN worker
# measured is a floor of 13-18 kB of ~64-byte blocks held inside torch's tensor-creating
# calls (a bare `x[:8].to(torch.int64)` loop shows them too) that does not grow with the
# micro-batches: the same over 2,000, 4,000 and 8,000 of them.
HEAP_GROWTH_TARGET_KB = 64.0
RESULT_TIMEOUT_S = 300.0  # phases 2 and 3 on a busy host
EXIT_DRAIN_S = 5.0  # for the last message of a process that has exited
TOP_SITES = 3  # source lines named where the Python heap grew
# tracemalloc's own objects (its snapshots) are not the worker's
_NOT_TRACEMALLOC = (tracemalloc.Filter(False, tracemalloc.__file__),)


@dataclass(frozen=True)
class FFNMemory:
    """What the FFN process measured (MB = 10^6 bytes, kB = 10^3 bytes)."""

    micro_batches: int  # phase 1
    traced: int  # phase 2
    run_s: float  # wall time of phase 1
    rss_warm_mb: float  # VmRSS after the warm-up
    rss_end_mb: float  # VmRSS after phase 1
    blocks_growth: int  # Python heap blocks (sys.getallocatedblocks) after phase 1 - before
    peak_mb: float  # VmHWM after phase 1
    heap_growth_kb: float  # Python heap held after phase 2 - before it
    heap_blocks: int  # the same in blocks (allocations held)
    transient_kb: float  # the most Python heap one micro-batch of phase 2 had allocated at once
    growth_sites: tuple[str, ...]  # "file:line: +N kB in +M blocks", largest first
    tensor_allocs: float  # tensor allocations per micro-batch (phase 3); -1: unknown
    tensor_alloc_kb: float  # their bytes per micro-batch, kB; -1: unknown


def _ffn_process(
    cfg: AFDConfig,
    spec: MoESpec,
    specs: list[WindowGroupSpec],
    shape: MoEShape,
    micro_batches: int,
    traced: int,
    replies: Queue[Any],
) -> None:
    """The FFN side: attach the windows, serve `total_micro_batches(..)` micro-batches with
    `serve_one`, measuring as the module says; put an `FFNMemory` (or a traceback)."""
    try:
        torch.set_num_threads(1)
        groups = [attach_window_group(s) for s in specs]
        dep = Deployment(cfg, spec, torch.float32)
        worker = FFNWorker(dep, dep.topology.ffn_ranks[0], make_banks(shape), ops=ref)
        replies.put("ready")
        # phase 1: the resident set
        for _ in range(WARMUP):
            worker.serve_one()
        gc.collect()
        warm = _rss(process_memory())
        blocks = sys.getallocatedblocks()
        start = time.perf_counter()
        for _ in range(micro_batches):
            worker.serve_one()
        run_s = time.perf_counter() - start
        gc.collect()
        blocks = sys.getallocatedblocks() - blocks
        end = process_memory()
        assert end is not None  # _rss read it above
        # phase 2: the Python heap
        tracemalloc.start()
        for _ in range(TRACED_WARMUP):
            worker.serve_one()
        gc.collect()
        first = tracemalloc.take_snapshot().filter_traces(_NOT_TRACEMALLOC)
        transient = 0
        for _ in range(traced):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            worker.serve_one()
            transient = max(transient, tracemalloc.get_traced_memory()[1] - before)
        gc.collect()
        last = tracemalloc.take_snapshot().filter_traces(_NOT_TRACEMALLOC)
        tracemalloc.stop()
        diff = last.compare_to(first, "lineno")
        sites = tuple(
            f"{d.traceback[0].filename}:{d.traceback[0].lineno}: {d.size_diff / 1e3:+.1f} kB "
            f"in {d.count_diff:+d} blocks"
            for d in diff[:TOP_SITES]
            if d.size_diff > 0
        )
        # phase 3: tensor allocations
        allocs, alloc_bytes = _tensor_allocations(worker, PROFILE_SAMPLE)
        replies.put(
            FFNMemory(
                micro_batches=micro_batches,
                traced=traced,
                run_s=run_s,
                rss_warm_mb=warm,
                rss_end_mb=end.rss_mb,
                blocks_growth=blocks,
                peak_mb=end.peak_mb,
                heap_growth_kb=sum(d.size_diff for d in diff) / 1e3,
                heap_blocks=sum(d.count_diff for d in diff),
                transient_kb=transient / 1e3,
                growth_sites=sites,
                tensor_allocs=allocs,
                tensor_alloc_kb=alloc_bytes / 1e3 if alloc_bytes >= 0 else -1.0,
            )
        )
        for g in groups:
            g.close()
    except BaseException:
        replies.put(traceback.format_exc())
        raise


def total_micro_batches(micro_batches: int, traced: int) -> int:
    """Micro-batches the FFN process serves in all, warm-ups and phase 3 included."""
    return WARMUP + micro_batches + TRACED_WARMUP + traced + PROFILE_SAMPLE


def _rss(memory: ProcessMemory | None) -> float:
    if memory is None:
        raise RuntimeError("the FFN process cannot read its /proc/self/status")
    return memory.rss_mb


def _tensor_allocations(worker: FFNWorker, micro_batches: int) -> tuple[float, float]:
    """(tensor allocations, bytes allocated) per micro-batch while `worker` serves
    `micro_batches`, from the torch profiler's memory events (one per allocation and one
    per free; an allocation's is positive). (-1, -1) when this torch does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(micro_batches):
            worker.serve_one()
    # The raw events: `prof.events()` folds allocations made inside an op into the op.
    results: Any = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return -1.0, -1.0
    sizes = [e.nbytes() for e in results.events() if e.name() == "[memory]"]
    allocated = [n for n in sizes if n > 0]
    return len(allocated) / micro_batches, sum(allocated) / micro_batches


def _drive(endpoint: AttentionEndpoint, shape: MoEShape, micro_batches: int) -> None:
    """Send and receive `micro_batches` micro-batches (a multiple of the slots), `SLOTS` in
    flight, the layers in turn, the same tokens every time."""
    hidden = torch.randn(shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(9))
    ids, weights = routing(shape.tokens, shape, seed=10)
    for i in range(micro_batches // SLOTS):
        layer = i % shape.layers
        for m in range(SLOTS):
            endpoint.send(m, layer, hidden, ids, weights)
        for m in range(SLOTS):
            endpoint.receive(m)


def measure(
    micro_batches: int = MICRO_BATCHES, traced: int = TRACED, shape: MoEShape = TINY
) -> FFNMemory:
    """Run the FFN process against an attention endpoint here; its measurements. Phase 1
    serves `micro_batches`, phase 2 `traced` (both positive multiples of `SLOTS`)."""
    for name, n in (("micro_batches", micro_batches), ("traced", traced)):
        if n < SLOTS or n % SLOTS:
            raise ValueError(f"{name}: expected a positive multiple of {SLOTS}, got {n}")
    dep = Deployment(config_for(shape, SLOTS, shape.tokens), shape.spec(), torch.float32)
    groups = dep.create_windows("shm")
    ctx = mp.get_context("spawn")
    replies: Queue[Any] = ctx.Queue()
    proc = None
    result: Any = None
    try:
        specs = [g.spec for g in groups]
        proc = ctx.Process(
            target=_ffn_process,
            args=(dep.config, dep.spec, specs, shape, micro_batches, traced, replies),
            daemon=True,
        )
        proc.start()
        if (reply := _reply(replies, proc, START_TIMEOUT_S, "ready")) != "ready":
            raise RuntimeError(f"FFN process failed:\n{reply}")
        endpoint = AttentionEndpoint(dep, 0, ops=ref)
        _drive(endpoint, shape, total_micro_batches(micro_batches, traced))
        result = _reply(replies, proc, RESULT_TIMEOUT_S, "its measurements")
        if not isinstance(result, FFNMemory):
            raise RuntimeError(f"FFN process failed:\n{result}")
        return result
    finally:
        if proc is not None:
            if proc.is_alive() and not isinstance(result, FFNMemory):
                # a failure here left it waiting for micro-batches: end its waits
                for g in groups:
                    sc.put(g.context_storage(dep.topology.ffn_ranks[0]), sc.RUN_FLAG, 0)
            end_process(proc)
        for g in groups:
            g.close()


def _reply(replies: Queue[Any], proc: BaseProcess, timeout_s: float, what: str) -> Any:
    """The FFN process's next message; fails as soon as the process is gone without one."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return replies.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                # what it put just before it exited may still be on its way through the pipe
                try:
                    return replies.get(timeout=EXIT_DRAIN_S)
                except queue.Empty:
                    raise RuntimeError(
                        f"FFN process exited ({proc.exitcode}) without {what}"
                    ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"FFN process: no {what} within {timeout_s:g} s") from None


def add_ffn_memory(
    report: Report,
    micro_batches: int = MICRO_BATCHES,
    traced: int = TRACED,
    shape: MoEShape = TINY,
) -> None:
    """Add the memory rows (resident set growth, Python heap growth, tensor allocations per
    micro-batch, the FFN process's peak resident set) and, if the heap grew, where."""
    r = measure(micro_batches, traced, shape)
    where = (
        f"(FFN worker process over shm, H={shape.hidden}, BS={shape.tokens}, K={shape.topk}, "
        f"{shape.experts} experts, {shape.layers} layers, M={SLOTS}, trace off)"
    )
    rows = [
        Row(
            name="ffn_rss_growth",
            value=r.rss_end_mb - r.rss_warm_mb,
            unit="MB",
            description=f"growth of the FFN process's resident set over {r.micro_batches} "
            f"micro-batches after {WARMUP} of warm-up {where}, tensor data included",
            metrics={
                "rss_warm_MB": r.rss_warm_mb,
                "rss_end_MB": r.rss_end_mb,
                "per_micro_batch_B": (r.rss_end_mb - r.rss_warm_mb) * MB / r.micro_batches,
                "run_s": r.run_s,
            },
            target=Target("<=", RSS_GROWTH_TARGET_MB),
        ),
        Row(
            name="ffn_py_heap_growth",
            value=r.heap_growth_kb,
            unit="kB",
            description=f"Python heap the FFN worker holds after {r.traced} more "
            f"micro-batches, less what it held before them (tracemalloc) {where}; blocks: "
            "allocations held; transient: the most one micro-batch had allocated at once; "
            f"blocks_untraced_run: heap blocks held after the {r.micro_batches} micro-batches "
            "of ffn_rss_growth less before them (sys.getallocatedblocks)",
            metrics={
                "blocks": float(r.heap_blocks),
                "per_micro_batch_B": r.heap_growth_kb * 1e3 / r.traced,
                "transient_kB": r.transient_kb,
                "blocks_untraced_run": float(r.blocks_growth),
            },
            target=Target("<=", HEAP_GROWTH_TARGET_KB),
        ),
    ]
    if r.tensor_allocs >= 0:
        rows.append(
            Row(
                name="ffn_tensor_allocs",
                value=r.tensor_allocs,
                unit="per micro-batch",
                description="tensor allocations of the FFN worker per micro-batch, the "
                f"reference ops' outputs included (torch profiler over {PROFILE_SAMPLE} "
                "micro-batches); whether they are all given back: ffn_rss_growth",
                metrics={"kB_per_micro_batch": r.tensor_alloc_kb},
            )
        )
    rows.append(
        peak_rss_row(
            "memory_ffn",
            "the FFN worker process of ffn_rss_growth (its experts and windows included)",
            ProcessMemory(r.peak_mb, r.rss_end_mb),
        )
    )
    report.rows += rows
    heap = next(row for row in rows if row.name == "ffn_py_heap_growth")
    if heap.passed is False and r.growth_sites:  # under the target they are torch's floor
        report.notes.append("ffn_py_heap_growth by source line: " + "; ".join(r.growth_sites))
