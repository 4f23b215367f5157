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

With `"trace": true` the session also records a "moe" span around every MoE layer's hook
call (AFD's host code around the ops lies inside it and outside send and combine; vLLM's
own work lies outside it), where each model forward reaches its first MoE layer, with its
tokens, and, at every hook call's entry and where each of its spans ends (send, combine,
the call itself), the calling thread's CPU accounting (`/proc/thread-self/schedstat`: ns
on a CPU, ns runnable without one). All are kept in
bounded memory and dumped by the metrics publisher on request (`metrics.TRACE_ENV`).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDInputError, AFDPeerError, AFDTimeoutError, check
from afd_dispatch.integrations.vllm import metrics
from afd_dispatch.integrations.vllm.owner import Attachment, DeploymentOwner
from afd_dispatch.link import attention_link
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.health import HealthBoard
from afd_dispatch.runtime.trace import Span, Tracer
from afd_dispatch.windows import WindowGroup

log = logging.getLogger(__name__)
_server: AttentionServer | None = None
_lock = threading.Lock()
TRACE_MAX_SPANS = 40_000  # with "trace": true the session keeps the newest 20,000-40,000
TRACE_MAX_FORWARDS = 10_000  # forward marks kept (the newest)
TRACE_MAX_CPU_MARKS = 40_000  # CPU accounting marks kept (the newest; 2 + 2 M per hook call)


@dataclass
class MarkingTracer(Tracer):
    """A `Tracer` that, while enabled, calls `on_record(end_ns)` after recording each span:
    the session takes a CPU mark where every span of its thread ends (send, combine, moe)."""

    on_record: Callable[[int], None] | None = None

    def record(
        self, name: str, start_ns: int, end_ns: int, layer: int = -1, micro_batch: int = -1
    ) -> None:
        super().record(name, start_ns, end_ns, layer, micro_batch)
        if self.enabled and self.on_record is not None:
            self.on_record(end_ns)


class ThreadClock:
    """The calling thread's CPU accounting: (ns on a CPU, ns runnable waiting for one).

    On-CPU time is `time.thread_time_ns()` (exact at the call: the kernel brings the
    running thread's clock up to date; schedstat's own first field lags by up to a tick);
    the waiting is schedstat's run delay (`/proc/thread-self/schedstat`, Linux >= 3.17, up
    to date for a running thread: it grows only while the thread is off a CPU), read
    through one descriptor per thread, about 1 us a read. None where it cannot be read.
    """

    PATH = "/proc/thread-self/schedstat"

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._broken = False

    def read(self) -> tuple[int, int] | None:
        if self._broken:
            return None
        ident = threading.get_ident()
        try:
            fd = self._fds.get(ident)
            if fd is None:
                fd = self._fds[ident] = os.open(self.PATH, os.O_RDONLY)
            wait = int(os.pread(fd, 128, 0).split()[1])
            return time.thread_time_ns(), wait
        except (OSError, ValueError, IndexError):
            self._broken = True  # no such file here: stop asking
            return None

    def close(self) -> None:
        fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


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
            0 <= session < config.num_attention_ranks,
            "data-parallel rank",
            f"[0, {config.num_attention_ranks}) (num_attention_ranks)",
            session,
        )
        self.config = config
        self.session = session
        self.owner: DeploymentOwner | None = None
        self.groups: list[WindowGroup] = []  # attached here, closed here
        self.health: HealthBoard | None = None  # attached here (closed here) or the owner's
        self._own_board = False
        self.tracer = MarkingTracer(
            f"attention {session}", enabled=config.trace, max_spans=TRACE_MAX_SPANS
        )
        # (monotonic ns, tokens) where each forward reached its first MoE layer ("trace")
        self._forwards: deque[tuple[int, int]] = deque(maxlen=TRACE_MAX_FORWARDS)
        # (monotonic ns, ns on a CPU, ns runnable without one) at hook entries and exits
        self._cpu: deque[tuple[int, int, int]] = deque(maxlen=TRACE_MAX_CPU_MARKS)
        self._clock = ThreadClock()
        self.tracer.on_record = self._cpu_mark
        self._first_moe_layer = -1
        self._metrics: metrics.CounterPublisher | None = None
        try:
            if attachment is None:
                check(
                    config.num_attention_ranks == 1,
                    "num_attention_ranks",
                    "1 where no process launched the engines (data-parallel ranks share "
                    "a deployment that the engines' launcher owns)",
                    config.num_attention_ranks,
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
            self._first_moe_layer = min(self.deployment.spec.moe_layers)
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
        if not self.tracer.enabled:
            return self._moe(layer, x, topk_ids, topk_weights, dp_max_tokens)
        start = time.monotonic_ns()
        self._cpu_mark(start)
        if layer == self._first_moe_layer:
            self._forwards.append((start, int(x.shape[0])))
        try:
            return self._moe(layer, x, topk_ids, topk_weights, dp_max_tokens)
        finally:
            self.tracer.record("moe", start, time.monotonic_ns(), layer)  # a CPU mark too

    def _cpu_mark(self, now_ns: int) -> None:
        cpu = self._clock.read()
        if cpu is not None:
            self._cpu.append((now_ns, *cpu))

    def _moe(
        self,
        layer: int,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        dp_max_tokens: int | None,
    ) -> torch.Tensor:
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
        if self.deployment.topology.num_attention_ranks > 1:  # every session must send as many
            check(
                dp_max_tokens is not None,
                "vLLM's data-parallel token counts (forward context dp_metadata)",
                "present with several attention ranks (they agree the exchange rounds)",
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

    def trace(self) -> dict[str, Any]:
        """This session's newest spans and forward marks as a Chrome/Perfetto trace
        (`metrics.trace_document`), with the FFN ranks' where this process owns the
        deployment; no spans unless the config's "trace" is on."""
        spans: list[Span] = self.tracer.snapshot()[0]
        if self.owner is not None:
            spans += self.owner.spans()
        return metrics.trace_document(
            metrics.newest_spans(spans), list(self._forwards), self.tracer.process, list(self._cpu)
        )

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._clock.close()
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
