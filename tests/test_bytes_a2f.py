"""npu_attention_to_ffn, byte by byte: every window of the group against a hand-built one.

Group: A = 2 attention ranks, F = 2 FFN ranks. FFN ranks come first, so ranks 0 and 1 are
FFN ranks and session s is attention rank 2 + s. Expert placement (the table below, read
by hand in each test): moe_expert_num = 4 routed experts, up to 2 shared experts.

    global row   count  replica 0        replica 1
    0 routed     1      rank 0 local 0
    1 routed     2      rank 1 local 0   rank 0 local 2
    2 routed     1      rank 0 local 1
    3 routed     1      rank 1 local 1
    4 shared 0   1      rank 1 local 2
    5 shared 1   2      rank 1 local 3   rank 0 local 3

Replica choice is session_id % count: session 0 takes replica 0, session 1 replica 1 of
rows 1 and 5.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from expected_bytes import (
    Dims,
    ExpectedAttnWindow,
    ExpectedFfnWindow,
    ExpectedWindow,
    assert_windows,
    bf16_bytes,
    f32,
    f32_bits,
    f32_bytes,
    initial_windows,
    quant_row_bytes,
    quantize_by_spec,
    window_group,
)

from afd_dispatch import AFDInputError, AFDTimeoutError, WindowGroup
from afd_dispatch.kernels.reference import npu_attention_to_ffn

A, F = 2, 2
WORLD_SIZE = A + F
MOE_EXPERT_NUM = 4
UNUSED = -1
_TABLE_ROWS = [
    [1, 0, 0, UNUSED, UNUSED],
    [2, 1, 0, 0, 2],
    [1, 0, 1, UNUSED, UNUSED],
    [1, 1, 1, UNUSED, UNUSED],
    [1, 1, 2, UNUSED, UNUSED],
    [2, 1, 3, 0, 3],
]
QUANT_INT8 = 2


def expert_rank_table(shared: int) -> torch.Tensor:
    """(1, 4 + shared, 5) int32: the routed rows, then the first `shared` shared rows."""
    return torch.tensor([_TABLE_ROWS[: MOE_EXPERT_NUM + shared]], dtype=torch.int32)


def ramp(t: int, hidden: int, base: int = 1) -> list[float]:
    """Token t's values: +-(base + t*H + h) / 4, exact in bf16 while base + t*H + h < 256."""
    return [(-1) ** h * (base + t * hidden + h) / 4 for h in range(hidden)]


def send(
    group: WindowGroup,
    dims: Dims,
    x: list[list[float]],
    expert_ids: list[list[int]],
    *,
    session: int,
    micro_batch: int,
    layer: int,
    dtype: torch.dtype = torch.bfloat16,
    mask: list[bool] | None = None,
    scales: torch.Tensor | None = None,
    sync_flag: int = 0,
) -> None:
    npu_attention_to_ffn(
        torch.tensor([x], dtype=dtype),
        torch.tensor([session]),
        torch.tensor([micro_batch]),
        torch.tensor([layer]),
        torch.tensor([expert_ids], dtype=torch.int32),
        expert_rank_table(dims.S),
        group.name,
        WORLD_SIZE,
        dims.ffn_token_info_table_shape,
        dims.ffn_token_data_shape,
        dims.attn_token_info_table_shape,
        MOE_EXPERT_NUM,
        scales=scales,
        active_mask=None if mask is None else torch.tensor([mask]),
        quant_mode=QUANT_INT8 if dims.quant else 0,
        sync_flag=sync_flag,
    )


def ffn(windows: dict[int, ExpectedWindow], rank: int) -> ExpectedFfnWindow:
    window = windows[rank]
    assert isinstance(window, ExpectedFfnWindow)
    return window


def attn(windows: dict[int, ExpectedWindow], rank: int) -> ExpectedAttnWindow:
    window = windows[rank]
    assert isinstance(window, ExpectedAttnWindow)
    return window


def expect_sent(
    want: dict[int, ExpectedWindow],
    s: int,
    m: int,
    layer: int,
    routes: dict[tuple[int, int], tuple[int, int]],
    rows: Sequence[bytes],
) -> None:
    """Adds one send to `want`: each (token, slot)'s id and row on its rank, both headers."""
    for (t, e), (rank, local) in routes.items():
        ffn(want, rank).slot(s, m, t, e, local)
        ffn(want, rank).row(s, m, t, e, rows[t])
    for rank in (0, 1):
        ffn(want, rank).header(s, m, flag=1, layer=layer)


# -- no quantization -------------------------------------------------------------------------
def test_bf16_rows_ids_and_headers_land_at_spec_offsets() -> None:
    dims = Dims(A=2, M=2, BS=2, K=2, S=0, H=32)
    s, m, layer = 1, 1, 7
    x = [ramp(0, 32), ramp(1, 32)]
    # (token, slot) -> (FFN rank, local id), read off the table: experts 0, 3 / 3, 2
    routes = {(0, 0): (0, 0), (0, 1): (1, 1), (1, 0): (1, 1), (1, 1): (0, 1)}
    with window_group(dims, F, torch.bfloat16) as group:
        send(group, dims, x, [[0, 3], [3, 2]], session=s, micro_batch=m, layer=layer)
        want = initial_windows(group, dims)
        expect_sent(want, s, m, layer, routes, [bf16_bytes(row) for row in x])
        assert_windows(group, want)


def test_fp32_rows_keep_all_four_bytes() -> None:
    dims = Dims(A=2, M=2, BS=3, K=1, S=0, H=32, elem=4)
    s, m, layer = 0, 0, 2
    # 1 + h * 2**-20 needs the low mantissa bits a bf16 copy would drop
    x = [[(t + 1) * (1 + h * 2**-20) for h in range(32)] for t in range(3)]
    # session 0: expert 1 -> replica 0 (rank 1 local 0); expert 2 -> rank 0 local 1
    routes = {(0, 0): (1, 0), (1, 0): (0, 1), (2, 0): (1, 0)}
    with window_group(dims, F, torch.float32) as group:
        send(
            group,
            dims,
            x,
            [[1], [2], [1]],
            session=s,
            micro_batch=m,
            layer=layer,
            dtype=torch.float32,
        )
        want = initial_windows(group, dims)
        expect_sent(want, s, m, layer, routes, [f32_bytes(row) for row in x])
        assert_windows(group, want)


def test_shared_experts_follow_routed_rows_of_the_table() -> None:
    dims = Dims(A=2, M=2, BS=2, K=1, S=2, H=32)  # E = 3: slot 0 routed, slots 1, 2 shared
    s, m, layer = 1, 0, 4
    x = [ramp(0, 32), ramp(1, 32)]
    # slot 1 = shared 0 = row 4 (rank 1 local 2); slot 2 = shared 1 = row 5, session 1 takes
    # replica 1 (rank 0 local 3); routed experts 0 (rank 0 local 0) and 3 (rank 1 local 1)
    routes = {
        (0, 0): (0, 0),
        (0, 1): (1, 2),
        (0, 2): (0, 3),
        (1, 0): (1, 1),
        (1, 1): (1, 2),
        (1, 2): (0, 3),
    }
    with window_group(dims, F, torch.bfloat16) as group:
        send(group, dims, x, [[0], [3]], session=s, micro_batch=m, layer=layer)
        want = initial_windows(group, dims)
        expect_sent(want, s, m, layer, routes, [bf16_bytes(row) for row in x])
        assert_windows(group, want)


def test_replica_is_chosen_by_session_not_by_token() -> None:
    dims = Dims(A=2, M=2, BS=2, K=1, S=0, H=32)
    layer = 3
    x0 = [ramp(0, 32), ramp(1, 32)]
    x1 = [ramp(0, 32, base=100), ramp(1, 32, base=100)]
    with window_group(dims, F, torch.bfloat16) as group:
        # session 0: expert 1 -> replica 0 = rank 1 local 0; expert 0 -> rank 0 local 0
        send(group, dims, x0, [[1], [0]], session=0, micro_batch=0, layer=layer)
        # session 1: both tokens pick expert 1 -> replica 1 % 2 = 1 = rank 0 local 2
        send(group, dims, x1, [[1], [1]], session=1, micro_batch=0, layer=layer)
        want = initial_windows(group, dims)
        routes = {
            (0, 0, 0): (1, 0, x0[0]),
            (0, 1, 0): (0, 0, x0[1]),
            (1, 0, 0): (0, 2, x1[0]),
            (1, 1, 0): (0, 2, x1[1]),
        }
        for (s, t, e), (rank, local, row) in routes.items():
            ffn(want, rank).slot(s, 0, t, e, local)
            ffn(want, rank).row(s, 0, t, e, bf16_bytes(row))
        for rank in (0, 1):
            for s in (0, 1):
                ffn(want, rank).header(s, 0, flag=1, layer=layer)
        assert_windows(group, want)


@pytest.mark.parametrize("sync_flag", [0, 1])
def test_sync_flag_decides_which_ffn_ranks_get_the_header(sync_flag: int) -> None:
    dims = Dims(A=2, M=2, BS=2, K=2, S=0, H=32)
    s, m, layer = 0, 1, 5
    x = [ramp(0, 32), ramp(1, 32)]
    # experts 0 and 2 both live on rank 0: rank 1 receives no slot
    routes = {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 0}
    with window_group(dims, F, torch.bfloat16) as group:
        send(
            group,
            dims,
            x,
            [[0, 2], [2, 0]],
            session=s,
            micro_batch=m,
            layer=layer,
            sync_flag=sync_flag,
        )
        want = initial_windows(group, dims)
        for (t, e), local in routes.items():
            ffn(want, 0).slot(s, m, t, e, local)
            ffn(want, 0).row(s, m, t, e, bf16_bytes(x[t]))
        ffn(want, 0).header(s, m, flag=1, layer=layer)
        if sync_flag == 0:  # every FFN rank, also the one that received nothing
            ffn(want, 1).header(s, m, flag=1, layer=layer)
        assert_windows(group, want)


# -- active_mask -----------------------------------------------------------------------------
def test_masked_tokens_send_nothing_and_preset_own_attention_flags() -> None:
    dims = Dims(A=2, M=2, BS=3, K=1, S=1, H=32)
    s, m, layer = 1, 1, 9
    own_rank = 2 + s
    x = [ramp(0, 32), ramp(1, 32), ramp(2, 32)]
    # token 2 is masked: its expert id 99 is out of range and must not even be looked at
    ids = [[3], [0], [99]]
    routes = {(0, 0): (1, 1), (0, 1): (1, 2), (1, 0): (0, 0), (1, 1): (1, 2)}
    with window_group(dims, F, torch.bfloat16) as group:
        send(group, dims, x, ids, session=s, micro_batch=m, layer=layer, mask=[True, True, False])
        want = initial_windows(group, dims)
        expect_sent(want, s, m, layer, routes, [bf16_bytes(row) for row in x])
        for e in range(dims.E):  # attn_info[m, t, :] = 1 for the masked token t = 2 only
            attn(want, own_rank).flag(m, 2, e)
        assert_windows(group, want)


def test_non_prefix_mask_is_rejected_before_any_write() -> None:
    dims = Dims(A=2, M=2, BS=3, K=1, S=0, H=32)
    x = [ramp(0, 32), ramp(1, 32), ramp(2, 32)]
    with window_group(dims, F, torch.bfloat16) as group:
        with pytest.raises(AFDInputError, match="active_mask"):
            send(
                group,
                dims,
                x,
                [[0], [1], [2]],
                session=0,
                micro_batch=0,
                layer=0,
                mask=[True, False, True],
            )
        assert_windows(group, initial_windows(group, dims))


# -- int8 quantization -----------------------------------------------------------------------
HALF_WAY_TOKEN = [63.5, 1.25, 1.75, -1.25, -1.75, 0.25, 0.75, -0.25, -0.75] + [0.0] * 23
# amax = 63.5 -> ds = 127 / 63.5 = 2 exactly, so y = 2x lands on .5 for all but the first:
# 2.5 -> 2, 3.5 -> 4, -2.5 -> -2, -3.5 -> -4, 0.5 -> 0, 1.5 -> 2, -0.5 -> 0, -1.5 -> -2
HALF_WAY_Q = [127, 2, 4, -2, -4, 0, 2, 0, -2] + [0] * 23
HALF_WAY_SCALE = 0.5  # float32(1 / 2)

# amax = 1.3125: ds = float32(127 / 1.3125) = 96.76190185546875, and float32(1 / ds) is one
# unit in the last place above float32(1.3125 / 127)
LAST_BIT_TOKEN = [1.3125, -1.0, 0.5, -0.25, 0.125, 1.25, -1.171875, 0.0078125] + [0.0] * 24


def test_last_bit_token_really_tells_the_two_scales_apart() -> None:
    amax = f32(1.3125)
    ds = f32(127.0) / amax
    assert float(ds) == 96.76190185546875
    stored, naive = f32(1.0) / ds, amax / f32(127.0)
    assert f32_bits(float(stored)) == f32_bits(float(naive)) + 1


def test_spec_quantizer_matches_the_hand_worked_half_way_row() -> None:
    assert quantize_by_spec(HALF_WAY_TOKEN) == (HALF_WAY_Q, HALF_WAY_SCALE)


def test_int8_rows_hold_q_then_scale_at_byte_h() -> None:
    dims = Dims(A=2, M=2, BS=3, K=1, S=0, H=32, quant=True)
    s, m, layer = 0, 0, 1
    zero_token = [0.0] * 32
    x = [HALF_WAY_TOKEN, LAST_BIT_TOKEN, zero_token]
    last_bit_q, last_bit_scale = quantize_by_spec(LAST_BIT_TOKEN)
    assert last_bit_scale != float(f32(1.3125) / f32(127.0))
    expected_rows = [
        quant_row_bytes(HALF_WAY_Q, HALF_WAY_SCALE, 32),
        quant_row_bytes(last_bit_q, last_bit_scale, 32),
        quant_row_bytes([0] * 32, 0.0, 32),  # all-zero row: q 0, scale +0.0
    ]
    # experts 0 / 3 / 2 -> rank 0 local 0 / rank 1 local 1 / rank 0 local 1
    routes = {(0, 0): (0, 0), (1, 0): (1, 1), (2, 0): (0, 1)}
    with window_group(dims, F, torch.bfloat16) as group:
        send(group, dims, x, [[0], [3], [2]], session=s, micro_batch=m, layer=layer)
        want = initial_windows(group, dims)
        expect_sent(want, s, m, layer, routes, expected_rows)
        assert_windows(group, want)


def test_smooth_scales_quantize_each_slot_with_its_expert_row() -> None:
    dims = Dims(A=2, M=2, BS=2, K=2, S=1, H=32, quant=True)  # G = 5 rows of scales
    s, m, layer = 0, 1, 6
    x = [ramp(0, 32), ramp(1, 32)]
    # scales[0, g, h]: every row differs, and not by one common factor (h-dependent)
    scales = [[(g + 1) * 0.25 + (h % 3) * 0.125 for h in range(32)] for g in range(5)]
    ids = [[0, 3], [2, 0]]
    # (token, slot) -> (global row g, FFN rank, local id); slot 2 is shared row 4
    routes = {
        (0, 0): (0, 0, 0),
        (0, 1): (3, 1, 1),
        (0, 2): (4, 1, 2),
        (1, 0): (2, 0, 1),
        (1, 1): (0, 0, 0),
        (1, 2): (4, 1, 2),
    }
    with window_group(dims, F, torch.bfloat16) as group:
        send(
            group,
            dims,
            x,
            ids,
            session=s,
            micro_batch=m,
            layer=layer,
            scales=torch.tensor([scales], dtype=torch.float32),
        )
        want = initial_windows(group, dims)
        rows_seen = set()
        for (t, e), (g, rank, local) in routes.items():
            xf = [float(f32(v) * f32(c)) for v, c in zip(x[t], scales[g], strict=True)]
            q, scale = quantize_by_spec(xf)
            row = quant_row_bytes(q, scale, 32)
            rows_seen.add(row)
            ffn(want, rank).slot(s, m, t, e, local)
            ffn(want, rank).row(s, m, t, e, row)
        assert len(rows_seen) == len(routes)  # the smooth scales made every slot differ
        for rank in (0, 1):
            ffn(want, rank).header(s, m, flag=1, layer=layer)
        assert_windows(group, want)


# -- back-pressure ---------------------------------------------------------------------------
def test_second_send_to_an_unconsumed_row_times_out_and_writes_nothing() -> None:
    dims = Dims(A=2, M=2, BS=2, K=1, S=0, H=32)
    x = [ramp(0, 32), ramp(1, 32)]
    other_x = [ramp(0, 32, base=100), ramp(1, 32, base=100)]
    with window_group(dims, F, torch.bfloat16, timeout_s=0.3) as group:
        send(group, dims, x, [[0], [3]], session=0, micro_batch=0, layer=1)
        want = initial_windows(group, dims)
        expect_sent(want, 0, 0, 1, {(0, 0): (0, 0), (1, 0): (1, 1)}, [bf16_bytes(row) for row in x])
        assert_windows(group, want)

        # nobody consumed (s=0, m=0): the flags are still 1 on both FFN ranks
        with pytest.raises(AFDTimeoutError) as info:
            send(
                group,
                dims,
                other_x,
                [[2], [1]],
                session=0,
                micro_batch=0,
                layer=2,
                mask=[True, False],
            )
        message = str(info.value)
        for part in ("attention rank 2", "session 0", "micro-batch 0"):
            assert part in message
        assert_windows(group, want)  # no row, id, header or attention flag was written

        # another micro-batch's row is free: the same call for m = 1 goes through
        send(group, dims, other_x, [[2], [1]], session=0, micro_batch=1, layer=2)
        routes = {
            (0, 0): (0, 1),  # expert 2 -> rank 0 local 1
            (1, 0): (1, 0),  # expert 1, session 0 -> replica 0: rank 1 local 0
        }
        expect_sent(want, 0, 1, 2, routes, [bf16_bytes(row) for row in other_x])
        assert_windows(group, want)
