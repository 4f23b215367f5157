"""The health board: how each FFN rank and attention session of a deployment is doing.

Faults happen in one process and must be seen in others: the FFN pool's supervisor sees an
FFN actor freeze or die, an FFN rank sees a micro-batch it cannot serve, an attention
session sees its data path break, and the HTTP front end must answer `/health` and fail
requests from all of that. The board is a small byte array every party maps (shared
memory on one host, see `SharedMemoryTransport`; process memory when every party shares
one process); `afd_dispatch.layout` owns its bytes. Each row has exactly one writer.

Everything read from the board is treated as untrusted (another process wrote it): states
outside `RankState` read as unknown, messages are length-clamped and decoded leniently.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

import torch

from afd_dispatch.errors import AFDPeerError, check
from afd_dispatch.layout import (
    ANSWERED_MS_WORD,
    BROKEN_WORD,
    ERROR_MS_WORD,
    ERRORS_WORD,
    EVENT_MS_WORD,
    HEALTH_MESSAGE_BYTES,
    HEALTH_MESSAGE_LENGTH,
    LINK_FAILURES_WORD,
    MAX_MICRO_BATCHES,
    REFUSALS_WORD,
    REFUSED_LAYER_WORD,
    REFUSED_SLOT_WORD,
    RESTARTS_WORD,
    SINCE_MS_WORD,
    STATE_WORD,
    health_board_bytes,
    health_board_views,
)
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows.transport import (
    WINDOW_TRANSPORTS,
    InProcessTransport,
    SharedMemoryTransport,
    Transport,
)
from afd_dispatch.windows.wait import store_fence

# An UP rank whose last answer to the supervisor's probes (sent every 0.5 s) is older than
# this may be freezing: waits on it go on until the supervisor has decided.
ANSWER_STALE_S = 1.5


class RankState(enum.IntEnum):
    """An FFN rank as its pool's supervisor last saw it."""

    UP = 0  # answers health probes
    STARTING = 1  # its actor is being created
    STALLED = 2  # alive, but has not answered a probe for a while (frozen, swapped out)
    RESTARTING = 3  # died or was killed for stalling; Ray is restarting it
    FAILED = 4  # down for good: restart budget spent, or its constructor fails


@dataclass(frozen=True)
class FFNRankHealth:
    """What the board says about FFN rank `rank` (its communicator rank)."""

    rank: int
    state: RankState | None  # None: the board holds a value no writer of ours writes
    restarts: int
    since_s: float  # Unix time the state was entered
    answered_s: float  # Unix time of its last answer to a probe (0: no supervisor)
    detail: str  # the supervisor's reason for the state ("" when up)
    refusals: int  # micro-batches the rank refused so far
    link_failures: int  # times its link failed (its process then exited for a restart)
    refused_layer: int  # of the last refusal
    refused_slot: int
    event: str  # why it refused the last micro-batch, or why its link failed

    def describe(self) -> str:
        state = "in an unknown state" if self.state is None else self.state.name.lower()
        text = f"FFN rank {self.rank} {state}"
        if self.state is not RankState.UP:
            text += f" for {max(0.0, time.time() - self.since_s):.1f} s"
        text += f" ({self.restarts} restarts)"
        return text + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class SessionHealth:
    """What the board says about attention session `session`."""

    session: int
    broken: bool  # its data path is in an unknown state: it no longer exchanges
    errors: int  # AFD errors its MoE layers hit so far
    error: str  # the last one


class HealthBoard:
    """The board of a deployment with `topology`: create it (`create`) or attach (`attach`).

    Rows: FFN state (written by the pool), FFN error (written by that FFN rank), attention
    session (written by that session). `token` names the shared-memory file (a secret, as
    a window token is).
    """

    def __init__(self, topology: RankTopology, transport: Transport) -> None:
        self.topology = topology
        self._transport = transport
        self._f = topology.num_ffn_ranks
        self._a = topology.num_attention_ranks
        self._words, self._messages = health_board_views(transport.window(0), self._f, self._a)
        self._lock = threading.Lock()  # writers in one process (the pool's threads)

    @classmethod
    def create(cls, topology: RankTopology, transport: str = "shm") -> HealthBoard:
        """A fresh board: every FFN rank STARTING, every session healthy."""
        check(
            transport in WINDOW_TRANSPORTS,
            "transport",
            f"one of {list(WINDOW_TRANSPORTS)}",
            transport,
        )
        size = [health_board_bytes(topology.num_ffn_ranks, topology.num_attention_ranks)]
        made = SharedMemoryTransport(size) if transport == "shm" else InProcessTransport(size)
        board = cls(topology, made)
        for rank in topology.ffn_ranks:
            board.set_state(rank, RankState.STARTING, 0)
        return board

    @classmethod
    def attach(cls, topology: RankTopology, token: str) -> HealthBoard:
        """The board another process created; `token` as its `token` gave it."""
        size = [health_board_bytes(topology.num_ffn_ranks, topology.num_attention_ranks)]
        return cls(topology, SharedMemoryTransport(size, token))

    @property
    def token(self) -> str | None:
        return getattr(self._transport, "token", None)

    def close(self) -> None:
        self._transport.close()

    # -- writers -------------------------------------------------------------------------------
    def set_state(
        self, rank: int, state: RankState, restarts: int, detail: str = "", answered: bool = False
    ) -> None:
        """The pool's view of FFN `rank`; the time is kept only when the state changes.
        `answered`: the rank just answered a probe."""
        row = self._ffn_row(rank)
        with self._lock:
            words = self._words[row]
            if answered:
                words[ANSWERED_MS_WORD] = _now_ms()
            if int(words[STATE_WORD]) != int(state) or int(words[SINCE_MS_WORD]) == 0:
                words[SINCE_MS_WORD] = _now_ms()
            self._write_message(row, detail)
            words[RESTARTS_WORD] = restarts
            store_fence()  # the message before the state that refers to it
            words[STATE_WORD] = int(state)

    def report_refusal(self, rank: int, layer: int, slot: int, reason: str) -> None:
        """FFN `rank` refused micro-batch `slot` (0 <= slot < MAX_MICRO_BATCHES) of `layer`
        (it answers it with zeros); call before answering, so that the attention side
        sees the refusal by the time it has the slot back."""
        check(0 <= slot < MAX_MICRO_BATCHES, "slot", f"[0, {MAX_MICRO_BATCHES})", slot)
        row = self._f + self._ffn_row(rank)
        with self._lock:
            words = self._words[row]
            self._write_message(row, reason)
            words[REFUSED_LAYER_WORD] = layer
            words[REFUSED_SLOT_WORD] = slot
            words[EVENT_MS_WORD] = _now_ms()
            store_fence()  # a reader that sees the new count sees its record
            words[REFUSALS_WORD + slot] += 1

    def report_link_failure(self, rank: int, reason: str) -> None:
        """FFN `rank`'s link failed; its process exits next so that Ray restarts it."""
        row = self._f + self._ffn_row(rank)
        with self._lock:
            words = self._words[row]
            self._write_message(row, reason)
            words[EVENT_MS_WORD] = _now_ms()
            store_fence()
            words[LINK_FAILURES_WORD] += 1

    def report_session_error(self, session: int, message: str, broken: bool) -> None:
        """Session `session` hit an AFD error; `broken`: its data path is unusable now."""
        row = 2 * self._f + self._session_row(session)
        with self._lock:
            words = self._words[row]
            self._write_message(row, message)
            words[ERROR_MS_WORD] = _now_ms()
            words[BROKEN_WORD] = int(broken or bool(words[BROKEN_WORD]))
            store_fence()
            words[ERRORS_WORD] += 1

    # -- readers -------------------------------------------------------------------------------
    def ffn(self, rank: int) -> FFNRankHealth:
        row = self._ffn_row(rank)
        state, events = self._words[row], self._words[self._f + row]
        store_fence()  # counts read first, then the records they guard
        try:
            known: RankState | None = RankState(int(state[STATE_WORD]))
        except ValueError:
            known = None
        return FFNRankHealth(
            rank=rank,
            state=known,
            restarts=int(state[RESTARTS_WORD]),
            since_s=int(state[SINCE_MS_WORD]) / 1000,
            answered_s=int(state[ANSWERED_MS_WORD]) / 1000,
            detail=self._read_message(row),
            refusals=int(events[REFUSALS_WORD : REFUSALS_WORD + MAX_MICRO_BATCHES].sum()),
            link_failures=int(events[LINK_FAILURES_WORD]),
            refused_layer=int(events[REFUSED_LAYER_WORD]),
            refused_slot=int(events[REFUSED_SLOT_WORD]),
            event=self._read_message(self._f + row),
        )

    def ffn_ranks(self) -> list[FFNRankHealth]:
        return [self.ffn(rank) for rank in self.topology.ffn_ranks]

    def refusal_counts(self, slot: int) -> list[int]:
        """Refusals of micro-batch `slot` so far, per FFN rank (cheap: one slice)."""
        counts = self._words[self._f : 2 * self._f, REFUSALS_WORD + slot].tolist()
        store_fence()
        return [int(c) for c in counts]

    def session(self, session: int) -> SessionHealth:
        row = 2 * self._f + self._session_row(session)
        words = self._words[row]
        store_fence()
        return SessionHealth(
            session=session,
            broken=bool(words[BROKEN_WORD]),
            errors=int(words[ERRORS_WORD]),
            error=self._read_message(row),
        )

    def session_error_counts(self) -> list[int]:
        counts = self._words[2 * self._f :, ERRORS_WORD].tolist()
        store_fence()
        return [int(c) for c in counts]

    def cannot_serve(self) -> bool:
        """`failed() is not None`, cheaply (every MoE layer of every forward asks)."""
        states = self._words[: self._f, STATE_WORD]
        known = (states >= 0) & (states <= max(RankState))
        failed = bool((~known | (states == RankState.FAILED)).any())
        return failed or bool(self._words[2 * self._f :, BROKEN_WORD].any())

    def failed(self) -> str | None:
        """Why the deployment cannot serve now (an FFN rank FAILED, a session broken), or
        None. Requests then fail at once instead of waiting out a deadline."""
        reasons = [h.describe() for h in self.ffn_ranks() if h.state in (RankState.FAILED, None)]
        for s in range(self._a):
            health = self.session(s)
            if health.broken:
                reasons.append(f"attention session {s} stopped exchanging: {health.error}")
        return "; ".join(reasons) or None

    def unhealthy(self) -> str | None:
        """Why `/health` must say 503 (any FFN rank not UP, or `failed()`), or None."""
        down = [h.describe() for h in self.ffn_ranks() if h.state is not RankState.UP]
        failed = self.failed()
        reasons = down + ([failed] if failed and failed not in down else [])
        return "; ".join(dict.fromkeys(reasons)) or None

    def recovering(self, within_s: float) -> str | None:
        """The FFN ranks that are down but being brought back (starting, stalled and about
        to be replaced, restarting), or that stopped answering probes lately (the
        supervisor has not decided yet), or None. A supervisor silent for more than
        `within_s` is gone: nobody brings anything back then."""
        coming = (RankState.STARTING, RankState.STALLED, RankState.RESTARTING)
        now = time.time()
        down = []
        for h in self.ffn_ranks():
            silent = now - h.answered_s
            if h.answered_s > 0 and silent > within_s:
                continue  # nobody has written for too long: no supervisor
            if h.state in coming:
                down.append(h.describe())
            elif h.answered_s > 0 and silent > ANSWER_STALE_S:
                down.append(f"FFN rank {h.rank}: no answer for {silent:.1f} s")
        return "; ".join(down) or None

    def describe(self) -> str:
        """Every FFN rank's state, for an error message."""
        return "; ".join(h.describe() for h in self.ffn_ranks())

    # -- rows and messages -----------------------------------------------------------------------
    def _ffn_row(self, rank: int) -> int:
        check(self.topology.is_ffn(rank), "rank", "an FFN rank of the deployment", rank)
        return rank - self.topology.ffn_start_rank_id

    def _session_row(self, session: int) -> int:
        check(0 <= session < self._a, "session", f"[0, {self._a})", session)
        return session

    def _write_message(self, row: int, message: str) -> None:
        # cut to the row, at a character boundary
        cut = message.encode("utf-8", "replace")[:HEALTH_MESSAGE_BYTES]
        data = cut.decode("utf-8", "ignore").encode("utf-8")
        if data:
            self._messages[row, : len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        self._words[row, HEALTH_MESSAGE_LENGTH] = len(data)

    def _read_message(self, row: int) -> str:
        n = min(max(int(self._words[row, HEALTH_MESSAGE_LENGTH]), 0), HEALTH_MESSAGE_BYTES)
        return bytes(self._messages[row, :n].tolist()).decode("utf-8", "replace")


class PeerWatch:
    """What an attention session's waits consult (`afd_dispatch.windows.wait.watching`).

    `check` fails a wait at once when an FFN rank is FAILED; `extend` lets a wait run past
    its deadline while an FFN rank is being brought back, for at most `recovery_s` in all
    (a restarted rank redoes the micro-batch it died in, so the wait then succeeds).
    """

    def __init__(self, board: HealthBoard, recovery_s: float) -> None:
        self.board = board
        self.recovery_s = recovery_s

    def check(self) -> None:
        if self.board.cannot_serve():
            raise AFDPeerError(f"AFD: the deployment cannot serve: {self.board.failed()}")

    def extend(self, waited_s: float) -> bool:
        return waited_s < self.recovery_s and self.board.recovering(self.recovery_s) is not None

    def describe(self) -> str:
        return self.board.describe()


def _now_ms() -> int:
    return int(time.time() * 1000)
