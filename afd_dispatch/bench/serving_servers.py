"""The serving level's servers: starting `vllm serve` (AFD or colocated) on a request set,
timing its rounds, reading its AFD counters, the CPU time and peak resident set of every
process of its session, and the span dumps of a traced AFD server."""

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
    median,
    process_memory,
    schedstat,
)
from afd_dispatch.integrations.vllm import metrics as afd_metrics
from afd_dispatch.integrations.vllm.launch import Server, settled_afd_counters, vllm_server

SETTLE_S = 20.0  # counters are published once a second; they settle well within this
TRACE_WAIT_S = 30.0  # for every process's span dump (asked once, answered within ~1 s)
TRACE_POLL_S = 0.5
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
    ranks = AFDConfig.from_json(afd_config).num_attention_ranks
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
    num_attention_ranks: int
    cpu: CpuUse = field(default_factory=CpuUse)  # over the round


def traced_round(
    model: str, shape: ServingShape, logs: str, afd_config: str, wait_s: float = TRACE_WAIT_S
) -> TracedRun:
    """Start the AFD server of `afd_config` with "trace": true, warm it up, serve one round
    of `shape`, collect every process's spans (waiting at most `wait_s` s), stop it."""
    from afd_dispatch.config import AFDConfig

    traced = json.dumps({**json.loads(afd_config), "trace": True})
    num_attention_ranks = AFDConfig.from_json(traced).num_attention_ranks
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
        documents = collect_traces(directory, num_attention_ranks, wait_s)
    trace = timeline.Trace.from_documents(documents).window(start, end)
    return TracedRun(trace, wall, tokens, num_attention_ranks, cpu)


def collect_traces(
    directory: str, num_attention_ranks: int, wait_s: float
) -> list[dict[str, object]]:
    """Ask the server's processes for their spans (`metrics.request_trace`) and wait,
    sleeping, until the answers hold every attention session's spans and an FFN rank's.
    Raises TimeoutError after `wait_s` s naming what came."""
    request = f"{os.getpid()}-{time.monotonic_ns()}"
    afd_metrics.request_trace(directory, request)
    wanted = {f"attention {s}" for s in range(num_attention_ranks)}
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
