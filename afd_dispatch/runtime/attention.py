"""The attention side: one rank's end of the AFD link, and the MoE layer built on it.

`AttentionEndpoint` sends micro-batch slots and later receives their results, in the
same cyclic order the FFN side serves them. `AFDMoELayer` is what a model calls in place
of its MoE block: route, split into micro-batches, exchange, done.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from afd_dispatch.errors import AFDRefusedError, check
from afd_dispatch.link import AttentionLink, attention_link
from afd_dispatch.model.routing import RouterSpec, route
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.health import HealthBoard, PeerWatch
from afd_dispatch.runtime.trace import Tracer
from afd_dispatch.windows.wait import watching

# More rounds than any batch vLLM schedules needs (its token budget over M * BS >= 1).
MAX_ROUNDS = 1 << 16


class AttentionEndpoint:
    """Attention rank `session`'s sends and receives, one micro-batch slot at a time.

    Contract: slots are sent and received in cyclic order 0, 1, .., M-1, 0, ..; at most
    M slots are in flight; every attention rank of the deployment sends the same sequence
    of (layer, slot), since FFN ranks batch each slot across all attention ranks. The endpoint
    pads each slot to BS tokens (through the active mask) and talks to the FFN side through
    an `AttentionLink` (default: the one the deployment's config selects; `ops` is passed
    to it, e.g. a timed wrapper of the reference ops).

    With the deployment's `health` board, waits fail at once when an FFN rank has failed
    for good, run past `wait_timeout_s` while one is being brought back (at most
    `ffn_stall_timeout_s + startup_timeout_s` in all), and name every FFN rank's state
    when they expire; a slot an FFN rank refused (answered with zeros) raises
    `AFDRefusedError` once it is received (`exchange`: once every slot is back).
    """

    def __init__(
        self,
        deployment: Deployment,
        session: int,
        ops: Any = None,
        tracer: Tracer | None = None,
        link: AttentionLink | None = None,
        health: HealthBoard | None = None,
    ) -> None:
        self.deployment = deployment
        self.session = session
        self.health = health
        cfg = deployment.config
        recovery_s = cfg.ffn_stall_timeout_s + cfg.startup_timeout_s
        self._watch = None if health is None else PeerWatch(health, recovery_s)
        # refusals seen so far, per slot and FFN rank (the board counts them per slot)
        slots = range(deployment.micro_batches)
        self._refusals = [[] if health is None else health.refusal_counts(j) for j in slots]
        self.rank = deployment.topology.attention_rank(session)
        self.link = link if link is not None else attention_link(deployment, session, ops)
        self.tracer = tracer or Tracer(f"attention {session}", enabled=deployment.config.trace)
        layout = deployment.layout
        m, bs, k, h = deployment.micro_batches, layout.tokens, layout.topk, layout.hidden
        on = self.link.device  # staging lives where the link's ops read it
        self._x = [torch.zeros(1, bs, h, dtype=layout.dtype, device=on) for _ in range(m)]
        self._ids = [torch.zeros(1, bs, k, dtype=torch.int32, device=on) for _ in range(m)]
        self._mask = [torch.zeros(1, bs, dtype=torch.bool, device=on) for _ in range(m)]
        self._scales = [torch.zeros(bs, k, dtype=torch.float32, device=on) for _ in range(m)]
        self._padded = [-1] * m  # per slot: the n its padding (mask, ids, scales) is set for
        self._moe_layers = frozenset(deployment.spec.moe_layers)
        self._capacity, self._topk = bs, k
        self._in_flight: list[tuple[int, int] | None] = [None] * m  # (tokens, layer)
        self._next_send = 0
        self._next_receive = 0

    def send(
        self,
        micro_batch: int,
        layer: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> None:
        """Send n <= BS tokens: hidden (n, H), top-k ids and weights (n, K)."""
        n = hidden.shape[0]
        shape = (n, self._topk)
        if (  # one test on the hot path; `_check_send` names what is wrong
            micro_batch != self._next_send
            or self._in_flight[micro_batch] is not None
            or n > self._capacity
            or layer not in self._moe_layers
            or topk_ids.shape != shape
            or topk_weights.shape != shape
        ):
            self._check_send(micro_batch, layer, n, topk_ids, topk_weights)
        x, ids, mask, scales = (
            t[micro_batch] for t in (self._x, self._ids, self._mask, self._scales)
        )
        x[0, :n] = hidden
        ids[0, :n] = topk_ids
        scales[:n] = topk_weights
        if self._padded[micro_batch] != n:  # the rows past n stay as the last send left them
            ids[0, n:] = 0
            mask[0, :n] = True
            mask[0, n:] = False
            scales[n:] = 0
            self._padded[micro_batch] = n
        start = time.monotonic_ns()
        if self._watch is None:
            self.link.send(micro_batch, layer, x, ids, mask)
        else:
            with watching(self._watch):
                self.link.send(micro_batch, layer, x, ids, mask)
        self.tracer.record("send", start, time.monotonic_ns(), layer, micro_batch)
        self.tracer.count("tokens_sent_total", n)
        self._in_flight[micro_batch] = (n, layer)
        self._next_send = (micro_batch + 1) % len(self._in_flight)

    def _check_send(
        self,
        micro_batch: int,
        layer: int,
        n: int,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> None:
        """Raise `AFDInputError` naming the first argument of a `send` that is wrong."""
        check(
            micro_batch == self._next_send,
            "micro_batch",
            f"{self._next_send} (cyclic send order)",
            micro_batch,
        )
        check(
            self._in_flight[micro_batch] is None,
            "micro_batch",
            "a slot whose result was received",
            micro_batch,
        )
        check(n <= self._capacity, "hidden.shape[0]", f"<= BS = {self._capacity}", n)
        check(
            layer in self._moe_layers,
            "layer",
            f"a MoE layer of the model {sorted(self._moe_layers)}",
            layer,
        )
        check(
            tuple(topk_ids.shape) == (n, self._topk)
            and tuple(topk_weights.shape) == (n, self._topk),
            "topk_ids / topk_weights shape",
            f"({n}, K={self._topk})",
            (tuple(topk_ids.shape), tuple(topk_weights.shape)),
        )

    def receive(self, micro_batch: int) -> torch.Tensor:
        """Wait for slot `micro_batch`'s results and return its (n, H) MoE output."""
        pending = self._in_flight[micro_batch] if micro_batch == self._next_receive else None
        if pending is None:
            check(
                micro_batch == self._next_receive,
                "micro_batch",
                f"{self._next_receive} (results come back in send order)",
                micro_batch,
            )
            check(pending is not None, "micro_batch", "a slot that was sent", micro_batch)
        assert pending is not None
        n, layer = pending
        start = time.monotonic_ns()
        if self._watch is None:
            y = self.link.receive(micro_batch, layer, self._scales[micro_batch])
        else:
            with watching(self._watch):
                y = self.link.receive(micro_batch, layer, self._scales[micro_batch])
        self.tracer.record("combine", start, time.monotonic_ns(), layer, micro_batch)
        self._in_flight[micro_batch] = None
        self._next_receive = (micro_batch + 1) % len(self._in_flight)
        self._raise_if_refused(micro_batch)
        return y[:n]

    def _raise_if_refused(self, micro_batch: int) -> None:
        """An FFN rank counts a refusal of a slot before it answers the slot (with zeros),
        so a refusal of this slot is on the board by the time its results are here."""
        if self.health is None:
            return
        counts = self.health.refusal_counts(micro_batch)
        seen, self._refusals[micro_batch] = self._refusals[micro_batch], counts
        if counts == seen:
            return
        ranks = self.deployment.topology.ffn_ranks
        refused = [
            self.health.ffn(ranks[i])
            for i, (a, b) in enumerate(zip(seen, counts, strict=True))
            if a != b
        ]
        reasons = "; ".join(f"FFN rank {h.rank}: {h.event}" for h in refused)
        raise AFDRefusedError(
            f"AFD: micro-batch slot {micro_batch} was refused, its results are zeros ({reasons})"
        )

    def rounds_for(self, tokens: int) -> int:
        """Rounds of M slots that `tokens` tokens need (at least one, even for none)."""
        capacity = self.deployment.micro_batches * self.deployment.layout.tokens
        return max(1, -(-tokens // capacity))

    def exchange(
        self,
        layer: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        rounds: int | None = None,
    ) -> torch.Tensor:
        """One MoE layer for all T tokens: `rounds` rounds of M slots, tokens spread evenly.

        Every round sends all M slots (empty ones too), so every attention rank sends the
        same sequence of (layer, slot) as long as all pass the same `rounds`: data-parallel
        ranks pass `rounds_for` of the largest T among them (default: this rank's own T).
        """
        check(
            self.idle(),
            "exchange",
            "no micro-batch in flight (use send/receive for pipelining)",
            "slots in flight",
        )
        if self._watch is not None:  # fail at once, before anything is written
            self._watch.check()
        m = self.deployment.micro_batches
        t = hidden.shape[0]
        needed = self.rounds_for(t)
        rounds = needed if rounds is None else rounds
        check(
            needed <= rounds <= MAX_ROUNDS,
            "rounds",
            f"[{needed}, {MAX_ROUNDS}] for {t} tokens",
            rounds,
        )
        slots = rounds * m
        per_slot = -(-t // slots)  # <= BS, since rounds >= needed
        out = torch.empty(t, hidden.shape[1], dtype=self.deployment.layout.dtype)
        bounds = [min(t, i * per_slot) for i in range(slots + 1)]
        refused: list[AFDRefusedError] = []  # raised once every slot is back

        def receive(j: int) -> None:
            try:
                out[bounds[j] : bounds[j + 1]] = self.receive(j % m)
            except AFDRefusedError as exc:  # the slot is back; any other error ends here
                refused.append(exc)

        for i in range(slots):
            if i >= m:
                receive(i - m)
            lo, hi = bounds[i], bounds[i + 1]
            self.send(i % m, layer, hidden[lo:hi], topk_ids[lo:hi], topk_weights[lo:hi])
        for j in range(max(0, slots - m), slots):
            receive(j)
        if refused:
            raise refused[0]
        return out

    def idle(self) -> bool:
        """Whether no slot is in flight (an exchange that raised midway leaves some)."""
        return all(p is None for p in self._in_flight)


class AFDMoELayer:
    """The MoE block of one layer on an attention rank: router here, experts elsewhere.

    [router] -> [dispatch: npu_attention_to_ffn] -> (experts on FFN ranks)
             -> [combine: npu_attention_worker_combine]
    Routed weights come out of the router already renormalised and scaled; the shared
    expert is added (unweighted, gated on the FFN side where the model gates it) by combine.
    """

    def __init__(self, endpoint: AttentionEndpoint, layer: int, router: RouterSpec) -> None:
        self.endpoint = endpoint
        self.layer = layer
        self.router = router

    def forward(
        self,
        hidden: torch.Tensor,
        router_logits: torch.Tensor | None = None,
        *,
        topk_ids: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        score_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if topk_ids is None or topk_weights is None:
            check(
                router_logits is not None,
                "router_logits",
                "a tensor, or topk_ids + topk_weights",
                None,
            )
            assert router_logits is not None
            topk_ids, topk_weights = route(router_logits, self.router, score_bias)
        return self.endpoint.exchange(self.layer, hidden, topk_ids, topk_weights.to(torch.float32))

    __call__ = forward
