"""The torch_npu emulator (tests/npu_emulator) is as strict and as exact as what it stands for.

1. Anything outside the emulated surface raises, naming the call.
2. `ProcessGroupHCCL` windows: one per group, none before registering, a 1-D int8 tensor of
   the bytes asked for, in an owner-only shared-memory file.
3. The schedule-context holder writes torch_npu's 1024-byte context and initial window info
   (the reference holder's, which mirrors torch_npu's, up to addresses) and refuses what
   torch_npu's refuses; so does the checked binding in front of it.
4. A2F -> batching -> F2A -> combine over two emulated HCCL ranks (threads, one process,
   each with its own ProcessGroupHCCL on one TCP store) writes the same bytes and returns
   the same tensors as the reference ops over a reference window group of the same layout.
"""

from __future__ import annotations

import datetime
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
from afd_threads import RankThread
from npu_emulator_fixture import emulated_torch_npu
from op_inputs import holder_args_with_window

from afd_dispatch import create_window_group
from afd_dispatch.errors import AFDInputError
from afd_dispatch.kernels import npu as npu_binding
from afd_dispatch.kernels import reference
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.layout import EMPTY_LOCAL_ID, WindowLayout, a3_attn_to_ffn_token_size, align512
from afd_dispatch.link.npu import serve_rendezvous
from afd_dispatch.placement import build_expert_rank_table
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows.transport import SHM_DIR

SETUP_TIMEOUT_S = 10.0


@pytest.fixture
def torch_npu(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    with emulated_torch_npu(monkeypatch) as module:
        yield module


def single_rank_group(torch_npu: ModuleType) -> Any:
    """A ProcessGroupHCCL of world size 1 over an in-memory store (no peers to exchange with)."""
    hccl = torch_npu._C._distributed_c10d
    return hccl.ProcessGroupHCCL(
        torch.distributed.HashStore(), 0, 1, hccl.ProcessGroupHCCL.Options()
    )


# -- 1. nothing outside the emulated surface ---------------------------------------------------
@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("", "npu_moe_gating_top_k"),
        ("", "npu_dynamic_quant"),
        ("_afd", "foo"),
        ("_C", "bar"),
        ("_C._distributed_c10d", "ProcessGroupLCCL"),
    ],
)
def test_a_name_outside_the_emulated_surface_raises_naming_it(
    torch_npu: ModuleType, path: str, name: str
) -> None:
    module = torch_npu
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    qualified = ".".join(filter(None, ("torch_npu", path, name)))
    if path == "_C._distributed_c10d":
        # this module has no catch-all: a missing name is Python's plain AttributeError
        with pytest.raises(AttributeError, match=name):
            getattr(module, name)
        return
    with pytest.raises(AttributeError, match=rf"torch_npu emulator: {qualified} is not emulated"):
        getattr(module, name)


@pytest.mark.parametrize("method", ["allreduce", "broadcast", "barrier", "_window_unregister"])
def test_a_process_group_method_outside_the_emulated_surface_raises_naming_it(
    torch_npu: ModuleType, method: str
) -> None:
    group = single_rank_group(torch_npu)
    with pytest.raises(
        AttributeError, match=rf"torch_npu emulator: ProcessGroupHCCL\.{method} is not emulated"
    ):
        getattr(group, method)
    assert group.rank() == 0 and group.size() == 1  # what is emulated answers


def test_the_emulated_surface_is_there(torch_npu: ModuleType) -> None:
    for name in (
        "npu_attention_to_ffn",
        "npu_ffn_worker_batching",
        "npu_ffn_to_attention",
        "npu_attention_worker_combine",
    ):
        assert callable(getattr(torch_npu, name))
    for name in (
        "create_schedule_context_holder",
        "ffn_worker_scheduler_",
        "ffn_worker_scheduler",
        "attention_worker_scheduler_",
        "attention_worker_scheduler",
    ):
        assert callable(getattr(torch_npu._afd, name))
    assert torch._C._get_privateuse1_backend_name() == "npu"


# -- 2. windows ----------------------------------------------------------------------------------
def test_a_group_registers_one_window_of_the_bytes_asked_for(torch_npu: ModuleType) -> None:
    hccl = torch_npu._C._distributed_c10d
    group = single_rank_group(torch_npu)
    with pytest.raises(RuntimeError, match="_get_window_mem: no window registered"):
        group._get_window_mem()
    size = 3 * 512 + 7
    group._window_register_and_exchange(size, [])
    window = group._get_window_mem()
    assert window.dtype == torch.int8
    assert window.dim() == 1 and window.numel() == size
    assert window.is_contiguous()
    with pytest.raises(RuntimeError, match="a window is already registered"):
        group._window_register_and_exchange(size, [])
    with pytest.raises(RuntimeError, match="a window is already registered"):
        group._window_register_and_exchange(2 * size, [])
    assert group._get_window_mem().data_ptr() == window.data_ptr()  # still the first one

    # the window is this rank's owner-only shared-memory file, byte for byte
    name = group.get_hccl_comm_name(0)
    comm = hccl.communicator(name)
    path = comm.transports[0].path(0)
    assert os.path.dirname(path) == SHM_DIR
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert info.st_uid == os.geteuid()
    assert info.st_size == size
    window[:4] = torch.tensor([1, -2, 3, -4], dtype=torch.int8)
    window[-1] = 99
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == bytes([1, 0xFE, 3, 0xFC]) and raw[-1] == 99 and len(raw) == size


@pytest.mark.parametrize(
    ("size", "peers"),
    [(0, []), (-512, []), (512.0, []), (512, [0]), (512, [1])],
)
def test_a_bad_window_registration_is_refused(
    torch_npu: ModuleType, size: Any, peers: list[int]
) -> None:
    group = single_rank_group(torch_npu)
    with pytest.raises(RuntimeError, match="_window_register_and_exchange"):
        group._window_register_and_exchange(size, peers)
    with pytest.raises(RuntimeError, match="no window registered"):
        group._get_window_mem()


def test_a_rank_outside_the_group_is_refused(torch_npu: ModuleType) -> None:
    hccl = torch_npu._C._distributed_c10d
    with pytest.raises(RuntimeError, match=r"rank 2 outside \[0, 2\)"):
        hccl.ProcessGroupHCCL(torch.distributed.HashStore(), 2, 2)


# -- 3. the schedule-context holder ---------------------------------------------------------------
# A = 2, M = 2, BS = 3, K = 2, S = 1, H = 1152 in bf16: 2H = 2304 is not a multiple of 512,
# so both token sizes are align512(2H) = 2560 strides, as A3 callers size them.
HOLDER_LAYOUT = WindowLayout(
    num_attention_ranks=2,
    micro_batches=2,
    tokens=3,
    topk=2,
    shared=1,
    hidden=1152,
    dtype=torch.bfloat16,
    attn_to_ffn_token_size=a3_attn_to_ffn_token_size(1152, torch.bfloat16, False),
)
F2A_TOKEN_SIZE = align512(HOLDER_LAYOUT.ffn_to_attn_token_size)
EXPERT_NUM = 3
GARBAGE = 0x5A  # what a window holds before its holder initialises it

ADDRESS_FIELDS = {  # context fields holding an address: (field, what it is relative to)
    0: [(sc.FFN_INFO_BUF, "window"), (sc.FFN_DATA_BUF, "window")]
    + [(field, "workspace") for field, _ in sc.FFN_SCHEDULER_BUFFERS],
    1: [(sc.ATTN_INFO_BUF, "window"), (sc.ATTN_DATA_BUF, "window")],
}


def holder_args(mode: int, window: int, size: int, **changes: int) -> dict[str, int]:
    layout = HOLDER_LAYOUT
    counts = {
        "schedule_mode": mode,
        "session_num": layout.num_attention_ranks,
        "micro_batch_num": layout.micro_batches,
        "micro_batch_size": layout.tokens,
        "selected_expert_num": layout.slots,
        "expert_num": EXPERT_NUM if mode == 0 else 1,
        "attn_to_ffn_token_size": layout.attn_to_ffn_token_size,
        "ffn_to_attn_token_size": F2A_TOKEN_SIZE,
    }
    return holder_args_with_window(counts, window, size, **changes)


def garbage_window(torch_npu: ModuleType, mode: int) -> tuple[Any, torch.Tensor, int]:
    """(group, its window as uint8, size) sized for a `mode` holder, every byte GARBAGE."""
    need = HOLDER_LAYOUT.ffn_window_bytes if mode == 0 else HOLDER_LAYOUT.attn_window_bytes
    group = single_rank_group(torch_npu)
    group._window_register_and_exchange(need, [])
    window = group._get_window_mem().view(torch.uint8)
    window.fill_(GARBAGE)
    return group, window, need


def relative_context(ctx: torch.Tensor, mode: int, window: int) -> torch.Tensor:
    """The context with its addresses made relative to their window / scheduler workspace."""
    out = ctx.clone()
    workspace = sc.get(ctx, sc.FFN_LAYER_IDS_BUF) if mode == 0 else 0
    for field, base in ADDRESS_FIELDS[mode]:
        sc.put(out, field, sc.get(ctx, field) - (window if base == "window" else workspace))
    return out


@pytest.mark.parametrize("mode", [0, 1], ids=["ffn", "attention"])
def test_the_holder_writes_torch_npus_context_and_initial_window(
    torch_npu: ModuleType, mode: int
) -> None:
    ffn = mode == 0
    layout = HOLDER_LAYOUT
    _group, window, need = garbage_window(torch_npu, mode)  # collecting it unmaps the window
    holder = torch_npu._afd.create_schedule_context_holder(
        **holder_args(mode, window.data_ptr(), need)
    )
    ctx = holder.get_schedule_context_tensor()
    assert ctx.dtype == torch.int8 and tuple(ctx.shape) == (1024,)

    # the reference holder (torch_npu's struct) over a reference window of the same layout
    topology = RankTopology(layout.num_attention_ranks, 1)
    rank = 0 if ffn else 1
    ref_group = create_window_group(f"emu-holder-{uuid.uuid4().hex[:8]}", topology, layout)
    try:
        address = ref_group.address(rank)
        ref_holder = reference.create_schedule_context_holder(
            **holder_args(mode, address, ref_group.window_bytes(rank))
        )
        ref_ctx = ref_holder.get_schedule_context_tensor()
        got, want = (
            relative_context(ctx, mode, window.data_ptr()),
            relative_context(ref_ctx, mode, address),
        )
        diff = (got != want).nonzero().flatten().tolist()
        assert diff == [], f"context bytes {diff[:8]} differ from the reference holder's"
    finally:
        ref_group.close()

    # torch_npu's values, spelled out
    a, m, bs, e = layout.num_attention_ranks, layout.micro_batches, layout.tokens, layout.slots
    counts = (sc.SESSION_NUM, sc.MICRO_BATCH_NUM, sc.MICRO_BATCH_SIZE, sc.SELECTED_EXPERT_NUM)
    assert [sc.get(ctx, f) for f in counts] == [a, m, bs, e]
    assert sc.get(ctx, sc.ATTN_TO_FFN_TOKEN_SIZE) == 2560
    assert sc.get(ctx, sc.FFN_TO_ATTN_TOKEN_SIZE) == 2560
    assert sc.get(ctx, sc.SCHEDULE_MODE) == mode
    assert sc.get(ctx, sc.RUN_FLAG) == 1
    if ffn:
        info_bytes = layout.ffn_info_bytes
        assert sc.get(ctx, sc.FFN_INFO_BUF) == window.data_ptr()
        assert sc.get(ctx, sc.FFN_INFO_BUF_SIZE) == info_bytes == a * m * (2 + bs * e) * 4
        assert sc.get(ctx, sc.FFN_DATA_BUF) == window.data_ptr() + align512(info_bytes)
        assert sc.get(ctx, sc.FFN_DATA_BUF_SIZE) == need - align512(info_bytes)
        assert sc.get(ctx, sc.FFN_POLLING_INDEX) == 0
        assert sc.get(ctx, sc.FFN_OUT_NUM) == 0
        info = window[:info_bytes].view(torch.int32).view(a, m, 2 + bs * e)
        assert (info[:, :, 0] == 0).all(), "flags"
        assert (info[:, :, 1] == 0).all(), "layer ids"
        assert (info[:, :, 2:] == EMPTY_LOCAL_ID).all(), "expert ids"
        expected = torch.full((need,), GARBAGE, dtype=torch.uint8)
        layout.initialize_ffn(expected)
    else:
        info_bytes = layout.attn_info_bytes
        assert sc.get(ctx, sc.ATTN_INFO_BUF) == window.data_ptr()
        assert sc.get(ctx, sc.ATTN_INFO_BUF_SIZE) == info_bytes == m * bs * e * 4
        assert sc.get(ctx, sc.ATTN_DATA_BUF) == window.data_ptr() + align512(info_bytes)
        assert sc.get(ctx, sc.ATTN_MICRO_BATCH_ID) == m - 1
        assert (window[:info_bytes] == 0).all(), "attention info not zeroed"
        expected = torch.full((need,), GARBAGE, dtype=torch.uint8)
        layout.initialize_attn(expected)
    assert torch.equal(window[:info_bytes], expected[:info_bytes])
    holder.stop_schedule()
    assert sc.get(ctx, sc.RUN_FLAG) == 0


def info_bytes_of(mode: int) -> int:
    layout = HOLDER_LAYOUT
    return layout.ffn_info_bytes if mode == 0 else layout.attn_info_bytes


REFUSED: list[tuple[str, Callable[[int, int], dict[str, int]], str]] = [
    ("attn_to_ffn_token_size", lambda w, n: {"attn_to_ffn_token_size": 2304}, "% 512"),
    ("ffn_to_attn_token_size", lambda w, n: {"ffn_to_attn_token_size": 2304}, "% 512"),
    ("session_num", lambda w, n: {"session_num": 0}, "non-zero"),
    ("micro_batch_size", lambda w, n: {"micro_batch_size": 0}, "non-zero"),
    ("selected_expert_num", lambda w, n: {"selected_expert_num": 0}, "non-zero"),
    ("expert_num", lambda w, n: {"expert_num": 0}, "non-zero"),
    ("schedule_mode", lambda w, n: {"schedule_mode": 2}, "schedule_mode 2"),
    ("window", lambda w, n: {"ffn_window": 0, "attention_window": 0}, "window missing"),
    ("window_size", lambda w, n: {"ffn_window_size": n, "attention_window_size": n}, "too small"),
]


@pytest.mark.parametrize("mode", [0, 1], ids=["ffn", "attention"])
@pytest.mark.parametrize(("what", "change", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_the_holder_refuses_what_torch_npus_refuses(
    torch_npu: ModuleType,
    mode: int,
    what: str,
    change: Callable[[int, int], dict[str, int]],
    message: str,
) -> None:
    ffn = mode == 0
    _group, window, need = garbage_window(torch_npu, mode)  # collecting it unmaps the window
    base = window.data_ptr()
    # window_size: exactly the 512-aligned info table leaves no data area
    args = holder_args(mode, base, need, **change(base, align512(info_bytes_of(mode))))
    with pytest.raises(RuntimeError, match=message):
        torch_npu._afd.create_schedule_context_holder(**args)
    assert (window == GARBAGE).all(), "a refused holder wrote into the window"

    # the checked binding refuses the same, naming the argument, before torch_npu sees it
    binding_args = dict(args)
    if not ffn:
        binding_args["micro_batch_num"] = 1  # A3's F2A: one micro-batch per attention window
    with pytest.raises(AFDInputError) as info:
        npu_binding.create_schedule_context_holder(**binding_args)
    named = info.value.argument
    if what == "window":
        assert named == ("ffn_window" if ffn else "attention_window")
    elif what == "window_size":
        assert named == ("ffn_window_size" if ffn else "attention_window_size")
    else:
        assert named == what


def test_a_window_one_byte_past_the_info_table_is_taken(torch_npu: ModuleType) -> None:
    # torch_npu's bound is strict (size > align512(info)); the binding's is the same
    a, bs, e = HOLDER_LAYOUT.num_attention_ranks, HOLDER_LAYOUT.tokens, HOLDER_LAYOUT.slots
    for mode, info_bytes in ((0, a * (2 + bs * e) * 4), (1, bs * e * 4)):  # M = 1
        smallest = align512(info_bytes) + 1
        group = single_rank_group(torch_npu)
        group._window_register_and_exchange(smallest, [])
        window = group._get_window_mem()
        args = holder_args(mode, window.data_ptr(), smallest, micro_batch_num=1)
        holder = torch_npu._afd.create_schedule_context_holder(**args)
        assert sc.get(holder.get_schedule_context_tensor(), sc.RUN_FLAG) == 1
        checked = npu_binding.create_schedule_context_holder(**args)
        assert sc.get(checked.get_schedule_context_tensor(), sc.RUN_FLAG) == 1


# -- 4. the four ops, emulated HCCL vs the reference transport ----------------------------
# A = 1 (rank 1), F = 1 (rank 0), M = 1, BS = 2, K = 1, one shared expert, H = 1024 in bf16
H, BS, K = 1024, 2, 1
FID_LAYOUT = WindowLayout(
    num_attention_ranks=1,
    micro_batches=1,
    tokens=BS,
    topk=K,
    shared=1,
    hidden=H,
    dtype=torch.bfloat16,
    attn_to_ffn_token_size=a3_attn_to_ffn_token_size(H, torch.bfloat16, False),
)
FID_TOPOLOGY = RankTopology(1, 1, 0)
ROUTED = 2
LAYER = 3
FFN_RANK, ATTN_RANK = 0, 1


def fidelity_holder_args(ffn: bool, window: int, size: int) -> dict[str, int]:
    layout = FID_LAYOUT
    return {
        "schedule_mode": 0 if ffn else 1,
        "session_num": layout.num_attention_ranks,
        "micro_batch_num": layout.micro_batches,
        "micro_batch_size": layout.tokens,
        "selected_expert_num": layout.slots,
        "expert_num": ROUTED + 1 if ffn else 1,
        "attn_to_ffn_token_size": layout.attn_to_ffn_token_size,
        "ffn_to_attn_token_size": align512(layout.ffn_to_attn_token_size),
        "ffn_window": window if ffn else 0,
        "ffn_window_size": size if ffn else 0,
        "attention_window": 0 if ffn else window,
        "attention_window_size": 0 if ffn else size,
    }


class Ops:
    """One backend's four ops, the group name they take and the two ranks' contexts."""

    def __init__(
        self,
        module: Any,
        group: str,
        ffn_ctx: torch.Tensor,
        attn_ctx: torch.Tensor,
        ffn_window: Callable[[], torch.Tensor],
        attn_window: Callable[[], torch.Tensor],
    ) -> None:
        self.m = module
        self.group = group
        self.ffn_ctx = ffn_ctx
        self.attn_ctx = attn_ctx
        self.ffn_window = ffn_window
        self.attn_window = attn_window


def run_sequence(ops: Ops) -> dict[str, Any]:
    """A2F -> batching -> F2A -> combine; the windows after each write, the ops' outputs."""
    layout, shapes, world = FID_LAYOUT, FID_LAYOUT.op_shapes, FID_TOPOLOGY.world_size
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, BS, H, generator=g).to(torch.bfloat16)
    expert_ids = torch.tensor([[[1], [0]]], dtype=torch.int32)
    table = build_expert_rank_table(FID_TOPOLOGY, ROUTED, 1)
    layer = torch.tensor([LAYER], dtype=torch.int32)
    seen: dict[str, Any] = {}
    ops.m.npu_attention_to_ffn(
        x, torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), layer,
        expert_ids, table, ops.group, world, shapes["ffn_token_info_table_shape"],
        shapes["ffn_token_data_shape"], shapes["attn_token_info_table_shape"], ROUTED,
        active_mask=torch.ones(1, BS, dtype=torch.bool), quant_mode=0, sync_flag=0,
        ffn_start_rank_id=0,
    )  # fmt: skip
    seen["ffn window after A2F"] = ops.ffn_window().clone()
    batch = ops.m.npu_ffn_worker_batching(
        ops.ffn_ctx, ROUTED + 1, [layout.num_attention_ranks, BS, layout.slots, H], token_dtype=1,
        need_schedule=1,
    )  # fmt: skip
    seen["batching outputs"] = [t.clone() for t in batch]
    seen["ffn window after batching"] = ops.ffn_window().clone()
    y, _, sessions, mbs, tokens, offsets, _, count = batch
    out = (y.float() * 2 + 1).to(torch.bfloat16)  # any FFN; rows distinct per slot
    ops.m.npu_ffn_to_attention(
        out, sessions, mbs, tokens, offsets, count, ops.group, world,
        shapes["token_info_table_shape"], shapes["token_data_shape"],
        attn_rank_table=torch.tensor([ATTN_RANK], dtype=torch.int32),
    )  # fmt: skip
    seen["attention window after F2A"] = ops.attn_window().clone()
    scales = torch.tensor([[0.5], [2.0]], dtype=torch.float32)
    combined, next_layer = ops.m.npu_attention_worker_combine(
        ops.attn_ctx, scales, layer, H, token_dtype=1, need_schedule=1
    )
    seen["combine output"] = combined.clone()
    seen["combine next layer"] = next_layer.clone()
    return seen


def emulated_rank(torch_npu: ModuleType, rendezvous: Any, rank: int) -> dict[str, Any]:
    """One rank's set-up, as the NPU link does it: group, window, holder."""
    hccl = torch_npu._C._distributed_c10d
    timeout = datetime.timedelta(seconds=SETUP_TIMEOUT_S)
    client = torch.distributed.TCPStore(
        rendezvous.host, rendezvous.port, is_master=False, timeout=timeout
    )
    store = torch.distributed.PrefixStore("emulator_fidelity", client)
    options = hccl.ProcessGroupHCCL.Options()
    options._timeout = timeout
    group = hccl.ProcessGroupHCCL(store, rank, FID_TOPOLOGY.world_size, options)
    name = group.get_hccl_comm_name(rank)
    ffn = FID_TOPOLOGY.is_ffn(rank)
    need = FID_LAYOUT.ffn_window_bytes if ffn else FID_LAYOUT.attn_window_bytes
    peers = list(FID_TOPOLOGY.attention_ranks if ffn else FID_TOPOLOGY.ffn_ranks)
    group._window_register_and_exchange(need, peers)
    window = group._get_window_mem()
    holder = torch_npu._afd.create_schedule_context_holder(
        **fidelity_holder_args(ffn, window.data_ptr(), need)
    )
    return {"group": group, "name": name, "window": window, "holder": holder, "client": client}


def test_the_emulated_ops_write_the_reference_bytes(torch_npu: ModuleType) -> None:
    layout = FID_LAYOUT
    rendezvous, store = serve_rendezvous()
    threads = [
        RankThread(f"rank-{r}", lambda r=r: emulated_rank(torch_npu, rendezvous, r))
        for r in range(FID_TOPOLOGY.world_size)
    ]
    for thread in threads:
        thread.start()
    ffn_rank, attn_rank = (thread.outcome(SETUP_TIMEOUT_S + 5) for thread in threads)
    assert ffn_rank["name"] == attn_rank["name"]  # one communicator
    assert ffn_rank["window"].data_ptr() != attn_rank["window"].data_ptr()
    ffn_window = ffn_rank["window"].view(torch.uint8)
    attn_window = attn_rank["window"].view(torch.uint8)
    emulated = run_sequence(
        Ops(
            torch_npu,
            ffn_rank["name"],
            ffn_rank["holder"].get_schedule_context_tensor(),
            attn_rank["holder"].get_schedule_context_tensor(),
            lambda: ffn_window[: layout.ffn_window_bytes],
            lambda: attn_window[: layout.attn_window_bytes],
        )
    )

    ref_group = create_window_group(
        f"emu-fidelity-{uuid.uuid4().hex[:8]}", FID_TOPOLOGY, layout, "inproc"
    )
    try:
        holders = [
            reference.create_schedule_context_holder(
                **fidelity_holder_args(
                    FID_TOPOLOGY.is_ffn(r), ref_group.address(r), ref_group.window_bytes(r)
                )
            )
            for r in (FFN_RANK, ATTN_RANK)
        ]
        want = run_sequence(
            Ops(
                reference,
                ref_group.name,
                holders[0].get_schedule_context_tensor(),
                holders[1].get_schedule_context_tensor(),
                lambda: ref_group.window(FFN_RANK),
                lambda: ref_group.window(ATTN_RANK),
            )
        )
    finally:
        ref_group.close()
    del store

    assert emulated.keys() == want.keys()
    for key in want:
        got, expected = emulated[key], want[key]
        if isinstance(expected, list):
            assert len(got) == len(expected), key
            for i, (g, w) in enumerate(zip(got, expected, strict=True)):
                assert g.dtype == w.dtype and g.shape == w.shape, (key, i)
                assert torch.equal(g, w), f"{key}[{i}] differs"
        else:
            assert got.dtype == expected.dtype and got.shape == expected.shape, key
            assert torch.equal(got, expected), f"{key} differs"
    # the sequence did something: both windows and the output are not their initial state
    info = emulated["ffn window after A2F"][: layout.ffn_info_bytes].view(torch.int32)
    assert info[0] == 1 and info[1] == LAYER, info[:4]
    assert int(emulated["batching outputs"][-1][0]) == BS * layout.slots
    assert emulated["combine output"].abs().sum() > 0
