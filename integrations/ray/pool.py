"""Start, check and stop the FFN actors of one deployment.

Placement: one bundle per FFN rank in a placement group, spread over nodes when the
transport can cross nodes (HCCL on A3) and the cluster has several; with shared-memory
windows (the reference backend) every actor must share the attention node, and a
placement that puts one elsewhere is refused.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDHandshakeError, AFDTimeoutError
from afd_dispatch.integrations.ray.ffn_actor import FFNWorkerActor
from afd_dispatch.link.npu import Rendezvous
from afd_dispatch.runtime.deployment import Deployment, ProtocolParams
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
    else:
        ray.init(address=address, log_to_driver=False)


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
    ) -> None:
        self.deployment = deployment
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
        self._placement = placement_group(
            [{"CPU": self.num_cpus} for _ in ranks], strategy=strategy
        )
        try:
            ray.get(self._placement.ready(), timeout=cfg.startup_timeout_s)
            remote = ray.remote(FFNWorkerActor)
            config_json = self.ffn_config.to_json()
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
                    config_json,
                    self.model_path,
                    rank,
                    specs,
                    str(self.deployment.dtype),
                    expected,
                    self.rendezvous,
                )
            self._handshake()
            if not crosses_nodes:
                self._check_same_node()
        except BaseException:
            self.stop()
            raise
        return self

    def _handshake(self) -> None:
        import ray

        mine = self.deployment.params()
        refs = {rank: actor.params.remote() for rank, actor in self.actors.items()}
        for rank, ref in refs.items():
            try:
                theirs = ProtocolParams.from_dict(
                    ray.get(ref, timeout=self.deployment.config.startup_timeout_s)
                )
            except ray.exceptions.GetTimeoutError:
                raise AFDTimeoutError(
                    f"FFN actor for rank {rank} did not come up within "
                    f"{self.deployment.config.startup_timeout_s:g} s (startup_timeout_s)"
                ) from None
            mine.check_matches(theirs, "attention side", f"FFN rank {rank}")

    def _check_same_node(self) -> None:
        import ray

        here = ray.get_runtime_context().get_node_id()
        for rank, actor in self.actors.items():
            node = ray.get(actor.info.remote(), timeout=self.deployment.config.startup_timeout_s)[
                "node_id"
            ]
            if node != here:
                raise AFDHandshakeError(
                    f"FFN rank {rank} runs on node {node}, the attention side on {here}: "
                    "shared-memory windows need one host (use transport 'hccl' on A3)"
                )

    def stop(self) -> None:
        """Stop every actor (no restart) and release the placement group."""
        import ray

        timeout = self.deployment.config.wait_timeout_s
        stops = [actor.stop.remote() for actor in self.actors.values()]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=timeout)
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        if self._placement is not None:
            ray.util.remove_placement_group(self._placement)
            self._placement = None

    def __enter__(self) -> FFNWorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observability and fault injection ---------------------------------------------------
    def traces(self) -> tuple[list[Span], dict[str, dict[str, float]]]:
        import ray

        spans: list[Span] = []
        counters: dict[str, dict[str, float]] = {}
        timeout = self.deployment.config.wait_timeout_s
        for rank, (s, c) in zip(
            self.actors,
            ray.get([a.trace.remote() for a in self.actors.values()], timeout=timeout),
            strict=True,
        ):
            spans.extend(s)
            counters[f"FFN {rank}"] = c
        return spans, counters

    def info(self) -> dict[int, dict[str, Any]]:
        import ray

        timeout = self.deployment.config.startup_timeout_s
        return dict(
            zip(
                self.actors,
                ray.get([a.info.remote() for a in self.actors.values()], timeout=timeout),
                strict=True,
            )
        )

    def kill(self, rank: int) -> None:
        """Kill FFN `rank`'s actor as a crash would; Ray restarts it (max_restarts)."""
        import ray

        ray.kill(self.actors[rank], no_restart=False)
