"""AFD counters on the vLLM server's `/metrics`.

The counters live in the workers (one attention session per data-parallel rank) and in
the FFN actors; `/metrics` is served by the API server processes. Each worker, and the
deployment's owner for the FFN actors, has a `CounterPublisher` that writes a JSON
snapshot once a second into a private directory named by `AFD_METRICS_DIR`, one file per
publisher; the collector reads them all at each scrape. (Files, not vLLM's registry: with
one API server vLLM serves its in-process registry, which the engine cores and the Ray
actors that count cannot write to; a snapshot file per publisher reaches it from any
process, and the multiprocess files below serve only where vLLM runs several.) Attention
counters are labelled `session`, FFN counters `ffn_rank`; the pool's (`ffn_ranks_up`)
`process="pool"`. Names ending in `_total` are counters, the others gauges. The first
process that loads the plugin (the one that runs `vllm serve`) sets that variable before
it starts anything, so every process it starts inherits it, and removes the directory
when it exits.

With several API servers (vLLM's default with data-parallel ranks) `/metrics` serves only
prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`), so one publisher,
session 0's, also mirrors every snapshot into multiprocess counters
(`MultiprocessExporter`).

Spans, with `"trace": true` in the AFD config: where `AFD_TRACE_DIR` names a directory,
every publisher whose source has spans (a worker's attention session, the owner's FFN
ranks) writes them as a Chrome/Perfetto trace, `<dir>/<name>.trace.json`, when asked to:
`request_trace(dir, id)` writes the request, each publisher answers within a publish
period (1 s) with the newest `TRACE_DUMP_SPANS` spans of each of its processes, and its
answer carries the request's id (`otherData.afd_request`). Each publisher also writes one
when it closes (the server stops), best effort. A dump never runs while nobody asks, so
tracing costs the hot path only the spans' recording, in bounded memory.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from afd_dispatch.runtime.trace import (
    Span,
    chrome_trace,
    is_counter,
    metric_families,
    metric_name,
    process_label,
)

log = logging.getLogger(__name__)
ENV = "AFD_METRICS_DIR"
SUFFIX = ".json"
PUBLISH_PERIOD_S = 1.0
TRACE_ENV = "AFD_TRACE_DIR"
TRACE_REQUEST = "request"  # the file in the trace directory that asks for a dump: an id
TRACE_SUFFIX = ".trace.json"
TRACE_DUMP_SPANS = 20_000  # per process: the newest spans a dump writes
FORWARD = "forward"  # the instant events marking a model forward (args: tokens)
CPU = "cpu"  # the counter events of a thread's CPU accounting (args: run_ns, wait_ns)


class _HasCounters(Protocol):
    def counters(self) -> dict[str, dict[str, float]]: ...


def install() -> None:
    """In every process: agree on the snapshot file; where prometheus serves, collect it."""
    if ENV not in os.environ:
        directory = tempfile.mkdtemp(prefix="afd-metrics-")  # 0700, unguessable
        os.environ[ENV] = directory
        atexit.register(_remove_directory, directory, os.getpid())
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    register_collector(REGISTRY)


def register_collector(registry: Any) -> None:
    """Add the AFD collector to a prometheus `registry` once."""
    if not any(
        isinstance(c, SnapshotCollector) for c in getattr(registry, "_collector_to_names", {})
    ):
        registry.register(SnapshotCollector(os.environ[ENV]))


def _remove_directory(directory: str, owner: int) -> None:
    """At the exit of the process that made the directory (not of a forked child)."""
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


class SnapshotCollector:
    """A prometheus collector yielding the counters of the latest snapshots in a directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{process: {counter: value}} over every publisher's file."""
        out: dict[str, dict[str, float]] = {}
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(SUFFIX))
        except OSError:
            return out  # no AFD in this server (or not started yet)
        for name in names:
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8") as fh:
                    values = json.load(fh)
                out |= {str(p): {str(k): float(v) for k, v in c.items()} for p, c in values.items()}
            except (OSError, ValueError, AttributeError, TypeError):
                continue  # being replaced, or not ours: the next scrape reads it
        return out

    def collect(self) -> Iterator[Any]:
        yield from metric_families(self.snapshot())

    def describe(self) -> list[Any]:
        return []  # names are known only at scrape time


def multiprocess() -> bool:
    """Whether prometheus_client in this process writes multiprocess files (it decides
    when it is imported, from `PROMETHEUS_MULTIPROC_DIR`)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


class MultiprocessExporter:
    """Mirrors the snapshot directory into multiprocess counters (run in one process only:
    prometheus sums a counter over the processes that wrote it).

    A counter that went down (an FFN actor restarted and counts from zero) is held until it
    passes its last value: counters never decrease.
    """

    def __init__(self, directory: str) -> None:
        self.collector = SnapshotCollector(directory)
        self._counters: dict[str, tuple[str, Any]] = {}  # name -> (label, Counter)
        self._gauges: dict[str, tuple[str, Any]] = {}  # name -> (label, Gauge)
        self._last: dict[tuple[str, str], float] = {}

    def export(self) -> None:
        from prometheus_client import Counter, Gauge

        for process, values in self.collector.snapshot().items():
            key, label = process_label(process)
            for name, value in values.items():
                if not is_counter(name):
                    if name not in self._gauges:
                        self._gauges[name] = (
                            key,
                            Gauge(
                                metric_name(name),
                                f"AFD {name}",
                                [key],
                                registry=None,
                                multiprocess_mode="mostrecent",
                            ),
                        )
                    gauge_key, gauge = self._gauges[name]
                    if gauge_key == key:
                        gauge.labels(label).set(value)
                    continue
                if name not in self._counters:
                    counter = Counter(metric_name(name), f"AFD {name}", [key], registry=None)
                    self._counters[name] = (key, counter)
                counter_key, counter = self._counters[name]
                delta = value - self._last.get((name, label), 0.0)
                if counter_key == key and delta > 0:
                    counter.labels(label).inc(delta)
                    self._last[(name, label)] = value


def newest_spans(spans: Iterable[Span], limit: int = TRACE_DUMP_SPANS) -> list[Span]:
    """The `limit` latest-starting spans of each process among `spans`, in start order."""
    by_process: dict[str, list[Span]] = {}
    for span in spans:
        by_process.setdefault(span.process, []).append(span)
    kept: list[Span] = []
    for mine in by_process.values():
        kept.extend(sorted(mine, key=lambda s: s.start_ns)[-limit:])
    return sorted(kept, key=lambda s: s.start_ns)


def trace_document(
    spans: Iterable[Span],
    forwards: Iterable[tuple[int, int]] = (),
    process: str = "",
    cpu: Iterable[tuple[int, int, int]] = (),
) -> dict[str, Any]:
    """`spans` as a Chrome/Perfetto trace (`chrome_trace`), plus, on `process`'s track, one
    instant event `FORWARD` per (start ns on CLOCK_MONOTONIC, tokens) of `forwards` (where a
    model forward reached its first MoE layer, and how many tokens it ran) and one counter
    event `CPU` per (ns on CLOCK_MONOTONIC, ns on a CPU, ns runnable without one) of `cpu`
    (a thread's cumulative CPU accounting at that time)."""
    document = chrome_trace(spans)
    add_marks(document, process, forwards, cpu)
    return document


def add_marks(
    document: dict[str, Any],
    process: str,
    forwards: Iterable[tuple[int, int]],
    cpu: Iterable[tuple[int, int, int]],
) -> None:
    """Append `trace_document`'s forward and CPU events of `process` to a Chrome trace,
    giving `process` a track of its own if it has none yet."""
    marks, counts = list(forwards), list(cpu)
    if not marks and not counts:
        return
    events: list[dict[str, Any]] = document["traceEvents"]
    pids = {e["args"]["name"]: e["pid"] for e in events if e.get("ph") == "M"}
    if process not in pids:
        pids[process] = max(pids.values(), default=0) + 1
        events.append(
            {"ph": "M", "name": "process_name", "pid": pids[process], "tid": 0,
             "args": {"name": process}}
        )  # fmt: skip
    for start_ns, tokens in marks:
        events.append(
            {"ph": "i", "s": "t", "name": FORWARD, "cat": FORWARD, "pid": pids[process],
             "tid": 0, "ts": start_ns / 1000, "args": {"tokens": tokens}}
        )  # fmt: skip
    for at_ns, run_ns, wait_ns in counts:
        events.append(
            {"ph": "C", "name": CPU, "cat": CPU, "pid": pids[process], "tid": 0,
             "ts": at_ns / 1000, "args": {"run_ns": run_ns, "wait_ns": wait_ns}}
        )  # fmt: skip


def request_trace(directory: str, request: str) -> None:
    """Ask every publisher of a server started with `TRACE_ENV` = `directory` for a dump
    tagged `request` (they answer within `PUBLISH_PERIOD_S`)."""
    _write_private(os.path.join(directory, TRACE_REQUEST), request)


def read_traces(directory: str, request: str) -> dict[str, dict[str, Any]]:
    """{publisher name: Chrome trace} of the dumps in `directory` that answer `request`."""
    out: dict[str, dict[str, Any]] = {}
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(TRACE_SUFFIX))
    except OSError:
        return out
    for name in names:
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as fh:
                document = json.load(fh)
        except (OSError, ValueError):
            continue  # being replaced: read it next time
        if isinstance(document, dict) and document.get("otherData", {}).get("afd_request") == (
            request
        ):
            out[name.removesuffix(TRACE_SUFFIX)] = document
    return out


def _write_private(path: str, text: str) -> None:
    """Replace `path` with `text` at once (owner-only; a reader sees the old or the new)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class CounterPublisher:
    """Writes `source.counters()` to `<AFD_METRICS_DIR>/<name>.json` every `PUBLISH_PERIOD_S`,
    and, where `source` has a `trace()` (a Chrome trace of its spans) and `AFD_TRACE_DIR`
    is set, answers dump requests there (see the module's docstring)."""

    def __init__(self, source: _HasCounters, name: str, export_all: bool = False) -> None:
        self.source = source
        self.name = name
        directory = os.environ.get(ENV)
        self.path = os.path.join(directory, name + SUFFIX) if directory else None
        self.exporter = (
            MultiprocessExporter(directory) if directory and export_all and multiprocess() else None
        )
        traces = os.environ.get(TRACE_ENV)
        self.trace_dir = traces if traces and callable(getattr(source, "trace", None)) else None
        self._answered: str | None = None  # the last dump request answered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.path or self.trace_dir:
            self._thread = threading.Thread(target=self._run, name="afd-metrics", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_PERIOD_S):
            self.publish()
            self.dump_trace()

    def dump_trace(self, final: bool = False) -> bool:
        """Write `<AFD_TRACE_DIR>/<name>.trace.json` if a request came since the last one
        answered (or, `final`, in any case); whether it wrote. Never raises."""
        if not self.trace_dir:
            return False
        try:
            try:
                with open(os.path.join(self.trace_dir, TRACE_REQUEST), encoding="utf-8") as fh:
                    request = fh.read().strip()
            except FileNotFoundError:
                request = ""
            if not final and (not request or request == self._answered):
                return False
            self._answered = request
            document = self.source.trace()  # type: ignore[attr-defined]
            document["otherData"] = {
                "afd_request": request,
                "afd_source": self.name,
                "afd_pid": os.getpid(),
                "afd_final": final,
            }
            path = os.path.join(self.trace_dir, self.name + TRACE_SUFFIX)
            _write_private(path, json.dumps(document))
            return True
        except Exception as exc:  # tracing must never take the server down
            log.warning("AFD trace dump to %s failed: %s", self.trace_dir, exc)
            return False

    def publish(self) -> None:
        if not self.path:
            return
        try:
            snapshot = self.source.counters()
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
                json.dump(snapshot, fh)
            os.replace(tmp, self.path)
            if self.exporter is not None:
                self.exporter.export()
        except Exception as exc:  # metrics must never take the server down
            log.debug("AFD metrics snapshot failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * PUBLISH_PERIOD_S)
        self.publish()
        self.dump_trace(final=True)
