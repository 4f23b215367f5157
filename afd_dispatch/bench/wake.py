"""`bench --level ops`, wake rows: how long a flag takes to wake a waiter in another process.

Two processes share one owner-only shared-memory file holding two flag words and their
doorbells (`afd_dispatch.windows.doorbell`). They play ping-pong: the parent stores
flag = i and rings, the child's `wait_until` sees it and answers through the other word,
the parent's wait sees that. Half a round trip is one wake-up, measured from the store to
the other side's return from its wait: with doorbells (the waiter sleeps in futex until
the ring) and without (the back-off sleep-polling every wait used before). p50 and p99
over `ROUND_TRIPS` round trips, after `WARMUP` unmeasured ones.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable

import torch

from afd_dispatch.bench.report import Row, Target
from afd_dispatch.windows.doorbell import Doorbell
from afd_dispatch.windows.transport import SharedMemoryTransport
from afd_dispatch.windows.wait import wait_until

ROUND_TRIPS = 2000
WARMUP = 100
TIMEOUT_S = 30.0
WAKE_TARGET_US = 50.0  # p50, this host (issue: doorbell wake-ups)
# int32 words of the shared file: ping flag, pong flag, then each one's doorbell on its
# own 64-byte line
PING, PONG, PING_BELL, PONG_BELL = 0, 1, 16, 32
FILE_BYTES = 4 * 48


def _words(transport: SharedMemoryTransport) -> torch.Tensor:
    return transport.window(0).view(torch.int32)


def _bells(words: torch.Tensor, use: bool) -> tuple[Doorbell | None, Doorbell | None]:
    if not use:
        return None, None
    return Doorbell(words[PING_BELL : PING_BELL + 1]), Doorbell(words[PONG_BELL : PONG_BELL + 1])


def _equals(words: torch.Tensor, index: int, value: int) -> Callable[[], bool]:
    return lambda: int(words[index]) == value


def _answer(token: str, rounds: int, use_doorbell: bool) -> None:
    """The child: wait for each ping, answer with the same number."""
    transport = SharedMemoryTransport([FILE_BYTES], token)
    words = _words(transport)
    ping_bell, pong_bell = _bells(words, use_doorbell)
    for i in range(1, rounds + 1):
        wait_until(_equals(words, PING, i), TIMEOUT_S, lambda: "ping", doorbell=ping_bell)
        words[PONG] = i
        if pong_bell is not None:
            pong_bell.ring()
    transport.close()


def round_trips(use_doorbell: bool, rounds: int = ROUND_TRIPS) -> list[float]:
    """Seconds of each measured round trip (parent store -> child wake -> parent wake)."""
    transport = SharedMemoryTransport([FILE_BYTES])
    try:
        words = _words(transport)
        words.zero_()
        ping_bell, pong_bell = _bells(words, use_doorbell)
        total = rounds + WARMUP
        child = mp.get_context("spawn").Process(
            target=_answer, args=(transport.token, total, use_doorbell), daemon=True
        )
        child.start()
        times = []
        try:
            for i in range(1, total + 1):
                start = time.perf_counter()
                words[PING] = i
                if ping_bell is not None:
                    ping_bell.ring()
                wait_until(_equals(words, PONG, i), TIMEOUT_S, lambda: "pong", doorbell=pong_bell)
                if i > WARMUP:
                    times.append(time.perf_counter() - start)
        finally:
            child.join(TIMEOUT_S)
            if child.is_alive():
                child.kill()
        return times
    finally:
        transport.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_wake(rounds: int = ROUND_TRIPS) -> Row:
    """The wake row: doorbell p50 (us, one way) against its target; sleep-polling beside."""
    bell = [t / 2 for t in round_trips(True, rounds)]
    poll = [t / 2 for t in round_trips(False, rounds)]
    p50 = _percentile(bell, 0.5) * 1e6
    return Row(
        name="wake_p50_us",
        value=p50,
        unit="us",
        description="cross-process wake-up (half a ping-pong round trip), doorbell",
        metrics={
            "doorbell_p50_us": p50,
            "doorbell_p99_us": _percentile(bell, 0.99) * 1e6,
            "sleep_poll_p50_us": _percentile(poll, 0.5) * 1e6,
            "sleep_poll_p99_us": _percentile(poll, 0.99) * 1e6,
            "round_trips": float(rounds),
        },
        target=Target("<=", WAKE_TARGET_US),
    )
