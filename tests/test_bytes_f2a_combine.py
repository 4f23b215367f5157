"""npu_ffn_to_attention and npu_attention_worker_combine, byte by byte.

Group: A = 2 attention ranks, F = 2 FFN ranks, M = 2, BS = 2..3, K = 1..2, S = 1, H = 32.
With FFN ranks first, session s is attention rank 2 + s. An attention window holds
info int32 [M, BS, E] at byte 0 and result rows of H elements at align512(M*BS*E*4),
row (m*BS + t)*E + e.

Combine's expected values follow the spec's float32 order, in numpy float32 (one rounding
per multiply and per add, never fused): acc = 0; acc += float32(d_k) * w_k for k < K;
acc += float32(d_K) (the shared expert, weight 1); then one rounding to the output dtype.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from expected_bytes import (
    Dims,
    ExpectedAttnWindow,
    ExpectedWindow,
    activation_bytes,
    assert_windows,
    bf16_bytes,
    bf16_round,
    context_field,
    f32,
    f32_bytes,
    initial_windows,
    load_window,
    window_group,
)

from afd_dispatch import AFDTimeoutError, WindowGroup
from afd_dispatch.kernels.reference import (
    attention_worker_scheduler,
    attention_worker_scheduler_,
    context_for,
    npu_attention_worker_combine,
    npu_ffn_to_attention,
)

A, F = 2, 2
WORLD_SIZE = A + F
ATTN_MICRO_BATCH_ID_AT = 288  # int32 in the context (kernels/reference/schedule_context.py)
TOKEN_DTYPE = {torch.bfloat16: 1, torch.float32: 3}  # 3: the reference's fp32 extension


def result_row(i: int, hidden: int = 32) -> list[float]:
    """Row i of an FFN result: +-(1 + 40*i + h) / 4, bf16-exact for i <= 5."""
    return [(-1) ** h * (1 + 40 * i + h) / 4 for h in range(hidden)]


def attn_window(want: dict[int, ExpectedWindow], rank: int) -> ExpectedAttnWindow:
    window = want[rank]
    assert isinstance(window, ExpectedAttnWindow)
    return window


# -- npu_ffn_to_attention --------------------------------------------------------------------
F2A_DIMS = Dims(A=2, M=2, BS=2, K=1, S=1, H=32)
# row i of x: (session, micro-batch, token, expert offset); actual_token_num = 4, so rows 4
# and 5 (which would land in free places) must not be written anywhere
F2A_ROWS = [(1, 0, 1, 1), (0, 1, 0, 0), (0, 0, 0, 1), (1, 1, 1, 0), (0, 0, 1, 0), (1, 0, 0, 0)]
F2A_ACTUAL = 4


def send_results(group: WindowGroup, attn_rank_table: torch.Tensor | None) -> None:
    d = F2A_DIMS
    columns = list(zip(*F2A_ROWS, strict=True))
    npu_ffn_to_attention(
        torch.tensor([result_row(i) for i in range(len(F2A_ROWS))], dtype=torch.bfloat16),
        *(torch.tensor(c, dtype=torch.int32) for c in columns),
        torch.tensor([F2A_ACTUAL]),
        group.name,
        WORLD_SIZE,
        d.attn_token_info_table_shape,
        d.attn_token_data_shape,
        attn_rank_table=attn_rank_table,
    )


def expected_after_results(
    group: WindowGroup, rank_of_session: dict[int, int]
) -> dict[int, ExpectedWindow]:
    """Rows i < actual_token_num at (mb*BS + tok)*E + off of their session's rank, flag 1."""
    want = initial_windows(group, F2A_DIMS)
    for i, (s, mb, tok, off) in enumerate(F2A_ROWS[:F2A_ACTUAL]):
        window = attn_window(want, rank_of_session[s])
        window.row(mb, tok, off, bf16_bytes(result_row(i)))
        window.flag(mb, tok, off)
    return want


@pytest.mark.parametrize("table", [[2, 3], [3, 2]])
def test_results_land_on_the_rank_the_table_names(table: list[int]) -> None:
    with window_group(F2A_DIMS, F, torch.bfloat16) as group:
        send_results(group, torch.tensor(table, dtype=torch.int32))
        assert_windows(group, expected_after_results(group, {0: table[0], 1: table[1]}))


def test_without_a_table_the_session_id_is_the_rank() -> None:
    # attention ranks first (ffn_start_rank_id = A): session s is rank s, FFN ranks are 2, 3
    with window_group(F2A_DIMS, F, torch.bfloat16, ffn_start_rank_id=2) as group:
        assert list(group.topology.ffn_ranks) == [2, 3]
        send_results(group, None)
        assert_windows(group, expected_after_results(group, {0: 0, 1: 1}))


# -- npu_attention_worker_combine: arithmetic -------------------------------------------------
def combine_by_spec(d: list[list[float]], w: list[float]) -> list[float]:
    """float32 combine of one token: d holds K routed rows then the shared row."""
    topk = len(w)
    out = []
    for h in range(len(d[0])):
        acc = f32(0.0)
        for k in range(topk):
            acc = acc + f32(d[k][h]) * f32(w[k])
        acc = acc + f32(d[topk][h])
        out.append(float(acc))
    return out


def filler(t: int, k: int, h: int) -> float:
    return (-1) ** (h + k) * (h + 3 * k + t + 1) / 8


# Three tokens, K = 2 routed rows and one shared row each; elements 0.. are hand-worked
# cases, the rest filler. Every value is exact in bf16.
EPS7, EPS8 = 2.0**-7, 2.0**-8
ROUTED_WEIGHTS = [
    [1.0, 1.0],
    [1 + EPS7 + 2**-17, 1 + 2**-17],
    [1 + EPS8, 0.5],
]
SPECIAL = {
    # token 0, element 0: 2^24 + 1 rounds back to 2^24 (tie to even) before the shared
    # -2^24 is added, so the spec order gives 0; adding the shared row first gives 1
    (0, 0): (2.0**24, 1.0, -(2.0**24)),
    # token 1, element 0: acc = -(1 + 2^-7 + 2^-17), then (1 + 2^-7) * (1 + 2^-17) is
    # 1 + 2^-7 + 2^-17 + 2^-24, a float32 tie that rounds down: the sum is 0; a fused
    # multiply-add would keep 2^-24 (which bf16 represents too)
    (1, 0): (-1.0, 1 + EPS7, 0.0),
    # token 2 (w = 1 + 2^-8, 0.5), rounding to bf16 once, at the end:
    # 1 + 2^-8 + 2^-8 = 1 + 2^-7 exactly (rounding after each step would give 1)
    (2, 0): (1.0, 0.0, EPS8),
    # 1 + 2^-8: a bf16 tie, to even: 1 (half-up would give 1 + 2^-7)
    (2, 1): (1.0, 0.0, 0.0),
    # 1 + 2^-8 + 2^-7: a bf16 tie, to even: 1 + 2^-6 (truncation would give 1 + 2^-7)
    (2, 2): (1.0, 2.0**-6, 0.0),
    (2, 3): (-1.0, -(2.0**-6), 0.0),
}


def token_rows(t: int, hidden: int) -> list[list[float]]:
    """[routed 0, routed 1, shared] rows of token t."""
    rows = [[filler(t, k, h) for h in range(hidden)] for k in range(3)]
    for (tt, h), values in SPECIAL.items():
        if tt == t:
            for k, v in enumerate(values):
                rows[k][h] = v
    return rows


def test_hand_worked_cases_separate_the_spec_from_other_orders() -> None:
    # token 0: spec order 0; shared first 1
    (d0, d1, shared) = SPECIAL[(0, 0)]
    assert combine_by_spec([[d0], [d1], [shared]], ROUTED_WEIGHTS[0]) == [0.0]
    assert float((f32(shared) + f32(d0)) + f32(d1)) == 1.0
    # token 1: spec 0; exact (and fused) arithmetic 2^-24
    (d0, d1, shared) = SPECIAL[(1, 0)]
    w0, w1 = ROUTED_WEIGHTS[1]
    assert combine_by_spec([[d0], [d1], [shared]], [w0, w1]) == [0.0]
    exact = Fraction(d0) * Fraction(w0) + Fraction(d1) * Fraction(w1) + Fraction(shared)
    assert exact == Fraction(1, 2**24)
    assert bf16_round(2.0**-24) == 2.0**-24
    # token 2: one rounding at the end, ties to even
    w = ROUTED_WEIGHTS[2]
    spec = [combine_by_spec([[v] for v in SPECIAL[(2, h)]], w)[0] for h in range(4)]
    assert spec == [1 + EPS7, 1 + EPS8, 1 + EPS7 + EPS8, -(1 + EPS7 + EPS8)]
    assert [bf16_round(v) for v in spec] == [1 + EPS7, 1.0, 1 + 2**-6, -(1 + 2**-6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_sums_in_spec_order_and_rounds_once(dtype: torch.dtype) -> None:
    elem = 4 if dtype == torch.float32 else 2
    dims = Dims(A=2, M=2, BS=3, K=2, S=1, H=32, elem=elem)
    rank, m, layer = 2, 0, 11  # session 0; the first combine takes micro-batch 0
    with window_group(dims, F, dtype) as group:
        before = ExpectedAttnWindow(dims)
        for t in range(dims.BS):
            for e, row in enumerate(token_rows(t, dims.H)):
                before.row(m, t, e, activation_bytes(row, elem))
                before.flag(m, t, e)
        load_window(group, rank, before)
        ctx = context_for(group, rank).get_schedule_context_tensor()

        y, next_layer = npu_attention_worker_combine(
            ctx,
            torch.tensor(ROUTED_WEIGHTS, dtype=torch.float32),
            torch.tensor([layer]),
            dims.H,
            token_dtype=TOKEN_DTYPE[dtype],
            need_schedule=1,
        )

        expected = b""
        for t in range(dims.BS):
            acc = combine_by_spec(token_rows(t, dims.H), ROUTED_WEIGHTS[t])
            if dtype == torch.bfloat16:
                expected += bf16_bytes([bf16_round(v) for v in acc])
            else:
                expected += f32_bytes(acc)
        assert y.dtype == dtype and tuple(y.shape) == (dims.BS, dims.H)
        assert y.contiguous().view(torch.uint8).numpy().tobytes() == expected
        assert next_layer.tolist() == [layer + 1]
        # the flags of micro-batch 0 are zeroed, the rows stay; nothing else changes
        after = before.copy()
        for t in range(dims.BS):
            for e in range(dims.E):
                after.flag(m, t, e, 0)
        want = initial_windows(group, dims)
        want[rank] = after
        assert_windows(group, want)
        assert context_field(ctx, ATTN_MICRO_BATCH_ID_AT, "<i") == m


# -- npu_attention_worker_combine: micro-batch bookkeeping --------------------------------------
CYCLE_DIMS = Dims(A=2, M=2, BS=2, K=1, S=1, H=32)
CYCLE_RANK = 3  # session 1
CYCLE_WEIGHTS = [[0.75], [-2.0]]


def cycle_rows(m: int, t: int, e: int) -> list[float]:
    """A distinct bf16-exact row for every (m, t, e)."""
    i = (m * CYCLE_DIMS.BS + t) * CYCLE_DIMS.E + e
    return [(-1) ** h * (1 + 8 * i + h) / 4 for h in range(CYCLE_DIMS.H)]


def cycle_expected(m: int) -> bytes:
    """bf16 y of micro-batch m: round(float32(d0 * w) + float32(shared))."""
    out = b""
    for t in range(CYCLE_DIMS.BS):
        d0, shared = cycle_rows(m, t, 0), cycle_rows(m, t, 1)
        acc = combine_by_spec([d0, shared], CYCLE_WEIGHTS[t])
        out += bf16_bytes([bf16_round(v) for v in acc])
    return out


def flag_micro_batch(window: ExpectedAttnWindow, m: int, value: int) -> None:
    for t in range(CYCLE_DIMS.BS):
        for e in range(CYCLE_DIMS.E):
            window.flag(m, t, e, value)


def cycle_window() -> ExpectedAttnWindow:
    window = ExpectedAttnWindow(CYCLE_DIMS)
    for m in range(CYCLE_DIMS.M):
        for t in range(CYCLE_DIMS.BS):
            for e in range(CYCLE_DIMS.E):
                window.row(m, t, e, bf16_bytes(cycle_rows(m, t, e)))
        flag_micro_batch(window, m, 1)
    return window


def combine(ctx: torch.Tensor, layer: int, need_schedule: int = 1) -> torch.Tensor:
    y, next_layer = npu_attention_worker_combine(
        ctx,
        torch.tensor(CYCLE_WEIGHTS),
        torch.tensor([layer]),
        CYCLE_DIMS.H,
        token_dtype=TOKEN_DTYPE[torch.bfloat16],
        need_schedule=need_schedule,
    )
    assert next_layer.tolist() == [layer + 1]
    return y


def y_bytes(y: torch.Tensor) -> bytes:
    return y.contiguous().view(torch.uint8).numpy().tobytes()


def loaded_context(group: WindowGroup, window: ExpectedAttnWindow) -> torch.Tensor:
    """Writes `window` into the cycle rank's window; returns that rank's schedule context."""
    load_window(group, CYCLE_RANK, window)
    return context_for(group, CYCLE_RANK).get_schedule_context_tensor()


def expected_with(group: WindowGroup, window: ExpectedAttnWindow) -> dict[int, ExpectedWindow]:
    """Every rank's initial window, but `window` for the cycle rank."""
    want = initial_windows(group, CYCLE_DIMS)
    want[CYCLE_RANK] = window
    return want


def test_combine_takes_micro_batch_0_then_1_then_0() -> None:
    assert cycle_expected(0) != cycle_expected(1)  # the two micro-batches are told apart
    with window_group(CYCLE_DIMS, F, torch.bfloat16, timeout_s=0.3) as group:
        window = cycle_window()
        ctx = loaded_context(group, window)
        want = expected_with(group, window)

        assert y_bytes(combine(ctx, layer=0)) == cycle_expected(0)
        assert context_field(ctx, ATTN_MICRO_BATCH_ID_AT, "<i") == 0
        flag_micro_batch(window, 0, 0)
        assert_windows(group, want)  # micro-batch 1's flags are still 1

        assert y_bytes(combine(ctx, layer=1)) == cycle_expected(1)
        assert context_field(ctx, ATTN_MICRO_BATCH_ID_AT, "<i") == 1
        flag_micro_batch(window, 1, 0)
        assert_windows(group, want)

        # next is micro-batch 0 again, whose flags are 0 now: the combine waits for them
        with pytest.raises(AFDTimeoutError) as info:
            combine(ctx, layer=2)
        for part in ("attention rank 3", "session 1", "micro-batch 0", "4 of 4"):
            assert part in str(info.value)
        assert_windows(group, want)
        assert context_field(ctx, ATTN_MICRO_BATCH_ID_AT, "<i") == 1

        flag_micro_batch(window, 0, 1)
        load_window(group, CYCLE_RANK, window)
        assert y_bytes(combine(ctx, layer=2)) == cycle_expected(0)
        assert context_field(ctx, ATTN_MICRO_BATCH_ID_AT, "<i") == 0


def test_combine_waits_for_every_slot_flag() -> None:
    with window_group(CYCLE_DIMS, F, torch.bfloat16, timeout_s=0.3) as group:
        window = cycle_window()
        window.flag(0, 1, 0, 0)  # (token 1, slot 0) of micro-batch 0 has not arrived
        ctx = loaded_context(group, window)
        with pytest.raises(AFDTimeoutError) as info:
            combine(ctx, layer=0)
        for part in ("micro-batch 0", "1 of 4", "(token 1, slot 0)"):
            assert part in str(info.value)
        assert_windows(group, expected_with(group, window))


def test_need_schedule_0_combines_the_context_micro_batch_as_it_is() -> None:
    with window_group(CYCLE_DIMS, F, torch.bfloat16) as group:
        window = cycle_window()
        ctx = loaded_context(group, window)
        want = expected_with(group, window.copy())
        # A fresh context's id is M - 1: need_schedule=0 reads that micro-batch, with no
        # wait, no flag reset and no store (as the A3 kernel does)
        assert context_field(ctx, ATTN_MICRO_BATCH_ID_AT, "<i") == 1
        assert y_bytes(combine(ctx, layer=0, need_schedule=0)) == cycle_expected(1)
        assert_windows(group, want)
        assert context_field(ctx, ATTN_MICRO_BATCH_ID_AT, "<i") == 1

        # the scheduler waits for (1 + 1) % M = 0, zeroes its flags and makes it current
        assert attention_worker_scheduler_(ctx) is ctx
        assert context_field(ctx, ATTN_MICRO_BATCH_ID_AT, "<i") == 0
        flag_micro_batch(window, 0, 0)
        want[CYCLE_RANK] = window
        assert_windows(group, want)
        for _ in range(2):
            assert y_bytes(combine(ctx, layer=0, need_schedule=0)) == cycle_expected(0)
            assert_windows(group, want)


def test_the_non_in_place_scheduler_returns_a_new_context() -> None:
    with window_group(CYCLE_DIMS, F, torch.bfloat16) as group:
        window = cycle_window()
        ctx = loaded_context(group, window)
        before = ctx.clone()
        out = attention_worker_scheduler(ctx)
        assert out is not ctx and torch.equal(ctx, before)  # the input context is unchanged
        assert context_field(out, ATTN_MICRO_BATCH_ID_AT, "<i") == 0
        flag_micro_batch(window, 0, 0)  # ... but the window's flags are zeroed
        assert_windows(group, expected_with(group, window))
