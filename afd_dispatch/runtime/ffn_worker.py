"""The FFN side: poll the window, batch per local expert, run the experts, send back.

One `FFNWorker` serves one FFN rank. Its loop is

    batching (waits for all A sessions of the next micro-batch)
      -> grouped expert MLPs of that micro-batch's layer
      -> npu_ffn_to_attention (each row straight home)

Waiting sleeps with back-off (see `afd_dispatch.windows.wait`), so an idle worker costs
no core. Its schedule contexts live beside its windows, so a restarted worker resumes at
the micro-batch its predecessor was polling.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from types import ModuleType

import torch

from afd_dispatch.errors import AFDTimeoutError, check
from afd_dispatch.kernels import load_backend
from afd_dispatch.kernels.reference.quant import dequantize_rows
from afd_dispatch.kernels.reference.schedule_context import batched_micro_batches
from afd_dispatch.layout import TOKEN_DTYPE_INT8, token_dtype_code
from afd_dispatch.runtime.checkpoint import load_routed_experts, load_shared_expert
from afd_dispatch.runtime.contexts import rank_contexts
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.experts import ExpertBank, run_groups
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
        if shared_ids:
            weights = load_shared_expert(path, spec, layer, deployment.dtype)
            check(weights is not None, "checkpoint", f"a shared expert for layer {layer}", path)
            assert weights is not None
            shared = {j: weights for j in shared_ids}
        banks[layer] = ExpertBank(spec.num_experts, routed, shared, batch_invariant)
    return banks


class FFNWorker:
    def __init__(
        self,
        deployment: Deployment,
        rank: int,
        banks: Mapping[int, ExpertBank],
        ops: ModuleType | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        check(deployment.topology.is_ffn(rank), "rank", "an FFN rank", rank)
        self.deployment = deployment
        self.rank = rank
        self.banks = banks
        self.ops = ops if ops is not None else load_backend(deployment.config.backend)
        self.tracer = tracer or Tracer(f"FFN {rank}", enabled=deployment.config.trace)
        hosted = deployment.hosted(rank)
        self.hosted = [hosted[i] for i in range(len(hosted))]  # local id -> global row
        self.expert_num = max(1, len(self.hosted))
        self._contexts = rank_contexts(deployment, self.ops, rank, self.expert_num, persistent=True)
        self._sources = [self._contexts[c.group] for c in deployment.channels]
        self._cursor = self._resume_position()
        layout = deployment.layout
        self._max_out = [layout.sessions, layout.tokens, layout.slots, layout.hidden]
        self._token_dtype = TOKEN_DTYPE_INT8 if layout.quant else token_dtype_code(layout.dtype)
        self._out = torch.zeros(
            layout.sessions * layout.tokens * layout.slots, layout.hidden, dtype=layout.dtype
        )
        self._attn_ranks = torch.tensor(deployment.topology.attention_ranks, dtype=torch.int32)
        self._shapes = layout.op_shapes
        self._stop = threading.Event()

    def _resume_position(self) -> int:
        """The slot to serve first: 0 on fresh windows, else where a predecessor stopped.

        Slots are served cyclically, so the micro-batches batched so far on this rank's
        (persistent) contexts, summed over the window groups, give the next slot. With
        one shared group that is its polling index; with a group per micro-batch each
        group's polling index is always 0, and only the count tells which group is next.
        """
        served = sum(
            batched_micro_batches(holder.get_schedule_context_tensor())
            for holder in self._contexts.values()
        )
        return served % len(self._sources)

    def serve_one(self) -> int:
        """Serve the next micro-batch slot; return the rows served. Raises on timeout."""
        micro_batch = self._cursor
        channel = self.deployment.channels[micro_batch]
        ctx = self._sources[micro_batch].get_schedule_context_tensor()
        layout = self.deployment.layout
        # The "batch" span (waiting included) is recorded once the window has named its
        # layer; a wait that ends without a batch (deadline, stop) is recorded as layer -1.
        batch_start = time.monotonic_ns()
        try:
            y, groups, sessions, mbs, tokens, offsets, scales, count = (
                self.ops.npu_ffn_worker_batching(
                    ctx,
                    self.expert_num,
                    self._max_out,
                    token_dtype=self._token_dtype,
                    need_schedule=1,
                )
            )
        except BaseException:
            self.tracer.record("batch", batch_start, time.monotonic_ns(), -1, micro_batch)
            raise
        batch_end = time.monotonic_ns()
        self._cursor = (micro_batch + 1) % len(self._sources)
        layer = int(self.ops.last_batched_layer(ctx))
        self.tracer.record("batch", batch_start, batch_end, layer, micro_batch)
        bank = self.banks.get(layer)
        check(
            bank is not None,
            "layer id from the window",
            f"a MoE layer of {sorted(self.banks)}",
            layer,
        )
        assert bank is not None
        n = int(count[0])
        rows = dequantize_rows(y[:n], scales[:n]) if layout.quant else y[:n]
        with self.tracer.span("experts", layer, micro_batch):
            self._out[:n] = run_groups(bank, rows, groups, self.hosted, layout.dtype)
        with self.tracer.span("return", layer, micro_batch):
            self.ops.npu_ffn_to_attention(
                self._out, sessions, mbs, tokens, offsets, count, channel.group,
                self.deployment.topology.world_size, self._shapes["token_info_table_shape"],
                self._shapes["token_data_shape"], attn_rank_table=self._attn_ranks,
            )  # fmt: skip
        self.tracer.count("rows_served_total", n)
        self.tracer.count("micro_batches_served_total")
        return n

    def run(self) -> None:
        """Serve until `stop()`; an idle deadline just means no traffic yet."""
        while not self._stop.is_set():
            try:
                self.serve_one()
            except AFDTimeoutError as exc:
                log.debug("FFN rank %d idle: %s", self.rank, exc)
            except ScheduleStopped:
                break

    def stop(self) -> None:
        """End `run()`: wake a wait in progress through the contexts' run flag."""
        self._stop.set()
        for holder in self._contexts.values():
            holder.stop_schedule()
