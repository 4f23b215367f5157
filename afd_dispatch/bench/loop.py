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

from afd_dispatch.bench import memory
from afd_dispatch.bench.loop_compile import compile_overhead
from afd_dispatch.bench.loop_overhead import endpoint_overhead
from afd_dispatch.bench.loop_pipeline import pipelining
from afd_dispatch.bench.loop_shapes import PIPELINE_SHAPES
from afd_dispatch.bench.report import Report, torch_threads


def run(shape_name: str, repeat: int, memory_micro_batches: int | None = None) -> Report:
    """(a), (b), (c) and the FFN worker's memory (`afd_dispatch.bench.memory`, over
    `memory_micro_batches`, default 10,000), one torch thread per process."""
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
