"""Doorbells: a waiter sleeps in the kernel until a writer rings, instead of sleep-polling.

A doorbell is one int32 word beside a rank's window (in the same shared mapping, so every
process that maps the window sees it). A writer rings it right after its flag stores: one
`futex(2)` FUTEX_WAKE_OP call adds 1 to the word, atomically, and wakes every thread
sleeping on it (not the private variant, since waiters live in other processes). A
waiter reads the word, checks its flags and, if they are not ready, sleeps until the word
moves or a timeout passes (FUTEX_WAIT on the value it read: a ring between its check and
its sleep makes the sleep return at once).

The bump is atomic so that two writers ringing at once each move the word (a read, +1,
store from two processes can move it back, and a waiter that read the newer value would
then sleep through the second ring). The syscall is also a full memory barrier, so the
flags a ring announces are visible to whoever sees the word move.

The window's flags stay the source of truth: a spurious wake-up costs one flag check, and
a wake-up that never comes (a writer that stores flags without ringing) costs latency, never
correctness, since every sleep is bounded (`wait.DOORBELL_MAX_SLEEP_S`). Writers ring
wherever futex exists; a waiter sleeps on the word only where futex exists and
`AFD_NO_DOORBELL=1` is not set (`Doorbell.sleeps`), and sleep-polls otherwise.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time

import torch

# futex(2) syscall numbers (Linux uapi unistd.h), operations and the FUTEX_WAKE_OP encoding
# (linux/futex.h: op << 28 | cmp << 24 | oparg << 12 | cmparg)
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}
FUTEX_WAIT, FUTEX_WAKE, FUTEX_WAKE_OP = 0, 1, 5
FUTEX_OP_ADD, FUTEX_OP_CMP_EQ = 1, 0
ADD_ONE = (FUTEX_OP_ADD << 28) | (FUTEX_OP_CMP_EQ << 24) | (1 << 12)
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
    """The same syscall through `PyDLL`, which keeps the GIL: for FUTEX_WAKE_OP, which never
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
    """Whether waiters sleep on doorbells here: futex exists and `AFD_NO_DOORBELL` is not 1."""
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
        self.sleeps = futex_available()  # else a waiter polls (`wait.wait_until`)

    def value(self) -> int:
        return int(self._cell[0])

    def ring(self) -> None:
        """Add 1 to the word, atomically, and wake every sleeper (one syscall; where futex
        does not exist nobody sleeps on the word, and a plain store moves it)."""
        if _wake_syscall is None:
            self._cell[0] = (int(self._cell[0]) + 1) & 0x7FFFFFFF
            return
        word = ctypes.c_void_p(self.address)
        _wake_syscall(_SYS_FUTEX_NUMBER, word, FUTEX_WAKE_OP, WAKE_ALL, 0, word, ADD_ONE)

    def wait(self, seen: int, timeout_s: float) -> None:
        """Sleep until the word differs from `seen` (a ring), or `timeout_s` passes."""
        if timeout_s <= 0:
            return
        if _syscall is None:
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
