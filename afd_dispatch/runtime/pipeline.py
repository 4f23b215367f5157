"""Micro-batch ping-pong: attention works on one micro-batch while FFN ranks serve another.

A decoder is a stack of layers, each `pre` (attention, norm, router) then MoE then `post`
(residual). With M micro-batches in flight the schedule is

    for layer l:  for slot m:  post(l-1, m) <- receive(m);  pre(l, m) -> send(m)

so while the FFN side serves (l, m), the attention side runs post(l-1, m+1) and
pre(l, m+1). M = 1 is the plain sequential model; M = 2 is ping-pong; M = 3 keeps one
more slot in the pipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import torch

from afd_dispatch.errors import check
from afd_dispatch.runtime.trace import Tracer

State = TypeVar("State")
State_contra = TypeVar("State_contra", contravariant=True)


class MoEEndpoint(Protocol):
    def send(
        self,
        micro_batch: int,
        layer: int,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> None: ...

    def receive(self, micro_batch: int) -> torch.Tensor: ...


class LayeredModel(Protocol[State_contra]):
    """A decoder split at its MoE blocks."""

    @property
    def moe_layers(self) -> Sequence[int]: ...

    def pre(
        self, layer: int, state: State_contra
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything since the previous MoE block (dense layers included) up to this one's
        experts: returns (MoE input, top-k ids, top-k weights)."""
        ...

    def post(self, layer: int, state: State_contra, moe_out: torch.Tensor) -> None:
        """Everything after the MoE block of `layer` (residual add, ...)."""
        ...


def run_pipelined(
    model: LayeredModel[State],
    endpoint: MoEEndpoint,
    states: Sequence[State],
    tracer: Tracer | None = None,
) -> None:
    """Run every MoE layer of `model` over the micro-batch `states`, M = len(states) in flight.

    With a tracer, the attention-side work gets "attention" (pre) and "post" spans.
    """
    check(len(states) >= 1, "states", "at least one micro-batch", len(states))
    trace = tracer or Tracer("attention", enabled=False)
    previous: int | None = None
    for layer in model.moe_layers:
        for m, state in enumerate(states):
            if previous is not None:
                out = endpoint.receive(m)
                with trace.span("post", previous, m):
                    model.post(previous, state, out)
            with trace.span("attention", layer, m):
                moe_input = model.pre(layer, state)
            endpoint.send(m, layer, *moe_input)
        previous = layer
    for m, state in enumerate(states):
        assert previous is not None
        out = endpoint.receive(m)
        with trace.span("post", previous, m):
            model.post(previous, state, out)
