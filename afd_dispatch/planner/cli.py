"""`afd-dispatch plan`: pick A:F, M and BS for a model on a hardware profile.

    afd-dispatch plan MODEL_DIR_OR_CONFIG [--context N] [--tpot-ms X | --throughput-per-die Y]
    afd-dispatch plan --calibrate [--fit]

The formulas are in `afd_dispatch.planner` (`cost`, `memory`, `search`, `ep`) and
`docs/planner.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.layout import MAX_TOKENS_PER_MICRO_BATCH
from afd_dispatch.planner.calibration import CalibrationRow, calibrate, fit_overheads, load_data
from afd_dispatch.planner.ep import EPPlan, search_ep
from afd_dispatch.planner.hardware import FIGURE_NAMES, HardwareProfile
from afd_dispatch.planner.plan import Plan
from afd_dispatch.planner.search import MAX_DIES, SearchResult, Target, search
from afd_dispatch.planner.shape import BYTES, ModelShape, Precision, Workload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="afd-dispatch plan",
        description="Plan an AFD decode deployment: A:F ratio, micro-batches M, BS per "
        "attention die, HCCL_BUFFSIZE, expected TPOT and tokens/s/die.",
    )
    p.add_argument("model", nargs="?", help="model directory or its config.json")
    p.add_argument("--hardware", default="atlas_a3", help="profile name or JSON file")
    p.add_argument(
        "--hw",
        action="append",
        default=[],
        metavar="FIGURE=VALUE",
        help=f"override a hardware figure ({', '.join(FIGURE_NAMES)})",
    )
    p.add_argument("--context", type=int, default=8192, help="input + output tokens")
    p.add_argument(
        "--output-len",
        type=int,
        default=0,
        help="output tokens (the mean decode context is context - output_len / 2)",
    )
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--tpot-ms", type=float, help="most tokens/s/die with TPOT <= this")
    goal.add_argument(
        "--throughput-per-die", type=float, help="lowest TPOT reaching this tokens/s/die"
    )
    p.add_argument("--af", metavar="A:F", help="fixed attention and FFN die counts, e.g. 64:16")
    p.add_argument("--dies", type=int, help="total dies (A + F) to split")
    p.add_argument(
        "--max-dies", type=int, default=MAX_DIES, help="largest A + F to try (default 768)"
    )
    p.add_argument("--micro-batches", default="1,2,3", help="M values to try (default 1,2,3)")
    p.add_argument("--max-bs", type=int, default=MAX_TOKENS_PER_MICRO_BATCH)
    p.add_argument("--weights", choices=list(BYTES), default="bf16")
    p.add_argument("--a2f", choices=list(BYTES), default="bf16", help="int8: A2F quant_mode 2")
    p.add_argument("--kv", choices=list(BYTES), default="bf16")
    p.add_argument(
        "--shared-experts",
        choices=("ffn", "attention"),
        default="ffn",
        help="ffn: dedicated FFN dies host the shared expert; attention: attention dies run it",
    )
    p.add_argument("--top", type=int, default=5, help="other candidates to list")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="print predicted vs published on the shipped calibration points",
    )
    p.add_argument("--fit", action="store_true", help="with --calibrate: refit the overheads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        hw = _hardware(args.hardware, args.hw)
        if args.calibrate:
            return _calibrate(hw, args.fit, args.json)
        check(args.model is not None, "MODEL", "a model directory or config.json", None)
        shape = ModelShape.from_pretrained(args.model)
        precision = Precision(args.weights, args.a2f, args.kv)
        workload = Workload.decode(args.context, args.output_len)
        target = Target(
            tpot_s=args.tpot_ms * 1e-3 if args.tpot_ms is not None else None,
            throughput_per_die=args.throughput_per_die,
        )
        fixed = _pair(args.af) if args.af else None
        check(args.dies is None or args.dies >= 2, "--dies", ">= 2", args.dies)
        result = search(
            shape,
            hw,
            precision,
            workload,
            target,
            fixed=fixed,
            dies=args.dies,
            micro_batches=_ints(args.micro_batches),
            max_tokens=args.max_bs,
            shared_experts=args.shared_experts,
            max_dies=args.max_dies,
        )
    except AFDInputError as exc:
        print(f"afd-dispatch plan: {exc}", file=sys.stderr)
        return 2
    ep = None
    if result.best is not None:
        ep = search_ep(
            shape,
            hw,
            precision,
            workload,
            target,
            dies=result.best.layout.dies,
            max_tokens=args.max_bs,
        )
    if args.json:
        print(json.dumps(_json(result, ep, target, hw), indent=2))
    else:
        print(render(result, ep, target, shape, hw, args.top))
    return 0 if result.best is not None else 1


# -- inputs -------------------------------------------------------------------------------
def _hardware(name: str, overrides: list[str]) -> HardwareProfile:
    hw = HardwareProfile.load(name)
    values: dict[str, float] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        check(sep == "=", "--hw", "FIGURE=VALUE", item)
        try:
            values[key.strip()] = float(value)
        except ValueError:
            raise AFDInputError(f"--hw {key}", "a number", value) from None
    return hw.with_values(**values) if values else hw


def _pair(text: str) -> tuple[int, int]:
    a, sep, f = text.partition(":")
    ok = sep == ":" and a.strip().isdigit() and f.strip().isdigit()
    check(ok and int(a) >= 1 and int(f) >= 1, "--af", "A:F with A, F >= 1, e.g. 64:16", text)
    return int(a), int(f)


def _ints(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    ok = bool(parts) and all(p.isdigit() and 1 <= int(p) <= 8 for p in parts)
    check(ok, "--micro-batches", "a comma-separated list of M in [1, 8], e.g. 1,2,3", text)
    return tuple(sorted({int(p) for p in parts}))


# -- output -------------------------------------------------------------------------------
def _target_text(target: Target) -> str:
    if target.tpot_s is not None:
        return f"TPOT <= {target.tpot_s * 1e3:g} ms, most tokens/s/die"
    if target.throughput_per_die is not None:
        return f">= {target.throughput_per_die:g} tokens/s/die, lowest TPOT"
    return "most tokens/s/die (no TPOT limit)"


def render(
    result: SearchResult,
    ep: EPPlan | None,
    target: Target,
    shape: ModelShape,
    hw: HardwareProfile,
    top: int = 5,
) -> str:
    """The human-readable report of a search."""
    out: list[str] = []
    best = result.best
    head = result.best or result.fastest
    if head is not None:
        w, pr = head.workload, head.precision
        out.append(
            f"AFD plan: {shape.name} on {hw.name}  (context {w.context}, mean decode context "
            f"{w.mean_context:g}; weights {pr.weights}, A2F {pr.a2f}, KV {pr.kv})"
        )
    out.append(f"target: {_target_text(target)}; {result.searched} layouts priced (A, F, M, BS)")
    if best is None:
        out.append("no layout meets the target.")
        if result.fastest is not None:
            f = result.fastest
            out.append(
                f"fastest that fits: A:F {f.layout.num_attention_ranks}:{f.layout.num_ffn_ranks}, "
                f"M {f.layout.micro_batches}, BS 1: TPOT {f.tpot_s * 1e3:.1f} ms"
            )
        return "\n".join(out)
    lay = best.layout
    shared = ""
    if lay.shared_dies:
        shared = f"; {lay.shared_dies} of the FFN dies host the shared expert"
    elif best.shared_slots == 0 and shape.moe.num_shared_experts:
        shared = "; the attention dies run the shared expert"
    rows = [
        ("A:F", f"{lay.num_attention_ranks}:{lay.num_ffn_ranks}  ({lay.dies} dies{shared})"),
        ("micro-batches M", f"{lay.micro_batches}"),
        (
            "BS",
            f"{lay.tokens} per micro-batch and attention die "
            f"({best.sequences_per_attention_die} sequences per attention die)",
        ),
        (
            "FFN batch",
            f"{best.ffn_tokens_per_step:.0f} tokens per FFN die per step; "
            f"{best.ffn_rows_per_micro_batch:.0f} routed rows per FFN die per micro-batch",
        ),
        (
            "experts per FFN die",
            f"{best.experts_per_ffn_die} hosted, {best.active_experts_per_ffn_die:.1f} "
            "read per layer",
        ),
        (
            "HCCL_BUFFSIZE",
            f"{best.hccl_buffsize_mb} MB  (per window group; one group per micro-batch)",
        ),
        ("TPOT", f"{best.tpot_s * 1e3:.1f} ms"),
        ("throughput", f"{best.throughput_per_die:.0f} tokens/s/die"),
        (
            "memory",
            f"attention die {best.attention_memory_gb:.1f} GB, FFN die "
            f"{best.ffn_memory_gb:.1f} GB, of {best.usable_memory_gb:.1f} GB usable",
        ),
    ]
    out.append("")
    out.extend(f"  {k:<20}{v}" for k, v in rows)
    out.append("")
    out.append("per-MoE-layer budget, one micro-batch (M of them in flight):")
    out.append(f"  {'phase':<10}{'time (us)':>10}  {'bound':<9}what")
    for p in best.budget.phases:
        out.append(f"  {p.name:<10}{p.seconds * 1e6:>10.1f}  {p.bound:<9}{p.detail}")
    b = best.budget
    out.append(
        f"  layer period = max(M*(attention+combine) {b.attention_busy * 1e6:.0f}, "
        f"M*ffn {b.ffn_busy * 1e6:.0f}, round trip {b.round_trip * 1e6:.0f}) = "
        f"{b.period * 1e6:.0f} us  (set by: {b.limiter})"
    )
    m, st = lay.micro_batches, best.steps
    out.append(
        f"  step = {st.moe_layers} MoE layers x {b.period * 1e3:.3f} ms + {st.dense_layers} "
        f"dense layers x {m} x {st.dense_layer_s * 1e3:.3f} ms + {m} x lm_head "
        f"{st.head_s * 1e3:.3f} ms + {st.step_overhead_s * 1e3:g} ms = "
        f"{best.step_s * 1e3:.1f} ms"
    )
    if m > 1:
        out.append(
            f"  (with M = 1 the period would be the round trip, {b.round_trip * 1e6:.0f} us)"
        )
    if ep is not None:
        out.append(
            f"EP baseline on the same {ep.dies} dies (no AFD, M = 1): BS {ep.tokens}, TPOT "
            f"{ep.step_s * 1e3:.1f} ms, {ep.throughput_per_die:.0f} tokens/s/die"
        )
    else:
        out.append(f"EP baseline on the same {lay.dies} dies: nothing fits or meets the target")
    others = result.candidates[1 : 1 + max(0, top)]
    if others:
        out.append("")
        out.append("next best:")
        out.append(
            f"  {'A:F':>8} {'M':>2} {'BS':>4} {'TPOT ms':>8} {'tok/s/die':>10} {'HCCL MB':>8}"
        )
        for c in others:
            cl = c.layout
            out.append(
                f"  {cl.num_attention_ranks:>4}:{cl.num_ffn_ranks:<3} "
                f"{cl.micro_batches:>2} {cl.tokens:>4} "
                f"{c.tpot_s * 1e3:>8.1f} {c.throughput_per_die:>10.0f} {c.hccl_buffsize_mb:>8}"
            )
    return "\n".join(out)


def _json(
    result: SearchResult, ep: EPPlan | None, target: Target, hw: HardwareProfile
) -> dict[str, Any]:
    return {
        "target": {
            "tpot_ms": target.tpot_s * 1e3 if target.tpot_s is not None else None,
            "throughput_per_die": target.throughput_per_die,
        },
        "hardware": hw.name,
        "best": result.best.to_dict() if result.best else None,
        "fastest": result.fastest.to_dict() if result.fastest else None,
        "ep_baseline": None
        if ep is None
        else {
            "dies": ep.dies,
            "bs": ep.tokens,
            "tpot_ms": ep.step_s * 1e3,
            "throughput_per_die": ep.throughput_per_die,
        },
        "candidates": [_brief(p) for p in result.candidates],
        "searched": result.searched,
    }


def _brief(p: Plan) -> dict[str, Any]:
    lay = p.layout
    return {
        "num_attention_ranks": lay.num_attention_ranks,
        "num_ffn_ranks": lay.num_ffn_ranks,
        "micro_batches": lay.micro_batches,
        "bs_per_micro_batch": lay.tokens,
        "tpot_ms": p.tpot_s * 1e3,
        "throughput_per_die": p.throughput_per_die,
        "hccl_buffsize_mb": p.hccl_buffsize_mb,
    }


def calibration_table(rows: list[CalibrationRow]) -> str:
    """predicted vs published, one line per case (tokens/s/die)."""
    out = [
        f"  {'case':<12}{'published':>10}{'roofline':>10}{'ratio':>7}"
        f"{'calibrated':>12}{'ratio':>7}{'TPOT ms':>9}  memory fits (GB, fullest die)",
    ]
    for r in rows:
        out.append(
            f"  {r.name:<12}{r.published:>10.1f}{r.roofline:>10.1f}{r.roofline_ratio:>7.2f}"
            f"{r.predicted:>12.1f}{r.ratio:>7.2f}{r.tpot_ms:>9.1f}  "
            f"{'yes' if r.fits else 'no ':<4}({r.memory_gb:.1f} of {r.usable_memory_gb:.1f})"
        )
    geo = math.exp(sum(math.log(r.ratio) for r in rows) / len(rows))
    out.append(f"  geometric mean of calibrated / published: {geo:.3f}")
    return "\n".join(out)


def _calibrate(hw: HardwareProfile, fit: bool, as_json: bool) -> int:
    data = load_data()
    rows = calibrate(hw, data)
    refit = fit_overheads(hw, data) if fit else None
    if as_json:
        doc: dict[str, Any] = {
            "source": data["source"],
            "hardware": hw.name,
            "layer_overhead_us": hw.layer_overhead_us,
            "sequence_overhead_us": hw.sequence_overhead_us,
            "rows": [
                {
                    "case": r.name,
                    "published": r.published,
                    "roofline": r.roofline,
                    "calibrated": r.predicted,
                    "ratio": r.ratio,
                    "tpot_ms": r.tpot_ms,
                    "memory_fits": r.fits,
                    "memory_gb": r.memory_gb,
                    "usable_memory_gb": r.usable_memory_gb,
                }
                for r in rows
            ],
        }
        if refit is not None:
            doc["fit"] = {
                "layer_overhead_us": refit.layer_overhead_us,
                "sequence_overhead_us": refit.sequence_overhead_us,
            }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"calibration: {data['description']}")
    print(f"source: {data['source']}")
    print(
        f"profile {hw.name}: layer_overhead_us {hw.layer_overhead_us:g}, "
        f"sequence_overhead_us {hw.sequence_overhead_us:g} (roofline: both 0)"
    )
    print(
        f"memory as deployed: memory_utilization {data['memory_utilization']:g}, weight split "
        f"'{data['weight_split']}', {hw.reserved_gb:g} GB reserved of {hw.hbm_capacity_gb:g} GB"
    )
    print("tokens/s/die:")
    print(calibration_table(rows))
    if refit is not None:
        print(
            f"refit: layer_overhead_us {refit.layer_overhead_us:.1f}, sequence_overhead_us "
            f"{refit.sequence_overhead_us:.1f} (squared log error {refit.error:.4f})"
        )
        print(calibration_table(list(refit.rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
