"""`afd-dispatch bench --level ops|loop|serving [--shape small|decode] [--json PATH]
[--png PATH] [--repeat N] [--afd-config JSON]`."""

from __future__ import annotations

import argparse
import importlib

from afd_dispatch.bench.report import Report

LEVELS = ("ops", "loop", "serving")
SHAPES = ("small", "decode")
DEFAULT_REPEAT = 7


def run(level: str, shape: str, repeat: int, afd_config: str | None = None) -> Report:
    """Run one level and return its report (nothing printed). `afd_config` (serving
    only): the AFD server's `--afd-config`."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
    if repeat < 1:
        raise ValueError(f"repeat: expected >= 1, got {repeat}")
    if afd_config is not None and level != "serving":
        raise ValueError("afd_config: only the serving level takes one")
    module = importlib.import_module(f"afd_dispatch.bench.{level}")
    extra = {} if afd_config is None else {"afd_config": afd_config}
    report: Report = module.run(shape, repeat, **extra)
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
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.afd_config is not None and args.level != "serving":
        parser.error("--afd-config: only --level serving starts an AFD server")
    report = run(args.level, args.shape, args.repeat, args.afd_config)
    report.emit(args.json, args.png)
    return 0
