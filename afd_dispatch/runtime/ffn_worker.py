"""The FFN side: poll the window, batch per local expert, run the experts, send back.

One `FFNWorker` serves one FFN rank through its `FFNLink`. Its loop is

    link.collect(slot)   (waits for all A attention ranks of the slot: npu_ffn_worker_batching)
      -> grouped expert MLPs of that slot's layer
      -> link.give_back  (each row straight home: npu_ffn_to_attention)

Waiting sleeps with back-off (see `afd_dispatch.windows.wait`), so an idle worker costs
no core. A restarted worker resumes at the slot its predecessor was collecting
(`FFNLink.resume_slot`).

A micro-batch the worker cannot serve (a layer it hosts no experts of, a failing expert
kernel) is answered with zeros and reported, on the health board and in the log: the
attention side's receive completes, sees the report and fails that exchange with the
reason, and the loop goes on with the next slot. A failure of the link itself (collect or
give back) ends `run` with the error, reported first: the actor's process then exits and
Ray restarts it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from afd_dispatch.errors import AFDBadMicroBatchError, AFDTimeoutError, check
from afd_dispatch.link import Batch, FFNLink, ffn_link
from afd_dispatch.runtime.checkpoint import (
    SharedExpertWeights,
    load_routed_experts,
    load_shared_expert,
)
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.experts import ExpertBank, run_groups
from afd_dispatch.runtime.health import HealthBoard
from afd_dispatch.runtime.trace import Tracer
from afd_dispatch.windows import ScheduleStopped

log = logging.getLogger(__name__)


def load_banks(
    path: str | os.PathLike[str],
    deployment: Deployment,
    rank: int,
    batch_invariant: bool = False,
) -> dict[int, ExpertBank]:
    """The experts FFN `rank` hosts, every MoE layer, read from the model's safetensors."""
    spec = deployment.spec
    hosted = deployment.hosted(rank).values()
    routed_ids = sorted(g for g in hosted if g < spec.num_experts)
    shared_ids = sorted(g - spec.num_experts for g in hosted if g >= spec.num_experts)
    banks = {}
    for layer in spec.moe_layers:
        routed = load_routed_experts(path, spec, layer, routed_ids, deployment.dtype)
        shared = {}
        if shared_ids and deployment.null_shared_slot:
            shared = {j: null_expert(spec.hidden_size, deployment.dtype) for j in shared_ids}
        elif shared_ids:
            weights = load_shared_expert(path, spec, layer, deployment.dtype)
            check(weights is not None, "checkpoint", f"a shared expert for layer {layer}", path)
            assert weights is not None
            shared = {j: weights for j in shared_ids}
        banks[layer] = ExpertBank(spec.num_experts, routed, shared, batch_invariant)
    return banks


def null_expert(hidden: int, dtype: torch.dtype) -> SharedExpertWeights:
    """An expert whose output is exactly zero (intermediate size 1, zero weights): the
    shared slot A3's combine needs where the model, or the FFN side, has no shared expert."""
    zeros = torch.zeros(1, hidden, dtype=dtype)
    return SharedExpertWeights(zeros, zeros.clone(), torch.zeros(hidden, 1, dtype=dtype))


class FFNWorker:
    """FFN rank `rank` of `deployment`, hosting `banks` (its experts, per MoE layer).

    `link`: its end of the AFD link (default: the one the deployment's config selects;
    `ops` is passed to it, e.g. a timed wrapper of the reference ops). `health`: the
    deployment's health board, where refused micro-batches are reported.
    """

    def __init__(
        self,
        deployment: Deployment,
        rank: int,
        banks: Mapping[int, ExpertBank],
        ops: Any = None,
        tracer: Tracer | None = None,
        link: FFNLink | None = None,
        health: HealthBoard | None = None,
    ) -> None:
        check(deployment.topology.is_ffn(rank), "rank", "an FFN rank", rank)
        self.health = health
        self.deployment = deployment
        self.rank = rank
        self.banks = banks
        self.tracer = tracer or Tracer(f"FFN {rank}", enabled=deployment.config.trace)
        hosted = deployment.hosted(rank)
        self.hosted = [hosted[i] for i in range(len(hosted))]  # local id -> global row
        self.link = link if link is not None else ffn_link(deployment, rank, ops)
        # A predecessor died while collecting or before giving a slot back: `pending` first
        # puts back what it consumed, or hands over what it collected, to redo first.
        self._pending = self.link.pending()
        if self._pending is None:
            self._cursor = self.link.resume_slot()
        else:
            self._cursor = self._pending[0]
            log.warning("FFN rank %d redoes micro-batch slot %d", rank, self._cursor)
        layout = deployment.layout
        self._out = torch.zeros(
            layout.num_attention_ranks * layout.tokens * layout.slots,
            layout.hidden,
            dtype=layout.dtype,
            device=self.link.device,
        )
        self._stop = threading.Event()

    def serve_one(self) -> int:
        """Serve the next micro-batch slot; return the rows served. Raises on timeout."""
        micro_batch = self._cursor
        # The "batch" span (waiting included) is recorded once the window has named its
        # layer; a wait that ends without a batch (deadline, stop) is recorded as layer -1.
        batch_start = time.monotonic_ns()
        try:
            if self._pending is not None:
                batch, self._pending = self._pending[1], None
            else:
                batch = self.link.collect(micro_batch)
        except AFDBadMicroBatchError as exc:  # a bad micro-batch, not a bad worker: answer
            self.tracer.record("batch", batch_start, time.monotonic_ns(), -1, micro_batch)
            self._report_refusal(-1, micro_batch, exc)
            self.link.refuse(micro_batch)
            self._cursor = (micro_batch + 1) % len(self.deployment.channels)
            return 0
        except BaseException:
            self.tracer.record("batch", batch_start, time.monotonic_ns(), -1, micro_batch)
            raise
        self._cursor = (micro_batch + 1) % len(self.deployment.channels)
        layer = batch.layer
        self.tracer.record("batch", batch_start, time.monotonic_ns(), layer, micro_batch)
        if batch.count == 0:  # no session routed a token here: nothing to run or send
            self.tracer.count("micro_batches_served_total")
            return 0
        n = batch.count
        try:
            with self.tracer.span("experts", layer, micro_batch):
                self._out[:n] = self._experts(batch)
        except Exception as exc:  # this message is bad, not the worker: answer, report, go on
            self._report_refusal(layer, micro_batch, exc)
            self._out[:n] = 0
        with self.tracer.span("return", layer, micro_batch):
            self.link.give_back(micro_batch, batch, self._out)
        self.tracer.count("rows_served_total", n)
        self.tracer.count("micro_batches_served_total")
        return n

    def _report_refusal(self, layer: int, micro_batch: int, exc: Exception) -> None:
        """Log and count a micro-batch this rank answers with zeros (`layer` -1: its
        layer ids were refused), and put it on the health board before the answer goes
        out, so the attention side finds it there when the zeros arrive."""
        reason = f"{type(exc).__name__}: {exc}"
        what = f"layer {layer}, micro-batch slot" if layer >= 0 else "micro-batch slot"
        log.error("FFN rank %d refuses %s %d: %s", self.rank, what, micro_batch, reason)
        if self.health is not None:
            self.health.report_refusal(self.rank, layer, micro_batch, reason)
        self.tracer.count("micro_batches_refused_total")

    def _experts(self, batch: Batch) -> torch.Tensor:
        bank = self.banks.get(batch.layer)
        check(
            bank is not None,
            "layer id from the window",
            f"a MoE layer of {sorted(self.banks)}",
            batch.layer,
        )
        assert bank is not None
        dtype = self.deployment.layout.dtype
        return run_groups(bank, batch.rows, batch.group_list, self.hosted, dtype)

    def run(self) -> None:
        """Serve until `stop()`; an idle deadline just means no traffic yet. Any other error
        is reported (health board, log) and raised: the link is in an unknown state."""
        # The process's torch thread count, for this thread too: BLAS and OpenMP keep it per
        # thread, and a thread that never set it runs each matmul on one thread per core,
        # whatever `torch.get_num_threads()` reports (torch 2.13: on a 2-core host, twice
        # the CPU for the experts, a helper thread spinning between matmuls).
        torch.set_num_threads(torch.get_num_threads())
        while not self._stop.is_set():
            try:
                self.serve_one()
            except AFDTimeoutError as exc:
                log.debug("FFN rank %d idle: %s", self.rank, exc)
            except ScheduleStopped:
                break
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.error("FFN rank %d: its link failed: %s", self.rank, reason)
                if self.health is not None:
                    self.health.report_link_failure(self.rank, reason)
                raise

    def stop(self) -> None:
        """End `run()`: wake a wait in progress (`FFNLink.stop`)."""
        self._stop.set()
        self.link.stop()
