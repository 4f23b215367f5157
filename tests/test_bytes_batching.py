"""npu_ffn_worker_batching, byte by byte: outputs and the window it leaves behind.

Group: A = 2 attention ranks, F = 2 FFN ranks (ranks 0, 1), M = 2, BS = 2, K = 2, S = 0,
H = 32. The tests write FFN rank 0's window by hand (the state `npu_attention_to_ffn`
would leave), run the op through a schedule context, and compare its outputs and the whole
window of every rank with hand-built expectations.

Micro-batch 0 of FFN rank 0 holds these local ids (E = 2 slots per token):

    session 0: token 0 [2, empty]          token 1 [0, 3]
    session 1: token 0 [3, 0]              token 1 [1_000_000, 2]

INT32_MAX and 1_000_000 are both empty (ids >= 1_000_000). In (s, t, e) order the kept ids
are 2 (0,0,0), 0 (0,1,0), 3 (0,1,1), 3 (1,0,0), 0 (1,0,1), 2 (1,1,1); sorted stably:

    row  id  (s, t, e)
    0    0   (0, 1, 0)
    1    0   (1, 0, 1)
    2    2   (0, 0, 0)
    3    2   (1, 1, 1)
    4    3   (0, 1, 1)
    5    3   (1, 0, 0)

so group_list = (0, 2), (2, 2), (3, 2), then zeros; expert 1 is absent and has no pair.
"""

from __future__ import annotations

import struct

import pytest
import torch
from expected_bytes import (
    INT32_MAX,
    Dims,
    ExpectedFfnWindow,
    assert_windows,
    bf16_bytes,
    context_field,
    f32_bytes,
    initial_windows,
    int8_bytes,
    load_window,
    window_group,
)

from afd_dispatch import AFDTimeoutError, WindowGroup
from afd_dispatch.kernels.reference import (
    context_for,
    ffn_worker_scheduler_,
    npu_ffn_worker_batching,
)

F = 2
FFN_RANK = 0
EXPERT_NUM = 5  # local experts 0..4 on FFN rank 0
TOKEN_DTYPE_BF16, TOKEN_DTYPE_INT8 = 1, 2
POLLING_INDEX_AT = 416  # int64 in the schedule context (kernels/reference/schedule_context.py)
OUT_NUM_AT = 576  # int32: sessions the FFN scheduler published
DIMS = Dims(A=2, M=2, BS=2, K=2, S=0, H=32)
QDIMS = Dims(A=2, M=2, BS=2, K=2, S=0, H=32, quant=True)
LAYER = 4

# (s, t, e) -> local id of micro-batch 0, as in the module docstring
IDS_MB0 = {
    (0, 0, 0): 2,
    (0, 1, 0): 0,
    (0, 1, 1): 3,
    (1, 0, 0): 3,
    (1, 0, 1): 0,
    (1, 1, 0): 1_000_000,
    (1, 1, 1): 2,
}
SORTED_MB0 = [(0, 1, 0), (1, 0, 1), (0, 0, 0), (1, 1, 1), (0, 1, 1), (1, 0, 0)]
GROUP_LIST_MB0 = [[0, 2], [2, 2], [3, 2], [0, 0], [0, 0]]
# micro-batch 1: one id per session, expert 4 before expert 1 in (s, t, e) order
IDS_MB1 = {(0, 1, 1): 4, (1, 0, 0): 1}
SORTED_MB1 = [(1, 0, 0), (0, 1, 1)]
GROUP_LIST_MB1 = [[1, 1], [4, 1], [0, 0], [0, 0], [0, 0]]


def row_values(s: int, m: int, t: int, e: int) -> list[float]:
    """A distinct bf16-exact row for every (s, m, t, e) of the window."""
    code = 1 + 8 * (((s * DIMS.M + m) * DIMS.BS + t) * DIMS.E + e)
    return [(-1) ** h * (code + h) / 4 for h in range(DIMS.H)]


def filled_window(
    ids_by_mb: dict[int, dict[tuple[int, int, int], int]],
    ready: set[int],
    flagged_sessions: tuple[int, ...] = (0, 1),
) -> ExpectedFfnWindow:
    """FFN rank 0 as senders leave it: a data row in every slot (also unrouted ones), the
    given ids, and header [1, LAYER] of the `flagged_sessions` for micro-batches in `ready`."""
    window = ExpectedFfnWindow(DIMS)
    for s in range(DIMS.A):
        for m in range(DIMS.M):
            for t in range(DIMS.BS):
                for e in range(DIMS.E):
                    window.row(s, m, t, e, bf16_bytes(row_values(s, m, t, e)))
    for m, ids in ids_by_mb.items():
        for (s, t, e), local in ids.items():
            window.slot(s, m, t, e, local)
        if m in ready:
            for s in flagged_sessions:
                window.header(s, m, flag=1, layer=LAYER)
    return window


def consumed(window: ExpectedFfnWindow, m: int) -> ExpectedFfnWindow:
    """What batching leaves: ids of micro-batch m INT32_MAX, flags 0, layer and data kept."""
    after = window.copy()
    for s in range(DIMS.A):
        struct.pack_into("<i", after.buf, DIMS.ffn_info_offset(s, m, 0), 0)
        for t in range(DIMS.BS):
            for e in range(DIMS.E):
                after.slot(s, m, t, e, INT32_MAX)
    return after


def batch(ctx: torch.Tensor, dims: Dims = DIMS, need_schedule: int = 1) -> tuple[torch.Tensor, ...]:
    token_dtype = TOKEN_DTYPE_INT8 if dims.quant else TOKEN_DTYPE_BF16
    return npu_ffn_worker_batching(
        ctx,
        EXPERT_NUM,
        [dims.A, dims.BS, dims.E, dims.H],
        token_dtype=token_dtype,
        need_schedule=need_schedule,
    )


def assert_outputs(
    outputs: tuple[torch.Tensor, ...],
    m: int,
    order: list[tuple[int, int, int]],
    group_list: list[list[int]],
) -> None:
    """Check the eight outputs of a bf16 batching against the sorted (s, t, e) list."""
    y, got_group_list, sessions, mbs, tokens, offsets, dynamic_scale, actual = outputs
    rows = DIMS.A * DIMS.BS * DIMS.E
    n = len(order)
    pad = rows - n
    expected_y = b"".join(bf16_bytes(row_values(s, m, t, e)) for s, t, e in order)
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (rows, DIMS.H)
    # rows past actual_token_num are unspecified (the reference leaves them unwritten)
    assert y[:n].view(torch.uint8).numpy().tobytes() == expected_y
    assert got_group_list.dtype == torch.int64
    assert got_group_list.tolist() == group_list
    for tensor in (sessions, mbs, tokens, offsets):
        assert tensor.dtype == torch.int32 and tuple(tensor.shape) == (rows,)
    assert sessions.tolist() == [s for s, _, _ in order] + [0] * pad
    assert mbs.tolist() == [m] * n + [0] * pad
    assert tokens.tolist() == [t for _, t, _ in order] + [0] * pad
    assert offsets.tolist() == [e for _, _, e in order] + [0] * pad
    assert dynamic_scale.dtype == torch.float32
    assert dynamic_scale.tolist() == [0.0] * rows  # no quantization, no scales
    assert actual.dtype == torch.int64 and actual.tolist() == [n]


def ffn_context(group: WindowGroup) -> torch.Tensor:
    return context_for(group, FFN_RANK, EXPERT_NUM).get_schedule_context_tensor()


def test_collects_sorts_gathers_and_resets_one_micro_batch() -> None:
    with window_group(DIMS, F, torch.bfloat16) as group:
        before = filled_window({0: IDS_MB0}, ready={0})
        load_window(group, FFN_RANK, before)
        ctx = ffn_context(group)
        assert context_field(ctx, POLLING_INDEX_AT, "<q") == 0

        outputs = batch(ctx)

        assert_outputs(outputs, 0, SORTED_MB0, GROUP_LIST_MB0)
        want = initial_windows(group, DIMS)
        want[FFN_RANK] = consumed(before, 0)
        assert_windows(group, want)
        assert context_field(ctx, POLLING_INDEX_AT, "<q") == 1


def test_polling_index_cycles_through_micro_batches_mod_m() -> None:
    with window_group(DIMS, F, torch.bfloat16) as group:
        before = filled_window({0: IDS_MB0, 1: IDS_MB1}, ready={0, 1})
        load_window(group, FFN_RANK, before)
        ctx = ffn_context(group)

        assert_outputs(batch(ctx), 0, SORTED_MB0, GROUP_LIST_MB0)
        assert context_field(ctx, POLLING_INDEX_AT, "<q") == 1
        assert_outputs(batch(ctx), 1, SORTED_MB1, GROUP_LIST_MB1)
        assert context_field(ctx, POLLING_INDEX_AT, "<q") == 0  # (1 + 1) % M
        want = initial_windows(group, DIMS)
        want[FFN_RANK] = consumed(consumed(before, 0), 1)
        assert_windows(group, want)

        # micro-batch 0 arrives again and is the one taken next
        again = filled_window({0: IDS_MB1}, ready={0})
        load_window(group, FFN_RANK, again)
        assert_outputs(batch(ctx), 0, SORTED_MB1, GROUP_LIST_MB1)
        assert context_field(ctx, POLLING_INDEX_AT, "<q") == 1


def test_waits_for_the_flags_of_all_sessions() -> None:
    with window_group(DIMS, F, torch.bfloat16, timeout_s=0.3) as group:
        before = filled_window({0: IDS_MB0}, ready={0}, flagged_sessions=(0,))
        load_window(group, FFN_RANK, before)
        ctx = ffn_context(group)
        with pytest.raises(AFDTimeoutError) as info:
            batch(ctx)
        message = str(info.value)
        for part in ("FFN rank 0", "micro-batch 0", "sessions [1]", "attention ranks [3]"):
            assert part in message
        want = initial_windows(group, DIMS)
        want[FFN_RANK] = before
        assert_windows(group, want)
        assert context_field(ctx, POLLING_INDEX_AT, "<q") == 0


def scheduled(window: ExpectedFfnWindow, m: int) -> ExpectedFfnWindow:
    """What ffn_worker_scheduler_ leaves: ids of micro-batch m 0x7F7F7F7F, flags 0."""
    after = consumed(window, m)
    for s in range(DIMS.A):
        for t in range(DIMS.BS):
            for e in range(DIMS.E):
                after.slot(s, m, t, e, 0x7F7F7F7F)
    return after


def test_need_schedule_0_batches_what_the_scheduler_published() -> None:
    with window_group(DIMS, F, torch.bfloat16) as group:
        before = filled_window({0: IDS_MB0}, ready={0})
        load_window(group, FFN_RANK, before)
        ctx = ffn_context(group)
        # nothing published yet (out_num 0): an empty batch, as on A3, and nothing changes
        _, group_list, *_, actual = batch(ctx, need_schedule=0)
        assert actual.tolist() == [0] and group_list.tolist() == [[0, 0]] * EXPERT_NUM
        assert_windows(group, {**initial_windows(group, DIMS), FFN_RANK: before})

        # sync_group_size = A: the sessions move in lockstep with the polling index
        assert ffn_worker_scheduler_(ctx, sync_group_size=DIMS.A) is ctx
        assert context_field(ctx, POLLING_INDEX_AT, "<q") == 1
        assert context_field(ctx, OUT_NUM_AT, "<i") == DIMS.A
        want = initial_windows(group, DIMS)
        want[FFN_RANK] = scheduled(before, 0)
        assert_windows(group, want)

        for _ in range(2):  # need_schedule=0 changes nothing, so it can be repeated
            assert_outputs(batch(ctx, need_schedule=0), 0, SORTED_MB0, GROUP_LIST_MB0)
            assert_windows(group, want)
            assert context_field(ctx, POLLING_INDEX_AT, "<q") == 1


def test_the_scheduler_publishes_each_session_group_on_its_own() -> None:
    with window_group(DIMS, F, torch.bfloat16) as group:
        # session 1 flagged micro-batch 1 only; session 0 flagged both
        before = filled_window({0: IDS_MB0, 1: IDS_MB1}, ready={0, 1}, flagged_sessions=(0,))
        for m in (1,):
            before.header(1, m, flag=1, layer=LAYER)
        load_window(group, FFN_RANK, before)
        ctx = ffn_context(group)
        ffn_worker_scheduler_(ctx)  # sync_group_size 1: every session is its own group
        # each session publishes its lowest ready micro-batch: session 0 -> 0, session 1 -> 1
        assert context_field(ctx, OUT_NUM_AT, "<i") == 2
        assert context_field(ctx, POLLING_INDEX_AT, "<q") == 0  # only lockstep advances it
        _, _, sessions, mbs, tokens, offsets, _, actual = batch(ctx, need_schedule=0)
        published = {(s, t, e) for (s, t, e), i in IDS_MB0.items() if s == 0 and i < 1_000_000}
        published |= {(s, t, e) for (s, t, e) in IDS_MB1 if s == 1}
        n = int(actual[0])
        got = {
            (s, m, t, e)
            for s, m, t, e in zip(
                sessions[:n].tolist(),
                mbs[:n].tolist(),
                tokens[:n].tolist(),
                offsets[:n].tolist(),
                strict=True,
            )
        }
        assert got == {(s, s, t, e) for s, t, e in published}  # session s took micro-batch s


# -- int8 rows: y takes the H int8 values, dynamic_scale the float32 at byte H ----------------
def quant_row(s: int, t: int, e: int) -> tuple[list[int], float, bytes]:
    """(q, scale, whole row bytes) of micro-batch 0 slot (s, t, e); padding bytes are 0x55."""
    idx = (s * QDIMS.BS + t) * QDIMS.E + e
    q = [((idx * 37 + h * 11) % 255) - 127 for h in range(QDIMS.H)]
    scale = (idx + 1) / 3  # a float32 with a full mantissa
    row = int8_bytes(q) + f32_bytes([scale]) + b"\x55" * 124
    return q, struct.unpack("<f", struct.pack("<f", scale))[0], row


def test_int8_rows_split_into_y_and_dynamic_scale() -> None:
    with window_group(QDIMS, F, torch.bfloat16) as group:
        before = ExpectedFfnWindow(QDIMS)
        for (s, t, e), local in IDS_MB0.items():
            before.slot(s, 0, t, e, local)
            before.row(s, 0, t, e, quant_row(s, t, e)[2])
        for s in range(QDIMS.A):
            before.header(s, 0, flag=1, layer=LAYER)
        load_window(group, FFN_RANK, before)
        ctx = context_for(group, FFN_RANK, EXPERT_NUM).get_schedule_context_tensor()

        y, group_list, sessions, _, tokens, offsets, dynamic_scale, actual = batch(ctx, QDIMS)

        rows, n = QDIMS.A * QDIMS.BS * QDIMS.E, len(SORTED_MB0)
        assert y.dtype == torch.int8 and tuple(y.shape) == (rows, QDIMS.H)
        expected_y = b"".join(int8_bytes(quant_row(*key)[0]) for key in SORTED_MB0)
        assert y[:n].numpy().tobytes() == expected_y  # rows past n: unspecified
        expected_scales = [quant_row(*key)[1] for key in SORTED_MB0] + [0.0] * (rows - n)
        assert dynamic_scale.tolist() == expected_scales
        assert group_list.tolist() == GROUP_LIST_MB0
        assert sessions.tolist()[:n] == [s for s, _, _ in SORTED_MB0]
        assert tokens.tolist()[:n] == [t for _, t, _ in SORTED_MB0]
        assert offsets.tolist()[:n] == [e for _, _, e in SORTED_MB0]
        assert actual.tolist() == [n]
        after = before.copy()
        for s in range(QDIMS.A):
            after.header(s, 0, flag=0, layer=LAYER)
            for t in range(QDIMS.BS):
                for e in range(QDIMS.E):
                    after.slot(s, 0, t, e, INT32_MAX)
        want = initial_windows(group, QDIMS)
        want[FFN_RANK] = after
        assert_windows(group, want)
