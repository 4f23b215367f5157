"""Doorbells (`afd_dispatch.windows.doorbell`): rings wake sleepers, in this process and in
another; a missed ring costs latency only; the doorbell lives beside the window, never in it.

Bounds below are hang bounds (a sleeper that a ring did not wake would sleep its full
10 s), not speed claims: the wake latency is the ops benchmark's `wake_p50_us` row.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import uuid

import pytest
import torch

from afd_dispatch.layout import WindowLayout
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import create_window_group, wait
from afd_dispatch.windows.doorbell import Doorbell, futex_available
from afd_dispatch.windows.transport import SharedMemoryTransport
from afd_dispatch.windows.wait import wait_until

LONG_S = 10.0  # a sleep no ring ended
WOKEN_WITHIN_S = 5.0


def test_futex_is_used_on_this_host() -> None:
    assert futex_available()  # Linux x86_64 / aarch64: the doorbells really sleep in futex


def test_a_ring_wakes_a_sleeper_in_another_thread() -> None:
    word = torch.zeros(1, dtype=torch.int32)
    bell = Doorbell(word)
    seen = bell.value()
    woke: list[float] = []
    sleeper = threading.Thread(
        target=lambda: (bell.wait(seen, LONG_S), woke.append(time.monotonic()))
    )
    sleeper.start()
    time.sleep(0.2)  # asleep by now
    rang = time.monotonic()
    bell.ring()
    sleeper.join(LONG_S + 1)
    assert woke and woke[0] - rang < WOKEN_WITHIN_S
    assert bell.value() == seen + 1


def test_a_wait_on_a_word_that_already_moved_returns_at_once() -> None:
    bell = Doorbell(torch.zeros(1, dtype=torch.int32))
    bell.ring()
    start = time.monotonic()
    bell.wait(0, LONG_S)  # the word is 1 now: nothing to sleep for
    assert time.monotonic() - start < WOKEN_WITHIN_S


def test_a_flag_stored_without_a_ring_is_still_seen() -> None:
    """The flags are the truth: a writer that never rings delays a waiter, never hangs it."""
    flags = torch.zeros(2, dtype=torch.int32)
    bell = Doorbell(flags[1:2])
    timer = threading.Timer(0.2, flags.__setitem__, (0, 1))  # stores, no ring
    timer.start()
    wait_until(lambda: int(flags[0]) == 1, LONG_S, lambda: "flag 0", doorbell=bell)
    timer.join()


@pytest.mark.parametrize(
    "word",
    [
        torch.zeros(2, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(3, dtype=torch.uint8)[1:2],
    ],
    ids=["two words", "int64", "uint8"],
)
def test_a_doorbell_is_one_int32_word(word: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="one aligned int32 word"):
        Doorbell(word)


def _ring_after(token: str, delay_s: float, no_doorbell: bool) -> None:
    if no_doorbell:  # this process's waiters poll; its rings must still wake
        os.environ["AFD_NO_DOORBELL"] = "1"
    transport = SharedMemoryTransport([64], token)
    words = transport.window(0).view(torch.int32)
    time.sleep(delay_s)
    words[0] = 1
    transport.window(0).view(torch.int64)[1] = time.monotonic_ns()  # when it rang
    Doorbell(words[1:2]).ring()
    transport.close()


def _woken_after_ring_s(no_doorbell: bool) -> float:
    """Seconds between a spawned process's ring (after 1 s) and the wake-up of this one,
    sleeping on the doorbell in sleeps of LONG_S: a lost ring shows as about LONG_S."""
    transport = SharedMemoryTransport([64])
    try:
        words = transport.window(0).view(torch.int32)
        ring = (transport.token, 1.0, no_doorbell)
        child = mp.get_context("spawn").Process(target=_ring_after, args=ring)
        child.start()
        try:
            bell = Doorbell(words[1:2])
            assert bell.sleeps
            seen = bell.value()
            start = time.monotonic()
            while int(words[0]) != 1 and time.monotonic() - start < 60:
                bell.wait(seen, LONG_S)  # one long sleep: only the child's ring ends it early
                seen = bell.value()
            woke_ns = time.monotonic_ns()
            assert int(words[0]) == 1
            rang_ns = int(transport.window(0).view(torch.int64)[1])
        finally:
            child.join(60)
        assert child.exitcode == 0
        return (woke_ns - rang_ns) / 1e9
    finally:
        transport.close()


def test_a_ring_from_another_process_wakes_the_waiter() -> None:
    assert _woken_after_ring_s(no_doorbell=False) < WOKEN_WITHIN_S


def test_each_rank_has_a_doorbell_outside_its_window() -> None:
    topology = RankTopology(2, 2)
    layout = WindowLayout(
        num_attention_ranks=2, micro_batches=2, tokens=4, topk=2, shared=0, hidden=16
    )
    group = create_window_group(f"doorbells{uuid.uuid4().hex[:8]}", topology, layout, "shm")
    try:
        for rank in range(topology.world_size):
            group.window(rank).fill_(0x5A)
            if topology.is_ffn(rank):
                group.journal_storage(rank).fill_(0x5A)
        for rank in range(topology.world_size):
            bell = group.doorbell(rank)
            assert bell is not None
            before = bell.value()
            bell.ring()
            assert bell.value() == before + 1
            assert bool((group.window(rank) == 0x5A).all())  # the window's bytes are untouched
            if topology.is_ffn(rank):
                assert bool((group.journal_storage(rank) == 0x5A).all())
    finally:
        group.close()


def test_a_long_wait_on_a_doorbell_burns_no_core() -> None:
    """A waiter that nobody rings sleeps (backing off to WATCH_PERIOD_S), it does not spin:
    on a 2-core host a spinning poller starves the process it waits for."""
    bell = Doorbell(torch.zeros(1, dtype=torch.int32))
    flag = torch.zeros(1, dtype=torch.int32)
    cpu, wall = time.process_time(), time.monotonic()
    timer = threading.Timer(1.5, flag.__setitem__, (0, 1))
    timer.start()
    wait_until(lambda: int(flag[0]) == 1, LONG_S, lambda: "flag", doorbell=bell)
    timer.join()
    assert time.monotonic() - wall >= 1.5
    assert time.process_time() - cpu < 0.3  # of 1.5 s waited: asleep nearly all of it


def test_a_doorbell_wait_checks_its_flags_once_per_wake_up() -> None:
    """With a doorbell nothing wakes a waiter but a ring or the bounded sleep: no eager polls,
    no timer back-off from microseconds (each check is a wake-up on a busy 2-core host)."""
    bell = Doorbell(torch.zeros(1, dtype=torch.int32))
    flag = torch.zeros(1, dtype=torch.int32)
    checks = 0

    def ready() -> bool:
        nonlocal checks
        checks += 1
        return int(flag[0]) == 1

    waited_s, rings = 0.5, 3
    ringer = threading.Thread(
        target=lambda: [(time.sleep(waited_s / (rings + 1)), bell.ring()) for _ in range(rings)]
    )
    ringer.start()
    timer = threading.Timer(waited_s, lambda: (flag.__setitem__(0, 1), bell.ring()))
    timer.start()
    wait_until(ready, LONG_S, lambda: "flag", doorbell=bell)
    timer.join()
    ringer.join()
    # the first check, the one after reading the word, one per ring (the flag's included),
    # one per bounded sleep that no ring ended
    assert checks <= 2 + (rings + 1) + waited_s / wait.DOORBELL_MAX_SLEEP_S


RINGS_PER_PROCESS = 200_000
GO, READY = 0, 2  # words of the shared 64 bytes: the start signal, one ready word per ringer


def _ring_many(token: str, index: int, rings: int) -> None:
    transport = SharedMemoryTransport([64], token)
    words = transport.window(0).view(torch.int32)
    bell = Doorbell(words[1:2])
    words[READY + index] = 1
    while int(words[GO]) == 0:  # all ringers start together
        time.sleep(0.001)
    for _ in range(rings):
        bell.ring()
    transport.close()


def test_rings_from_two_processes_at_once_all_count() -> None:
    """A ring is an atomic add: two writers ringing together never move the word back (a
    waiter that read the newer value would sleep through the other's ring)."""
    transport = SharedMemoryTransport([64])
    try:
        words = transport.window(0).view(torch.int32)
        bell = Doorbell(words[1:2])
        before = bell.value()
        ctx = mp.get_context("spawn")
        ringers = [
            ctx.Process(target=_ring_many, args=(transport.token, i, RINGS_PER_PROCESS))
            for i in range(2)
        ]
        for ringer in ringers:
            ringer.start()
        deadline = time.monotonic() + 60
        while int(words[READY : READY + 2].sum()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        words[GO] = 1
        for ringer in ringers:
            ringer.join(120)
            assert ringer.exitcode == 0
        assert bell.value() - before == 2 * RINGS_PER_PROCESS
    finally:
        transport.close()


def test_a_writer_whose_waiters_poll_still_wakes_a_sleeper() -> None:
    """`AFD_NO_DOORBELL=1` in one process of a deployment (an actor's environment) only
    makes its own waiters poll: its rings wake the other processes' sleepers."""
    assert _woken_after_ring_s(no_doorbell=True) < WOKEN_WITHIN_S


def test_store_fence_is_a_full_barrier_from_the_c_extension() -> None:
    """The install builds `afd_dispatch/windows/_fence.c`; without it `store_fence` falls
    back to a lock, which on AArch64 (A3 hosts) lets a flag pass the rows it publishes."""
    from afd_dispatch.windows import _fence

    assert wait.FENCE == "native"
    assert wait._native_fence is _fence.fence
    assert wait.store_fence() is None and _fence.fence() is None
