"""Expected window bytes, built by hand from the op contract (`shared/spec/afd-ops.md`).

Nothing here calls the code under test: offsets come from the spec's formulas, values are
packed with `struct`, float32 arithmetic is numpy's IEEE single precision. The byte tests
build the window they expect with `ExpectedFfnWindow` / `ExpectedAttnWindow` and compare it
with `group.read_window(rank)` for every rank of the group.

FFN window:       info int32 [A, M, 2 + BS*E] at byte 0, row (s, m) = [flag, layer, ids...];
                  data rows of HS elements at align512(info bytes), row ((s*M + m)*BS + t)*E + e.
Attention window: info int32 [M, BS, E] at byte 0; data rows of H elements at
                  align512(info bytes), row (m*BS + t)*E + e.
"""

from __future__ import annotations

import contextlib
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from afd_dispatch import (
    RankTopology,
    WindowGroup,
    WindowLayout,
    create_window_group,
    destroy_window_group,
)

INT32_MAX = 2**31 - 1
QUANT_PADDING = 128  # an int8 row holds H values, a float32 scale at byte H, then padding


def align512(nbytes: int) -> int:
    return (nbytes + 511) // 512 * 512


# -- the dimensions of one window group and the spec's offsets ------------------------------
@dataclass(frozen=True)
class Dims:
    """A, M, BS, K, S, H of a group; `elem` bytes per activation (2 bf16, 4 fp32)."""

    A: int
    M: int
    BS: int
    K: int
    S: int
    H: int
    elem: int = 2
    quant: bool = False

    @property
    def E(self) -> int:
        return self.K + self.S

    @property
    def HS(self) -> int:
        return self.H + QUANT_PADDING if self.quant else self.H

    @property
    def ffn_row_bytes(self) -> int:
        return self.HS * (1 if self.quant else self.elem)

    @property
    def ffn_info_words_per_row(self) -> int:
        return 2 + self.BS * self.E

    @property
    def ffn_data_offset(self) -> int:
        return align512(self.A * self.M * self.ffn_info_words_per_row * 4)

    @property
    def ffn_window_bytes(self) -> int:
        rows = self.A * self.M * self.BS * self.E
        return self.ffn_data_offset + rows * self.ffn_row_bytes

    def ffn_info_offset(self, s: int, m: int, column: int) -> int:
        """Byte of column `column` (0 flag, 1 layer, 2 + t*E + e slot) of info row (s, m)."""
        return ((s * self.M + m) * self.ffn_info_words_per_row + column) * 4

    def ffn_row_offset(self, s: int, m: int, t: int, e: int) -> int:
        row = ((s * self.M + m) * self.BS + t) * self.E + e
        return self.ffn_data_offset + row * self.ffn_row_bytes

    @property
    def attn_row_bytes(self) -> int:
        return self.H * self.elem

    @property
    def attn_data_offset(self) -> int:
        return align512(self.M * self.BS * self.E * 4)

    @property
    def attn_window_bytes(self) -> int:
        return self.attn_data_offset + self.M * self.BS * self.E * self.attn_row_bytes

    def attn_flag_offset(self, m: int, t: int, e: int) -> int:
        return ((m * self.BS + t) * self.E + e) * 4

    def attn_row_offset(self, m: int, t: int, e: int) -> int:
        return self.attn_data_offset + ((m * self.BS + t) * self.E + e) * self.attn_row_bytes

    # the int[] shape arguments of the ops, written out from the spec
    @property
    def ffn_token_info_table_shape(self) -> list[int]:
        return [self.A, self.M, 2 + self.BS * self.E]

    @property
    def ffn_token_data_shape(self) -> list[int]:
        return [self.A, self.M, self.BS, self.E, self.HS]

    @property
    def attn_token_info_table_shape(self) -> list[int]:
        return [self.M, self.BS, self.E]

    @property
    def attn_token_data_shape(self) -> list[int]:
        return [self.M, self.BS, self.E, self.H]


# -- value encoders -------------------------------------------------------------------------
def f32(value: float) -> np.float32:
    return np.float32(value)


def f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def f32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def f32_bytes(values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def bf16_bytes(values: Sequence[float]) -> bytes:
    """bf16 of values that bf16 holds exactly: the high half of their float32 bits."""
    out = bytearray()
    for v in values:
        bits = f32_bits(v)
        assert bits & 0xFFFF == 0, f"{v!r} is not exactly representable in bf16"
        out += struct.pack("<H", bits >> 16)
    return bytes(out)


def bf16_round(value: float) -> float:
    """float32 `value` rounded to bf16, to nearest, ties to even (finite values only)."""
    bits = f32_bits(value)
    lower_half_lsb = (bits >> 16) & 1
    return f32_from_bits(((bits + 0x7FFF + lower_half_lsb) >> 16) << 16)


def activation_bytes(values: Sequence[float], elem: int) -> bytes:
    return bf16_bytes(values) if elem == 2 else f32_bytes(values)


def int8_bytes(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}b", *values)


def int32_bytes(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


def quant_row_bytes(q: Sequence[int], scale: float, hidden: int) -> bytes:
    """An int8 row: H values, the float32 scale at byte H, zero padding (never written)."""
    assert len(q) == hidden
    row = int8_bytes(q) + f32_bytes([scale])
    return row + bytes(hidden + QUANT_PADDING - len(row))


def quantize_by_spec(xf: Sequence[float]) -> tuple[list[int], float]:
    """The spec's steps 2-4 on one float32 row: (q, stored scale float32(1 / ds)).

    amax = max |xf|; ds = float32(127 / amax); y = float32(xf * ds); q = round half to even.
    All-zero row: q 0, scale 0 (the reference's documented choice).
    """
    row = [f32(v) for v in xf]
    amax = max(abs(v) for v in row)
    if amax == 0:
        return [0] * len(row), 0.0
    ds = f32(127.0) / amax
    q = [round(float(v * ds)) for v in row]  # Python's round() is half to even
    return q, float(f32(1.0) / ds)


# -- expected windows ---------------------------------------------------------------------
class ExpectedFfnWindow:
    """An FFN window in its initial state (flags 0, layer 0, ids INT32_MAX, data 0)."""

    def __init__(self, dims: Dims) -> None:
        self.dims = dims
        self.buf = bytearray(dims.ffn_window_bytes)
        for s in range(dims.A):
            for m in range(dims.M):
                for t in range(dims.BS):
                    for e in range(dims.E):
                        self.slot(s, m, t, e, INT32_MAX)

    def header(self, s: int, m: int, flag: int, layer: int) -> None:
        struct.pack_into("<2i", self.buf, self.dims.ffn_info_offset(s, m, 0), flag, layer)

    def slot(self, s: int, m: int, t: int, e: int, local_id: int) -> None:
        column = 2 + t * self.dims.E + e
        struct.pack_into("<i", self.buf, self.dims.ffn_info_offset(s, m, column), local_id)

    def row(self, s: int, m: int, t: int, e: int, data: bytes) -> None:
        assert len(data) == self.dims.ffn_row_bytes
        offset = self.dims.ffn_row_offset(s, m, t, e)
        self.buf[offset : offset + len(data)] = data

    def unspecified(self) -> list[range]:
        """Bytes [H+4, H+128) of every int8 row: the spec leaves them unspecified."""
        d = self.dims
        if not d.quant:
            return []
        starts = (
            d.ffn_row_offset(s, m, t, e) + d.H + 4
            for s in range(d.A)
            for m in range(d.M)
            for t in range(d.BS)
            for e in range(d.E)
        )
        return [range(start, start + QUANT_PADDING - 4) for start in starts]

    def copy(self) -> ExpectedFfnWindow:
        other = ExpectedFfnWindow.__new__(ExpectedFfnWindow)
        other.dims, other.buf = self.dims, bytearray(self.buf)
        return other


class ExpectedAttnWindow:
    """An attention window in its initial state (all zero)."""

    def __init__(self, dims: Dims) -> None:
        self.dims = dims
        self.buf = bytearray(dims.attn_window_bytes)

    def flag(self, m: int, t: int, e: int, value: int = 1) -> None:
        struct.pack_into("<i", self.buf, self.dims.attn_flag_offset(m, t, e), value)

    def row(self, m: int, t: int, e: int, data: bytes) -> None:
        assert len(data) == self.dims.attn_row_bytes
        offset = self.dims.attn_row_offset(m, t, e)
        self.buf[offset : offset + len(data)] = data

    def unspecified(self) -> list[range]:
        return []

    def copy(self) -> ExpectedAttnWindow:
        other = ExpectedAttnWindow.__new__(ExpectedAttnWindow)
        other.dims, other.buf = self.dims, bytearray(self.buf)
        return other


ExpectedWindow = ExpectedFfnWindow | ExpectedAttnWindow


# -- groups, comparing and loading windows ----------------------------------------------------
@contextlib.contextmanager
def window_group(
    dims: Dims,
    num_ffn_ranks: int,
    dtype: torch.dtype,
    *,
    ffn_start_rank_id: int = 0,
    timeout_s: float = 5.0,
) -> Iterator[WindowGroup]:
    """A fresh in-process group with a unique name, destroyed afterwards."""
    topology = RankTopology(dims.A, num_ffn_ranks, ffn_start_rank_id)
    layout = WindowLayout(dims.A, dims.M, dims.BS, dims.K, dims.S, dims.H, dtype, dims.quant)
    name = f"bytes-{uuid.uuid4().hex[:12]}"
    group = create_window_group(name, topology, layout, transport="inproc", timeout_s=timeout_s)
    try:
        yield group
    finally:
        destroy_window_group(name)


def initial_windows(group: WindowGroup, dims: Dims) -> dict[int, ExpectedWindow]:
    """Every rank's expected window in its initial state, FFN or attention by rank."""
    topo = group.topology
    return {
        r: ExpectedFfnWindow(dims) if topo.is_ffn(r) else ExpectedAttnWindow(dims)
        for r in range(topo.world_size)
    }


def _masked(data: bytes | bytearray, ignore: Sequence[range]) -> bytearray:
    out = bytearray(data)
    for span in ignore:
        out[span.start : span.stop] = bytes(len(span))
    return out


def _first_differences(actual: bytearray, expected: bytearray, limit: int = 8) -> str:
    diffs = [i for i in range(len(expected)) if actual[i] != expected[i]][:limit]
    return ", ".join(f"byte {i}: got {actual[i]:#04x} expected {expected[i]:#04x}" for i in diffs)


def assert_window(group: WindowGroup, rank: int, expected: ExpectedWindow) -> None:
    actual = group.read_window(rank)
    assert len(actual) == len(expected.buf), f"rank {rank}: window size"
    ignore = expected.unspecified()
    got, want = _masked(actual, ignore), _masked(expected.buf, ignore)
    assert got == want, f"rank {rank} window differs: {_first_differences(got, want)}"


def assert_windows(group: WindowGroup, expected: Mapping[int, ExpectedWindow]) -> None:
    """Compare the whole window of every rank of the group."""
    assert sorted(expected) == list(range(group.topology.world_size))
    for rank, window in expected.items():
        assert_window(group, rank, window)


def load_window(group: WindowGroup, rank: int, window: ExpectedWindow) -> None:
    """Write a hand-built window state into `rank`'s window (test setup, not an op)."""
    target = group.window(rank)
    assert target.numel() == len(window.buf)
    target.copy_(torch.frombuffer(bytearray(window.buf), dtype=torch.uint8))


def context_field(ctx: torch.Tensor, offset: int, fmt: str) -> int:
    """One field of the 1024-byte schedule context, by byte offset and struct format."""
    return struct.unpack_from(fmt, ctx.numpy().tobytes(), offset)[0]
