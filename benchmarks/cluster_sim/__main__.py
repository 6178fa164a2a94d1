"""Cluster simulator: the production scheduler at 4 to 256 workers, against five baselines.

    python -m benchmarks.cluster_sim --profile gpu-h100-7b --functions 1000 --ns 4,8,16,32,64,128
    python -m benchmarks.cluster_sim --trace poisson          # a generated Poisson trace instead
    python -m benchmarks.cluster_sim --quick                  # smoke run: 2 systems, N=4,8, short

For every system and N: goodput (the highest offered requests/s whose TTFT p99 meets the SLO),
TTFT p50/p99 and adapter loads at that load, cost per 1M tokens. At ``--compare-n``: every system
at the same offered load (lorafaas' goodput there), the TTFT CDF, and the devices each system needs
for fractions of that load. JSON to ``--out``, plots to ``--plots``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controlplane.scheduler.model import PlacementConfig

from .profile import load_profile
from .runner import RunSpec, devices_needed, goodput, run_once
from .systems import SYSTEMS, PlannerSettings
from .workload import WorkloadSpec, trace_shape

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "data" / "AzureLLMInferenceTrace_conv.csv"
console = Console(stderr=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--profile", default="gpu-h100-7b", help="profile name in benchmarks/profiles or a JSON path")
    p.add_argument("--trace", default=None, help="trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens) or 'poisson'")
    p.add_argument("--functions", type=int, default=1000)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--drift-period", type=float, default=60.0, help="seconds between popularity drifts")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--ns", default="4,8,16,32,64,128", help="worker counts (256 works too; it takes longer)")
    p.add_argument("--compare-n", type=int, default=32, help="N for the same-load comparison and devices needed")
    p.add_argument("--device-loads", default="0.5,1.0", help="loads for devices-needed, as shares of lorafaas' goodput")
    p.add_argument("--device-systems", default="lorafaas,rank-oblivious,reactive,shared-queue")
    p.add_argument("--duration", type=float, default=40.0, help="simulated seconds of arrivals per run")
    p.add_argument("--warmup", type=float, default=10.0, help="arrivals before this are not measured")
    p.add_argument("--bisect", type=int, default=3, help="bisection steps of the goodput search")
    p.add_argument("--start-rps-per-worker", type=float, default=2.0)
    p.add_argument("--ray-k", type=int, default=8, help="adapters per replica in ray-lru")
    p.add_argument(
        "--max-replicas", type=int, default=None, help="PlacementConfig.max_replicas for both planned systems"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    p.add_argument("--plots", type=Path, default=None, help="directory for the PNG plots")
    args = p.parse_args(argv)
    if args.quick:
        args.systems, args.ns, args.compare_n = "lorafaas,rank-oblivious", "4,8", 8
        args.duration, args.warmup, args.bisect, args.device_loads = 20.0, 5.0, 1, "1.0"
        args.device_systems = "lorafaas,rank-oblivious"
        args.functions = min(args.functions, 200)
    args.systems = args.systems.split(",")
    args.ns = [int(n) for n in args.ns.split(",")]
    args.device_loads = [float(x) for x in args.device_loads.split(",")]
    args.device_systems = [s for s in args.device_systems.split(",") if s in args.systems]
    return args


def make_spec(args: argparse.Namespace) -> RunSpec:
    profile = load_profile(args.profile)
    path = None if args.trace == "poisson" else Path(args.trace or DEFAULT_TRACE)
    shape = trace_shape(path, seed=args.seed)
    wl = WorkloadSpec(functions=args.functions, zipf_s=args.zipf, drift_period_s=args.drift_period, seed=args.seed)
    config = PlacementConfig(max_replicas=args.max_replicas) if args.max_replicas else None
    settings = PlannerSettings(config=config)
    return RunSpec(profile, shape, wl, args.duration, args.warmup, args.seed, settings, args.ray_k)


def cost_per_mtok(spec: RunSpec, workers: int, res: dict[str, Any] | None) -> float | None:
    if not res or res["tokens_per_s"] <= 0:
        return None
    return workers * spec.profile.device_hour_usd / 3600 / res["tokens_per_s"] * 1e6


def summary(res: dict[str, Any] | None) -> dict[str, Any] | None:
    if res is None:
        return None
    return {k: v for k, v in res.items() if k != "ttft_s"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = make_spec(args)
    started = time.time()
    out: dict[str, Any] = {"profile": spec.profile.name, "args": {k: str(v) for k, v in vars(args).items()}}
    total = len(args.ns) * len(args.systems) + len(args.systems) + len(args.device_systems) * len(args.device_loads)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("goodput searches", total=total)
        grid: dict[str, dict[int, Any]] = {s: {} for s in args.systems}
        for n in args.ns:
            for system in args.systems:
                progress.update(task, description=f"goodput {system} N={n}")
                rate, res = goodput(spec, system, n, args.start_rps_per_worker * n, args.bisect)
                grid[system][n] = {
                    "goodput_rps": rate,
                    "cost_per_mtok_usd": cost_per_mtok(spec, n, res),
                    "at_goodput": summary(res),
                }
                progress.advance(task)
        out["goodput"] = grid
        out["workload"] = next((g["at_goodput"]["workload"] for g in grid["lorafaas"].values() if g["at_goodput"]), "")
        base = (
            grid.get("lorafaas", {}).get(args.compare_n, {}).get("goodput_rps")
            or args.start_rps_per_worker * args.compare_n
        )
        same: dict[str, Any] = {}
        cdf: dict[str, list[float | None]] = {}
        for system in args.systems:
            progress.update(task, description=f"same load {system} N={args.compare_n}")
            res = run_once(spec, system, args.compare_n, base)
            same[system] = summary(res)
            ttft = np.sort(res["ttft_s"])  # unserved requests are inf: kept as None so the CDF stays honest
            cdf[system] = [float(x) if np.isfinite(x) else None for x in ttft[:: max(1, len(ttft) // 400)]]
            progress.advance(task)
        out["same_load"] = {"workers": args.compare_n, "offered_rps": base, "systems": same}
        out["ttft_cdf"] = cdf
        devices: dict[str, dict[str, int | None]] = {}
        for system in args.device_systems:
            devices[system] = {}
            for share in args.device_loads:
                progress.update(task, description=f"devices {system} at {share:g}x")
                devices[system][f"{share:g}"] = devices_needed(spec, system, base * share, 4 * args.compare_n)
                progress.advance(task)
        out["devices_needed"] = {"load_rps": {f"{s:g}": base * s for s in args.device_loads}, "systems": devices}
    out["wall_s"] = time.time() - started
    out["headline"] = headline(out, args.compare_n)
    return out


def headline(out: dict[str, Any], n: int) -> dict[str, Any]:
    """lorafaas against rank-oblivious at N: the issue's three ratios."""
    g = out["goodput"]
    if "lorafaas" not in g or "rank-oblivious" not in g:
        return {}
    lf, ro = g["lorafaas"].get(n, {}), g["rank-oblivious"].get(n, {})
    same = out["same_load"]["systems"]
    dev = out["devices_needed"]["systems"]
    h: dict[str, Any] = {"workers": n}
    if lf and ro and ro.get("goodput_rps"):
        h["goodput_ratio"] = lf["goodput_rps"] / ro["goodput_rps"]
    if "lorafaas" in same and "rank-oblivious" in same:
        h["ttft_p99_ratio_same_load"] = same["rank-oblivious"]["ttft_p99_s"] / max(same["lorafaas"]["ttft_p99_s"], 1e-9)
    if "lorafaas" in dev and "rank-oblivious" in dev:
        for share, lf_n in dev["lorafaas"].items():
            ro_n = dev["rank-oblivious"].get(share)
            h[f"devices_saved_at_{share}x"] = (1 - lf_n / ro_n) if lf_n and ro_n else None
    return h


def report(out: dict[str, Any]) -> None:
    console.print(out.get("workload", ""))
    t = Table(title=f"goodput (requests/s with TTFT p99 within the SLO), profile {out['profile']}")
    t.add_column("system")
    ns = sorted({n for per in out["goodput"].values() for n in per})
    for n in ns:
        t.add_column(f"N={n}", justify="right")
    for system, per in out["goodput"].items():
        t.add_row(system, *[f"{per[n]['goodput_rps']:.1f}" if n in per else "-" for n in ns])
    console.print(t)
    s = out["same_load"]
    t = Table(title=f"same offered load: {s['offered_rps']:.1f} req/s on N={s['workers']}")
    for col in ("system", "TTFT p50 s", "TTFT p99 s", "tokens/s", "adapter loads", "spills", "rejected"):
        t.add_column(col, justify="right")
    for system, r in s["systems"].items():
        t.add_row(
            system,
            f"{r['ttft_p50_s']:.3f}",
            f"{r['ttft_p99_s']:.3f}",
            f"{r['tokens_per_s']:.0f}",
            str(r["adapter_loads"]),
            str(r["spills"]),
            str(r["rejected"]),
        )
    console.print(t)
    d = out["devices_needed"]
    t = Table(title="devices needed at the SLO")
    t.add_column("system")
    for load in d["load_rps"].values():
        t.add_column(f"{load:.1f} req/s", justify="right")
    for system, per in d["systems"].items():
        t.add_row(system, *[str(v) if v else "> max" for v in per.values()])
    console.print(t)
    console.print(f"headline: {json.dumps(out['headline'])}; wall {out['wall_s']:.0f}s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    report(out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
    if args.plots:
        from .plots import save_plots

        save_plots(out, args.plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
