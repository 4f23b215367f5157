"""FFN-window slot strides: the caller's (A2F) and the context's (batching) must be one stride.

A3 facts (ops-transformer `ffn_wb_get_schedule_context.h`, `ffn_wb_gather_out_all.h`;
torch_npu `ScheduleContext.cpp`): A2F writes slots `ffn_token_data_shape[4]` elements apart,
batching reads them `attn_to_ffn_token_size` bytes apart, and torch_npu's holder takes only
multiples of 512. A3 callers use align512(H + 4) for int8 rows (7680 at H = 7168) and
align512(2H) for 16-bit rows; the seed's example used H + 128. Every one of them must work,
and a holder whose stride is not the windows' must be refused before anything is read.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from afd_dispatch import (
    AFDInputError,
    RankTopology,
    WindowGroup,
    WindowLayout,
    build_expert_rank_table,
    create_window_group,
)
from afd_dispatch.kernels.reference import (
    context_for,
    create_schedule_context_holder,
    npu_attention_to_ffn,
    npu_ffn_worker_batching,
)
from afd_dispatch.layout import a3_attn_to_ffn_token_size, align512
from afd_dispatch.windows import destroy_window_group

# The minimal case: H = 7168, A = 1, M = 1, BS = 2, K = 1, one shared expert, int8.
H, BS, K, S, EXPERTS = 7168, 2, 1, 1, 2
A, F = 1, 1  # FFN rank 0 hosts both routed experts and the shared one; attention rank 1
TOKEN_DTYPE_BF16, TOKEN_DTYPE_INT8 = 1, 2


@contextmanager
def group_with(layout: WindowLayout) -> Iterator[WindowGroup]:
    name = f"strides-{uuid.uuid4().hex[:12]}"
    group = create_window_group(
        name, RankTopology(layout.num_attention_ranks, F), layout, timeout_s=5.0
    )
    try:
        yield group
    finally:
        destroy_window_group(name)


def send(group: WindowGroup, x: torch.Tensor, expert_ids: list[int], row_elems: int) -> None:
    layout = group.layout
    table = build_expert_rank_table(group.topology, EXPERTS, layout.shared)
    shapes = layout.op_shapes
    one = lambda v: torch.tensor([v])  # noqa: E731
    npu_attention_to_ffn(
        x, one(0), one(0), one(3), torch.tensor([[[e] for e in expert_ids]]), table,
        group.name, group.topology.world_size, shapes["ffn_token_info_table_shape"],
        [*shapes["ffn_token_data_shape"][:4], row_elems], shapes["attn_token_info_table_shape"],
        EXPERTS, quant_mode=2 if layout.quant else 0,
    )  # fmt: skip


def integer_rows() -> torch.Tensor:
    """Two bf16 rows of integers with max |x| = 127: they quantize to q = x, scale 1.0."""
    h = torch.arange(H)
    rows = torch.stack([(h * 7 % 255) - 127, (h * 13 % 201) - 100])
    rows[1, 5] = 127  # amax 127 in both rows
    return rows.to(torch.bfloat16).unsqueeze(0)


def test_the_minimal_int8_case_at_a3_stride_has_the_right_bytes() -> None:
    stride = align512(H + 4)
    assert stride == 7680
    layout = WindowLayout(A, 1, BS, K, S, H, torch.bfloat16, True, attn_to_ffn_token_size=stride)
    with group_with(layout) as group:
        x = integer_rows()
        send(group, x, expert_ids=[1, 0], row_elems=7680)

        # the FFN window: slot (t, e) at data offset + (t * E + e) * 7680 bytes
        raw = group.read_window(0)
        data_at = align512(A * 1 * (2 + BS * (K + S)) * 4)
        q = x[0].to(torch.int8)
        for t in range(BS):
            want = q[t].numpy().tobytes() + struct.pack("<f", 1.0)
            want += bytes(stride - len(want))  # zeros to the end of the slot
            for e in range(K + S):  # the routed slot and the shared one carry the same row
                at = data_at + (t * (K + S) + e) * stride
                assert raw[at : at + stride] == want, (t, e)

        # batching with a holder of that stride reads exactly those rows back
        ctx = context_for(group, 0, expert_num=3).get_schedule_context_tensor()
        y, group_list, sessions, _, tokens, slots, scale, n = npu_ffn_worker_batching(
            ctx, 3, [A, BS, K + S, H], token_dtype=TOKEN_DTYPE_INT8, need_schedule=1
        )
        # local ids on rank 0: routed experts 0, 1 then the shared expert 2
        order = [(1, 0), (0, 0), (0, 1), (1, 1)]  # (t, e) sorted by local id, stably
        assert int(n[0]) == 4
        assert [(int(tokens[i]), int(slots[i])) for i in range(4)] == order
        for i, (t, _) in enumerate(order):
            assert torch.equal(y[i], q[t])
        assert scale[:4].tolist() == [1.0] * 4
        assert group_list[:3].tolist() == [[0, 1], [1, 1], [2, 2]]
        assert sessions[:4].tolist() == [0] * 4


def test_a_holder_whose_stride_is_not_the_windows_is_refused() -> None:
    # The windows were laid out at the seed's H + 128 = 7296; a 7680-byte holder would read
    # 3 of 4 rows at the wrong place on A3. The reference refuses it, naming both strides.
    layout = WindowLayout(A, 1, BS, K, S, H, torch.bfloat16, True)
    assert layout.attn_to_ffn_token_size == H + 128
    with group_with(layout) as group:
        send(group, integer_rows(), expert_ids=[1, 0], row_elems=H + 128)
        before = group.read_window(0)
        with pytest.raises(AFDInputError) as info:
            create_schedule_context_holder(
                0, A, 1, BS, K + S, 3, 7680, H * 2,
                ffn_window=group.address(0), ffn_window_size=group.window_bytes(0),
            )  # fmt: skip
        assert info.value.argument == "attn_to_ffn_token_size"
        assert info.value.value == 7680 and "7296" in info.value.allowed
        assert group.read_window(0) == before


def test_a2f_refuses_a_stride_other_than_its_groups() -> None:
    layout = WindowLayout(A, 1, BS, K, S, H, torch.bfloat16, True)  # laid out at 7296
    with group_with(layout) as group:
        before = group.read_window(0)
        with pytest.raises(AFDInputError) as info:
            send(group, integer_rows(), expert_ids=[1, 0], row_elems=7680)
        assert info.value.argument == "ffn_token_data_shape[4] (HS)"
        assert info.value.value == 7680 and "7296" in info.value.allowed
        assert group.read_window(0) == before


@pytest.mark.parametrize(
    ("hidden", "quant", "stride"),
    [
        (7168, True, 7168 + 128),  # the seed's int8 slot
        (7168, True, 7680),  # A3 callers' align512(H + 4)
        (7168, False, 2 * 7168),  # align512(2H) = 2H
        (2880, False, 6144),  # align512(2H): 2H = 5760 is not a multiple of 512
        (2880, True, 3072),  # align512(H + 4)
        (2880, False, 2 * 2880),  # the reference also takes unpadded rows
        (2880, True, 2880 + 4),  # ... down to the row and its scale
    ],
)
def test_every_stride_round_trips_through_a2f_and_batching(
    hidden: int, quant: bool, stride: int
) -> None:
    layout = WindowLayout(A, 1, BS, K, S, hidden, torch.bfloat16, quant, stride)
    assert layout.row_elems * (1 if quant else 2) == stride
    gen = torch.Generator().manual_seed(hidden + stride)
    x = torch.randn(1, BS, hidden, generator=gen).to(torch.bfloat16)
    with group_with(layout) as group:
        send(group, x, expert_ids=[0, 1], row_elems=layout.row_elems)
        ctx = context_for(group, 0, expert_num=3).get_schedule_context_tensor()
        token_dtype = TOKEN_DTYPE_INT8 if quant else TOKEN_DTYPE_BF16
        y, _, _, _, tokens, _, scale, n = npu_ffn_worker_batching(
            ctx, 3, [A, BS, K + S, hidden], token_dtype=token_dtype, need_schedule=1
        )
        assert int(n[0]) == BS * (K + S)
        for i in range(int(n[0])):
            row = x[0, int(tokens[i])].float()
            if quant:  # q * scale is within half a step of x
                step = row.abs().max() / 127
                assert (y[i].float() * scale[i] - row).abs().max() <= step / 2 + 1e-6
            else:
                assert torch.equal(y[i], x[0, int(tokens[i])])


@pytest.mark.parametrize(
    ("hidden", "quant", "stride"),
    [(7168, True, 7168 + 3), (7168, False, 2 * 7168 - 2), (2880, False, 2 * 2880 + 1)],
)
def test_a_slot_too_small_or_not_whole_elements_is_refused(
    hidden: int, quant: bool, stride: int
) -> None:
    with pytest.raises(AFDInputError) as info:
        WindowLayout(A, 1, BS, K, S, hidden, torch.bfloat16, quant, stride)
    assert info.value.argument == "attn_to_ffn_token_size (HS bytes)"
    assert info.value.value == stride


def test_a3_strides_are_512_multiples_that_hold_the_row() -> None:
    for hidden in (1024, 2048, 2880, 4096, 5120, 7168, 8192):
        for quant in (False, True):
            size = a3_attn_to_ffn_token_size(hidden, torch.bfloat16, quant)
            payload = hidden + 4 if quant else 2 * hidden
            assert size % 512 == 0 and payload <= size < payload + 512
