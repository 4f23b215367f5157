"""The AFD side of one vLLM worker: one attention session of the deployment.

One `AttentionServer` per worker process, made when the model is built and closed when
the process exits. Its `moe` is what the patched MoE method calls for every MoE layer.
vLLM's data-parallel rank s is session s.

An AFD error on the data path is never fatal to the engine (vLLM would end the whole
server on any exception of a forward). `moe` reports it on the deployment's health board
and returns zeros, and this session stops exchanging: its forwards return zeros at once
from then on. The HTTP front end (`health.AFDHealthMiddleware`) fails every request that
ran while an error was reported, and every later one, naming AFD and the rank, and
answers `/health` with 503. (Stopping for good is deliberate: the zeros went into KV
blocks that vLLM's prefix cache may hand to later requests, and an exchange that broke
midway leaves slots in flight. The server must be restarted; its health probe says so.)
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDInputError, AFDPeerError, AFDTimeoutError, check
from afd_dispatch.integrations.vllm import metrics
from afd_dispatch.integrations.vllm.owner import Attachment, DeploymentOwner
from afd_dispatch.link import attention_link
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.health import HealthBoard
from afd_dispatch.runtime.model_spec import MoESpec
from afd_dispatch.runtime.trace import Tracer
from afd_dispatch.windows import WindowGroup

log = logging.getLogger(__name__)
_server: AttentionServer | None = None
_lock = threading.Lock()


class AttentionServer:
    """Attention rank `session` of a deployment: its endpoint, and its counters published.

    With an `attachment` the deployment belongs to a `DeploymentOwner` in the process that
    launched this engine (all DP ranks share it); without one, this process owns it.
    """

    def __init__(
        self,
        config: AFDConfig,
        model_path: str,
        dtype: torch.dtype,
        session: int = 0,
        attachment: Attachment | None = None,
    ) -> None:
        check(
            os.path.isdir(model_path),
            "model",
            "a local checkpoint directory (AFD workers load from it)",
            model_path,
        )
        check(
            0 <= session < config.num_attention_workers,
            "data-parallel rank",
            f"[0, {config.num_attention_workers}) (num_attention_workers)",
            session,
        )
        self.config = config
        self.session = session
        self.owner: DeploymentOwner | None = None
        self.groups: list[WindowGroup] = []  # attached here, closed here
        self.health: HealthBoard | None = None  # attached here (closed here) or the owner's
        self._own_board = False
        self.tracer = Tracer(f"attention {session}", enabled=config.trace)
        self._metrics: metrics.CounterPublisher | None = None
        try:
            if attachment is None:
                check(
                    config.num_attention_workers == 1,
                    "num_attention_workers",
                    "1 where no process launched the engines (data-parallel ranks share "
                    "a deployment that the engines' launcher owns)",
                    config.num_attention_workers,
                )
                self.owner = DeploymentOwner(config, model_path, dtype)
                self.deployment = self.owner.deployment
                rendezvous = self.owner.rendezvous
                self.health = self.owner.health
            else:
                self.deployment = Deployment(config, MoESpec.from_pretrained(model_path), dtype)
                self.groups, rendezvous = attachment.attach(self.deployment)
                self.health = attachment.health_board()
                self._own_board = self.health is not None
            link = None
            if rendezvous is not None:
                link = attention_link(self.deployment, session, rendezvous=rendezvous)
            self.endpoint = AttentionEndpoint(
                self.deployment, session, tracer=self.tracer, link=link, health=self.health
            )
        except BaseException:
            self.close()
            raise
        self._metrics = metrics.CounterPublisher(self, f"attention-{session}", session == 0)
        log.info("AFD: data-parallel rank %d is attention session %d", session, session)

    def moe(
        self,
        layer: int,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        dp_max_tokens: int | None = None,
    ) -> torch.Tensor:
        """The routed experts' weighted sum for one MoE layer (shared experts excluded).

        `dp_max_tokens`: the most tokens any data-parallel rank runs in this forward; all
        ranks then send the same number of rounds. On an AFD error: zeros, and the error on
        the health board (see the module's docstring).
        """
        if self.health is not None and self.health.cannot_serve():
            return torch.zeros_like(x)  # the front end fails these requests
        try:
            return self._exchange(layer, x, topk_ids, topk_weights, dp_max_tokens)
        except (AFDTimeoutError, AFDPeerError, AFDInputError) as exc:
            log.error(
                "AFD: session %d, layer %d: %s: %s (this session stops exchanging)",
                self.session, layer, type(exc).__name__, exc,
            )  # fmt: skip
            if self.health is None:
                raise  # nowhere to report it: let vLLM see it
            self.health.report_session_error(self.session, f"{type(exc).__name__}: {exc}", True)
            self.tracer.count("exchange_errors_total")
            return torch.zeros_like(x)

    def _exchange(
        self,
        layer: int,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        dp_max_tokens: int | None,
    ) -> torch.Tensor:
        rounds = None
        if self.deployment.topology.num_attention > 1:  # every session must send as many
            check(
                dp_max_tokens is not None,
                "vLLM's data-parallel token counts (forward context dp_metadata)",
                "present with several attention sessions (they agree the exchange rounds)",
                None,
            )
            assert dp_max_tokens is not None
            check(
                x.shape[0] <= dp_max_tokens,
                "tokens of this data-parallel rank",
                f"<= {dp_max_tokens}, the most of any rank in vLLM's DP metadata",
                x.shape[0],
            )
            rounds = self.endpoint.rounds_for(dp_max_tokens)
        out = self.endpoint.exchange(
            layer,
            x.to(self.deployment.dtype),
            topk_ids.to(torch.int32),
            topk_weights.to(torch.float32),
            rounds,
        )
        return out.to(x.dtype)

    def counters(self) -> dict[str, dict[str, float]]:
        counters = {self.tracer.process: self.tracer.snapshot()[1]}
        if self.owner is not None:
            counters |= self.owner.counters()
        return counters

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        endpoint = getattr(self, "endpoint", None)
        if endpoint is not None:
            endpoint.link.close()
        if self.owner is not None:
            self.owner.close()
            self.owner = None
        for group in self.groups:
            group.close()
        self.groups = []
        if self._own_board and self.health is not None:
            self.health.close()
        self.health = None


def start(
    config: AFDConfig, model_path: str, dtype: torch.dtype, session: int = 0
) -> AttentionServer:
    """The process's server, made once; it joins the deployment its launcher owns, if any."""
    global _server
    with _lock:
        if _server is None:
            _server = AttentionServer(config, model_path, dtype, session, Attachment.from_env())
            atexit.register(stop)
        return _server


def current() -> AttentionServer:
    check(_server is not None, "AFD server", "started before the model runs", None)
    assert _server is not None
    return _server


def stop() -> None:
    global _server
    with _lock:
        if _server is not None:
            _server.close()
            _server = None


def config_from(vllm_config: Any) -> AFDConfig | None:
    from afd_dispatch.integrations.vllm import afd_plugin_keys
    from afd_dispatch.integrations.vllm.cli import ADDITIONAL_CONFIG_KEY, server_config

    extra = getattr(vllm_config, "additional_config", None) or {}
    values = extra.get(ADDITIONAL_CONFIG_KEY)
    if values is None:
        return None
    # also where no command line ran (an offline LLM(additional_config=...)): afd-plugin's
    # keys translated, the server's settings applied, as `cli.checked_config` does
    return server_config(AFDConfig.from_dict(afd_plugin_keys.translate(values)))
