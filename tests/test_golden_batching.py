"""npu_ffn_worker_batching against the hardware team's public goldens, re-derived here.

Peer files followed (read for their grids and expected-value rules; no code taken):

* hicann/ops-transformer @ 79689ad1624b0d86a361c8acbcae2bad63034d1f
  `ffn/ffn_worker_batching/tests/assets/golden.py` and
  `ffn/ffn_worker_batching/tests/st/arch35/test_torch_ffn_worker_batching_arch35.csv`
  (`test_torch_graph_ffn_worker_batching_arch35.csv` has the same 66 parameter rows, with
  `mx_output_uint8` True, which only changes how MX outputs are typed): `test_hicann_norm_row`,
  `test_hicann_recv_row`, `test_hicann_recv_row_polls_and_wraps` (ours: the same rows with
  M = 3, see below).
* Ascend/op-plugin @ 517f2e7d0f20 (file version 022224f3)
  `test/test_custom_ops/test_npu_ffn_worker_batching.py`: `test_op_plugin_batching`.

hicann CSV rows covered (line numbers of the 66 data rows): 1-3 (fp16/bf16/int8 norm),
7-9 (numeric ranges), 13-15 (protocol_outnum_zero, protocol_outnum_one,
protocol_micro_last_reverse_sessions), 16-37 (every fp16/bf16/int8 coverage row: +-max,
+-inf, nan, -0.0, subnormals, int8 x_min/x_max and the float32 scale specials), 51, 53, 55
(fp16/bf16/int8 recv) and 66 (recv with every id masked).
Left out, because the A3 op and the torch_npu schema cannot express them:
* rows 4-6, 10-12, 38-50, 57-62: token_dtype 3/4/5 (fp8 e5m2 / e4m3fn / fp4 e2m1 with
  e8m0 scales) are arch35 (Ascend 950) formats; A3's batching takes 0/1/2 only;
* rows 52, 54, 56, 63-65 and every other row with sync_flag True (async_layers,
  sync_skip_mb, sync_partial, layer_boundary_invalid): sync_flag and cross-layer ids are
  arch35 features (aclnnFfnWorkerBatchingV2); torch_npu's schema has no sync_flag.

The golden's rules, as applied here:
* M = 3 when the case name says "micro_last", else 1; out_num = 0 / 1 / A for
  "outnum_zero" / "outnum_one" / otherwise; session_ids buffer arange(A), reversed for
  "reverse_sessions"; micro_batch_ids buffer (length A) M - 1 for "micro_last", else 0.
* Token payloads: equal bounds = that exact value; otherwise uniform over the finite
  encodings of the format whose value lies in the range (int8: integers); int8 scales
  float32 uniform in their range. Expert ids uniform in [0, expert_num) unless the row
  gives an id range (row 66: every id 1_000_000). Our own seeded generator (CRC-32 of the
  case name), so the values differ from the golden's, the distributions do not.
* Slot stride HS = align512(payload bytes): payload 2H (fp16/bf16), H + 4 (int8: the
  float32 scale right after the H values), zero padding after it.
* NORM contexts: session / micro-batch / expert-id buffers (expert ids with capacity
  [A, BS, K], rows past out_num zero, valid ids, to catch a kernel that ignores out_num),
  out_num; RECV contexts: token_info [A, M, 2 + BS*K] with flag 1, layer 0, polling index 0.
* Expected: stable sort of the published ids (masked last), actual_token_num = #valid;
  row i < actual_token_num gathers (a, bs, k) of sorted flat index g; session / micro-batch
  = the NORM buffers at a, or (a, polled micro-batch) for RECV; token id bs; offset k.
* Compare: first actual_token_num rows of y as bytes (NaN payloads and -0 matter), of the
  four index outputs, and of dynamic_scale as bytes for int8 (its content is ignored for
  fp16/bf16); group_list in full (all-zero tail); actual_token_num.
Also checked (kernel semantics, not the golden's compare): RECV leaves the consumed
descriptors with ids INT32_MAX and flag 0 (layer kept), and polling_index = (m + 1) % M;
NORM leaves the context and every buffer unchanged.

Each NORM row runs twice: token_info "none" is the golden's context exactly (no token-info
region: ffn.token_info_buf = 0, size 0 - the A3 NORM path never loads those fields,
ops-transformer `ffn_wb_get_schedule_context.h` reads token_info_buf and polling_index
only in scan/RECV mode); "holder" adds the token-info region torch_npu's holder would
leave (flags 0, ids INT32_MAX), which NORM must ignore.
"""

from __future__ import annotations

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
    FFN_MICRO_BATCH_IDS_BUF,
    FFN_MICRO_BATCH_IDS_BUF_SIZE,
    FFN_OUT_NUM,
    FFN_POLLING_INDEX,
    FFN_SESSION_IDS_BUF,
    FFN_SESSION_IDS_BUF_SIZE,
    INT32_MAX,
    MASK_ID,
    OP_PLUGIN_WAIT_BUFS,
    Context,
    align512,
    assert_context,
    assert_same_bytes,
    common_area,
    registered,
    rng_for,
    sample_codes,
    sample_f32,
    tensor_bytes,
    with_fields,
)

import afd_dispatch.kernels.reference  # noqa: F401  (registers torch.ops.afd)

KINDS = {0: "fp16", 1: "bf16", 2: "int8"}
Y_DTYPES = {0: torch.float16, 1: torch.bfloat16, 2: torch.int8}
NAN, INF = float("nan"), float("inf")
FP16_MAX, BF16_MAX, F32_MAX = 65504.0, 3.3895313892515355e38, 3.4028234663852886e38


@dataclass(frozen=True)
class Row:
    """One CSV row: name, expert_num, max_out_shape [A, BS, K, H], token_dtype,
    need_schedule, input_data_ranges (token lo, hi[, scale lo, hi[, expert lo, hi]])."""

    line: int
    name: str
    expert_num: int
    shape: tuple[int, int, int, int]
    token_dtype: int
    need_schedule: int
    ranges: tuple[float | None, ...]


SMALL = (1, 8, 9, 64)
NORM_ROWS = [
    Row(1, "torch_ffn_worker_batching_fp16_a1_bs8_k9_h64_e8_norm", 8, SMALL, 0, 0, (-1, 1)),
    Row(2, "torch_ffn_worker_batching_bf16_a1_bs8_k9_h64_e8_norm", 8, SMALL, 1, 0, (-1, 1)),
    Row(3, "torch_ffn_worker_batching_int8_a1_bs8_k9_h64_e8_norm", 8, SMALL, 2, 0,
        (-128, 127, 0.1, 2.1)),
    Row(7, "torch_ffn_worker_batching_fp16_a1_bs8_k9_h64_e8_norm_numeric_range", 8, SMALL, 0, 0,
        (-1, 1)),
    Row(8, "torch_ffn_worker_batching_bf16_a1_bs8_k9_h64_e8_norm_numeric_range", 8, SMALL, 1, 0,
        (-2, 2)),
    Row(9, "torch_ffn_worker_batching_int8_a1_bs8_k9_h64_e8_norm_numeric_range", 8, SMALL, 2, 0,
        (-128, 127, 0.25, 2.0)),
    Row(13, "protocol_outnum_zero", 8, SMALL, 0, 0, (-1, 1)),
    Row(14, "protocol_outnum_one", 8, SMALL, 0, 0, (-1, 1)),
    Row(15, "protocol_micro_last_reverse_sessions", 8, SMALL, 0, 0, (-1, 1)),
    *(
        Row(16 + i, f"coverage_dtype0_norm_x_{tag}_reverse_sessions", 8, SMALL, 0, 0, (v, v))
        for i, (tag, v) in enumerate(
            [("max", FP16_MAX), ("min", -FP16_MAX), ("inf", INF), ("neginf", -INF),
             ("nan", NAN), ("negzero", -0.0), ("subnormal", 5.960464477539063e-08)]
        )
    ),
    *(
        Row(23 + i, f"coverage_dtype1_norm_x_{tag}_reverse_sessions", 8, SMALL, 1, 0, (v, v))
        for i, (tag, v) in enumerate(
            [("max", BF16_MAX), ("min", -BF16_MAX), ("nan", NAN), ("negzero", -0.0),
             ("subnormal", 9.183549615799121e-41)]
        )
    ),
    *(
        Row(28 + i, f"coverage_dtype2_norm_{tag}_reverse_sessions", 8, SMALL, 2, 0, r)
        for i, (tag, r) in enumerate(
            [("x_min", (-128, -128, 1, 1)), ("x_max", (127, 127, 1, 1)),
             ("scale_min", (1, 1, -F32_MAX, -F32_MAX)), ("scale_max", (1, 1, F32_MAX, F32_MAX)),
             ("scale_inf", (1, 1, INF, INF)), ("scale_neginf", (1, 1, -INF, -INF)),
             ("scale_nan", (1, 1, NAN, NAN)), ("scale_negzero", (1, 1, -0.0, -0.0)),
             ("scale_subnormal", (1, 1, 1.401298464324817e-45, 1.401298464324817e-45)),
             ("scale_zero", (1, 1, 0.0, 0.0))]
        )
    ),
]  # fmt: skip
RECV_ROWS = [
    Row(51, "torch_recv_aclnnFfnWorkerBatchingV2_fp16_a1_bs8_k9_h64_e8_recv", 8, SMALL, 0, 1,
        (-1, 1)),
    Row(53, "torch_recv_aclnnFfnWorkerBatchingV2_bf16_a2_bs8_k9_h128_e8_recv", 8,
        (2, 8, 9, 128), 1, 1, (-1, 1)),
    Row(55, "torch_recv_aclnnFfnWorkerBatchingV2_int8_a1_bs8_k9_h4096_e8_recv", 8,
        (1, 8, 9, 4096), 2, 1, (-128, 127, 0.1, 2.1)),
    Row(66, "torch_recv_coverage_dtype0_recv_expert_mask", 8, (4, 3, 3, 66), 0, 1,
        (1, 1, None, None, MASK_ID, MASK_ID)),
]  # fmt: skip


# -- one case's inputs ------------------------------------------------------------------------
@dataclass
class Case:
    A: int
    M: int
    BS: int
    K: int
    H: int
    token_dtype: int
    expert_num: int
    data: np.ndarray  # uint8 [A, M, BS, K, HS]: the token-data buffer
    ids: np.ndarray  # int32: NORM [out_num, BS, K]; RECV [A, M, BS, K]
    session_ids: np.ndarray  # int32 [A] (NORM buffers)
    micro_batch_ids: np.ndarray  # int32 [A]

    @property
    def HS(self) -> int:
        return int(self.data.shape[-1])

    @property
    def payload(self) -> int:
        """Bytes of y's row: 2H for fp16/bf16, H for int8 (the scale follows at byte H)."""
        return self.H if self.token_dtype == 2 else 2 * self.H

    @property
    def rows(self) -> int:
        return self.A * self.BS * self.K


def bound(row: Row, i: int) -> float:
    value = row.ranges[i]
    assert value is not None, (row.name, i)
    return float(value)


def build_case(row: Row, micro_batches: int | None = None) -> Case:
    a, bs, k, h = row.shape
    name = row.name
    m = micro_batches or (3 if "micro_last" in name else 1)
    rng = rng_for(name if micro_batches is None else f"{name}/M={m}")
    out_num = 0 if "outnum_zero" in name else 1 if "outnum_one" in name else a
    id_shape = (out_num, bs, k) if row.need_schedule == 0 else (a, m, bs, k)
    if len(row.ranges) >= 6 and row.ranges[4] is not None:
        id_lo, id_hi = int(bound(row, 4)), int(bound(row, 5))
        ids = rng.integers(id_lo, id_hi + 1, size=id_shape)
    else:
        ids = rng.integers(0, row.expert_num, size=id_shape)
    ids = ids.astype(np.int32)

    kind = KINDS[row.token_dtype]
    lo, hi = bound(row, 0), bound(row, 1)
    codes = sample_codes(rng, (a, m, bs, k, h), lo, hi, kind)
    payload = codes.view(np.uint8).reshape(a, m, bs, k, -1)
    if row.token_dtype == 2:
        s_lo, s_hi = bound(row, 2), bound(row, 3)
        scales = sample_f32(rng, (a, m, bs, k), s_lo, s_hi)
        payload = np.concatenate([payload, scales.view(np.uint8).reshape(a, m, bs, k, 4)], -1)
    hs = align512(payload.shape[-1])
    data = np.zeros((a, m, bs, k, hs), dtype=np.uint8)
    data[..., : payload.shape[-1]] = payload

    sessions = np.arange(a, dtype=np.int32)
    if "reverse_sessions" in name:
        sessions = sessions[::-1].copy()
    mbs = np.full(a, m - 1 if "micro_last" in name else 0, dtype=np.int32)
    return Case(a, m, bs, k, h, row.token_dtype, row.expert_num, data, ids, sessions, mbs)


# -- the golden's expected outputs ------------------------------------------------------------
@dataclass
class Expected:
    n: int
    y: np.ndarray  # uint8 [n, payload]
    scale: np.ndarray  # uint8 [n, 4] (int8 rows' float32 scale)
    session_ids: np.ndarray
    micro_batches: np.ndarray
    tokens: np.ndarray
    offsets: np.ndarray
    group_list: np.ndarray  # int64 [expert_num, 2]


def expected_outputs(
    case: Case, ids: np.ndarray, session_of: np.ndarray, mb_of: np.ndarray
) -> Expected:
    """ids: flat published ids in (a, bs, k) order; session_of / mb_of: per a."""
    flat = ids.reshape(-1).astype(np.int64)
    key = np.where(flat < MASK_ID, flat, INT32_MAX)
    order = np.argsort(key, kind="stable")
    n = int((flat < MASK_ID).sum())
    g = order[:n]
    per_a = case.BS * case.K
    a, bs, k = g // per_a, g % per_a // case.K, g % case.K
    s, mb = session_of[a], mb_of[a]
    slots = case.data[s, mb, bs, k]  # [n, HS]
    kept = flat[g]
    experts, counts = np.unique(kept, return_counts=True)  # ascending = sorted order
    group_list = np.zeros((case.expert_num, 2), dtype=np.int64)
    group_list[: experts.size, 0] = experts
    group_list[: experts.size, 1] = counts
    return Expected(
        n=n,
        y=slots[:, : case.payload],
        scale=slots[:, case.H : case.H + 4],
        session_ids=s.astype(np.int32),
        micro_batches=mb.astype(np.int32),
        tokens=bs.astype(np.int32),
        offsets=k.astype(np.int32),
        group_list=group_list,
    )


def assert_outputs(outputs: tuple[torch.Tensor, ...], case: Case, want: Expected) -> None:
    """The golden's compare: prefix rows byte-exact, group_list in full, the count."""
    y, group_list, sessions, mbs, tokens, offsets, scale, actual = outputs
    rows, n = case.rows, want.n
    assert y.dtype == Y_DTYPES[case.token_dtype] and tuple(y.shape) == (rows, case.H)
    assert group_list.dtype == torch.int64 and tuple(group_list.shape) == (case.expert_num, 2)
    for t in (sessions, mbs, tokens, offsets):
        assert t.dtype == torch.int32 and tuple(t.shape) == (rows,)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (rows,)
    assert actual.dtype == torch.int64 and actual.tolist() == [n]
    assert_same_bytes(tensor_bytes(y[:n]).reshape(n, case.payload), want.y, "y[:n]")
    assert group_list.numpy().tolist() == want.group_list.tolist()
    for got, expected, what in (
        (sessions, want.session_ids, "session_ids"),
        (mbs, want.micro_batches, "micro_batch_ids"),
        (tokens, want.tokens, "token_ids"),
        (offsets, want.offsets, "expert_offsets"),
    ):
        assert np.array_equal(got[:n].numpy(), expected), what
    if case.token_dtype == 2:
        assert_same_bytes(tensor_bytes(scale[:n]).reshape(n, 4), want.scale, "dynamic_scale")


def common_context(case: Case) -> Context:
    return Context(
        *common_area(
            num_attention_ranks=case.A,
            micro_batches=case.M,
            batch_size=case.BS,
            selected_experts=case.K,
            experts=case.expert_num,
            attn_to_ffn_token_size=case.HS,
            ffn_to_attn_token_size=case.HS,
            schedule_mode=0,
        )
    )


def batch(case: Case, ctx: Context, need_schedule: int) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.ops.afd.npu_ffn_worker_batching(
            ctx.tensor,
            case.expert_num,
            [case.A, case.BS, case.K, case.H],
            token_dtype=case.token_dtype,
            need_schedule=need_schedule,
            layer_num=1,
        )
    )


# -- NORM (need_schedule = 0) -----------------------------------------------------------------
@pytest.mark.parametrize("token_info", ["none", "holder"])
@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.line}-{r.name}") for r in NORM_ROWS])
def test_hicann_norm_row(row: Row, token_info: str) -> None:
    """See the module docstring for the two token_info variants."""
    case = build_case(row)
    out_num = case.ids.shape[0]
    capacity = np.zeros((case.A, case.BS, case.K), dtype=np.int32)
    capacity[:out_num] = case.ids
    data = torch.from_numpy(case.data.copy())
    sessions = torch.from_numpy(case.session_ids.copy())
    mbs = torch.from_numpy(case.micro_batch_ids.copy())
    experts = torch.from_numpy(capacity.copy())
    info = torch.full((case.A, case.M, 2 + case.BS * case.K), INT32_MAX, dtype=torch.int32)
    info[:, :, :2] = 0
    buffers = (data, sessions, mbs, experts, info)
    before = [tensor_bytes(b).copy() for b in buffers]
    with registered(*buffers) as (data_at, sessions_at, mbs_at, experts_at, info_at):
        ctx = common_context(case)
        if token_info == "holder":
            ctx.put(FFN_INFO_BUF, info_at)
            ctx.put(FFN_INFO_BUF_SIZE, info.numel() * 4)
        ctx.put_all(
            (FFN_DATA_BUF, data_at),
            (FFN_DATA_BUF_SIZE, case.data.nbytes),
            (FFN_SESSION_IDS_BUF, sessions_at),
            (FFN_SESSION_IDS_BUF_SIZE, 4 * case.A),
            (FFN_MICRO_BATCH_IDS_BUF, mbs_at),
            (FFN_MICRO_BATCH_IDS_BUF_SIZE, 4 * case.A),
            (FFN_EXPERT_IDS_BUF, experts_at),
            (FFN_EXPERT_IDS_BUF_SIZE, capacity.nbytes),
            (FFN_OUT_NUM, out_num),
        )
        ctx_before = ctx.snapshot()
        outputs = batch(case, ctx, need_schedule=0)

    want = expected_outputs(case, case.ids, case.session_ids, case.micro_batch_ids)
    assert want.n == case.ids.size  # every published NORM id of these rows is valid
    assert_outputs(outputs, case, want)
    assert_context(ctx.tensor, ctx_before)  # NORM changes nothing
    for buffer, old in zip(buffers, before, strict=True):
        assert np.array_equal(tensor_bytes(buffer).reshape(-1), old.reshape(-1))


# -- RECV (need_schedule = 1) -----------------------------------------------------------------
def token_info_of(case: Case) -> np.ndarray:
    """[A, M, 2 + BS*K] int32 descriptors {flag 1, layer 0, ids}, as the golden fills them."""
    info = np.zeros((case.A, case.M, 2 + case.BS * case.K), dtype=np.int32)
    info[:, :, 0] = 1
    info[:, :, 2:] = case.ids.reshape(case.A, case.M, -1)
    return info


def run_recv(case: Case, polling_index: int) -> None:
    info_np = token_info_of(case)
    data = torch.from_numpy(case.data.copy())
    info = torch.from_numpy(info_np.copy())
    with registered(data, info) as (data_at, info_at):
        ctx = common_context(case)
        ctx.put_all(
            (FFN_DATA_BUF, data_at),
            (FFN_DATA_BUF_SIZE, case.data.nbytes),
            (FFN_INFO_BUF, info_at),
            (FFN_INFO_BUF_SIZE, info_np.nbytes),
            (FFN_POLLING_INDEX, polling_index),
        )
        ctx_before = ctx.snapshot()
        outputs = batch(case, ctx, need_schedule=1)

    m = polling_index
    want = expected_outputs(
        case, case.ids[:, m], np.arange(case.A, dtype=np.int32), np.full(case.A, m, np.int32)
    )
    assert_outputs(outputs, case, want)
    # the kernel consumed micro-batch m: ids INT32_MAX, flag 0, layer kept; others untouched
    consumed = info_np.copy()
    consumed[:, m, 0] = 0
    consumed[:, m, 2:] = INT32_MAX
    assert np.array_equal(info.numpy(), consumed)
    assert np.array_equal(tensor_bytes(data).reshape(-1), case.data.reshape(-1))
    assert_context(ctx.tensor, with_fields(ctx_before, (FFN_POLLING_INDEX, (m + 1) % case.M)))


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.line}-{r.name}") for r in RECV_ROWS])
def test_hicann_recv_row(row: Row) -> None:
    case = build_case(row)
    assert case.M == 1
    run_recv(case, polling_index=0)


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.line}-{r.name}") for r in RECV_ROWS])
def test_hicann_recv_row_polls_and_wraps(row: Row) -> None:
    """Ours, beside the CSV: the same rows with M = 3, every micro-batch flagged and holding
    its own ids, polling index 2: only micro-batch 2 is taken, and the index wraps to 0
    (with the CSV's M = 1 the advance (m + 1) % M is invisible)."""
    case = build_case(row, micro_batches=3)
    run_recv(case, polling_index=2)


# -- op-plugin test_npu_ffn_worker_batching ---------------------------------------------------
OP_A, OP_M, OP_BS, OP_K, OP_H, OP_EXPERTS = 4, 1, 54, 9, 7168, 2
OP_HS = align512(OP_H + 4)  # 7680: int8 values, float32 scale, padding to 512


@pytest.mark.parametrize("schedule_mode", [0, 1])
def test_op_plugin_batching(schedule_mode: int) -> None:
    """A=4, M=1, BS=54, K=9 (8 routed + 1 shared), H=7168, expert_num=2, int8 (token size
    7680), need_schedule=1, no masked ids, context built by hand with absolute addresses.

    op-plugin writes schedule_mode = 1 into this FFN-side context; the batching kernel never
    reads schedule_mode, and neither does the reference, so both 0 (what an FFN context
    holds) and op-plugin's 1 are run. The attention area and the control area's "wait
    buffers" hold op-plugin's dummy values (0x1000...), which no batching path may touch.
    """
    rng = rng_for("op-plugin test_npu_ffn_worker_batching_001")
    slots = (OP_A, OP_M, OP_BS, OP_K)
    q = rng.integers(-10, 10, size=(*slots, OP_H)).astype(np.int8)  # [-10, 10)
    scale = rng.uniform(0.1, 2.0, size=slots).astype(np.float32)
    data_np = np.zeros((*slots, OP_HS), dtype=np.uint8)
    data_np[..., :OP_H] = q.view(np.uint8)
    data_np[..., OP_H : OP_H + 4] = scale.view(np.uint8).reshape(*slots, 4)
    ids = rng.integers(0, OP_EXPERTS, size=(OP_A, OP_M, OP_BS * OP_K)).astype(np.int32)
    info_np = np.zeros((OP_A, OP_M, 2 + OP_BS * OP_K), dtype=np.int32)
    info_np[:, :, 0] = 1  # descriptor index % M == current micro-batch 0: all of them
    info_np[:, :, 2:] = ids

    data = torch.from_numpy(data_np.copy())
    info = torch.from_numpy(info_np.copy())
    sessions = torch.arange(OP_A, dtype=torch.int32)
    mbs = torch.zeros(OP_M, dtype=torch.int32)  # op-plugin sizes this one by M
    with registered(data, info, sessions, mbs) as (data_at, info_at, sessions_at, mbs_at):
        ctx = Context(
            *common_area(
                num_attention_ranks=OP_A,
                micro_batches=OP_M,
                batch_size=OP_BS,
                selected_experts=OP_K,
                experts=OP_EXPERTS,
                attn_to_ffn_token_size=OP_HS,
                ffn_to_attn_token_size=512,
                schedule_mode=schedule_mode,
            ),
            *OP_PLUGIN_WAIT_BUFS,
            (ATTN_INFO_BUF, 0x4000),
            (ATTN_INFO_BUF_SIZE, 1024),
            (ATTN_DATA_BUF, 0x5000),
            (ATTN_DATA_BUF_SIZE, 2048),
            (ATTN_MICRO_BATCH_ID, 1),
            (FFN_INFO_BUF, info_at),
            (FFN_INFO_BUF_SIZE, info_np.nbytes),
            (FFN_DATA_BUF, data_at),
            (FFN_DATA_BUF_SIZE, data_np.nbytes),
            (FFN_SESSION_IDS_BUF, sessions_at),
            (FFN_SESSION_IDS_BUF_SIZE, 4 * OP_A),
            (FFN_MICRO_BATCH_IDS_BUF, mbs_at),
            (FFN_MICRO_BATCH_IDS_BUF_SIZE, 4 * OP_M),
            (FFN_POLLING_INDEX, 0),
            (FFN_OUT_NUM, OP_A),
        )  # expert_ids_buf stays 0 for need_schedule = 1, as op-plugin leaves it
        ctx_before = ctx.snapshot()
        outputs = torch.ops.afd.npu_ffn_worker_batching(
            ctx.tensor, OP_EXPERTS, [OP_A, OP_BS, OP_K, OP_H], token_dtype=2, need_schedule=1
        )
    y, group_list, s_out, mb_out, t_out, k_out, scale_out, actual = outputs

    # op-plugin's golden: stable sort of the flat (a, bs, k) ids; y = every slot's H int8
    # values in that order; it compares y only (int8: exact). No id is masked, so all Y rows
    # are valid and op-plugin's "whole y" compare is the kernel's prefix compare.
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    rows = OP_A * OP_BS * OP_K
    a, bs, k = order // (OP_BS * OP_K), order % (OP_BS * OP_K) // OP_K, order % OP_K
    want_y = q[a, 0, bs, k]
    assert y.dtype == torch.int8 and tuple(y.shape) == (rows, OP_H)
    assert np.array_equal(y.numpy(), want_y)
    # the other outputs, by the kernel's semantics (op-plugin does not compare them)
    assert actual.tolist() == [rows]
    counts = np.bincount(flat, minlength=OP_EXPERTS)
    assert group_list.tolist() == [[e, int(counts[e])] for e in range(OP_EXPERTS)]
    assert s_out.tolist() == a.tolist()
    assert mb_out.tolist() == [0] * rows
    assert t_out.tolist() == bs.tolist()
    assert k_out.tolist() == k.tolist()
    assert_same_bytes(tensor_bytes(scale_out), scale[a, 0, bs, k], "dynamic_scale")
    # RECV consumed micro-batch 0 and (M = 1) polls it again next
    assert np.array_equal(info.numpy()[:, :, 0], np.zeros((OP_A, OP_M), np.int32))
    assert (info.numpy()[:, :, 2:] == INT32_MAX).all()
    assert_context(ctx.tensor, with_fields(ctx_before, (FFN_POLLING_INDEX, 0)))
