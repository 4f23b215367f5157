"""What a `vllm serve` run leaves on the host: its processes and its /dev/shm files.

Shared by the end-to-end tests. A server starts in a session of its own (Ray's processes and
the FFN actors stay in it); AFD's window janitors leave it on purpose and are told apart by
the window tokens in their command lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class Proc:
    pid: int
    name: str
    cmdline: str
    sid: int


ProcKey = tuple[int, float]  # (pid, create time): a pid reused later is another process


def processes() -> dict[ProcKey, Proc]:
    """Every live (non-zombie) process on the host."""
    out: dict[ProcKey, Proc] = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time", "status"]):
        info = p.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue  # dead, only not reaped (the container's init may not reap orphans)
        try:
            sid = os.getsid(info["pid"])
        except OSError:
            continue  # exited meanwhile
        cmdline = " ".join(info["cmdline"] or [])
        out[(info["pid"], info["create_time"])] = Proc(
            info["pid"], info["name"] or "", cmdline, sid
        )
    return out


def is_ray(proc: Proc) -> bool:
    return (
        proc.name in ("raylet", "gcs_server")
        or proc.cmdline.startswith("ray::")
        or "/site-packages/ray/" in proc.cmdline
    )


def is_janitor(proc: Proc) -> bool:
    return "windows/janitor.py" in proc.cmdline


_SHM_FILE = re.compile(r"/dev/shm/(\S+)$", re.MULTILINE)  # not "... (deleted)": unlinked
_AFD_FILE = re.compile(r"afd-([0-9a-f]{32})-[0-9]+")


def shm_files() -> set[str]:
    return set(os.listdir(SHM_DIR))


def afd_files(names: set[str]) -> set[str]:
    return {name for name in names if _AFD_FILE.fullmatch(name)}


def mapped_shm(pids: set[int]) -> set[str]:
    """The `/dev/shm` files that processes `pids` have mapped."""
    names: set[str] = set()
    for pid in pids:
        path = f"/proc/{pid}/maps"
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as fh:
            names |= set(_SHM_FILE.findall(fh.read()))
    return names


def own_processes(
    before: dict[ProcKey, Proc], server_pid: int, shm: set[str]
) -> dict[ProcKey, Proc]:
    """New processes of the server: its session (it runs in its own), and the janitors of
    its windows (they leave the session on purpose). Other Ray instances, janitors or
    servers on the host (other users, other tests) are in neither."""
    tokens = {m.group(1) for name in shm if (m := _AFD_FILE.fullmatch(name))}
    return {
        key: proc
        for key, proc in processes().items()
        if key not in before
        and (
            proc.sid == server_pid or (is_janitor(proc) and any(t in proc.cmdline for t in tokens))
        )
    }


def wait_until(done: Callable[[], bool], timeout_s: float, period_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(period_s)
    return True


@dataclass
class Footprint:
    """A server's own processes and /dev/shm files while it served, and what of them was
    still there once it stopped (after a deadline)."""

    own_processes: dict[ProcKey, Proc]
    new_shm: set[str]
    left_processes: dict[ProcKey, Proc] | None = None
    left_shm: set[str] | None = None

    @classmethod
    def while_serving(
        cls, before: dict[ProcKey, Proc], shm_before: set[str], server_pid: int
    ) -> Footprint:
        session = {p.pid for p in processes().values() if p.sid == server_pid}
        new_shm = mapped_shm(session) - shm_before
        return cls(own_processes(before, server_pid, new_shm), new_shm)

    def wait_gone(self, server_pid: int, timeout_s: float) -> bool:
        """Wait until none of it is left; record what is."""
        own = self.own_processes

        def all_gone() -> bool:
            now = processes()
            self.left_processes = {k: p for k, p in now.items() if k in own or p.sid == server_pid}
            self.left_shm = self.new_shm & shm_files()
            return not self.left_processes and not self.left_shm

        return wait_until(all_gone, timeout_s)
