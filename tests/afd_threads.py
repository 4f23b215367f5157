"""In-process AFD deployments for the runtime tests: ranks as threads, every wait bounded.

`deployment(...)` plans a deployment under a fresh group name and creates its windows;
`ffn_workers(...)` starts one `FFNWorker.run` thread per FFN rank. Both clean up in
`finally` blocks: workers are stopped, every thread is joined with a timeout (and a thread
still alive afterwards fails the test), window groups are closed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from afd_dispatch import AFDConfig, AFDTimeoutError
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.experts import ExpertBank
from afd_dispatch.runtime.ffn_worker import FFNWorker
from afd_dispatch.runtime.health import HealthBoard

WAIT_TIMEOUT_S = 10.0  # every flag wait of the ops (a hang fails within this)
JOIN_TIMEOUT_S = 2 * WAIT_TIMEOUT_S  # a thread blocked in a wait gives up before this


class RankThread(threading.Thread):
    """A thread that keeps its target's result or exception for the test to check."""

    def __init__(self, name: str, target: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # handed to the test by `outcome`
            self.error = exc

    def outcome(self, timeout_s: float = JOIN_TIMEOUT_S) -> Any:
        """Join (bounded); re-raise the thread's exception; return its result."""
        self.join(timeout_s)
        assert not self.is_alive(), f"thread {self.name} still running after {timeout_s} s"
        if self.error is not None:
            raise self.error
        return self.result


def outcomes(threads: list[RankThread]) -> list[Any]:
    """Every thread's result; if some failed, re-raise the root cause: a failure other
    than a deadline (a peer left waiting by a failed rank times out too) if there is one."""
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
    errors = [t.error for t in threads if t.error is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, AFDTimeoutError)), errors[0])
    return [thread.outcome(0) for thread in threads]


def counters_when_served(
    workers: list[tuple[FFNWorker, RankThread]], micro_batches: int
) -> list[dict[str, float]]:
    """Each worker's counters (`trace` on) once it has served `micro_batches` (bounded wait).

    An attention rank does not wait for FFN ranks that return it nothing (a micro-batch
    with no tokens for them), so when the attention side is done such a rank may still
    have its last headers to serve.
    """
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        counters = [worker.tracer.snapshot()[1] for worker, _ in workers]
        done = all(c.get("micro_batches_served_total", 0) >= micro_batches for c in counters)
        if done or time.monotonic() > deadline:
            return counters
        time.sleep(0.01)


def config(num_attention_ranks: int, num_ffn_ranks: int, **keys: Any) -> AFDConfig:
    """A reference-backend config under a group name no other test uses."""
    keys.setdefault("wait_timeout_s", WAIT_TIMEOUT_S)
    keys.setdefault("batch_invariant", True)
    return AFDConfig(
        num_attention_ranks=num_attention_ranks,
        num_ffn_ranks=num_ffn_ranks,
        backend="reference",
        group=f"t{uuid.uuid4().hex[:12]}",
        **keys,
    )


@contextmanager
def deployment(
    cfg: AFDConfig, spec: MoESpec, dtype: torch.dtype, transport: str = "inproc"
) -> Iterator[Deployment]:
    """A `Deployment` with its window groups created; the groups are closed on exit."""
    dep = Deployment(cfg, spec, dtype)
    groups = dep.create_windows(transport)
    try:
        yield dep
    finally:
        for group in groups:
            group.close()


@contextmanager
def ffn_workers(
    dep: Deployment,
    banks_of: Callable[[int], Mapping[int, ExpertBank]],
    health: HealthBoard | None = None,
) -> Iterator[list[tuple[FFNWorker, RankThread]]]:
    """Every FFN rank of `dep` serving in a thread (`FFNWorker.run`) until the block ends,
    reporting refusals on `health` if given.

    On exit every worker is stopped and joined (bounded). A worker that died with an
    exception, or failed to stop, fails the test.
    """
    running: list[tuple[FFNWorker, RankThread]] = []
    ok = False
    try:
        for rank in dep.topology.ffn_ranks:
            worker = FFNWorker(dep, rank, banks_of(rank), health=health)
            thread = RankThread(f"ffn-{rank}", worker.run)
            thread.start()
            running.append((worker, thread))
        yield running
        ok = True
    finally:
        for worker, _ in running:
            worker.stop()
        for _, thread in running:
            thread.join(JOIN_TIMEOUT_S)
        # a worker's own failure is the root cause of whatever the block saw (an attention
        # rank left waiting times out), so it is raised even when the block raised
        if ok or any(thread.error is not None for _, thread in running):
            for _, thread in running:
                thread.outcome(0)


def receive_patiently(
    endpoint: AttentionEndpoint, slot: int, total_s: float = 15.0
) -> torch.Tensor:
    """`receive`, retried over the (short) combine deadline: a loaded CI host may need
    longer than one deadline to schedule the FFN thread; a timed-out combine changes nothing."""
    end = time.monotonic() + total_s
    while True:
        try:
            return endpoint.receive(slot)
        except AFDTimeoutError:
            if time.monotonic() > end:
                raise
