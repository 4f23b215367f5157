"""A Ray cluster of its own for a test, and small waits around its processes.

`ray_head()` starts a separate Ray head (token authentication on, Ray's default); other
processes join it by the address it yields, as the nodes of a real cluster would.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HEAD_START_S = 90.0


def wait_for(condition: Callable[[], bool], timeout_s: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what()}")
        time.sleep(0.1)


@contextlib.contextmanager
def local_ray(num_cpus: int = 8) -> Iterator[None]:
    """A local Ray of this process for a test module (token auth on, Ray's default).

    "local": a Ray of our own even where another one runs on this host. Its processes
    inherit OMP_NUM_THREADS = every core, as from vLLM's engine launcher (which sets it):
    the actors must still run one torch thread per CPU Ray gives them.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(max(2, os.cpu_count() or 2))
        try:
            ray.init(
                address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False
            )
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def ray_env() -> dict[str, str]:
    """This process's environment, token authentication on (never turned off here)."""
    return dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))


@contextlib.contextmanager
def ray_head() -> Iterator[str]:
    """A separate Ray head (`ray start --head --block`), its GCS address; torn down after.

    `--block` keeps `ray start` in the foreground as the parent of the head's processes:
    SIGTERM to it (our child, by pid) stops exactly this head, where `ray stop` would stop
    every Ray of this user on the host. A short private --temp-dir keeps its sockets apart.
    """
    cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    assert cli is not None, "the `ray` command of this environment"
    temp = tempfile.mkdtemp(prefix="afdray", dir="/tmp")
    log_path = Path(temp, "head.log")
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            [cli, "start", "--head", "--port=0", "--num-cpus=4", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={temp}", "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True,
        )  # fmt: skip
    try:
        address_file = Path(temp, "ray_current_cluster")  # written once the head is up
        wait_for(
            lambda: (
                head.poll() is not None
                or (address_file.exists() and address_file.read_text().strip() != "")
            ),
            HEAD_START_S,
            lambda: f"ray start --head: {log_path.read_text()[-2000:]}",
        )
        assert head.poll() is None, f"ray start --head exited: {log_path.read_text()[-2000:]}"
        yield address_file.read_text().strip()
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=45)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # anything left in its process group
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def read_line(proc: subprocess.Popen[bytes], timeout_s: float, stderr: Path) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            assert left > 0, f"driver said nothing in {timeout_s:g} s: {stderr.read_text()[-3000:]}"
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"driver exited ({proc.wait()}): {stderr.read_text()[-3000:]}"
                buf += chunk
    return buf.split(b"\n", 1)[0].decode()
