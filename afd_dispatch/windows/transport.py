"""Where window bytes live: process memory, or shared memory other processes map.

Both transports hand out one 1-D uint8 tensor per rank. Writes into another rank's window
are plain stores into that tensor, one-sided as HCCL's window writes are; the ordering of
those stores is the ops' business (`store_fence`).
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Sequence
from typing import Literal, Protocol, get_args

import torch

WindowTransport = Literal["inproc", "shm"]
"""Where a window group's memory lives: this process ("inproc") or POSIX shared memory."""
WINDOW_TRANSPORTS: tuple[str, ...] = get_args(WindowTransport)

SHM_DIR = "/dev/shm"


class Transport(Protocol):
    kind: str

    def window(self, rank: int) -> torch.Tensor: ...

    def close(self) -> None: ...


class InProcessTransport:
    """Windows in this process's memory: every rank of the group lives in one process."""

    kind = "inproc"

    def __init__(self, sizes: Sequence[int]) -> None:
        self._windows = [torch.zeros(n, dtype=torch.uint8) for n in sizes]

    def window(self, rank: int) -> torch.Tensor:
        return self._windows[rank]

    def close(self) -> None:
        self._windows = []


class SharedMemoryTransport:
    """One POSIX shared-memory file per rank under /dev/shm, mapped by every process.

    File names carry a 128-bit random token, so no other local user can guess them, and
    the files are created owner-only (0600) with O_EXCL | O_NOFOLLOW. Attaching checks
    owner, mode and size before mapping, since the token may come from an untrusted place.
    The creating process unlinks the files on `close()` or at exit.
    """

    kind = "shm"

    def __init__(self, sizes: Sequence[int], token: str | None = None) -> None:
        self.owner = token is None
        self.token = secrets.token_hex(16) if token is None else _checked_token(token)
        self._sizes = list(sizes)
        self._maps: list[mmap.mmap] = []
        self._windows: list[torch.Tensor] = []
        self._janitor: subprocess.Popen[bytes] | None = None
        try:
            for rank, size in enumerate(self._sizes):
                self._maps.append(self._open(rank, size))
        except BaseException:
            self.close()
            raise
        self._windows = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        if self.owner:
            atexit.register(self.close)
            self._janitor = _start_janitor(self.token, len(self._sizes))

    def path(self, rank: int) -> str:
        return os.path.join(SHM_DIR, f"afd-{self.token}-{rank}")

    def _open(self, rank: int, size: int) -> mmap.mmap:
        path = self.path(rank)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if self.owner:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        else:
            fd = os.open(path, flags)
        try:
            if self.owner:
                os.ftruncate(fd, size)
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise PermissionError(f"{path}: not an owner-only file of this user")
            if info.st_size != size:
                raise ValueError(f"{path}: {info.st_size} bytes, expected {size}")
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def window(self, rank: int) -> torch.Tensor:
        return self._windows[rank]

    def close(self) -> None:
        self._windows = []
        for m in self._maps:
            # A caller may still hold a view; the mapping then goes when the view does.
            with contextlib.suppress(BufferError):
                m.close()
        self._maps = []
        if self.owner:
            for rank in range(len(self._sizes)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(rank))
            atexit.unregister(self.close)
            self.owner = False
        if self._janitor is not None:
            assert self._janitor.stdin is not None
            self._janitor.stdin.close()
            self._janitor = None


def _start_janitor(token: str, ranks: int) -> subprocess.Popen[bytes]:
    """A watcher that unlinks the files if this process dies without `close()`."""
    script = os.path.join(os.path.dirname(__file__), "janitor.py")
    janitor = subprocess.Popen(
        [sys.executable, "-S", "-E", script, SHM_DIR, token, str(ranks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    janitor.wait(timeout=30)  # the launcher exits at once; its forked child keeps the pipe
    return janitor


def _checked_token(token: str) -> str:
    if not (
        isinstance(token, str) and len(token) == 32 and all(c in "0123456789abcdef" for c in token)
    ):
        raise ValueError(f"shared-memory token: expected 32 lowercase hex digits, got {token!r}")
    return token
