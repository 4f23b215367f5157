"""Watching the FFN actors of a pool: the health board's writer, and the stall breaker.

Ray restarts an FFN actor that dies (up to `ffn_max_restarts`), but it cannot tell a
frozen one (SIGSTOP, a hung driver, a host swapping) from a busy one, and the attention
side would wait on it forever. Twice a second the supervisor reads each actor's record in
Ray's actor table (its state and restart count, from the GCS) and, for a live actor, sends
a cheap probe call; it keeps each rank's state on the health board:

    Ray: PENDING_CREATION / RESTARTING            -> STARTING / RESTARTING
    Ray: ALIVE, probe answered                    -> UP
    Ray: ALIVE, no answer for STALL_NOTICE_S      -> STALLED
    Ray: ALIVE, no answer for ffn_stall_timeout_s -> killed (Ray restarts it): RESTARTING
    Ray: RESTARTING for startup_timeout_s         -> killed again (its constructor hangs)
    Ray: DEAD                                     -> FAILED (for good: Ray will not restart)

Restarts are Ray's own count. A restarted actor redoes the micro-batch its predecessor held
(the FFN journal), so attention-side waits, which run on while a rank is coming back, then
complete. What FFN ranks report themselves (refused micro-batches, link failures) is logged
here as it appears on the board.

Ray's actor table is read with `ray._private.state.actors`, Ray's own debugging accessor
(no dashboard needed); `check_ray` refuses a Ray whose records lack the fields used. Each
round's reads have one deadline (`ACTOR_TABLE_TIMEOUT_S`) and run outside the lock the
metrics take: the accessor blocks until the GCS answers, and a GCS that does not answer
costs the ranks one round, logged, never a hung supervisor or a hung `/metrics`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDTimeoutError
from afd_dispatch.integrations.ray.calls import cause_of, describe_actor_error
from afd_dispatch.runtime.health import HealthBoard, RankState

log = logging.getLogger(__name__)
PROBE_PERIOD_S = 0.5
STALL_NOTICE_S = 2.0  # an answer this late is reported (health 503), not yet acted on
ACTOR_TABLE_TIMEOUT_S = 5.0  # a round's reads of the actors' records from the GCS
_COMING = {"DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING"}


@dataclass
class _Rank:
    actor: Any
    actor_id: str
    state: RankState = RankState.STARTING
    restarts: int = 0
    probe: Any = None
    probe_sent: float = 0.0  # monotonic
    entered: float = 0.0  # monotonic time the current state was entered
    last_error: str = ""  # of the last failed probe: why it died
    link_failure: str = ""  # the board's last link failure since it was last up: why it exited
    link_failure_restarts: int = -1  # Ray's restart count when it was reported
    answered_once: bool = False
    events: tuple[int, int] = (0, 0)  # refusals, link failures logged so far


def actor_records(actor_ids: Sequence[str]) -> dict[str, dict[str, Any] | BaseException]:
    """Ray's actor-table record of each of `actor_ids` ("State", "NumRestarts",
    "DeathCause", ...), or what reading it raised.

    Ray's accessor blocks until the GCS answers, so each record is read in a daemon thread
    of its own, and all within one deadline, `ACTOR_TABLE_TIMEOUT_S`. A record not read by
    then is an `AFDTimeoutError` naming the actor and the GCS; its read ends in its thread
    whenever the GCS answers.
    """
    from ray._private import state

    reads: dict[str, Future[dict[str, Any]]] = {}
    for actor_id in actor_ids:
        record: Future[dict[str, Any]] = Future()

        def read(record: Future[dict[str, Any]] = record, actor_id: str = actor_id) -> None:
            try:
                record.set_result(state.actors(actor_id=actor_id))
            except BaseException as exc:  # handed to the reader, whatever it is
                record.set_exception(exc)

        threading.Thread(target=read, name="afd-actor-table", daemon=True).start()
        reads[actor_id] = record
    timeout_s = ACTOR_TABLE_TIMEOUT_S
    wait(reads.values(), timeout=timeout_s)
    out: dict[str, dict[str, Any] | BaseException] = {}
    for actor_id, record in reads.items():
        if not record.done():
            out[actor_id] = AFDTimeoutError(
                f"AFD supervisor: Ray's actor table (the GCS) gave no record of actor "
                f"{actor_id} within {timeout_s:g} s (ACTOR_TABLE_TIMEOUT_S)"
            )
        else:
            failed = record.exception()
            out[actor_id] = failed if failed is not None else record.result()
    return out


class Supervisor:
    """Keeps `board` up to date for `actors` ({FFN rank: actor handle}).

    `poll()` is one round (the thread calls it every `PROBE_PERIOD_S`); `stop()` ends the
    thread. `counters()` gives the metrics: ranks up, restarts per rank.
    """

    def __init__(self, actors: dict[int, Any], board: HealthBoard, config: AFDConfig) -> None:
        check_ray()
        self.board = board
        self.config = config
        now = time.monotonic()
        self._ranks = {
            rank: _Rank(actor, actor._actor_id.hex(), entered=now) for rank, actor in actors.items()
        }
        for rank, r in self._ranks.items():
            health = board.ffn(rank)
            r.events = (health.refusals, health.link_failures)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._run, name="afd-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=ACTOR_TABLE_TIMEOUT_S + 10 * PROBE_PERIOD_S)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(PROBE_PERIOD_S):
            self.poll()

    def counters(self) -> dict[str, dict[str, float]]:
        with self._lock:
            ranks = {
                f"FFN {n}": {"restarts_total": float(r.restarts)} for n, r in self._ranks.items()
            }
            up = sum(r.state is RankState.UP for r in self._ranks.values())
        return ranks | {"pool": {"ffn_ranks_up": float(up)}}

    # -- one round -------------------------------------------------------------------------------
    def poll(self) -> None:
        """One round over every rank; a failure on one rank is logged, the others go on.
        The actor table is read before the lock is taken: `counters()` never waits for
        the GCS. (Only this round changes a rank's state, so reading it unlocked is safe.)"""
        live = [r.actor_id for r in self._ranks.values() if r.state is not RankState.FAILED]
        records = actor_records(live)
        with self._lock:
            for rank, r in self._ranks.items():
                try:
                    self._log_events(rank, r)  # first: a link failure is why it is now down
                    if r.actor_id in records:
                        self._poll_rank(rank, r, time.monotonic(), records[r.actor_id])
                except Exception as exc:  # the supervisor must outlive a bad round
                    log.warning("AFD supervisor: FFN rank %d not checked this round: %s", rank, exc)

    def _poll_rank(
        self, rank: int, r: _Rank, now: float, record: dict[str, Any] | BaseException
    ) -> None:
        import ray

        if r.state is RankState.FAILED:
            return  # Ray's DEAD is final
        if isinstance(record, BaseException):
            raise record
        r.restarts = int(record.get("NumRestarts", r.restarts))
        ray_state = str(record.get("State", ""))
        if ray_state == "DEAD":
            budget = self.config.ffn_max_restarts
            cause = death_cause(record.get("DeathCause"))
            if not cause.startswith("its constructor raised"):  # that one names itself
                cause = self._link_failure(r) or r.last_error or cause
            self._set(
                rank, r, RankState.FAILED,
                f"Ray will not restart it (ffn_max_restarts {budget}, {r.restarts} used): {cause}",
                now,
            )  # fmt: skip
            return
        if ray_state in _COMING:
            restarting = bool(r.restarts) or r.answered_once
            state = RankState.RESTARTING if restarting else RankState.STARTING
            if state is not r.state:
                why = self._link_failure(r) or r.last_error or "Ray is starting its actor"
                self._set(rank, r, state, why, now)
            if now - r.entered > self.config.startup_timeout_s:
                self._kill(rank, r, now - r.entered, "startup_timeout_s", now)
            return
        # ALIVE: is it answering?
        if r.probe is None:
            r.probe, r.probe_sent = r.actor.info.remote(), now
        ready, _ = ray.wait([r.probe], timeout=0)
        if ready:
            probe, r.probe = r.probe, None
            try:
                info = ray.get(probe, timeout=0)
            except ray.exceptions.RayError as exc:  # died meanwhile: the table will say so
                r.last_error = describe_actor_error(exc)
                return
            r.answered_once = True
            if info.get("error"):
                self._set(
                    rank, r, RankState.FAILED, f"its serving thread ended: {info['error']}", now
                )
            else:
                r.last_error = r.link_failure = ""
                self._set(rank, r, RankState.UP, "", now, answered=True)
            return
        waited = now - r.probe_sent
        if waited > self.config.ffn_stall_timeout_s:
            self._kill(rank, r, waited, "ffn_stall_timeout_s", now)
        elif waited > STALL_NOTICE_S:
            self._set(
                rank, r, RankState.STALLED, f"no answer to health probes for {waited:.1f} s", now
            )

    def _kill(self, rank: int, r: _Rank, waited: float, bound: str, now: float) -> None:
        import ray

        limit = getattr(self.config, bound)
        log.error(
            "AFD: FFN rank %d: no answer for %.1f s (%s %g s): killing it",
            rank,
            waited,
            bound,
            limit,
        )
        ray.kill(r.actor, no_restart=False)
        r.probe = None
        r.last_error = f"killed after no answer for {waited:.1f} s ({bound} {limit:g} s)"
        self._set(rank, r, RankState.RESTARTING, r.last_error, now)

    @staticmethod
    def _link_failure(r: _Rank) -> str:
        """The link failure that took the rank down, unless it restarted since (a later
        death, say its constructor raising, has a cause of its own)."""
        return r.link_failure if r.restarts <= r.link_failure_restarts + 1 else ""

    def _set(
        self, rank: int, r: _Rank, state: RankState, detail: str, now: float, answered: bool = False
    ) -> None:
        if state is not r.state:
            r.entered = now
            if state is RankState.UP:
                log.warning("AFD: FFN rank %d is up (%d restarts)", rank, r.restarts)
            else:
                log.warning("AFD: FFN rank %d %s: %s", rank, state.name.lower(), detail)
        r.state = state
        self.board.set_state(rank, state, r.restarts, detail, answered)

    def _log_events(self, rank: int, r: _Rank) -> None:
        health = self.board.ffn(rank)
        events = (health.refusals, health.link_failures)
        if events == r.events:
            return
        refused, failed = events[0] - r.events[0], events[1] - r.events[1]
        r.events = events
        if failed:
            r.link_failure = f"its link failed: {health.event}"
            r.link_failure_restarts = r.restarts
        log.error(
            "AFD: FFN rank %d: %d micro-batch(es) refused, %d link failure(s); the last: %s",
            rank, refused, failed, health.event,
        )  # fmt: skip


def death_cause(cause: Any) -> str:
    """One line from Ray's `ActorDeathCause` record (gcs protobuf): the exception its
    constructor raised, or Ray's own message."""
    failed = getattr(cause, "creation_task_failure_context", None)
    if failed is not None and cause.HasField("creation_task_failure_context"):
        return f"its constructor raised {cause_of(failed.formatted_exception_string)}"
    died = getattr(cause, "actor_died_error_context", None)
    if died is not None and cause.HasField("actor_died_error_context") and died.error_message:
        return f"its actor died: {cause_of(died.error_message)}"
    return f"its actor died: {cause_of(str(cause)) if cause else 'no cause recorded'}"


def check_ray() -> None:
    """Refuse a Ray whose actor table lacks what the supervisor reads (see the module doc)."""
    import ray
    from ray._private import state

    if not callable(getattr(state, "actors", None)):
        raise RuntimeError(
            f"AFD: Ray {ray.__version__} has no ray._private.state.actors; the FFN supervisor "
            "reads actor states through it (tested with Ray 2.60)"
        )
