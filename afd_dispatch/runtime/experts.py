"""The expert MLPs an FFN rank runs: SwiGLU routed experts and the (gated) shared expert.

`batch_invariant=True` makes each row's result independent of which other rows share its
batch: the MLP runs over fixed tiles of `TILE_ROWS` rows, one call per tile, so every
kernel, its blocking and its thread split are the same whatever the batch. That is what
lets an AFD deployment (which groups tokens of many attention ranks per expert) reproduce a
colocated run bit for bit; plain matmuls pick different kernels for different row counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from afd_dispatch.errors import check
from afd_dispatch.runtime.checkpoint import ExpertWeights, SharedExpertWeights

TILE_ROWS = 16


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn applied to fixed tiles of TILE_ROWS rows (zero-padded), one call per tile.

    Every matmul and element-wise kernel then sees the same shapes whatever the batch, so
    a row's result depends on that row alone (element-wise kernels also switch between
    vector and scalar code with the tensor's length).
    """
    n = x.shape[0]
    if n == 0:  # no tile at all (an empty micro-batch): nothing to make invariant
        return fn(x)
    pad = (-n) % TILE_ROWS
    if pad:
        padded = x.new_zeros(n + pad, *x.shape[1:])
        padded[:n] = x
        x = padded
    if x.shape[0] == TILE_ROWS:  # one tile (decode's usual group): no list, no cat
        return fn(x)[:n]
    return torch.cat([fn(x[i : i + TILE_ROWS]) for i in range(0, x.shape[0], TILE_ROWS)])[:n]


def swiglu(x: torch.Tensor, w: ExpertWeights, batch_invariant: bool = False) -> torch.Tensor:
    if batch_invariant:
        return tiled(lambda t: swiglu(t, w), x)
    return (F.silu(x @ w.gate.T) * (x @ w.up.T)) @ w.down.T


def shared_expert(
    x: torch.Tensor, w: SharedExpertWeights, batch_invariant: bool = False
) -> torch.Tensor:
    """The shared expert; Qwen2-MoE scales it by sigmoid(gate . x), a per-token scalar."""
    if batch_invariant:
        return tiled(lambda t: shared_expert(t, w), x)
    out = swiglu(x, w)
    if w.gate_weight is not None:
        out = torch.sigmoid(x @ w.gate_weight.T) * out
    return out


@dataclass
class ExpertBank:
    """The experts one FFN rank hosts for one layer, by global expert row.

    Rows < num_experts are routed experts; row num_experts + j is shared expert j.
    """

    num_experts: int
    routed: Mapping[int, ExpertWeights] = field(default_factory=dict)
    shared: Mapping[int, SharedExpertWeights] = field(default_factory=dict)
    batch_invariant: bool = False

    def apply(self, row: int, x: torch.Tensor) -> torch.Tensor:
        if row < self.num_experts:
            routed = self.routed.get(row)
            if routed is None:
                check(False, "expert row", f"one of the hosted {sorted(self.routed)}", row)
            assert routed is not None
            return swiglu(x, routed, self.batch_invariant)
        shared = self.shared.get(row - self.num_experts)
        if shared is None:
            check(False, "shared expert row", f"one of the hosted {sorted(self.shared)}", row)
        assert shared is not None
        return shared_expert(x, shared, self.batch_invariant)

    @property
    def dtype(self) -> torch.dtype:
        some = next(iter(self.routed.values()), None) or next(iter(self.shared.values()))
        return some.down.dtype


def run_groups(
    bank: ExpertBank,
    rows: torch.Tensor,
    group_list: torch.Tensor,
    hosted: Sequence[int] | Mapping[int, int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Apply each local expert to its contiguous group of rows (batching's output order).

    `group_list` holds (local id, count) pairs then zeros; `hosted[local id]` is the global
    expert row. Returns (n, H) rows in `out_dtype`, n = the rows covered by the groups.
    """
    pairs = group_list.tolist()
    n = sum(count for _, count in pairs)
    out = torch.empty(n, rows.shape[1], dtype=out_dtype)
    start = 0
    compute = bank.dtype
    for local, count in pairs:
        if count == 0:
            continue
        segment = rows[start : start + count].to(compute)
        out[start : start + count] = bank.apply(hosted[local], segment).to(out_dtype)
        start += count
    return out
