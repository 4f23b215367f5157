"""The C loops (`kernels/reference/_native.c`) write the bytes the torch code writes.

Each case runs the same call twice, natively and under `native_disabled()`, and compares
every byte, on values chosen to hit the edges: -0, subnormals, huge values, all-zero rows,
exact ties of the int8 rounding. The golden and byte tests run the whole ops on top.
"""

from __future__ import annotations

import pytest
import torch

from afd_dispatch.errors import AFDInputError
from afd_dispatch.kernels.reference import rows
from afd_dispatch.kernels.reference.rows import (
    move_rows,
    native_available,
    native_disabled,
    output_buffer,
    quantize_into,
    weighted_sum,
)


def test_the_extension_was_built() -> None:
    """setup.sh builds it on this machine (gcc is here): a silent fallback would hide a
    broken build behind slow ops."""
    assert rows._native is not None
    assert native_available()


def edgy(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).pow(8) * 1e3
    flat = x.view(-1)
    picks = torch.randint(0, flat.numel(), (6, max(1, flat.numel() // 50)), generator=gen)
    flat[picks[0]] = -0.0
    flat[picks[1]] = 1e-40  # subnormal in float32 and bfloat16
    huge = 0.9 * torch.finfo(dtype).max if dtype.is_floating_point else 3e38
    flat[picks[2]] = huge
    flat[picks[3]] = -huge
    flat[picks[4]] = 0.5
    flat[picks[5]] = -2.5
    return x.to(dtype)


def both(fn):  # type: ignore[no-untyped-def]
    native = fn()
    with native_disabled():
        reference = fn()
    return native, reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("topk", [0, 1, 8])
def test_weighted_sum_is_bit_identical(dtype: torch.dtype, topk: int) -> None:
    tokens, slots, hidden = 37, topk + 1, 200
    d = edgy((tokens, slots, hidden), dtype, seed=topk)
    w = edgy((tokens, max(topk, 1)), torch.float32, seed=99).abs() / 1e3
    native, reference = both(lambda: weighted_sum(d, w, topk, dtype))
    assert native.dtype == dtype
    assert torch.equal(native.view(torch.uint8), reference.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_quantize_is_bit_identical(dtype: torch.dtype) -> None:
    hidden, stride = 300, 300 + 128
    x = edgy((41, hidden), dtype, seed=3)
    x[5] = 0  # an all-zero row: q = 0, scale 0
    x[6, :] = 0.0
    x[6, 0] = 127.0  # ds = 1: the rounding ties of x * ds are exact halves
    x[6, 1:5] = torch.tensor([0.5, 1.5, -2.5, 126.5])

    def run() -> torch.Tensor:
        out = torch.full((41, stride), 0x55, dtype=torch.int8)
        assert quantize_into(x, out)
        return out

    native, reference = both(run)
    assert torch.equal(native, reference)
    assert native[6, 1:5].tolist() == [0, 2, -2, 126]  # half to even


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_quantize_reports_a_non_finite_value(bad: float) -> None:
    x = torch.randn(4, 64).to(torch.bfloat16)
    x[2, 17] = bad
    out = torch.empty(4, 64 + 8, dtype=torch.int8)
    native, reference = both(lambda: quantize_into(x, out))
    assert native is False and reference is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_move_rows_scatter_and_gather(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    source = torch.randint(-100, 100, (50, 72), generator=gen).to(dtype)
    window = torch.randint(-100, 100, (200, 96), generator=gen).to(dtype)
    dst_index = torch.randperm(200, generator=gen)[:64]
    src_index = torch.randint(0, 50, (64,), generator=gen)

    def scatter() -> torch.Tensor:
        out = window.clone()
        move_rows(out[:, :72], dst_index, source, src_index, 64)  # strided rows: a slice
        return out

    def gather() -> torch.Tensor:
        out = torch.zeros(64, 72, dtype=dtype)
        move_rows(out, None, window[:, 10:82], dst_index, 64)
        return out

    for fn in (scatter, gather):
        native, reference = both(fn)
        assert torch.equal(native, reference)
    expected = window.clone()
    expected[dst_index, :72] = source[src_index]
    assert torch.equal(scatter(), expected)


def test_move_rows_refuses_an_index_out_of_range() -> None:
    dst = torch.zeros(8, 16)
    src = torch.ones(4, 16)
    with pytest.raises(AFDInputError, match=r"slot row.*\[0, 8\).*9 <- 1"):
        move_rows(dst, torch.tensor([0, 9]), src, torch.tensor([0, 1]), 2, "slot row")
    assert dst[0].eq(1).all() and dst[1:].eq(0).all()  # rows before the bad one only


def test_output_buffer_is_reused_only_once_released() -> None:
    first = output_buffer((3, 1000), torch.float32)
    first.fill_(1)
    second = output_buffer((3, 1000), torch.float32)
    assert second.data_ptr() != first.data_ptr()  # `first` is still held
    kept = first[:1]
    del first
    third = output_buffer((3, 1000), torch.float32)
    assert third.data_ptr() != kept.data_ptr()  # a view of it is still held
    assert kept.eq(1).all()
    ptr = kept.data_ptr()
    del kept, second, third
    assert output_buffer((3, 1000), torch.float32).data_ptr() == ptr
