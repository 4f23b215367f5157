"""What the Atlas A3 ops accept beyond the planning layer's contract.

`afd_dispatch.contract` describes the op family as the reference implements it, which is
wider than the hardware: the reference also takes float32 activations (token_dtype 3), any
hidden size, several micro-batches per attention window and any number of shared experts in
combine. Each function here narrows one of those to what A3 runs, and raises
`AFDInputError` naming the argument, the A3 range and the value, because the hardware op
would instead hang the stream or write past a window.

The switch for checks that read tensor contents lives here too: on A3 every such read is a
device-to-host copy and a stream synchronisation per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.layout import (
    A3_HIDDEN_RANGE,
    ALIGN,
    MAX_SHARED_EXPERTS,
    MAX_TOKENS_PER_MICRO_BATCH,
    MAX_TOPK,
    TOKEN_DTYPE_BF16,
    TOKEN_DTYPE_FP16,
    TOKEN_DTYPE_INT8,
    align512,
)

A3_X_DTYPES = (torch.float16, torch.bfloat16)
# token_dtype codes each op accepts on A3 (3, the reference's float32, has no A3 kernel)
BATCHING_TOKEN_DTYPES = {
    TOKEN_DTYPE_FP16: "float16",
    TOKEN_DTYPE_BF16: "bfloat16",
    TOKEN_DTYPE_INT8: "int8 + float32 scale",
}
COMBINE_TOKEN_DTYPES = {TOKEN_DTYPE_FP16: "float16", TOKEN_DTYPE_BF16: "bfloat16"}
ACTIVATION_BYTES = 2  # float16 and bfloat16, the only A3 activation types
QUANT_SCALE_BYTES = 4  # the float32 scale stored after the H int8 values
MAX_SLOTS = MAX_TOPK + MAX_SHARED_EXPERTS

_value_checks = True


def set_value_checks(enabled: bool) -> bool:
    """Turn the checks that read tensor contents on or off; return the previous setting.

    On (the default), ids, session / micro-batch numbers, the active-mask prefix and
    `actual_token_num` are range-checked before each forwarded call, at the cost of a
    device-to-host copy per call. Off, only shapes, dtypes and integer arguments are
    checked; an out-of-range id then reaches the hardware op unchecked. The setting is
    process-wide.
    """
    global _value_checks
    previous = _value_checks
    _value_checks = bool(enabled)
    return previous


def value_checks_enabled() -> bool:
    """Whether the checks that read tensor contents run (see `set_value_checks`)."""
    return _value_checks


# -- activations -------------------------------------------------------------------------
def check_x_dtype(dtype: torch.dtype, argument: str = "x.dtype") -> None:
    check(
        dtype in A3_X_DTYPES,
        argument,
        "torch.float16 or torch.bfloat16 on A3 (the float32 path is reference-only)",
        dtype,
    )


def check_hidden(hidden: int, argument: str) -> None:
    lo, hi = A3_HIDDEN_RANGE
    check(lo <= hidden <= hi, argument, f"{lo} <= H <= {hi} on A3", hidden)


def check_group(group: object) -> None:
    check(
        isinstance(group, str) and bool(group),
        "group",
        "the HCCL communicator name (a non-empty str)",
        group,
    )


def check_f2a_micro_batches(micro_batches: int) -> None:
    """npu_ffn_to_attention on A3 writes one micro-batch per attention window group."""
    check(
        micro_batches == 1,
        "token_info_table_shape[0] (M)",
        "1 on A3 (give each in-flight micro-batch its own window group)",
        micro_batches,
    )


def check_token_dtype(token_dtype: object, allowed: dict[int, str], op: str) -> int:
    if (
        isinstance(token_dtype, int)
        and not isinstance(token_dtype, bool)
        and token_dtype in allowed
    ):
        return token_dtype
    names = ", ".join(f"{code} ({name})" for code, name in allowed.items())
    raise AFDInputError("token_dtype", f"one of {names} for {op} on A3", token_dtype)


# -- sizes in the schedule context -------------------------------------------------------
# Row strides on A3, from the hardware sources (see also `afd_dispatch.layout`'s docstring):
# - npu_attention_to_ffn writes FFN-window slots `ffn_token_data_shape[4]` elements apart
#   (elements of int8 with quant_mode 2, else of x.dtype); its tiling takes the stride from
#   that shape and does not compare it with H.
# - npu_ffn_worker_batching reads them `attn_to_ffn_token_size` BYTES apart, from the schedule
#   context (ops-transformer ffn_worker_batching `ffn_wb_get_schedule_context.h`,
#   `ffn_wb_gather_out_all.h`), and the row's payload at the start of each slot: H values of
#   2 bytes, or H int8 values with the float32 scale at byte H.
# - npu_attention_worker_combine reads attention-window rows H * 2 bytes apart (ops-transformer
#   attention_worker_combine kernel, `attention_worker_combine_split_bs.h`); no kernel reads
#   the context's `ffn_to_attn_token_size`.
# - torch_npu's holder (`torch_npu/csrc/afd/ScheduleContext.cpp`, CheckParams) refuses token
#   sizes that are not multiples of 512 bytes; it does not round them and does not compare
#   them with H.
def a2f_row_payload(hidden: int, token_dtype: int) -> int:
    """Bytes of an FFN-window slot that batching reads: H + 4 for int8 rows (H int8 values,
    then the float32 scale at byte H), 2H for float16/bfloat16 rows."""
    if token_dtype == TOKEN_DTYPE_INT8:
        return hidden + QUANT_SCALE_BYTES
    return hidden * ACTIVATION_BYTES


def check_a2f_token_size(value: int, hidden: int, token_dtype: int) -> None:
    """A recorded context's attn_to_ffn_token_size fits rows of `hidden` values of `token_dtype`.

    Batching reads slot rows `attn_to_ffn_token_size` bytes apart, so any multiple of 512
    (the holder's rule) that holds the row payload works: align512(H + 4) = 7680 with int8
    at H = 7168 (A3 callers), align512(2H) with float16/bfloat16, or any larger multiple.
    The slot size is a stride, not a function of H; the attention side must write the same
    stride (`ffn_token_data_shape[4]` * element size), which batching cannot see.
    """
    payload = a2f_row_payload(hidden, token_dtype)
    what = (
        f"H={hidden} int8 values + the float32 scale at byte H"
        if token_dtype == TOKEN_DTYPE_INT8
        else f"H={hidden} values of 2 bytes"
    )
    check(
        value % ALIGN == 0 and value >= payload,
        "schedule_context attn_to_ffn_token_size",
        f"a multiple of {ALIGN} bytes >= {payload} (the row payload: {what}, "
        f"token_dtype={token_dtype} ({BATCHING_TOKEN_DTYPES[token_dtype]}))",
        value,
    )


def check_f2a_token_size(value: int, hidden: int) -> None:
    """A recorded attention context's ffn_to_attn_token_size suits combine at `hidden`.

    No kernel reads this field: combine reads attention-window rows H * 2 bytes apart
    (ops-transformer attention_worker_combine kernel), so only torch_npu's holder rule
    (ScheduleContext.cpp: a multiple of 512) and room for one row (>= 2H) are asked, e.g.
    6144 = align512(2 * 2880) at H = 2880, where 2H = 5760 itself is not a multiple of 512.
    """
    row = hidden * ACTIVATION_BYTES
    check(
        value % ALIGN == 0 and value >= row,
        "schedule_context ffn_to_attn_token_size",
        f"a multiple of {ALIGN} bytes >= hidden_size * 2 = {row} (combine reads rows "
        f"hidden_size * 2 bytes apart and never reads this field)",
        value,
    )


def token_size_bounds() -> tuple[tuple[int, int], tuple[int, int]]:
    """((lo, hi) of attn_to_ffn_token_size, (lo, hi) of ffn_to_attn_token_size) on A3.

    lo: the smallest multiple of 512 that holds a row at the smallest A3 H (an int8 row for
    attn_to_ffn_token_size, a 16-bit one for ffn_to_attn_token_size); hi: the largest one
    needed by a 16-bit row at the largest A3 H. Both sizes are strides that callers round up
    to 512 bytes, so every multiple of 512 in between is accepted.
    """
    lo, hi = A3_HIDDEN_RANGE
    a2f_lo = align512(a2f_row_payload(lo, TOKEN_DTYPE_INT8))
    row_hi = align512(a2f_row_payload(hi, TOKEN_DTYPE_FP16))
    return (a2f_lo, row_hi), (align512(lo * ACTIVATION_BYTES), row_hi)


def check_token_size(value: int, argument: str, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    check(
        value % ALIGN == 0 and lo <= value <= hi,
        argument,
        f"a multiple of {ALIGN} bytes in [{lo}, {hi}] (rows of "
        f"{A3_HIDDEN_RANGE[0]} <= H <= {A3_HIDDEN_RANGE[1]}; torch_npu's holder does not round)",
        value,
    )


def check_sync_group_size(value: object, session_num: int | None) -> int:
    """ffn_worker_scheduler's sync_group_size: sessions published together.

    The aicpu kernel (ops-transformer `ffn_worker_scheduler_aicpu.cpp`) wants it in
    [1, session_num] and a divisor of session_num (groups are consecutive session ranges).
    Without a recorded context (session_num None) only the lower bound is checked.
    """
    if session_num is None:
        return check_int(value, "sync_group_size", 1)
    allowed = f"an integer in [1, session_num={session_num}] that divides session_num"
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 1 <= value <= session_num
        or session_num % value != 0
    ):
        raise AFDInputError("sync_group_size", allowed, value)
    return value


def check_execute_mode(value: object) -> int:
    """ffn_worker_scheduler's execute_mode: 0 ("once") is the only mode the aicpu kernel and
    aclnnInplaceFfnWorkerScheduler accept (1, "loop", is refused by both)."""
    if not isinstance(value, int) or isinstance(value, bool) or value != 0:
        raise AFDInputError(
            "execute_mode", "0 (the only mode the A3 kernel and aclnn accept)", value
        )
    return value


# -- small argument checks ---------------------------------------------------------------
def check_int(value: object, argument: str, lo: int, hi: int | None = None) -> int:
    """`value` is a Python int in [lo, hi] (hi None: unbounded); return it."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < lo
        or (hi is not None and value > hi)
    ):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise AFDInputError(argument, allowed, value)
    return value


def check_max_out_shape(max_out_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """[A, BS, E, H] as four ints, each within what the A3 op family allows."""
    ok = isinstance(max_out_shape, (list, tuple)) and len(max_out_shape) == 4
    check(ok, "max_out_shape", "[A, BS, E, H]: 4 integers", max_out_shape)
    a = check_int(max_out_shape[0], "max_out_shape[0] (A)", 1)
    bs = check_int(max_out_shape[1], "max_out_shape[1] (BS)", 1, MAX_TOKENS_PER_MICRO_BATCH)
    e = check_int(max_out_shape[2], "max_out_shape[2] (E)", 1, MAX_SLOTS)
    h = check_int(max_out_shape[3], "max_out_shape[3] (H)", 1)
    check_hidden(h, "max_out_shape[3] (H)")
    return a, bs, e, h
