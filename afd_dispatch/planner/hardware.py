"""Hardware profiles: the per-die figures the planner's formulas use, with their sources.

A profile is a JSON file (see `profiles/atlas_a3.json`): every figure is an object
``{"value": ..., "estimate": bool, "source": "..."}`` so the file itself says where each
number comes from and which ones are guesses. All figures are **per die** (one NPU rank as
vLLM and HCCL see it: an Ascend 910C package holds two).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from afd_dispatch.errors import check
from afd_dispatch.untrusted_json import is_number, read_object

PROFILE_DIR = "profiles"
MAX_PROFILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Figure:
    """One hardware figure: its value, whether it is an estimate, and where it comes from."""

    value: float
    estimate: bool
    source: str


@dataclass(frozen=True)
class HardwareProfile:
    """Per-die figures of one accelerator, and the efficiencies the roofline applies.

    Peaks (what the vendor or a paper states):

    - ``hbm_capacity_gb``: HBM per die that the runtime can allocate, GB (1e9 bytes): the
      device total the runtime reports (``torch.npu.mem_get_info``, torch_npu's "total
      capacity"), which is what vLLM multiplies by ``gpu_memory_utilization``. It is less
      than the physical HBM: the driver and firmware keep the rest.
    - ``hbm_bandwidth_gbs``: HBM read bandwidth per die, GB/s.
    - ``bf16_tflops`` / ``int8_tops``: dense matrix throughput per die (1e12 op/s).
    - ``interconnect_gbs``: one-direction scale-up bandwidth of one die (UB/HCCS), GB/s.

    Model parameters (what the formulas multiply the peaks by, or add):

    - ``hbm_efficiency``, ``compute_efficiency``, ``interconnect_efficiency``: the share of
      each peak a well-written kernel reaches (0 < x <= 1).
    - ``message_latency_us``: the fixed cost of one A2F or F2A op call (launch, flag
      write, the receiver's poll), paid once per micro-batch and layer.
    - ``layer_overhead_us``: a fixed cost per micro-batch and layer on each side (kernel
      launches, small ops, synchronisation) that no roofline term covers; fitted on the
      published calibration points (`afd-dispatch plan --calibrate`).
    - ``sequence_overhead_us``: a fixed cost per sequence and layer on the attention side
      (work per decode query the byte and FLOP counts miss: top-k selection, paged-cache
      gathers, small per-query kernels); fitted with ``layer_overhead_us``.
    - ``step_overhead_ms``: a fixed cost per decode step (sampling, scheduling).
    - ``memory_utilization``: the share of ``hbm_capacity_gb`` the serving runtime may
      allocate (vLLM's ``gpu_memory_utilization``).
    - ``reserved_gb``: HBM of that share, GB, that no term of the memory model covers:
      peak activations, operator workspace, captured graphs, the serving framework's own
      communication buffers.
    """

    name: str
    description: str
    hbm_capacity_gb: float
    hbm_bandwidth_gbs: float
    bf16_tflops: float
    int8_tops: float
    interconnect_gbs: float
    message_latency_us: float
    hbm_efficiency: float
    compute_efficiency: float
    interconnect_efficiency: float
    layer_overhead_us: float
    sequence_overhead_us: float
    step_overhead_ms: float
    memory_utilization: float
    reserved_gb: float
    figures: tuple[tuple[str, Figure], ...] = ()

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            value = getattr(self, name)
            check(is_number(value) and value > 0, name, "a number > 0", value)
        for name in _FRACTIONS:
            value = getattr(self, name)
            check(is_number(value) and 0 < value <= 1, name, "a number in (0, 1]", value)
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            check(is_number(value) and value >= 0, name, "a number >= 0", value)

    # -- effective rates (the peaks times their efficiencies), in SI units ------------------
    @property
    def hbm_bytes_per_s(self) -> float:
        """B_hbm: bytes per second a streaming read reaches."""
        return self.hbm_bandwidth_gbs * 1e9 * self.hbm_efficiency

    @property
    def bf16_flops(self) -> float:
        """P_bf16: bf16 FLOP/s a matrix kernel reaches."""
        return self.bf16_tflops * 1e12 * self.compute_efficiency

    @property
    def int8_ops(self) -> float:
        """P_int8: int8 op/s a matrix kernel reaches (W8A8 GEMMs)."""
        return self.int8_tops * 1e12 * self.compute_efficiency

    @property
    def link_bytes_per_s(self) -> float:
        """B_ic: bytes per second one die sends (or receives) over the scale-up network."""
        return self.interconnect_gbs * 1e9 * self.interconnect_efficiency

    @property
    def usable_hbm_bytes(self) -> float:
        """Bytes a die may fill with weights, embedding, KV cache and windows:
        ``hbm_capacity_gb * memory_utilization - reserved_gb``, times 1e9."""
        return (self.hbm_capacity_gb * self.memory_utilization - self.reserved_gb) * 1e9

    def with_values(self, **values: float) -> HardwareProfile:
        """A copy with some figures replaced (marked as estimates given by the caller)."""
        unknown = sorted(set(values) - set(FIGURE_NAMES))
        check(not unknown, "hardware figure", f"one of {list(FIGURE_NAMES)}", unknown)
        figures = dict(self.figures)
        for key, value in values.items():
            figures[key] = Figure(float(value), True, "given on the command line")
        changed: dict[str, Any] = dict(values)
        return dataclasses.replace(self, figures=tuple(sorted(figures.items())), **changed)

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile") -> HardwareProfile:
        """Build a profile from the parsed JSON object (see the module docstring)."""
        check(isinstance(data, dict), where, "a JSON object", type(data).__name__)
        raw = data.get("figures")
        check(isinstance(raw, dict), f"{where}['figures']", "a JSON object", raw)
        assert isinstance(raw, dict)
        missing = [k for k in FIGURE_NAMES if k not in raw]
        check(not missing, f"{where}['figures']", f"every figure of {list(FIGURE_NAMES)}", missing)
        figures: dict[str, Figure] = {}
        for key in FIGURE_NAMES:
            entry = raw[key]
            arg = f"{where}['figures'][{key!r}]"
            check(isinstance(entry, dict), arg, '{"value", "estimate", "source"}', entry)
            value, estimate, source = entry.get("value"), entry.get("estimate"), entry.get("source")
            check(is_number(value), f"{arg}['value']", "a number", value)
            check(isinstance(estimate, bool), f"{arg}['estimate']", "true or false", estimate)
            check(isinstance(source, str) and source != "", f"{arg}['source']", "a text", source)
            figures[key] = Figure(float(value), bool(estimate), str(source))
        name, description = data.get("name"), data.get("description", "")
        check(isinstance(name, str) and name != "", f"{where}['name']", "a name", name)
        check(isinstance(description, str), f"{where}['description']", "a text", description)
        return cls(
            name=str(name),
            description=str(description),
            figures=tuple(sorted(figures.items())),
            **{k: f.value for k, f in figures.items()},
        )

    @classmethod
    def load(cls, name_or_path: str) -> HardwareProfile:
        """A shipped profile by name (``atlas_a3``) or a profile JSON file by path."""
        if os.path.exists(name_or_path):
            return cls.from_dict(
                read_object(name_or_path, "hardware", MAX_PROFILE_BYTES), name_or_path
            )
        names = shipped_profiles()
        check(
            name_or_path in names,
            "hardware",
            f"a profile JSON file or one of {names}",
            name_or_path,
        )
        text = resources.files(__package__) / PROFILE_DIR / f"{name_or_path}.json"
        return cls.from_dict(json.loads(text.read_text(encoding="utf-8")), name_or_path)


FIGURE_NAMES = (
    "hbm_capacity_gb",
    "hbm_bandwidth_gbs",
    "bf16_tflops",
    "int8_tops",
    "interconnect_gbs",
    "message_latency_us",
    "hbm_efficiency",
    "compute_efficiency",
    "interconnect_efficiency",
    "layer_overhead_us",
    "sequence_overhead_us",
    "step_overhead_ms",
    "memory_utilization",
    "reserved_gb",
)
_POSITIVE = ("hbm_capacity_gb", "hbm_bandwidth_gbs", "bf16_tflops", "int8_tops", "interconnect_gbs")
_FRACTIONS = (
    "hbm_efficiency",
    "compute_efficiency",
    "interconnect_efficiency",
    "memory_utilization",
)
_NON_NEGATIVE = (
    "message_latency_us",
    "layer_overhead_us",
    "sequence_overhead_us",
    "step_overhead_ms",
    "reserved_gb",
)


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in `afd_dispatch/planner/profiles/`."""
    folder = resources.files(__package__) / PROFILE_DIR
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))
