"""Doorbells: a waiter sleeps in the kernel until a writer rings, instead of sleep-polling.

A doorbell is one int32 word beside a rank's window (in the same shared mapping, so every
process that maps the window sees it). A writer rings it right after its flag stores: it
bumps the word and wakes every thread sleeping on it (Linux `futex(2)`, FUTEX_WAKE; not
the private variant, since waiters live in other processes). A waiter reads the word,
checks its flags and, if they are not ready, sleeps until the word moves or a timeout
passes (FUTEX_WAIT on the value it read: a ring between its check and its sleep makes the
sleep return at once).

The window's flags stay the source of truth: a spurious wake-up costs one flag check, and
a wake-up that never comes (a writer that stores flags without ringing) costs latency, never
correctness, since every sleep is bounded (`wait.DOORBELL_MAX_SLEEP_S`). Where futex is
unavailable (not Linux, an unknown architecture) `wait` just sleeps: sleep-polling.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time

import torch

# futex(2) syscall numbers (Linux uapi unistd.h) and operations (linux/futex.h)
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}
FUTEX_WAIT, FUTEX_WAKE = 0, 1
WAKE_ALL = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    number = _SYS_FUTEX.get(platform.machine())
    if not sys.platform.startswith("linux") or number is None:
        return None
    syscall = ctypes.CDLL(None, use_errno=True).syscall  # ctypes releases the GIL around it
    syscall.restype = ctypes.c_long
    return syscall


def _futex_holding_the_gil() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The same syscall through `PyDLL`, which keeps the GIL: for FUTEX_WAKE, which never
    blocks, so releasing the GIL around it would only invite the thread just woken (an
    FFN worker thread beside the attention rank) to take it in the middle of the ring."""
    if _syscall is None:
        return None
    wake = ctypes.PyDLL(None, use_errno=True).syscall
    wake.restype = ctypes.c_long
    return wake


_syscall = _futex()
_wake_syscall = _futex_holding_the_gil()
_SYS_FUTEX_NUMBER = _SYS_FUTEX.get(platform.machine(), -1)


def futex_available() -> bool:
    return _syscall is not None and os.environ.get("AFD_NO_DOORBELL") != "1"


class Doorbell:
    """The doorbell in `word` (int32, one element, 4-byte aligned, in memory every waiter
    and ringer maps)."""

    def __init__(self, word: torch.Tensor) -> None:
        if word.dtype != torch.int32 or word.numel() != 1 or word.data_ptr() % 4:
            raise ValueError(
                f"a doorbell is one aligned int32 word, got {word.dtype} {tuple(word.shape)}"
            )
        self.word = word
        self._cell = word.numpy()  # the same memory; a numpy scalar access costs no torch call
        self.address = word.data_ptr()
        self._futex = futex_available()

    def value(self) -> int:
        return int(self._cell[0])

    def ring(self) -> None:
        """Bump the word (a plain store: a concurrent ring may be lost, but the word still
        moves away from what any sleeper read) and wake every sleeper."""
        self._cell[0] = (int(self._cell[0]) + 1) & 0x7FFFFFFF
        if self._futex:
            assert _wake_syscall is not None
            _wake_syscall(
                _SYS_FUTEX_NUMBER,
                ctypes.c_void_p(self.address),
                FUTEX_WAKE,
                WAKE_ALL,
                None,
                None,
                0,
            )

    def wait(self, seen: int, timeout_s: float) -> None:
        """Sleep until the word differs from `seen` (a ring), or `timeout_s` passes."""
        if timeout_s <= 0:
            return
        if not self._futex:
            time.sleep(timeout_s)
            return
        assert _syscall is not None
        sec = int(timeout_s)
        spec = _Timespec(sec, int((timeout_s - sec) * 1e9))
        # returns on a wake, a changed word (EAGAIN), the timeout or a signal: all mean
        # "look at the flags again"
        _syscall(
            _SYS_FUTEX_NUMBER,
            ctypes.c_void_p(self.address),
            FUTEX_WAIT,
            seen,
            ctypes.byref(spec),
            None,
            0,
        )
