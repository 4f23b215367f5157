"""Waiting on window flags without burning a core, and ordering window stores.

With a doorbell (`afd_dispatch.windows.doorbell`), a flag wait checks the flags once per
wake-up and otherwise sleeps in the kernel until the writer rings. Without one, it polls a
few times back to back (a decode step's answer is often already there), then sleeps with
exponential back-off capped at `MAX_SLEEP_S`. On a 2-core host a spinning poller, or one
that wakes on a timer, would starve the very process it waits for.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from afd_dispatch.errors import AFDTimeoutError
from afd_dispatch.windows.doorbell import Doorbell

EAGER_POLLS = 4
FIRST_SLEEP_S = 20e-6
MAX_SLEEP_S = 1e-3
WATCH_PERIOD_S = 0.05  # how often a watched wait asks about its peers
DOORBELL_MAX_SLEEP_S = WATCH_PERIOD_S  # a ring ends the sleep; this bounds a missed one
EXTEND_S = 1.0  # how far past its deadline a wait runs per `Watch.extend`


def _built_fence() -> Callable[[], None] | None:
    """The C barrier, built by `pip install` (afd_dispatch/windows/_fence.c); optional, see
    store_fence."""
    try:
        from afd_dispatch.windows._fence import fence
    except ImportError:
        return None
    return fence


_native_fence = _built_fence()
_fence_lock = threading.Lock()
FENCE = "native" if _native_fence is not None else "lock"  # what store_fence runs
if _native_fence is None and platform.machine() not in ("x86_64", "AMD64"):
    logging.getLogger(__name__).warning(
        "AFD: afd_dispatch.windows._fence is not built; on %s a lock is not a full memory "
        "barrier, so reference windows may publish a flag before its rows",
        platform.machine(),
    )
_local = threading.local()


class Watch(Protocol):
    """What a waiting thread knows about its peers beyond the flags it waits on."""

    def check(self) -> None:
        """Raise when a peer can no longer answer (the wait then fails at once)."""

    def extend(self, waited_s: float) -> bool:
        """Whether a wait at its deadline, `waited_s` in, should go on (a peer recovers)."""
        ...

    def describe(self) -> str:
        """The peers' state, for the message of a wait that expires."""
        ...


@contextmanager
def watching(watch: Watch | None) -> Iterator[None]:
    """Every `wait_until` of this thread inside the block consults `watch`."""
    previous = getattr(_local, "watch", None)
    _local.watch = watch
    try:
        yield
    finally:
        _local.watch = previous


def store_fence() -> None:
    """A full memory barrier: window stores before it are visible before those after it,
    and no load after it is satisfied before them.

    Readers in other processes poll a flag and then read the data it guards, so data must
    be visible before its flag, and a reader must not read the data before the flag. It is
    `__atomic_thread_fence(__ATOMIC_SEQ_CST)` from the C extension `_fence` (`mfence` on
    x86-64, `dmb ish` on AArch64). Without the extension it takes and releases a lock: a
    locked read-modify-write, a full barrier on x86-64, but on AArch64 only an acquire and
    a release, which let a later store pass an earlier one (a warning at import says so).
    """
    if _native_fence is not None:
        _native_fence()
        return
    with _fence_lock:
        pass


class ScheduleStopped(RuntimeError):
    """The schedule context was stopped (`stop_schedule`) while an op waited on it."""


def wait_until(
    ready: Callable[[], bool],
    timeout_s: float,
    describe_missing: Callable[[], str],
    stopped: Callable[[], bool] | None = None,
    doorbell: Doorbell | None = None,
) -> None:
    """Return once `ready()` is true; raise `AFDTimeoutError` after `timeout_s`.

    `describe_missing()` is called only on expiry and must say who waited and what is
    still missing. `stopped()`, when given, aborts the wait with `ScheduleStopped`. A
    `watching` block's `Watch` may fail the wait early or extend it past its deadline.
    With the `doorbell` of the window waited on, it sleeps until a ring (or a bounded
    `DOORBELL_MAX_SLEEP_S`), checking the flags once per wake-up.
    """
    if _ready_then_fence(ready):
        return
    if doorbell is not None and not doorbell.sleeps:
        doorbell = None  # no futex here, or AFD_NO_DOORBELL=1: poll
    watch: Watch | None = getattr(_local, "watch", None)
    start = time.monotonic()
    deadline = start + timeout_s
    next_watch = start + WATCH_PERIOD_S
    if doorbell is None:
        for _ in range(EAGER_POLLS):
            if _ready_then_fence(ready):
                return
    sleep_s = FIRST_SLEEP_S
    while True:
        if stopped is not None and stopped():
            raise ScheduleStopped("the schedule context was stopped while waiting")
        now = time.monotonic()
        if watch is not None and now >= next_watch:
            watch.check()
            next_watch = now + WATCH_PERIOD_S
        if now >= deadline:
            if _ready_then_fence(ready):
                return
            if watch is not None and watch.extend(now - start):
                deadline = now + EXTEND_S
                continue
            peers = "" if watch is None else f"; {watch.describe()}"
            raise AFDTimeoutError(
                f"{describe_missing()} (deadline {timeout_s:g} s passed, waited "
                f"{now - start:.1f} s){peers}"
            )
        if doorbell is None:
            time.sleep(min(sleep_s, deadline - now))
            sleep_s = min(sleep_s * 2, MAX_SLEEP_S)
            if _ready_then_fence(ready):
                return
            continue
        # One flag check per wake-up: the word is read before the flags, so a ring after
        # the check ends the sleep at once. A ring is an atomic add in a syscall after the
        # writer's flag stores, so a waiter that read a rung word sees the flags that ring
        # announced, and no ring is lost to another: it can sleep until the ring, not poll.
        seen = doorbell.value()
        store_fence()  # the word before the flags (AArch64 may reorder two loads)
        if _ready_then_fence(ready):
            return
        doorbell.wait(seen, min(DOORBELL_MAX_SLEEP_S, deadline - now))


def _ready_then_fence(ready: Callable[[], bool]) -> bool:
    # The reader's half of the protocol: once the flag is seen, the data it guards must not
    # be read from before it (AArch64 may reorder two loads; x86 does not).
    if ready():
        store_fence()
        return True
    return False
