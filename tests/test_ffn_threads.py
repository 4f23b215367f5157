"""An FFN worker's serving thread runs its experts on the process's torch thread count.

BLAS and OpenMP keep that count per thread: a thread that never set it runs each matmul
on one thread per core, whatever `torch.get_num_threads()` reports, and the helper thread
that appears for it spins between matmuls (on a 2-core host it took the core the other
processes of a deployment needed). Checked in a fresh spawned process, where no earlier
test has started helper threads: serving must add exactly the serving thread.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import torch
from afd_threads import config, deployment, ffn_workers

from afd_dispatch.bench.loop_shapes import MoEShape, make_banks, routing
from afd_dispatch.runtime.attention import AttentionEndpoint

SHAPE = MoEShape(hidden=128, tokens=8, topk=2, experts=4, intermediate=64, layers=1)
EXCHANGES = 20
CHILD_TIMEOUT_S = 120


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _serve(out: mp.Queue) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(1)
    banks = make_banks(SHAPE)
    cfg = config(1, 1, micro_batch_num=1, max_tokens_per_micro_batch=SHAPE.tokens)
    x = torch.randn(SHAPE.tokens, SHAPE.hidden)
    ids, weights = routing(SHAPE.tokens, SHAPE, seed=1)
    with deployment(cfg, SHAPE.spec(), torch.float32) as dep:
        endpoint = AttentionEndpoint(dep, 0)
        before = _threads()
        with ffn_workers(dep, lambda rank: banks):
            for _ in range(EXCHANGES):
                endpoint.exchange(0, x, ids, weights)
            serving = _threads()
    out.put((torch.get_num_threads(), before, serving))


def test_serving_adds_only_the_serving_thread() -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_serve, args=(out,))
    child.start()
    try:
        threads, before, serving = out.get(timeout=CHILD_TIMEOUT_S)
    finally:
        child.join(CHILD_TIMEOUT_S)
    assert child.exitcode == 0
    assert threads == 1
    assert serving == before + 1, f"{serving - before - 1} helper thread(s) besides the FFN's"
