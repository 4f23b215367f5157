"""The reference ops' memory-bound loops: row moves, the combine's sum, int8 quantization.

Each runs in the C extension `_native` (built at install, `kernels/reference/_native.c`)
when it is there, and in torch otherwise; both write the same bytes (the tests compare
them). The C loops copy each row with one `memcpy`, where torch's index kernels move rows
element by element, and they run without the GIL. `AFD_NO_NATIVE=1` in the environment, or
`native_disabled()`, selects the torch code.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from afd_dispatch.errors import AFDInputError
from afd_dispatch.kernels.reference.quant import quantize_rows

NATIVE_ABI = 3  # the argument lists this file calls `_native` with (its NATIVE_ABI)
log = logging.getLogger(__name__)

try:
    from afd_dispatch.kernels.reference import _native
except ImportError:  # not built (no C compiler at install): the torch code runs
    _native = None  # type: ignore[assignment]  # (mypy types the name as the module only)
if _native is not None and getattr(_native, "ABI", None) != NATIVE_ABI:
    log.warning(
        "afd-dispatch: the C extension %s was built from another version of the sources "
        "(ABI %s, these need %d): the ops run their torch code until it is rebuilt "
        "(pip install -e . again)",
        _native.__file__,
        getattr(_native, "ABI", None),
        NATIVE_ABI,
    )
    _native = None  # type: ignore[assignment]

_use_native = _native is not None and os.environ.get("AFD_NO_NATIVE", "") != "1"

COPY_CHUNK_ROWS = 64  # torch path: rows per gather/scatter chunk, ~1 MB at H = 7168 bf16
COMBINE_BLOCK_TOKENS = 32  # torch path: a block's float32 accumulator (32 x H) stays in cache
_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def native_available() -> bool:
    """Whether the C loops run (built, and not turned off)."""
    return _use_native


@contextmanager
def native_disabled() -> Iterator[None]:
    """Run the torch code inside the block (tests compare the two)."""
    global _use_native
    before, _use_native = _use_native, False
    try:
        yield
    finally:
        _use_native = before


def _storage_users(t: torch.Tensor) -> int:
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


try:
    _UNSHARED = _storage_users(torch.empty(1))  # the count of a tensor nobody else sees
except (AttributeError, RuntimeError):  # a torch without the counter: never reuse
    _UNSHARED = -1
_POOL_SIZE = 2  # per (shape, dtype): one in use by the caller, one being filled
_pool_lock = threading.Lock()
_pool: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}


def output_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for an op's output, like `torch.empty`, but one whose
    previous owner dropped every view of it is handed out again.

    A fresh large buffer costs a page fault per 4 KiB page the op touches (the CPU
    allocator returns big blocks to the OS); a recycled one is already mapped. Safe
    because a buffer is reused only when nothing but the pool refers to its storage.
    """
    with _pool_lock:  # FFN workers of one process (threads) share the pool
        entries = _pool.setdefault((shape, dtype), [])
        for buffer in entries:
            if _storage_users(buffer) == _UNSHARED:
                return buffer.view(shape)  # a view: while it lives, the count says "in use"
        buffer = torch.empty(shape, dtype=dtype)
        if _UNSHARED > 0 and len(entries) < _POOL_SIZE:
            entries.append(buffer)
        return buffer.view(shape)


def move_rows(
    dst: torch.Tensor,
    dst_index: torch.Tensor | None,
    src: torch.Tensor,
    src_index: torch.Tensor | None,
    n: int,
    who: str = "row index",
) -> None:
    """dst[dst_index[i]] = src[src_index[i]] for i < n (None: the index is i itself).

    `dst`, `src`: 2-D, rows of the same byte length, each row contiguous (any row stride).
    Indices: int64, contiguous. An index out of range raises `AFDInputError` naming `who`;
    rows before it are written, none after.
    """
    row_bytes, source_bytes = (t.shape[1] * t.element_size() for t in (dst, src))
    if row_bytes != source_bytes:
        raise ValueError(f"move_rows: rows of {row_bytes} and {source_bytes} bytes")
    if n == 0:
        return
    if _use_native and dst.stride(1) == 1 and src.stride(1) == 1:
        bad = _native.move_rows(
            dst.data_ptr(), dst.stride(0) * dst.element_size(), dst.shape[0],
            0 if dst_index is None else _int64(dst_index).data_ptr(),
            src.data_ptr(), src.stride(0) * src.element_size(), src.shape[0],
            0 if src_index is None else _int64(src_index).data_ptr(), n, row_bytes,
        )  # fmt: skip
        if bad >= 0:
            d = bad if dst_index is None else int(dst_index[bad])
            s = bad if src_index is None else int(src_index[bad])
            raise AFDInputError(
                who, f"rows in [0, {dst.shape[0]}) <- [0, {src.shape[0]})", f"{d} <- {s}"
            )
        return
    _move_rows_torch(dst, dst_index, src, src_index, n)


def native(name: str, *args: int) -> int:
    """Call C loop `name` of `_native.c` (its comment there gives the arguments and what
    the returned number means); only where `native_available()`."""
    assert _native is not None
    result: int = getattr(_native, name)(*args)
    return result


def _int64(index: torch.Tensor) -> torch.Tensor:
    if index.dtype != torch.int64 or not index.is_contiguous():
        raise ValueError(f"move_rows: indices must be contiguous int64, got {index.dtype}")
    return index


def _move_rows_torch(
    dst: torch.Tensor,
    dst_index: torch.Tensor | None,
    src: torch.Tensor,
    src_index: torch.Tensor | None,
    n: int,
) -> None:
    """Chunks gathered into a cache-sized staging buffer, then scattered from there."""
    wide = [_wide(t) for t in (dst, src)]
    if all(w is not None for w in wide):  # both or neither: index_copy_ wants one dtype
        dst, src = wide  # type: ignore[assignment]
    elif dst.dtype != src.dtype:
        dst, src = dst.view(torch.uint8), src.view(torch.uint8)
    staging = torch.empty(min(n, COPY_CHUNK_ROWS), src.shape[1], dtype=src.dtype)
    for i in range(0, n, COPY_CHUNK_ROWS):
        k = min(COPY_CHUNK_ROWS, n - i)
        chunk = staging[:k]
        if src_index is None:
            chunk.copy_(src[i : i + k])
        else:
            torch.index_select(src, 0, src_index[i : i + k], out=chunk)
        if dst_index is None:
            dst[i : i + k].copy_(chunk)
        else:
            dst.index_copy_(0, dst_index[i : i + k], chunk)


def _wide(t: torch.Tensor) -> torch.Tensor | None:
    """The same bytes seen as 16-byte elements where the row length allows.

    index_copy_/index_select move rows element by element; 16-byte elements move a
    bf16 row about 2.5x faster than 2-byte ones. Only a reinterpretation: no copy.
    """
    if (t.shape[-1] * t.element_size()) % 16 != 0:
        return None
    try:
        return t.view(torch.uint8).view(torch.complex128)
    except RuntimeError:  # an offset that is not 16-byte aligned, or a strided row
        return None


def weighted_sum(
    d: torch.Tensor, scales: torch.Tensor, topk: int, dtype: torch.dtype
) -> torch.Tensor:
    """y[t] = round(sum_k float32(d[t, k]) * w[t, k] + sum_shared float32(d[t, j])).

    `d`: [BS, E, H] (`dtype`), `scales`: float32 [BS, >= K]; returns [BS, H] `dtype`. The
    sum starts at 0 and takes one multiply and one add per slot, in slot order, never
    fused, and rounds once at the end (the A3 kernel's order).
    """
    tokens, slots, hidden = d.shape
    y = torch.empty(tokens, hidden, dtype=dtype)
    code = _NATIVE_DTYPES.get(dtype)
    if _use_native and code is not None and d.is_contiguous():
        w = scales[:, :topk].contiguous()
        no_nan = _native.weighted_sum(d.data_ptr(), w.data_ptr(), y.data_ptr(), tokens, slots,
                                      topk, hidden, code)  # fmt: skip
        if no_nan:  # torch's NaN bytes differ between its conversion paths: let torch write them
            return y
    # torch: per block of tokens, so the float32 temporaries stay in cache
    acc = torch.empty(COMBINE_BLOCK_TOKENS, hidden, dtype=torch.float32)
    term = torch.empty_like(acc)
    for lo in range(0, tokens, COMBINE_BLOCK_TOKENS):
        hi = min(tokens, lo + COMBINE_BLOCK_TOKENS)
        a, t = acc[: hi - lo], term[: hi - lo]
        a.zero_()
        for k in range(slots):
            t.copy_(d[lo:hi, k])
            if k < topk:
                t.mul_(scales[lo:hi, k : k + 1])
            a.add_(t)
        y[lo:hi].copy_(a)
    return y


def quantize_into(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Quantize rows `x` [n, H] (any float dtype) into `out` int8 [n, >= H + 4]; return
    False, with `out` unspecified, if `x` holds an inf or a nan.

    Each out row: H int8 values, the float32 scale at byte H (`quant.quantize_rows`: q =
    round-half-even(x * 127 / amax), scale = 1 / (127 / amax)), then zeros.
    """
    n, hidden = x.shape
    if out.shape[0] < n or out.shape[1] < hidden + 4:
        raise ValueError(f"quantize_into: out {tuple(out.shape)} for {n} rows of H={hidden}")
    code = _NATIVE_DTYPES.get(x.dtype)
    if _use_native and code is not None and x.is_contiguous() and out.stride(1) == 1:
        finite: bool = _native.quantize_rows(
            x.data_ptr(), n, hidden, code, out.data_ptr(), out.stride(0), out.shape[1]
        )
        return finite
    xf = x.to(torch.float32)
    if n and not bool(torch.isfinite(torch.stack([xf.amax(dim=-1), xf.amin(dim=-1)])).all()):
        return False
    q, scale = quantize_rows(xf)
    out[:, :hidden] = q
    out[:, hidden : hidden + 4] = scale.view(torch.int8).view(-1, 4)
    out[:, hidden + 4 :] = 0
    return True
