"""Offline: cold starts against wasted device memory, for every demand predictor.

The trace's arrivals are assigned to functions twice: with per-function temporal structure
(``launcher.workloads``: periodic, session, drift, steady) and by plain Zipf (the control).
Arrivals are counted per function and time bucket; each predictor decides before every bucket
which adapters are resident (``controlplane.scheduler.predict``), and each decision is scored:
a bucket with arrivals and no resident adapter is a cold start, a resident bucket without
arrivals wastes adapter-bytes x bucket seconds. Sweeping each predictor's knob gives its curve.
Adapter bytes are those of a Llama-7B-shaped adapter on q and v in fp16: rank r -> r MiB.

Prints the table, writes JSON (``--out``) and the plot of the curves (``--plot``).

    python benchmarks/predict.py --help
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.trace_args import add_function_args, add_slice_args  # noqa: E402
from controlplane.scheduler.predict import (  # noqa: E402
    AggregateRate,
    Ewma,
    FixedKeepAlive,
    HazardHistogram,
    HybridHistogram,
    LstmPredictor,
    Predictor,
    SeasonalNaive,
)
from controlplane.scheduler.predict.evaluate import Outcome, cold_at_waste, outcome, run, sweep_thresholds  # noqa: E402
from launcher import trace, workloads  # noqa: E402

console = Console(stderr=True)
MIB = 2**20
# Odds thresholds of ``keep_rule``: keep where p / (1 - p) >= threshold x relative bytes.
# Dense (41 log-spaced, every predictor the same): the curve is read between points by linear
# interpolation, which overstates cold starts where the points are far apart.
THRESHOLDS = [float(f"{t:.3g}") for t in np.geomspace(1e-4, 10.0, 41)]
KEEP_ALIVE_S = [0, 5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1200]
REFERENCE_KEEP_ALIVE_S = [60, 120, 300, 600]  # fixed keep-alive points the others are compared at


def counts_matrix(requests: list[trace.TraceRequest], functions: int, bucket_s: float, duration_s: float) -> np.ndarray:
    buckets = int(np.ceil(duration_s / bucket_s))
    counts = np.zeros((buckets, functions))
    for r in requests:
        counts[min(int(r.arrival_s // bucket_s), buckets - 1), r.function_index] += 1
    return counts


def point(knob: str, o: Outcome) -> dict:
    return {
        "knob": knob,
        "cold_starts": o.cold_starts,
        "cold_rate": o.cold_rate,
        "wasted_gib_s": o.wasted_byte_s / 2**30,
        "resident_gib_s": o.resident_byte_s / 2**30,
        "loads": o.loads,
    }


def threshold_curve(make: Callable[[float], Predictor], counts: np.ndarray, nbytes: np.ndarray, bucket_s: float):
    started = time.perf_counter()
    curve = sweep_thresholds(make, THRESHOLDS, counts, nbytes, bucket_s, nbytes / nbytes.mean())
    return [point(f"threshold {th:g}", o) for th, o in curve], time.perf_counter() - started


def curves(counts: np.ndarray, nbytes: np.ndarray, bucket_s: float, seed: int, lstm: bool) -> tuple[dict, dict]:
    """Every predictor's curve on one counts matrix; the LSTM's costs beside."""
    f = counts.shape[1]
    weight = nbytes / nbytes.mean()
    out: dict[str, list[dict]] = {}
    for name, w in (("keepalive", None), ("keepalive-bytes", weight)):
        pts = []
        for ka in KEEP_ALIVE_S:
            keep, _ = run(FixedKeepAlive(f, round(ka / bucket_s), w), counts)
            pts.append(point(f"keep-alive {ka} s", outcome(counts, keep, nbytes, bucket_s)))
        out[name] = pts
    out["aggregate"], _ = threshold_curve(lambda th: AggregateRate(f, th, weight), counts, nbytes, bucket_s)
    out["ewma"], _ = threshold_curve(lambda th: Ewma(f, th, weight), counts, nbytes, bucket_s)
    hist = []
    for head, tail, fb in [(5, 99, 12), (5, 95, 24), (10, 90, 60), (1, 99, 120), (25, 75, 6), (5, 99, 0)]:
        keep, _ = run(HybridHistogram(f, head_pct=head, tail_pct=tail, fallback_keep_alive=fb), counts)
        hist.append(point(f"pct {head}-{tail}, fallback {fb}", outcome(counts, keep, nbytes, bucket_s)))
    out["histogram"] = hist
    out["hazard"], _ = threshold_curve(lambda th: HazardHistogram(f, th, weight), counts, nbytes, bucket_s)
    seasonal = []
    for tol in [0, 1, 2, 3, 5, 8, 12]:
        keep, _ = run(SeasonalNaive(f, tolerance=tol, history=len(counts)), counts)
        seasonal.append(point(f"tolerance {tol}", outcome(counts, keep, nbytes, bucket_s)))
    out["seasonal"] = seasonal
    costs: dict = {}
    if lstm:
        made: list[LstmPredictor] = []

        def make(th: float) -> LstmPredictor:
            made.append(LstmPredictor(f, th, weight, seed=seed))
            return made[-1]

        out["lstm"], seconds = threshold_curve(make, counts, nbytes, bucket_s)
        net = made[0]
        costs = {
            "parameters": net.net.size(),
            "train_calls": net.train_calls,
            "seconds_total": seconds,
            "ms_per_function_per_bucket": seconds / counts.size * 1e3,
            "ms_per_function_per_hour_of_trace": seconds / f / (len(counts) * bucket_s / 3600) * 1e3,
            "final_loss": net.last_loss,
        }
    return out, costs


def compare(curves_: dict, reference: str, at_knobs: list[str], compulsory: int) -> dict:
    """Each predictor's cold starts at the wasted memory of the reference's given points.

    ``reduction`` counts every cold start; ``reduction_avoidable`` leaves out the compulsory
    ones (each function's first invocation, which no predictor can foresee and every policy
    pays alike): near the long keep-alive points they are most of what is left.
    """
    ref = {p["knob"]: p for p in curves_[reference]}
    out: dict[str, dict] = {}
    for knob in at_knobs:
        waste = ref[knob]["wasted_gib_s"]
        row = {}
        for name, pts in curves_.items():
            cold = cold_at_waste([_outcome(p) for p in pts], waste * 2**30)
            base = ref[knob]["cold_starts"]
            row[name] = {
                "cold_starts": cold,
                "reduction": 1 - cold / max(base, 1e-9),
                # None where the reference has no avoidable cold start left
                "reduction_avoidable": 1 - (cold - compulsory) / (base - compulsory) if base > compulsory else None,
            }
        out[f"{knob} ({waste:.0f} GiB-s)"] = row
    return out


def _outcome(p: dict) -> Outcome:
    return Outcome(0, p["cold_starts"], p["wasted_gib_s"] * 2**30, 0.0, p["loads"])


def aggregate_comparison(curves_: dict, wastes: list[float]) -> dict:
    """Per-function predictors against the aggregate rate at equal waste (GiB-s)."""
    out: dict[str, dict] = {}
    agg = [_outcome(p) for p in curves_["aggregate"]]
    for w in wastes:
        base = cold_at_waste(agg, w * 2**30)
        out[f"{w:.0f} GiB-s"] = {
            name: 1 - cold_at_waste([_outcome(p) for p in pts], w * 2**30) / max(base, 1e-9)
            for name, pts in curves_.items()
        }
    return out


def build(args: argparse.Namespace) -> dict:
    scale = trace.TraceScaling(
        start_s=args.start, duration_s=args.duration, time_scale=1.0, functions=args.functions, zipf_s=args.zipf,
        seed=args.seed,
    )  # fmt: skip
    requests = trace.load_trace(args.trace, scale)
    duration = max((r.arrival_s for r in requests), default=0.0) + args.bucket
    ranks = trace.assign_ranks(args.functions, tuple(int(r) for r in args.ranks.split(",")), args.seed)
    nbytes = np.array(ranks, dtype=float) * MIB
    mix = workloads.WorkloadMix()
    patterns = workloads.make_patterns(args.functions, mix, duration, args.zipf, args.seed)
    structured = workloads.assign_structured(requests, patterns, duration, args.seed)
    console.print(trace.describe(args.trace, scale, requests))
    console.print(workloads.describe_mix(patterns, structured, mix))
    console.print(f"buckets of {args.bucket:g} s: {int(np.ceil(duration / args.bucket))}; adapter bytes = rank MiB")
    result: dict = {
        "trace": str(args.trace),
        "assignment": trace.describe(args.trace, scale, requests),
        "mix": workloads.describe_mix(patterns, structured, mix),
        "bucket_s": args.bucket,
        "functions": args.functions,
        "seed": args.seed,
        "workloads": {},
    }
    for name, reqs in (("structured", structured), ("zipf", requests)):
        counts = counts_matrix(reqs, args.functions, args.bucket, duration)
        started = time.perf_counter()
        cs, costs = curves(counts, nbytes, args.bucket, args.seed, not args.no_lstm)
        knobs = [f"keep-alive {k} s" for k in REFERENCE_KEEP_ALIVE_S]
        wastes = [p["wasted_gib_s"] for p in cs["keepalive"] if p["knob"] in knobs]
        compulsory = int((counts.sum(axis=0) > 0).sum())  # one first invocation per function
        result["workloads"][name] = {
            "invocations": int(counts.sum()),
            "compulsory_cold_starts": compulsory,
            "curves": cs,
            "vs_keepalive": compare(cs, "keepalive", knobs, compulsory),
            "vs_aggregate": aggregate_comparison(cs, wastes),
            "lstm_cost": costs,
            "seconds": time.perf_counter() - started,
        }
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.0%}"


def print_tables(result: dict) -> None:
    for name, w in result["workloads"].items():
        table = Table(
            title=f"{name}: cold starts at the wasted memory of fixed keep-alive (reduction vs keep-alive; "
            f"the same without the {w['compulsory_cold_starts']} compulsory first invocations)"
        )
        names = list(w["curves"])
        table.add_column("fixed keep-alive point")
        for n in names:
            table.add_column(n, justify="right")
        for ref, row in w["vs_keepalive"].items():
            table.add_row(
                ref,
                *(
                    f"{row[n]['cold_starts']:.0f} ({row[n]['reduction']:+.0%}; {_pct(row[n]['reduction_avoidable'])})"
                    for n in names
                ),
            )
        Console().print(table)
        agg = Table(title=f"{name}: cold-start reduction against the aggregate rate at equal waste")
        agg.add_column("waste")
        for n in names:
            agg.add_column(n, justify="right")
        for waste, row in w["vs_aggregate"].items():
            agg.add_row(waste, *(f"{row[n]:+.0%}" for n in names))
        Console().print(agg)
        if w["lstm_cost"]:
            c = w["lstm_cost"]
            Console().print(
                f"{name}: LSTM {c['parameters']} weights, {c['train_calls']} training rounds, "
                f"{c['ms_per_function_per_hour_of_trace']:.1f} ms per function per hour of trace "
                f"({c['ms_per_function_per_bucket']:.3f} ms per function per bucket, training + inference)"
            )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["workloads"]), figsize=(12, 4.5), squeeze=False)
    for ax, (name, w) in zip(axes[0], result["workloads"].items()):
        for pred, pts in w["curves"].items():
            pts = sorted(pts, key=lambda p: p["wasted_gib_s"])
            ax.plot([p["wasted_gib_s"] / 3600 for p in pts], [p["cold_rate"] for p in pts], marker=".", label=pred)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("wasted device memory (GiB-hours, idle and resident)")
        ax.set_ylabel("cold-start rate (per invocation)")
        ax.set_title(f"{name} ({w['invocations']} invocations)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slice_args(p, duration=3600.0)
    p.add_argument("--bucket", type=float, default=5.0, help="time bucket (s)")
    add_function_args(p, functions=40)
    p.add_argument("--no-lstm", action="store_true", help="skip the LSTM (the slowest predictor)")
    p.add_argument("--out", type=Path, help="write JSON results here")
    p.add_argument("--plot", type=Path, help="write the PNG of the curves here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = build(args)
    print_tables(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
