"""`afd-dispatch plan`: an AFD deployment planner built on a roofline model.

`shape` holds what a model and a workload are, `cost` the formulas (one MoE layer's phases,
the micro-batch pipeline), `memory` each die's memory, `search` the AFD search, `ep` the
expert-parallel baseline, `hardware` the per-die figures of a profile (`profiles/*.json`,
each figure with its source), `calibration` the comparison with published results
(`data/*.json`), `cli` the command. `docs/planner.md` writes the model out as formulas.
"""

from afd_dispatch.planner.cost import evaluate
from afd_dispatch.planner.hardware import HardwareProfile
from afd_dispatch.planner.plan import Plan
from afd_dispatch.planner.search import Target, search
from afd_dispatch.planner.shape import AFDLayout, ModelShape, Precision, Workload

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
