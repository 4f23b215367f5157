"""`afd-dispatch bench`: every level runs on its small shape and reports well-formed numbers.

No speed is asserted (benchmarks are scripts, not timed tests), nor any memory bound: the
checks are that every number is positive and finite where it must be, that each headline
is computed from the measured numbers printed beside it, that pass/fail follows the
target, that the JSON has the documented schema and that the PNG is a PNG image.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from afd_dispatch import cli
from afd_dispatch.bench import memory, ops
from afd_dispatch.bench.report import SCHEMA, Report, Row, Target, process_memory
from afd_dispatch.layout import WindowLayout

REL = 1e-9  # headlines are recomputed from the JSON's metrics: only float rounding differs


def run_level(
    level: str,
    tmp_path: Path,
    repeat: int,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`afd-dispatch bench --level LEVEL --shape small [EXTRA]` through the real CLI; its
    JSON."""
    json_path, png_path = tmp_path / f"{level}.json", tmp_path / f"{level}.png"
    argv = ["bench", "--level", level, "--shape", "small", "--repeat", str(repeat), *extra]
    assert cli.main([*argv, "--json", str(json_path), "--png", str(png_path)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(json_path.read_text())
    check_schema(data, level, repeat)
    check_png(png_path)
    for row in data["rows"]:  # the terminal table shows every case and its headline
        assert row["name"] in printed
    assert f"--level {level} --shape small" in printed
    return data


def check_schema(data: dict[str, Any], level: str, repeat: int) -> None:
    assert data["schema"] == SCHEMA
    assert (data["level"], data["shape"], data["repeat"]) == (level, "small", repeat)
    assert isinstance(data["context"], dict) and data["context"]["cpus"] >= 1
    assert isinstance(data["notes"], list) and all(isinstance(n, str) for n in data["notes"])
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert set(row) == {"name", "value", "unit", "description", "metrics", "target", "pass"}
        assert isinstance(row["name"], str) and row["name"]
        assert isinstance(row["unit"], str) and row["unit"]
        assert isinstance(row["description"], str) and row["description"]
        assert is_number(row["value"]), row
        assert all(isinstance(k, str) and is_number(v) for k, v in row["metrics"].items()), row
        if row["target"] is None:
            assert row["pass"] is None
        else:
            assert set(row["target"]) == {"op", "bound"}
            target = Target(row["target"]["op"], row["target"]["bound"])
            assert row["pass"] is target.met(row["value"]), row


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_png(path: Path) -> None:
    """A PNG signature, an IHDR chunk with a non-empty image, and matplotlib reads it back."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", raw[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", raw[16:24])
    assert width > 100 and height > 100
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.shape[:2] == (height, width)


def rows_by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in data["rows"]}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


def check_peak_rss(row: dict[str, Any]) -> None:
    """A `peak_rss_*` row: one process's high-water mark in MB, at least its size when read."""
    assert row["name"].startswith("peak_rss_") and row["unit"] == "MB", row
    assert row["target"] is None and row["pass"] is None, row
    assert 0 < row["metrics"]["rss_now_MB"] <= row["value"], row


def check_bench_process(rows: dict[str, dict[str, Any]], level: str) -> None:
    """Every level ends with the bench process's own peak resident set."""
    row = rows.pop("peak_rss_bench")
    check_peak_rss(row)
    assert f"--level {level}" in row["description"]


# -- the report itself ------------------------------------------------------------------------
def test_report_refuses_non_finite_numbers_and_bad_targets(tmp_path: Path) -> None:
    report = Report("ops", "small", 1, rows=[Row("x", float("nan"), "x", "broken")])
    with pytest.raises(ValueError, match="value is nan"):
        report.write_json(tmp_path / "r.json")
    with pytest.raises(ValueError, match="target op"):
        Target("==", 1.0)
    assert Target(">=", 0.7).met(0.7) and not Target(">=", 0.7).met(0.69)
    assert Target("<=", 50).met(50) and not Target("<=", 50).met(50.1)


def test_bytes_moved_follows_the_window_rows() -> None:
    plain = WindowLayout(1, 1, 64, 4, 1, 1024, torch.bfloat16)
    quant = WindowLayout(1, 1, 64, 4, 1, 1024, torch.bfloat16, quant=True)
    rows = 64 * 5
    assert ops.bytes_moved("a2f", plain, rows) == rows * 1024 * 2
    assert ops.bytes_moved("a2f_quant", quant, rows) == rows * (1024 + 128)
    assert ops.bytes_moved("batching_quant", quant, rows) == rows * (1024 + 128)
    assert ops.bytes_moved("f2a", quant, rows) == rows * 1024 * 2  # results are never int8
    assert ops.bytes_moved("combine", plain, rows) == rows * 1024 * 2
    with pytest.raises(ValueError, match="unknown op"):
        ops.bytes_moved("copy", plain, rows)


def test_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for arguments, message in (
        (["--level", "kernels"], "invalid choice"),
        (["--level", "ops", "--afd-config", "{}"], "only --level serving"),
        (["--level", "ops", "--repeat", "0"], "--repeat must be >= 1"),
        (["--level", "ops", "--memory-micro-batches", "200"], "only --level loop"),
        (["--level", "loop", "--memory-micro-batches", "201"], "positive multiple of 2"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["bench", *arguments])
        assert message in capsys.readouterr().err, arguments


def test_process_memory_reads_this_process_and_refuses_a_gone_one() -> None:
    own = process_memory()
    assert own is not None and 0 < own.rss_mb <= own.peak_mb
    held = torch.ones(8 * 2**20, dtype=torch.uint8)  # 8 MiB, touched: resident
    after = process_memory()
    assert after is not None and after.peak_mb >= own.rss_mb + held.numel() / 1e6 * 0.9
    assert process_memory(2**22 + 1) is None  # above pid_max's default: no such process


# -- the levels -------------------------------------------------------------------------------
def test_ops_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run_level("ops", tmp_path, 2, capsys)
    rows = rows_by_name(data)
    check_bench_process(rows, "ops")
    wake = rows.pop("wake_p50_us")
    assert set(rows) == set(ops.TARGETS)
    m = wake["metrics"]
    assert wake["unit"] == "us" and wake["value"] == m["doorbell_p50_us"]
    assert 0 < m["doorbell_p50_us"] <= m["doorbell_p99_us"]
    assert 0 < m["sleep_poll_p50_us"] <= m["sleep_poll_p99_us"]
    assert wake["target"] == {"op": "<=", "bound": 50.0}
    shape = ops.SHAPES["small"]
    slot_rows = shape.tokens * (shape.topk + shape.shared)
    for name, row in rows.items():
        m = row["metrics"]
        assert row["unit"] == "x"
        assert all(m[k] > 0 for k in ("MB", "op_ms", "copy_ms", "op_GBps", "copy_GBps")), row
        assert close(row["value"], m["copy_ms"] / m["op_ms"]), row  # rate ratio = time ratio
        assert close(m["op_GBps"], m["MB"] / m["op_ms"])  # MB/ms = GB/s, row
        assert close(m["copy_GBps"], m["MB"] / m["copy_ms"]), row
        assert row["target"] == {"op": ">=", "bound": ops.TARGETS[name]}
        # every slot row of the micro-batch is moved once (all tokens active, F2A included)
        row_bytes = shape.hidden + 128 if name.endswith("quant") else shape.hidden * 2
        assert m["MB"] * 1e6 == pytest.approx(slot_rows * row_bytes), name


@pytest.mark.slow
def test_loop_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The memory case over 200 micro-batches (the bench runs 10,000)."""
    extra = ("--memory-micro-batches", "200")
    data = run_level("loop", tmp_path, 2, capsys, extra)
    rows = rows_by_name(data)
    check_bench_process(rows, "loop")
    assert set(rows) == {
        "endpoint_overhead",
        "exchange_overhead",
        "pipeline_m2",
        "pipeline_m3",
        "peak_rss_pipeline_ffn",
        "eager_call_overhead",
        "compiled_call_overhead",
        "compiled_vs_eager",
        "ffn_rss_growth",
        "ffn_py_heap_growth",
        "ffn_tensor_allocs",
        "peak_rss_memory_ffn",
    }
    endpoint, exchange = rows["endpoint_overhead"], rows["exchange_overhead"]
    m = endpoint["metrics"]
    assert endpoint["unit"] == exchange["unit"] == "us"
    assert m["in_ops_us"] > 0 and m["send_us"] > 0 and m["receive_us"] > 0 and m["no_ffn_us"] > 0
    # the host time beyond the ops is part of the wall time around them
    assert 0 < endpoint["value"] < m["wall_us"]
    assert 0 < exchange["value"] < exchange["metrics"]["wall_us"]
    assert rows["endpoint_overhead"]["target"] == {"op": "<=", "bound": 50.0}
    for depth in (2, 3):
        row = rows[f"pipeline_m{depth}"]
        m = row["metrics"]
        one, many = m["step_m1_ms"], m[f"step_m{depth}_ms"]
        assert one > 0 and many > 0 and m["attn_only_ms"] > 0 and m["experts_only_ms"] > 0
        assert close(row["value"], many / (one / 2)), row
        assert close(m["speedup"], one / many), row
        assert m.get("other_load_cores", 0.0) >= 0
        busy = (m["attn_busy_ms"], m["ffn_busy_ms"])
        assert all(b > 0 for b in busy), row
        # the floor is the busier side plus a share of the other, over the same ideal
        floor_ms = m["floor"] * one / 2
        assert max(busy) < floor_ms <= max(busy) + min(busy) / 2 + 1e-9, row
    assert rows["pipeline_m2"]["target"] == {"op": "<=", "bound": 1.2}
    m = rows["compiled_call_overhead"]["metrics"]
    assert all(m[k] > 0 for k in ("raw_ops_us", "eager_us", "compiled_us", "compile_s"))
    assert close(rows["eager_call_overhead"]["value"], m["eager_us"] - m["raw_ops_us"])
    assert close(rows["compiled_call_overhead"]["value"], m["compiled_us"] - m["raw_ops_us"])
    assert close(rows["compiled_vs_eager"]["value"], m["compiled_us"] / m["eager_us"])
    check_peak_rss(rows["peak_rss_pipeline_ffn"])
    check_memory_rows(rows, micro_batches=200, traced=200)


def check_memory_rows(rows: dict[str, dict[str, Any]], micro_batches: int, traced: int) -> None:
    """The FFN worker's memory rows: units, the headlines from their metrics, the targets.
    Growths may be negative (memory given back); sizes and counts may not."""
    rss = rows["ffn_rss_growth"]
    m = rss["metrics"]
    assert rss["unit"] == "MB" and rss["target"] == {"op": "<=", "bound": 1.0}
    assert m["rss_warm_MB"] > 0 and m["rss_end_MB"] > 0 and m["run_s"] > 0
    assert close(rss["value"], m["rss_end_MB"] - m["rss_warm_MB"])
    assert close(m["per_micro_batch_B"], rss["value"] * 1e6 / micro_batches)
    assert f"over {micro_batches} micro-batches" in rss["description"]
    heap = rows["ffn_py_heap_growth"]
    m = heap["metrics"]
    assert heap["unit"] == "kB" and heap["target"] == {"op": "<=", "bound": 64.0}
    assert close(m["per_micro_batch_B"], heap["value"] * 1e3 / traced)
    assert m["transient_kB"] > 0  # a micro-batch allocates Python objects while it runs
    assert float(m["blocks"]).is_integer() and float(m["blocks_untraced_run"]).is_integer()
    allocs = rows["ffn_tensor_allocs"]
    assert allocs["unit"] == "per micro-batch" and allocs["target"] is None
    assert allocs["value"] >= 0 and allocs["metrics"]["kB_per_micro_batch"] >= 0
    peak = rows["peak_rss_memory_ffn"]
    check_peak_rss(peak)
    assert peak["metrics"]["rss_now_MB"] == rss["metrics"]["rss_end_MB"]


def test_memory_case_refuses_a_partial_round() -> None:
    with pytest.raises(ValueError, match="multiple of 2"):
        memory.measure(micro_batches=3)
    with pytest.raises(ValueError, match="traced"):
        memory.measure(micro_batches=2, traced=0)


@pytest.mark.e2e
@pytest.mark.slow
def test_serving_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Four real vLLM servers (colocated, AFD, AFD at M = 1, AFD with two DP ranks),
    smallest request set, one round."""
    data = run_level("serving", tmp_path, 1, capsys)
    rows = rows_by_name(data)
    head = rows["afd_vs_colocated"]
    m = head["metrics"]
    assert m["colocated_tok_s"] > 0 and m["afd_tok_s"] > 0
    assert close(head["value"], m["afd_tok_s"] / m["colocated_tok_s"])
    assert m["tokens_per_round"] == 4 * 8  # every request generated max_tokens
    assert close(m["afd_tok_s"], m["tokens_per_round"] / m["afd_wall_s"])  # one round
    assert m["colocated_spread"] == m["afd_spread"] == 1.0  # fastest / slowest of one round
    assert close(m["extra_wall_s"], m["afd_wall_s"] - m["colocated_wall_s"])
    m1 = rows["afd_m1_vs_colocated"]  # one micro-batch per layer
    d1 = m1["metrics"]
    assert d1["afd_m1_tok_s"] > 0 and d1["afd_m1_spread"] == 1.0
    assert close(m1["value"], d1["afd_m1_tok_s"] / m["colocated_tok_s"])
    assert close(d1["afd_m1_vs_afd"], d1["afd_m1_tok_s"] / m["afd_tok_s"])
    assert close(d1["afd_m1_tok_s"], m["tokens_per_round"] / d1["afd_m1_wall_s"])
    dp2 = rows["afd_dp2_vs_colocated"]  # two attention ranks: vllm serve --data-parallel-size 2
    d = dp2["metrics"]
    assert d["afd_dp2_tok_s"] > 0 and d["afd_dp2_spread"] == 1.0
    assert close(dp2["value"], d["afd_dp2_tok_s"] / m["colocated_tok_s"])
    assert close(d["afd_dp2_vs_afd"], d["afd_dp2_tok_s"] / m["afd_tok_s"])
    assert close(d["afd_dp2_tok_s"], m["tokens_per_round"] / d["afd_dp2_wall_s"])
    shares = ("attention_send", "attention_combine", "attention_rest", "ffn_experts", "ffn_return")
    for name in shares:
        row = rows[name]
        seconds = row["metrics"]["seconds"]
        assert row["unit"] == "share of wall"
        assert close(row["value"], seconds / m["afd_wall_s"]), row
    # the attention rank's phases and the rest split its wall time
    assert sum(rows[name]["value"] for name in shares[:3]) == pytest.approx(1.0)
    assert rows["attention_send"]["value"] > 0 and rows["attention_combine"]["value"] > 0
    assert rows["attention_rest"]["value"] > 0
    assert rows["ffn_experts"]["value"] > 0 and rows["ffn_return"]["value"] > 0
    batch = rows["ffn_batch_and_wait"]
    assert batch["metrics"]["window_s"] > m["afd_wall_s"]
    assert close(batch["value"], batch["metrics"]["seconds"] / batch["metrics"]["window_s"])
    traffic = rows["afd_traffic"]["metrics"]
    assert traffic["tokens_sent"] >= m["tokens_per_round"] * 2  # 2 MoE layers per token
    assert traffic["rows_served"] >= traffic["tokens_sent"] * 2  # top-2: 2 rows per token
    assert traffic["micro_batches"] >= 2 * 8  # >= one message per layer and decode step
    for name in ("attention_send", "attention_combine", "ffn_experts", "ffn_return"):
        per = rows[name]["metrics"]["per_micro_batch_ms"]
        assert close(per, rows[name]["metrics"]["seconds"] / traffic["micro_batches"] * 1e3)
    # every server's processes: itself, an engine core and a model worker per DP rank, the
    # AFD servers' 2 FFN actors
    check_bench_process(rows, "serving")
    for mode, engines, actors in (("colocated", 1, 0), ("afd", 1, 2), ("afd_dp2", 2, 2)):
        check_peak_rss(rows[f"peak_rss_{mode}_server"])
        for role, count in (("engine", engines), ("worker", engines), ("ffn_actor", actors)):
            name = f"peak_rss_{mode}_{role}"
            if count == 0:
                assert name not in rows
                continue
            row = rows[name]
            check_peak_rss(row)
            assert row["metrics"]["processes"] == count, row
            assert row["value"] <= row["metrics"]["sum_MB"], row
        other = rows.get(f"peak_rss_{mode}_other")
        if other is not None:  # Ray's processes, vLLM's helpers
            assert other["unit"] == "MB" and other["target"] is None
            assert other["metrics"]["processes"] >= 1
            assert 0 < other["metrics"]["largest_MB"] <= other["value"]
