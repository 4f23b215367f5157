"""Shared helpers of the golden tests (tests/test_golden_*.py).

These tests re-derive, in our own code, the parameter grids and expected-value rules of
the hardware team's public golden tests (op-plugin `test/test_custom_ops`, hicann
ops-transformer `tests/assets/golden.py` + ST CSV grids) and run them against the
reference backend. Nothing here calls the code under test except to register memory:
schedule contexts are packed byte by byte from torch_npu's `ScheduleContext` layout (a
1024-byte packed little-endian struct), and every expected value is computed with numpy.

Facts used (public sources, see each test module's docstring for the files):
- context layout: common area at 0, control at 128, attention area at 256, FFN area at 384;
- an FFN token-info descriptor is {flag i32, layer_id i32, ids i32[BS*K]}, the one of
  (session s, micro-batch m) at index s*M + m; an id >= 1_000_000 is masked;
- the FFN scheduler resets a consumed descriptor's ids with memset 0x7F (0x7F7F7F7F) and
  the batching kernel's RECV path with INT32_MAX.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np
import torch

from afd_dispatch.windows.memory import registered_memory

INT32_MAX = 2**31 - 1
MASK_ID = 1_000_000  # ids >= this are masked (never batched)
RESET_7F = 0x7F7F7F7F  # what ffn_worker_scheduler leaves in a consumed descriptor's ids
CONTEXT_BYTES = 1024
CONTEXT_RESERVED_TAIL = 640  # reserve6: bytes [640, 1024) are read by no A3 kernel


def align512(nbytes: int) -> int:
    return (nbytes + 511) // 512 * 512


# -- torch_npu ScheduleContext: (byte offset, struct format) of each field -------------------
SESSION_NUM = (0, "<I")
MICRO_BATCH_NUM = (4, "<I")
MICRO_BATCH_SIZE = (8, "<I")
SELECTED_EXPERT_NUM = (12, "<I")
EXPERT_NUM = (16, "<I")
ATTN_TO_FFN_TOKEN_SIZE = (20, "<I")
FFN_TO_ATTN_TOKEN_SIZE = (24, "<I")
SCHEDULE_MODE = (28, "<i")
RUN_FLAG = (128, "<i")
# op-plugin's test structs name three u64 of the control area's reserve (no kernel reads them)
SCHEDULE_WAIT_BUF = (136, "<Q")
FFN_WAIT_BUF = (144, "<Q")
ATTENTION_WAIT_BUF = (152, "<Q")
ATTN_INFO_BUF = (256, "<Q")
ATTN_INFO_BUF_SIZE = (264, "<Q")
ATTN_DATA_BUF = (272, "<Q")
ATTN_DATA_BUF_SIZE = (280, "<Q")
ATTN_MICRO_BATCH_ID = (288, "<I")
FFN_INFO_BUF = (384, "<Q")
FFN_INFO_BUF_SIZE = (392, "<Q")
FFN_DATA_BUF = (400, "<Q")
FFN_DATA_BUF_SIZE = (408, "<Q")
FFN_POLLING_INDEX = (416, "<Q")
FFN_LAYER_IDS_BUF = (512, "<Q")
FFN_LAYER_IDS_BUF_SIZE = (520, "<Q")
FFN_SESSION_IDS_BUF = (528, "<Q")
FFN_SESSION_IDS_BUF_SIZE = (536, "<Q")
FFN_MICRO_BATCH_IDS_BUF = (544, "<Q")
FFN_MICRO_BATCH_IDS_BUF_SIZE = (552, "<Q")
FFN_EXPERT_IDS_BUF = (560, "<Q")
FFN_EXPERT_IDS_BUF_SIZE = (568, "<Q")
FFN_OUT_NUM = (576, "<I")

Field = tuple[int, str]


class Context:
    """A hand-built schedule context: the int8[1024] tensor the ops take, packed with struct."""

    def __init__(self, *fields: tuple[Field, int]) -> None:
        self.tensor = torch.zeros(CONTEXT_BYTES, dtype=torch.int8)
        self.put_all(*fields)

    def put(self, field: Field, value: int) -> None:
        offset, fmt = field
        raw = np.frombuffer(struct.pack(fmt, value), dtype=np.int8)
        self.tensor.numpy()[offset : offset + raw.size] = raw

    def put_all(self, *fields: tuple[Field, int]) -> None:
        """Puts each (field, value) in turn."""
        for field, value in fields:
            self.put(field, value)

    def get(self, field: Field) -> int:
        return field_of(self.snapshot(), field)

    def snapshot(self) -> bytes:
        return self.tensor.numpy().tobytes()


def common_area(
    *,
    num_attention_ranks: int,
    micro_batches: int,
    batch_size: int,
    selected_experts: int,
    experts: int,
    attn_to_ffn_token_size: int,
    ffn_to_attn_token_size: int,
    schedule_mode: int,
) -> tuple[tuple[Field, int], ...]:
    """(field, value) of the common area (counts, token sizes, schedule_mode) and run_flag 1."""
    return (
        (SESSION_NUM, num_attention_ranks),
        (MICRO_BATCH_NUM, micro_batches),
        (MICRO_BATCH_SIZE, batch_size),
        (SELECTED_EXPERT_NUM, selected_experts),
        (EXPERT_NUM, experts),
        (ATTN_TO_FFN_TOKEN_SIZE, attn_to_ffn_token_size),
        (FFN_TO_ATTN_TOKEN_SIZE, ffn_to_attn_token_size),
        (SCHEDULE_MODE, schedule_mode),
        (RUN_FLAG, 1),
    )


# the dummy addresses op-plugin's tests write into the three wait buffers (no kernel reads them)
OP_PLUGIN_WAIT_BUFS = (
    (SCHEDULE_WAIT_BUF, 0x1000),
    (FFN_WAIT_BUF, 0x2000),
    (ATTENTION_WAIT_BUF, 0x3000),
)


def context_bytes(ctx: torch.Tensor) -> bytes:
    return ctx.numpy().view(np.uint8).tobytes()


def field_of(raw: bytes, field: Field) -> int:
    return int(struct.unpack_from(field[1], raw, field[0])[0])


def with_fields(raw: bytes, *changes: tuple[Field, int]) -> bytes:
    """`raw` context bytes with some fields rewritten."""
    out = bytearray(raw)
    for (offset, fmt), value in changes:
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def assert_context(got: torch.Tensor, want: bytes) -> None:
    """Every byte of a context an A3 kernel reads or writes ([0, 640)), with the first
    differing bytes named on failure. The reserved tail [640, 1024) is left out: no A3
    kernel touches it, and the reference documents two bookkeeping fields of its own there
    (kernels/reference/schedule_context.py: last layer id at 640, micro-batch count at 648).
    """
    have = context_bytes(got)
    end = CONTEXT_RESERVED_TAIL
    if have[:end] == want[:end]:
        return
    diff = [i for i in range(end) if have[i] != want[i]]
    raise AssertionError(
        f"schedule context differs at bytes {diff[:16]}{' ...' if len(diff) > 16 else ''}: "
        f"got {have[diff[0] : diff[0] + 8].hex()} want {want[diff[0] : diff[0] + 8].hex()} "
        f"at byte {diff[0]}"
    )


@contextmanager
def registered(*tensors: torch.Tensor, timeout_s: float = 5.0) -> Iterator[list[int]]:
    """Register buffers as the reference's "device memory"; yields their addresses."""
    with registered_memory(*tensors, timeout_s=timeout_s) as addresses:
        yield addresses


# -- seeded generation ----------------------------------------------------------------------
def rng_for(name: str) -> np.random.Generator:
    """Our own seeding: CRC-32 of the case name (the golden hashes the name its own way)."""
    return np.random.default_rng(zlib.crc32(name.encode()))


@cache
def _half_table(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(all 65536 codes, their values as float64) of fp16 or bf16."""
    codes = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # the NaN codes
        if kind == "fp16":
            values = codes.view(np.float16).astype(np.float64)
        else:
            values = bf16_to_f32(codes).astype(np.float64)
    return codes, values


def constant_code(value: float, kind: str) -> int:
    """The encoding of an exact constant (+-0, inf, nan, subnormal, max) in fp16/bf16/int8."""
    if kind == "int8":
        assert float(value).is_integer() and -128 <= value <= 127, value
        return int(value)
    if np.isnan(value):
        # the quiet NaN each format's conversion from float32 produces
        return 0x7E00 if kind == "fp16" else 0x7FC0
    codes, values = _half_table(kind)
    hit = codes[(values == value) & (np.signbit(values) == np.signbit(value))]
    assert hit.size == 1, f"{value!r} is not exactly representable in {kind}"
    return int(hit[0])


def sample_codes(
    rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float, kind: str
) -> np.ndarray:
    """Payload values as the golden draws them: equal bounds give that exact constant;
    otherwise each value is uniform over the finite encodings whose value is in [lo, hi].

    Returns uint16 codes for fp16/bf16, int8 values for int8.
    """
    if lo == hi or (np.isnan(lo) and np.isnan(hi)):
        code = constant_code(lo, kind)
        return np.full(shape, code, dtype=np.int8 if kind == "int8" else np.uint16)
    if kind == "int8":
        return rng.integers(int(np.ceil(lo)), int(np.floor(hi)) + 1, size=shape).astype(np.int8)
    codes, values = _half_table(kind)
    pool = codes[np.isfinite(values) & (values >= lo) & (values <= hi)]
    assert pool.size, (lo, hi, kind)
    return pool[rng.integers(0, pool.size, size=shape)]


def sample_f32(
    rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float
) -> np.ndarray:
    """float32 values: the exact constant for equal bounds, else uniform reals in [lo, hi]."""
    if lo == hi or (np.isnan(lo) and np.isnan(hi)):
        return np.full(shape, lo, dtype=np.float32)
    out = rng.uniform(lo, hi, size=shape).astype(np.float32)
    return np.clip(out, np.float32(lo), np.float32(hi))


def uniform_f32(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """n float32 values uniform in [lo, hi), generated in float32 (fast for big buffers)."""
    out = rng.random(n, dtype=np.float32)
    out *= np.float32(hi - lo)
    out += np.float32(lo)
    return out


# -- 16-bit float conversions (numpy has fp16; bf16 is done on the bits) ---------------------
def bf16_to_f32(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 codes, to nearest, ties to even (quiet NaN kept).

    Integer arithmetic on the bits (independent of torch's cast): add 0x7FFF plus the
    lowest kept bit, drop 16 bits. Only NaN bit patterns can wrap; they are redone apart.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + ((bits >> 16) & 1)
    rounded += 0x7FFF
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def to_bf16_fast(values: np.ndarray) -> np.ndarray:
    """Input generation only: float32 to bf16 codes with torch's (round-to-nearest-even)
    cast, several times faster than `f32_to_bf16` on big buffers."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def decode16(codes: np.ndarray, kind: str) -> np.ndarray:
    """fp16 / bf16 codes to float32 (exact)."""
    if kind == "fp16":
        return codes.view(np.float16).astype(np.float32)
    return bf16_to_f32(codes)


def encode16(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 to fp16 / bf16 codes, one rounding to nearest even (overflow to inf)."""
    if kind == "fp16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16).view(np.uint16)
    return f32_to_bf16(values)


# -- byte comparisons -----------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a tensor as a uint8 array (shape [..., row bytes])."""
    t = t.contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8).numpy()


def assert_same_bytes(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Byte-exact equality (NaN payloads and -0 matter); names the first differing row."""
    got = np.ascontiguousarray(got).view(np.uint8)
    want = np.ascontiguousarray(want).view(np.uint8)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != expected {want.shape}"
    if np.array_equal(got, want):
        return
    rows = got.reshape(got.shape[0], -1) if got.ndim > 1 else got.reshape(-1, 1)
    wrows = want.reshape(rows.shape)
    bad = np.flatnonzero((rows != wrows).any(axis=1))
    i = int(bad[0])
    col = int(np.flatnonzero(rows[i] != wrows[i])[0])
    have, expected = rows[i, col : col + 8].tobytes(), wrows[i, col : col + 8].tobytes()
    raise AssertionError(
        f"{what}: {bad.size} of {rows.shape[0]} rows differ; first row {i}, byte {col}: "
        f"got {have.hex()} want {expected.hex()}"
    )
