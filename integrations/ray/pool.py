"""Start, check and stop the FFN actors of one deployment.

Placement: one bundle per FFN rank in a placement group, spread over nodes when the
transport can cross nodes (HCCL on A3) and the cluster has several; with shared-memory
windows (the reference backend) every actor must share the attention node, and a
placement that puts one elsewhere is refused.

Health: the pool keeps the deployment's health board (`afd_dispatch.runtime.health`,
made here unless the caller made it) through its `Supervisor`, which also replaces
actors that stall. Every wait on Ray has a deadline and ends in an AFD error that names
the rank and the likely cause (`calls.get`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDHandshakeError, check
from afd_dispatch.integrations.ray import calls
from afd_dispatch.integrations.ray.ffn_actor import FFNWorkerActor
from afd_dispatch.integrations.ray.supervisor import Supervisor
from afd_dispatch.link.npu import Rendezvous
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.health import HealthBoard
from afd_dispatch.runtime.trace import Span
from afd_dispatch.windows import WindowGroup

log = logging.getLogger(__name__)


def ensure_ray(address: str | None, min_cpus: float = 1) -> None:
    """Connect to Ray: `address` (a cluster), or a local Ray started here (the default)."""
    import ray

    if ray.is_initialized():
        return
    if address in (None, "local"):
        # "local" starts a fresh Ray even where another one runs on this host (a bare
        # ray.init() would join that one, as a user's unrelated cluster).
        cpus = max(os.cpu_count() or 1, int(min_cpus + 0.999))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:  # unreachable, or another Ray version
        raise AFDHandshakeError(
            f"ray_address {address!r}: cannot join that Ray cluster ({calls.cause_of(exc)}); "
            f"this host runs Ray {ray.__version__}, and every node must run the same"
        ) from None


class FFNWorkerPool:
    """The FFN actors of a deployment whose windows `groups` this process owns.

    `ffn_config` is the config the FFN side runs with (default: the attention side's); the
    startup handshake refuses any difference in the shared parameters. With the NPU link
    (backend "npu") `groups` is empty: each actor sets up its HCCL communicators with the
    attention ranks at `rendezvous` (`afd_dispatch.link.npu.serve_rendezvous`).
    """

    def __init__(
        self,
        deployment: Deployment,
        model_path: str,
        groups: list[WindowGroup],
        ffn_config: AFDConfig | None = None,
        num_cpus: float = 1.0,
        rendezvous: Rendezvous | None = None,
        health: HealthBoard | None = None,
    ) -> None:
        for group in groups:  # before any actor starts: they attach in other processes
            check(
                group.spec.transport == "shm",
                "reference.transport",
                '"shm" or "auto" (the FFN ranks are Ray actors in other processes; they '
                "attach to shared-memory windows only)",
                group.spec.transport,
            )
        self.deployment = deployment
        self.health = health
        self._own_health = health is None
        self.supervisor: Supervisor | None = None
        self._last_spans: dict[int, list[Span]] = {}  # per rank, what it answered last
        self._last_counters: dict[int, dict[str, float]] = {}
        self.model_path = model_path
        self.groups = groups
        self.ffn_config = ffn_config or deployment.config
        self.num_cpus = num_cpus
        self.rendezvous = rendezvous
        self.actors: dict[int, Any] = {}
        self._placement: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FFNWorkerPool:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.deployment.config
        ranks = list(self.deployment.topology.ffn_ranks)
        ensure_ray(cfg.ray_address, min_cpus=len(ranks) * self.num_cpus)
        crosses_nodes = self.deployment.backend == "npu"  # HCCL windows cross nodes
        many_nodes = len([n for n in ray.nodes() if n.get("Alive")]) > 1
        strategy = "SPREAD" if crosses_nodes and many_nodes else "PACK"
        if self.health is None:
            self.health = HealthBoard.create(self.deployment.topology, "shm")
        self._placement = placement_group(
            [{"CPU": self.num_cpus} for _ in ranks], strategy=strategy
        )
        try:
            calls.get(
                self._placement.ready(),
                cfg.startup_timeout_s,
                f"placement of {len(ranks)} FFN ranks ({self.num_cpus:g} CPU each, {strategy})",
                f"startup_timeout_s; the cluster has {ray.available_resources().get('CPU', 0):g} "
                f"of {ray.cluster_resources().get('CPU', 0):g} CPUs free: add nodes or CPUs, or "
                "lower num_ffn_ranks",
            )
            remote = ray.remote(FFNWorkerActor)
            specs = [g.spec for g in self.groups]
            expected = self.deployment.params()
            for bundle, rank in enumerate(ranks):
                self.actors[rank] = remote.options(
                    name=None,
                    num_cpus=self.num_cpus,
                    # A restarted actor cannot rejoin the NPU link's communicators
                    max_restarts=0 if self.deployment.backend == "npu" else cfg.ffn_max_restarts,
                    max_task_retries=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, bundle),
                ).remote(
                    self.ffn_config,  # pickled as it is: Ray's serializer, no JSON trip
                    self.model_path,
                    rank,
                    specs,
                    str(self.deployment.dtype),
                    expected,
                    self.rendezvous,
                    self.health.token,
                    os.getpriority(os.PRIO_PROCESS, 0),
                )
            self._handshake()
            if not crosses_nodes:
                self._check_same_node()
            self.supervisor = Supervisor(self.actors, self.health, cfg).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _handshake(self) -> None:

        mine = self.deployment.params()
        refs = {rank: actor.params.remote() for rank, actor in self.actors.items()}
        timeout = self.deployment.config.startup_timeout_s
        for rank, ref in refs.items():
            answer = calls.get(
                ref,
                timeout,
                f"FFN rank {rank}'s actor, starting up",
                "startup_timeout_s: loading its experts takes longer, or it waits for CPUs",
            )
            mine.check_matches(answer, "attention side", f"FFN rank {rank}")

    def _check_same_node(self) -> None:
        import ray

        here = ray.get_runtime_context().get_node_id()
        timeout = self.deployment.config.startup_timeout_s
        for rank, actor in self.actors.items():
            node = calls.get(actor.info.remote(), timeout, f"FFN rank {rank}'s actor")["node_id"]
            if node != here:
                raise AFDHandshakeError(
                    f"FFN rank {rank} runs on node {node}, the attention side on {here}: "
                    "shared-memory windows need one host (use backend 'npu' on A3: HCCL windows)"
                )

    def stop(self) -> None:
        """Stop every actor (no restart) and release the placement group."""
        import ray

        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        timeout = self.deployment.config.wait_timeout_s
        stops = {rank: actor.stop.remote() for rank, actor in self.actors.items()}
        if stops:
            done, _ = ray.wait(list(stops.values()), num_returns=len(stops), timeout=timeout)
            late = [rank for rank, ref in stops.items() if ref not in done]
            if late:
                log.warning("AFD: FFN ranks %s did not stop within %g s; killed", late, timeout)
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        if self._placement is not None:
            ray.util.remove_placement_group(self._placement)
            self._placement = None
        if self._own_health and self.health is not None:
            self.health.close()
            self.health = None

    def __enter__(self) -> FFNWorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observability and fault injection ---------------------------------------------------
    def traces(
        self, timeout_s: float | None = None
    ) -> tuple[list[Span], dict[str, dict[str, float]]]:
        """Every FFN rank's spans and counters, plus the supervisor's counters. A rank that
        does not answer within `timeout_s` (default `wait_timeout_s`: frozen, restarting)
        contributes what it answered last."""
        for rank, answer in self._ask("trace", timeout_s).items():
            self._last_spans[rank], self._last_counters[rank] = answer
        spans = [span for s in self._last_spans.values() for span in s]
        return spans, self._counters()

    def counters(self, timeout_s: float | None = None) -> dict[str, dict[str, float]]:
        """`traces` without the spans, which a rank then does not copy or send (a metrics
        poll runs every second; with "trace" on, the spans run to many thousands)."""
        self._last_counters.update(self._ask("counters", timeout_s))
        return self._counters()

    def _ask(self, method: str, timeout_s: float | None) -> dict[int, Any]:
        """Each FFN actor's answer to `method()` that came within `timeout_s`."""
        import ray

        timeout = self.deployment.config.wait_timeout_s if timeout_s is None else timeout_s
        refs = {rank: getattr(actor, method).remote() for rank, actor in self.actors.items()}
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        answers = {}
        for rank, ref in refs.items():
            if ref in done:
                try:
                    answers[rank] = ray.get(ref, timeout=0)
                except ray.exceptions.RayError as exc:
                    log.debug("AFD: FFN rank %d %s unavailable: %s", rank, method, exc)
        return answers

    def _counters(self) -> dict[str, dict[str, float]]:
        counters = {f"FFN {rank}": dict(c) for rank, c in self._last_counters.items()}
        if self.supervisor is not None:
            for process, values in self.supervisor.counters().items():
                counters[process] = counters.get(process, {}) | values
        return counters

    def info(self) -> dict[int, dict[str, Any]]:
        """Each FFN rank's `FFNWorkerActor.info`. Raises `AFDPeerError` naming a rank whose
        actor died or is restarting, and why (e.g. its constructor's exception)."""
        timeout = self.deployment.config.startup_timeout_s
        refs = {rank: actor.info.remote() for rank, actor in self.actors.items()}
        return {rank: calls.get(ref, timeout, f"FFN rank {rank}") for rank, ref in refs.items()}

    def kill(self, rank: int) -> None:
        """Kill FFN `rank`'s actor as a crash would; Ray restarts it (max_restarts)."""
        import ray

        ray.kill(self.actors[rank], no_restart=False)
