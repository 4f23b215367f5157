"""`bench --level ops`: the four reference ops against `Tensor.copy_` of as many bytes.

Each op runs on in-process windows (A = 1, M = 1) at a decode-sized shape (BS = 512,
H = 7168, K = 8, one shared expert, 16 FFN ranks, bf16) or a small one, and is timed
alternately with a `copy_` of the bytes it moves (both buffers written beforehand, so the
copy reads real pages, not the shared zero page). The headline is the ratio of the two
rates (= copy time / op time): 1.0 means the op moves its bytes as fast as a plain copy.

Window state is put back between runs outside the timed region (flags written straight
through the window views), so no op ever waits: back-pressure and flag waits are the
loop level's business, not this one's. The last row is the cross-process wake-up latency
of a flag wait, with doorbells and with sleep-polling (`afd_dispatch.bench.wake`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from afd_dispatch.bench.report import Report, Row, Target, interleaved, median, torch_threads
from afd_dispatch.bench.wake import measure_wake
from afd_dispatch.kernels import reference as ref
from afd_dispatch.layout import FLAG_OFFSET, TOKEN_DTYPE_INT8, WindowLayout, token_dtype_code
from afd_dispatch.placement import build_expert_rank_table, local_experts
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import WindowGroup, create_window_group

_names = itertools.count()


@dataclass(frozen=True)
class OpsShape:
    """One op-level case: A = 1 attention rank, M = 1 micro-batch, every token active."""

    tokens: int  # BS
    hidden: int  # H
    topk: int  # K
    shared: int  # S
    ffn_ranks: int  # F
    experts: int  # routed experts, spread round-robin over the F ranks
    dtype: torch.dtype = torch.bfloat16


SHAPES = {
    "decode": OpsShape(tokens=512, hidden=7168, topk=8, shared=1, ffn_ranks=16, experts=256),
    "small": OpsShape(tokens=64, hidden=1024, topk=4, shared=1, ffn_ranks=4, experts=16),
}

# Rate targets, as a fraction of copy_'s rate for the same bytes.
TARGETS = {
    "a2f": 0.7,
    "a2f_quant": 0.35,
    "batching": 0.5,
    "batching_quant": 0.5,
    "f2a": 0.7,
    "combine": 0.5,
}


def bytes_moved(op: str, layout: WindowLayout, rows: int) -> int:
    """The bytes an op moves, the one definition every rate here uses.

    `rows` is the number of (token, slot) rows the call handles (n * E for A2F, all FFN
    ranks' gathered rows for batching, rows sent home for F2A; combine reads BS * E).

    - a2f / a2f_quant: rows written into FFN windows, n * E * HS * elem (int8 rows of
      H + 128 bytes with quant, so the quantized op moves about half the bytes);
    - batching / batching_quant: rows gathered out of the FFN windows, rows * HS * elem;
    - f2a: rows written into attention windows, rows * H * elem;
    - combine: rows read from the attention window, BS * E * H * elem.
    """
    if op in ("a2f", "a2f_quant", "batching", "batching_quant"):
        return rows * layout.attn_to_ffn_token_size
    if op in ("f2a", "combine"):
        return rows * layout.ffn_to_attn_token_size
    raise ValueError(f"unknown op {op!r}")


class OpsFixture:
    """One window group at `shape` and everything the four ops need to run on it."""

    def __init__(self, shape: OpsShape, quant: bool, seed: int = 0) -> None:
        self.shape = shape
        self.topology = RankTopology(num_attention_ranks=1, num_ffn_ranks=shape.ffn_ranks)
        self.layout = WindowLayout(
            1, 1, shape.tokens, shape.topk, shape.shared, shape.hidden, shape.dtype, quant
        )
        self.group: WindowGroup = create_window_group(
            f"afd-bench-ops-{next(_names)}", self.topology, self.layout, "inproc"
        )
        self.table = build_expert_rank_table(self.topology, shape.experts, shape.shared)
        gen = torch.Generator().manual_seed(seed)
        bs, k, h = shape.tokens, shape.topk, shape.hidden
        self.x = torch.randn(1, bs, h, generator=gen).to(shape.dtype)
        ids = torch.rand(bs, shape.experts, generator=gen).argsort(dim=1)[:, :k]
        self.ids = ids.to(torch.int32).unsqueeze(0).contiguous()
        weights = torch.rand(bs, k, generator=gen)
        self.weights = (weights / weights.sum(dim=1, keepdim=True)).contiguous()
        self.zero = torch.zeros(1, dtype=torch.int32)
        self.shapes = self.layout.op_shapes
        self.expert_num = {
            r: max(1, len(local_experts(self.table, r))) for r in self.topology.ffn_ranks
        }
        self.ffn_ctx = {
            r: ref.context_for(self.group, r, self.expert_num[r]) for r in self.topology.ffn_ranks
        }
        self.attn_rank = self.topology.attention_rank(0)
        self.attn_ctx = ref.context_for(self.group, self.attn_rank)
        self.attn_ranks = torch.tensor(self.topology.attention_ranks, dtype=torch.int32)
        self.batch_code = TOKEN_DTYPE_INT8 if quant else token_dtype_code(shape.dtype)
        self._info_snapshot: dict[int, torch.Tensor] = {}
        self._returns: dict[int, tuple[torch.Tensor, ...]] = {}

    @property
    def slot_rows(self) -> int:
        """n * E: every (token, slot) row of one micro-batch (all tokens are active)."""
        return self.shape.tokens * self.layout.slots

    def close(self) -> None:
        self.group.close()

    # -- A2F -------------------------------------------------------------------------------
    def free_ffn_flags(self) -> None:
        """As if every FFN rank had consumed the last message: A2F's back-pressure passes."""
        for r in self.topology.ffn_ranks:
            info, _ = self.group.ffn_views(r)
            info[:, :, FLAG_OFFSET] = 0

    def a2f(self) -> None:
        ref.npu_attention_to_ffn(
            self.x, self.zero, self.zero, self.zero, self.ids, self.table, self.group.name,
            self.topology.world_size, self.shapes["ffn_token_info_table_shape"],
            self.shapes["ffn_token_data_shape"], self.shapes["attn_token_info_table_shape"],
            self.shape.experts, quant_mode=2 if self.layout.quant else 0,
        )  # fmt: skip

    # -- batching --------------------------------------------------------------------------
    def snapshot_after_a2f(self) -> None:
        """Send once and keep every FFN info table as A2F left it (flags 1, ids set)."""
        self.free_ffn_flags()
        self.a2f()
        self._info_snapshot = {
            r: self.group.ffn_views(r)[0].clone() for r in self.topology.ffn_ranks
        }

    def restore_after_a2f(self) -> None:
        """Every FFN info table back to "message arrived" (batching consumed it)."""
        for r, saved in self._info_snapshot.items():
            self.group.ffn_views(r)[0].copy_(saved)

    def batching_one(self, rank: int) -> tuple[torch.Tensor, ...]:
        s = self.layout
        return tuple(
            ref.npu_ffn_worker_batching(
                self.ffn_ctx[rank].get_schedule_context_tensor(),
                self.expert_num[rank],
                [s.num_attention_ranks, s.tokens, s.slots, s.hidden],
                token_dtype=self.batch_code,
                need_schedule=1,
            )
        )

    def batching(self) -> None:
        for r in self.topology.ffn_ranks:
            self.batching_one(r)

    # -- F2A -------------------------------------------------------------------------------
    def prepare_returns(self, seed: int = 1) -> int:
        """Batch once on every rank and keep what F2A needs; returns the rows to send home."""
        self.restore_after_a2f()
        gen = torch.Generator().manual_seed(seed)
        total = 0
        for r in self.topology.ffn_ranks:
            y, _, sess, mbs, toks, offs, _, count = self.batching_one(r)
            out = torch.randn(y.shape[0], self.shape.hidden, generator=gen).to(self.shape.dtype)
            self._returns[r] = (out, sess, mbs, toks, offs, count)
            total += int(count[0])
        return total

    def f2a(self) -> None:
        for out, sess, mbs, toks, offs, count in self._returns.values():
            ref.npu_ffn_to_attention(
                out, sess, mbs, toks, offs, count, self.group.name, self.topology.world_size,
                self.shapes["token_info_table_shape"], self.shapes["token_data_shape"],
                attn_rank_table=self.attn_ranks,
            )  # fmt: skip

    def clear_attn_flags(self) -> None:
        self.group.attn_views(self.attn_rank)[0].zero_()

    # -- combine ---------------------------------------------------------------------------
    def set_attn_flags(self) -> None:
        """Every result of micro-batch 0 "arrived": combine does not wait."""
        self.group.attn_views(self.attn_rank)[0].fill_(1)

    def combine(self) -> None:
        ref.npu_attention_worker_combine(
            self.attn_ctx.get_schedule_context_tensor(), self.weights, self.zero,
            self.shape.hidden, token_dtype=token_dtype_code(self.shape.dtype), need_schedule=1,
        )  # fmt: skip


class CopyBaseline:
    """`dst.copy_(src)` of `nbytes`, both buffers written first (no zero-page reads)."""

    def __init__(self, nbytes: int) -> None:
        self.src = torch.empty(nbytes, dtype=torch.uint8).fill_(0x5A)
        self.dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)

    def __call__(self) -> None:
        self.dst.copy_(self.src)


def _nothing() -> None:
    return None


def measure(
    name: str,
    nbytes: int,
    setup: Callable[[], object],
    run: Callable[[], object],
    repeat: int,
    description: str,
) -> Row:
    """Op and copy_ of `nbytes`, alternately, `repeat` times each; medians; their ratio."""
    copy = CopyBaseline(nbytes)
    op_s, copy_s = interleaved([(setup, run), (_nothing, copy)], repeat)
    op_t, copy_t = median(op_s), median(copy_s)
    return Row(
        name=name,
        value=copy_t / op_t,
        unit="x",
        description=description,
        metrics={
            "MB": nbytes / 1e6,
            "op_ms": op_t * 1e3,
            "copy_ms": copy_t * 1e3,
            "op_GBps": nbytes / op_t / 1e9,
            "copy_GBps": nbytes / copy_t / 1e9,
        },
        target=Target(">=", TARGETS[name]),
    )


def run(shape_name: str, repeat: int) -> Report:
    """Every op at `shape_name`, one torch thread (as the FFN workers run)."""
    with torch_threads(1):
        return _run(SHAPES[shape_name], shape_name, repeat)


def _run(shape: OpsShape, shape_name: str, repeat: int) -> Report:
    report = Report("ops", shape_name, repeat)
    report.notes.append(
        f"BS={shape.tokens} H={shape.hidden} K={shape.topk} S={shape.shared} "
        f"F={shape.ffn_ranks} experts={shape.experts} A=1 M=1 {shape.dtype}; value = op rate "
        "/ copy_ rate of the same bytes (median of interleaved runs); one torch thread"
    )
    for quant in (False, True):
        fx = OpsFixture(shape, quant)
        try:
            suffix = "_quant" if quant else ""
            rows = fx.slot_rows
            report.add(
                measure(
                    "a2f" + suffix,
                    bytes_moved("a2f", fx.layout, rows),
                    fx.free_ffn_flags,
                    fx.a2f,
                    repeat,
                    "npu_attention_to_ffn, every token to K experts + shared"
                    + (", int8 quantized" if quant else ""),
                )
            )
            fx.snapshot_after_a2f()
            report.add(
                measure(
                    "batching" + suffix,
                    bytes_moved("batching", fx.layout, rows),
                    fx.restore_after_a2f,
                    fx.batching,
                    repeat,
                    f"npu_ffn_worker_batching on all {shape.ffn_ranks} FFN ranks in turn"
                    + (" (int8 rows)" if quant else ""),
                )
            )
            if quant:
                continue
            returned = fx.prepare_returns()
            report.add(
                measure(
                    "f2a",
                    bytes_moved("f2a", fx.layout, returned),
                    fx.clear_attn_flags,
                    fx.f2a,
                    repeat,
                    f"npu_ffn_to_attention from all {shape.ffn_ranks} FFN ranks in turn",
                )
            )
            report.add(
                measure(
                    "combine",
                    bytes_moved("combine", fx.layout, rows),
                    fx.set_attn_flags,
                    fx.combine,
                    repeat,
                    "npu_attention_worker_combine, K weighted + 1 shared row per token",
                )
            )
        finally:
            fx.close()
    report.add(measure_wake())
    return report
