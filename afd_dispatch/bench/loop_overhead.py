"""`bench --level loop`, case (a): the attention endpoint's host time per (layer,
micro-batch) beyond the op calls it makes, with an FFN worker thread and without one."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from afd_dispatch.bench.loop_shapes import (
    JOIN_TIMEOUT_S,
    TINY,
    config_for,
    make_banks,
    routing,
)
from afd_dispatch.bench.report import Row, Target, median, timed
from afd_dispatch.kernels import reference as ref
from afd_dispatch.layout import FLAG_OFFSET
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.ffn_worker import FFNWorker
from afd_dispatch.windows import get_window_group

OVERHEAD_TARGET_US = 50.0


# The reference link waits for a micro-batch's results (as combine would) before combine
# clears their flags; that wait is the op's, not the endpoint's
WAIT = "wait_for_next_results"


class TimedOps(types.ModuleType):
    """A backend module whose chosen ops add the seconds spent inside them to
    `seconds[op name]`."""

    def __init__(self, inner: types.ModuleType, timed_ops: Sequence[str]) -> None:
        super().__init__(f"{inner.__name__}.timed")
        self.seconds = dict.fromkeys(timed_ops, 0.0)
        for name in dir(inner):
            if not name.startswith("__"):
                setattr(self, name, getattr(inner, name))
        for name in timed_ops:
            setattr(self, name, self._timed(name, getattr(inner, name)))

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return call

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


# -- (a) host overhead of the endpoint -------------------------------------------------------
def solo_overhead(repeat: int, micro_batches: int = 2) -> float:
    """Seconds of host time per (layer, micro-batch) of send + receive with no FFN side:
    the window flags are written directly between the calls (untimed), so no op waits and
    no other thread competes for the GIL. The floor under `endpoint_overhead`."""
    shape = TINY
    dep = Deployment(config_for(shape, micro_batches, shape.tokens), shape.spec(), torch.float32)
    groups = dep.create_windows("inproc")
    try:
        ops = TimedOps(ref, ("npu_attention_to_ffn", "npu_attention_worker_combine", WAIT))
        endpoint = AttentionEndpoint(dep, 0, ops=ops)
        ffn_rank = dep.topology.ffn_ranks[0]
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(shape.tokens, shape.hidden, generator=gen)
        ids, weights = routing(shape.tokens, shape, seed=1)
        pairs = shape.layers * micro_batches
        samples = []
        for i in range(2 + repeat):
            ops.reset()
            host = 0.0
            for layer in range(shape.layers):
                for m, channel in enumerate(dep.channels):
                    group = get_window_group(channel.group)
                    group.ffn_views(ffn_rank)[0][0, channel.window_micro_batch, FLAG_OFFSET] = 0
                    t0 = time.perf_counter()
                    endpoint.send(m, layer, hidden, ids, weights)
                    t1 = time.perf_counter()
                    group.attn_views(endpoint.rank)[0][channel.window_micro_batch] = 1
                    t2 = time.perf_counter()
                    endpoint.receive(m)
                    host += (t1 - t0) + (time.perf_counter() - t2)
            if i >= 2:
                samples.append((host - sum(ops.seconds.values())) / pairs)
        return median(samples)
    finally:
        for g in groups:
            g.close()


def endpoint_overhead(repeat: int, micro_batches: int = 2) -> list[Row]:
    shape = TINY
    cfg = config_for(shape, micro_batches, shape.tokens)
    dep = Deployment(cfg, shape.spec(), torch.float32)
    groups = dep.create_windows("inproc")
    worker = FFNWorker(dep, dep.topology.ffn_ranks[0], make_banks(shape), ops=ref)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            worker.run()
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    thread = threading.Thread(target=serve, name="afd-bench-ffn", daemon=True)
    thread.start()
    try:
        a2f, combine = "npu_attention_to_ffn", "npu_attention_worker_combine"
        ops = TimedOps(ref, (a2f, combine, WAIT))
        endpoint = AttentionEndpoint(dep, 0, ops=ops)
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(shape.tokens, shape.hidden, generator=gen)
        ids, weights = routing(shape.tokens, shape, seed=1)
        pairs_per_round = shape.layers * micro_batches
        wide = torch.randn(shape.tokens * micro_batches, shape.hidden, generator=gen)
        wide_ids, wide_weights = routing(wide.shape[0], shape, seed=2)

        def pairs() -> tuple[float, float]:
            """(seconds in send, seconds in receive) of one round."""
            in_send = in_receive = 0.0
            for layer in range(shape.layers):
                for m in range(micro_batches):
                    t0 = time.perf_counter()
                    endpoint.send(m, layer, hidden, ids, weights)
                    t1 = time.perf_counter()
                    endpoint.receive(m)
                    in_receive += time.perf_counter() - t1
                    in_send += t1 - t0
            return in_send, in_receive

        def exchanges() -> None:
            for layer in range(shape.layers):
                endpoint.exchange(layer, wide, wide_ids, wide_weights)

        send_over, receive_over, walls, inside = [], [], [], []
        x_over, x_walls = [], []
        for i in range(2 + repeat):  # two warm-up rounds: first-call paths, back-off state
            ops.reset()
            in_send, in_receive = pairs()
            sent, combined = ops.seconds[a2f], ops.seconds[combine] + ops.seconds[WAIT]
            if i >= 2:
                send_over.append((in_send - sent) / pairs_per_round)
                receive_over.append((in_receive - combined) / pairs_per_round)
                walls.append((in_send + in_receive) / pairs_per_round)
                inside.append((sent + combined) / pairs_per_round)
            ops.reset()
            wall = timed(exchanges)
            if i >= 2:
                x_walls.append(wall / pairs_per_round)
                x_over.append((wall - sum(ops.seconds.values())) / pairs_per_round)
        if failure:
            raise failure[0]
    finally:
        worker.stop()
        thread.join(JOIN_TIMEOUT_S)
        for g in groups:
            g.close()
    where = (
        f"(H={shape.hidden}, BS={shape.tokens}, K={shape.topk}, M={micro_batches}, "
        "FFN worker thread)"
    )
    total = [a + b for a, b in zip(send_over, receive_over, strict=True)]
    return [
        Row(
            name="endpoint_overhead",
            value=median(total) * 1e6,
            unit="us",
            description="host time per (layer, micro-batch) of send(m) + receive(m) beyond "
            f"the A2F and combine calls they make {where}; no_ffn: the same with no FFN "
            "thread (flags written directly), i.e. without GIL contention",
            metrics={
                "send_us": median(send_over) * 1e6,
                "receive_us": median(receive_over) * 1e6,
                "wall_us": median(walls) * 1e6,
                "in_ops_us": median(inside) * 1e6,
                "no_ffn_us": solo_overhead(repeat, micro_batches) * 1e6,
            },
            target=Target("<=", OVERHEAD_TARGET_US),
        ),
        Row(
            name="exchange_overhead",
            value=median(x_over) * 1e6,
            unit="us",
            description=f"the same for exchange() of {micro_batches} slots (what the vLLM "
            f"plugin calls) {where}",
            metrics={"wall_us": median(x_walls) * 1e6},
        ),
    ]
