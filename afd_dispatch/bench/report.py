"""Benchmark results: one record type for every level, printed as a table, JSON and a PNG.

Every headline figure is a ratio of two times measured in the same run (unit "x"), a
difference of two such times (unit "us"), or a share of a wall time measured in the same
run (the serving breakdown); the absolute numbers it came from are kept beside it in
`metrics` for the reader, never compared across runs. Memory rows (unit "MB", 10^6 bytes)
give a process's peak resident set (`peak_rss_*`, no target) or a growth between two points
of one run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

SCHEMA = "afd-dispatch-bench/1"
TARGET_OPS = (">=", "<=")
MB = 1e6  # bytes; decimal, like the GB/s of the ops level


@dataclass(frozen=True)
class Target:
    """A goal for a headline value: `value op bound`, e.g. ratio >= 0.7."""

    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.op not in TARGET_OPS:
            raise ValueError(f"target op: expected one of {TARGET_OPS}, got {self.op!r}")

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"


@dataclass
class Row:
    """One benchmarked case.

    `value` is the headline (a ratio when `unit` is "x"), `metrics` the measured numbers
    it was computed from (names carry their unit: `_ms`, `_us`, `_GBps`, `_MB`, ...).
    """

    name: str
    value: float
    unit: str
    description: str
    metrics: dict[str, float] = field(default_factory=dict)
    target: Target | None = None

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "description": self.description,
            "metrics": dict(self.metrics),
            "target": None
            if self.target is None
            else {"op": self.target.op, "bound": self.target.bound},
            "pass": self.passed,
        }


@dataclass
class Report:
    """The result of one `afd-dispatch bench --level ...` run."""

    level: str
    shape: str
    repeat: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=lambda: host_context())

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "level": self.level,
            "shape": self.shape,
            "repeat": self.repeat,
            "context": self.context,
            "rows": [r.to_dict() for r in self.rows],
            "notes": list(self.notes),
        }

    # -- output ----------------------------------------------------------------------------
    def table(self) -> str:
        """The rows as a text table: headline, target, pass, then the measured numbers."""
        header = ["case", "value", "target", "ok", "measured (same run)"]
        lines = [header]
        for row in self.rows:
            ok = {None: "", True: "PASS", False: "FAIL"}[row.passed]
            lines.append(
                [
                    row.name,
                    f"{_fmt(row.value)} {row.unit}",
                    "" if row.target is None else f"{row.target} {row.unit}",
                    ok,
                    " ".join(f"{k}={_fmt(v)}" for k, v in row.metrics.items()),
                ]
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [
            "  ".join(
                c.rjust(w) if 0 < i < len(header) - 1 else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
            for line in lines
        ]
        title = (
            f"afd-dispatch bench --level {self.level} --shape {self.shape} (repeat {self.repeat})"
        )
        rule = "-" * max(len(t) for t in text)
        body = [title, rule, text[0], rule, *text[1:], rule]
        body += [f"  {r.name}: {r.description}" for r in self.rows]
        body += [f"note: {n}" for n in self.notes]
        ctx = self.context
        if ctx.get("load_average"):
            body.append(
                f"host: {ctx.get('cpus')} CPUs, load average {ctx['load_average'][0]:.2f} at "
                f"the start, torch {ctx.get('torch')}, {ctx.get('torch_threads')} torch thread(s)"
            )
        return "\n".join(body)

    def write_json(self, path: str | os.PathLike[str]) -> None:
        check_finite(self)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    def write_png(self, path: str | os.PathLike[str]) -> None:
        """Bar charts of the headline values, one panel per unit, targets as red ticks."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        units = list(dict.fromkeys(r.unit for r in self.rows))
        counts = [sum(r.unit == unit for r in self.rows) for unit in units]
        fig, axes = plt.subplots(
            len(units),
            1,
            figsize=(9, 1.2 + 0.9 * len(units) + 0.4 * len(self.rows)),
            squeeze=False,
            gridspec_kw={"height_ratios": [c + 1 for c in counts]},
        )
        for ax, unit in zip(axes[:, 0], units, strict=True):
            rows = [r for r in self.rows if r.unit == unit]
            ys = range(len(rows))
            colors = [
                {None: "tab:blue", True: "tab:green", False: "tab:red"}[r.passed] for r in rows
            ]
            ax.barh(list(ys), [r.value for r in rows], color=colors)
            for y, r in zip(ys, rows, strict=True):
                ax.text(r.value, y, f" {_fmt(r.value)}", va="center", fontsize=8)
                if r.target is not None:
                    ax.plot([r.target.bound] * 2, [y - 0.4, y + 0.4], color="black", lw=2)
            ax.set_yticks(list(ys), [r.name for r in rows], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel({"x": "ratio (same-run measurements)"}.get(unit, unit))
        axes[0, 0].set_title(
            f"afd-dispatch bench: {self.level} ({self.shape}); black tick = target", fontsize=10
        )
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)

    def emit(self, json_path: str | None, png_path: str | None) -> None:
        print(self.table(), flush=True)
        if json_path:
            self.write_json(json_path)
            print(f"JSON: {json_path}")
        if png_path:
            self.write_png(png_path)
            print(f"PNG: {png_path}")


def check_finite(report: Report) -> None:
    """Refuse to write a report with a NaN or infinite number (a broken measurement)."""
    for row in report.rows:
        for name, value in [("value", row.value), *row.metrics.items()]:
            if not math.isfinite(value):
                raise ValueError(f"bench row {row.name!r}: {name} is {value}")


def host_context() -> dict[str, Any]:
    """What a reader needs to judge the numbers: the machine, its load, torch's threads."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch intra-op threads, then restore the previous count.

    The ops and loop levels run with one: on a small shared host an OpenMP parallel region
    waits for whichever of its threads the OS descheduled (a 4 MB `copy_` took 25x longer
    with 2 threads than with 1 on a loaded 2-core host), and the FFN workers run
    single-threaded anyway (vLLM too reduces torch to one thread per serving process).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class OtherLoad:
    """How many cores other processes kept busy while the block ran (Linux `/proc/stat`).

    Busy CPU time of the whole host (steal included) minus this process's and that of the
    live processes `pids` (a benchmark's helpers), over the wall time. On a 2-core host,
    1.0 means only one core was left for a benchmark that wants two. NaN where `/proc` is
    unreadable.
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.cores = math.nan

    def _own(self) -> float:
        t = os.times()
        return t.user + t.system + sum(_process_cpu_s(pid) for pid in self.pids)

    def __enter__(self) -> OtherLoad:
        self._start = (time.perf_counter(), _host_busy_s(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        other = (_host_busy_s() - busy0) - (self._own() - own0)
        self.cores = max(0.0, other / wall) if wall > 0 else math.nan


def _host_busy_s() -> float:
    """Seconds all CPUs spent busy since boot: user nice system irq softirq steal."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return math.nan
    ticks = [int(v) for v in fields[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    """user + system seconds of a live process (`/proc/PID/stat` fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of process `pid`, summed
    over its live threads (`/proc/PID/task/TID/schedstat`, to the nanosecond); (0, 0)
    where unreadable (the process is gone)."""
    run = wait = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as fh:
                fields = fh.read().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return run / 1e9, wait / 1e9


@dataclass(frozen=True)
class ProcessMemory:
    """A process's resident set in MB (10^6 bytes): `peak_mb` its high-water mark since it
    started (`VmHWM`), `rss_mb` when it was read (`VmRSS`)."""

    peak_mb: float
    rss_mb: float


def process_memory(pid: int | None = None) -> ProcessMemory | None:
    """`VmHWM` and `VmRSS` of `/proc/PID/status` (this process when `pid` is None). None when
    they cannot be read: the process is gone, or there is no procfs (then, for this process
    only, `getrusage`'s `ru_maxrss` gives the peak, and the current size is unknown)."""
    fields: dict[str, float] = {}
    try:
        with open(f"/proc/{'self' if pid is None else pid}/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    number, unit = value.split()
                    if unit != "kB":  # the kernel writes kB (KiB): anything else is a change
                        return None
                    fields[key] = int(number) * 1024 / MB
    except (OSError, ValueError):
        fields = {}
    if len(fields) == 2:
        return ProcessMemory(fields["VmHWM"], fields["VmRSS"])
    if pid is None:  # ru_maxrss: KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
        return ProcessMemory(peak, peak) if peak > 0 else None
    return None


def peak_rss_row(
    name: str, description: str, memory: ProcessMemory, metrics: dict[str, float] | None = None
) -> Row:
    """Row `peak_rss_<name>`: the peak resident set of one process in MB, no target; the
    resident set when it was read beside it (`rss_now_MB`)."""
    return Row(
        name=f"peak_rss_{name}",
        value=memory.peak_mb,
        unit="MB",
        description=f"peak resident set (VmHWM) of {description}; rss_now: when read",
        metrics={"rss_now_MB": memory.rss_mb, **(metrics or {})},
    )


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no samples")
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes (perf_counter)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    cases: Sequence[tuple[Callable[[], object], Callable[[], object]]],
    repeat: int,
    warmup: int = 1,
) -> list[list[float]]:
    """Time several cases alternately: per round, each case's `setup()` (untimed) then its
    `run()` (timed). Returns every case's samples in seconds.

    Alternating spreads the host's load changes over all cases alike, so their medians can
    be compared: that is what makes a ratio from a noisy 2-core host meaningful.
    """
    samples: list[list[float]] = [[] for _ in cases]
    for i in range(warmup + repeat):
        for j, (setup, run) in enumerate(cases):
            setup()
            t = timed(run)
            if i >= warmup:
                samples[j].append(t)
    return samples


def _fmt(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 100_000:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.3g}"
