"""The op family's input contract, checked before anything is written.

Both backends call these functions first: the reference because it must never write half a
message, the NPU backend because the hardware op would hang or corrupt memory instead of
failing. Each returns the facts the op needs (layout, topology, scalars), so the checks and
the kernels cannot disagree about shapes.

`values=False` skips the checks that read tensor contents (ids in range, mask prefix): on
A3 those cost a device-to-host copy per call.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from afd_dispatch.contract_cache import a2f_structures, structure_key, validated_table
from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.layout import (
    MAX_TOKENS_PER_MICRO_BATCH,
    MAX_TOPK,
    QUANT_INT8,
    QUANT_MODES,
    QUANT_SCALE_BYTES,
    TOKEN_DTYPE_BF16,
    TOKEN_DTYPE_FP16,
    TOKEN_DTYPE_FP32,
    TOKEN_DTYPE_INT8,
    TOKEN_DTYPES,
    WindowLayout,
)
from afd_dispatch.topology import RankTopology

_INT_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1
MAX_COMBINE_TOPK = 64  # expert_scales' K in the combine kernel's tiling
BATCHING_TOKEN_DTYPES = (TOKEN_DTYPE_FP16, TOKEN_DTYPE_BF16, TOKEN_DTYPE_INT8, TOKEN_DTYPE_FP32)
COMBINE_TOKEN_DTYPES = (TOKEN_DTYPE_FP16, TOKEN_DTYPE_BF16, TOKEN_DTYPE_FP32)


@dataclass(frozen=True)
class AttentionToFfnCall:
    layout: WindowLayout
    topology: RankTopology
    session: int
    micro_batch: int
    layer: int
    active_tokens: int
    moe_expert_num: int
    quant_mode: int
    sync_flag: int


@dataclass(frozen=True)
class FfnToAttentionCall:
    micro_batches: int
    tokens: int
    slots: int
    hidden: int
    rows: int  # actual_token_num


def check_attention_to_ffn(
    x: torch.Tensor,
    session_id: torch.Tensor,
    micro_batch_id: torch.Tensor,
    layer_id: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_rank_table: torch.Tensor,
    world_size: int,
    ffn_token_info_table_shape: Sequence[int],
    ffn_token_data_shape: Sequence[int],
    attn_token_info_table_shape: Sequence[int],
    moe_expert_num: int,
    scales: torch.Tensor | None,
    active_mask: torch.Tensor | None,
    quant_mode: int,
    sync_flag: int,
    ffn_start_rank_id: int,
    values: bool = True,
) -> AttentionToFfnCall:
    """Check a `npu_attention_to_ffn` call; return what it describes. Raises
    `AFDInputError` naming the argument. The checks of types, shapes and the table are
    done once per distinct call structure (`structure_key`); with `values`, the values
    (session, micro-batch and layer ids, the mask, the expert ids) on every call."""
    args = (
        x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, world_size,
        ffn_token_info_table_shape, ffn_token_data_shape, attn_token_info_table_shape,
        moe_expert_num, scales, active_mask, quant_mode, sync_flag, ffn_start_rank_id,
    )  # fmt: skip
    key = structure_key(*args)
    hit = a2f_structures.get(key) if key is not None else None
    if hit is not None and hit[0]() is expert_rank_table:
        layout, topology = hit[1], hit[2]
    else:  # the structural checks, in the order their errors are reported
        bs = _check_x(x, quant_mode, sync_flag, moe_expert_num)
        for name, t in (
            ("session_id", session_id),
            ("micro_batch_id", micro_batch_id),
            ("layer_id", layer_id),
        ):
            _scalar(t, name)
        topk = _check_expert_ids(expert_ids, bs, moe_expert_num)
        shapes = (ffn_token_info_table_shape, ffn_token_data_shape, attn_token_info_table_shape)
        layout, topology = _window_layout(
            x, topk, quant_mode, shapes, expert_rank_table, world_size, moe_expert_num,
            ffn_start_rank_id,
        )  # fmt: skip
        _check_scales_and_mask(scales, active_mask, quant_mode, moe_expert_num, layout)
        if key is not None:
            if len(a2f_structures) > 64:
                a2f_structures.clear()
            a2f_structures[key] = (weakref.ref(expert_rank_table), layout, topology)
    session = micro_batch = layer = 0
    bs = layout.tokens
    active = bs
    if values:
        session = _scalar_value(session_id, "session_id", 0, layout.num_attention_ranks)
        micro_batch = _scalar_value(micro_batch_id, "micro_batch_id", 0, layout.micro_batches)
        layer = _scalar_value(layer_id, "layer_id", 0, INT32_MAX)
        if active_mask is not None:
            active = mask_prefix_length(active_mask[0])
        ids = expert_ids[0, :active]
        if ids.numel():
            lo, hi = _min_max(ids)
            check(
                lo >= 0 and hi < moe_expert_num,
                "expert_ids",
                f"ids in [0, moe_expert_num={moe_expert_num}) for active tokens",
                f"min {lo}, max {hi}",
            )
    return AttentionToFfnCall(
        layout, topology, session, micro_batch, layer, active, moe_expert_num, quant_mode, sync_flag
    )


def _check_x(x: torch.Tensor, quant_mode: int, sync_flag: int, moe_expert_num: int) -> int:
    """Check A2F's x (1, BS, H) and its plain integer arguments; return BS."""
    _tensor(x, "x")
    check(x.dim() == 3 and x.shape[0] == 1, "x.shape", "(1, BS, H)", tuple(x.shape))
    check(x.dtype in TOKEN_DTYPES, "x.dtype", "float16, bfloat16 or float32", x.dtype)
    bs, hidden = int(x.shape[1]), int(x.shape[2])
    check(
        0 < bs <= MAX_TOKENS_PER_MICRO_BATCH,
        "x.shape[1] (BS)",
        f"0 < BS <= {MAX_TOKENS_PER_MICRO_BATCH}",
        bs,
    )
    check(hidden >= 1, "x.shape[2] (H)", ">= 1", hidden)
    check(quant_mode in QUANT_MODES, "quant_mode", f"one of {list(QUANT_MODES)}", quant_mode)
    if quant_mode == QUANT_INT8:
        check(hidden % 32 == 0, "x.shape[2] (H)", "a multiple of 32 when quant_mode == 2", hidden)
    check(sync_flag in (0, 1), "sync_flag", "0 or 1", sync_flag)
    check(moe_expert_num >= 1, "moe_expert_num", ">= 1", moe_expert_num)
    return bs


def _check_expert_ids(expert_ids: torch.Tensor, bs: int, moe_expert_num: int) -> int:
    """Check A2F's expert_ids (1, BS, K) int32/int64 (types and shape); return K."""
    _tensor(expert_ids, "expert_ids")
    check(expert_ids.dtype in _INT_DTYPES, "expert_ids.dtype", "int32 or int64", expert_ids.dtype)
    check(
        expert_ids.dim() == 3 and expert_ids.shape[:2] == (1, bs),
        "expert_ids.shape",
        f"(1, BS={bs}, K)",
        tuple(expert_ids.shape),
    )
    topk = int(expert_ids.shape[2])
    check(
        0 < topk <= min(MAX_TOPK, moe_expert_num),
        "expert_ids.shape[2] (K)",
        f"0 < K <= min({MAX_TOPK}, moe_expert_num={moe_expert_num})",
        topk,
    )
    return topk


def _window_layout(
    x: torch.Tensor,
    topk: int,
    quant_mode: int,
    shapes: tuple[Sequence[int], Sequence[int], Sequence[int]],
    expert_rank_table: torch.Tensor,
    world_size: int,
    moe_expert_num: int,
    ffn_start_rank_id: int,
) -> tuple[WindowLayout, RankTopology]:
    """The layout and topology an A2F call describes, from its (already checked) x and K,
    its three table shapes (ffn info, ffn data, attention info) and its expert table;
    each shape must be the layout's."""
    ffn_info, ffn_data, attn_info = shapes
    info_shape = _shape(ffn_info, "ffn_token_info_table_shape", 3)
    attn_shape = _shape(attn_info, "attn_token_info_table_shape", 3)
    num_attention_ranks, micro_batches = info_shape[0], attn_shape[0]
    topology = RankTopology.from_world(world_size, num_attention_ranks, ffn_start_rank_id)
    shared = validated_table(expert_rank_table, topology, moe_expert_num)
    quant = quant_mode == QUANT_INT8
    data_shape = _shape(ffn_data, "ffn_token_data_shape", 5)
    bs, hidden = int(x.shape[1]), int(x.shape[2])
    layout = WindowLayout(
        num_attention_ranks, micro_batches, bs, topk, shared, hidden, x.dtype, quant,
        attn_to_ffn_token_size=_slot_bytes(data_shape[4], hidden, x.dtype, quant),
    )  # fmt: skip
    _expect_shape(info_shape, layout.ffn_info_shape, "ffn_token_info_table_shape")
    _expect_shape(data_shape, layout.ffn_data_shape, "ffn_token_data_shape")
    _expect_shape(attn_shape, layout.attn_info_shape, "attn_token_info_table_shape")
    return layout, topology


def _check_scales_and_mask(
    scales: torch.Tensor | None,
    active_mask: torch.Tensor | None,
    quant_mode: int,
    moe_expert_num: int,
    layout: WindowLayout,
) -> None:
    """Check A2F's optional scales (1, G, H) float32 (int8 only) and active_mask (1, BS)
    bool: types and shapes."""
    hidden, bs = layout.hidden, layout.tokens
    if scales is not None:
        check(quant_mode == QUANT_INT8, "scales", "None when quant_mode == 0", "a tensor")
        _tensor(scales, "scales")
        rows = moe_expert_num + layout.shared
        check(scales.dtype == torch.float32, "scales.dtype", "torch.float32", scales.dtype)
        check(
            tuple(scales.shape) == (1, rows, hidden),
            "scales.shape",
            f"(1, G={rows}, H={hidden})",
            tuple(scales.shape),
        )
    if active_mask is not None:
        _tensor(active_mask, "active_mask")
        check(active_mask.dtype == torch.bool, "active_mask.dtype", "torch.bool", active_mask.dtype)
        check(
            tuple(active_mask.shape) == (1, bs),
            "active_mask.shape",
            f"(1, BS={bs})",
            tuple(active_mask.shape),
        )


def _slot_bytes(row_elems: int, hidden: int, dtype: torch.dtype, quant: bool) -> int:
    """Bytes of an FFN-window slot of `row_elems` elements (`ffn_token_data_shape[4]`).

    The stride is the caller's: A3's A2F takes it from this shape and does not derive it
    from H, so any slot that holds the row is valid (H elements; with int8, H values and the
    float32 scale at byte H).
    """
    elem = 1 if quant else dtype.itemsize
    need = (hidden + QUANT_SCALE_BYTES) if quant else hidden
    what = f"H = {hidden} plus the 4-byte scale of an int8 row" if quant else f"H = {hidden}"
    check(row_elems >= need, "ffn_token_data_shape[4] (HS)", f">= {need} ({what})", row_elems)
    return row_elems * elem


def _min_max(values: torch.Tensor) -> tuple[int, int]:
    if values.is_cpu:  # numpy reads host memory without a torch call per reduction
        cells = values.numpy()
        return int(cells.min()), int(cells.max())
    lo, hi = torch.aminmax(values)
    return int(lo), int(hi)


def mask_prefix_length(mask: torch.Tensor) -> int:
    """Number of active tokens of a (BS,) bool mask; it must be a prefix of Trues."""
    if mask.is_cpu:  # numpy: two reductions without a torch call each
        cells = mask.numpy()
        n = int(np.count_nonzero(cells))
        prefix = bool(cells[:n].all())
    else:
        n = int(mask.sum())
        prefix = bool(mask[:n].all())
    if not prefix:
        check(
            False,
            "active_mask",
            "a prefix of True values followed only by False",
            mask.int().tolist(),
        )
    return n


def check_ffn_to_attention(
    x: torch.Tensor,
    session_ids: torch.Tensor,
    micro_batch_ids: torch.Tensor,
    token_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    actual_token_num: torch.Tensor,
    world_size: int,
    token_info_table_shape: Sequence[int],
    token_data_shape: Sequence[int],
    attn_rank_table: torch.Tensor | None,
    values: bool = True,
) -> FfnToAttentionCall:
    _tensor(x, "x")
    check(x.dim() == 2, "x.dim()", "2 (Y, H)", x.dim())
    check(x.dtype in TOKEN_DTYPES, "x.dtype", "float16, bfloat16 or float32", x.dtype)
    rows, hidden = int(x.shape[0]), int(x.shape[1])
    named = (
        ("session_ids", session_ids),
        ("micro_batch_ids", micro_batch_ids),
        ("token_ids", token_ids),
        ("expert_offsets", expert_offsets),
    )
    if not all(  # one test on the hot path; the loop below names what is wrong
        isinstance(t, torch.Tensor) and t.dtype in _INT_DTYPES and t.shape == (rows,)
        for _, t in named
    ):
        for name, t in named:
            _tensor(t, name)
            check(t.dtype in _INT_DTYPES, f"{name}.dtype", "int32 or int64", t.dtype)
            check(tuple(t.shape) == (rows,), f"{name}.shape", f"(Y={rows},)", tuple(t.shape))
    _scalar(actual_token_num, "actual_token_num")
    m, bs, e = _shape(token_info_table_shape, "token_info_table_shape", 3)
    data_shape = _shape(token_data_shape, "token_data_shape", 4)
    check(
        data_shape[3] == hidden, "token_data_shape[3] (H)", f"x.shape[1] = {hidden}", data_shape[3]
    )
    _expect_shape(data_shape, (m, bs, e, hidden), "token_data_shape")
    check(world_size >= 2, "world_size", ">= 2", world_size)
    if attn_rank_table is not None:
        _tensor(attn_rank_table, "attn_rank_table")
        check(
            attn_rank_table.dtype in _INT_DTYPES and attn_rank_table.dim() == 1,
            "attn_rank_table",
            "a 1-D int32/int64 tensor (A,)",
            f"{attn_rank_table.dtype} {tuple(attn_rank_table.shape)}",
        )
    n = rows
    if values:
        n = _scalar_value(actual_token_num, "actual_token_num", 0, rows + 1)
        session_bound = world_size if attn_rank_table is None else attn_rank_table.numel()
        for name, t, bound in (
            ("session_ids", session_ids, session_bound),
            ("micro_batch_ids", micro_batch_ids, m),
            ("token_ids", token_ids, bs),
            ("expert_offsets", expert_offsets, e),
        ):
            head = t[:n]
            if n:
                lo, hi = int(head.min()), int(head.max())
                check(
                    lo >= 0 and hi < bound,
                    name,
                    f"values in [0, {bound}) for the first actual_token_num={n} rows",
                    f"min {lo}, max {hi}",
                )
        if attn_rank_table is not None and attn_rank_table.numel():
            lo, hi = int(attn_rank_table.min()), int(attn_rank_table.max())
            check(
                lo >= 0 and hi < world_size,
                "attn_rank_table",
                f"ranks in [0, world_size={world_size})",
                attn_rank_table.tolist(),
            )
    return FfnToAttentionCall(m, bs, e, hidden, n)


def check_batching_call(
    counts: tuple[int, int, int],
    expert_num: int,
    max_out_shape: Sequence[int],
    token_dtype: int,
    need_schedule: int,
    layer_num: int,
) -> int:
    """The arguments of `npu_ffn_worker_batching` against the context's (A, BS, E); return H.

    `max_out_shape` is [A, BS, E, H]: its first three must be the context's, since the
    kernel strides the window by the context's counts and sizes its outputs by these.
    """
    check(expert_num >= 1, "expert_num", ">= 1 (local experts of this FFN rank)", expert_num)
    shape = _shape(max_out_shape, "max_out_shape", 4)
    check(
        shape[:3] == tuple(counts),
        "max_out_shape",
        "[A, BS, E, H] with A, BS, E = {}, {}, {} of the schedule context".format(*counts),
        list(shape),
    )
    check(
        token_dtype in BATCHING_TOKEN_DTYPES,
        "token_dtype",
        f"one of {list(BATCHING_TOKEN_DTYPES)} (fp16, bf16, int8 + scale, float32)",
        token_dtype,
    )
    check(need_schedule in (0, 1), "need_schedule", "0 or 1", need_schedule)
    check(layer_num >= 0, "layer_num", ">= 0", layer_num)
    return shape[3]


def check_combine_call(
    expert_scales: torch.Tensor,
    layer_id: torch.Tensor,
    hidden_size: int,
    token_dtype: int,
    need_schedule: int,
) -> tuple[int, int]:
    """The arguments of `npu_attention_worker_combine`; return (BS, K) of `expert_scales`.

    The kernel takes BS and K from `expert_scales` (K <= 64 in its tiling) and H from
    `hidden_size`; BS may exceed the 512 tokens A2F sends (ops-transformer combine tiling).
    """
    _tensor(expert_scales, "expert_scales")
    check(
        expert_scales.dtype == torch.float32,
        "expert_scales.dtype",
        "torch.float32",
        expert_scales.dtype,
    )
    check(
        expert_scales.dim() == 2 and expert_scales.shape[0] >= 1,
        "expert_scales.shape",
        "(BS, K) with BS >= 1",
        tuple(expert_scales.shape),
    )
    topk = int(expert_scales.shape[1])
    check(
        1 <= topk <= MAX_COMBINE_TOPK,
        "expert_scales.shape[1] (K)",
        f"in [1, {MAX_COMBINE_TOPK}]",
        topk,
    )
    _scalar(layer_id, "layer_id")
    check(hidden_size >= 1, "hidden_size", ">= 1", hidden_size)
    check(
        token_dtype in COMBINE_TOKEN_DTYPES,
        "token_dtype",
        f"one of {list(COMBINE_TOKEN_DTYPES)} (fp16, bf16, float32)",
        token_dtype,
    )
    check(need_schedule in (0, 1), "need_schedule", "0 or 1", need_schedule)
    return int(expert_scales.shape[0]), topk


# -- small helpers -------------------------------------------------------------------------
def _tensor(t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise AFDInputError(name, "a tensor", type(t).__name__)


def _scalar(t: torch.Tensor, name: str) -> None:
    _tensor(t, name)
    check(t.dtype in _INT_DTYPES, f"{name}.dtype", "int32 or int64", t.dtype)
    check(tuple(t.shape) == (1,), f"{name}.shape", "(1,)", tuple(t.shape))


def _scalar_value(t: torch.Tensor, name: str, lo: int, hi: int) -> int:
    value = int(t.item())  # (1,) by the structural checks; item() is the cheapest read
    if not lo <= value < hi:
        check(False, name, f"in [{lo}, {hi})", value)
    return value


def _shape(shape: Sequence[int], name: str, length: int) -> tuple[int, ...]:
    ok = (
        isinstance(shape, (list, tuple))
        and len(shape) == length
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    )
    check(ok, name, f"{length} positive integers", shape)
    return tuple(shape)


def _expect_shape(seen: Sequence[int], expected: Sequence[int], name: str) -> None:
    check(tuple(seen) == tuple(expected), name, list(expected).__repr__(), list(seen))
