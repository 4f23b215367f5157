"""`afd-dispatch plan`: an AFD deployment planner built on a roofline model.

`model` holds the formulas (one MoE layer's phases, the micro-batch pipeline, memory, the
search), `hardware` the per-die figures of a profile (`profiles/*.json`, each figure with
its source), `calibration` the comparison with published results (`data/*.json`), `cli`
the command. `docs/planner.md` writes the model out as formulas.
"""

from afd_dispatch.planner.hardware import HardwareProfile
from afd_dispatch.planner.model import (
    AFDLayout,
    ModelShape,
    Plan,
    Precision,
    Target,
    Workload,
    evaluate,
    search,
)

__all__ = [
    "AFDLayout",
    "HardwareProfile",
    "ModelShape",
    "Plan",
    "Precision",
    "Target",
    "Workload",
    "evaluate",
    "search",
]
