"""`afd-dispatch bench --level ops|loop|serving [--shape small|decode] [--json PATH]
[--png PATH] [--repeat N] [--afd-config JSON] [--memory-micro-batches N] [--trace-png PATH]`.

Every level's report ends with `peak_rss_bench`, the peak resident set of the bench
process itself; the levels add those of the processes they start.
"""

from __future__ import annotations

import argparse
import importlib

from afd_dispatch.bench.report import Report, peak_rss_row, process_memory

LEVELS = ("ops", "loop", "serving")
SHAPES = ("small", "decode")
DEFAULT_REPEAT = 7


def run(
    level: str,
    shape: str,
    repeat: int,
    afd_config: str | None = None,
    memory_micro_batches: int | None = None,
    trace_png: str | None = None,
) -> Report:
    """Run one level and return its report (nothing printed). `afd_config` (serving
    only): the AFD server's `--afd-config`. `memory_micro_batches` (loop only): the
    micro-batches of the FFN memory case (default 10,000; fewer in tests). `trace_png`
    (serving only): trace the AFD server once more and draw one decode step there."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
    if repeat < 1:
        raise ValueError(f"repeat: expected >= 1, got {repeat}")
    if afd_config is not None and level != "serving":
        raise ValueError("afd_config: only the serving level takes one")
    if memory_micro_batches is not None and level != "loop":
        raise ValueError("memory_micro_batches: only the loop level takes it")
    if trace_png is not None and level != "serving":
        raise ValueError("trace_png: only the serving level takes it")
    module = importlib.import_module(f"afd_dispatch.bench.{level}")
    extra: dict[str, object] = {}
    if afd_config is not None:
        extra["afd_config"] = afd_config
    if memory_micro_batches is not None:
        extra["memory_micro_batches"] = memory_micro_batches
    if trace_png is not None:
        extra["trace_png"] = trace_png
    report: Report = module.run(shape, repeat, **extra)
    own = process_memory()
    if own is not None:  # read last: the peak of the whole run
        report.add(peak_rss_row("bench", f"this bench process (--level {level})", own))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="afd-dispatch bench",
        description="Benchmark the AFD ops, the runtime loop, or vLLM serving with AFD. "
        "Every figure is a ratio of times measured in the same run.",
    )
    parser.add_argument("--level", required=True, choices=LEVELS)
    parser.add_argument(
        "--shape",
        default="decode",
        choices=SHAPES,
        help="decode: A3-sized decode shapes (default); small: quick, for tests",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    parser.add_argument("--png", default=None, metavar="PATH", help="plot the results here")
    parser.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        help=f"timed runs per case, medians taken (default {DEFAULT_REPEAT})",
    )
    parser.add_argument(
        "--afd-config",
        default=None,
        metavar="JSON",
        help="serving only: the AFD server's --afd-config (default: A=1, F=2, M=2, BS=64)",
    )
    parser.add_argument(
        "--memory-micro-batches",
        type=int,
        default=None,
        metavar="N",
        help="loop only: micro-batches the FFN memory case serves (default 10,000; a "
        "multiple of its 2 slots; fewer only to check that the case runs)",
    )
    parser.add_argument(
        "--trace-png",
        default=None,
        metavar="PATH",
        help="serving only: after the timed runs, serve one more round with an AFD server "
        'started with "trace": true, draw its median decode step phase by phase here and '
        "print the phase table (the round's merged Chrome trace goes beside it, .trace.json)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.afd_config is not None and args.level != "serving":
        parser.error("--afd-config: only --level serving starts an AFD server")
    if args.trace_png is not None and args.level != "serving":
        parser.error("--trace-png: only --level serving traces an AFD server")
    if args.memory_micro_batches is not None:
        from afd_dispatch.bench.memory import SLOTS  # imports the runtime: only when asked

        if args.level != "loop":
            parser.error("--memory-micro-batches: only --level loop runs the memory case")
        n = args.memory_micro_batches
        if n < SLOTS or n % SLOTS:
            parser.error(f"--memory-micro-batches must be a positive multiple of {SLOTS}")
    report = run(
        args.level,
        args.shape,
        args.repeat,
        args.afd_config,
        args.memory_micro_batches,
        args.trace_png,
    )
    report.emit(args.json, args.png)
    return 0
