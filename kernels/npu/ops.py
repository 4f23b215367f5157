"""The A3 op family, checked on the host and forwarded to torch_npu.

Every op first runs the planning layer's contract (`afd_dispatch.contract`), then the A3
limits (`afd_dispatch.kernels.npu.a3`), and only then imports torch_npu and calls the op
with the same arguments, positional and keyword exactly as the caller's schema puts them.
Bad input so raises `AFDInputError` before anything reaches the device, where the op would
hang or write past a window instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from afd_dispatch.contract import (
    check_attention_to_ffn,
    check_batching_call,
    check_combine_call,
    check_ffn_to_attention,
)
from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.kernels.npu import a3
from afd_dispatch.kernels.npu._loader import torch_npu, torch_npu_afd
from afd_dispatch.kernels.npu.contexts import (
    SCHEDULE_MODE_ATTENTION,
    SCHEDULE_MODE_FFN,
    context_sizes,
    inherit_record,
)
from afd_dispatch.layout import (
    MAX_TOKENS_PER_MICRO_BATCH,
    MAX_TOPK,
    TOKEN_DTYPE_INT8,
)


def npu_attention_to_ffn(
    x: torch.Tensor,
    session_id: torch.Tensor,
    micro_batch_id: torch.Tensor,
    layer_id: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_rank_table: torch.Tensor,
    group: str,
    world_size: int,
    ffn_token_info_table_shape: Sequence[int],
    ffn_token_data_shape: Sequence[int],
    attn_token_info_table_shape: Sequence[int],
    moe_expert_num: int,
    *,
    scales: torch.Tensor | None = None,
    active_mask: torch.Tensor | None = None,
    quant_mode: int = 0,
    sync_flag: int = 0,
    ffn_start_rank_id: int = 0,
) -> None:
    """Send one micro-batch's routed tokens into the FFN ranks' windows (`torch_npu`).

    Checked: the whole contract of `check_attention_to_ffn` (shapes, dtypes, the expert
    rank table against the topology, the three window shapes; with value checks on also
    session / micro-batch / layer ids, expert ids and the active-mask prefix), then on A3:
    x is float16/bfloat16, 1024 <= H <= 8192, `group` names a communicator.

    Row stride: the A3 op writes FFN-window slots `ffn_token_data_shape[4]` (HS) elements
    apart (int8 with quant_mode 2, else x.dtype); its tiling takes HS from that shape and
    does not compare it with H (ops-transformer `mc2/attention_to_ffn` tiling), so the
    contract's HS >= H (H + 4 bytes with quant) is all that is checked. The FFN side reads
    the slots `attn_to_ffn_token_size` bytes apart, so HS * element size must equal that
    context value (a multiple of 512: align512(H + 4) with int8, align512(2H) otherwise);
    the two ranks' arguments cannot be compared here. Not refused, only noted: with quant the
    A3 kernel writes H int8 values plus a 128-byte tail (the scale at byte align32(H), then
    unspecified bytes), so in a slot narrower than H + 128 bytes that tail overlaps the next
    slot's first bytes. align512(H + 4) is that narrow when H % 512 > 384 (4096 < 4128 at
    H = 4000); at H = 7168 it is not (7680 >= 7296), nor is the seed's H + 128.
    """
    call = check_attention_to_ffn(
        x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, world_size,
        ffn_token_info_table_shape, ffn_token_data_shape, attn_token_info_table_shape,
        moe_expert_num, scales, active_mask, quant_mode, sync_flag, ffn_start_rank_id,
        values=a3.value_checks_enabled(),
    )  # fmt: skip
    a3.check_x_dtype(call.layout.dtype)
    a3.check_hidden(call.layout.hidden, "x.shape[2] (H)")
    a3.check_group(group)
    torch_npu().npu_attention_to_ffn(
        x,
        session_id,
        micro_batch_id,
        layer_id,
        expert_ids,
        expert_rank_table,
        group,
        world_size,
        ffn_token_info_table_shape,
        ffn_token_data_shape,
        attn_token_info_table_shape,
        moe_expert_num,
        scales=scales,
        active_mask=active_mask,
        quant_mode=quant_mode,
        sync_flag=sync_flag,
        ffn_start_rank_id=ffn_start_rank_id,
    )


def npu_ffn_worker_batching(
    schedule_context: torch.Tensor,
    expert_num: int,
    max_out_shape: Sequence[int],
    *,
    token_dtype: int = 0,
    need_schedule: int = 0,
    layer_num: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Collect one micro-batch on an FFN rank, sorted by local expert (`torch_npu`).

    Returns (y (Y, H), group_list (expert_num, 2) int64, session_ids, micro_batch_ids,
    token_ids, expert_offsets (Y,), dynamic_scale (Y,) float32, actual_token_num (1,)
    int64) with Y = A * BS * E.

    Checked: `schedule_context` is an int8[1024] tensor; `max_out_shape` is [A, BS, E, H]
    with 1024 <= H <= 8192; token_dtype is 0 (fp16), 1 (bf16) or 2 (int8 + scale) (3, the
    reference's float32, is refused); `check_batching_call` (expert_num >= 1, need_schedule
    0/1, layer_num >= 0); H a multiple of 32 with int8. For a context created by this
    backend also: it is an FFN context, [A, BS, E] equal its session_num,
    micro_batch_size and selected_expert_num, and its attn_to_ffn_token_size (the byte
    stride the kernel reads slot rows at, ops-transformer `ffn_wb_get_schedule_context.h` /
    `ffn_wb_gather_out_all.h`) is a multiple of 512 that holds the row payload: H + 4 bytes
    with int8 (the scale at byte H), 2H with fp16/bf16 (`a3.check_a2f_token_size`). Any
    larger multiple of 512 is a valid stride too, so the context tells neither fp16 from
    bf16 nor which stride the attention side writes (it must write this one).
    `expert_num` (local experts of this rank) is not compared with the context's
    expert_num, which callers fill in inconsistently (all experts of a layer, or the
    selected ones).
    """
    sizes = context_sizes(schedule_context, SCHEDULE_MODE_FFN)
    a, bs, e, hidden = a3.check_max_out_shape(max_out_shape)
    code = a3.check_token_dtype(token_dtype, a3.BATCHING_TOKEN_DTYPES, "npu_ffn_worker_batching")
    if code == TOKEN_DTYPE_INT8:
        # the kernel aligns to 32 bytes, which puts the row's scale at byte H only then
        check(hidden % 32 == 0, "max_out_shape[3] (H)", "a multiple of 32 with int8", hidden)
    if sizes is not None:
        a, bs, e = sizes.session_num, sizes.micro_batch_size, sizes.selected_expert_num
    check_batching_call((a, bs, e), expert_num, max_out_shape, code, need_schedule, layer_num)
    if sizes is not None:
        a3.check_a2f_token_size(sizes.attn_to_ffn_token_size, hidden, code)
    return torch_npu().npu_ffn_worker_batching(
        schedule_context,
        expert_num,
        max_out_shape,
        token_dtype=token_dtype,
        need_schedule=need_schedule,
        layer_num=layer_num,
    )


def npu_ffn_to_attention(
    x: torch.Tensor,
    session_ids: torch.Tensor,
    micro_batch_ids: torch.Tensor,
    token_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    actual_token_num: torch.Tensor,
    group: str,
    world_size: int,
    token_info_table_shape: Sequence[int],
    token_data_shape: Sequence[int],
    *,
    attn_rank_table: torch.Tensor | None = None,
) -> None:
    """Send expert outputs back into the attention ranks' windows (`torch_npu`).

    Checked: the contract of `check_ffn_to_attention` (shapes and dtypes of the five id
    tensors, token_data_shape == [M, BS, E, H]; with value checks on also actual_token_num
    and every id of the first actual_token_num rows), then on A3: x is float16/bfloat16,
    1024 <= H <= 8192, M == 1 (token_info_table_shape[0]), `group` names a communicator.
    Not checkable here: that `attn_rank_table` (or, without it, the session ids) name
    attention ranks, since the op does not receive the FFN rank range.
    """
    call = check_ffn_to_attention(
        x, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num,
        world_size, token_info_table_shape, token_data_shape, attn_rank_table,
        values=a3.value_checks_enabled(),
    )  # fmt: skip
    a3.check_x_dtype(x.dtype)
    a3.check_hidden(call.hidden, "x.shape[1] (H)")
    a3.check_f2a_micro_batches(call.micro_batches)
    a3.check_group(group)
    torch_npu().npu_ffn_to_attention(
        x,
        session_ids,
        micro_batch_ids,
        token_ids,
        expert_offsets,
        actual_token_num,
        group,
        world_size,
        token_info_table_shape,
        token_data_shape,
        attn_rank_table=attn_rank_table,
    )


def npu_attention_worker_combine(
    schedule_context: torch.Tensor,
    expert_scales: torch.Tensor,
    layer_id: torch.Tensor,
    hidden_size: int,
    *,
    token_dtype: int = 0,
    need_schedule: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and sum the returned expert outputs on an attention rank (`torch_npu`).

    Returns (y (BS, H), next_layer_id (1,)).

    Checked: `schedule_context` is an int8[1024] tensor; token_dtype is 0 (fp16) or 1
    (bf16); 1024 <= hidden_size <= 8192; `check_combine_call` (expert_scales float32
    (BS, K), layer_id an int (1,) tensor, need_schedule 0/1). For a context created by this
    backend also: it is an attention context, BS equals its micro_batch_size, E = K + 1
    (A3 combines exactly one shared expert) and its ffn_to_attn_token_size is a multiple of
    512 of at least hidden_size * 2 bytes (`a3.check_f2a_token_size`). That field is read
    by no kernel: the ops-transformer attention_worker_combine kernel reads attention-window
    rows hidden_size * 2 bytes apart whatever the context says, so the sender must write
    them H apart (npu_ffn_to_attention's token_data_shape[3] == H, checked there), and the
    context value only has to pass torch_npu's holder rule (ScheduleContext.cpp: a multiple
    of 512), e.g. 6144 at H = 2880.
    """
    sizes = context_sizes(schedule_context, SCHEDULE_MODE_ATTENTION)
    code = a3.check_token_dtype(
        token_dtype, a3.COMBINE_TOKEN_DTYPES, "npu_attention_worker_combine"
    )
    hidden = a3.check_int(hidden_size, "hidden_size", 1)
    a3.check_hidden(hidden, "hidden_size")
    tokens, topk = _scales_shape(expert_scales)
    if sizes is not None:
        check(
            topk == sizes.selected_expert_num - 1,
            "expert_scales.shape[1] (K)",
            f"selected_expert_num - 1 = {sizes.selected_expert_num - 1}: A3 combines exactly "
            "one shared expert (E = K + 1)",
            topk,
        )
        check(
            tokens == sizes.micro_batch_size,
            "expert_scales.shape",
            f"(BS={sizes.micro_batch_size}, K): the context's micro_batch_size",
            tuple(expert_scales.shape),
        )
    check_combine_call(expert_scales, layer_id, hidden_size, code, need_schedule)
    if sizes is not None:
        a3.check_f2a_token_size(sizes.ffn_to_attn_token_size, hidden)
    return torch_npu().npu_attention_worker_combine(
        schedule_context,
        expert_scales,
        layer_id,
        hidden_size,
        token_dtype=token_dtype,
        need_schedule=need_schedule,
    )


def ffn_worker_scheduler_(
    self: torch.Tensor, *, sync_group_size: int = 1, execute_mode: int = 0
) -> torch.Tensor:
    """Publish the next ready micro-batch's sessions in the context (in place).

    The first argument is named `self` as in the torch_npu schema. Checked (`_ffn_scheduler`):
    an int8[1024] context tensor (an FFN context, when created by this backend);
    sync_group_size >= 1, and for a recorded context in [1, session_num] and a divisor of
    session_num; execute_mode == 0. These are the aicpu kernel's own checks
    (ops-transformer `ffn_worker_scheduler_aicpu.cpp`; aclnn refuses execute_mode != 0 too),
    which on the device fail the stream instead of naming the argument.
    """
    _ffn_scheduler(self, sync_group_size, execute_mode)
    return torch_npu_afd().ffn_worker_scheduler_(
        self, sync_group_size=sync_group_size, execute_mode=execute_mode
    )


def ffn_worker_scheduler(
    self: torch.Tensor, *, sync_group_size: int = 1, execute_mode: int = 0
) -> torch.Tensor:
    """`ffn_worker_scheduler_` on a copy of the context: returns the new context tensor.

    torch_npu 2.14 (`npu_native_functions_by_codegen.yaml`; `torch_npu._afd` alias from
    `torch_npu/utils/_afd_ops.py`) copies the 1024 bytes and runs the in-place op on the
    copy, so `self` is unchanged but the device buffers both contexts point at (flags,
    published ids) are modified. Same checks as the in-place op. The returned context
    inherits `self`'s record while it lives, so batching given it is checked alike.
    """
    _ffn_scheduler(self, sync_group_size, execute_mode)
    out: torch.Tensor = torch_npu_afd().ffn_worker_scheduler(
        self, sync_group_size=sync_group_size, execute_mode=execute_mode
    )
    inherit_record(self, out)
    return out


def attention_worker_scheduler_(self: torch.Tensor) -> torch.Tensor:
    """Wait until every result of the next micro-batch has arrived (in place).

    The argument is named `self` as in the torch_npu schema. Checked: an int8[1024] context
    tensor (an attention context, when created by this backend).
    """
    context_sizes(self, SCHEDULE_MODE_ATTENTION)
    return torch_npu_afd().attention_worker_scheduler_(self)


def attention_worker_scheduler(self: torch.Tensor) -> torch.Tensor:
    """`attention_worker_scheduler_` on a copy of the context: returns the new context.

    As `ffn_worker_scheduler`: `self` is unchanged, the attention window's flags are
    zeroed all the same, and the returned context inherits `self`'s record while it lives.
    Same checks as the in-place op.
    """
    context_sizes(self, SCHEDULE_MODE_ATTENTION)
    out: torch.Tensor = torch_npu_afd().attention_worker_scheduler(self)
    inherit_record(self, out)
    return out


# -- helpers -------------------------------------------------------------------------------
def _scales_shape(expert_scales: object) -> tuple[int, int]:
    """(BS, K) of an expert_scales argument, each within the op family's limits."""
    if not isinstance(expert_scales, torch.Tensor) or expert_scales.dim() != 2:
        seen = (
            tuple(expert_scales.shape)
            if isinstance(expert_scales, torch.Tensor)
            else type(expert_scales).__name__
        )
        raise AFDInputError("expert_scales", "a (BS, K) float32 tensor", seen)
    tokens = a3.check_int(
        int(expert_scales.shape[0]), "expert_scales.shape[0] (BS)", 1, MAX_TOKENS_PER_MICRO_BATCH
    )
    topk = a3.check_int(int(expert_scales.shape[1]), "expert_scales.shape[1] (K)", 1, MAX_TOPK)
    return tokens, topk


def _ffn_scheduler(context: object, sync_group_size: object, execute_mode: object) -> None:
    """The checks both FFN scheduler ops run before forwarding."""
    sizes = context_sizes(context, SCHEDULE_MODE_FFN)
    a3.check_sync_group_size(sync_group_size, None if sizes is None else sizes.session_num)
    a3.check_execute_mode(execute_mode)
