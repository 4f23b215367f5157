"""One decode step phase by phase (`afd_dispatch.bench.timeline`), on synthetic spans.

No vLLM server: a hand-made step of a 2-layer MoE model with M = 2 micro-batches and two
FFN ranks, whose phases are worked out by hand below; the span dump of a server's
processes (`integrations/vllm/metrics.py`) with stand-in sources; the PNG.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import threading
from pathlib import Path

import pytest

from afd_dispatch.bench import serving, serving_servers, timeline, timeline_png
from afd_dispatch.integrations.vllm import metrics
from afd_dispatch.runtime.trace import Span

BASE = 123_456_789_012_345  # ns on CLOCK_MONOTONIC (34 h of uptime): the us floats must hold it
US = 1000  # the spans below are written in us


def span(
    process: str, name: str, start_us: int, end_us: int, layer: int = -1, mb: int = -1
) -> Span:
    return Span(process, name, BASE + start_us * US, BASE + end_us * US, layer, mb)


A, F0, F1 = "attention 0", "FFN 0", "FFN 1"
ATTENTION = [
    # MoE layer 0: both slots sent back to back, then both combined
    span(A, "moe", 1000, 4000, 0),
    span(A, "send", 1100, 1300, 0, 0),
    span(A, "send", 1300, 1500, 0, 1),
    span(A, "combine", 1600, 2700, 0, 0),
    span(A, "combine", 2700, 3900, 0, 1),
    # MoE layer 1
    span(A, "moe", 5000, 7000, 1),
    span(A, "send", 5100, 5200, 1, 0),
    span(A, "send", 5200, 5300, 1, 1),
    span(A, "combine", 5300, 6000, 1, 0),
    span(A, "combine", 6000, 6900, 1, 1),
]
FFN = [
    span(F0, "batch", 0, 1400, 0, 0),
    span(F0, "experts", 1450, 1800, 0, 0),
    span(F0, "return", 1800, 2000, 0, 0),
    span(F0, "batch", 2000, 2100, 0, 1),
    span(F0, "experts", 2100, 2500, 0, 1),
    span(F0, "return", 2500, 2600, 0, 1),
    span(F0, "batch", 2600, 5250, 1, 0),
    span(F0, "experts", 5250, 5500, 1, 0),
    span(F0, "return", 5500, 5600, 1, 0),
    span(F0, "batch", 5600, 5650, 1, 1),
    span(F0, "experts", 5650, 5800, 1, 1),
    span(F0, "return", 5800, 5900, 1, 1),
    # FFN 1 answers every micro-batch last: it is the one the attention side waits for
    span(F1, "batch", 0, 1500, 0, 0),
    span(F1, "experts", 1600, 2300, 0, 0),
    span(F1, "return", 2300, 2500, 0, 0),
    span(F1, "batch", 2500, 2550, 0, 1),
    span(F1, "experts", 2550, 3500, 0, 1),
    span(F1, "return", 3500, 3800, 0, 1),
    span(F1, "batch", 3800, 5300, 1, 0),
    span(F1, "experts", 5300, 5700, 1, 0),
    span(F1, "return", 5700, 5900, 1, 0),
    span(F1, "batch", 5900, 6100, 1, 1),
    span(F1, "experts", 6150, 6500, 1, 1),  # 50 us between its batch and its experts
    span(F1, "return", 6500, 6800, 1, 1),
    span(F1, "batch", 6800, 9000),  # a wait that ended without a batch (deadline)
]
# (start us, tokens): three steps of 16 tokens, then a forward of 3 (not a steady step)
FORWARDS = [(0, 16), (10_000, 16), (20_000, 16), (25_000, 3)]
# the attention thread's CPU accounting, taken at each hook call's entry and where each of
# its spans ends (and at the first step's ends; the second step has none at its end, so no
# thread split): (us, us on a CPU, us runnable without one) since the previous mark
CPU_DELTAS = [
    (0, 0, 0),
    (1000, 600, 300),  # vLLM
    (1300, 250, 50),  # send (0, 0)
    (1500, 150, 50),  # send (0, 1)
    (2700, 200, 400),  # combine (0, 0): asleep 600
    (3900, 300, 100),  # combine (0, 1): asleep 800
    (4000, 100, 0),  # the hook call's end
    (5000, 800, 100),  # vLLM
    (5200, 100, 100),
    (5300, 100, 0),
    (6000, 200, 200),
    (6900, 100, 100),
    (7000, 50, 0),  # asleep 50
    (10_000, 2100, 500),  # vLLM
]
CPU_MARKS = [
    (t, sum(d[1] for d in CPU_DELTAS[: i + 1]), sum(d[2] for d in CPU_DELTAS[: i + 1]))
    for i, (t, _, _) in enumerate(CPU_DELTAS)
]
EXPECTED_THREAD_US = {
    ("vllm", "on_cpu"): 600 + 800 + 2100,
    ("vllm", "no_cpu"): 300 + 100 + 500,
    ("vllm", "asleep"): 100 + 100 + 400,
    ("send", "on_cpu"): 250 + 150 + 100 + 100,
    ("send", "no_cpu"): 50 + 50 + 100,
    ("send", "asleep"): 0,
    ("combine", "on_cpu"): 200 + 300 + 200 + 100,
    ("combine", "no_cpu"): 400 + 100 + 200 + 100,
    ("combine", "asleep"): 600 + 800 + 300 + 700,
    ("afd_host", "on_cpu"): 100 + 50,
    ("afd_host", "no_cpu"): 0,
    ("afd_host", "asleep"): 50,
}
# Worked by hand for the step [0, 10000) us:
EXPECTED_US = {
    "vllm": 1000 + 1000 + 3000,  # before layer 0, between the layers, after layer 1
    "afd_host": 100 + 100 + 100 + 100 + 100,  # in a hook call, outside send and combine
    "send": 200 + 200 + 100 + 100,
    # combine (1, 1) from 6000: FFN 1's batch runs to 6100 (the send ended at 5300)
    "ffn_batching": 100,
    # FFN 1's experts while a combine waits: (0,0) 1600-2300, (0,1) 2700-3500,
    # (1,0) 5300-5700, (1,1) 6150-6500
    "ffn_experts": 700 + 800 + 400 + 350,
    "ffn_return": 200 + 300 + 200 + 300,
    "ffn_gap": 50,  # FFN 1 between its batch (to 6100) and experts (from 6150)
    # from FFN 1's last return to the combine's end: 2500-2700, 3800-3900, 5900-6000, 6800-6900
    "combine": 200 + 100 + 100 + 100,
}


def documents() -> list[dict[str, object]]:
    """What the server dumps: the attention worker's trace (spans, forward marks) and the
    owner's (the FFN ranks' spans)."""
    marks = [(BASE + t * US, n) for t, n in FORWARDS]
    cpu = [(BASE + t * US, run * US, wait * US) for t, run, wait in CPU_MARKS]
    return [
        json.loads(json.dumps(metrics.trace_document(ATTENTION, marks, A, cpu))),
        json.loads(json.dumps(metrics.trace_document(FFN))),
    ]


def test_dumped_spans_read_back_to_the_nanosecond() -> None:
    trace = timeline.Trace.from_documents(documents())
    assert sorted(trace.spans, key=repr) == sorted(ATTENTION + FFN, key=repr)
    assert trace.forwards == [timeline.Forward(A, BASE + t * US, n) for t, n in FORWARDS]
    assert trace.cpu == [
        timeline.CpuMark(A, BASE + t * US, run * US, wait * US) for t, run, wait in CPU_MARKS
    ]
    assert trace.processes() == {A, F0, F1}
    # a span in two dumps counts once; the merged trace reads back the same
    again = timeline.Trace.from_documents([*documents(), trace.chrome()])
    assert again == trace


def test_steady_steps_run_between_forwards_of_the_same_tokens() -> None:
    trace = timeline.Trace.from_documents(documents())
    got = timeline.steps(trace, A, tokens=16)
    assert [(s.start_ns - BASE, s.end_ns - BASE) for s in got] == [(0, 10**7), (10**7, 2 * 10**7)]
    assert all(s.tokens == 16 for s in got)
    assert len(timeline.steps(trace, A)) == 3  # any tokens: the 16 -> 3 step too
    assert timeline.steps(trace, "attention 1") == []


def test_phases_split_the_step_and_gaps_are_vllms() -> None:
    trace = timeline.Trace.from_documents(documents())
    step = timeline.steps(trace, A, tokens=16)[0]
    got = timeline.profile(trace, step)
    assert got.phases == {k: v * US for k, v in EXPECTED_US.items()}
    assert sum(got.phases.values()) == step.duration_ns == 10_000 * US
    # the thread: outside the hook calls (vLLM) and inside (AFD), on / off a CPU, asleep
    assert got.thread == {k: v * US for k, v in EXPECTED_THREAD_US.items()}
    assert sum(got.thread.values()) == step.duration_ns
    # the attention row is the phases laid out in time, without gaps or overlaps
    row = got.rows[A]
    assert row[0].start_ns == step.start_ns and row[-1].end_ns == step.end_ns
    assert all(a.end_ns == b.start_ns and a.state != b.state for a, b in itertools.pairwise(row))
    assert [(s.start_ns - BASE) // US for s in row if s.state == "vllm"] == [0, 4000, 7000]
    assert got.layers == [
        (BASE + 1000 * US, BASE + 4000 * US, 0),
        (BASE + 5000 * US, BASE + 7000 * US, 1),
    ]
    # an FFN rank's batch span: waiting until the micro-batch's send ended, then batching
    ffn0 = [((s.start_ns - BASE) // US, (s.end_ns - BASE) // US, s.state) for s in got.rows[F0]]
    assert ffn0[:3] == [(0, 1300, "wait"), (1300, 1400, "batching"), (1400, 1450, "loop")]
    ffn1 = [((s.start_ns - BASE) // US, (s.end_ns - BASE) // US, s.state) for s in got.rows[F1]]
    assert (6800, 9000, "wait") in ffn1  # the batch that never came
    assert ffn1[-1] == (9000, 10_000, "loop")
    assert list(got.rows) == [A, F0, F1]


def test_the_next_step_is_all_vllm_and_no_ffn_spans_is_unattributed_waiting() -> None:
    trace = timeline.Trace.from_documents(documents())
    second = timeline.profile(trace, timeline.steps(trace, A, tokens=16)[1])
    assert second.phases["vllm"] == second.step.duration_ns  # no AFD span in it
    assert second.thread is None  # no CPU mark at its end
    alone = timeline.Trace([s for s in trace.spans if s.process == A], trace.forwards)
    got = timeline.profile(alone, timeline.steps(alone, A, tokens=16)[0])
    waits = sum(EXPECTED_US[k] for k in ("ffn_batching", "ffn_experts", "ffn_return", "ffn_gap"))
    assert got.phases["ffn_gap"] == (waits + EXPECTED_US["combine"]) * US
    assert got.phases["combine"] == 0 and sum(got.phases.values()) == got.step.duration_ns


def test_table_typical_step_and_png(tmp_path: Path) -> None:
    trace = timeline.Trace.from_documents(documents())
    profiles = [timeline.profile(trace, s) for s in timeline.steps(trace, A, tokens=16)]
    pictured = timeline.typical(profiles)
    assert pictured is profiles[0]  # equal durations: the lower middle one
    mean = timeline.mean_phases(profiles)
    assert mean["vllm"] == pytest.approx((5000 + 10_000) * US / 2)
    assert sum(mean.values()) == pytest.approx(10_000 * US)
    table = timeline.phase_table(profiles, pictured, {"colocated step": 3.6})
    assert "mean over 2 steps" in table and "colocated step: 3.600 ms" in table
    # the thread's mean over the steps that have it: the first only
    assert timeline.mean_thread(profiles) == pytest.approx(
        {k: v * US for k, v in EXPECTED_THREAD_US.items()}
    )
    assert "outside AFD (vLLM's own work): on a CPU 3.500, runnable, waiting for a CPU 0.900" in (
        table
    )
    assert "10.000" in table  # the pictured step, ms
    for key in timeline.PHASE_KEYS:
        assert timeline.LABELS[key] in table
    path = tmp_path / "step.png"
    timeline_png.render(pictured, path, profiles, {"colocated step": 3.6})
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    assert width > 600 and height > 300


class Source:
    """A publisher's source: counters, and spans as the attention server or owner gives them."""

    def __init__(self, document: dict[str, object]) -> None:
        self.document = document
        self.calls = 0
        self.lock = threading.Lock()

    def counters(self) -> dict[str, dict[str, float]]:
        return {}

    def trace(self) -> dict[str, object]:
        with self.lock:
            self.calls += 1
        return json.loads(json.dumps(self.document))


def test_a_publisher_dumps_its_spans_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(metrics.ENV, raising=False)  # no counter snapshots here
    monkeypatch.setenv(metrics.TRACE_ENV, str(tmp_path))
    source = Source(documents()[1])
    publisher = metrics.CounterPublisher(source, "ffn")
    try:
        assert publisher.trace_dir == str(tmp_path)
        assert metrics.read_traces(str(tmp_path), "r1") == {}
        metrics.request_trace(str(tmp_path), "r1")
        answered = metrics.read_traces(str(tmp_path), "r1")
        if not answered:  # the publisher's own thread may have been first
            assert publisher.dump_trace()
            answered = metrics.read_traces(str(tmp_path), "r1")
        assert not publisher.dump_trace()  # answered once per request
        assert list(answered) == ["ffn"]
        assert answered["ffn"]["otherData"]["afd_source"] == "ffn"
        assert timeline.Trace.from_documents(answered.values()).spans == sorted(
            FFN, key=lambda s: (s.start_ns, s.process, s.name)
        )
        assert metrics.read_traces(str(tmp_path), "r2") == {}
    finally:
        publisher.close()  # writes a last dump
    last = json.loads((tmp_path / f"ffn{metrics.TRACE_SUFFIX}").read_text())
    assert last["otherData"]["afd_final"] is True
    # a source without spans, or no directory: no dump, and no thread just for it
    monkeypatch.delenv(metrics.TRACE_ENV)
    quiet = metrics.CounterPublisher(source, "ffn")
    assert quiet.trace_dir is None and quiet._thread is None and not quiet.dump_trace()
    quiet.close()


def test_the_bench_collects_every_process_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the serving bench: the worker's and the owner's publishers answer a request
    within a publish period, and the bench waits for both."""
    monkeypatch.delenv(metrics.ENV, raising=False)
    monkeypatch.setenv(metrics.TRACE_ENV, str(tmp_path))
    attention, ffn = (Source(d) for d in documents())
    publishers = [
        metrics.CounterPublisher(attention, "attention-0"),
        metrics.CounterPublisher(ffn, "ffn"),
    ]
    try:
        got = serving_servers.collect_traces(str(tmp_path), num_attention_ranks=1, wait_s=20.0)
        assert timeline.Trace.from_documents(got) == timeline.Trace.from_documents(documents())
        with pytest.raises(TimeoutError, match=r"attention 1"):
            serving_servers.collect_traces(str(tmp_path), num_attention_ranks=2, wait_s=1.5)
    finally:
        for publisher in publishers:
            publisher.close()


def test_newest_spans_keeps_the_latest_of_each_process() -> None:
    kept = metrics.newest_spans(ATTENTION + FFN, limit=2)
    assert [(s.process, s.name) for s in kept if s.process == A] == [
        (A, "combine"),
        (A, "combine"),
    ]
    assert len(kept) == 6 and kept == sorted(kept, key=lambda s: s.start_ns)


def test_the_session_marks_its_threads_cpu_where_each_span_ends(tmp_path: Path) -> None:
    """What the attention server records with "trace": a CPU mark after every span its
    tracer records (none while tracing is off), from a clock that counts on-CPU time, and
    that gives up (None, for good) where schedstat cannot be read."""
    from afd_dispatch.integrations.vllm.server import MarkingTracer, ThreadClock

    # Linux >= 3.17 has it, and the project runs on Linux only (futex, /dev/shm)
    assert os.path.exists(ThreadClock.PATH)
    clock = ThreadClock()
    try:
        first = clock.read()
        assert first is not None
        sum(i * i for i in range(200_000))  # some CPU time on this thread
        second = clock.read()
        assert second is not None
        assert second[0] > first[0] and second[1] >= first[1]
    finally:
        clock.close()
    blind = ThreadClock()
    blind.PATH = str(tmp_path / "no-schedstat")  # type: ignore[misc]
    assert blind.read() is None
    blind.PATH = ThreadClock.PATH  # type: ignore[misc]
    assert blind.read() is None  # broken once, it stops asking
    blind.close()
    marks: list[int] = []
    tracer = MarkingTracer("attention 0", enabled=True, on_record=marks.append)
    tracer.record("send", 10, 20, 0, 0)
    with tracer.span("combine", 0, 0):
        pass
    assert marks[0] == 20 and marks[1] == tracer.spans[1].end_ns and len(marks) == 2
    quiet = MarkingTracer("attention 0", enabled=False, on_record=marks.append)
    quiet.record("send", 30, 40, 0, 0)
    assert len(marks) == 2 and quiet.counters["send_seconds_total"] > 0


def test_the_serving_bench_rows_png_and_trace(tmp_path: Path) -> None:
    """`bench --level serving --trace-png`'s last part, on the synthetic steps: the rows,
    the PNG and the Chrome trace of the pictured step and its neighbours."""
    traced = serving_servers.TracedRun(
        timeline.Trace.from_documents(documents()),
        wall_s=0.5,
        tokens=512,
        num_attention_ranks=1,
        cpu=serving_servers.CpuUse(
            wall_s=0.5,
            cpu_s={"worker": 0.25, "ffn_actor": 0.4},
            wait_s={"worker": 0.1, "ffn_actor": 0.2},
            processes={"worker": 1, "ffn_actor": 2},
            other_cores=0.1,
        ),
    )
    shape = serving_servers.ServingShape(requests=16, max_tokens=32)
    colocated = serving_servers.ServerRun("colocated", walls_s=[0.25], tokens=[512])
    afd = serving_servers.ServerRun("afd", walls_s=[1.0], tokens=[512])
    afd.cpu = serving_servers.CpuUse(wall_s=1.0, cpu_s={"worker": 0.64}, wait_s={"worker": 0.0})
    afd.cpu.processes["worker"] = 1
    png = tmp_path / "step.png"
    rows, table = serving.trace_rows(traced, shape, str(png), colocated, afd)
    by_name = {r.name: r for r in rows}
    step = by_name["trace_step"]
    assert step.value == pytest.approx(10.0)  # both steps last 10 ms
    assert step.metrics["steps"] == 2 and step.metrics["pictured_step_ms"] == pytest.approx(10)
    assert step.metrics["colocated_ms_per_token"] == pytest.approx(16 / 2048 * 1e3)
    shares = [by_name[f"trace_{k}"].value for k in timeline.PHASE_KEYS]
    assert sum(shares) == pytest.approx(1.0)
    vllm = by_name["trace_vllm"]  # the second step is all vLLM's
    assert vllm.metrics["pictured_ms"] == pytest.approx(5.0)
    assert vllm.metrics["mean_ms"] == pytest.approx(7.5) and vllm.value == pytest.approx(0.75)
    assert by_name["trace_thread_vllm"].value == pytest.approx(3.5)  # the first step's only
    cpu = by_name["trace_cpu"]
    # 0.65 s of CPU over 512 tokens / 16 requests = 32 steps
    assert cpu.value == pytest.approx(650 / 32) and cpu.metrics["cores"] == pytest.approx(1.3)
    assert cpu.metrics["ffn_actor_ms_per_step"] == pytest.approx(400 / 32)
    assert cpu.metrics["ffn_actor_waiting_for_cpu"] == pytest.approx(0.4)
    floor = 650 / 32 / (os.cpu_count() or 1)
    assert f"so no step shorter than {floor:.1f} ms" in table and "mean over 2 steps" in table
    # the untraced server's CPU cost: 640 ms over 32 steps, and the floor it sets
    assert "CPU, the untraced AFD server's timed rounds (1.00 s" in table
    assert f"AFD untraced: its CPU ms per step / {os.cpu_count() or 1} CPUs: " in table
    assert "CPU, the colocated" not in table  # not measured
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    near = json.loads((tmp_path / "step.trace.json").read_text())
    assert timeline.Trace.from_documents([near]).processes() == {A, F0, F1}


def test_only_the_serving_level_takes_trace_png() -> None:
    from afd_dispatch.bench import cli

    with pytest.raises(SystemExit):
        cli.main(["--level", "ops", "--trace-png", "x.png"])
    with pytest.raises(ValueError, match="trace_png"):
        cli.run("loop", "small", 1, trace_png="x.png")
