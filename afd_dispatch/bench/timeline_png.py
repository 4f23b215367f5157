"""Drawing one decode step's profile (`timeline.StepProfile`) as a PNG: a Gantt chart
of the attention session, its thread and every FFN rank above the step's phase split."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from afd_dispatch.bench.timeline import (
    COLOURS,
    FFN_COLOURS,
    FFN_STATES,
    LABELS,
    NS_PER_MS,
    PHASE_KEYS,
    THREAD_REGIONS,
    THREAD_STATES,
    Step,
    StepProfile,
    mean_phases,
    mean_thread,
)

_THREAD_COLOURS = {key: COLOURS[key] for key, _ in THREAD_REGIONS}
_THREAD_HATCH = {"on_cpu": "", "no_cpu": "xxx", "asleep": None}


def render(
    pictured: StepProfile,
    path: str | os.PathLike[str],
    profiles: Sequence[StepProfile] = (),
    references: Mapping[str, float] | None = None,
    title: str = "",
) -> None:
    """Draw `pictured` as a Gantt chart (the attention session, then each FFN rank) above
    its phase split; with `profiles`, the mean split over them and what the attention
    thread did (mean), below it; `references` ({label: ms}) as plain bars for scale.
    Writes a PNG to `path` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    step = pictured.step
    rows = list(pictured.rows)
    thread = mean_thread(profiles) if profiles else pictured.thread
    bars: list[tuple[str, Mapping[str, float]]] = [("this step (the median)", pictured.phases)]
    if profiles:
        bars.append((f"mean of {len(profiles)} steps", mean_phases(profiles)))
    labels = [name for name, _ in bars]
    labels += ["attention thread (mean)"] if thread is not None else []
    labels += list(references or {})
    fig, (gantt, split) = plt.subplots(
        2,
        1,
        figsize=(12, 5.2 + 0.55 * len(rows) + 0.4 * len(labels)),
        gridspec_kw={"height_ratios": [len(rows) + 2, len(labels) + 1]},
    )
    # lanes from the top: the attention session, its thread's state, each FFN rank
    lanes: list[tuple[str, str]] = [(rows[0], _row_label(rows[0], step))]
    if pictured.thread_intervals:
        lanes.append(("", "its thread: on a CPU / no CPU / asleep"))
    lanes += [(p, _row_label(p, step)) for p in rows[1:]]
    top = len(lanes) - 1
    for i, (process, _) in enumerate(lanes):
        y = top - i
        if not process:
            _thread_lane(gantt, pictured, y)
            continue
        colours = COLOURS if process == step.process else FFN_COLOURS
        gantt.broken_barh(
            [
                ((s.start_ns - step.start_ns) / NS_PER_MS, s.duration_ns / NS_PER_MS)
                for s in pictured.rows[process]
            ],
            (y - 0.4, 0.8),
            facecolors=[colours[s.state] for s in pictured.rows[process]],
        )
    for start, end, layer in pictured.layers:
        middle = ((start + end) / 2 - step.start_ns) / NS_PER_MS
        gantt.text(middle, top + 0.45, f"MoE layer {layer}", ha="center", va="bottom", fontsize=8)
    gantt.set_yticks(range(len(lanes)), [label for _, label in reversed(lanes)], fontsize=9)
    gantt.set_ylim(-0.6, top + 0.9)
    gantt.set_xlim(0, step.duration_ns / NS_PER_MS)
    gantt.set_xlabel("ms from the step's start (its forward reaching the first MoE layer)")
    gantt.set_title(
        title
        or f"one decode step of an AFD vLLM server ({step.tokens} tokens): "
        f"{step.duration_ns / NS_PER_MS:.2f} ms",
        fontsize=10,
    )
    for y, (_, phases) in enumerate(bars):
        left = 0.0
        whole = sum(phases.values()) / NS_PER_MS
        for key in PHASE_KEYS:
            width = phases[key] / NS_PER_MS
            split.barh(y, width, left=left, color=COLOURS[key], height=0.6)
            if width >= 0.06 * whole:
                split.text(
                    left + width / 2, y, f"{width:.2f}", ha="center", va="center", fontsize=7
                )
            left += width
    y = len(bars)
    if thread is not None:
        left = 0.0
        for region, _ in THREAD_REGIONS:
            for state, _ in THREAD_STATES:
                width = max(0.0, thread[(region, state)] / NS_PER_MS)
                hatch = _THREAD_HATCH[state]
                split.barh(
                    y,
                    width,
                    left=left,
                    height=0.6,
                    color="white" if hatch is None else _THREAD_COLOURS[region],
                    edgecolor=_THREAD_COLOURS[region] if hatch is None else "white",
                    hatch=hatch or "",
                )
                left += width
        y += 1
    for ms in (references or {}).values():
        split.barh(y, ms, color="white", edgecolor="black", height=0.6, hatch="//")
        split.text(ms, y, f" {ms:.2f} ms", va="center", fontsize=8)
        y += 1
    split.set_yticks(range(len(labels)), labels, fontsize=9)
    split.invert_yaxis()
    split.set_xlabel("ms per step: by phase of the attention session; its thread's state")
    handles = [Patch(color=COLOURS[k], label=LABELS[k]) for k in PHASE_KEYS]
    handles.append(Patch(color=FFN_COLOURS["wait"], label=FFN_STATES[0][1]))
    if thread is not None:
        handles += [
            Patch(
                facecolor=_THREAD_COLOURS["send"],
                label="thread: on a CPU (coloured by where it is: vLLM, send, combine, host)",
            ),
            Patch(
                facecolor=_THREAD_COLOURS["send"],
                hatch="xxx",
                edgecolor="white",
                label="thread: runnable, waiting for a CPU",
            ),
            Patch(facecolor="white", edgecolor=_THREAD_COLOURS["send"], label="thread: asleep"),
        ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    legend_rows = (len(handles) + 1) // 2
    fig.tight_layout(rect=(0, 0.03 + 0.022 * legend_rows, 1, 1))
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _thread_lane(axes: Any, pictured: StepProfile, y: float) -> None:
    """The attention thread between consecutive CPU marks: the share of each interval it
    was on a CPU (solid, in its region's colour), runnable without one (hatched) and
    asleep (white), drawn in that order (the order inside an interval is not known)."""
    origin = pictured.step.start_ns
    for start, end, region, on, waiting in pictured.thread_intervals:
        wall = end - start
        on = min(max(on, 0), wall)
        waiting = min(max(waiting, 0), wall - on)
        left = (start - origin) / NS_PER_MS
        colour = _THREAD_COLOURS[region]
        for width, kind in ((on, "on"), (waiting, "no"), (wall - on - waiting, "asleep")):
            if width <= 0:
                continue
            axes.barh(
                y,
                width / NS_PER_MS,
                left=left,
                height=0.5,
                color="white" if kind == "asleep" else colour,
                edgecolor="white" if kind == "no" else (colour if kind == "asleep" else None),
                hatch="xxx" if kind == "no" else "",
                linewidth=0.5 if kind == "asleep" else 0,
            )
            left += width / NS_PER_MS


def _row_label(process: str, step: Step) -> str:
    return f"{process} (vLLM worker)" if process == step.process else f"{process} (Ray actor)"
