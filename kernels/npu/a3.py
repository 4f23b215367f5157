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
    QUANT_ROW_PADDING,
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
def a2f_token_size_range(hidden: int, token_dtype: int) -> tuple[int, int]:
    """Bytes an FFN window slot may have for rows of `hidden` values of `token_dtype`.

    A3 wants every token size in the schedule context to be a multiple of 512 bytes. An
    activation row is 2H bytes. A quantized row is H int8 values with the float32 scale at
    byte H: torch_npu's callers size its slot as align512(H + 4), the contract's layout as
    H + 128 bytes, so both roundings are accepted.
    """
    if token_dtype == TOKEN_DTYPE_INT8:
        return align512(hidden + QUANT_SCALE_BYTES), align512(hidden + QUANT_ROW_PADDING)
    row = align512(hidden * ACTIVATION_BYTES)
    return row, row


def token_size_bounds() -> tuple[tuple[int, int], tuple[int, int]]:
    """((lo, hi) of attn_to_ffn_token_size, (lo, hi) of ffn_to_attn_token_size) on A3."""
    lo, hi = A3_HIDDEN_RANGE
    a2f_lo = a2f_token_size_range(lo, TOKEN_DTYPE_INT8)[0]
    a2f_hi = a2f_token_size_range(hi, TOKEN_DTYPE_FP16)[1]
    return (a2f_lo, a2f_hi), (lo * ACTIVATION_BYTES, hi * ACTIVATION_BYTES)


def check_token_size(value: int, argument: str, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    check(
        value % ALIGN == 0 and lo <= value <= hi,
        argument,
        f"a multiple of {ALIGN} bytes in [{lo}, {hi}] (rows of "
        f"{A3_HIDDEN_RANGE[0]} <= H <= {A3_HIDDEN_RANGE[1]})",
        value,
    )


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
