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
    d[3, 0, 5] = float("nan")  # a NaN sum: torch's NaN bytes, whichever conversion it takes
    d[4, 0, 6], d[4, -1, 6] = float("inf"), float("-inf")  # inf - inf
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


# -- whole ops: the C fast paths against the torch code, byte for byte ----------------------
def run_four_ops(quant: bool, seed: int) -> list[bytes]:
    """A2F from both sessions and micro-batches, batching on every FFN rank, F2A of random
    results, combine: every window's bytes after each step and every op output's, in order."""
    from afd_dispatch.kernels import reference as ref
    from afd_dispatch.layout import WindowLayout, token_dtype_code
    from afd_dispatch.placement import build_expert_rank_table, local_experts
    from afd_dispatch.topology import RankTopology
    from afd_dispatch.windows import create_window_group

    topology = RankTopology(num_attention_ranks=2, num_ffn_ranks=3)
    sessions, micro_batches, bs, topk, shared, hidden, experts = 2, 2, 6, 3, 1, 64, 9
    dtype = torch.bfloat16
    layout = WindowLayout(sessions, micro_batches, bs, topk, shared, hidden, dtype, quant)
    name = f"native-vs-torch-{quant}-{seed}-{native_available()}"
    group = create_window_group(name, topology, layout, "inproc")
    gen = torch.Generator().manual_seed(seed)
    table = build_expert_rank_table(topology, experts, shared, replicas={0: 2, 4: 3})
    shapes = layout.op_shapes
    snapshots: list[bytes] = []

    def windows() -> None:
        snapshots.extend(group.read_window(r) for r in range(topology.world_size))

    try:
        for s in range(sessions):
            for m in range(micro_batches):
                x = torch.randn(1, bs, hidden, generator=gen).to(dtype)
                ids = torch.rand(bs, experts, generator=gen).argsort(dim=1)[:, :topk]
                mask = torch.arange(bs) < bs - s - m  # a masked tail too
                ref.npu_attention_to_ffn(
                    x, torch.tensor([s]), torch.tensor([m]), torch.tensor([7 + m]),
                    ids.to(torch.int32).unsqueeze(0), table, name, topology.world_size,
                    shapes["ffn_token_info_table_shape"], shapes["ffn_token_data_shape"],
                    shapes["attn_token_info_table_shape"], experts,
                    active_mask=mask.unsqueeze(0), quant_mode=2 if quant else 0,
                )  # fmt: skip
                windows()
        code = 2 if quant else token_dtype_code(dtype)
        for m in range(micro_batches):
            for r in topology.ffn_ranks:
                expert_num = max(1, len(local_experts(table, r)))
                ctx = ref.context_for(group, r, expert_num).get_schedule_context_tensor()
                sc_put_polling(ctx, m)  # a fresh context polls micro-batch 0
                out = ref.npu_ffn_worker_batching(
                    ctx, expert_num, [sessions, bs, layout.slots, hidden],
                    token_dtype=code, need_schedule=1,
                )  # fmt: skip
                count = int(out[-1][0])
                snapshots.extend(t[:count].contiguous().view(torch.uint8).numpy().tobytes()
                                 for t in (out[0], *out[2:7]))  # fmt: skip
                snapshots.append(out[1].numpy().tobytes())
                results = torch.randn(out[0].shape[0], hidden, generator=gen).to(dtype)
                ref.npu_ffn_to_attention(
                    results, *out[2:6], out[7], name, topology.world_size,
                    shapes["token_info_table_shape"], shapes["token_data_shape"],
                    attn_rank_table=torch.tensor(topology.attention_ranks, dtype=torch.int32),
                )  # fmt: skip
                windows()
        for s in range(sessions):
            ctx = ref.context_for(group, topology.attention_rank(s)).get_schedule_context_tensor()
            for _ in range(micro_batches):
                weights = torch.rand(bs, topk, generator=gen)
                y, _ = ref.npu_attention_worker_combine(
                    ctx, weights, torch.tensor([0]), hidden,
                    token_dtype=token_dtype_code(dtype), need_schedule=1,
                )  # fmt: skip
                snapshots.append(y.view(torch.uint8).numpy().tobytes())
        windows()
    finally:
        group.close()
    return snapshots


def sc_put_polling(ctx: torch.Tensor, m: int) -> None:
    from afd_dispatch.kernels.reference import schedule_context as sc

    sc.put(ctx, sc.FFN_POLLING_INDEX, m)


@pytest.mark.parametrize("quant", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_four_ops_write_the_same_bytes_natively(quant: bool, seed: int) -> None:
    native = run_four_ops(quant, seed)
    with native_disabled():
        reference = run_four_ops(quant, seed)
    assert len(native) == len(reference) > 20
    for i, (a, b) in enumerate(zip(native, reference, strict=True)):
        assert a == b, f"snapshot {i} differs"


def test_quantize_refuses_rows_too_narrow_for_values_and_scale() -> None:
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="out"):
        quantize_into(x, torch.empty(3, 64 + 3, dtype=torch.int8))


def test_a2f_refuses_a_corrupt_table_row_before_writing() -> None:
    """A table changed behind its version (through NumPy) is caught by the C loop, which
    checks every slot before it writes one, and the error names the row."""
    from afd_dispatch.kernels import reference as ref
    from afd_dispatch.layout import WindowLayout
    from afd_dispatch.placement import build_expert_rank_table
    from afd_dispatch.topology import RankTopology
    from afd_dispatch.windows import create_window_group

    topology = RankTopology(num_attention_ranks=1, num_ffn_ranks=2)
    layout = WindowLayout(1, 1, 4, 2, 1, 32, torch.float32, False)
    group = create_window_group("native-corrupt-table", topology, layout, "inproc")
    try:
        table = build_expert_rank_table(topology, 6, 1)
        ids = torch.tensor([[[0, 1], [2, 3], [4, 5], [3, 0]]], dtype=torch.int32)
        shapes = layout.op_shapes

        def send() -> None:
            ref.npu_attention_to_ffn(
                torch.ones(1, 4, 32), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                ids, table, group.name, topology.world_size,
                shapes["ffn_token_info_table_shape"], shapes["ffn_token_data_shape"],
                shapes["attn_token_info_table_shape"], 6,
            )  # fmt: skip

        send()  # checks the table once, for its version
        for r in topology.ffn_ranks:
            group.ffn_views(r)[0][:, :, 0] = 0  # consumed
        before = [group.read_window(r) for r in range(topology.world_size)]
        table.numpy()[0, 3, 0] = 0  # expert 3: no replica, and no version bump
        with pytest.raises(AFDInputError, match=r"expert_rank_table row 3 \(slot 1 of token 1\)"):
            send()
        assert [group.read_window(r) for r in range(topology.world_size)] == before
    finally:
        group.close()
