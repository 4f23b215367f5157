"""Bad input to the reference op family: rejected before any window byte changes.

One test per constraint of the op contract (`/work/shared/spec/afd-ops.md`) for the four
ops, the two scheduler ops and the schedule-context holder. Each asserts that
1. `AFDInputError` is raised,
2. its `.argument` names the argument and its `.value` shows the value seen,
3. every rank's window and every schedule context are byte-for-byte what they were.

The last group of tests corrupts window and context contents (untrusted memory another
process writes): each corruption must raise a clear error, not index out of bounds or
wait for a deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from op_inputs import holder_args_with_window, raises_input_error

from afd_dispatch import (
    AFDInputError,
    RankTopology,
    WindowGroup,
    WindowLayout,
    build_expert_rank_table,
    create_window_group,
    destroy_window_group,
    local_experts,
)
from afd_dispatch.kernels import reference as ref
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.layout import (
    EMPTY_LOCAL_ID,
    FLAG_OFFSET,
    LAYER_OFFSET,
    SLOTS_OFFSET,
    TOKEN_DTYPE_BF16,
    TOKEN_DTYPE_FP16,
    TOKEN_DTYPE_INT8,
)

# A=2 attention ranks (2, 3), F=2 FFN ranks (0, 1), M=2, BS=4, K=2, S=1, H=64, 4 routed experts
A, F, M, BS, K, S, H, MOE = 2, 2, 2, 4, 2, 1, 64, 4
E = K + S
Y = A * BS * E
LAYER = 3
TIMEOUT_S = 1.0  # a check that waits instead of failing fails the test quickly
FFN_RANK, ATTN_RANK = 0, 2  # the FFN rank and the attention rank (session 0) under test
BOGUS_ADDRESS = 2**30 << 32  # a window handle no group of this process will ever get
LAYOUT = WindowLayout(A, M, BS, K, S, H, torch.bfloat16)

Args = dict[str, Any]
Mutation = Callable[["World", Args], None]


@dataclass
class World:
    """One window group with its table and every rank's schedule context."""

    group: WindowGroup
    table: torch.Tensor
    contexts: dict[int, ref.ScheduleContextHolder]

    @property
    def layout(self) -> WindowLayout:
        return self.group.layout

    def ctx(self, rank: int) -> torch.Tensor:
        return self.contexts[rank].get_schedule_context_tensor()

    def expert_num(self, rank: int) -> int:
        return len(local_experts(self.table, rank))

    def snapshot(self) -> tuple[list[bytes], list[bytes]]:
        windows = [self.group.read_window(r) for r in range(self.group.topology.world_size)]
        contexts = [self.ctx(r).numpy().tobytes() for r in sorted(self.contexts)]
        return windows, contexts

    def assert_unchanged(self, before: tuple[list[bytes], list[bytes]]) -> None:
        windows, contexts = self.snapshot()
        for rank, (old, new) in enumerate(zip(before[0], windows, strict=True)):
            assert old == new, f"window of rank {rank} was written"
        assert before[1] == contexts, "a schedule context was written"


def make_world(quant: bool = False) -> World:
    topology = RankTopology(A, F)
    layout = WindowLayout(A, M, BS, K, S, H, torch.bfloat16, quant)
    name = f"bad-input-{uuid.uuid4().hex[:12]}"
    group = create_window_group(name, topology, layout, timeout_s=TIMEOUT_S)
    table = build_expert_rank_table(topology, MOE, S, replicas=2)
    world = World(group, table, {})
    for r in range(topology.world_size):
        world.contexts[r] = ref.context_for(group, r, max(1, world.expert_num(r)))
    return world


@pytest.fixture
def world() -> Iterator[World]:
    w = make_world()
    yield w
    destroy_window_group(w.group.name)


@pytest.fixture
def qworld() -> Iterator[World]:
    w = make_world(quant=True)
    yield w
    destroy_window_group(w.group.name)


def expect_rejected(
    world: World, call: Callable[[], object], argument: str, shown: str
) -> AFDInputError:
    """`call()` raises AFDInputError naming `argument`, showing `shown`, writing nothing."""
    before = world.snapshot()
    err = raises_input_error(call, argument, shown)
    assert err.argument in str(err) and repr(err.value) in str(err)
    world.assert_unchanged(before)
    return err


def expect_mutation_rejected(
    world: World, op: Callable[..., object], args: Args, mutate: Mutation, argument: str, shown: str
) -> None:
    """`op(**args)`, once `mutate` changed `args`, is rejected as `expect_rejected` checks."""
    mutate(world, args)
    expect_rejected(world, lambda: op(**args), argument, shown)


# the parameters of the tests over the case tables below: one rejection per row
MUTATED = ("mutate", "argument", "shown")
CORRUPTED = ("corrupt", "call", "argument", "shown")


def cases(names: tuple[str, ...], table: Sequence[tuple[Any, ...]]) -> pytest.MarkDecorator:
    """Parametrizes `names` over a table whose rows are (id, *values)."""
    return pytest.mark.parametrize(names, [pytest.param(*row[1:], id=row[0]) for row in table])


# == npu_attention_to_ffn ===================================================================
def a2f_args(world: World, session: int = 0, micro_batch: int = 0) -> Args:
    lay = world.layout
    gen = torch.Generator().manual_seed(session)
    shapes = lay.op_shapes
    return {
        "x": torch.randn(1, BS, H, generator=gen).to(lay.dtype),
        "session_id": torch.tensor([session]),
        "micro_batch_id": torch.tensor([micro_batch]),
        "layer_id": torch.tensor([LAYER]),
        "expert_ids": torch.randint(0, MOE, (1, BS, K), generator=gen),
        "expert_rank_table": world.table.clone(),
        "group": world.group.name,
        "world_size": A + F,
        "ffn_token_info_table_shape": shapes["ffn_token_info_table_shape"],
        "ffn_token_data_shape": shapes["ffn_token_data_shape"],
        "attn_token_info_table_shape": shapes["attn_token_info_table_shape"],
        "moe_expert_num": MOE,
        "scales": None,
        "active_mask": None,
        "quant_mode": 2 if lay.quant else 0,
        "sync_flag": 0,
        "ffn_start_rank_id": 0,
    }


def send(args: Args) -> None:
    ref.npu_attention_to_ffn(**args)


def _set(**values: Any) -> Mutation:
    def mutate(world: World, args: Args) -> None:
        args.update(values)

    return mutate


def _resize(bs: int = BS, h: int = H, k: int = K, dtype: torch.dtype | None = None) -> Mutation:
    """x and expert_ids of another size (the op's shape arguments left as they are)."""

    def mutate(world: World, args: Args) -> None:
        args["x"] = torch.zeros(1, bs, h, dtype=dtype or world.layout.dtype)
        args["expert_ids"] = torch.zeros(1, bs, k, dtype=torch.int64)

    return mutate


def _consistent(**fields: Any) -> Mutation:
    """Every argument consistent with a layout that differs from the group's in `fields`."""

    def mutate(world: World, args: Args) -> None:
        lay = replace(world.layout, **fields)
        args["x"] = torch.zeros(1, lay.tokens, lay.hidden, dtype=lay.dtype)
        args["expert_ids"] = torch.zeros(1, lay.tokens, lay.topk, dtype=torch.int64)
        args["quant_mode"] = 2 if lay.quant else 0
        for key in (
            "ffn_token_info_table_shape",
            "ffn_token_data_shape",
            "attn_token_info_table_shape",
        ):
            args[key] = lay.op_shapes[key]

    return mutate


def _shape_arg(key: str, index: int, delta: int = 1) -> Mutation:
    def mutate(world: World, args: Args) -> None:
        shape = list(args[key])
        shape[index] += delta
        args[key] = shape

    return mutate


def _ids(values: list[list[int]]) -> Mutation:
    return _set(expert_ids=torch.tensor([values]))


def _mask(values: list[bool], shape: tuple[int, ...] | None = None) -> Mutation:
    mask = torch.tensor(values, dtype=torch.bool)
    return _set(active_mask=mask.reshape(shape or (1, len(values))))


def _table(edit: Callable[[torch.Tensor], torch.Tensor | None]) -> Mutation:
    def mutate(world: World, args: Args) -> None:
        table = world.table.clone()
        out = edit(table)
        args["expert_rank_table"] = table if out is None else out

    return mutate


def _plus_one(shape: tuple[int, ...] | list[int], index: int) -> str:
    """How a shape argument with 1 added at `index` is shown: as a list."""
    out = list(shape)
    out[index] += 1
    return repr(out)


def _both(*mutations: Mutation) -> Mutation:
    def mutate(world: World, args: Args) -> None:
        for m in mutations:
            m(world, args)

    return mutate


def _entry(g: int, col: int, value: int) -> Mutation:
    def edit(t: torch.Tensor) -> None:
        t[0, g, col] = value

    return _table(edit)


def _duplicate_local(t: torch.Tensor) -> None:
    t[0, 1, 1:3] = t[0, 0, 1:3]  # expert 1's first replica: rank 0 local 0, as expert 0's


def _extra_rows(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(t: torch.Tensor) -> torch.Tensor:
        extra = t[:, -1:].repeat(1, n, 1)
        extra[0, :, 2] = torch.arange(10, 10 + n, dtype=torch.int32)
        return torch.cat([t, extra], dim=1)

    return edit


# (id, mutation, argument named, value shown)
A2F_CASES: list[tuple[str, Mutation, str, str]] = [
    # x
    ("x-2d", _set(x=torch.zeros(BS, H, dtype=torch.bfloat16)), "x.shape", f"({BS}, {H})"),
    ("x-X=2", _set(x=torch.zeros(2, BS, H, dtype=torch.bfloat16)), "x.shape", f"(2, {BS}, {H})"),
    ("x-int", _set(x=torch.zeros(1, BS, H, dtype=torch.int32)), "x.dtype", "torch.int32"),
    ("x-BS=0", _resize(bs=0), "x.shape[1] (BS)", "0"),
    ("x-BS=513", _resize(bs=513), "x.shape[1] (BS)", "513"),
    ("x-H=0", _resize(h=0), "x.shape[2] (H)", "0"),
    ("x-dtype-vs-group", _resize(dtype=torch.float16), "x.dtype", "torch.float16"),
    ("x-H-vs-group", _consistent(hidden=32), "x.shape[2] (H)", "32"),
    ("x-BS-vs-group", _consistent(tokens=3), "x.shape[1] (BS)", "3"),
    # the slot stride HS is the caller's, so a smaller x fits the shapes; the group says H
    ("x-H-vs-shapes", _resize(h=32), "x.shape[2] (H)", "32"),
    # expert_ids and K
    ("K=0", _resize(k=0), "expert_ids.shape[2] (K)", "0"),
    ("K>moe", _resize(k=MOE + 1), "expert_ids.shape[2] (K)", f"{MOE + 1}"),
    ("K-vs-group", _consistent(topk=1), "expert_ids.shape[2] (K)", "1"),
    ("ids-float", _set(expert_ids=torch.zeros(1, BS, K)), "expert_ids.dtype", "torch.float32"),
    (
        "ids-BS",
        _set(expert_ids=torch.zeros(1, BS + 1, K, dtype=torch.int64)),
        "expert_ids.shape",
        f"(1, {BS + 1}, {K})",
    ),
    (
        "ids-2d",
        _set(expert_ids=torch.zeros(BS, K, dtype=torch.int64)),
        "expert_ids.shape",
        f"({BS}, {K})",
    ),
    ("id=moe", _ids([[0, 1], [2, MOE], [0, 0], [1, 1]]), "expert_ids", f"max {MOE}"),
    ("id<0", _ids([[0, 1], [2, 3], [-1, 0], [1, 1]]), "expert_ids", "min -1"),
    ("id-huge", _ids([[0, 1], [2, 3], [0, 0], [2**31 - 1, 1]]), "expert_ids", f"{2**31 - 1}"),
    (
        "id-bad-in-active-token-with-mask",
        _both(_ids([[0, 9], [0, 0], [0, 0], [0, 0]]), _mask([True, False, False, False])),
        "expert_ids",
        "max 9",
    ),
    # the (1,) scalar tensors
    ("session-2", _set(session_id=torch.tensor([A])), "session_id", f"{A}"),
    ("session-neg", _set(session_id=torch.tensor([-1])), "session_id", "-1"),
    ("session-shape", _set(session_id=torch.tensor([0, 1])), "session_id.shape", "(2,)"),
    ("session-0d", _set(session_id=torch.tensor(0)), "session_id.shape", "()"),
    ("session-float", _set(session_id=torch.tensor([0.0])), "session_id.dtype", "float32"),
    ("mb-M", _set(micro_batch_id=torch.tensor([M])), "micro_batch_id", f"{M}"),
    ("mb-neg", _set(micro_batch_id=torch.tensor([-1])), "micro_batch_id", "-1"),
    ("mb-shape", _set(micro_batch_id=torch.tensor([[0]])), "micro_batch_id.shape", "(1, 1)"),
    ("mb-bool", _set(micro_batch_id=torch.tensor([True])), "micro_batch_id.dtype", "bool"),
    ("layer-neg", _set(layer_id=torch.tensor([-5])), "layer_id", "-5"),
    ("layer-int32max", _set(layer_id=torch.tensor([2**31 - 1])), "layer_id", f"{2**31 - 1}"),
    ("layer-shape", _set(layer_id=torch.tensor([1, 2])), "layer_id.shape", "(2,)"),
    ("layer-float", _set(layer_id=torch.tensor([1.0])), "layer_id.dtype", "float32"),
    # world_size, ffn_start_rank_id
    ("world=A", _set(world_size=A), "world_size", f"{A}"),
    ("world<A", _set(world_size=1), "world_size", "1"),
    ("world-vs-group", _set(world_size=A + F + 1), "world_size", f"{A + F + 1}"),
    ("ffn-start>A", _set(ffn_start_rank_id=A + 1), "ffn_start_rank_id", f"{A + 1}"),
    ("ffn-start<0", _set(ffn_start_rank_id=-1), "ffn_start_rank_id", "-1"),
    ("ffn-start-shifts-table", _set(ffn_start_rank_id=A), "(rank)", "0"),
    # the int[] shape arguments
    ("info-len", _set(ffn_token_info_table_shape=[A, M]), "ffn_token_info_table_shape", "[2, 2]"),
    (
        "info-zero",
        _set(ffn_token_info_table_shape=[A, 0, 14]),
        "ffn_token_info_table_shape",
        "[2, 0, 14]",
    ),
    (
        "info-M",
        _shape_arg("ffn_token_info_table_shape", 1),
        "ffn_token_info_table_shape",
        "[2, 3, 14]",
    ),
    (
        "info-width",
        _shape_arg("ffn_token_info_table_shape", 2),
        "ffn_token_info_table_shape",
        "[2, 2, 15]",
    ),
    # A + 1 sessions in a world of A + F ranks leave F - 1 FFN ranks: rank F - 1 is not one
    ("info-A", _shape_arg("ffn_token_info_table_shape", 0), "(rank)", f"{F - 1}"),
    (
        "info-A-vs-group",
        _both(_consistent(num_attention_ranks=A + 1), _set(world_size=A + F + 1)),
        "ffn_token_info_table_shape[0] (A)",
        f"{A + 1}",
    ),
    *[
        (
            f"data-{i}",
            _shape_arg("ffn_token_data_shape", i),
            "ffn_token_data_shape",
            _plus_one(LAYOUT.ffn_data_shape, i),
        )
        for i in range(4)
    ],
    # HS is a free stride (>= H), but it must be the one the group's windows were laid out with
    ("data-4", _shape_arg("ffn_token_data_shape", 4), "ffn_token_data_shape[4] (HS)", f"{H + 1}"),
    (
        "data-4-below-H",
        _shape_arg("ffn_token_data_shape", 4, -1),
        "ffn_token_data_shape[4] (HS)",
        f"{H - 1}",
    ),
    ("data-len", _set(ffn_token_data_shape=[A, M, BS, E]), "ffn_token_data_shape", "[2, 2, 4, 3]"),
    ("data-neg", _set(ffn_token_data_shape=[A, M, BS, -E, H]), "ffn_token_data_shape", f"{-E}"),
    (
        "attn-BS",
        _shape_arg("attn_token_info_table_shape", 1),
        "attn_token_info_table_shape",
        "[2, 5, 3]",
    ),
    (
        "attn-E",
        _shape_arg("attn_token_info_table_shape", 2),
        "attn_token_info_table_shape",
        "[2, 4, 4]",
    ),
    (
        "attn-M",
        _shape_arg("attn_token_info_table_shape", 0),
        "ffn_token_info_table_shape",
        "[2, 2, 14]",
    ),
    (
        "attn-len",
        _set(attn_token_info_table_shape=[M, BS]),
        "attn_token_info_table_shape",
        "[2, 4]",
    ),
    (
        "M-vs-group",
        _consistent(micro_batches=M + 1),
        "attn_token_info_table_shape[0] (M)",
        f"{M + 1}",
    ),
    # moe_expert_num
    ("moe=0", _set(moe_expert_num=0), "moe_expert_num", "0"),
    ("moe<K", _set(moe_expert_num=K - 1), "expert_ids.shape[2] (K)", f"{K}"),
    ("moe-vs-table", _set(moe_expert_num=MOE + 1), "ffn_token_info_table_shape", "[2, 2, 14]"),
    # expert_rank_table
    ("table-int64", _table(lambda t: t.long()), "expert_rank_table.dtype", "int64"),
    ("table-2d", _table(lambda t: t[0]), "expert_rank_table.dim()", "2"),
    ("table-L=2", _table(lambda t: t.repeat(2, 1, 1)), "expert_rank_table.shape[0] (L)", "2"),
    ("table-S=5", _table(_extra_rows(4)), "expert_rank_table.shape[1]", f"{MOE + 5}"),
    ("table-S<0", _table(lambda t: t[:, : MOE - 1]), "expert_rank_table.shape[1]", f"{MOE - 1}"),
    ("table-S-vs-group", _table(lambda t: t[:, :MOE]), "ffn_token_info_table_shape", "[2, 2, 14]"),
    ("table-even-width", _table(lambda t: t[..., :4]), "expert_rank_table.shape[2]", "4"),
    ("table-width-1", _table(lambda t: t[..., :1]), "expert_rank_table.shape[2]", "1"),
    ("count=0", _entry(2, 0, 0), "expert_rank_table[0, 2, 0] (count)", "0"),
    ("count>R", _entry(2, 0, 3), "expert_rank_table[0, 2, 0] (count)", "3"),
    ("count<0", _entry(4, 0, -1), "expert_rank_table[0, 4, 0] (count)", "-1"),
    ("rank-attention", _entry(1, 3, ATTN_RANK), "expert_rank_table[0, 1, 3] (rank)", "2"),
    ("rank-neg", _entry(0, 1, -1), "expert_rank_table[0, 0, 1] (rank)", "-1"),
    ("rank-beyond", _entry(3, 1, 99), "expert_rank_table[0, 3, 1] (rank)", "99"),
    ("local-1e6", _entry(0, 2, 1_000_000), "expert_rank_table[0, 0, 2] (local id)", "1000000"),
    ("local-neg", _entry(3, 4, -1), "expert_rank_table[0, 3, 4] (local id)", "-1"),
    ("local-dup", _table(_duplicate_local), "expert_rank_table", "rank 0 local 0"),
    # scales
    ("scales-quant0", _set(scales=torch.ones(1, MOE + S, H)), "scales", "a tensor"),
    # active_mask
    (
        "mask-int",
        _set(active_mask=torch.ones(1, BS, dtype=torch.int32)),
        "active_mask.dtype",
        "int32",
    ),
    ("mask-BS", _mask([True] * (BS + 1)), "active_mask.shape", f"(1, {BS + 1})"),
    ("mask-1d", _mask([True] * BS, (BS,)), "active_mask.shape", f"({BS},)"),
    ("mask-holes", _mask([True, False, True, False]), "active_mask", "[1, 0, 1, 0]"),
    ("mask-suffix", _mask([False, False, True, True]), "active_mask", "[0, 0, 1, 1]"),
    # modes
    ("quant=1", _set(quant_mode=1), "quant_mode", "1"),
    ("quant=3", _set(quant_mode=3), "quant_mode", "3"),
    ("quant-vs-group", _consistent(quant=True), "quant_mode", "True"),
    ("sync=2", _set(sync_flag=2), "sync_flag", "2"),
    ("sync=-1", _set(sync_flag=-1), "sync_flag", "-1"),
    # group
    ("group-unknown", _set(group="no-such-group"), "group", "no-such-group"),
]


@cases(MUTATED, A2F_CASES)
def test_attention_to_ffn_rejects(
    world: World, mutate: Mutation, argument: str, shown: str
) -> None:
    args = a2f_args(world)
    expect_mutation_rejected(world, ref.npu_attention_to_ffn, args, mutate, argument, shown)


def _mask_all(world: World, args: Args) -> None:
    args["active_mask"] = torch.ones(1, BS, dtype=torch.bool)


QUANT_CASES: list[tuple[str, Mutation, str, str]] = [
    ("H%32", _resize(h=48), "x.shape[2] (H)", "48"),
    ("H=1", _resize(h=1), "x.shape[2] (H)", "1"),
    (
        "scales-fp16",
        _set(scales=torch.ones(1, MOE + S, H, dtype=torch.float16)),
        "scales.dtype",
        "float16",
    ),
    ("scales-G", _set(scales=torch.ones(1, MOE, H)), "scales.shape", f"(1, {MOE}, {H})"),
    ("scales-H", _set(scales=torch.ones(1, MOE + S, H - 1)), "scales.shape", f"{H - 1})"),
    ("scales-L", _set(scales=torch.ones(MOE + S, H)), "scales.shape", f"({MOE + S}, {H})"),
    ("x-inf", _set(x=torch.full((1, BS, H), float("inf"), dtype=torch.bfloat16)), "x", "inf"),
    ("quant-off-vs-group", _consistent(quant=False), "quant_mode", "False"),
]


@cases(MUTATED, QUANT_CASES)
def test_attention_to_ffn_rejects_bad_quant_input(
    qworld: World, mutate: Mutation, argument: str, shown: str
) -> None:
    args = a2f_args(qworld)
    expect_mutation_rejected(qworld, ref.npu_attention_to_ffn, args, mutate, argument, shown)


def test_attention_to_ffn_baselines_are_accepted(world: World, qworld: World) -> None:
    """The unmutated calls pass, so each rejection above is due to its one change."""
    before = world.snapshot()
    send(a2f_args(world))
    assert world.snapshot()[0] != before[0]
    args = a2f_args(qworld)
    args["scales"] = torch.rand(1, MOE + S, H) + 0.5
    send(args)
    info, _ = qworld.group.ffn_views(FFN_RANK)
    assert int(info[0, 0, FLAG_OFFSET]) == 1


def test_unused_table_tail_entries_are_ignored(world: World) -> None:
    args = a2f_args(world)
    args["expert_rank_table"][0, MOE, 3:] = torch.tensor([999, -7], dtype=torch.int32)
    send(args)
    for r in world.group.topology.ffn_ranks:
        assert int(world.group.ffn_views(r)[0][0, 0, FLAG_OFFSET]) == 1


@settings(max_examples=25, deadline=None)
@given(
    active=st.integers(0, BS),
    garbage=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=BS * K, max_size=BS * K),
)
def test_garbage_ids_of_masked_tokens_are_ignored(active: int, garbage: list[int]) -> None:
    """Ids of tokens past the mask's prefix are never read: any value is accepted."""
    world = make_world()
    try:
        args = a2f_args(world)
        ids = torch.tensor(garbage, dtype=torch.int64).reshape(1, BS, K)
        ids[0, :active] = args["expert_ids"][0, :active]
        args["expert_ids"] = ids
        args["active_mask"] = torch.arange(BS).unsqueeze(0) < active
        send(args)
        for r in world.group.topology.ffn_ranks:
            info, _ = world.group.ffn_views(r)
            assert int(info[0, 0, FLAG_OFFSET]) == 1  # sync_flag 0: every FFN rank
            slots = info[0, 0, SLOTS_OFFSET:].reshape(BS, E)
            assert bool((slots[active:] == EMPTY_LOCAL_ID).all())
        own, _ = world.group.attn_views(ATTN_RANK)
        assert bool((own[0, active:] == 1).all())
        assert bool((own[0, :active] == 0).all())
    finally:
        destroy_window_group(world.group.name)


# == npu_ffn_worker_batching and ffn_worker_scheduler_ =======================================
def fill_micro_batch(world: World, micro_batch: int = 0) -> None:
    for s in range(A):
        send(a2f_args(world, s, micro_batch))


def batching_args(world: World, rank: int = FFN_RANK) -> Args:
    lay = world.layout
    return {
        "schedule_context": world.ctx(rank),
        "expert_num": world.expert_num(rank),
        "max_out_shape": [A, BS, E, H],
        "token_dtype": TOKEN_DTYPE_INT8 if lay.quant else TOKEN_DTYPE_BF16,
        "need_schedule": 1,
        "layer_num": 0,
    }


def _foreign_context(kind: str) -> Mutation:
    def mutate(world: World, args: Args) -> None:
        if kind == "attention":
            args["schedule_context"] = world.ctx(ATTN_RANK)
        elif kind == "float":
            args["schedule_context"] = torch.zeros(256, dtype=torch.float32)
        elif kind == "short":
            args["schedule_context"] = world.ctx(FFN_RANK)[:512]
        elif kind == "strided":
            args["schedule_context"] = torch.zeros(2048, dtype=torch.int8)[::2]
        elif kind == "zeros":
            args["schedule_context"] = torch.zeros(1024, dtype=torch.int8)
        else:
            raise AssertionError(kind)

    return mutate


# batching and combine take token_dtype and need_schedule under the same rules
TOKEN_DTYPE_AND_SCHEDULE_CASES: list[tuple[str, Mutation, str, str]] = [
    ("token_dtype-fp16", _set(token_dtype=TOKEN_DTYPE_FP16), "token_dtype", "0"),
    ("token_dtype-int8", _set(token_dtype=TOKEN_DTYPE_INT8), "token_dtype", "2"),
    ("need_schedule=2", _set(need_schedule=2), "need_schedule", "2"),
]

CONTEXT_CASES: list[tuple[str, Mutation, str, str]] = [
    ("ctx-float", _foreign_context("float"), "schedule_context", "torch.float32 (256,)"),
    ("ctx-short", _foreign_context("short"), "schedule_context", "(512,)"),
    ("ctx-strided", _foreign_context("strided"), "schedule_context", "(1024,)"),
    ("ctx-never-initialized", _foreign_context("zeros"), "schedule_context", "0"),
]

BATCHING_CASES: list[tuple[str, Mutation, str, str]] = [
    ("expert_num=0", _set(expert_num=0), "expert_num", "0"),
    ("expert_num<0", _set(expert_num=-2), "expert_num", "-2"),
    *[
        (
            f"max_out-{i}",
            _shape_arg("max_out_shape", i),
            "max_out_shape",
            _plus_one([A, BS, E, H], i),
        )
        for i in range(3)
    ],
    ("max_out-3", _shape_arg("max_out_shape", 3), "max_out_shape[3] (H)", f"{H + 1}"),
    ("max_out-zero", _set(max_out_shape=[A, BS, 0, H]), "max_out_shape", f"[{A}, {BS}, 0, {H}]"),
    *TOKEN_DTYPE_AND_SCHEDULE_CASES,
    ("token_dtype-9", _set(token_dtype=9), "token_dtype", "9"),
    ("need_schedule=-1", _set(need_schedule=-1), "need_schedule", "-1"),
    ("layer_num<0", _set(layer_num=-1), "layer_num", "-1"),
    ("layer_num<=layer", _set(layer_num=LAYER), "window layer id", f"{LAYER}"),
    # batching reads no schedule_mode (as on A3): an attention context has no FFN window
    ("ctx-attention", _foreign_context("attention"), "ffn.token_info_buf", "0"),
    *CONTEXT_CASES,
]


@cases(MUTATED, BATCHING_CASES)
def test_ffn_worker_batching_rejects(
    world: World, mutate: Mutation, argument: str, shown: str
) -> None:
    fill_micro_batch(world)
    args = batching_args(world)
    expect_mutation_rejected(world, ref.npu_ffn_worker_batching, args, mutate, argument, shown)


def test_ffn_worker_batching_rejects_int8_dtype_mismatch(qworld: World) -> None:
    fill_micro_batch(qworld)
    args = batching_args(qworld)
    args["token_dtype"] = TOKEN_DTYPE_BF16
    expect_rejected(qworld, lambda: ref.npu_ffn_worker_batching(**args), "token_dtype", "1")


def test_ffn_worker_batching_baseline_is_accepted(world: World) -> None:
    fill_micro_batch(world)
    out = ref.npu_ffn_worker_batching(**batching_args(world))
    assert int(out[-1][0]) > 0
    assert int(world.group.ffn_views(FFN_RANK)[0][0, 0, FLAG_OFFSET]) == 0


def test_context_of_a_destroyed_group_is_rejected() -> None:
    world = make_world()
    fill_micro_batch(world)
    args = batching_args(world)
    destroy_window_group(world.group.name)
    ctx = args["schedule_context"].clone()
    with pytest.raises(AFDInputError) as info:
        ref.npu_ffn_worker_batching(**args)
    assert info.value.argument == "schedule_context ffn.token_info_buf"
    assert info.value.value == sc.get(ctx, sc.FFN_INFO_BUF)
    assert torch.equal(args["schedule_context"], ctx)


SCHEDULER_CASES: list[tuple[str, Mutation, str, str]] = [
    ("sync_group_size=3", _set(sync_group_size=3), "sync_group_size", "3"),
    ("sync_group_size=0", _set(sync_group_size=0), "sync_group_size", "0"),
    ("execute_mode=1", _set(execute_mode=1), "execute_mode", "1"),
    ("ctx-attention", _foreign_context("attention"), "schedule_mode", "1"),
    *CONTEXT_CASES,
]


@cases(MUTATED, SCHEDULER_CASES)
def test_ffn_worker_scheduler_rejects(
    world: World, mutate: Mutation, argument: str, shown: str
) -> None:
    fill_micro_batch(world)
    args: Args = {"schedule_context": world.ctx(FFN_RANK)}
    mutate(world, args)
    ctx = args.pop("schedule_context")
    expect_rejected(world, lambda: ref.ffn_worker_scheduler_(ctx, **args), argument, shown)


def test_ffn_worker_scheduler_then_batching_without_schedule_is_accepted(world: World) -> None:
    fill_micro_batch(world)
    ref.ffn_worker_scheduler_(world.ctx(FFN_RANK))
    args = batching_args(world)
    args["need_schedule"] = 0
    out = ref.npu_ffn_worker_batching(**args)
    assert int(out[-1][0]) > 0


# == npu_ffn_to_attention ===================================================================
def f2a_args(world: World) -> Args:
    lay = world.layout
    shapes = lay.op_shapes
    rows = torch.zeros(Y, dtype=torch.int32)

    def head(values: list[int]) -> torch.Tensor:
        out = rows.clone()
        out[: len(values)] = torch.tensor(values, dtype=torch.int32)
        return out

    return {
        "x": torch.randn(Y, H).to(lay.dtype),
        "session_ids": head([0, 1, 0]),
        "micro_batch_ids": head([0, 0, 1]),
        "token_ids": head([0, 1, BS - 1]),
        "expert_offsets": head([0, E - 1, 1]),
        "actual_token_num": torch.tensor([3], dtype=torch.int64),
        "group": world.group.name,
        "world_size": A + F,
        "token_info_table_shape": shapes["token_info_table_shape"],
        "token_data_shape": shapes["token_data_shape"],
        "attn_rank_table": torch.tensor(world.group.topology.attention_ranks, dtype=torch.int32),
    }


def _row(name: str, index: int, value: int) -> Mutation:
    def mutate(world: World, args: Args) -> None:
        args[name] = args[name].clone()
        args[name][index] = value

    return mutate


def _f2a_hidden(h: int) -> Mutation:
    def mutate(world: World, args: Args) -> None:
        args["x"] = torch.zeros(Y, h, dtype=world.layout.dtype)
        args["token_data_shape"] = [M, BS, E, h]

    return mutate


def _f2a_slots(e: int) -> Mutation:
    def mutate(world: World, args: Args) -> None:
        args["token_info_table_shape"] = [M, BS, e]
        args["token_data_shape"] = [M, BS, e, H]

    return mutate


F2A_CASES: list[tuple[str, Mutation, str, str]] = [
    ("session-A", _row("session_ids", 1, A), "session_ids", f"max {A}"),
    ("session-neg", _row("session_ids", 2, -1), "session_ids", "min -1"),
    ("mb-M", _row("micro_batch_ids", 0, M), "micro_batch_ids", f"max {M}"),
    ("mb-neg", _row("micro_batch_ids", 0, -3), "micro_batch_ids", "min -3"),
    ("token-BS", _row("token_ids", 2, BS), "token_ids", f"max {BS}"),
    ("offset-E", _row("expert_offsets", 1, E), "expert_offsets", f"max {E}"),
    ("offset-neg", _row("expert_offsets", 0, -1), "expert_offsets", "min -1"),
    ("actual>Y", _set(actual_token_num=torch.tensor([Y + 1])), "actual_token_num", f"{Y + 1}"),
    ("actual<0", _set(actual_token_num=torch.tensor([-1])), "actual_token_num", "-1"),
    ("actual-shape", _set(actual_token_num=torch.tensor([1, 2])), "actual_token_num.shape", "(2,)"),
    (
        "actual-float",
        _set(actual_token_num=torch.tensor([1.0])),
        "actual_token_num.dtype",
        "float32",
    ),
    ("dest-ffn", _set(attn_rank_table=torch.tensor([FFN_RANK, 3])), "destination rank", "0"),
    ("dest-ffn-default", _set(attn_rank_table=None), "destination rank", "0"),
    (
        "session-beyond-world",
        _both(_set(attn_rank_table=None), _row("session_ids", 0, A + F)),
        "session_ids",
        f"max {A + F}",
    ),
    ("rank-table-beyond", _set(attn_rank_table=torch.tensor([2, 9])), "attn_rank_table", "9"),
    (
        "rank-table-float",
        _set(attn_rank_table=torch.tensor([2.0, 3.0])),
        "attn_rank_table",
        "float32",
    ),
    ("rank-table-2d", _set(attn_rank_table=torch.tensor([[2, 3]])), "attn_rank_table", "(1, 2)"),
    ("x-1d", _set(x=torch.zeros(Y, dtype=torch.bfloat16)), "x.dim()", "1"),
    ("x-int", _set(x=torch.zeros(Y, H, dtype=torch.int32)), "x.dtype", "torch.int32"),
    ("x-fp16-vs-group", _set(x=torch.zeros(Y, H, dtype=torch.float16)), "x.dtype", "float16"),
    (
        "x-H-vs-data-shape",
        _set(x=torch.zeros(Y, 32, dtype=torch.bfloat16)),
        "token_data_shape",
        f"{H}",
    ),
    ("x-H-vs-group", _f2a_hidden(32), "x.shape[1] (H)", "32"),
    (
        "ids-shape",
        _set(session_ids=torch.zeros(Y - 1, dtype=torch.int32)),
        "session_ids.shape",
        f"({Y - 1},)",
    ),
    ("ids-float", _set(token_ids=torch.zeros(Y)), "token_ids.dtype", "float32"),
    ("data-vs-info", _set(token_data_shape=[M, BS, E + 1, H]), "token_data_shape", f"{E + 1}"),
    ("data-len", _set(token_data_shape=[M, BS, E]), "token_data_shape", "[2, 4, 3]"),
    ("info-len", _set(token_info_table_shape=[M, BS]), "token_info_table_shape", "[2, 4]"),
    ("info-vs-group", _f2a_slots(E + 1), "token_info_table_shape", f"{E + 1}"),
    ("world-vs-group", _set(world_size=A + F + 1), "world_size", f"{A + F + 1}"),
    ("world<2", _set(world_size=1), "world_size", "1"),
    ("group-unknown", _set(group="nope"), "group", "nope"),
]


@cases(MUTATED, F2A_CASES)
def test_ffn_to_attention_rejects(
    world: World, mutate: Mutation, argument: str, shown: str
) -> None:
    args = f2a_args(world)
    expect_mutation_rejected(world, ref.npu_ffn_to_attention, args, mutate, argument, shown)


def test_ffn_to_attention_ignores_rows_past_actual_token_num(world: World) -> None:
    args = f2a_args(world)
    for name in ("session_ids", "micro_batch_ids", "token_ids", "expert_offsets"):
        args[name][3:] = -12345
    ref.npu_ffn_to_attention(**args)
    info, data = world.group.attn_views(ATTN_RANK)
    assert int(info[0, 0, 0]) == 1 and int(info[1, BS - 1, 1]) == 1
    assert int(info.sum()) == 2  # rows 0 and 2 went to session 0, nothing else
    assert torch.equal(data[0, 0, 0], args["x"][0])


# == npu_attention_worker_combine and attention_worker_scheduler_ ============================
def results_arrived(world: World, micro_batch: int = 0) -> None:
    info, _ = world.group.attn_views(ATTN_RANK)
    info[micro_batch] = 1


def combine_args(world: World) -> Args:
    return {
        "schedule_context": world.ctx(ATTN_RANK),
        "expert_scales": torch.rand(BS, K),
        "layer_id": torch.tensor([LAYER]),
        "hidden_size": H,
        "token_dtype": TOKEN_DTYPE_BF16,
        "need_schedule": 1,
    }


def _ffn_context(world: World, args: Args) -> None:
    args["schedule_context"] = world.ctx(FFN_RANK)


COMBINE_CASES: list[tuple[str, Mutation, str, str]] = [
    (
        "scales-bf16",
        _set(expert_scales=torch.rand(BS, K).bfloat16()),
        "expert_scales.dtype",
        "bfloat16",
    ),
    ("scales-BS", _set(expert_scales=torch.rand(BS + 1, K)), "expert_scales.shape", f"({BS + 1}"),
    ("scales-1d", _set(expert_scales=torch.rand(BS)), "expert_scales.shape", f"({BS},)"),
    ("scales-3d", _set(expert_scales=torch.rand(1, BS, K)), "expert_scales.shape", "(1, "),
    ("scales-K=0", _set(expert_scales=torch.rand(BS, 0)), "expert_scales.shape[1] (K)", "0"),
    ("scales-K<group", _set(expert_scales=torch.rand(BS, K - 1)), "(K)", f"{K - 1}"),
    ("scales-K=E", _set(expert_scales=torch.rand(BS, E)), "(K)", f"{E}"),
    ("layer-shape", _set(layer_id=torch.tensor([1, 2])), "layer_id.shape", "(2,)"),
    ("layer-float", _set(layer_id=torch.tensor([1.5])), "layer_id.dtype", "float32"),
    ("hidden", _set(hidden_size=H // 2), "hidden_size", f"{H // 2}"),
    ("hidden-0", _set(hidden_size=0), "hidden_size", "0"),
    *TOKEN_DTYPE_AND_SCHEDULE_CASES,
    # combine reads no schedule_mode (as on A3): an FFN context has no attention window
    ("ctx-ffn", _ffn_context, "attention.token_data_buf", "0"),
    ("ctx-float", _foreign_context("float"), "schedule_context", "torch.float32"),
    ("ctx-zeros", _foreign_context("zeros"), "schedule_context micro_batch_num", "0"),
]


@cases(MUTATED, COMBINE_CASES)
def test_attention_worker_combine_rejects(
    world: World, mutate: Mutation, argument: str, shown: str
) -> None:
    results_arrived(world)
    args = combine_args(world)
    expect_mutation_rejected(world, ref.npu_attention_worker_combine, args, mutate, argument, shown)


def test_attention_worker_combine_baseline_is_accepted(world: World) -> None:
    results_arrived(world)
    y, nxt = ref.npu_attention_worker_combine(**combine_args(world))
    assert tuple(y.shape) == (BS, H) and int(nxt[0]) == LAYER + 1
    assert int(world.group.attn_views(ATTN_RANK)[0][0].sum()) == 0


@pytest.mark.parametrize(
    MUTATED,
    [
        pytest.param(_ffn_context, "schedule_mode", "0", id="ctx-ffn"),
        pytest.param(_foreign_context("short"), "schedule_context", "(512,)", id="ctx-short"),
    ],
)
def test_attention_worker_scheduler_rejects(
    world: World, mutate: Mutation, argument: str, shown: str
) -> None:
    results_arrived(world)
    args: Args = {"schedule_context": world.ctx(ATTN_RANK)}
    mutate(world, args)
    call = lambda: ref.attention_worker_scheduler_(args["schedule_context"])  # noqa: E731
    expect_rejected(world, call, argument, shown)


# == the schedule-context holder ============================================================
def holder_args(world: World, rank: int) -> Args:
    lay, group = world.layout, world.group
    ffn = group.topology.is_ffn(rank)
    counts = {
        "schedule_mode": sc.SCHEDULE_MODE_FFN if ffn else sc.SCHEDULE_MODE_ATTENTION,
        "session_num": A,
        "micro_batch_num": M,
        "micro_batch_size": BS,
        "selected_expert_num": E,
        "expert_num": world.expert_num(rank) if ffn else 1,
        "attn_to_ffn_token_size": lay.attn_to_ffn_token_size,
        "ffn_to_attn_token_size": lay.ffn_to_attn_token_size,
    }
    return holder_args_with_window(counts, group.address(rank), group.window_bytes(rank))


def _window(key: str, how: str) -> Mutation:
    def mutate(world: World, args: Args) -> None:
        if how == "bogus":
            args[key] = BOGUS_ADDRESS
        elif how == "offset":
            args[key] += 512
        elif how == "other-role":
            other = ATTN_RANK if key == "ffn_window" else FFN_RANK
            args[key] = world.group.address(other)
        elif how == "small":
            args[f"{key}_size"] -= 1
        elif how == "large":
            args[f"{key}_size"] += 1
        else:
            raise AssertionError(how)

    return mutate


HOLDER_CASES: list[tuple[str, int, Mutation, str, str]] = [
    ("mode=2", FFN_RANK, _set(schedule_mode=2), "schedule_mode", "2"),
    ("mode-vs-window", FFN_RANK, _set(schedule_mode=1), "attention_window", "0"),
    ("sessions", FFN_RANK, _set(session_num=A + 1), "session_num", f"{A + 1}"),
    ("micro-batches", ATTN_RANK, _set(micro_batch_num=1), "micro_batch_num", "1"),
    ("bs", FFN_RANK, _set(micro_batch_size=BS * 2), "micro_batch_size", f"{BS * 2}"),
    ("slots=K", FFN_RANK, _set(selected_expert_num=K), "selected_expert_num", f"{K}"),
    ("expert_num=0", FFN_RANK, _set(expert_num=0), "expert_num", "0"),
    ("a2f-size", FFN_RANK, _set(attn_to_ffn_token_size=H), "attn_to_ffn_token_size", f"{H}"),
    (
        "f2a-size",
        ATTN_RANK,
        _set(ffn_to_attn_token_size=H * 4),
        "ffn_to_attn_token_size",
        f"{H * 4}",
    ),
    ("ffn-bogus", FFN_RANK, _window("ffn_window", "bogus"), "ffn_window", f"{BOGUS_ADDRESS}"),
    ("ffn-null", FFN_RANK, _set(ffn_window=0), "ffn_window", "0"),
    ("ffn-offset", FFN_RANK, _window("ffn_window", "offset"), "ffn_window", "512"),
    ("ffn-of-attn", FFN_RANK, _window("ffn_window", "other-role"), "ffn_window", f"{ATTN_RANK}"),
    (
        "ffn-small",
        FFN_RANK,
        _window("ffn_window", "small"),
        "ffn_window_size",
        f"{LAYOUT.ffn_window_bytes - 1}",
    ),
    (
        "ffn-large",
        FFN_RANK,
        _window("ffn_window", "large"),
        "ffn_window_size",
        f"{LAYOUT.ffn_window_bytes + 1}",
    ),
    (
        "attn-bogus",
        ATTN_RANK,
        _window("attention_window", "bogus"),
        "attention_window",
        f"{BOGUS_ADDRESS}",
    ),
    (
        "attn-of-ffn",
        ATTN_RANK,
        _window("attention_window", "other-role"),
        "attention_window",
        f"{FFN_RANK}",
    ),
    (
        "attn-small",
        ATTN_RANK,
        _window("attention_window", "small"),
        "attention_window_size",
        f"{LAYOUT.attn_window_bytes - 1}",
    ),
]


@cases(("rank", *MUTATED), HOLDER_CASES)
def test_schedule_context_holder_rejects(
    world: World, rank: int, mutate: Mutation, argument: str, shown: str
) -> None:
    args = holder_args(world, rank)
    ref.create_schedule_context_holder(**args)  # the baseline is accepted
    expect_mutation_rejected(
        world, ref.create_schedule_context_holder, args, mutate, argument, shown
    )


# == untrusted window and context contents ==================================================
def _ffn_info(world: World) -> torch.Tensor:
    return world.group.ffn_views(FFN_RANK)[0]


def _first_filled_slot(world: World, session: int = 0) -> int:
    ids = _ffn_info(world)[session, 0, SLOTS_OFFSET:]
    return SLOTS_OFFSET + int((ids < 1_000_000).nonzero()[0, 0])


def _corrupt_local_id(value: int) -> Callable[[World], None]:
    def corrupt(world: World) -> None:
        _ffn_info(world)[0, 0, _first_filled_slot(world)] = value

    return corrupt


def _corrupt_ffn_flag(world: World) -> None:
    _ffn_info(world)[1, 0, FLAG_OFFSET] = 7


def _corrupt_layer(world: World) -> None:
    _ffn_info(world)[1, 0, LAYER_OFFSET] = LAYER + 6


def _corrupt_ctx(
    field: tuple[int, int], value: int, rank: int = FFN_RANK
) -> Callable[[World], None]:
    def corrupt(world: World) -> None:
        sc.put(world.ctx(rank), field, value)

    return corrupt


def _shift_ctx(field: tuple[int, int], delta: int, rank: int = FFN_RANK) -> Callable[[World], None]:
    def corrupt(world: World) -> None:
        sc.put(world.ctx(rank), field, sc.get(world.ctx(rank), field) + delta)

    return corrupt


def _batching(expert_num: int | None = None) -> Callable[[World], object]:
    def call(world: World) -> object:
        args = batching_args(world)
        if expert_num is not None:
            args["expert_num"] = expert_num
        return ref.npu_ffn_worker_batching(**args)

    return call


def _ffn_scheduler(world: World) -> object:
    return ref.ffn_worker_scheduler_(world.ctx(FFN_RANK))


FFN_CONTENT_CASES: list[
    tuple[str, Callable[[World], None], Callable[[World], object], str, str]
] = [
    ("local-5000", _corrupt_local_id(5000), _batching(), "local expert ids", "max 5000"),
    ("local-5000-expert_num-2", _corrupt_local_id(5000), _batching(2), "local expert", "5000"),
    ("local-neg", _corrupt_local_id(-3), _batching(), "local expert ids", "min -3"),
    (
        "local-int32-min",
        _corrupt_local_id(-(2**31)),
        _batching(),
        "local expert ids",
        "-2147483648",
    ),
    ("expert_num-too-small", lambda w: None, _batching(2), "local expert ids", "max 4"),
    ("flag-7", _corrupt_ffn_flag, _batching(), "window flags", "7"),
    ("flag-7-scheduler", _corrupt_ffn_flag, _ffn_scheduler, "window flags", "7"),
    ("flag-neg", lambda w: _ffn_info(w).__setitem__((0, 0, 0), -1), _batching(), "flags", "-1"),
    ("layers-disagree", _corrupt_layer, _batching(), "layer ids", f"[{LAYER}, {LAYER + 6}]"),
    ("polling-index", _corrupt_ctx(sc.FFN_POLLING_INDEX, M), _batching(), "polling_index", f"{M}"),
    ("polling-index-neg", _corrupt_ctx(sc.FFN_POLLING_INDEX, -1), _ffn_scheduler, "polling", "-1"),
    ("ctx-mode", _corrupt_ctx(sc.SCHEDULE_MODE, 5), _ffn_scheduler, "schedule_mode", "5"),
    (
        "ctx-address",
        _corrupt_ctx(sc.FFN_INFO_BUF, BOGUS_ADDRESS),
        _batching(),
        "ffn.token_info_buf",
        f"{BOGUS_ADDRESS}",
    ),
    # a context aimed at a window must describe that window, or rows would be misread
    ("ctx-M-vs-window", _corrupt_ctx(sc.MICRO_BATCH_NUM, 1), _batching(), "micro_batch_num", "1"),
    ("ctx-data-moved", _shift_ctx(sc.FFN_DATA_BUF, -128), _batching(), "token_data_buf", "byte"),
    (
        "ctx-info-misaligned",
        _corrupt_ctx(sc.FFN_INFO_BUF, BOGUS_ADDRESS + 2),
        _ffn_scheduler,
        "token_info_buf",
        f"{BOGUS_ADDRESS + 2}",
    ),
]


@cases(CORRUPTED, FFN_CONTENT_CASES)
def test_corrupt_ffn_window_or_context_is_rejected(
    world: World,
    corrupt: Callable[[World], None],
    call: Callable[[World], object],
    argument: str,
    shown: str,
) -> None:
    fill_micro_batch(world)
    corrupt(world)
    expect_rejected(world, lambda: call(world), argument, shown)


def _corrupt_attn_flag(world: World) -> None:
    world.group.attn_views(ATTN_RANK)[0][0, 1, 1] = 7


def _combine(world: World) -> object:
    return ref.npu_attention_worker_combine(**combine_args(world))


def _combine_one_token_less(world: World) -> object:
    return ref.npu_attention_worker_combine(
        **{**combine_args(world), "expert_scales": torch.rand(BS - 1, K)}
    )


def _attn_scheduler(world: World) -> object:
    return ref.attention_worker_scheduler_(world.ctx(ATTN_RANK))


ATTN_CONTENT_CASES: list[
    tuple[str, Callable[[World], None], Callable[[World], object], str, str]
] = [
    ("flag-7", _corrupt_attn_flag, _combine, "window flags", "7"),
    ("flag-7-scheduler", _corrupt_attn_flag, _attn_scheduler, "window flags", "7"),
    (
        "micro-batch-id",
        _corrupt_ctx(sc.ATTN_MICRO_BATCH_ID, M + 3, ATTN_RANK),
        _combine,
        "schedule_context attention.micro_batch_id",
        f"{M + 3}",
    ),
    (
        "micro-batch-id-scheduler",
        _corrupt_ctx(sc.ATTN_MICRO_BATCH_ID, -1, ATTN_RANK),
        _attn_scheduler,
        "micro_batch_id",
        "-1",
    ),
    (  # BS comes from expert_scales when the context leaves it 0, but the window says BS
        "bs-vs-window",
        _corrupt_ctx(sc.MICRO_BATCH_SIZE, 0, ATTN_RANK),
        _combine_one_token_less,
        "micro_batch_size",
        f"{BS - 1}",
    ),
    ("data-moved", _shift_ctx(sc.ATTN_DATA_BUF, -512, ATTN_RANK), _combine, "data_buf", "byte"),
    (
        "info-misaligned",
        _corrupt_ctx(sc.ATTN_INFO_BUF, BOGUS_ADDRESS + 2, ATTN_RANK),
        _attn_scheduler,
        "token_info_buf",
        f"{BOGUS_ADDRESS + 2}",
    ),
    (
        "address",
        _corrupt_ctx(sc.ATTN_INFO_BUF, 12345, ATTN_RANK),
        _combine,
        "schedule_context attention.token_info_buf",
        "12345",
    ),
]


@cases(CORRUPTED, ATTN_CONTENT_CASES)
def test_corrupt_attention_window_or_context_is_rejected(
    world: World,
    corrupt: Callable[[World], None],
    call: Callable[[World], object],
    argument: str,
    shown: str,
) -> None:
    results_arrived(world)
    corrupt(world)
    expect_rejected(world, lambda: call(world), argument, shown)


@pytest.mark.parametrize("side", ["ffn", "attention"])
def test_a_stopped_scheduler_publishes_nothing(world: World, side: str) -> None:
    # The A3 schedulers poll only while the run flag is set: stopped, they change nothing,
    # even with a micro-batch ready.
    if side == "ffn":
        fill_micro_batch(world)
        rank, scheduler = FFN_RANK, ref.ffn_worker_scheduler_
    else:
        results_arrived(world)
        rank, scheduler = ATTN_RANK, ref.attention_worker_scheduler_
    world.contexts[rank].stop_schedule()
    before = world.snapshot()
    assert scheduler(world.ctx(rank)) is world.ctx(rank)
    world.assert_unchanged(before)
