"""ffn_worker_scheduler(_) and attention_worker_scheduler(_), after the public scheduler tests.

Peer files followed (their parameters and assertions; no code taken):

* Ascend/op-plugin @ 517f2e7d0f20 (file version 1190364d)
  `test/test_custom_ops/test_ffn_worker_schedule.py` and its torch_npu twin
  Ascend/pytorch @ 9e73e708ab93 `test/_afd/test_ffn_worker_schedule.py`:
  `test_op_plugin_ffn_scheduler_in_place`, `test_op_plugin_ffn_scheduler_out_of_place`.
* Ascend/op-plugin `test/test_custom_ops/test_attention_worker_schedule.py` (same version)
  and Ascend/pytorch `test/_afd/test_attention_worker_schedule.py`:
  `test_op_plugin_attention_scheduler_in_place`, `..._out_of_place`.
Those tests are skipped upstream ("until cann supported") and only assert that the context
changed (in place) or that the input did not and the returned copy did. The expected values
here are ours, from the AI-CPU kernels (hicann/ops-transformer, mirror
libochao-huawei/ops-transformer @ 5778144076de,
`ffn/ffn_worker_scheduler/op_kernel_aicpu/ffn_worker_scheduler_aicpu.cpp`,
`attention/attention_worker_scheduler/op_kernel_aicpu/attention_worker_scheduler_aicpu.cpp`):
* FFN: out_num := 0; sync_group_size == A (one group): wait for every session of
  micro-batch polling_index, publish them in session order, polling_index += 1 (mod M);
  several groups: for each group in order, publish its lowest-numbered micro-batch (from
  0, not from polling_index) whose descriptors are all flagged, and leave polling_index
  alone. Publishing (s, m) at output slot o: layer_ids[o] = the descriptor's layer,
  session_ids[o] = s, micro_batch_ids[o] = m, expert_ids[o] = its BS*K ids; then its ids
  are memset to 0x7F (0x7F7F7F7F each) and its flag set to 0 (layer kept); out_num += 1.
* attention: micro-batch (id + 1) % M, wait until all its BS*K flags are 1, zero them,
  store the id.
* The non-in-place ops copy the 1024-byte context and run on the copy: the input context
  is unchanged, the buffers it points to change all the same.
The contexts are built by hand the way torch_npu's `create_schedule_context_holder` fills
them (FFN: descriptors flag 0 / layer 0 / ids INT32_MAX at the window start, token data at
align512(descriptor bytes), the four output buffers in one workspace, each 512-aligned;
attention: flags zeroed, micro_batch_id = M - 1).

Beyond the upstream grid (ours): sync_group_size 1 with A = 2 (independent sessions, each
its lowest ready micro-batch), A = 4 in groups of 2, three attention scheduler calls in a
row, and `test_batching_after_scheduler_equals_recv`: npu_ffn_worker_batching with
need_schedule = 0 after ffn_worker_scheduler_ gives the rows need_schedule = 1 gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from golden_support import (
    ATTN_DATA_BUF,
    ATTN_DATA_BUF_SIZE,
    ATTN_INFO_BUF,
    ATTN_INFO_BUF_SIZE,
    ATTN_MICRO_BATCH_ID,
    FFN_DATA_BUF,
    FFN_DATA_BUF_SIZE,
    FFN_EXPERT_IDS_BUF,
    FFN_EXPERT_IDS_BUF_SIZE,
    FFN_INFO_BUF,
    FFN_INFO_BUF_SIZE,
    FFN_LAYER_IDS_BUF,
    FFN_LAYER_IDS_BUF_SIZE,
    FFN_MICRO_BATCH_IDS_BUF,
    FFN_MICRO_BATCH_IDS_BUF_SIZE,
    FFN_OUT_NUM,
    FFN_POLLING_INDEX,
    FFN_SESSION_IDS_BUF,
    FFN_SESSION_IDS_BUF_SIZE,
    INT32_MAX,
    MASK_ID,
    RESET_7F,
    Context,
    Field,
    align512,
    assert_context,
    assert_same_bytes,
    common_area,
    context_bytes,
    registered,
    rng_for,
    tensor_bytes,
    with_fields,
)

import afd_dispatch.kernels.reference  # noqa: F401  (registers torch.ops.afd)
from afd_dispatch import AFDInputError

# the upstream tests' parameters
WINDOW_SIZE = 209715200  # 200 MiB, as both upstream tests allocate
HIDDEN = 7168
A2F_TOKEN_SIZE = align512(HIDDEN + 4)  # 7680
F2A_TOKEN_SIZE = HIDDEN * 2  # 14336
EXPERTS = 288
TOP_K = 8
K = TOP_K + 1  # selected_expert_num passed to the holder


def holder_common_area(
    num_attention_ranks: int,
    micro_batches: int,
    batch_size: int,
    selected_experts: int,
    schedule_mode: int,
) -> tuple[tuple[Field, int], ...]:
    """`common_area` of a holder made with the upstream tests' expert count and token sizes."""
    return common_area(
        num_attention_ranks=num_attention_ranks,
        micro_batches=micro_batches,
        batch_size=batch_size,
        selected_experts=selected_experts,
        experts=EXPERTS,
        attn_to_ffn_token_size=A2F_TOKEN_SIZE,
        ffn_to_attn_token_size=F2A_TOKEN_SIZE,
        schedule_mode=schedule_mode,
    )


# -- an FFN context as torch_npu's holder makes it -------------------------------------------
@dataclass
class Ffn:
    ctx: Context
    window: torch.Tensor  # int8: descriptors at 0, token data at align512(descriptor bytes)
    workspace: torch.Tensor  # int8: layer ids | session ids | micro-batch ids | expert ids
    A: int
    M: int
    BS: int
    K: int

    @property
    def desc_words(self) -> int:
        return 2 + self.BS * self.K

    def info(self) -> np.ndarray:
        """int32 [A, M, 2 + BS*K] view over the descriptors (writable)."""
        n = self.A * self.M * self.desc_words
        return self.window.numpy()[: 4 * n].view(np.int32).reshape(self.A, self.M, -1)

    def data_offset(self) -> int:
        return align512(4 * self.A * self.M * self.desc_words)

    def outputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(layer_ids [A], session_ids [A], micro_batch_ids [A], expert_ids [A, BS*K])."""
        ws = self.workspace.numpy()
        step = align512(4 * self.A)
        ids = [ws[i * step : i * step + 4 * self.A].view(np.int32) for i in range(3)]
        experts = ws[3 * step : 3 * step + 4 * self.A * self.BS * self.K].view(np.int32)
        return ids[0], ids[1], ids[2], experts.reshape(self.A, -1)


@contextmanager
def ffn_holder(
    A: int, M: int, BS: int, k: int, window_size: int | None = None, timeout_s: float = 5.0
) -> Iterator[Ffn]:
    desc_bytes = 4 * A * M * (2 + BS * k)
    size = window_size or align512(desc_bytes) + A * M * BS * k * A2F_TOKEN_SIZE
    window = torch.zeros(size, dtype=torch.int8)
    step = align512(4 * A)
    workspace = torch.zeros(3 * step + align512(4 * A * BS * k), dtype=torch.int8)
    with registered(window, workspace, timeout_s=timeout_s) as (window_at, ws_at):
        ffn = Ffn(Context(), window, workspace, A, M, BS, k)
        info = ffn.info()
        info[:, :, 0] = 0
        info[:, :, 1] = 0
        info[:, :, 2:] = INT32_MAX
        ffn.ctx.put_all(
            *holder_common_area(A, M, BS, k, schedule_mode=0),
            (FFN_INFO_BUF, window_at),
            (FFN_INFO_BUF_SIZE, desc_bytes),
            (FFN_DATA_BUF, window_at + align512(desc_bytes)),
            (FFN_DATA_BUF_SIZE, size - align512(desc_bytes)),
            (FFN_POLLING_INDEX, 0),
            (FFN_LAYER_IDS_BUF, ws_at),
            (FFN_LAYER_IDS_BUF_SIZE, 4 * A),
            (FFN_SESSION_IDS_BUF, ws_at + step),
            (FFN_SESSION_IDS_BUF_SIZE, 4 * A),
            (FFN_MICRO_BATCH_IDS_BUF, ws_at + 2 * step),
            (FFN_MICRO_BATCH_IDS_BUF_SIZE, 4 * A),
            (FFN_EXPERT_IDS_BUF, ws_at + 3 * step),
            (FFN_EXPERT_IDS_BUF_SIZE, 4 * A * BS * k),
            (FFN_OUT_NUM, 0),
        )
        yield ffn


def published(ffn: Ffn, before: np.ndarray, picks: list[tuple[int, int]]) -> None:
    """Check the scheduler published (session, micro-batch) `picks` in slots 0, 1, ... and
    reset exactly those descriptors; `before` is the descriptor table before the call."""
    layers, session_ids, mbs, experts = ffn.outputs()
    n = len(picks)
    assert layers[:n].tolist() == [int(before[s, m, 1]) for s, m in picks]
    assert session_ids[:n].tolist() == [s for s, _ in picks]
    assert mbs[:n].tolist() == [m for _, m in picks]
    for o, (s, m) in enumerate(picks):
        assert np.array_equal(experts[o], before[s, m, 2:]), (o, s, m)
    after = before.copy()
    for s, m in picks:
        after[s, m, 0] = 0
        after[s, m, 2:] = RESET_7F
    assert np.array_equal(ffn.info(), after)


def set_all_flags_as_upstream(ffn: Ffn) -> None:
    """op-plugin's `_set_all_flags`: the first A*M*(8 + BS*top_k*4) window bytes := int32 1.

    It counts top_k (8) ids per token where a descriptor holds K = 9, so it covers every
    flag but not every id: descriptors 0..4 become all 1 (flag, layer 1, ids 1), the last
    one keeps INT32_MAX in its last ids."""
    words = ffn.A * ffn.M * (8 + ffn.BS * TOP_K * 4) // 4
    ffn.window.numpy()[: 4 * words].view(np.int32)[:] = 1


OP_A, OP_M, OP_BS = 2, 3, 6


def test_op_plugin_ffn_scheduler_in_place() -> None:
    with ffn_holder(OP_A, OP_M, OP_BS, K, window_size=WINDOW_SIZE) as ffn:
        set_all_flags_as_upstream(ffn)
        before_info = ffn.info().copy()
        assert (before_info[:, :, 0] == 1).all() and (before_info[-1, -1, 2:] == INT32_MAX).any()
        ctx_before = ffn.ctx.snapshot()

        out = torch.ops.afd.ffn_worker_scheduler_(ffn.ctx.tensor, sync_group_size=2)

        assert out.data_ptr() == ffn.ctx.tensor.data_ptr()
        assert context_bytes(ffn.ctx.tensor) != ctx_before  # upstream's assertion
        # one group of 2 = A sessions: micro-batch polling_index 0 of both, then index 1
        published(ffn, before_info, [(0, 0), (1, 0)])
        assert_context(
            ffn.ctx.tensor, with_fields(ctx_before, (FFN_OUT_NUM, 2), (FFN_POLLING_INDEX, 1))
        )


def test_op_plugin_ffn_scheduler_out_of_place() -> None:
    with ffn_holder(OP_A, OP_M, OP_BS, K, window_size=WINDOW_SIZE) as ffn:
        set_all_flags_as_upstream(ffn)
        before_info = ffn.info().copy()
        ctx_before = ffn.ctx.snapshot()

        out = torch.ops.afd.ffn_worker_scheduler(ffn.ctx.tensor, sync_group_size=2)

        assert context_bytes(ffn.ctx.tensor) == ctx_before  # upstream: input unchanged
        assert context_bytes(out) != ctx_before  # upstream: the copy changed
        assert out.dtype == torch.int8 and tuple(out.shape) == (1024,)
        assert out.data_ptr() != ffn.ctx.tensor.data_ptr()
        assert_context(out, with_fields(ctx_before, (FFN_OUT_NUM, 2), (FFN_POLLING_INDEX, 1)))
        published(ffn, before_info, [(0, 0), (1, 0)])  # the buffers changed all the same


def flag_descriptors(ffn: Ffn, ready: dict[int, list[int]], seed: str) -> np.ndarray:
    """Distinct layer and ids in every descriptor; flag 1 on session s's micro-batches
    `ready[s]`. Returns the table."""
    rng = rng_for(seed)
    info = ffn.info()
    info[:, :, 1] = rng.integers(0, 64, size=(ffn.A, ffn.M))
    info[:, :, 2:] = rng.integers(0, EXPERTS, size=(ffn.A, ffn.M, ffn.BS * ffn.K))
    for s, mbs in ready.items():
        for m in mbs:
            info[s, m, 0] = 1
    return info.copy()


def test_sync_group_size_1_publishes_each_session_s_lowest_ready_micro_batch() -> None:
    with ffn_holder(2, 3, OP_BS, K) as ffn:
        # session 0 ready at micro-batches 1 and 2, session 1 at 0 and 2; polling index 2
        before = flag_descriptors(ffn, {0: [1, 2], 1: [0, 2]}, "sync 1, A 2")
        ffn.ctx.put(FFN_POLLING_INDEX, 2)
        ctx_before = ffn.ctx.snapshot()

        torch.ops.afd.ffn_worker_scheduler_(ffn.ctx.tensor, sync_group_size=1)
        # each group (one session) its lowest ready micro-batch, counted from 0; the polling
        # index is only used by the one-group path
        published(ffn, before, [(0, 1), (1, 0)])
        assert_context(ffn.ctx.tensor, with_fields(ctx_before, (FFN_OUT_NUM, 2)))

        before = ffn.info().copy()
        torch.ops.afd.ffn_worker_scheduler_(ffn.ctx.tensor, sync_group_size=1)
        published(ffn, before, [(0, 2), (1, 2)])
        assert_context(ffn.ctx.tensor, with_fields(ctx_before, (FFN_OUT_NUM, 2)))


def test_groups_of_2_publish_only_fully_ready_groups() -> None:
    with ffn_holder(4, 3, OP_BS, K) as ffn:
        # group 0 = sessions 0, 1: complete only at micro-batch 2 (session 0 alone at 0);
        # group 1 = sessions 2, 3: never complete
        before = flag_descriptors(ffn, {0: [0, 2], 1: [2], 2: [1], 3: [0]}, "groups of 2")
        ctx_before = ffn.ctx.snapshot()
        torch.ops.afd.ffn_worker_scheduler_(ffn.ctx.tensor, sync_group_size=2)
        published(ffn, before, [(0, 2), (1, 2)])
        assert_context(ffn.ctx.tensor, with_fields(ctx_before, (FFN_OUT_NUM, 2)))


# -- the attention scheduler ------------------------------------------------------------------
ATT_A, ATT_M, ATT_BS = 144, 3, 30


@contextmanager
def attention_holder(timeout_s: float = 5.0) -> Iterator[tuple[Context, np.ndarray]]:
    """(context, int32 flags [M, BS, K] view) of torch_npu's holder in attention mode."""
    window = torch.zeros(WINDOW_SIZE, dtype=torch.int8)
    flag_bytes = 4 * ATT_M * ATT_BS * K
    with registered(window, timeout_s=timeout_s) as (window_at,):
        ctx = Context(
            *holder_common_area(ATT_A, ATT_M, ATT_BS, K, schedule_mode=1),
            (ATTN_INFO_BUF, window_at),
            (ATTN_INFO_BUF_SIZE, flag_bytes),
            (ATTN_DATA_BUF, window_at + align512(flag_bytes)),
            (ATTN_DATA_BUF_SIZE, WINDOW_SIZE - align512(flag_bytes)),
            (ATTN_MICRO_BATCH_ID, ATT_M - 1),
        )
        flags = window.numpy()[:flag_bytes].view(np.int32).reshape(ATT_M, ATT_BS, K)
        flags[:] = 1  # upstream's _set_all_flags: BS*(top_k+1)*4*M bytes of int32 1
        yield ctx, flags


def test_op_plugin_attention_scheduler_in_place() -> None:
    with attention_holder() as (ctx, flags):
        ctx_before = ctx.snapshot()
        out = torch.ops.afd.attention_worker_scheduler_(ctx.tensor)
        assert out.data_ptr() == ctx.tensor.data_ptr()
        assert context_bytes(ctx.tensor) != ctx_before  # upstream's assertion
        assert_context(ctx.tensor, with_fields(ctx_before, (ATTN_MICRO_BATCH_ID, 0)))
        assert (flags[0] == 0).all() and (flags[1:] == 1).all()

        # ours: the next calls take micro-batches 1 and 2
        for m in (1, 2):
            torch.ops.afd.attention_worker_scheduler_(ctx.tensor)
            assert_context(ctx.tensor, with_fields(ctx_before, (ATTN_MICRO_BATCH_ID, m)))
            assert (flags[: m + 1] == 0).all() and (flags[m + 1 :] == 1).all()


def test_op_plugin_attention_scheduler_out_of_place() -> None:
    with attention_holder() as (ctx, flags):
        ctx_before = ctx.snapshot()
        out = torch.ops.afd.attention_worker_scheduler(ctx.tensor)
        assert context_bytes(ctx.tensor) == ctx_before  # upstream: input unchanged
        assert context_bytes(out) != ctx_before  # upstream: the copy changed
        assert out.data_ptr() != ctx.tensor.data_ptr()
        assert_context(out, with_fields(ctx_before, (ATTN_MICRO_BATCH_ID, 0)))
        assert (flags[0] == 0).all() and (flags[1:] == 1).all()  # buffers changed anyway


# -- need_schedule = 0 after the FFN scheduler == need_schedule = 1 ---------------------------
def fill_window(ffn: Ffn, seed: str) -> None:
    """Every descriptor flagged, layer 5, ids in [0, EXPERTS) with ~15% masked; every slot
    an int8 row (values in [-128, 127], float32 scale at byte H, zero padding)."""
    rng = rng_for(seed)
    info = ffn.info()
    ids = rng.integers(0, EXPERTS, size=(ffn.A, ffn.M, ffn.BS * ffn.K))
    ids[rng.random(ids.shape) < 0.15] = MASK_ID
    info[:, :, 0], info[:, :, 1], info[:, :, 2:] = 1, 5, ids
    slots = ffn.A * ffn.M * ffn.BS * ffn.K
    rows = np.zeros((slots, A2F_TOKEN_SIZE), dtype=np.uint8)
    rows[:, :HIDDEN] = rng.integers(-128, 128, size=(slots, HIDDEN)).astype(np.int8).view(np.uint8)
    rows[:, HIDDEN : HIDDEN + 4] = (
        rng.uniform(0.1, 2.1, slots).astype(np.float32).view(np.uint8).reshape(slots, 4)
    )
    start = ffn.data_offset()
    ffn.window.numpy()[start : start + rows.size] = rows.reshape(-1).view(np.int8)


def test_batching_after_scheduler_equals_recv() -> None:
    """Two identical FFN windows (A=2, M=3, BS=6, K=9, int8 H=7168 in 7680-byte slots):
    one served by ffn_worker_scheduler_(sync_group_size=A) + batching need_schedule=0, the
    other by batching need_schedule=1, for three rounds (micro-batches 0, 1, 2)."""
    a, m, bs = OP_A, OP_M, OP_BS
    with ffn_holder(a, m, bs, K) as sched, ffn_holder(a, m, bs, K) as recv:
        fill_window(sched, "after scheduler")
        fill_window(recv, "after scheduler")
        for round_ in range(m):
            torch.ops.afd.ffn_worker_scheduler_(sched.ctx.tensor, sync_group_size=a)
            assert sched.ctx.get(FFN_OUT_NUM) == a
            got = torch.ops.afd.npu_ffn_worker_batching(
                sched.ctx.tensor, EXPERTS, [a, bs, K, HIDDEN], token_dtype=2, need_schedule=0
            )
            want = torch.ops.afd.npu_ffn_worker_batching(
                recv.ctx.tensor, EXPERTS, [a, bs, K, HIDDEN], token_dtype=2, need_schedule=1
            )
            n = int(want[7][0])
            assert got[7].tolist() == [n] and 0 < n < a * bs * K, round_
            assert_same_bytes(tensor_bytes(got[0][:n]), tensor_bytes(want[0][:n]), "y")
            assert got[1].tolist() == want[1].tolist()  # group_list
            for i in (2, 3, 4, 5):  # session, micro-batch, token, offset
                assert got[i][:n].tolist() == want[i][:n].tolist(), (round_, i)
            assert set(got[3][:n].tolist()) == {round_}
            assert_same_bytes(tensor_bytes(got[6][:n]), tensor_bytes(want[6][:n]), "scale")
            assert sched.ctx.get(FFN_POLLING_INDEX) == recv.ctx.get(FFN_POLLING_INDEX)
            assert sched.ctx.get(FFN_POLLING_INDEX) == (round_ + 1) % m


@pytest.mark.parametrize(
    ("session_num", "sync_group_size", "execute_mode"),
    [(2, 0, 0), (2, 3, 0), (4, 3, 0), (2, 1, 1)],
)
def test_ffn_scheduler_refuses_what_the_kernel_refuses(
    session_num: int, sync_group_size: int, execute_mode: int
) -> None:
    """The kernel's checks: sync_group_size in [1, A] dividing A; execute_mode 0 ("once")."""
    with ffn_holder(session_num, OP_M, OP_BS, K) as ffn:
        ctx_before = ffn.ctx.snapshot()
        info_before = ffn.info().copy()
        bad = "sync_group_size" if execute_mode == 0 else "execute_mode"
        with pytest.raises(AFDInputError, match=bad):
            torch.ops.afd.ffn_worker_scheduler_(
                ffn.ctx.tensor, sync_group_size=sync_group_size, execute_mode=execute_mode
            )
        assert_context(ffn.ctx.tensor, ctx_before)
        assert np.array_equal(ffn.info(), info_before)
