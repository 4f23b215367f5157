"""The deployment's shared half: its windows and its FFN pool, one per `vllm serve`.

Every data-parallel rank of a server is one AFD session, and all of them talk to the same
FFN ranks. So the windows (or, on A3, the rendezvous of the HCCL communicators) and the
FFN Ray actors are made once, by `DeploymentOwner`, in the process that launches vLLM's
engine cores, before it launches them. The engines learn where to attach from an
`Attachment` the owner leaves in their environment (inherited, never on the command line):
on one host that needs no lookup and no wait. The owner stops the pool and removes the
windows when that process exits; if it is killed, Ray ends the actors it owns and each
window group's janitor unlinks the files.

Across hosts (backend "npu", DP ranks on several nodes, FFN actors on a Ray cluster), the
owner runs where DP rank 0 is launched and also publishes the attachment as a named Ray
actor; the launchers of the other nodes (`vllm serve --headless`) find it there, waiting
at most `startup_timeout_s` (`find_attachment`).

A process that builds a model without an owner (vLLM with multiprocessing off, or an
offline `LLM`) owns a deployment of its own; that needs one attention rank.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDHandshakeError, AFDInputError, AFDPeerError, AFDTimeoutError
from afd_dispatch.integrations.ray import FFNWorkerPool, calls
from afd_dispatch.integrations.vllm import metrics
from afd_dispatch.link.npu import Rendezvous, serve_rendezvous
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.deployment import Deployment, ProtocolParams
from afd_dispatch.runtime.health import HealthBoard
from afd_dispatch.runtime.trace import Span
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import WindowGroup, WindowGroupSpec, attach_window_group

log = logging.getLogger(__name__)
ENV = "AFD_ATTACHMENT"
NAMESPACE = "afd-dispatch"  # of the Ray actors through which other nodes find a deployment
LOOKUP_PERIOD_S = 0.5
COUNTERS_TIMEOUT_S = 0.5  # a metrics snapshot never waits on a frozen FFN rank longer


@dataclass(frozen=True)
class Attachment:
    """What an attention rank needs to join the owner's deployment (JSON in `ENV`).

    `windows` maps each window group name to its shared-memory token (a secret: the files
    are owner-only, and the names unguessable); `rendezvous` is where the NPU link's ranks
    meet; `params` is the owner's plan, which the rank's own plan must equal; `health` is
    the token of the deployment's health board (shared memory on the owner's host).
    """

    owner_pid: int
    params: dict[str, Any]
    windows: dict[str, str] = field(default_factory=dict)
    rendezvous: tuple[str, int] | None = None
    health: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> Attachment | None:
        text = os.environ.get(ENV)
        return cls.from_json(text) if text else None

    @classmethod
    def from_json(cls, text: str) -> Attachment:
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise TypeError(f"a JSON object, not {type(values).__name__}")
            rendezvous = values.get("rendezvous")
            health = values.get("health")
            return cls(
                owner_pid=int(values["owner_pid"]),
                params=dict(values["params"]),
                windows={str(k): str(v) for k, v in dict(values["windows"]).items()},
                rendezvous=None if rendezvous is None else (str(rendezvous[0]), int(rendezvous[1])),
                health=None if health is None else str(health),
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise AFDInputError(ENV, "the JSON a DeploymentOwner wrote", f"{exc}") from None

    def attach(self, deployment: Deployment) -> tuple[list[WindowGroup], Rendezvous | None]:
        """Check `deployment` against the owner's plan, then map its windows (reference
        link) or hand over the rendezvous (NPU link: HCCL owns the windows).

        Raises `AFDHandshakeError` naming every field that differs, or what is missing.
        """
        owner = f"the deployment owner (pid {self.owner_pid})"
        ProtocolParams.from_dict(self.params).check_matches(deployment.params(), owner, "this rank")
        if deployment.backend == "npu":
            if self.rendezvous is None:
                raise AFDHandshakeError(f"{owner} serves no rendezvous for the NPU link")
            return [], Rendezvous(*self.rendezvous)
        groups: list[WindowGroup] = []
        try:
            for name in deployment.group_names:
                if name not in self.windows:
                    raise AFDHandshakeError(
                        f"{owner} made no window group {name!r} (it made {sorted(self.windows)})"
                    )
                spec = WindowGroupSpec(
                    name,
                    deployment.topology,
                    deployment.layout,
                    "shm",
                    deployment.config.wait_timeout_s,
                    self.windows[name],
                )
                groups.append(attach_window_group(spec))
        except BaseException:
            for group in groups:
                group.close()
            raise
        return groups, None

    def topology(self) -> RankTopology:
        """The deployment's ranks, from the owner's plan."""
        params = ProtocolParams.from_dict(self.params)
        return RankTopology(
            params.num_attention_ranks,
            params.world_size - params.num_attention_ranks,
            params.ffn_start_rank_id,
        )

    def health_board(self) -> HealthBoard | None:
        """The owner's health board, or None on a host that does not have it (another
        node of an NPU deployment: its waits then know only their own flags)."""
        if self.health is None:
            return None
        try:
            return HealthBoard.attach(self.topology(), self.health)
        except FileNotFoundError:
            log.warning("AFD: the deployment's health board is on another host")
            return None


class DeploymentOwner:
    """Windows (reference link) or rendezvous (NPU link), and the FFN actors, of one server."""

    def __init__(
        self, config: AFDConfig, model_path: str, dtype: torch.dtype, key: str = ""
    ) -> None:
        """`key` tells this server's deployment from others on the same Ray cluster (vLLM's
        DP master address and port: every node of one server knows them)."""
        self.config = config
        self.key = key
        self.model_path = model_path
        self.dtype = dtype
        self.deployment = Deployment(config, MoESpec.from_pretrained(model_path), dtype)
        npu = self.deployment.backend == "npu"
        # The NPU link's ranks meet at a TCP store this process serves; the reference
        # link's windows are shared memory this process owns.
        self.groups = [] if npu else self.deployment.create_windows()
        self.health: HealthBoard | None = HealthBoard.create(self.deployment.topology, "shm")
        self.rendezvous: Rendezvous | None = None
        self._store: Any = None
        self.pool: FFNWorkerPool | None = None
        self._directory: Any = None
        try:
            if npu:
                self.rendezvous, self._store = serve_rendezvous(_rendezvous_host(config))
            self.pool = FFNWorkerPool(
                self.deployment,
                model_path,
                self.groups,
                rendezvous=self.rendezvous,
                health=self.health,
            ).start()
            if npu and on_cluster(config):
                self._directory = publish_attachment(config, self.attachment(), key)
        except BaseException:
            self.close()
            raise
        log.info(
            "AFD: %d FFN actors serving %s for %d attention ranks, %d micro-batches of <= %d "
            "tokens",
            len(self.pool.actors),
            model_path,
            config.num_attention_ranks,
            config.micro_batch_num,
            config.max_tokens_per_micro_batch,
        )

    def attachment(self) -> Attachment:
        return Attachment(
            owner_pid=os.getpid(),
            params=self.deployment.params().to_dict(),
            windows={g.name: str(g.spec.token) for g in self.groups},
            rendezvous=None
            if self.rendezvous is None
            else (self.rendezvous.host, self.rendezvous.port),
            health=None if self.health is None else self.health.token,
        )

    def counters(self) -> dict[str, dict[str, float]]:
        """The FFN ranks' counters, {"FFN r": {name: value}}, and the pool's ("pool"). A
        rank that does not answer at once (frozen, restarting) shows its last values."""
        return {} if self.pool is None else self.pool.counters(COUNTERS_TIMEOUT_S)

    def spans(self) -> list[Span]:
        """The FFN ranks' spans (none unless the config's "trace" is on); a rank that does
        not answer at once shows the spans it answered last."""
        return [] if self.pool is None else self.pool.traces(COUNTERS_TIMEOUT_S)[0]

    def trace(self) -> dict[str, Any]:
        """The FFN ranks' newest spans as a Chrome/Perfetto trace (`metrics` dumps it)."""
        return metrics.trace_document(metrics.newest_spans(self.spans()))

    def close(self) -> None:
        if self._directory is not None:
            import ray

            ray.kill(self._directory, no_restart=True)
            self._directory = None
        if self.pool is not None:
            try:
                self.pool.stop()
            except Exception as exc:  # the process is going away; say so, don't mask it
                log.warning("AFD: stopping FFN actors failed: %s", exc)
            self.pool = None
        for group in self.groups:
            group.close()
        self.groups = []
        if self.health is not None:
            self.health.close()
            self.health = None
        self._store = None


def _rendezvous_host(config: AFDConfig) -> str:
    """Where FFN actors and attention ranks reach the owner: loopback with the embedded
    Ray, else this node's address in the Ray cluster."""
    if config.ray_address in (None, "local"):
        return "127.0.0.1"
    import ray.util

    return str(ray.util.get_node_ip_address())


def on_cluster(config: AFDConfig) -> bool:
    """Whether the deployment's Ray is a cluster other hosts join (not the embedded one)."""
    return config.ray_address not in (None, "local")


def directory_name(config: AFDConfig, key: str = "") -> str:
    return f"deployment.{config.group}" + (f".{key}" if key else "")


class DeploymentDirectory:
    """A Ray actor that holds one deployment's `Attachment` for the launchers of other nodes."""

    def __init__(self, attachment_json: str) -> None:
        self.attachment_json = attachment_json

    def attachment(self) -> str:
        return self.attachment_json


def publish_attachment(config: AFDConfig, attachment: Attachment, key: str = "") -> Any:
    """Start the named directory actor, owned by this process: it lives as long as the
    returned handle does (Ray collects a non-detached actor with its last handle), and dies
    with this process."""
    import ray

    name = directory_name(config, key)
    try:
        actor: Any = (
            ray.remote(DeploymentDirectory)
            .options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0)
            .remote(attachment.to_json())
        )
    except ValueError as exc:  # Ray: the name is taken
        raise AFDInputError(
            "group",
            f"a name no other AFD deployment on this Ray cluster uses ({exc})",
            config.group,
        ) from None
    calls.get(
        actor.attachment.remote(),
        config.startup_timeout_s,
        f"the directory actor {name!r} (namespace {NAMESPACE!r})",
        "startup_timeout_s: the cluster could not start one more actor (no worker process)",
    )
    log.info("AFD: deployment %r published in Ray namespace %r", name, NAMESPACE)
    return actor


def find_attachment(config: AFDConfig, key: str = "") -> Attachment:
    """The attachment the owner of `config`'s deployment published in the Ray cluster.

    Polls (sleeping) for at most `startup_timeout_s`; `AFDTimeoutError` names the actor,
    the cluster and what starts it.
    """
    import ray

    from afd_dispatch.integrations.ray import ensure_ray

    ensure_ray(config.ray_address)
    name = directory_name(config, key)
    deadline = time.monotonic() + config.startup_timeout_s
    last = ""  # why the last lookup that found the actor failed
    while True:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            left = max(0.1, deadline - time.monotonic())
            text = calls.get(actor.attachment.remote(), left, f"AFD deployment {name!r}")
            break
        except ValueError:  # not there (yet): look again until the deadline
            last = ""
        except (AFDTimeoutError, AFDPeerError) as exc:  # its owner is going away, or slow
            last = str(exc)
        if time.monotonic() > deadline:
            raise AFDTimeoutError(
                f"no AFD deployment {name!r} (Ray namespace {NAMESPACE!r}) in the Ray cluster "
                f"at {config.ray_address} after {config.startup_timeout_s:g} s "
                "(startup_timeout_s): the vllm serve that launches data-parallel rank 0 "
                "publishes it once its FFN actors are up; start it with the same AFD config"
                + (f" (the last lookup found it but failed: {last})" if last else "")
            )
        time.sleep(LOOKUP_PERIOD_S)
    return Attachment.from_json(str(text))
