"""The Ray actor hosting one FFN rank: attach windows, load experts, serve until stopped.

Everything happens in `__init__`, so when Ray restarts a dead actor (same arguments) the
new process re-attaches the windows, reloads its experts from the checkpoint and resumes
polling where the old one stopped (its schedule contexts live beside its windows).

The pool passes the attention side's `ProtocolParams`: an actor whose own plan (from its
config and checkpoint) differs attaches no window and serves nothing, and the pool's
handshake refuses it naming the fields. (Attaching first would fail on a differing window
group with a bare actor-creation error, or poll the windows with the wrong plan.)
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.link import ffn_link
from afd_dispatch.link.npu import Rendezvous
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.deployment import Deployment, ProtocolParams
from afd_dispatch.runtime.ffn_worker import FFNWorker, load_banks
from afd_dispatch.runtime.health import HealthBoard
from afd_dispatch.runtime.trace import Span, Tracer
from afd_dispatch.windows import WindowGroupSpec, attach_window_group, get_window_group

log = logging.getLogger(__name__)


class FFNWorkerActor:
    def __init__(
        self,
        config: AFDConfig,
        model_path: str,
        rank: int,
        window_specs: list[WindowGroupSpec],
        dtype: str,
        expected: ProtocolParams | None = None,
        rendezvous: Rendezvous | None = None,
        health_token: str | None = None,
        niceness: int | None = None,
    ) -> None:
        _use_assigned_cpus()
        if niceness is not None:
            _run_at(niceness, rank)
        spec = MoESpec.from_pretrained(model_path)
        self.deployment = Deployment(config, spec, getattr(torch, dtype.removeprefix("torch.")))
        self.rank = rank
        self.worker: FFNWorker | None = None
        self._thread: threading.Thread | None = None
        if expected is not None and self.deployment.params() != expected:
            return  # refused by the pool's handshake, which names the differences
        for window in window_specs:
            try:
                get_window_group(window.name)
            except ValueError:
                attach_window_group(window)
        banks = load_banks(model_path, self.deployment, rank, config.batch_invariant)
        tracer = Tracer(f"FFN {rank}", enabled=config.trace)
        self.error: str | None = None
        self._stopping = False
        self.health = _attach_board(self.deployment, health_token)
        if rendezvous is None:
            self.worker = FFNWorker(self.deployment, rank, banks, tracer=tracer, health=self.health)
            worker = self.worker

            def target() -> None:
                try:
                    worker.run()
                except BaseException as exc:  # reported by the worker; Ray restarts us
                    log.error("FFN rank %d stops serving, exiting for a restart: %r", rank, exc)
                    os._exit(1)
        else:
            # The NPU link's set-up waits for every rank, the attention side's included,
            # which the pool starts after this constructor returns: set up in the thread.
            def target() -> None:
                try:
                    link = ffn_link(self.deployment, rank, rendezvous=rendezvous)
                    if self._stopping:  # stop() came while the link was being set up
                        link.close()
                        return
                    self.worker = FFNWorker(
                        self.deployment, rank, banks, tracer=tracer, link=link, health=self.health
                    )
                    self.worker.run()
                except BaseException as exc:  # reported by info()
                    self.error = f"{type(exc).__name__}: {exc}"

        self._thread = threading.Thread(target=target, name=f"afd-ffn-{rank}", daemon=True)
        self._thread.start()

    def params(self) -> ProtocolParams:
        return self.deployment.params()

    def info(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {
            "rank": self.rank,
            "actor_id": context.get_actor_id(),
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "restarted": _was_restarted(),
            "serving": self._thread is not None and self._thread.is_alive(),
            "torch_threads": torch.get_num_threads(),
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            "error": getattr(self, "error", None),
        }

    def trace(self) -> tuple[list[Span], dict[str, float]]:
        return self.worker.tracer.snapshot() if self.worker is not None else ([], {})

    def counters(self) -> dict[str, float]:
        return self.worker.tracer.counter_values() if self.worker is not None else {}

    def stop(self) -> None:
        self._stopping = True
        if self.worker is not None and self._thread is not None:
            self.worker.stop()
            self._thread.join(timeout=self.deployment.config.wait_timeout_s)


def _attach_board(deployment: Deployment, token: str | None) -> HealthBoard | None:
    """The pool's health board, where this rank reports refused micro-batches; None where
    it is not reachable (the pool runs on another host: the NPU link across nodes)."""
    if token is None:
        return None
    try:
        return HealthBoard.attach(deployment.topology, token)
    except FileNotFoundError:
        log.warning("AFD: the health board is on another host; refusals go to the log only")
        return None


def _use_assigned_cpus() -> None:
    """As many torch threads as CPUs Ray assigned this actor. torch would otherwise start
    one per core of the host, and its spinning OpenMP threads would fight vLLM's own on
    the same cores (on a 2-core host that made the experts ~60x slower). The serving
    thread applies the same count to itself (`FFNWorker.run`)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


def _run_at(niceness: int, rank: int) -> None:
    """Take the scheduling priority of the process that owns the deployment.

    Ray starts its workers at niceness 15 (its `worker_niceness`), for background tasks;
    an FFN rank is on the critical path of every MoE layer. Where it shares cores with
    the attention side (a one-host deployment, CI), a busy vLLM engine core at niceness 0
    left it about 3% of a core, and each micro-batch waited milliseconds for the CPU.
    Raising priority needs CAP_SYS_NICE: without it the rank says so and runs on.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current <= niceness:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        log.warning(
            "FFN rank %d runs at niceness %d (Ray's worker_niceness), behind its attention "
            "ranks at %d, and may not raise its priority: start Ray with "
            "RAY_worker_niceness=%d, or give it CAP_SYS_NICE",
            rank,
            current,
            niceness,
            niceness,
        )


def _was_restarted() -> bool:
    import warnings

    import ray

    with warnings.catch_warnings():  # Ray 2.60 warns from inside its own property
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
