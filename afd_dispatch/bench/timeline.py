"""One decode step of an AFD vLLM server, phase by phase, from its spans.

The input is what an AFD server started with `"trace": true` and `AFD_TRACE_DIR` dumps
(`integrations/vllm/metrics.py`): Chrome traces of the attention session's spans ("moe"
around each MoE layer's hook call, "send" and "combine" per micro-batch, and a "forward"
mark where each model forward reaches its first MoE layer, with its tokens) and of the FFN
ranks' spans ("batch": waiting for a micro-batch and batching it, "experts", "return").
Every span is on CLOCK_MONOTONIC, which all processes of one host share.

A *step* runs from one forward's mark to the next on one attention session: everything
vLLM does per decode step (sampling, scheduling, the next forward's embedding and
attention) lies in it once. The attention session is the critical path of a step (one
thread runs it all), so `profile` splits each of its nanoseconds into exactly one phase:

- `vllm`: outside any AFD span: vLLM's own work (attention, norms, router, sampling,
  scheduler) and its waits;
- `afd_host`: inside a MoE hook call but in neither send nor combine (staging the tokens,
  dtype casts, the endpoint's checks);
- `send`: the A2F op (`npu_attention_to_ffn`: routing and copying rows to the FFN ranks);
- inside a combine, until the last FFN rank that serves the micro-batch has returned it
  (its "return" span ends), by what that rank was doing: `ffn_batching` (its batch span
  after the send ended: its wake-up and `npu_ffn_worker_batching`), `ffn_experts`,
  `ffn_return` (`npu_ffn_to_attention`: copying rows back), `ffn_gap` (in none of its
  spans: its loop's own code, or no CPU);
- `combine`: the rest of the combine (its wake-up and `npu_attention_worker_combine`'s
  weighted sum).

The phases add up to the step's duration. Wall-clock phases cannot tell work from waiting
for a CPU, so where the session also recorded its thread's CPU accounting (at each hook
call's entry and where each of its spans ends: `CpuMark`), `StepProfile.thread` splits the
step once more, by where the thread was (`THREAD_REGIONS`) and what it did: on a CPU,
runnable without one, asleep (`THREAD_STATES`). `render` draws one step as a Gantt chart
(the attention session, its thread, every FFN rank) above the phase split; `phase_table`
prints it. Times are ns throughout, ms in the table and the picture.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from afd_dispatch.integrations.vllm.metrics import CPU, FORWARD, add_marks
from afd_dispatch.runtime.trace import Span, chrome_trace

NS_PER_MS = 1e6
# (key, label, colour): the attention session's phases, in the order they are printed
PHASES = (
    ("vllm", "vLLM's own work (attention, norms, router, sampling, scheduler)", "#9e9e9e"),
    ("afd_host", "AFD host code around the ops (staging, casts, checks)", "#ffcc80"),
    ("send", "send: A2F row copies (attention_to_ffn)", "#1f77b4"),
    ("ffn_batching", "waiting: FFN wake-up + batching (ffn_worker_batching)", "#17becf"),
    ("ffn_experts", "waiting: FFN experts", "#2ca02c"),
    ("ffn_return", "waiting: FFN return, F2A row copies (ffn_to_attention)", "#9467bd"),
    ("ffn_gap", "waiting: FFN rank between its spans (its loop, no CPU)", "#d62728"),
    ("combine", "combine: wake-up + weighted sum (attention_worker_combine)", "#ff7f0e"),
)
PHASE_KEYS = tuple(key for key, _, _ in PHASES)
LABELS = {key: label for key, label, _ in PHASES}
COLOURS = {key: colour for key, _, colour in PHASES}
# an FFN rank's states; the colours match the attention phases they cause
FFN_STATES = (
    ("wait", "FFN: waiting for the attention side", "#ececec"),
    ("batching", "FFN: wake-up + batching", COLOURS["ffn_batching"]),
    ("experts", "FFN: experts", COLOURS["ffn_experts"]),
    ("return", "FFN: return (F2A)", COLOURS["ffn_return"]),
    ("loop", "FFN: between its spans", COLOURS["ffn_gap"]),
)
FFN_COLOURS = {key: colour for key, _, colour in FFN_STATES}
# what each phase is, for the grouped summary: vLLM's own work, the copies AFD makes by
# definition (the four ops), the experts (colocated vLLM runs them too), AFD overhead
GROUPS = (
    ("vLLM's own work", ("vllm",)),
    ("AFD's four ops (A2F, batching, F2A, combine)",
     ("send", "ffn_batching", "ffn_return", "combine")),
    ("FFN experts", ("ffn_experts",)),
    ("AFD overhead (host code, FFN loop / no CPU)", ("afd_host", "ffn_gap")),
)  # fmt: skip
_FFN_PHASE = {"batch": "ffn_batching", "experts": "ffn_experts", "return": "ffn_return"}
# the attention thread's time over a step, between CPU marks (taken at each hook call's
# entry and where each of its spans ends): by the span that ends an interval (a send with
# the staging before it; a combine with its wait; a hook call's end), else outside AFD
THREAD_REGIONS = (
    ("vllm", "outside AFD (vLLM's own work)"),
    ("send", "up to each A2F send's end (staging + send)"),
    ("combine", "up to each combine's end (waiting + combine)"),
    ("afd_host", "the rest of AFD's hook calls"),
)
THREAD_STATES = (
    ("on_cpu", "on a CPU"),
    ("no_cpu", "runnable, waiting for a CPU"),
    ("asleep", "asleep"),
)


@dataclass(frozen=True)
class Forward:
    """Where a model forward of attention `process` reached its first MoE layer
    (`start_ns`, CLOCK_MONOTONIC ns) and how many tokens it ran."""

    process: str
    start_ns: int
    tokens: int


@dataclass(frozen=True)
class CpuMark:
    """The CPU accounting of attention `process`'s model thread at `at_ns` (CLOCK_MONOTONIC
    ns), taken at every MoE hook call's entry and where each of its spans ends: cumulative
    ns on a CPU (`run_ns`) and runnable but waiting for one (`wait_ns`)."""

    process: str
    at_ns: int
    run_ns: int
    wait_ns: int


@dataclass
class Trace:
    """Spans, forward marks and CPU marks of any number of processes, on one time axis."""

    spans: list[Span] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    cpu: list[CpuMark] = field(default_factory=list)

    @classmethod
    def from_documents(cls, documents: Iterable[Mapping[str, Any]]) -> Trace:
        """Read Chrome traces as `chrome_trace` and `metrics.trace_document` write them
        (timestamps in us, read back to the ns); a span in several documents counts once."""
        spans: set[Span] = set()
        forwards: set[Forward] = set()
        cpu: set[CpuMark] = set()
        for document in documents:
            events = document.get("traceEvents", [])
            names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
            for e in events:
                process = names.get(e.get("pid"))
                if process is None or e.get("ph") not in ("X", "i", "C"):
                    continue
                start = round(float(e["ts"]) * 1000)
                if e.get("ph") == "X":
                    args = e.get("args", {})
                    end = start + round(float(e["dur"]) * 1000)
                    layer, micro_batch = (
                        int(args.get("layer", -1)),
                        int(args.get("micro_batch", -1)),
                    )
                    spans.add(Span(process, str(e["cat"]), start, end, layer, micro_batch))
                elif e.get("ph") == "i" and e.get("cat") == FORWARD:
                    forwards.add(Forward(process, start, int(e["args"]["tokens"])))
                elif e.get("ph") == "C" and e.get("name") == CPU:
                    args = e["args"]
                    cpu.add(CpuMark(process, start, int(args["run_ns"]), int(args["wait_ns"])))
        return cls(
            sorted(spans, key=lambda s: (s.start_ns, s.process, s.name)),
            sorted(forwards, key=lambda f: (f.start_ns, f.process)),
            sorted(cpu, key=lambda c: (c.at_ns, c.process)),
        )

    def window(self, start_ns: int, end_ns: int) -> Trace:
        """The spans that overlap [start_ns, end_ns), the forward and CPU marks in [start_ns,
        end_ns]."""
        return Trace(
            [s for s in self.spans if s.end_ns > start_ns and s.start_ns < end_ns],
            [f for f in self.forwards if start_ns <= f.start_ns <= end_ns],
            [c for c in self.cpu if start_ns <= c.at_ns <= end_ns],
        )

    def processes(self) -> set[str]:
        return {s.process for s in self.spans} | {f.process for f in self.forwards}

    def chrome(self) -> dict[str, Any]:
        """All of it as one Chrome/Perfetto trace (one track per process)."""
        document = chrome_trace(self.spans)
        for process in sorted({f.process for f in self.forwards} | {c.process for c in self.cpu}):
            add_marks(
                document,
                process,
                [(f.start_ns, f.tokens) for f in self.forwards if f.process == process],
                [(c.at_ns, c.run_ns, c.wait_ns) for c in self.cpu if c.process == process],
            )
        return document


@dataclass(frozen=True)
class Step:
    """One step of attention `process`: from a forward's mark to the next one's (ns)."""

    process: str
    start_ns: int
    end_ns: int
    tokens: int

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


def steps(trace: Trace, process: str = "attention 0", tokens: int | None = None) -> list[Step]:
    """The steps of `process` between consecutive forward marks; with `tokens`, only those
    whose forward and the next both ran exactly that many tokens (steady decode steps)."""
    marks = sorted((f for f in trace.forwards if f.process == process), key=lambda f: f.start_ns)
    return [
        Step(process, a.start_ns, b.start_ns, a.tokens)
        for a, b in itertools.pairwise(marks)
        if tokens is None or a.tokens == b.tokens == tokens
    ]


@dataclass(frozen=True)
class Segment:
    """[start_ns, end_ns) of a row spent in `state` (a phase key, or an FFN state)."""

    start_ns: int
    end_ns: int
    state: str

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass
class StepProfile:
    """A step split into phases (ns per `PHASE_KEYS` key, summing to the step's duration),
    the segments of each row (the attention session's, in phase keys; each FFN rank's, in
    `FFN_STATES` keys), its MoE layers (start, end, layer) for labels, and, where the trace
    has CPU marks, what the attention session's thread did (`THREAD_REGIONS` x
    `THREAD_STATES`, ns; they add up to the step's duration)."""

    step: Step
    phases: dict[str, int]
    rows: dict[str, list[Segment]]
    layers: list[tuple[int, int, int]]
    thread: dict[tuple[str, str], int] | None = None
    # (start, end, region, ns on a CPU, ns runnable without one) between consecutive marks
    thread_intervals: list[tuple[int, int, str, int, int]] = field(default_factory=list)


def _paint(
    start_ns: int, end_ns: int, intervals: Sequence[tuple[int, int, int, str]], default: str
) -> list[Segment]:
    """[start_ns, end_ns) as segments: each instant takes the state of the highest-priority
    interval (start, end, priority, state) covering it, else `default`; neighbours with one
    state merged."""
    clipped = [
        (max(a, start_ns), min(b, end_ns), p, s)
        for a, b, p, s in intervals
        if a < end_ns and b > start_ns
    ]
    bounds = sorted({start_ns, end_ns, *(a for a, *_ in clipped), *(b for _, b, *_ in clipped)})
    segments: list[Segment] = []
    for lo, hi in itertools.pairwise(bounds):
        if hi <= lo:
            continue
        best, state = -1, default
        for a, b, p, s in clipped:
            if a <= lo and hi <= b and p > best:
                best, state = p, s
        if segments and segments[-1].state == state and segments[-1].end_ns == lo:
            segments[-1] = Segment(segments[-1].start_ns, hi, state)
        else:
            segments.append(Segment(lo, hi, state))
    return segments


def _latest(spans: Iterable[Span], name: str, key: tuple[int, int], before_ns: int) -> Span | None:
    """The latest-starting span `name` of (layer, micro-batch) `key` starting <= before_ns."""
    found = [
        s
        for s in spans
        if s.name == name and (s.layer, s.micro_batch) == key and s.start_ns <= before_ns
    ]
    return max(found, key=lambda s: s.start_ns, default=None)


def profile(trace: Trace, step: Step) -> StepProfile:
    """Split `step` into `PHASES` (see the module's docstring) and lay out every row."""
    s0, s1 = step.start_ns, step.end_ns
    mine = [s for s in trace.spans if s.process == step.process]
    ffn: dict[str, list[Span]] = {}
    for s in trace.spans:
        if s.process.startswith("FFN "):
            ffn.setdefault(s.process, []).append(s)
    sends = [s for s in trace.spans if s.process.startswith("attention ") and s.name == "send"]
    intervals: list[tuple[int, int, int, str]] = []
    layers: list[tuple[int, int, int]] = []
    for span in mine:
        if span.end_ns <= s0 or span.start_ns >= s1:
            continue
        if span.name == "moe":
            intervals.append((span.start_ns, span.end_ns, 1, "afd_host"))
            layers.append((span.start_ns, span.end_ns, span.layer))
        elif span.name == "send":
            intervals.append((span.start_ns, span.end_ns, 2, "send"))
        elif span.name == "combine":
            intervals += _combine_phases(span, mine, ffn)
    attention = _paint(s0, s1, intervals, "vllm")
    phases = dict.fromkeys(PHASE_KEYS, 0)
    for segment in attention:
        phases[segment.state] += segment.duration_ns
    rows = {step.process: attention}
    for process in sorted(ffn, key=_rank_order):
        rows[process] = _ffn_row(ffn[process], sends, s0, s1)
    hooks = [(a, b) for a, b, _ in layers]
    pieces = _thread_intervals(trace, step, hooks)
    thread = None
    if pieces:
        thread = {(r, s): 0 for r, _ in THREAD_REGIONS for s, _ in THREAD_STATES}
        for a, b, region, on, waiting in pieces:
            thread[(region, "on_cpu")] += on
            thread[(region, "no_cpu")] += waiting
            thread[(region, "asleep")] += b - a - on - waiting
    return StepProfile(step, phases, rows, sorted(layers), thread, pieces)


def _thread_intervals(
    trace: Trace, step: Step, hooks: Sequence[tuple[int, int]]
) -> list[tuple[int, int, str, int, int]]:
    """The attention thread between consecutive CPU marks over `step`: (start, end, the
    `THREAD_REGIONS` key, ns on a CPU, ns runnable without one); `hooks` are the step's hook
    calls (start, end). Empty unless marks bound the step."""
    marks = [c for c in trace.cpu if c.process == step.process and step.start_ns <= c.at_ns]
    marks = [c for c in marks if c.at_ns <= step.end_ns]
    if len(marks) < 2 or marks[0].at_ns != step.start_ns or marks[-1].at_ns != step.end_ns:
        return []
    ends = {
        s.end_ns: s.name
        for s in trace.spans
        if s.process == step.process and s.name in ("send", "combine")
        and step.start_ns < s.end_ns <= step.end_ns
    }  # fmt: skip
    out = []
    for a, b in itertools.pairwise(marks):
        middle = (a.at_ns + b.at_ns) // 2
        inside = any(lo <= middle < hi for lo, hi in hooks)
        region = ends.get(b.at_ns, "afd_host") if inside else "vllm"
        out.append((a.at_ns, b.at_ns, region, b.run_ns - a.run_ns, b.wait_ns - a.wait_ns))
    return out


def _combine_phases(
    combine: Span, mine: Sequence[Span], ffn: Mapping[str, Sequence[Span]]
) -> list[tuple[int, int, int, str]]:
    """A combine span's pieces: waiting (by what the last FFN rank to answer did), then
    the combine proper once every FFN rank has returned the micro-batch."""
    key = (combine.layer, combine.micro_batch)
    send = _latest(mine, "send", key, combine.start_ns)
    sent_start = send.start_ns if send is not None else combine.start_ns
    sent_end = send.end_ns if send is not None else combine.start_ns
    finished: dict[str, int] = {}  # FFN rank -> when its answer for this micro-batch was out
    for process, spans in ffn.items():
        ours = [s for s in spans if (s.layer, s.micro_batch) == key]
        returns = [
            s.end_ns
            for s in ours
            if s.name == "return" and sent_start <= s.start_ns <= combine.end_ns
        ]
        batches = [
            s.end_ns for s in ours if s.name == "batch" and sent_start <= s.end_ns <= combine.end_ns
        ]
        if returns:
            finished[process] = max(returns)
        elif batches:  # no row routed to this rank: it answers when its batch is done
            finished[process] = max(batches)
    if not finished:  # no FFN spans (not traced): the whole combine is unattributed waiting
        return [(combine.start_ns, combine.end_ns, 2, "ffn_gap")]
    critical = max(finished, key=lambda p: finished[p])
    done = max(combine.start_ns, min(finished[critical], combine.end_ns))
    pieces = [(combine.start_ns, done, 2, "ffn_gap"), (done, combine.end_ns, 3, "combine")]
    for s in ffn[critical]:
        if s.name in _FFN_PHASE and s.end_ns > combine.start_ns and s.start_ns < done:
            lo = max(s.start_ns, combine.start_ns, sent_end if s.name == "batch" else 0)
            hi = min(s.end_ns, done)
            if hi > lo:
                pieces.append((lo, hi, 3, _FFN_PHASE[s.name]))
    return pieces


def _ffn_row(spans: Sequence[Span], sends: Sequence[Span], s0: int, s1: int) -> list[Segment]:
    """An FFN rank's states over [s0, s1): its batch span split where the micro-batch's
    last send ended (before: waiting for it; after: wake-up and batching)."""
    intervals: list[tuple[int, int, int, str]] = []
    for s in spans:
        if s.end_ns <= s0 or s.start_ns >= s1:
            continue
        if s.name == "batch":
            arrived = s.end_ns  # a wait that ended without a batch (layer -1): all waiting
            if s.layer >= 0:
                key = (s.layer, s.micro_batch)
                senders = {send.process for send in sends}
                last = [
                    _latest((t for t in sends if t.process == p), "send", key, s.end_ns)
                    for p in senders
                ]
                arrived = min(
                    max((t.end_ns for t in last if t is not None), default=s.start_ns), s.end_ns
                )
            arrived = max(arrived, s.start_ns)
            intervals.append((s.start_ns, arrived, 1, "wait"))
            intervals.append((arrived, s.end_ns, 1, "batching"))
        elif s.name in ("experts", "return"):
            intervals.append((s.start_ns, s.end_ns, 2, s.name))
    return _paint(s0, s1, intervals, "loop")


def _rank_order(process: str) -> tuple[str, int]:
    role, _, rank = process.rpartition(" ")
    return (role, int(rank)) if rank.isdigit() else (process, -1)


def typical(profiles: Sequence[StepProfile]) -> StepProfile:
    """The step of median duration (the lower middle one of an even count)."""
    if not profiles:
        raise ValueError("no steps to choose from")
    ordered = sorted(profiles, key=lambda p: p.step.duration_ns)
    return ordered[(len(ordered) - 1) // 2]


def mean_phases(profiles: Sequence[StepProfile]) -> dict[str, float]:
    """Each phase's mean over `profiles`, in ns (they add up to the mean step)."""
    if not profiles:
        raise ValueError("no steps to average")
    return {k: statistics.fmean(p.phases[k] for p in profiles) for k in PHASE_KEYS}


def mean_thread(profiles: Sequence[StepProfile]) -> dict[tuple[str, str], float] | None:
    """The attention thread's (region, state) ns, mean over the `profiles` that have them;
    None if none has."""
    known = [p.thread for p in profiles if p.thread is not None]
    if not known:
        return None
    return {key: statistics.fmean(t[key] for t in known) for key in known[0]}


def phase_table(
    profiles: Sequence[StepProfile],
    pictured: StepProfile,
    references: Mapping[str, float] | None = None,
) -> str:
    """The phase split as text: the pictured step's ms, the mean over `profiles` in ms
    and as a share of the mean step, the groups, what the attention thread did (on a CPU,
    waiting for one, asleep), then `references` ({label: ms})."""
    mean = mean_phases(profiles)
    total = sum(mean.values())
    width = max(len(label) for label in LABELS.values())
    head = f"{'phase':<{width}}  {'pictured ms':>11}  {'mean ms':>8}  {'share':>6}"
    lines = [
        f"one decode step of {pictured.step.process} ({pictured.step.tokens} tokens), "
        f"phase by phase; mean over {len(profiles)} steps",
        head,
        "-" * len(head),
    ]
    for key in PHASE_KEYS:
        lines.append(
            f"{LABELS[key]:<{width}}  {pictured.phases[key] / NS_PER_MS:>11.3f}  "
            f"{mean[key] / NS_PER_MS:>8.3f}  {mean[key] / total:>6.1%}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{'step':<{width}}  {pictured.step.duration_ns / NS_PER_MS:>11.3f}  "
        f"{total / NS_PER_MS:>8.3f}  {1:>6.1%}"
    )
    for name, keys in GROUPS:
        part = sum(mean[k] for k in keys)
        lines.append(f"  {name}: {part / NS_PER_MS:.3f} ms ({part / total:.1%})")
    thread = mean_thread(profiles)
    if thread is not None:
        lines.append(f"the attention thread per step (mean, ms; {STATE_SOURCE}):")
        for region, where in THREAD_REGIONS:
            states = ", ".join(
                f"{what} {max(0.0, thread[(region, state)]) / NS_PER_MS:.3f}"
                for state, what in THREAD_STATES
            )
            lines.append(f"  {where}: {states}")
    for label, ms in (references or {}).items():
        lines.append(f"  {label}: {ms:.3f} ms")
    return "\n".join(lines)


STATE_SOURCE = (
    "thread CPU clock and schedstat run delay at each MoE hook call's entry and span ends"
)
