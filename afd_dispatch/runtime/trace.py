"""Where the time goes: spans per layer and micro-batch, and counters a server can publish.

Spans are taken with `time.monotonic_ns()`, CLOCK_MONOTONIC on Linux, which every process
on one host shares, so spans from attention ranks and FFN actors line up in one timeline.
`write_chrome_trace` writes the Chrome/Perfetto "trace event" JSON format.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Span:
    process: str  # "attention 0", "FFN 2"
    name: str  # "send", "wait", "combine", "batch", "experts", "return", ...
    start_ns: int
    end_ns: int
    layer: int = -1
    micro_batch: int = -1

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass
class Tracer:
    """Collects spans and counters of one process role (thread-safe).

    Counters (including "<span>_seconds_total") are always kept, since a server publishes
    them; `enabled` only decides whether individual spans are stored for a trace.
    """

    process: str
    enabled: bool = True
    max_spans: int = 200_000  # a long-running server keeps the newest spans only
    spans: list[Span] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def span(self, name: str, layer: int = -1, micro_batch: int = -1) -> Iterator[None]:
        start = time.monotonic_ns()
        try:
            yield
        finally:
            self.record(name, start, time.monotonic_ns(), layer, micro_batch)

    def record(
        self, name: str, start_ns: int, end_ns: int, layer: int = -1, micro_batch: int = -1
    ) -> None:
        """Add a span measured by the caller (`time.monotonic_ns()`), for work whose layer
        is known only once it is done; adds to "<name>_seconds_total" like `span`."""
        with self._lock:
            if self.enabled:
                if len(self.spans) >= self.max_spans:
                    del self.spans[: self.max_spans // 2]
                self.spans.append(Span(self.process, name, start_ns, end_ns, layer, micro_batch))
            self.counters[f"{name}_seconds_total"] += (end_ns - start_ns) / 1e9

    def count(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self.counters[name] += value

    def snapshot(self) -> tuple[list[Span], dict[str, float]]:
        with self._lock:
            return list(self.spans), dict(self.counters)

    def counter_values(self) -> dict[str, float]:
        """The counters alone (what a metrics poll needs: no copy of the spans)."""
        with self._lock:
            return dict(self.counters)

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()


def merge(tracers: Iterable[Tracer]) -> tuple[list[Span], dict[str, dict[str, float]]]:
    """The spans of several tracers in start order, and their counters by process (what
    `write_chrome_trace` and `prometheus_lines` take); tracers of one process add up."""
    spans: list[Span] = []
    counters: dict[str, dict[str, float]] = {}
    for tracer in tracers:
        s, c = tracer.snapshot()
        spans.extend(s)
        mine = counters.setdefault(tracer.process, {})
        for name, value in c.items():
            mine[name] = mine.get(name, 0.0) + value
    spans.sort(key=lambda sp: sp.start_ns)
    return spans, counters


def overlap_ns(a: Iterable[Span], b: Iterable[Span]) -> int:
    """How long some span of `a` and some span of `b` are open at the same time, in ns.

    Each set is first reduced to the union of its intervals, so time is counted once however
    many spans of a set cover it. 0: the two sets never run at once (touching ends included).
    """
    union_a, union_b = _union(a), _union(b)
    total, i, j = 0, 0, 0
    while i < len(union_a) and j < len(union_b):
        (a0, a1), (b0, b1) = union_a[i], union_b[j]
        total += max(0, min(a1, b1) - max(a0, b0))
        if a1 <= b1:
            i += 1
        else:
            j += 1
    return total


def _union(spans: Iterable[Span]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted((s.start_ns, s.end_ns) for s in spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def chrome_trace(spans: Iterable[Span]) -> dict[str, Any]:
    """Spans as a Chrome/Perfetto trace: one track ("process") per rank."""
    spans = sorted(spans, key=lambda s: s.start_ns)
    pids: dict[str, int] = {}
    events: list[dict[str, Any]] = []
    for s in spans:
        if s.process not in pids:
            pids[s.process] = len(pids) + 1
            events.append(
                {"ph": "M", "name": "process_name", "pid": pids[s.process], "tid": 0,
                 "args": {"name": s.process}}
            )  # fmt: skip
        events.append(
            {
                "ph": "X",
                "name": s.name if s.layer < 0 else f"{s.name} L{s.layer} mb{s.micro_batch}",
                "cat": s.name,
                "pid": pids[s.process],
                "tid": 0,
                "ts": s.start_ns / 1000,
                "dur": s.duration_ns / 1000,
                "args": {"layer": s.layer, "micro_batch": s.micro_batch},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str | os.PathLike[str], spans: Iterable[Span]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(chrome_trace(spans), fh)


PREFIX = "afd_"  # of every AFD metric's name


def process_label(process: str) -> tuple[str, str]:
    """The label of a tracer's process: "attention 3" -> ("session", "3"), "FFN 1" ->
    ("ffn_rank", "1"), anything else ("pool") -> ("process", itself)."""
    role, _, rank = process.rpartition(" ")
    if role == "attention":
        return "session", rank
    if role == "FFN":
        return "ffn_rank", rank
    return "process", process


def is_counter(name: str) -> bool:
    """Names ending in `_total` are counters; the others gauges."""
    return name.endswith("_total")


def metric_name(name: str) -> str:
    """A counter's name as a metric: `PREFIX`, and ASCII [a-zA-Z0-9_] only."""
    return PREFIX + "".join(c if c.isascii() and c.isalnum() else "_" for c in name)


def metric_families(counters: Mapping[str, Mapping[str, float]]) -> list[Any]:
    """Counters of several processes ({process: {name: value}}) as prometheus_client metric
    families, one per name, each sample labelled by its process (`process_label`)."""
    from prometheus_client.metrics_core import Metric

    by_name: dict[str, list[tuple[tuple[str, str], float]]] = defaultdict(list)
    for process, values in counters.items():
        for name, value in values.items():
            by_name[name].append((process_label(process), float(value)))
    families = []
    for name, samples in sorted(by_name.items()):
        metric = metric_name(name)
        counter = is_counter(name)
        family = Metric(metric.removesuffix("_total") if counter else metric, f"AFD {name}",
                        "counter" if counter else "gauge")  # fmt: skip
        for (key, label), value in sorted(samples):
            family.add_sample(metric, {key: label}, value)
        families.append(family)
    return families


class _Families:
    """A prometheus_client collector of fixed families."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families

    def describe(self) -> list[Any]:
        return []


def prometheus_lines(counters: Mapping[str, Mapping[str, float]]) -> str:
    """Counters of several processes ({process: {name: value}}) in the Prometheus text
    format, as vLLM's `/metrics` shows them (`metric_families`)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(metric_families(counters)))
    return generate_latest(registry).decode()
