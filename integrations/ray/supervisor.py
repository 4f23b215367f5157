"""Watching the FFN actors of a pool: the health board's writer, and the stall breaker.

Ray restarts an FFN actor that dies (up to `ffn_max_restarts`), but it cannot tell a
frozen one (SIGSTOP, a hung driver, a host swapping) from a busy one, and the attention
side would wait on it forever. The supervisor probes every actor twice a second with a
cheap actor call and keeps each rank's state on the health board:

    STARTING / RESTARTING --answers--> UP --no answer for STALL_NOTICE_S--> STALLED
    STALLED --no answer for ffn_stall_timeout_s--> killed --> RESTARTING (Ray restarts it)
    any --dies, and Ray will not restart it--> FAILED

A restarted actor redoes the micro-batch its predecessor held (the FFN journal), so the
attention side's waits, which run on while a rank is coming back, then complete.
Micro-batches an FFN rank refused are logged here as they appear on the board.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from afd_dispatch.config import AFDConfig
from afd_dispatch.integrations.ray.calls import cause_of, describe_actor_error
from afd_dispatch.runtime.health import HealthBoard, RankState

log = logging.getLogger(__name__)
PROBE_PERIOD_S = 0.5
STALL_NOTICE_S = 2.0  # an answer this late is reported (health 503), not yet acted on


@dataclass
class _Rank:
    actor: Any
    state: RankState = RankState.STARTING
    pid: int | None = None
    restarts: int = 0
    probe: Any = None
    sent_s: float = 0.0
    since_s: float = 0.0  # when the current state was entered (monotonic)


class Supervisor:
    """Probes `actors` ({FFN rank: actor handle}) and keeps `board` up to date.

    `poll()` is one round (the thread calls it every `PROBE_PERIOD_S`); `stop()` ends the
    thread. `counters()` gives the metrics: ranks up, restarts per rank.
    """

    def __init__(self, actors: dict[int, Any], board: HealthBoard, config: AFDConfig) -> None:
        self.board = board
        self.config = config
        now = time.monotonic()
        self._ranks = {rank: _Rank(actor, since_s=now) for rank, actor in actors.items()}
        self._refusals = board.ffn_error_counts()
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
            self._thread.join(timeout=10 * PROBE_PERIOD_S)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(PROBE_PERIOD_S):
            try:
                self.poll()
            except Exception as exc:  # the supervisor must outlive a bad round
                log.warning("AFD supervisor round failed: %s", exc)

    def counters(self) -> dict[str, dict[str, float]]:
        with self._lock:
            per_rank = {
                f"FFN {r}": {"restarts_total": float(s.restarts)} for r, s in self._ranks.items()
            }
            up = sum(s.state is RankState.UP for s in self._ranks.values())
        return per_rank | {"pool": {"ffn_ranks_up": float(up)}}

    # -- one round -------------------------------------------------------------------------------
    def poll(self) -> None:
        import ray

        now = time.monotonic()
        with self._lock:
            for rank, r in self._ranks.items():
                if r.state is RankState.FAILED:
                    continue
                if r.probe is None:
                    r.probe, r.sent_s = r.actor.info.remote(), now
                    continue
                ready, _ = ray.wait([r.probe], timeout=0)
                if ready:
                    self._answered(rank, r, now)
                else:
                    self._silent(rank, r, now)
        self._log_refusals()

    def _answered(self, rank: int, r: _Rank, now: float) -> None:
        import ray

        probe, r.probe = r.probe, None
        try:
            info = ray.get(probe, timeout=0)
        except ray.exceptions.ActorUnavailableError as exc:
            self._set(rank, r, RankState.RESTARTING, f"unavailable: {cause_of(exc)}", now)
            return
        except ray.exceptions.RayActorError as exc:
            # A call that was in flight when the actor died fails even if Ray restarts it;
            # one sent after that fails too only if Ray will not (budget spent).
            if r.state is RankState.RESTARTING and r.sent_s >= r.since_s:
                budget = self.config.ffn_max_restarts
                self._set(
                    rank, r, RankState.FAILED,
                    f"Ray will not restart it (ffn_max_restarts {budget}, {r.restarts} used): "
                    f"{describe_actor_error(exc)}",
                    now,
                )  # fmt: skip
            else:
                self._set(rank, r, RankState.RESTARTING, describe_actor_error(exc), now)
            return
        pid = int(info["pid"])
        if r.pid is not None and pid != r.pid:
            r.restarts += 1
            log.warning("AFD: FFN rank %d is back (restart %d, pid %d)", rank, r.restarts, pid)
        r.pid = pid
        if info.get("error"):
            self._set(rank, r, RankState.FAILED, f"its serving thread ended: {info['error']}", now)
        else:
            self._set(rank, r, RankState.UP, "", now, answered=True)

    def _silent(self, rank: int, r: _Rank, now: float) -> None:
        waited = now - r.sent_s
        coming_up = r.state in (RankState.STARTING, RankState.RESTARTING)
        bound = self.config.startup_timeout_s if coming_up else self.config.ffn_stall_timeout_s
        if waited > bound:
            import ray

            what = "startup_timeout_s" if coming_up else "ffn_stall_timeout_s"
            log.error(
                "AFD: FFN rank %d gave no answer for %.1f s (%s): killing it", rank, waited, what
            )
            ray.kill(r.actor, no_restart=False)
            r.probe = None
            self._set(
                rank, r, RankState.RESTARTING,
                f"killed after no answer for {waited:.1f} s ({what} {bound:g} s)", now,
            )  # fmt: skip
        elif not coming_up and waited > STALL_NOTICE_S:
            self._set(
                rank, r, RankState.STALLED, f"no answer to health probes for {waited:.1f} s", now
            )

    def _set(
        self, rank: int, r: _Rank, state: RankState, detail: str, now: float, answered: bool = False
    ) -> None:
        if state is not r.state:
            r.since_s = now
            if state is not RankState.UP:
                log.warning("AFD: FFN rank %d %s: %s", rank, state.name.lower(), detail)
        r.state = state
        self.board.set_state(rank, state, r.restarts, detail, answered)

    def _log_refusals(self) -> None:
        counts = self.board.ffn_error_counts()
        if counts == self._refusals:
            return
        for i, (old, new) in enumerate(zip(self._refusals, counts, strict=True)):
            if new != old:
                health = self.board.ffn(self.board.topology.ffn_ranks[i])
                log.error(
                    "AFD: FFN rank %d refused %d micro-batch(es), the last (layer %d, slot %d): %s",
                    health.rank, new - old, health.error_layer, health.error_slot, health.error,
                )  # fmt: skip
        self._refusals = counts
