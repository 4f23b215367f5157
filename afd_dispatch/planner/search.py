"""The AFD search: which (A, F, F_s) layouts to try, and for each M the BS that fits and
meets the target (`Target`), best plan first (`SearchResult`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

from afd_dispatch.errors import check
from afd_dispatch.layout import MAX_TOKENS_PER_MICRO_BATCH
from afd_dispatch.planner.cost import evaluate
from afd_dispatch.planner.hardware import HardwareProfile
from afd_dispatch.planner.plan import Plan
from afd_dispatch.planner.shape import AFDLayout, ModelShape, Precision, Workload
from afd_dispatch.topology import MAX_RANKS_PER_ROLE


# -- the search ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What to optimise: with ``tpot_s``, the most tokens/s/die with TPOT <= tpot_s; with
    ``throughput_per_die``, the lowest TPOT reaching it; with neither, the most tokens/s/die."""

    tpot_s: float | None = None
    throughput_per_die: float | None = None

    def __post_init__(self) -> None:
        check(
            self.tpot_s is None or self.throughput_per_die is None,
            "target",
            "at most one of a TPOT and a throughput target",
            (self.tpot_s, self.throughput_per_die),
        )
        for name in ("tpot_s", "throughput_per_die"):
            value = getattr(self, name)
            check(value is None or value > 0, name, "> 0", value)


@dataclass(frozen=True)
class SearchResult:
    """The best plan (None when no layout meets the target) and every feasible candidate,
    best first. ``fastest`` is the lowest-TPOT layout that fits, target or not."""

    best: Plan | None
    candidates: tuple[Plan, ...]
    fastest: Plan | None
    searched: int = 0
    notes: tuple[str, ...] = field(default=())


# Plans within TIE of the best tokens/s/die count as equal and the smaller deployment wins:
# the calibration spread is about that wide, and a bigger EP domain always gains a little.
TIE = 0.05
MAX_DIES = 768  # one Atlas 900 A3 SuperPoD: 384 Ascend 910C, two dies each
RATIOS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
MICRO_BATCHES = (1, 2, 3)


def shared_dies_for(shape: ModelShape, routed_dies: int) -> int:
    """F_s: FFN dies for the shared expert so that its FLOPs per die match the routed ones'.

    A token costs ``K * I`` routed and ``S * I_s`` shared intermediate columns; F_r dies
    share the routed ones, so ``F_s = max(1, round(F_r * S * I_s / (K * I)))`` (0 when the
    model has no shared expert).
    """
    moe = shape.moe
    if not moe.num_shared_experts:
        return 0
    shared = moe.num_shared_experts * moe.shared_intermediate_size
    return max(1, round(routed_dies * shared / (moe.topk * moe.moe_intermediate_size)))


def split_ffn_dies(shape: ModelShape, num_ffn_ranks: int) -> int:
    """F_s out of a fixed F: the same balance, ``F * S * I_s / (K * I + S * I_s)``, kept
    in [1, F - 1] (0 when the model has no shared expert or F = 1)."""
    moe = shape.moe
    if not moe.num_shared_experts or num_ffn_ranks < 2:
        return 0
    shared = moe.num_shared_experts * moe.shared_intermediate_size
    share = shared / (moe.topk * moe.moe_intermediate_size + shared)
    return min(num_ffn_ranks - 1, max(1, round(num_ffn_ranks * share)))


def min_routed_dies(shape: ModelShape, hw: HardwareProfile, precision: Precision) -> int:
    """The fewest FFN dies whose HBM holds every routed expert of every MoE layer."""
    per_expert = shape.expert_params * shape.num_moe_layers * precision.weight_bytes
    fit = int(hw.usable_hbm_bytes // per_expert)  # experts one die holds
    check(fit >= 1, "hardware", "room for at least one expert of every layer per die", fit)
    return math.ceil(shape.moe.num_experts / fit)


def _routed_candidates(shape: ModelShape, lowest: int, limit: int) -> list[int]:
    """F_r values worth trying: divisors of N (even expert split) from ``lowest`` up."""
    n = shape.moe.num_experts
    out = [d for d in range(lowest, min(n, limit) + 1) if n % d == 0]
    return out[:4] or [lowest]


class _Priced:
    """`evaluate` for one (A, F, F_s, M) as a function of BS, remembering what it priced."""

    def __init__(
        self,
        shape: ModelShape,
        hw: HardwareProfile,
        precision: Precision,
        workload: Workload,
        a: int,
        f: int,
        f_s: int,
        m: int,
    ) -> None:
        self.args = (shape, hw, precision, workload)
        self.dims = (a, f, m, f_s)
        self.cache: dict[int, Plan] = {}

    def __call__(self, bs: int) -> Plan:
        if bs not in self.cache:
            a, f, m, f_s = self.dims
            self.cache[bs] = evaluate(*self.args, AFDLayout(a, f, m, bs, f_s))
        return self.cache[bs]

    def fits(self, bs: int) -> bool:
        return self(bs).fits

    def within(self, tpot_s: float, bs: int) -> bool:
        return self(bs).tpot_s <= tpot_s

    def reaches(self, throughput: float, bs: int) -> bool:
        return self(bs).throughput_per_die >= throughput


def largest(ok: Callable[[int], bool], hi: int) -> int:
    """The largest BS in [1, hi] with ok(BS) true, for ok true-then-false (0 if none)."""
    lo, top = 0, hi
    while lo < top:
        mid = (lo + top + 1) // 2
        if ok(mid):
            lo = mid
        else:
            top = mid - 1
    return lo


def smallest(ok: Callable[[int], bool], hi: int) -> int:
    """The smallest BS in [1, hi] with ok(BS) true, for ok false-then-true (0 if none)."""
    if hi < 1 or not ok(hi):
        return 0
    lo, top = 1, hi
    while lo < top:
        mid = (lo + top) // 2
        if ok(mid):
            top = mid
        else:
            lo = mid + 1
    return lo


def layouts(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    *,
    fixed: tuple[int, int] | None = None,
    dies: int | None = None,
    shared_experts: str = "ffn",
    max_dies: int = MAX_DIES,
) -> list[tuple[int, int, int]]:
    """(A, F, F_s) triples the search tries.

    ``fixed``: exactly that (A, F), F_s by `split_ffn_dies`. Otherwise F_r runs over the
    first divisors of N that hold every expert (`min_routed_dies`), F_s by
    `shared_dies_for`, F = F_r + F_s; then A = dies - F with ``dies``, or A = round(r * F)
    for every r in `RATIOS` while A + F <= ``max_dies`` (default: one A3 SuperPoD).
    """
    check(
        shared_experts in ("ffn", "attention"),
        "shared_experts",
        "'ffn' or 'attention'",
        shared_experts,
    )
    on_ffn = shared_experts == "ffn"
    if fixed is not None:
        a, f = fixed
        return [(a, f, split_ffn_dies(shape, f) if on_ffn else 0)]
    lowest = min_routed_dies(shape, hw, precision)
    out: list[tuple[int, int, int]] = []
    for f_r in _routed_candidates(shape, lowest, MAX_RANKS_PER_ROLE):
        f_s = shared_dies_for(shape, f_r) if on_ffn else 0
        f = f_r + f_s
        if f > MAX_RANKS_PER_ROLE:
            continue
        if dies is not None:
            if f < dies and dies - f <= MAX_RANKS_PER_ROLE:
                out.append((dies - f, f, f_s))
            continue
        for r in RATIOS:
            a = max(1, round(r * f))
            if a + f <= max_dies and a <= MAX_RANKS_PER_ROLE and (a, f, f_s) not in out:
                out.append((a, f, f_s))
    return out


def search(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    workload: Workload,
    target: Target,
    *,
    fixed: tuple[int, int] | None = None,
    dies: int | None = None,
    micro_batches: Iterable[int] = MICRO_BATCHES,
    max_tokens: int = MAX_TOKENS_PER_MICRO_BATCH,
    shared_experts: str = "ffn",
    max_dies: int = MAX_DIES,
) -> SearchResult:
    """Try every layout of `layouts` with each M and pick BS, then the best plan.

    For each (A, F, M): BS_mem = the largest BS whose memory fits; then, with a TPOT
    target, the largest BS <= BS_mem meeting it (TPOT grows with BS); with a throughput
    target, the smallest BS reaching it (throughput per die grows with BS); with no target,
    BS_mem. Best: most tokens/s/die (TPOT or no target; plans within `TIE` of the best
    count as equal and the one with fewer dies, then fewer micro-batches, wins) or lowest
    TPOT (throughput target; ties to fewer dies, then fewer micro-batches).
    """
    check(
        1 <= max_tokens <= MAX_TOKENS_PER_MICRO_BATCH,
        "max BS",
        f"in [1, {MAX_TOKENS_PER_MICRO_BATCH}]",
        max_tokens,
    )
    plans: list[Plan] = []
    fastest: Plan | None = None
    searched = 0
    triples = layouts(
        shape,
        hw,
        precision,
        fixed=fixed,
        dies=dies,
        shared_experts=shared_experts,
        max_dies=max_dies,
    )
    for a, f, f_s in triples:
        for m in micro_batches:
            priced = _Priced(shape, hw, precision, workload, a, f, f_s, m)
            bs_mem = largest(priced.fits, max_tokens)
            if bs_mem:
                if fastest is None or priced(1).tpot_s < fastest.tpot_s:
                    fastest = priced(1)
                bs = bs_mem
                if target.tpot_s is not None:
                    bs = largest(partial(priced.within, target.tpot_s), bs_mem)
                elif target.throughput_per_die is not None:
                    bs = smallest(partial(priced.reaches, target.throughput_per_die), bs_mem)
                if bs:
                    plans.append(priced(bs))
            searched += len(priced.cache)
    if target.throughput_per_die is not None:
        plans.sort(key=lambda p: (p.tpot_s, p.layout.dies, p.layout.micro_batches))
    else:
        plans.sort(key=lambda p: (-p.throughput_per_die, p.layout.dies, p.layout.micro_batches))
        if plans:
            floor = plans[0].throughput_per_die * (1 - TIE)
            near = [p for p in plans if p.throughput_per_die >= floor]
            near.sort(key=lambda p: (p.layout.dies, p.layout.micro_batches, -p.throughput_per_die))
            plans = near + [p for p in plans if p.throughput_per_die < floor]
    notes: tuple[str, ...] = ()
    if not plans:
        notes = ("no layout meets the target",)
    return SearchResult(plans[0] if plans else None, tuple(plans), fastest, searched, notes)
