"""`afd-dispatch plan`: shapes read from published configs, the formulas, the search, the
calibration against published A3 results, and the command.

`tests/data/deepseek_v3/config.json` and `tests/data/qwen3_235b_a22b/config.json` are the
config.json files published with deepseek-ai/DeepSeek-V3 and Qwen/Qwen3-235B-A22B. Expected
numbers below are worked out from those configs and from the formulas in docs/planner.md,
not read back from the planner.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDInputError
from afd_dispatch.layout import WindowLayout, align512
from afd_dispatch.planner import cli as plan_cli
from afd_dispatch.planner.calibration import (
    calibrate,
    fit_overheads,
    load_data,
    log_error,
    mean_context,
)
from afd_dispatch.planner.cost import active_experts, evaluate
from afd_dispatch.planner.ep import evaluate_ep
from afd_dispatch.planner.hardware import FIGURE_NAMES, HardwareProfile
from afd_dispatch.planner.memory import KV_BLOCK_TOKENS, kv_cache_tokens
from afd_dispatch.planner.search import RATIOS, Target, search
from afd_dispatch.planner.shape import AFDLayout, ModelShape, Precision, Workload
from afd_dispatch.runtime.deployment import Deployment

DATA = Path(__file__).parent / "data"
DSV3 = DATA / "deepseek_v3"
QWEN3 = DATA / "qwen3_235b_a22b"
A3 = HardwareProfile.load("atlas_a3")
INT8 = Precision(weights="int8", a2f="int8", kv="bf16")
BF16 = Precision()


@pytest.fixture(scope="module")
def dsv3() -> ModelShape:
    return ModelShape.from_pretrained(DSV3)


@pytest.fixture(scope="module")
def qwen3() -> ModelShape:
    return ModelShape.from_pretrained(QWEN3 / "config.json")


# -- shapes ---------------------------------------------------------------------------------
def test_deepseek_v3_shape_from_its_config(dsv3: ModelShape) -> None:
    cfg = json.loads((DSV3 / "config.json").read_text())
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    assert dsv3.num_moe_layers == cfg["num_hidden_layers"] - cfg["first_k_dense_replace"] == 58
    assert dsv3.num_dense_layers == 3
    att = dsv3.attention
    assert att.kind == "mla" and att.index_topk == 0
    assert att.kv_elems_per_token == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    by_hand = (
        h * cfg["q_lora_rank"]
        + cfg["q_lora_rank"] * heads * qk
        + h * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
        + cfg["kv_lora_rank"] * heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"])
        + heads * cfg["v_head_dim"] * h
    )
    assert att.params(h) == by_hand
    assert dsv3.expert_params == 3 * 7168 * 2048
    assert dsv3.moe.num_shared_experts == 1 and dsv3.moe.shared_intermediate_size == 2048
    # MLA reads its 576-element latent per token: 16K tokens in bf16
    assert att.kv_bytes_read(16384, 2) == 16384 * 576 * 2


def test_qwen3_235b_shape_from_its_config(qwen3: ModelShape) -> None:
    att = qwen3.attention
    assert att.kind == "gqa" and (att.num_heads, att.num_kv_heads, att.head_dim) == (64, 4, 128)
    assert att.kv_elems_per_token == 2 * 4 * 128
    assert att.params(4096) == 2 * 4096 * 64 * 128 + 2 * 4096 * 4 * 128
    assert qwen3.num_moe_layers == 94 and qwen3.num_dense_layers == 0
    assert qwen3.moe.num_shared_experts == 0 and qwen3.shared_params == 0
    assert qwen3.kv_elems_per_token == 94 * 1024


def test_dsa_reads_top_k_tokens_and_every_indexer_key() -> None:
    shape = ModelShape.from_hf_config(load_data()["model_config"])
    att = shape.attention
    assert (att.index_topk, att.index_head_dim) == (2048, 128)
    assert att.kv_bytes_read(16384, 2) == (2048 * 576 + 16384 * 128) * 2
    assert att.kv_bytes_read(1000, 2) == (1000 * 576 + 1000 * 128) * 2  # short: all tokens
    # doubling the context less than doubles what DSA reads (the top-k part is fixed) ...
    assert att.kv_bytes_read(32768, 2) < 2 * att.kv_bytes_read(16384, 2)
    # ... while dense MLA reads exactly twice as much
    v3 = dataclasses.replace(att, index_topk=0, index_head_dim=0, index_n_heads=0)
    assert v3.kv_bytes_read(32768, 2) == 2 * v3.kv_bytes_read(16384, 2)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(AFDInputError, match="model_type"):
        ModelShape.from_hf_config({"model_type": "llama", "hidden_size": 4096})


# -- formulas --------------------------------------------------------------------------------
def test_active_experts_formula() -> None:
    # 8 of 256 experts per token: one token leaves an expert idle with probability 31/32
    assert active_experts(16, 256, 8, 1) == pytest.approx(16 * (1 - 31 / 32))
    assert active_experts(16, 256, 8, 10_000) == pytest.approx(16)
    counts = [active_experts(16, 256, 8, t) for t in (1, 4, 16, 64, 256)]
    assert counts == sorted(counts) and counts[-1] < 16


def test_workload_mean_context() -> None:
    assert Workload.decode(8192, 1024).mean_context == 8192 - 512
    with pytest.raises(AFDInputError, match="output_len"):
        Workload.decode(1024, 1024)
    # uniform output lengths: the closed form against a direct average over every request
    lo, hi, inp = 512, 1536, 16384
    positions = sum(sum(inp + j for j in range(n)) for n in range(lo, hi + 1))
    steps = sum(range(lo, hi + 1))
    assert mean_context(inp, lo, hi) == pytest.approx(positions / steps, abs=1.0)


def test_one_micro_batch_is_the_sum_of_the_phases(dsv3: ModelShape) -> None:
    work = Workload.decode(8192, 1024)
    one = evaluate(dsv3, A3, INT8, work, AFDLayout(32, 16, 1, 32))
    b = one.budget
    assert b.period == pytest.approx(sum(p.seconds for p in b.phases))
    two = evaluate(dsv3, A3, INT8, work, AFDLayout(32, 16, 2, 32))
    b2 = two.budget
    assert b2.period == max(b2.attention_busy, b2.ffn_busy, b2.round_trip)
    assert b2.period >= b2.round_trip
    # a second micro-batch overlaps: less than twice the single one's layer time
    assert b2.period < 2 * b.period
    # throughput per die is A * M * BS tokens per step over A + F dies
    assert two.throughput_per_die == pytest.approx(32 * 2 * 32 / two.step_s / 48)
    assert two.ffn_tokens_per_step == 32 * 2 * 32 / 16


def test_a2f_row_bytes_follow_the_window_layout(dsv3: ModelShape) -> None:
    work = Workload.decode(4096)
    lay = AFDLayout(16, 16, 1, 64)
    bf16 = evaluate(dsv3, A3, BF16, work, lay)
    int8 = evaluate(dsv3, A3, dataclasses.replace(BF16, a2f="int8"), work, lay)
    # int8 slots are align512(H + 4) bytes instead of align512(2H): less to send, smaller windows
    assert int8.budget.a2f.seconds < bf16.budget.a2f.seconds
    assert int8.hccl_buffsize_mb < bf16.hccl_buffsize_mb
    assert int8.budget.f2a.seconds == bf16.budget.f2a.seconds  # results come back in bf16


def test_more_hbm_bandwidth_makes_attention_faster(dsv3: ModelShape) -> None:
    work = Workload.decode(16384, 1024)
    lay = AFDLayout(48, 16, 2, 16)
    base = evaluate(dsv3, A3, INT8, work, lay)
    fast = evaluate(dsv3, A3.with_values(hbm_bandwidth_gbs=3200.0), INT8, work, lay)
    assert fast.budget.attention.seconds < base.budget.attention.seconds
    assert fast.tpot_s <= base.tpot_s
    assert fast.throughput_per_die >= base.throughput_per_die


def test_longer_context_costs_attention_time_and_batch(dsv3: ModelShape) -> None:
    lay = AFDLayout(48, 16, 2, 16)
    short = evaluate(dsv3, A3, INT8, Workload.decode(4096), lay)
    long = evaluate(dsv3, A3, INT8, Workload.decode(32768), lay)
    assert long.budget.attention.seconds > short.budget.attention.seconds
    assert long.attention_memory_gb > short.attention_memory_gb
    assert long.budget.ffn.seconds == short.budget.ffn.seconds  # experts do not see context


# -- HCCL_BUFFSIZE: the planner and the runtime agree -------------------------------------------
@pytest.mark.parametrize(("path", "precision"), [(DSV3, INT8), (QWEN3, BF16)])
def test_hccl_buffsize_matches_window_layout_and_runtime(path: Path, precision: Precision) -> None:
    shape = ModelShape.from_pretrained(path)
    result = search(shape, A3, precision, Workload.decode(8192, 1024), Target(), fixed=(48, 16))
    plan = result.best
    assert plan is not None
    lay = plan.layout
    a, bs, k, h = lay.num_attention_ranks, lay.tokens, shape.moe.topk, shape.hidden
    shared = max(plan.shared_slots, 1)  # A3's combine: one shared slot, a null one if none
    e = k + shared
    # A3 slot strides: align512(H + 4) int8 bytes, or align512(2H) bytes of bf16
    hs, elem = (align512(h + 4), 1) if precision.a2f == "int8" else (align512(2 * h) // 2, 2)
    # the A3 host check of the spec, for one window group (M = 1 per group on A3)
    by_hand = (a * (2 + bs * e) * 4 + a * bs * e * hs * elem) // 2**20 + 1
    layout = WindowLayout(
        a, 1, bs, k, shared, h, torch.bfloat16, precision.a2f == "int8", hs * elem
    )
    assert plan.hccl_buffsize_mb == layout.hccl_buffsize_mb == by_hand
    # the runtime accepts the planned config, and refuses one MB less
    config = AFDConfig.from_json(json.dumps(plan.afd_config()))
    deployment = Deployment(config, shape.moe)
    assert deployment.layout.hccl_buffsize_mb == plan.hccl_buffsize_mb
    tight = dataclasses.replace(config, hccl_buffsize_mb=plan.hccl_buffsize_mb - 1)
    with pytest.raises(AFDInputError, match="HCCL_BUFFSIZE"):
        Deployment(tight, shape.moe)


# -- the search ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "precision", "tpot_ms"), [(DSV3, INT8, 100.0), (QWEN3, BF16, 60.0)]
)
def test_plan_answers_for_deepseek_v3_and_qwen3(
    path: Path, precision: Precision, tpot_ms: float
) -> None:
    shape = ModelShape.from_pretrained(path)
    result = search(shape, A3, precision, Workload.decode(8192, 1024), Target(tpot_s=tpot_ms / 1e3))
    best = result.best
    assert best is not None and best.fits
    lay = best.layout
    assert 1 <= lay.micro_batches <= 3 and 1 <= lay.tokens <= 512
    ratio = lay.num_attention_ranks / lay.num_ffn_ranks
    assert min(RATIOS) * 0.9 <= ratio <= max(RATIOS) * 1.1
    assert lay.dies <= 768
    assert 0 < best.tpot_s <= tpot_ms / 1e3
    numbers = [best.throughput_per_die, best.ffn_tokens_per_step, best.step_s]
    assert all(math.isfinite(x) and x > 0 for x in numbers)
    # FFN dies hold every routed expert: F_r dies times experts per die cover N
    assert lay.routed_dies * best.experts_per_ffn_die >= shape.moe.num_experts
    # nothing in the candidate list beats the chosen one by more than the tie margin
    assert all(c.throughput_per_die <= best.throughput_per_die * 1.06 for c in result.candidates)
    assert all(c.tpot_s <= tpot_ms / 1e3 for c in result.candidates)


def test_larger_tpot_target_never_shrinks_the_batch(qwen3: ModelShape) -> None:
    work = Workload.decode(8192, 1024)
    found = []
    for tpot_ms in (70.0, 100.0, 150.0, 300.0):
        r = search(
            qwen3, A3, BF16, work, Target(tpot_s=tpot_ms / 1e3), fixed=(32, 16), micro_batches=(2,)
        )
        assert r.best is not None
        found.append((r.best.layout.tokens, r.best.throughput_per_die, r.best.tpot_s))
    bs = [x[0] for x in found]
    assert bs == sorted(bs) and bs[0] < bs[-1]
    assert [x[1] for x in found] == sorted(x[1] for x in found)


def test_throughput_target_picks_the_smallest_batch_reaching_it(qwen3: ModelShape) -> None:
    work = Workload.decode(8192, 1024)
    most = search(qwen3, A3, BF16, work, Target(), fixed=(32, 16), micro_batches=(2,)).best
    assert most is not None
    goal = most.throughput_per_die / 2
    r = search(
        qwen3, A3, BF16, work, Target(throughput_per_die=goal), fixed=(32, 16), micro_batches=(2,)
    )
    plan = r.best
    assert plan is not None and plan.throughput_per_die >= goal
    assert plan.tpot_s < most.tpot_s
    below = evaluate(
        qwen3, A3, BF16, work, dataclasses.replace(plan.layout, tokens=plan.layout.tokens - 1)
    )
    assert below.throughput_per_die < goal


def test_impossible_target_gives_no_plan(dsv3: ModelShape) -> None:
    r = search(dsv3, A3, INT8, Workload.decode(8192), Target(tpot_s=1e-3), fixed=(16, 16))
    assert r.best is None and r.fastest is not None
    assert r.fastest.tpot_s > 1e-3


def test_memory_bounds_the_batch(dsv3: ModelShape) -> None:
    r = search(dsv3, A3, INT8, Workload.decode(65536), Target(), fixed=(32, 16), micro_batches=(1,))
    plan = r.best
    assert plan is not None and plan.fits and plan.layout.tokens < 512
    over = evaluate(
        dsv3,
        A3,
        INT8,
        Workload.decode(65536),
        dataclasses.replace(plan.layout, tokens=plan.layout.tokens + 1),
    )
    assert not over.fits


# -- memory ------------------------------------------------------------------------------------
def _published(case: dict, data: dict) -> tuple[ModelShape, Precision, Workload]:
    """The shape, precision and workload of one published case, from the data file."""
    shape = ModelShape.from_hf_config(data["model_config"])
    lo, hi, inp = case["output_len_min"], case["output_len_max"], case["input_len"]
    return shape, Precision(**data["precision"]), Workload(inp + hi, mean_context(inp, lo, hi))


def test_kv_cache_holds_the_running_sequences_tokens() -> None:
    work = Workload.decode(8192, 1024)  # sequences between 7168 and 8192 tokens: 7680 mean
    assert KV_BLOCK_TOKENS == 128  # vllm-ascend's default block size
    assert kv_cache_tokens(work, 10) == 10 * (7680 + 128)
    # never less than one sequence of the whole context (vLLM's start-up requirement)
    assert kv_cache_tokens(Workload.decode(8192, 8000), 1) == 8192


def test_memory_terms_of_a_published_afd_case_by_hand() -> None:
    data = load_data()
    case = next(c for c in data["cases"] if c["name"] == "16K 48A16F")
    shape, precision, work = _published(case, data)
    cfg = data["model_config"]
    h, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    m, bs = case["micro_batches"], case["batch_per_die"] // case["micro_batches"]
    plan = evaluate(
        shape,
        A3,
        precision,
        work,
        AFDLayout(case["num_attention_ranks"], case["num_ffn_ranks"], m, bs),
        weight_split="ffn",
    )
    att, ffn = plan.attention_memory, plan.ffn_memory
    windows = m * plan.hccl_buffsize_mb * 2**20
    # attention die: the attention layers at 1 byte (W8A8), embedding + lm_head in bf16, the
    # KV pool of M * BS sequences at the mean context plus one block: 512 + 64 latent and
    # 128 indexer elements per token and layer in bf16
    assert att.weights == layers * shape.attention.params(h)
    assert att.embedding == 2 * v * h * 2
    per_token = layers * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] + cfg["index_head_dim"])
    assert per_token == 61 * (512 + 64 + 128)
    lo, hi = case["output_len_min"], case["output_len_max"]
    tokens = m * bs * (case["input_len"] + mean_context(0, lo, hi) + 128)
    assert att.kv_cache == pytest.approx(tokens * per_token * 2)
    assert att.windows == windows
    # FFN die (afd-plugin's split): 256 / 16 routed experts, router, shared expert and the
    # dense layers' MLPs at 1 byte, embedding + lm_head in bf16, no KV cache
    moe, dense = layers - cfg["first_k_dense_replace"], cfg["first_k_dense_replace"]
    expert = 3 * h * cfg["moe_intermediate_size"]
    by_hand = (
        16 * expert * moe + moe * (256 * h + expert) + dense * 3 * h * cfg["intermediate_size"]
    )
    assert ffn.weights == by_hand
    assert ffn.embedding == 2 * v * h * 2 and ffn.kv_cache == 0 and ffn.windows == windows
    # usable: 61.27 GiB a die's runtime can allocate, 0.9 of it (the profile), 3 GB reserved
    assert plan.usable_memory_gb == pytest.approx(65.79 * 0.9 - 3)


def test_weight_split_moves_only_the_non_routed_mlp_weights(dsv3: ModelShape) -> None:
    work = Workload.decode(8192, 1024)
    lay = AFDLayout(32, 16, 2, 8)
    ours = evaluate(dsv3, A3, INT8, work, lay)  # runtime layout: shared expert on attention
    split = evaluate(dsv3, A3, INT8, work, lay, weight_split="ffn")
    moved = dsv3.num_moe_layers * (dsv3.router_params + dsv3.shared_params)
    moved += dsv3.num_dense_layers * 3 * dsv3.hidden * dsv3.dense_intermediate_size
    assert ours.attention_memory.weights - split.attention_memory.weights == moved
    assert split.ffn_memory.weights - ours.ffn_memory.weights == moved
    assert split.ffn_memory.embedding == ours.attention_memory.embedding > 0
    assert ours.ffn_memory.embedding == 0
    assert split.attention_memory.kv_cache == ours.attention_memory.kv_cache
    assert split.tpot_s == ours.tpot_s  # the split is a memory question only
    with pytest.raises(AFDInputError, match="weight_split"):
        evaluate(dsv3, A3, INT8, work, lay, weight_split="attention")
    with pytest.raises(AFDInputError, match="shared_dies"):
        evaluate(dsv3, A3, INT8, work, AFDLayout(32, 16, 2, 8, 2), weight_split="ffn")


def test_every_published_configuration_fits() -> None:
    data = load_data()
    rows = calibrate(A3, data)
    assert [r.name for r in rows] == [c["name"] for c in data["cases"]]
    for r in rows:
        assert r.fits and 0 < r.memory_gb <= r.usable_memory_gb, (r.name, r.memory_gb)
    # at the published runs' own setting: 0.93 of what the runtime can allocate, 3 GB reserved
    assert data["memory_utilization"] == 0.93
    assert rows[0].usable_memory_gb == pytest.approx(65.79 * 0.93 - 3)


def test_published_batches_sit_near_the_memory_limit() -> None:
    """Not a permissive check: half as many sequences again as each published run (its
    attention or EP die's batch times 1.5) no longer fits."""
    data = load_data()
    for case in data["cases"]:
        bigger = dict(case, batch_per_die=case["batch_per_die"] * 3 // 2)
        (row,) = calibrate(A3, dict(data, cases=[bigger]))
        assert not row.fits, (case["name"], row.memory_gb, row.usable_memory_gb)


def test_impossible_configurations_do_not_fit(dsv3: ModelShape) -> None:
    work = Workload.decode(8192, 1024)
    # every routed expert of DeepSeek-V3 in bf16 on one FFN die: 256 * 58 * 3 * H * I * 2 B
    one = evaluate(dsv3, A3, BF16, work, AFDLayout(1, 1, 1, 1))
    assert one.ffn_memory_gb > 1300 and not one.fits
    # the whole model on one die (colocated, bf16)
    assert not evaluate_ep(dsv3, A3, BF16, work, dies=1, tokens=1).fits
    # a KV cache far over capacity: 512 sequences of 128K tokens on one attention die
    long = Workload.decode(131072, 1024)
    kv = evaluate(dsv3, A3, INT8, long, AFDLayout(64, 16, 1, 512))
    assert kv.attention_memory.kv_cache / 1e9 > 50 * A3.hbm_capacity_gb
    assert not kv.fits


# -- calibration -------------------------------------------------------------------------------
def test_calibration_data_names_its_sources() -> None:
    data = load_data()
    assert "afd-plugin" in data["source"]
    names = [c["name"] for c in data["cases"]]
    assert {"16K EP64", "16K 64A16F", "32K EP64", "32K 64A16F"} <= set(names)


def test_calibrated_model_is_within_fifteen_percent_of_published() -> None:
    rows = calibrate(A3)
    assert len(rows) == 6
    for r in rows:
        assert 0.85 <= r.ratio <= 1.15, (r.name, r.ratio)
        assert r.roofline > r.published  # the bare roofline is optimistic everywhere
    geo = math.exp(sum(math.log(r.ratio) for r in rows) / len(rows))
    assert 0.97 <= geo <= 1.03


def test_shipped_overheads_are_the_fit() -> None:
    fit = fit_overheads(A3)
    assert fit.layer_overhead_us == pytest.approx(A3.layer_overhead_us, abs=2.0)
    assert fit.sequence_overhead_us == pytest.approx(A3.sequence_overhead_us, abs=2.0)
    assert log_error(calibrate(A3)) <= fit.error * 1.05


def test_ep_baseline_uses_the_same_formulas(dsv3: ModelShape) -> None:
    work = Workload.decode(8192)
    ep = evaluate_ep(dsv3, A3, INT8, work, dies=64, tokens=16)
    b = ep.budget
    assert ep.period == pytest.approx(b.round_trip)  # one micro-batch: the phases add up
    assert ep.throughput_per_die == pytest.approx(16 / ep.step_s)


# -- hardware profile --------------------------------------------------------------------------
def test_profile_figures_carry_sources_and_estimate_flags() -> None:
    figures = dict(A3.figures)
    assert set(figures) == set(FIGURE_NAMES)
    assert all(f.source for f in figures.values())
    assert not figures["hbm_bandwidth_gbs"].estimate and figures["message_latency_us"].estimate
    # HBM a die's runtime can allocate: torch_npu reports 61.27 GiB of the die's 64 GiB
    assert A3.hbm_capacity_gb == pytest.approx(61.27 * 2**30 / 1e9, abs=0.01)
    assert (
        not figures["hbm_capacity_gb"].estimate and "61.27 GiB" in figures["hbm_capacity_gb"].source
    )
    assert A3.usable_hbm_bytes == pytest.approx((65.79 * 0.9 - 3) * 1e9)
    assert A3.hbm_bytes_per_s == pytest.approx(1600e9 * A3.hbm_efficiency)
    changed = A3.with_values(hbm_bandwidth_gbs=3200.0)
    assert changed.hbm_bandwidth_gbs == 3200.0
    assert dict(changed.figures)["hbm_bandwidth_gbs"].estimate
    with pytest.raises(AFDInputError, match="hardware figure"):
        A3.with_values(tflops=1.0)


def test_profile_file_missing_a_figure_is_refused(tmp_path: Path) -> None:
    raw = json.loads((Path(plan_cli.__file__).parent / "profiles" / "atlas_a3.json").read_text())
    del raw["figures"]["int8_tops"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(AFDInputError, match="int8_tops"):
        HardwareProfile.load(str(path))


# -- the command -------------------------------------------------------------------------------
def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = plan_cli.main(
        [
            str(DSV3),
            "--context",
            "8192",
            "--output-len",
            "1024",
            "--tpot-ms",
            "100",
            "--weights",
            "int8",
            "--a2f",
            "int8",
            "--af",
            "64:16",
            "--json",
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    best = doc["best"]
    assert (best["num_attention_ranks"], best["num_ffn_ranks"]) == (64, 16)
    assert best["tpot_ms"] <= 100
    assert best["afd_config"]["hccl_buffsize_mb"] == best["hccl_buffsize_mb"]
    assert best["afd_config"]["quant_mode"] == "int8"


def test_cli_text_and_calibration(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_cli.main([str(QWEN3), "--af", "32:16", "--micro-batches", "2"]) == 0
    text = capsys.readouterr().out
    for word in ("A:F", "HCCL_BUFFSIZE", "TPOT", "tokens/s/die", "attention", "a2f", "f2a"):
        assert word in text
    assert plan_cli.main(["--calibrate"]) == 0
    text = capsys.readouterr().out
    assert "16K 64A16F" in text and "258.9" in text


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_cli.main([str(DSV3), "--af", "64x16"]) == 2
    assert "--af" in capsys.readouterr().err
    assert plan_cli.main(["--hardware", "no_such_profile", str(DSV3)]) == 2
    assert plan_cli.main([]) == 2
