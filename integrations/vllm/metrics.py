"""AFD counters on the vLLM server's `/metrics`.

The counters live in the worker (attention side) and in the FFN actors; `/metrics` is
served by the API server process. The worker's `CounterPublisher` writes a JSON snapshot
once a second into a private directory named by `AFD_METRICS_FILE`; the API server's
collector reads it at each scrape. The API server sets that variable when the plugin
first loads there, before it starts the engine, whose processes inherit it, and removes
the directory when it exits.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, Protocol

log = logging.getLogger(__name__)
ENV = "AFD_METRICS_FILE"
PUBLISH_PERIOD_S = 1.0
PREFIX = "afd_"


class _HasCounters(Protocol):
    def counters(self) -> dict[str, dict[str, float]]: ...


def install() -> None:
    """In every process: agree on the snapshot file; where prometheus serves, collect it."""
    if ENV not in os.environ:
        directory = tempfile.mkdtemp(prefix="afd-metrics-")  # 0700, unguessable
        os.environ[ENV] = os.path.join(directory, "counters.json")
        atexit.register(_remove_directory, directory, os.getpid())
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    if not any(
        isinstance(c, SnapshotCollector) for c in getattr(REGISTRY, "_collector_to_names", {})
    ):
        REGISTRY.register(SnapshotCollector(os.environ[ENV]))


def _remove_directory(directory: str, owner: int) -> None:
    """At the exit of the process that made the directory (not of a forked child)."""
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


class SnapshotCollector:
    """A prometheus collector yielding the counters of the latest snapshot."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        try:
            with open(self.path, encoding="utf-8") as fh:
                snapshot = json.load(fh)
        except (OSError, ValueError):
            return  # no AFD in this server (or not started yet)
        by_name: dict[str, list[tuple[str, float]]] = {}
        for process, values in snapshot.items():
            for name, value in values.items():
                by_name.setdefault(name, []).append((process, float(value)))
        for name, samples in sorted(by_name.items()):
            metric = PREFIX + "".join(c if c.isascii() and c.isalnum() else "_" for c in name)
            family = CounterMetricFamily(metric, f"AFD {name}", labels=["process"])
            for process, value in samples:
                family.add_metric([process], value)
            yield family

    def describe(self) -> list[Any]:
        return []  # names are known only at scrape time


class CounterPublisher:
    """Writes `source.counters()` to the snapshot file every `PUBLISH_PERIOD_S`."""

    def __init__(self, source: _HasCounters) -> None:
        self.source = source
        self.path = os.environ.get(ENV)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.path:
            self._thread = threading.Thread(target=self._run, name="afd-metrics", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_PERIOD_S):
            self.publish()

    def publish(self) -> None:
        if not self.path:
            return
        try:
            snapshot = self.source.counters()
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
                json.dump(snapshot, fh)
            os.replace(tmp, self.path)
        except Exception as exc:  # metrics must never take the server down
            log.debug("AFD metrics snapshot failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * PUBLISH_PERIOD_S)
        self.publish()
