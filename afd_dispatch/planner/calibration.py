"""Calibration: the model's predictions next to published AFD results on the same hardware.

The data (`data/calibration_afd_plugin_dsv32_a3.json`) holds the published decode
throughput of DeepSeek-V3.2 on Atlas A3 from the afd-plugin recipe, the model shape, the
deployment of each case and the assumptions made to price it. `calibrate` prices each case
twice: with the profile's two fitted overheads (``layer_overhead_us``,
``sequence_overhead_us``) set to 0 (the bare roofline) and as given; `fit_overheads` finds
the two overheads that minimise the squared log error of predicted / published.

The memory check of each case uses the deployment as it ran: the data's
``memory_utilization`` (the launchers' ``--gpu-memory-utilization``) in place of the
profile's, and its ``weight_split`` (afd-plugin's attention/FFN role split, see
`afd_dispatch.planner.memory.WEIGHT_SPLITS`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

from afd_dispatch.planner.cost import evaluate
from afd_dispatch.planner.ep import evaluate_ep
from afd_dispatch.planner.hardware import HardwareProfile
from afd_dispatch.planner.shape import AFDLayout, ModelShape, Precision, Workload

DATA_FILE = "calibration_afd_plugin_dsv32_a3.json"


@dataclass(frozen=True)
class CalibrationRow:
    """One published point: tokens/s/die published, predicted bare and calibrated, the
    calibrated TPOT, and the memory check: the fullest die's memory and the usable HBM
    (GB, 1e9 bytes), and whether it fits."""

    name: str
    published: float
    roofline: float
    predicted: float
    tpot_ms: float
    fits: bool
    memory_gb: float
    usable_memory_gb: float

    @property
    def ratio(self) -> float:
        """predicted / published (1 = exact; < 1: the model is pessimistic)."""
        return self.predicted / self.published

    @property
    def roofline_ratio(self) -> float:
        return self.roofline / self.published


def load_data() -> dict[str, Any]:
    """The shipped calibration data (a JSON object, see the module docstring)."""
    text = (resources.files(__package__) / "data" / DATA_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def mean_context(input_len: int, lo: int, hi: int) -> float:
    """Mean KV length of a decode step when output lengths L are uniform in [lo, hi].

    A request of L output tokens spends L steps at lengths input .. input + L - 1, so steps
    weigh requests by L: the mean is ``input + E[L^2] / (2 E[L])`` with
    ``E[L] = (lo + hi) / 2`` and ``E[L^2] = E[L]^2 + (hi - lo)^2 / 12``.
    """
    mean = (lo + hi) / 2
    return input_len + (mean**2 + (hi - lo) ** 2 / 12) / (2 * mean)


@dataclass(frozen=True)
class _Priced:
    """What `_predict` returns for one case: tokens/s/die, TPOT (s), the fullest die's
    memory and the usable HBM (GB)."""

    throughput_per_die: float
    tpot_s: float
    memory_gb: float
    usable_memory_gb: float

    @property
    def fits(self) -> bool:
        return self.memory_gb <= self.usable_memory_gb


def deployed_hardware(hw: HardwareProfile, data: dict[str, Any]) -> HardwareProfile:
    """``hw`` with the published runs' ``memory_utilization`` (the data's figure)."""
    return dataclasses.replace(hw, memory_utilization=float(data["memory_utilization"]))


def _predict(case: dict[str, Any], data: dict[str, Any], hw: HardwareProfile) -> _Priced:
    """Price one published case under ``hw`` (its memory at the published settings)."""
    shape = ModelShape.from_hf_config(data["model_config"], "DeepSeek-V3.2")
    precision = Precision(**data["precision"])
    lo, hi = case["output_len_min"], case["output_len_max"]
    workload = Workload(case["input_len"] + hi, mean_context(case["input_len"], lo, hi))
    m = case["micro_batches"]
    active = float(data["active_experts_per_die"])
    hw = deployed_hardware(hw, data)
    if case["mode"] == "afd":
        tokens = case["batch_per_die"] // m
        layout = AFDLayout(case["num_attention_ranks"], case["num_ffn_ranks"], m, tokens)
        plan = evaluate(
            shape,
            hw,
            precision,
            workload,
            layout,
            active_experts_override=active,
            weight_split=data["weight_split"],
        )
        memory = max(plan.attention_memory_gb, plan.ffn_memory_gb)
        return _Priced(plan.throughput_per_die, plan.tpot_s, memory, plan.usable_memory_gb)
    ep = evaluate_ep(
        shape,
        hw,
        precision,
        workload,
        dies=case["dies"],
        tokens=case["batch_per_die"] // m,
        micro_batches=m,
        active_experts_override=active,
    )
    return _Priced(ep.throughput_per_die, ep.step_s, ep.memory_gb, ep.usable_memory_gb)


def calibrate(hw: HardwareProfile, data: dict[str, Any] | None = None) -> list[CalibrationRow]:
    """Price every published case with ``hw``, and with both fitted overheads set to 0;
    memory at the data's ``memory_utilization`` and ``weight_split``."""
    data = data or load_data()
    bare = dataclasses.replace(hw, layer_overhead_us=0.0, sequence_overhead_us=0.0)
    rows = []
    for case in data["cases"]:
        roofline = _predict(case, data, bare).throughput_per_die
        priced = _predict(case, data, hw)
        rows.append(
            CalibrationRow(
                name=case["name"],
                published=float(case["published_tokens_per_s_per_die"]),
                roofline=roofline,
                predicted=priced.throughput_per_die,
                tpot_ms=priced.tpot_s * 1e3,
                fits=priced.fits,
                memory_gb=priced.memory_gb,
                usable_memory_gb=priced.usable_memory_gb,
            )
        )
    return rows


def log_error(rows: list[CalibrationRow]) -> float:
    """sum(log(predicted / published) ** 2): 0 when every prediction is exact."""
    return sum(math.log(r.ratio) ** 2 for r in rows)


@dataclass(frozen=True)
class Fit:
    """Fitted overheads (us) and the rows they give."""

    layer_overhead_us: float
    sequence_overhead_us: float
    rows: tuple[CalibrationRow, ...]

    @property
    def error(self) -> float:
        return log_error(list(self.rows))


def fit_overheads(hw: HardwareProfile, data: dict[str, Any] | None = None) -> Fit:
    """``layer_overhead_us`` and ``sequence_overhead_us`` minimising `log_error`.

    A compass search on the two (both kept >= 0): try a step up and down on each, keep any
    improvement, halve the steps when none helps, stop when both steps are below 0.1 us.
    All other figures of ``hw`` stay as they are.
    """
    data = data or load_data()

    def rows(layer: float, seq: float) -> list[CalibrationRow]:
        tuned = dataclasses.replace(hw, layer_overhead_us=layer, sequence_overhead_us=seq)
        return calibrate(tuned, data)

    point = [hw.layer_overhead_us, hw.sequence_overhead_us]
    best = log_error(rows(*point))
    steps = [64.0, 8.0]
    while max(steps) >= 0.1:
        moved = False
        for i in (0, 1):
            for sign in (1.0, -1.0):
                trial = list(point)
                trial[i] = max(0.0, trial[i] + sign * steps[i])
                error = log_error(rows(*trial))
                if error < best - 1e-12:
                    point, best, moved = trial, error, True
        if not moved:
            steps = [x / 2 for x in steps]
    return Fit(point[0], point[1], tuple(rows(*point)))
