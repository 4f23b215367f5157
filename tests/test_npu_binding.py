"""The NPU backend forwards every argument to torch_npu, and refuses bad input before it.

torch_npu cannot run here, so a recording stand-in (tests/torch_npu_standin.py) takes its
place in `sys.modules`. The tests check the calling surface (torch_npu's schemas), that each
forwarded call carries exactly the caller's arguments, that every contract and A3 check
fails before the stand-in records anything, the schedule context records, the value-check
switch, `load_backend("auto")` and that importing the backend never imports torch_npu.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from op_inputs import holder_args_with_window
from torch_npu_standin import (
    SlottedHolder,
    TorchNpuStandin,
    schema_signature,
)

import afd_dispatch.kernels.npu as npu
from afd_dispatch import AFDInputError, RankTopology, WindowLayout, build_expert_rank_table
from afd_dispatch.kernels import BACKEND_API, load_backend
from afd_dispatch.kernels.npu import a3
from afd_dispatch.kernels.schemas import TORCH_NPU_SCHEMAS

# One window group: A = 2 attention ranks after F = 2 FFN ranks, M = 2, BS = 4, K = 2, S = 1.
A, F, M, BS, K, S, H = 2, 2, 2, 4, 2, 1, 1024
E = K + S
ROUTED = 8
WORLD = A + F
ROWS = A * BS * E
FFN_WINDOW, ATTN_WINDOW = 0x7F00_0000_0000, 0x7F10_0000_0000
WINDOW_SIZE = 64 << 20


@pytest.fixture(autouse=True)
def _no_torch_npu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees a torch_npu it did not install, and value checks start on."""
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.delitem(sys.modules, "torch_npu._afd", raising=False)
    previous = npu.set_value_checks(True)
    yield
    npu.set_value_checks(previous)
    _HOLDERS.clear()


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> TorchNpuStandin:
    fake = TorchNpuStandin()
    fake.install(monkeypatch)
    return fake


# -- arguments of a valid call of each op -----------------------------------------------------
def a2f_args(
    hidden: int = H, dtype: torch.dtype = torch.bfloat16, **override: Any
) -> dict[str, Any]:
    """Arguments of a valid call, with window shapes that fit x's hidden size and dtype."""
    gen = torch.Generator().manual_seed(0)
    table = build_expert_rank_table(RankTopology(A, F), ROUTED, S)
    layout = WindowLayout(A, M, BS, K, S, hidden, torch.bfloat16)
    args: dict[str, Any] = {
        "x": torch.randn(1, BS, hidden, generator=gen).to(dtype),
        "session_id": torch.tensor([1], dtype=torch.int32),
        "micro_batch_id": torch.tensor([1], dtype=torch.int32),
        "layer_id": torch.tensor([5], dtype=torch.int32),
        "expert_ids": torch.randint(0, ROUTED, (1, BS, K), generator=gen, dtype=torch.int32),
        "expert_rank_table": table,
        "group": "hccl_world_group",
        "world_size": WORLD,
        "ffn_token_info_table_shape": list(layout.ffn_info_shape),
        "ffn_token_data_shape": list(layout.ffn_data_shape),
        "attn_token_info_table_shape": list(layout.attn_info_shape),
        "moe_expert_num": ROUTED,
    }
    args.update(override)
    return args


def f2a_args(
    hidden: int = H, dtype: torch.dtype = torch.bfloat16, **override: Any
) -> dict[str, Any]:
    ids = torch.arange(ROWS, dtype=torch.int32)
    args: dict[str, Any] = {
        "x": torch.ones(ROWS, hidden, dtype=dtype),
        "session_ids": ids % A,
        "micro_batch_ids": torch.zeros(ROWS, dtype=torch.int32),
        "token_ids": ids % BS,
        "expert_offsets": ids % E,
        "actual_token_num": torch.tensor([ROWS - 3], dtype=torch.int64),
        "group": "hccl_world_group",
        "world_size": WORLD,
        "token_info_table_shape": [1, BS, E],
        "token_data_shape": [1, BS, E, hidden],
    }
    args.update(override)
    return args


def holder_args(mode: int, **override: Any) -> dict[str, Any]:
    ffn = mode == 0
    counts = {
        "schedule_mode": mode,
        "session_num": A,
        "micro_batch_num": M if ffn else 1,
        "micro_batch_size": BS,
        "selected_expert_num": E,
        "expert_num": ROUTED + S,
        "attn_to_ffn_token_size": 2 * H,
        "ffn_to_attn_token_size": 2 * H,
    }
    window = FFN_WINDOW if ffn else ATTN_WINDOW
    return holder_args_with_window(counts, window, WINDOW_SIZE, **override)


# Holders made by the helpers below. A record lives as long as its holder (as on A3, where
# the holder owns the context's device workspace), so the tests keep them until the end.
_HOLDERS: list[Any] = []


def _context(standin: TorchNpuStandin, mode: int, override: dict[str, Any]) -> torch.Tensor:
    holder = npu.create_schedule_context_holder(**holder_args(mode, **override))
    _HOLDERS.append(holder)
    standin.calls.clear()
    ctx: torch.Tensor = holder.get_schedule_context_tensor()
    return ctx


def ffn_context(standin: TorchNpuStandin, **override: Any) -> torch.Tensor:
    return _context(standin, 0, override)


def attention_context(standin: TorchNpuStandin, **override: Any) -> torch.Tensor:
    return _context(standin, 1, override)


def foreign_context() -> torch.Tensor:
    """A context tensor this backend did not create (made by torch_npu directly)."""
    return torch.zeros(1024, dtype=torch.int8)


def scales(tokens: int = BS, topk: int = K) -> torch.Tensor:
    return torch.full((tokens, topk), 0.5, dtype=torch.float32)


def layer(value: int = 3) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int32)


def assert_forwarded(call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The recorded call has exactly these positional and keyword arguments."""
    assert len(call.args) == len(args), call.args
    for seen, want in zip(call.args, args, strict=True):
        if isinstance(want, torch.Tensor):
            assert seen is want
        else:
            assert type(seen) is type(want) and seen == want
    assert list(call.kwargs) == list(kwargs)
    for key, want in kwargs.items():
        if isinstance(want, torch.Tensor) or want is None:
            assert call.kwargs[key] is want, key
        else:
            assert type(call.kwargs[key]) is type(want) and call.kwargs[key] == want, key


# -- the calling surface ----------------------------------------------------------------------
def test_the_backend_exports_every_backend_api_name() -> None:
    assert set(BACKEND_API) <= set(npu.__all__)
    for name in BACKEND_API:
        assert callable(getattr(npu, name)), name


def _parameters(signature: inspect.Signature) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("name", sorted(TORCH_NPU_SCHEMAS))
def test_each_op_has_the_torch_npu_calling_convention(name: str) -> None:
    seen = _parameters(inspect.signature(getattr(npu, name)))
    assert seen == _parameters(schema_signature(name))


def test_create_schedule_context_holder_has_the_reference_signature() -> None:
    from afd_dispatch.kernels.reference import context_holder

    want = inspect.signature(context_holder.create_schedule_context_holder)
    assert _parameters(inspect.signature(npu.create_schedule_context_holder)) == _parameters(want)


# -- torch_npu stays out of the import --------------------------------------------------------
def test_importing_the_backend_never_imports_torch_npu() -> None:
    # A fresh interpreter whose import system reports every attempt to find torch_npu.
    code = textwrap.dedent(
        """
        import sys

        attempts = []

        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch_npu":
                    attempts.append(name)
                return None

        sys.meta_path.insert(0, Watch())
        import afd_dispatch.kernels.npu as npu
        from afd_dispatch.kernels import load_backend

        assert load_backend("npu") is npu
        assert "torch_npu" not in sys.modules, "imported"
        assert attempts == [], attempts
        print("clean")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"


def test_load_backend_auto_picks_reference_without_torch_npu() -> None:
    assert importlib.util.find_spec("torch_npu") is None
    assert load_backend("auto").__name__ == "afd_dispatch.kernels.reference"


def test_load_backend_auto_picks_npu_with_torch_npu(standin: TorchNpuStandin) -> None:
    spec = importlib.util.find_spec("torch_npu")
    assert spec is not None and spec.name == "torch_npu"
    assert load_backend("auto") is npu
    assert standin.calls == []  # choosing a backend calls nothing


def test_a_valid_call_without_torch_npu_names_the_reference_backend() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"load_backend\('reference'\)") as info:
        npu.npu_ffn_to_attention(**f2a_args())
    assert info.value.name == "torch_npu"


def test_bad_input_is_refused_even_without_torch_npu() -> None:
    with pytest.raises(AFDInputError) as info:
        npu.npu_ffn_to_attention(**f2a_args(x=torch.ones(ROWS, H, dtype=torch.float32)))
    assert info.value.argument == "x.dtype"


# -- every argument reaches torch_npu as the caller passed it ----------------------------------
def test_attention_to_ffn_forwards_every_argument(standin: TorchNpuStandin) -> None:
    a = a2f_args()
    positional = tuple(a.values())
    assert npu.npu_attention_to_ffn(*positional) is None
    (call,) = standin.calls
    assert call.name == "npu_attention_to_ffn"
    assert_forwarded(
        call,
        positional,
        {
            "scales": None,
            "active_mask": None,
            "quant_mode": 0,
            "sync_flag": 0,
            "ffn_start_rank_id": 0,
        },
    )


def test_attention_to_ffn_forwards_the_keyword_arguments(standin: TorchNpuStandin) -> None:
    topology = RankTopology(A, F, ffn_start_rank_id=2)  # attention ranks 0, 1; FFN ranks 2, 3
    quant = WindowLayout(A, M, BS, K, S, H, torch.float16, quant=True)
    a = a2f_args(
        x=torch.randn(1, BS, H).to(torch.float16),
        expert_rank_table=build_expert_rank_table(topology, ROUTED, S),
        ffn_token_data_shape=list(quant.ffn_data_shape),
    )
    mask = torch.tensor([[True, True, True, False]])
    smooth = torch.ones(1, ROUTED + S, H, dtype=torch.float32)
    npu.npu_attention_to_ffn(
        **a, scales=smooth, active_mask=mask, quant_mode=2, sync_flag=1, ffn_start_rank_id=2
    )
    (call,) = standin.calls
    assert_forwarded(
        call,
        tuple(a.values()),
        {
            "scales": smooth,
            "active_mask": mask,
            "quant_mode": 2,
            "sync_flag": 1,
            "ffn_start_rank_id": 2,
        },
    )


def test_ffn_to_attention_forwards_every_argument(standin: TorchNpuStandin) -> None:
    a = f2a_args()
    table = torch.tensor([2, 3], dtype=torch.int32)
    assert npu.npu_ffn_to_attention(*a.values(), attn_rank_table=table) is None
    (call,) = standin.calls
    assert call.name == "npu_ffn_to_attention"
    assert_forwarded(call, tuple(a.values()), {"attn_rank_table": table})


def test_ffn_to_attention_forwards_the_default_rank_table(standin: TorchNpuStandin) -> None:
    a = f2a_args()
    npu.npu_ffn_to_attention(**a)
    assert_forwarded(standin.calls[0], tuple(a.values()), {"attn_rank_table": None})


def test_create_schedule_context_holder_forwards_and_records(standin: TorchNpuStandin) -> None:
    a = holder_args(0)
    holder = npu.create_schedule_context_holder(*a.values())
    (call,) = standin.calls
    assert call.name == "create_schedule_context_holder"
    assert holder is call.result  # torch_npu's holder, unwrapped
    windows = ("ffn_window", "ffn_window_size", "attention_window", "attention_window_size")
    assert_forwarded(
        call,
        tuple(v for k, v in a.items() if k not in windows),
        {k: a[k] for k in windows},
    )
    # a new tensor object over the same memory is recognised
    sizes = npu.recorded_context(holder.get_schedule_context_tensor())
    assert sizes == npu.ContextSizes(0, A, M, BS, E, ROUTED + S, 2 * H, 2 * H, WINDOW_SIZE)


@pytest.mark.parametrize("own_context", [True, False], ids=["recorded", "foreign"])
def test_ffn_worker_batching_forwards_every_argument(
    standin: TorchNpuStandin, own_context: bool
) -> None:
    ctx = ffn_context(standin) if own_context else foreign_context()
    shape = [A, BS, E, H]
    out = npu.npu_ffn_worker_batching(ctx, 5, shape, token_dtype=1, need_schedule=1, layer_num=7)
    (call,) = standin.calls
    assert call.name == "npu_ffn_worker_batching"
    assert_forwarded(call, (ctx, 5, shape), {"token_dtype": 1, "need_schedule": 1, "layer_num": 7})
    assert out is call.result and len(out) == 8
    assert out[0].shape == (ROWS, H) and out[0].dtype == torch.bfloat16


def test_ffn_worker_batching_forwards_the_defaults(standin: TorchNpuStandin) -> None:
    ctx = ffn_context(standin)
    shape = (A, BS, E, H)
    npu.npu_ffn_worker_batching(ctx, 1, shape)
    assert_forwarded(
        standin.calls[0], (ctx, 1, shape), {"token_dtype": 0, "need_schedule": 0, "layer_num": 0}
    )


def test_ffn_worker_batching_takes_int8_rows_of_either_slot_rounding(
    standin: TorchNpuStandin,
) -> None:
    # H = 1440: align512(H + 4) = 1536 (torch_npu's callers), align512(H + 128) = 2048 (HS)
    for token_size in (1536, 2048):
        ctx = ffn_context(standin, attn_to_ffn_token_size=token_size)
        npu.npu_ffn_worker_batching(ctx, 2, [A, BS, E, 1440], token_dtype=2)
        assert standin.names() == ["npu_ffn_worker_batching"]
    with pytest.raises(AFDInputError, match="attn_to_ffn_token_size"):
        npu.npu_ffn_worker_batching(ctx, 2, [A, BS, E, 1440], token_dtype=1)


# The token sizes are byte strides (batching reads slot rows attn_to_ffn_token_size bytes
# apart; torch_npu's holder only wants multiples of 512): every multiple of 512 that holds
# the row is accepted, not just the two roundings the backend used to take.
@pytest.mark.parametrize(
    ("hidden", "token_dtype", "token_size"),
    [
        (2880, 2, 3072),  # align512(2880 + 4): int8 at H = 2880 (2880 % 32 == 0)
        (2880, 1, 6144),  # align512(2 * 2880): 2H = 5760 is not a multiple of 512
        (7168, 2, 7680),  # align512(7168 + 4): torch_npu's batching test
        (7168, 2, 7680 + 512),  # any larger stride
        (7168, 1, 14336),  # 2H
        (7168, 0, 14336 + 1024),
        (1440, 2, 1536),
    ],
)
def test_ffn_worker_batching_takes_any_512_multiple_that_holds_the_row(
    standin: TorchNpuStandin, hidden: int, token_dtype: int, token_size: int
) -> None:
    ctx = ffn_context(standin, attn_to_ffn_token_size=token_size)
    shape = [A, BS, E, hidden]
    npu.npu_ffn_worker_batching(ctx, 2, shape, token_dtype=token_dtype)
    (call,) = standin.calls
    assert_forwarded(
        call, (ctx, 2, shape), {"token_dtype": token_dtype, "need_schedule": 0, "layer_num": 0}
    )


@pytest.mark.parametrize(
    ("hidden", "token_dtype", "token_size", "payload"),
    [
        (7168, 2, 1536, 7172),  # the smallest size a holder takes, far below H + 4
        (7168, 2, 7168, 7172),  # a multiple of 512 == H: no room for the scale at byte H
        (2880, 1, 5632, 5760),  # below 2H
        (2048, 2, 2048, 2052),
    ],
)
def test_ffn_worker_batching_refuses_a_stride_below_the_row_payload(
    standin: TorchNpuStandin, hidden: int, token_dtype: int, token_size: int, payload: int
) -> None:
    ctx = ffn_context(standin, attn_to_ffn_token_size=token_size)
    with pytest.raises(AFDInputError) as info:
        npu.npu_ffn_worker_batching(ctx, 2, [A, BS, E, hidden], token_dtype=token_dtype)
    assert info.value.argument == "schedule_context attn_to_ffn_token_size"
    message = str(info.value)
    assert f"a multiple of 512 bytes >= {payload}" in message and str(token_size) in message
    assert standin.calls == []


def test_the_a2f_token_size_rule_names_the_payload_bound() -> None:
    # A 1024-byte int8 context for H = 7168 (a holder refuses 1024 already, see BAD_INPUT,
    # so the rule batching applies to recorded contexts is called directly here).
    with pytest.raises(AFDInputError) as info:
        a3.check_a2f_token_size(1024, 7168, 2)
    assert info.value.argument == "schedule_context attn_to_ffn_token_size"
    assert ">= 7172" in str(info.value) and "1024" in str(info.value)
    # the seed's H + 128 = 7296 holds the row but is no multiple of 512
    with pytest.raises(AFDInputError, match="multiple of 512"):
        a3.check_a2f_token_size(7296, 7168, 2)
    a3.check_a2f_token_size(7680, 7168, 2)
    a3.check_a2f_token_size(3072, 2880, 2)
    a3.check_a2f_token_size(6144, 2880, 1)


def test_the_f2a_token_size_rule() -> None:
    a3.check_f2a_token_size(6144, 2880)
    a3.check_f2a_token_size(14336, 7168)
    a3.check_f2a_token_size(16384, 7168)
    for bad in (5760, 5632):  # 2H itself is no multiple of 512; below 2H
        with pytest.raises(AFDInputError) as info:
            a3.check_f2a_token_size(bad, 2880)
        assert info.value.argument == "schedule_context ffn_to_attn_token_size"
        assert ">= hidden_size * 2 = 5760" in str(info.value) and str(bad) in str(info.value)


@pytest.mark.parametrize(
    ("a2f", "f2a"), [(3072, 6144), (6144, 6144), (7680, 14336), (14336, 14336)]
)
@pytest.mark.parametrize("mode", [0, 1])
def test_the_holder_takes_a3_callers_token_sizes(
    standin: TorchNpuStandin, mode: int, a2f: int, f2a: int
) -> None:
    # align512(2880 + 4) = 3072, align512(2 * 2880) = 6144, align512(7168 + 4) = 7680, 2 * 7168
    ctx = _context(standin, mode, {"attn_to_ffn_token_size": a2f, "ffn_to_attn_token_size": f2a})
    sizes = npu.recorded_context(ctx)
    assert sizes is not None
    assert (sizes.attn_to_ffn_token_size, sizes.ffn_to_attn_token_size) == (a2f, f2a)


def test_the_holder_refuses_the_seeds_unaligned_slot_size(standin: TorchNpuStandin) -> None:
    # the seed's int8 slot H + 128 = 7296 at H = 7168: torch_npu's holder does not round it
    with pytest.raises(AFDInputError) as info:
        npu.create_schedule_context_holder(**holder_args(0, attn_to_ffn_token_size=7296))
    assert info.value.argument == "attn_to_ffn_token_size"
    assert "a multiple of 512 bytes" in str(info.value) and "7296" in str(info.value)
    assert standin.calls == []


def test_attention_to_ffn_forwards_a_512_aligned_slot_stride(standin: TorchNpuStandin) -> None:
    # A3 callers' strides: align512(H + 4) bytes = 3072 int8 elements with quant at
    # H = 2880, align512(2H) bytes = 3072 bf16 elements without; the contract takes HS >= H.
    hidden = 2880
    for quant_mode, dtype, stride in ((2, torch.float16, 3072), (0, torch.bfloat16, 3072)):
        standin.calls.clear()
        a = a2f_args(hidden=hidden, dtype=dtype)
        a["ffn_token_data_shape"] = [A, M, BS, E, stride]
        npu.npu_attention_to_ffn(**a, quant_mode=quant_mode)
        (call,) = standin.calls
        assert call.args[9] == [A, M, BS, E, stride]
        assert call.kwargs["quant_mode"] == quant_mode


@pytest.mark.parametrize("own_context", [True, False], ids=["recorded", "foreign"])
def test_attention_worker_combine_forwards_every_argument(
    standin: TorchNpuStandin, own_context: bool
) -> None:
    ctx = attention_context(standin) if own_context else foreign_context()
    w, lid = scales(), layer(4)
    y, next_layer = npu.npu_attention_worker_combine(ctx, w, lid, H, token_dtype=1, need_schedule=1)
    (call,) = standin.calls
    assert call.name == "npu_attention_worker_combine"
    assert_forwarded(call, (ctx, w, lid, H), {"token_dtype": 1, "need_schedule": 1})
    assert (y, next_layer) == call.result
    assert y.shape == (BS, H) and int(next_layer) == 5


def test_attention_worker_combine_forwards_the_defaults(standin: TorchNpuStandin) -> None:
    ctx = attention_context(standin)
    w, lid = scales(), layer()
    npu.npu_attention_worker_combine(ctx, w, lid, H)
    assert_forwarded(standin.calls[0], (ctx, w, lid, H), {"token_dtype": 0, "need_schedule": 0})


@pytest.mark.parametrize(
    ("hidden", "token_size"), [(2880, 6144), (2880, 8192), (7168, 14336), (H, 2 * H + 512)]
)
def test_attention_worker_combine_takes_any_512_multiple_of_at_least_2h(
    standin: TorchNpuStandin, hidden: int, token_size: int
) -> None:
    # No kernel reads ffn_to_attn_token_size (combine reads rows hidden_size * 2 bytes
    # apart), so the holder's multiple-of-512 rule and room for a row are all that is asked:
    # align512(2 * 2880) = 6144 at H = 2880, where 2H = 5760 could not be passed at all.
    ctx = attention_context(standin, ffn_to_attn_token_size=token_size)
    w, lid = scales(), layer()
    npu.npu_attention_worker_combine(ctx, w, lid, hidden, token_dtype=1)
    (call,) = standin.calls
    assert_forwarded(call, (ctx, w, lid, hidden), {"token_dtype": 1, "need_schedule": 0})
    assert call.result[0].shape == (BS, hidden)


def test_the_scheduler_ops_forward_to_torch_npu_afd(standin: TorchNpuStandin) -> None:
    ffn_ctx = ffn_context(standin)
    attn_ctx = attention_context(standin)
    # execute_mode was 1 here: the kernel and aclnn accept only 0, which is now checked
    assert npu.ffn_worker_scheduler_(ffn_ctx, sync_group_size=2, execute_mode=0) is ffn_ctx
    assert npu.ffn_worker_scheduler_(ffn_ctx) is ffn_ctx
    assert npu.attention_worker_scheduler_(attn_ctx) is attn_ctx
    assert standin.names() == ["ffn_worker_scheduler_"] * 2 + ["attention_worker_scheduler_"]
    assert_forwarded(standin.calls[0], (ffn_ctx,), {"sync_group_size": 2, "execute_mode": 0})
    assert_forwarded(standin.calls[1], (ffn_ctx,), {"sync_group_size": 1, "execute_mode": 0})
    assert_forwarded(standin.calls[2], (attn_ctx,), {})


@pytest.mark.parametrize("own_context", [True, False], ids=["recorded", "foreign"])
def test_the_non_in_place_schedulers_forward_and_return_a_new_context(
    standin: TorchNpuStandin, own_context: bool
) -> None:
    ffn_ctx = ffn_context(standin) if own_context else foreign_context()
    attn_ctx = attention_context(standin) if own_context else foreign_context()
    ffn_ctx[0] = 7  # some content, to see it copied
    before = ffn_ctx.clone()
    ffn_out = npu.ffn_worker_scheduler(ffn_ctx, sync_group_size=2)
    attn_out = npu.attention_worker_scheduler(attn_ctx)
    assert standin.names() == ["ffn_worker_scheduler", "attention_worker_scheduler"]
    ffn_call, attn_call = standin.calls
    assert_forwarded(ffn_call, (ffn_ctx,), {"sync_group_size": 2, "execute_mode": 0})
    assert_forwarded(attn_call, (attn_ctx,), {})
    for out, ctx, call in ((ffn_out, ffn_ctx, ffn_call), (attn_out, attn_ctx, attn_call)):
        assert out is call.result and out is not ctx
        assert out.data_ptr() != ctx.data_ptr()
        assert out.dtype == torch.int8 and out.shape == (1024,) and torch.equal(out, ctx)
    assert torch.equal(ffn_ctx, before)


def test_the_non_in_place_schedulers_forward_the_defaults(standin: TorchNpuStandin) -> None:
    ctx = ffn_context(standin)
    npu.ffn_worker_scheduler(ctx)
    assert_forwarded(standin.calls[0], (ctx,), {"sync_group_size": 1, "execute_mode": 0})


def test_a_non_in_place_scheduler_result_inherits_the_record(standin: TorchNpuStandin) -> None:
    ffn_ctx = ffn_context(standin, attn_to_ffn_token_size=7680)
    out = npu.ffn_worker_scheduler(ffn_ctx)
    assert npu.recorded_context(out) == npu.recorded_context(ffn_ctx)
    standin.calls.clear()
    # so batching on the returned context is checked against the sizes too
    with pytest.raises(AFDInputError, match="max_out_shape"):
        npu.npu_ffn_worker_batching(out, 1, [A + 1, BS, E, 7168], token_dtype=2)
    npu.npu_ffn_worker_batching(out, 1, [A, BS, E, 7168], token_dtype=2)
    assert standin.names() == ["npu_ffn_worker_batching"]
    attn_out = npu.attention_worker_scheduler(attention_context(standin))
    sizes = npu.recorded_context(attn_out)
    assert sizes is not None and sizes.schedule_mode == 1
    # the inherited record ends with the returned tensor object, as a holder's with the holder
    # (a tensor over the same memory that does not keep `out` alive, as `out[:]` would)
    view = torch.empty(0, dtype=torch.int8).set_(out.untyped_storage(), 0, (1024,), (1,))
    assert view.data_ptr() == out.data_ptr()
    standin.calls.clear()  # the recorded calls hold `out` too
    del out
    gc.collect()
    assert npu.recorded_context(view) is None
    assert npu.recorded_context(ffn_ctx) is not None


@pytest.mark.parametrize("op", ["ffn_worker_scheduler_", "ffn_worker_scheduler"])
@pytest.mark.parametrize("group", [1, 3, 6])
def test_ffn_scheduler_takes_a_sync_group_size_dividing_session_num(
    standin: TorchNpuStandin, op: str, group: int
) -> None:
    ctx = ffn_context(standin, session_num=6)
    getattr(npu, op)(ctx, sync_group_size=group)
    assert_forwarded(standin.calls[0], (ctx,), {"sync_group_size": group, "execute_mode": 0})


@pytest.mark.parametrize("op", ["ffn_worker_scheduler_", "ffn_worker_scheduler"])
@pytest.mark.parametrize("group", [0, 4, 7, True, 2.0])
def test_ffn_scheduler_refuses_a_sync_group_size_not_dividing_session_num(
    standin: TorchNpuStandin, op: str, group: object
) -> None:
    ctx = ffn_context(standin, session_num=6)
    with pytest.raises(AFDInputError) as info:
        getattr(npu, op)(ctx, sync_group_size=group)
    assert info.value.argument == "sync_group_size"
    message = str(info.value)
    assert "[1, session_num=6]" in message and "divides session_num" in message
    assert str(group) in message
    assert standin.calls == []


def test_ffn_scheduler_on_a_foreign_context_checks_only_the_lower_bound(
    standin: TorchNpuStandin,
) -> None:
    npu.ffn_worker_scheduler_(foreign_context(), sync_group_size=7)
    assert standin.names() == ["ffn_worker_scheduler_"]
    with pytest.raises(AFDInputError, match="execute_mode"):
        npu.ffn_worker_scheduler(foreign_context(), execute_mode=1)
    assert len(standin.calls) == 1


# -- bad input fails in Python, before torch_npu sees anything ---------------------------------
Case = tuple[str, Callable[[TorchNpuStandin], object], str]


def _a2f(**o: Any) -> Callable[[TorchNpuStandin], object]:
    return lambda s: npu.npu_attention_to_ffn(**a2f_args(**o))


def _f2a(**o: Any) -> Callable[[TorchNpuStandin], object]:
    return lambda s: npu.npu_ffn_to_attention(**f2a_args(**o))


def _batch(*args: Any, ctx: dict[str, Any] | None = None, **kw: Any) -> Callable[..., object]:
    def call(s: TorchNpuStandin) -> object:
        context = ffn_context(s, **(ctx or {}))
        return npu.npu_ffn_worker_batching(context, *args, **kw)

    return call


def _combine(*args: Any, ctx: dict[str, Any] | None = None, **kw: Any) -> Callable[..., object]:
    def call(s: TorchNpuStandin) -> object:
        context = attention_context(s, **(ctx or {}))
        return npu.npu_attention_worker_combine(context, *args, **kw)

    return call


def _holder(mode: int, **o: Any) -> Callable[[TorchNpuStandin], object]:
    return lambda s: npu.create_schedule_context_holder(**holder_args(mode, **o))


BAD_INPUT: list[Case] = [
    # npu_attention_to_ffn: A3 limits
    ("a2f float32 x", _a2f(x=torch.zeros(1, BS, H)), "x.dtype"),
    ("a2f H below A3", _a2f(hidden=512), "x.shape[2] (H)"),
    ("a2f H above A3", _a2f(hidden=8448, dtype=torch.float16), "x.shape[2] (H)"),
    ("a2f empty group", _a2f(group=""), "group"),
    ("a2f group not str", _a2f(group=7), "group"),
    # npu_attention_to_ffn: the contract. This case had HS = H + 128 without quant, which
    # the contract now takes (HS is the caller's stride, >= H); a wrong E is still refused.
    (
        "a2f data shape",
        _a2f(ffn_token_data_shape=[A, M, BS, E + 1, H]),
        "ffn_token_data_shape",
    ),
    ("a2f scales without quant", _a2f(scales=torch.ones(1, ROUTED + S, H)), "scales"),
    (
        "a2f table dtype",
        _a2f(expert_rank_table=torch.zeros(1, ROUTED + S, 3)),
        "expert_rank_table.dtype",
    ),
    ("a2f world size", _a2f(world_size=A), "world_size"),
    # npu_attention_to_ffn: value checks (on by default)
    ("a2f expert id", _a2f(expert_ids=torch.full((1, BS, K), ROUTED)), "expert_ids"),
    ("a2f session", _a2f(session_id=torch.tensor([A])), "session_id"),
    ("a2f micro-batch", _a2f(micro_batch_id=torch.tensor([M])), "micro_batch_id"),
    ("a2f mask gap", _a2f(active_mask=torch.tensor([[True, False, True, True]])), "active_mask"),
    # npu_ffn_to_attention
    ("f2a float32 x", _f2a(x=torch.ones(ROWS, H)), "x.dtype"),
    ("f2a H below A3", _f2a(hidden=512), "x.shape[1] (H)"),
    (
        "f2a M > 1",
        _f2a(token_info_table_shape=[2, BS, E], token_data_shape=[2, BS, E, H]),
        "token_info_table_shape[0] (M)",
    ),
    ("f2a group", _f2a(group=None), "group"),
    ("f2a HS != H", _f2a(token_data_shape=[1, BS, E, H + 128]), "token_data_shape[3] (H)"),
    ("f2a ids dtype", _f2a(token_ids=torch.zeros(ROWS)), "token_ids.dtype"),
    ("f2a too many rows", _f2a(actual_token_num=torch.tensor([ROWS + 1])), "actual_token_num"),
    ("f2a token id", _f2a(token_ids=torch.full((ROWS,), BS, dtype=torch.int32)), "token_ids"),
    ("f2a offset", _f2a(expert_offsets=torch.full((ROWS,), E)), "expert_offsets"),
    ("f2a rank table", _f2a(attn_rank_table=torch.tensor([2, WORLD])), "attn_rank_table"),
    # npu_ffn_worker_batching
    ("batch fp32 code", _batch(1, [A, BS, E, H], token_dtype=3), "token_dtype"),
    ("batch bool code", _batch(1, [A, BS, E, H], token_dtype=True), "token_dtype"),
    ("batch A", _batch(1, [A + 1, BS, E, H]), "max_out_shape"),
    ("batch BS", _batch(1, [A, BS * 2, E, H]), "max_out_shape"),
    ("batch E", _batch(1, [A, BS, E + 1, H]), "max_out_shape"),
    ("batch E over 20", _batch(1, [A, BS, 21, H]), "max_out_shape[2] (E)"),
    ("batch H below A3", _batch(1, [A, BS, E, 512]), "max_out_shape[3] (H)"),
    ("batch shape length", _batch(1, [A, BS, E]), "max_out_shape"),
    ("batch expert_num", _batch(0, [A, BS, E, H]), "expert_num"),
    ("batch need_schedule", _batch(1, [A, BS, E, H], need_schedule=2), "need_schedule"),
    ("batch layer_num", _batch(1, [A, BS, E, H], layer_num=-1), "layer_num"),
    (
        "batch H vs token size",
        _batch(1, [A, BS, E, 2048]),
        "schedule_context attn_to_ffn_token_size",
    ),
    # This case used H = 1024 int8 rows in a 2048-byte context, refused by the old exact-value
    # rule; 2048 holds 1024 + 4 bytes and is a valid stride now. An int8 row of H = 7168 in
    # the smallest context a holder takes (1536 bytes) is below the payload H + 4.
    (
        "batch int8 vs token size",
        _batch(1, [A, BS, E, 7168], token_dtype=2, ctx={"attn_to_ffn_token_size": 1536}),
        "schedule_context attn_to_ffn_token_size",
    ),
    ("batch int8 H % 32", _batch(1, [A, BS, E, 1040], token_dtype=2), "max_out_shape[3] (H)"),
    (
        "batch attention context",
        lambda s: npu.npu_ffn_worker_batching(attention_context(s), 1, [A, BS, E, H]),
        "schedule_context",
    ),
    (
        "batch context dtype",
        lambda s: npu.npu_ffn_worker_batching(torch.zeros(256), 1, [A, BS, E, H]),
        "schedule_context",
    ),
    # npu_attention_worker_combine
    ("combine int8 code", _combine(scales(), layer(), H, token_dtype=2), "token_dtype"),
    ("combine fp32 code", _combine(scales(), layer(), H, token_dtype=3), "token_dtype"),
    ("combine two shared", _combine(scales(topk=K - 1), layer(), H), "expert_scales.shape[1] (K)"),
    ("combine BS", _combine(scales(tokens=BS + 1), layer(), H), "expert_scales.shape"),
    ("combine scales dtype", _combine(scales().half(), layer(), H), "expert_scales.dtype"),
    ("combine scales 1-D", _combine(torch.ones(BS), layer(), H), "expert_scales"),
    ("combine layer id", _combine(scales(), torch.tensor([[1]]), H), "layer_id.shape"),
    ("combine H below A3", _combine(scales(), layer(), 512), "hidden_size"),
    ("combine H float", _combine(scales(), layer(), float(H)), "hidden_size"),
    # (was "combine HS != H": combine reads rows H apart whatever the context says, so the
    # context's size only has to hold one row now, and 2048 bytes do not hold 2 * 2048)
    (
        "combine token size < 2H",
        _combine(scales(), layer(), 2048),
        "schedule_context ffn_to_attn_token_size",
    ),
    ("combine need_schedule", _combine(scales(), layer(), H, need_schedule=-1), "need_schedule"),
    (
        "combine FFN context",
        lambda s: npu.npu_attention_worker_combine(ffn_context(s), scales(), layer(), H),
        "schedule_context",
    ),
    (
        "combine K over 16 (foreign)",
        lambda s: npu.npu_attention_worker_combine(foreign_context(), scales(4, 17), layer(), H),
        "expert_scales.shape[1] (K)",
    ),
    # the scheduler ops
    (
        "ffn scheduler group size",
        lambda s: npu.ffn_worker_scheduler_(ffn_context(s), sync_group_size=0),
        "sync_group_size",
    ),
    (
        "ffn scheduler mode",
        lambda s: npu.ffn_worker_scheduler_(ffn_context(s), execute_mode=-1),
        "execute_mode",
    ),
    (
        "ffn scheduler loop mode",
        lambda s: npu.ffn_worker_scheduler_(ffn_context(s), execute_mode=1),
        "execute_mode",
    ),
    (
        "ffn scheduler group > A",
        lambda s: npu.ffn_worker_scheduler_(ffn_context(s), sync_group_size=A + 1),
        "sync_group_size",
    ),
    (
        "ffn scheduler group not dividing A",
        lambda s: npu.ffn_worker_scheduler_(ffn_context(s, session_num=3), sync_group_size=2),
        "sync_group_size",
    ),
    (
        "ffn scheduler (copy) group size",
        lambda s: npu.ffn_worker_scheduler(ffn_context(s), sync_group_size=0),
        "sync_group_size",
    ),
    (
        "ffn scheduler (copy) loop mode",
        lambda s: npu.ffn_worker_scheduler(ffn_context(s), execute_mode=1),
        "execute_mode",
    ),
    (
        "ffn scheduler (copy) attention context",
        lambda s: npu.ffn_worker_scheduler(attention_context(s)),
        "schedule_context",
    ),
    (
        "attention scheduler (copy) FFN context",
        lambda s: npu.attention_worker_scheduler(ffn_context(s)),
        "schedule_context",
    ),
    (
        "attention scheduler (copy) dtype",
        lambda s: npu.attention_worker_scheduler(torch.zeros(1024, dtype=torch.int32)),
        "schedule_context",
    ),
    (
        "ffn scheduler attention context",
        lambda s: npu.ffn_worker_scheduler_(attention_context(s)),
        "schedule_context",
    ),
    (
        "attention scheduler FFN context",
        lambda s: npu.attention_worker_scheduler_(ffn_context(s)),
        "schedule_context",
    ),
    (
        "attention scheduler view",
        lambda s: npu.attention_worker_scheduler_(torch.zeros(2048, dtype=torch.int8)[::2]),
        "schedule_context",
    ),
    # create_schedule_context_holder
    ("holder mode", _holder(0, schedule_mode=2), "schedule_mode"),
    (
        "holder unaligned a2f",
        _holder(0, attn_to_ffn_token_size=2 * H + 4),
        "attn_to_ffn_token_size",
    ),
    ("holder tiny a2f", _holder(0, attn_to_ffn_token_size=1024), "attn_to_ffn_token_size"),
    ("holder seed's H + 128", _holder(0, attn_to_ffn_token_size=7296), "attn_to_ffn_token_size"),
    ("holder f2a 2H = 5760", _holder(1, ffn_to_attn_token_size=5760), "ffn_to_attn_token_size"),
    ("holder huge f2a", _holder(0, ffn_to_attn_token_size=16896), "ffn_to_attn_token_size"),
    ("holder no FFN window", _holder(0, ffn_window=0), "ffn_window"),
    ("holder small FFN window", _holder(0, ffn_window_size=512), "ffn_window_size"),
    ("holder no attention window", _holder(1, attention_window_size=0), "attention_window_size"),
    ("holder attention M", _holder(1, micro_batch_num=2), "micro_batch_num"),
    ("holder attention E", _holder(1, selected_expert_num=1), "selected_expert_num"),
    ("holder BS", _holder(0, micro_batch_size=513), "micro_batch_size"),
    ("holder sessions", _holder(0, session_num=0), "session_num"),
    ("holder expert_num", _holder(0, expert_num=0), "expert_num"),
]


@pytest.mark.parametrize(
    ("label", "make_call", "argument"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_fails_before_torch_npu_is_called(
    standin: TorchNpuStandin,
    label: str,
    make_call: Callable[[TorchNpuStandin], object],
    argument: str,
) -> None:
    with pytest.raises(AFDInputError) as info:
        make_call(standin)
    assert info.value.argument == argument, str(info.value)
    assert standin.calls == [], f"{label}: torch_npu was called"


def test_errors_name_the_a3_range_and_the_value(standin: TorchNpuStandin) -> None:
    with pytest.raises(AFDInputError) as info:
        npu.npu_attention_to_ffn(**a2f_args(hidden=512))
    assert "1024 <= H <= 8192" in str(info.value) and "512" in str(info.value)
    with pytest.raises(AFDInputError) as info:
        npu.npu_attention_to_ffn(**a2f_args(x=torch.zeros(1, BS, H)))
    assert "float16 or torch.bfloat16" in str(info.value) and "float32" in str(info.value)


# -- the value-check switch ---------------------------------------------------------------------
class _Watched(torch.Tensor):
    """A tensor that logs every torch function applied to it, to see who reads its values."""

    seen: list[str] = []  # noqa: RUF012  (shared on purpose: one log per test)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


_VALUE_READS = {"__int__", "__index__", "__bool__", "item", "tolist", "min", "max", "sum", "all"}


def _watched(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(_Watched)


@pytest.mark.parametrize("values", [True, False], ids=["checks-on", "checks-off"])
def test_value_checks_off_reads_no_tensor_contents(standin: TorchNpuStandin, values: bool) -> None:
    npu.set_value_checks(values)
    _Watched.seen = []
    a = a2f_args()
    for key in ("session_id", "micro_batch_id", "layer_id", "expert_ids"):
        a[key] = _watched(a[key])
    mask = _watched(torch.ones(1, BS, dtype=torch.bool))
    npu.npu_attention_to_ffn(**a, active_mask=mask)
    b = f2a_args()
    for key in ("session_ids", "micro_batch_ids", "token_ids", "expert_offsets"):
        b[key] = _watched(b[key])
    b["actual_token_num"] = _watched(b["actual_token_num"])
    npu.npu_ffn_to_attention(**b)
    reads = _VALUE_READS.intersection(_Watched.seen)
    assert standin.names() == ["npu_attention_to_ffn", "npu_ffn_to_attention"]
    if values:
        assert reads  # the watch sees the reads the checks make...
    else:
        assert reads == set(), sorted(reads)  # ...and none when they are off


def test_value_checks_off_lets_bad_values_through(standin: TorchNpuStandin) -> None:
    assert npu.value_checks_enabled()
    assert npu.set_value_checks(False) is True
    assert not npu.value_checks_enabled()
    npu.npu_attention_to_ffn(**a2f_args(expert_ids=torch.full((1, BS, K), ROUTED)))
    npu.npu_ffn_to_attention(**f2a_args(actual_token_num=torch.tensor([ROWS + 1])))
    assert standin.names() == ["npu_attention_to_ffn", "npu_ffn_to_attention"]
    # shapes and dtypes are still checked with value checks off
    with pytest.raises(AFDInputError, match=r"x\.dtype"):
        npu.npu_attention_to_ffn(**a2f_args(x=torch.zeros(1, BS, H)))
    assert len(standin.calls) == 2


# -- schedule context records -------------------------------------------------------------------
def test_a_record_ends_with_its_holder(standin: TorchNpuStandin) -> None:
    holder = npu.create_schedule_context_holder(**holder_args(0))
    ctx = holder.get_schedule_context_tensor()
    standin.calls.clear()
    wrong = [A + 1, BS, E, H]
    with pytest.raises(AFDInputError, match="max_out_shape"):
        npu.npu_ffn_worker_batching(ctx, 1, wrong)
    del holder
    gc.collect()
    # the memory is still alive through `ctx`, but nothing vouches for its sizes any more
    assert npu.recorded_context(ctx) is None
    npu.npu_ffn_worker_batching(ctx, 1, wrong)
    assert standin.names() == ["npu_ffn_worker_batching"]


def test_a_holder_without_weak_references_keeps_its_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = TorchNpuStandin(holder_type=SlottedHolder)
    fake.install(monkeypatch)
    holder = npu.create_schedule_context_holder(**holder_args(1))
    ctx = holder.get_schedule_context_tensor()
    del holder
    gc.collect()
    sizes = npu.recorded_context(ctx)
    assert sizes is not None and sizes.schedule_mode == 1 and sizes.selected_expert_num == E


def test_a_foreign_context_gets_only_the_static_checks(standin: TorchNpuStandin) -> None:
    ctx = foreign_context()
    assert npu.recorded_context(ctx) is None
    # sizes no record vouches for are passed on ...
    npu.npu_ffn_worker_batching(ctx, 1, [3, 7, 5, 2048])
    npu.npu_attention_worker_combine(ctx, scales(7, 5), layer(), 4096)
    assert standin.names() == ["npu_ffn_worker_batching", "npu_attention_worker_combine"]
    # ... the A3 limits are not
    with pytest.raises(AFDInputError, match="token_dtype"):
        npu.npu_attention_worker_combine(ctx, scales(7, 5), layer(), 4096, token_dtype=3)
    assert len(standin.calls) == 2
