"""The AFD side of one vLLM worker: windows, FFN actors and the attention endpoint.

One `AttentionServer` per worker process, made when the model is built and closed when
the process exits. Its `moe` is what the patched MoE method calls for every MoE layer.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import check
from afd_dispatch.integrations.ray import FFNWorkerPool
from afd_dispatch.integrations.vllm import metrics
from afd_dispatch.link import attention_link
from afd_dispatch.link.npu import serve_rendezvous
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.model_spec import MoESpec
from afd_dispatch.runtime.trace import Tracer

log = logging.getLogger(__name__)
_server: AttentionServer | None = None
_lock = threading.Lock()


class AttentionServer:
    def __init__(self, config: AFDConfig, model_path: str, dtype: torch.dtype) -> None:
        check(
            os.path.isdir(model_path),
            "model",
            "a local checkpoint directory (AFD workers load from it)",
            model_path,
        )
        self.config = config
        self.deployment = Deployment(config, MoESpec.from_pretrained(model_path), dtype)
        self.tracer = Tracer("attention 0", enabled=config.trace)
        npu = self.deployment.backend == "npu"
        # The NPU link's ranks meet at a TCP store this process serves; the reference
        # link's windows are shared memory this process owns.
        self.groups = [] if npu else self.deployment.create_windows("shm")
        self._rendezvous_store: Any = None
        self.pool: FFNWorkerPool | None = None
        try:
            link = None
            rendezvous = None
            if npu:
                rendezvous, self._rendezvous_store = serve_rendezvous(_rendezvous_host(config))
            self.pool = FFNWorkerPool(
                self.deployment, model_path, self.groups, rendezvous=rendezvous
            ).start()
            if rendezvous is not None:
                log.info(
                    "AFD: NPU link: HCCL communicators set up at %s:%d",
                    rendezvous.host,
                    rendezvous.port,
                )
                link = attention_link(self.deployment, 0, rendezvous=rendezvous)
            self.endpoint = AttentionEndpoint(self.deployment, 0, tracer=self.tracer, link=link)
        except BaseException:
            self.close()
            raise
        self._metrics = metrics.CounterPublisher(self)
        log.info(
            "AFD: %d FFN actors serving %s, %d micro-batches of <= %d tokens",
            len(self.pool.actors),
            model_path,
            config.micro_batch_num,
            config.max_tokens_per_micro_batch,
        )

    def moe(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum for one MoE layer (shared experts excluded)."""
        out = self.endpoint.exchange(
            layer,
            x.to(self.deployment.dtype),
            topk_ids.to(torch.int32),
            topk_weights.to(torch.float32),
        )
        return out.to(x.dtype)

    def counters(self) -> dict[str, dict[str, float]]:
        counters = {self.tracer.process: self.tracer.snapshot()[1]}
        if self.pool is not None:
            counters |= self.pool.traces()[1]
        return counters

    def close(self) -> None:
        if getattr(self, "_metrics", None) is not None:
            self._metrics.close()
        endpoint = getattr(self, "endpoint", None)
        if endpoint is not None:
            endpoint.link.close()
        if self.pool is not None:
            try:
                self.pool.stop()
            except Exception as exc:  # the process is going away; say so, don't mask it
                log.warning("AFD: stopping FFN actors failed: %s", exc)
            self.pool = None
        for group in self.groups:
            group.close()
        self.groups = []
        self._rendezvous_store = None


def _rendezvous_host(config: AFDConfig) -> str:
    """Where FFN actors reach this process: loopback with the embedded Ray, else this node's
    address in the Ray cluster."""
    if config.ray_address in (None, "local"):
        return "127.0.0.1"
    import ray.util

    return str(ray.util.get_node_ip_address())


def start(config: AFDConfig, model_path: str, dtype: torch.dtype) -> AttentionServer:
    """The process's server, made once."""
    global _server
    with _lock:
        if _server is None:
            _server = AttentionServer(config, model_path, dtype)
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
    from afd_dispatch.integrations.vllm.cli import ADDITIONAL_CONFIG_KEY

    extra = getattr(vllm_config, "additional_config", None) or {}
    values = extra.get(ADDITIONAL_CONFIG_KEY)
    return None if values is None else AFDConfig.from_dict(values)
