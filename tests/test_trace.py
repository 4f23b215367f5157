"""Traces of a real AFD decode: the Chrome/Perfetto file, the ping-pong it shows, the counters.

A tiny MoE decoder (2 MoE layers) decodes 4 steps on 2 attention ranks (threads) whose
experts are served by 2 FFN workers (threads) over shared-memory windows, with
`trace=True`: once with M = 2 micro-batches in flight, once with M = 1. The spans of every
tracer are merged, written with `write_chrome_trace`, and everything below is read back
from that file:

- it is a trace-event JSON that Chrome and Perfetto load: "M" process_name records, one
  per rank, then "X" complete events with pid / tid / ts / dur, each rank's events disjoint;
- every (layer, micro-batch) of every step has send / attention / combine / post on each
  attention rank and batch / experts / return on each FFN rank;
- with M = 2 the FFN experts of (layer l, micro-batch 0) run while the attention side
  computes (l, micro-batch 1); with M = 1 no attention span ever overlaps an experts span;
- `prometheus_lines` is valid Prometheus text whose counters equal the tokens sent, the
  rows served and the summed span durations.

Why the M = 2 overlap is not luck. `run_pipelined` sends (l, 0), then receives (l-1, 1) and
runs post(l-1, 1) and pre(l, 1); the FFN worker serves (l-1, 1), then (l, 0). So
experts(l, 0) and attention(l, 1) begin at the same event, the later of "FFN returned
(l-1, 1)" and "both ranks sent (l, 0)" (for l = 0: right after the send of (0, 0)), each
side after at most one poller back-off (`MAX_SLEEP_S` = 1 ms) plus a GIL hand-off. They
overlap whenever both last longer than that start skew, so the model is sized for spans
of several ms: hidden 768 and 64 tokens per micro-batch and rank make pre() four
64x768x768 matmuls (5-15 ms seen on 2 shared cores), and per micro-batch FFN 0 runs 256
routed rows (2 ranks x 64 tokens x top-2), FFN 1 128 shared-expert rows, through SwiGLU
768 -> 256 -> 768 in tiles of 16 (10-40 ms seen). The check asks every layer to overlap in
at least one of its 4 steps x 2 ranks x 2 FFN ranks (observed: most of them, by 10-25 ms).

With M = 1, pre(l) ends before its send, which precedes the batching that starts
experts(l); experts(l) ends before the return that combine(l), and so the next pre, waits
for: no overlap is possible at all, however long the spans.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from afd_dispatch import AFDConfig
from afd_dispatch.fixtures.tiny_moe import TinyMoEConfig, TinyMoEModel, decode
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.ffn_worker import FFNWorker
from afd_dispatch.runtime.trace import (
    Span,
    Tracer,
    merge,
    overlap_ns,
    process_label,
    prometheus_lines,
    write_chrome_trace,
)

SESSIONS, FFN_RANKS = 2, 2
TOKENS = 128  # per attention rank, split over the micro-batches
PROMPT, GENERATED = 2, 2
STEPS = PROMPT + GENERATED
MODEL = TinyMoEConfig(
    hidden_size=768,
    num_heads=8,
    num_layers=2,
    num_experts=4,
    topk=2,
    moe_intermediate_size=256,
    shared_intermediate_size=256,
)
ATTENTION_SPANS = ("attention", "send", "combine", "post")
FFN_SPANS = ("batch", "experts", "return")
JOIN_S = 60.0
MODEL_LAYERS = range(MODEL.num_layers)  # every layer of the tiny model is a MoE layer
LONG_NS = 2_000_000  # twice the pollers' largest back-off


@dataclass(frozen=True)
class TracedRun:
    micro_batches: int
    spans: list[Span]  # merged from every tracer
    counters: dict[str, dict[str, float]]  # {process: {counter: value}}
    trace: dict[str, Any]  # the Chrome trace, as loaded back from its file
    file_spans: list[Span]  # its "X" events as spans (ns, rounded from the file's us)

    def select(self, name: str, layer: int, micro_batch: int, role: str) -> list[Span]:
        return [
            s
            for s in self.file_spans
            if s.name == name
            and s.layer == layer
            and s.micro_batch == micro_batch
            and s.process.startswith(role)
        ]


@pytest.fixture(scope="module")
def model() -> TinyMoEModel:
    return TinyMoEModel(MODEL)


@pytest.fixture(scope="module")
def pingpong(model: TinyMoEModel, tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    return run_traced(model, 2, tmp_path_factory.mktemp("trace") / "m2.json")


@pytest.fixture(scope="module")
def sequential(model: TinyMoEModel, tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    return run_traced(model, 1, tmp_path_factory.mktemp("trace") / "m1.json")


@pytest.fixture(params=[2, 1], ids=["M2", "M1"])
def either(request: pytest.FixtureRequest) -> TracedRun:
    run: TracedRun = request.getfixturevalue("pingpong" if request.param == 2 else "sequential")
    return run


def run_traced(model: TinyMoEModel, micro_batches: int, path: Path) -> TracedRun:
    """Decode STEPS steps through AFD with tracing on; write and read back the trace."""
    config = AFDConfig(
        num_attention_ranks=SESSIONS,
        num_ffn_ranks=FFN_RANKS,
        micro_batch_num=micro_batches,
        max_tokens_per_micro_batch=TOKENS // micro_batches,
        shared_expert_ranks=(1,),
        backend="reference",
        batch_invariant=True,
        trace=True,
        wait_timeout_s=20.0,
        group=f"test_trace_m{micro_batches}",
    )
    deployment = Deployment(config, model.spec, torch.float32)
    gen = torch.Generator().manual_seed(micro_batches)
    prompts = [
        torch.randint(0, MODEL.vocab_size, (TOKENS, PROMPT), generator=gen) for _ in range(SESSIONS)
    ]
    errors: list[BaseException] = []

    def guarded(fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except BaseException as exc:
            errors.append(exc)

    groups = deployment.create_windows("shm")
    workers: list[FFNWorker] = []
    ffn_threads: list[threading.Thread] = []
    try:
        banks = model.expert_banks(batch_invariant=True)  # every expert; each rank uses its own
        workers = [FFNWorker(deployment, r, banks) for r in deployment.topology.ffn_ranks]
        ffn_threads = [
            threading.Thread(target=guarded, args=(w.run,), daemon=True) for w in workers
        ]
        for t in ffn_threads:
            t.start()
        endpoints = [AttentionEndpoint(deployment, s) for s in range(SESSIONS)]
        attention_threads = [
            threading.Thread(
                target=guarded,
                args=(decode, model, ep, prompts[s], GENERATED, micro_batches, ep.tracer),
                daemon=True,  # a hang fails the test (joins have deadlines), not the session
            )
            for s, ep in enumerate(endpoints)
        ]
        for t in attention_threads:
            t.start()
        for t in attention_threads:
            t.join(JOIN_S)
        assert not any(t.is_alive() for t in attention_threads), "attention ranks hung"
    finally:
        for w in workers:
            w.stop()
        for t in ffn_threads:
            t.join(JOIN_S)
        for g in groups:
            g.close()
    assert not errors, errors
    assert not any(t.is_alive() for t in ffn_threads), "FFN workers did not stop"

    spans, counters = merge([ep.tracer for ep in endpoints] + [w.tracer for w in workers])
    write_chrome_trace(path, spans)
    trace = json.loads(path.read_text(encoding="utf-8"))
    return TracedRun(micro_batches, spans, counters, trace, spans_of(trace))


def spans_of(trace: dict[str, Any]) -> list[Span]:
    """The "X" events of a trace as spans, their process named by the "M" records."""
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    return [
        Span(
            names[e["pid"]],
            e["cat"],
            round(e["ts"] * 1000),
            round((e["ts"] + e["dur"]) * 1000),
            e["args"]["layer"],
            e["args"]["micro_batch"],
        )
        for e in events
        if e["ph"] == "X"
    ]


def median_ns(spans: list[Span]) -> int:
    return sorted(s.duration_ns for s in spans)[len(spans) // 2]


def processes() -> set[str]:
    return {f"attention {s}" for s in range(SESSIONS)} | {f"FFN {r}" for r in range(FFN_RANKS)}


# -- the trace file --------------------------------------------------------------------------


def test_trace_file_is_a_chrome_trace_with_one_track_per_rank(either: TracedRun) -> None:
    trace = either.trace
    assert set(trace) == {"traceEvents", "displayTimeUnit"}
    assert trace["displayTimeUnit"] in ("ms", "ns")
    events = trace["traceEvents"]
    assert {e["ph"] for e in events} == {"M", "X"}

    meta = [e for e in events if e["ph"] == "M"]
    assert all(e["name"] == "process_name" for e in meta)
    pids = [e["pid"] for e in meta]
    assert len(pids) == len(set(pids)), "one process_name record per track"
    assert {e["args"]["name"] for e in meta} == processes()  # one track per rank
    seen: set[int] = set()
    for e in events:  # a track is named before its first event
        if e["ph"] == "M":
            seen.add(e["pid"])
        else:
            assert e["pid"] in seen

    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(either.spans)
    for e in complete:
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float))
        assert e["ts"] > 0 and e["dur"] >= 0
        layer, mb = e["args"]["layer"], e["args"]["micro_batch"]
        assert e["name"] == (e["cat"] if layer < 0 else f"{e['cat']} L{layer} mb{mb}")
    by_track: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in complete:
        by_track[e["pid"]].append(e)
    for track in by_track.values():  # one thread per rank: its spans never overlap
        track.sort(key=lambda e: e["ts"])
        for a, b in itertools.pairwise(track):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3, (a, b)

    # the file holds the tracers' timeline (to float rounding of the microsecond stamps)
    assert len(either.file_spans) == len(either.spans)
    for mine, read in zip(
        sorted(either.spans, key=lambda s: (s.start_ns, s.process)),
        sorted(either.file_spans, key=lambda s: (s.start_ns, s.process)),
        strict=True,
    ):
        assert (mine.process, mine.name, mine.layer, mine.micro_batch) == (
            read.process,
            read.name,
            read.layer,
            read.micro_batch,
        )
        assert abs(mine.start_ns - read.start_ns) <= 1000
        assert abs(mine.end_ns - read.end_ns) <= 1000


def test_every_layer_and_micro_batch_is_traced_on_both_sides(either: TracedRun) -> None:
    layers = list(MODEL_LAYERS)
    counts = Counter((s.process, s.name, s.layer, s.micro_batch) for s in either.file_spans)
    for m in range(either.micro_batches):
        for layer in layers:
            for s in range(SESSIONS):
                for name in ATTENTION_SPANS:
                    assert counts[(f"attention {s}", name, layer, m)] == STEPS, (s, name, layer, m)
            for r in range(FFN_RANKS):
                for name in FFN_SPANS:
                    assert counts[(f"FFN {r}", name, layer, m)] == STEPS, (r, name, layer, m)
    expected_names = {(f"attention {s}", n) for s in range(SESSIONS) for n in ATTENTION_SPANS} | {
        (f"FFN {r}", n) for r in range(FFN_RANKS) for n in FFN_SPANS
    }
    assert {(p, n) for p, n, _, _ in counts} == expected_names
    stray = [k for k in counts if k[2] not in layers or k[3] not in range(either.micro_batches)]
    # only a worker's last wait, ended by stop(), is a batch without a layer
    assert all(k[1] == "batch" and k[2] == -1 for k in stray), stray
    assert all(counts[k] <= 1 for k in stray), stray


# -- overlap ---------------------------------------------------------------------------------


def test_ping_pong_overlaps_ffn_experts_with_next_micro_batch_attention(
    pingpong: TracedRun,
) -> None:
    report = []
    for layer in MODEL_LAYERS:
        experts = pingpong.select("experts", layer, 0, "FFN")
        attention = pingpong.select("attention", layer, 1, "attention")
        assert len(experts) == FFN_RANKS * STEPS and len(attention) == SESSIONS * STEPS
        # spans long enough that overlapping is not a matter of luck (see the module doc)
        assert median_ns(attention) > LONG_NS and median_ns(experts) > LONG_NS
        amounts = [overlap_ns([e], [a]) for e in experts for a in attention]
        report.append((layer, overlap_ns(experts, attention), sorted(amounts)[-3:]))
        assert max(amounts) > 0, (
            f"layer {layer}: FFN experts of mb 0 never ran during attention of mb 1"
        )
        # and the data dependencies hold on the shared clock: experts of a micro-batch
        # never run while that same micro-batch's attention is computed
        for m in range(2):
            same = pingpong.select("attention", layer, m, "attention")
            assert overlap_ns(pingpong.select("experts", layer, m, "FFN"), same) == 0
    print("overlap per layer (ns): total, largest pairs:", report)


def test_one_micro_batch_alternates_attention_and_experts(sequential: TracedRun) -> None:
    attention = [s for s in sequential.file_spans if s.name == "attention"]
    experts = [s for s in sequential.file_spans if s.name == "experts"]
    assert len(attention) == SESSIONS * STEPS * MODEL.num_layers
    assert len(experts) == FFN_RANKS * STEPS * MODEL.num_layers
    assert median_ns(attention) > LONG_NS and median_ns(experts) > LONG_NS  # long, yet disjoint
    assert overlap_ns(attention, experts) == 0
    # alternation, layer by layer: all of pre(l), then experts(l), then pre(l + 1)
    timeline = sorted(attention + experts, key=lambda s: s.start_ns)
    blocks = [timeline[0].name]
    for s in timeline[1:]:
        if s.name != blocks[-1]:
            blocks.append(s.name)
    assert blocks == ["attention", "experts"] * (STEPS * MODEL.num_layers)


# -- counters --------------------------------------------------------------------------------


def read_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(metric, labels): value} of Prometheus text, read by prometheus_client's parser;
    no sample twice."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return samples


def test_prometheus_counters_count_the_run(either: TracedRun) -> None:
    text = prometheus_lines(either.counters)
    samples = read_samples(text)
    by = {(name, labels): v for (name, (labels,)), v in samples.items()}  # one label each
    layers, k, shared = MODEL.num_layers, MODEL.topk, 1

    sent = {s: by[("afd_tokens_sent_total", ("session", str(s)))] for s in range(SESSIONS)}
    assert sent == {s: STEPS * layers * TOKENS for s in range(SESSIONS)}
    # FFN 0 hosts the routed experts, FFN 1 (alone) the shared one: K rows, 1 row a token
    rows = [by[("afd_rows_served_total", ("ffn_rank", str(r)))] for r in range(FFN_RANKS)]
    assert rows == [k * sum(sent.values()), shared * sum(sent.values())]
    for r in range(FFN_RANKS):
        served = by[("afd_micro_batches_served_total", ("ffn_rank", str(r)))]
        assert served == STEPS * layers * either.micro_batches  # every rank serves every slot

    durations: dict[tuple[str, str], int] = defaultdict(int)
    for s in either.file_spans:
        durations[(f"afd_{s.name}_seconds_total", process_label(s.process))] += s.duration_ns
    seconds = {key: v for key, v in by.items() if key[0].endswith("_seconds_total")}
    assert set(seconds) == set(durations)
    for key, total_ns in durations.items():
        assert math.isclose(seconds[key], total_ns / 1e9, rel_tol=1e-6, abs_tol=1e-8), key

    names = {name for name, _ in by}
    assert names == {f"afd_{n}_seconds_total" for n in ATTENTION_SPANS + FFN_SPANS} | {
        "afd_tokens_sent_total",
        "afd_rows_served_total",
        "afd_micro_batches_served_total",
    }


def test_prometheus_values_and_labels_read_back_exactly() -> None:
    big, odd = Tracer('FFN "7"\\x\n'), Tracer("attention 0")
    big.count("rows_served_total", 2**40 + 1)  # past 1e9: ".9g" would have rounded it
    big.count("rows_served_total", 2)
    odd.count("tokens_sent_total", 0.1)
    odd.count("tokens_sent_total", 0.2)
    odd.count("d\u00e9j\u00e0-vu", 1)  # a metric name is ASCII [a-zA-Z0-9_:] only
    pool = Tracer("pool")
    pool.count("ffn_ranks_up", 2)  # no _total: a gauge
    samples = read_samples(prometheus_lines(merge([big, odd, pool])[1]))
    assert samples == {
        ("afd_d_j__vu", (("session", "0"),)): 1.0,
        ("afd_ffn_ranks_up", (("process", "pool"),)): 2.0,
        ("afd_rows_served_total", (("ffn_rank", '"7"\\x\n'),)): float(2**40 + 3),
        ("afd_tokens_sent_total", (("session", "0"),)): 0.1 + 0.2,
    }


# -- the helpers -----------------------------------------------------------------------------


def span(start: int, end: int, process: str = "p", name: str = "n") -> Span:
    return Span(process, name, start, end)


def test_overlap_counts_shared_time_once() -> None:
    a = [span(0, 10), span(5, 20), span(30, 40)]  # union: [0, 20) and [30, 40)
    b = [span(15, 35), span(18, 19)]
    assert overlap_ns(a, b) == 5 + 5
    assert overlap_ns(b, a) == 10
    assert overlap_ns([span(0, 10)], [span(10, 20)]) == 0  # touching ends do not overlap
    assert overlap_ns([], a) == 0
    assert overlap_ns(a, a) == 30


def test_merge_orders_spans_and_adds_counters_of_one_process() -> None:
    first, second, other = Tracer("FFN 0"), Tracer("FFN 0"), Tracer("attention 0")
    first.record("experts", 50, 70, 1, 0)
    second.record("experts", 10, 20, 0, 1)
    other.record("send", 30, 40, 1, 0)
    first.count("rows_served_total", 3)
    second.count("rows_served_total", 4)
    spans, counters = merge([first, second, other])
    assert [(s.process, s.name, s.start_ns) for s in spans] == [
        ("FFN 0", "experts", 10),
        ("attention 0", "send", 30),
        ("FFN 0", "experts", 50),
    ]
    assert counters["FFN 0"]["rows_served_total"] == 7
    assert math.isclose(counters["FFN 0"]["experts_seconds_total"], 30e-9)
    assert counters["attention 0"] == {"send_seconds_total": pytest.approx(10e-9)}
    off = Tracer("off", enabled=False)
    off.record("send", 0, 1)
    with off.span("send"):
        off.count("tokens_sent_total", 0)  # counters are kept even when spans are off
    spans, counters = off.snapshot()
    assert spans == []
    assert counters["tokens_sent_total"] == 0.0
    assert counters["send_seconds_total"] > 1e-9  # the span's time, beside the recorded 1 ns
