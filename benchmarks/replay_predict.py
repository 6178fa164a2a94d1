"""Live: predictive prefetch and scale-to-zero against reactive loading and preload-what-fits.

The trace slice is assigned to functions with per-function temporal structure
(``launcher.workloads``; its periods and sessions scaled with the trace's time) and replayed
through the whole stack (HTTP, NATS, Postgres, S3, a worker process) with more adapter bytes
than the device pool holds (``--pool-fraction``), once per system, same requests, same seed.
Each system is the production control plane with one setting changed
(``scheduler.predictor``, ``controlplane.scheduler.loop``):

- ``predictive``: ``hazard``: the scheduler loop runs the predictive advisor (arrival history
  from Postgres, the hazard-histogram predictor, ``residency_commands``) and sends its
  prefetch / offload / evict commands; host cache on.
- ``reactive``: ``reactive``: the S-LoRA-style baseline: adapters load from disk when a request
  needs one, LRU eviction from the device pool, no host cache, nothing prefetched.
- ``preload``: ``off``: every adapter prefetched before traffic (``replay.py``'s ``lorafaas``
  system) and kept in step by the loop; the pool keeps what fits (LRU), the rest load on demand
  from the host cache.

The first ``--warmup`` seconds (replayed time) are replayed but not measured, in every system:
the predictor needs several idle times per function before its histogram is used.

Prints the table (cold starts and the tier each came from, cold-start added latency, TTFT
p50/p99, device pool pages used, commands) and writes JSON (``--out``).

    python benchmarks/replay_predict.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import nats
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.replay import (  # noqa: E402
    RequestRecord,
    adapter_sizes,
    attach_load_times,
    build_models,
    memory_for,
    pct,
    reduction,
    replay_system,
    scaled_trace,
)
from benchmarks.replay_systems import (  # noqa: E402
    FunctionSpec,
    LorafaasSystem,
    ReactiveSystem,
    ReplaySetup,
    System,
)
from benchmarks.trace_args import add_function_args, add_scaling_args, add_slice_args  # noqa: E402
from launcher import trace, workloads  # noqa: E402
from launcher.devstack import DevStack  # noqa: E402
from lorafaas import wire  # noqa: E402
from lorafaas.names import Names  # noqa: E402
from lorafaas.settings import S3Settings, Settings  # noqa: E402

console = Console(stderr=True)
SYSTEMS = ("predictive", "reactive", "preload")


class PoolSampler:
    """Device pool pages in use (the worker's contention reports) and the commands the worker got."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []  # (monotonic time, pages used)
        self.commands: list[tuple[float, str]] = []  # (monotonic time, kind)
        self._nc: nats.NATS | None = None

    async def start(self, settings: Settings) -> None:
        names = Names(settings.nats.prefix)
        self._nc = await nats.connect(settings.nats.url)
        await self._nc.subscribe(names.contention_subject, cb=self._on_report)
        # A second subscriber on the command subjects: it sees every command, the worker replies.
        wildcard = names.worker_command_subject("WORKER").replace(".WORKER.", ".*.")
        await self._nc.subscribe(wildcard, cb=self._on_command)

    async def _on_report(self, msg: object) -> None:
        report = wire.ContentionReport.decode(msg.data)  # type: ignore[attr-defined]
        self.samples.append((time.monotonic(), report.pool_pages_used))

    async def _on_command(self, msg: object) -> None:
        command = wire.WorkerCommand.decode(msg.data)  # type: ignore[attr-defined]
        self.commands.append((time.monotonic(), command.command.value))

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.close()


def with_predictor(system: System, predictor: str, args: argparse.Namespace) -> System:
    """The same system with ``scheduler.predictor`` (and its bucket and threshold) set."""
    system.use_scheduler(predictor=predictor, predictor_bucket_s=args.bucket, predictor_threshold=args.threshold)
    return system


class PredictiveSystem(System):
    """Shared backbone with host cache; the scheduler loop runs the predictor."""

    name = "predictive"


def summarize(records: list[RequestRecord], sampler: PoolSampler, pool_pages: int, measured_from: float) -> dict:
    """Metrics of the requests that arrived after the warm-up (``measured_from``, monotonic)."""
    ok = [r for r in records if r.ok]
    cold = [r for r in ok if r.load_s > 0]
    by_tier: dict[str, dict[str, float]] = {}
    for r in cold:
        t = by_tier.setdefault(r.load_tier or "unknown", {"count": 0, "added_s": 0.0})
        t["count"] += 1
        t["added_s"] += r.load_s
    pages = [p for t, p in sampler.samples if t >= measured_from]
    commands: dict[str, int] = {}
    for t, kind in sampler.commands:
        if t >= measured_from:
            commands[kind] = commands.get(kind, 0) + 1
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "cold_starts": len(cold),
        "cold_starts_by_tier": by_tier,
        "cold_start_added_p50_s": pct([r.load_s for r in cold], 50),
        "cold_start_added_total_s": sum(r.load_s for r in cold),
        "cold_start_added_mean_per_request_s": sum(r.load_s for r in cold) / max(len(ok), 1),
        "ttft_p50_s": pct([r.ttft for r in ok], 50),
        "ttft_p99_s": pct([r.ttft for r in ok], 99),
        "pool_pages": pool_pages,
        "pool_pages_used_mean": sum(pages) / max(len(pages), 1),
        "pool_pages_used_peak": max(pages, default=0),
        "commands": commands,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slice_args(p, duration=600.0)
    add_scaling_args(p, time_scale=0.1, token_scale=1 / 64, max_prompt=32, max_output=4)
    p.add_argument(
        "--sample", type=int, default=8, help="keep every Nth request of the slice (thins the rate, keeps the timing)"
    )
    add_function_args(p, functions=12)
    p.add_argument("--shape", default="tiny", help="backbone shape (tiny, demo, small, llama-7b)")
    p.add_argument("--pool-fraction", type=float, default=0.4, help="device pool as a fraction of all adapters")
    p.add_argument("--bucket", type=float, default=1.0, help="predictor time bucket (s, replayed time)")
    p.add_argument("--threshold", type=float, default=0.2, help="odds threshold of the hazard predictor")
    p.add_argument("--warmup", type=float, default=0.0, help="replayed seconds not measured (every system)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workdir", type=Path, default=ROOT / ".lorafaas" / "replay_predict")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def make(name: str, base: Settings, setup: ReplaySetup, workdir: Path, args: argparse.Namespace) -> System:
    if name == "predictive":
        return with_predictor(PredictiveSystem(base, setup, workdir), "hazard", args)
    if name == "reactive":
        return with_predictor(ReactiveSystem(base, setup, workdir), "reactive", args)
    system = LorafaasSystem(base, setup, workdir)
    system.name = "preload"
    return with_predictor(system, "off", args)


async def run(args: argparse.Namespace) -> dict:
    scale, whole, ranks = scaled_trace(args)
    plain = whole[:: args.sample]
    span = args.duration * args.time_scale
    base_mix = workloads.WorkloadMix()
    mix = dataclasses.replace(
        base_mix,
        periodic_period_s=tuple(x * args.time_scale for x in base_mix.periodic_period_s),
        periodic_on_s=tuple(x * args.time_scale for x in base_mix.periodic_on_s),
        periodic_jitter_s=base_mix.periodic_jitter_s * args.time_scale,
        session_on_s=base_mix.session_on_s * args.time_scale,
        session_off_s=base_mix.session_off_s * args.time_scale,
    )
    patterns = workloads.make_patterns(args.functions, mix, span, args.zipf, args.seed)
    requests = workloads.assign_structured(plain, patterns, span, args.seed)
    described = [
        trace.describe(args.trace, scale, plain) + f"; every {args.sample}th request kept",
        workloads.describe_mix(patterns, requests, mix),
    ]
    console.print(described[1])  # scaled_trace printed the slice
    args.workdir.mkdir(parents=True, exist_ok=True)
    backbone, adapter_dirs = await asyncio.to_thread(build_models, args.workdir, args.shape, ranks)
    functions = [FunctionSpec(f"f{i:02d}-r{rank}", rank, d) for i, (rank, d) in enumerate(zip(ranks, adapter_dirs))]
    sizes = adapter_sizes(backbone, adapter_dirs)
    pool_pages, _ = memory_for(sizes, args.pool_fraction, 0.0)
    pages = [s.pages for s in sizes]
    console.print(f"ranks {ranks}; adapter pages {pages} (sum {sum(pages)}); device pool {pool_pages} pages")
    setup = ReplaySetup(backbone, functions, workers=1, pool_pages=pool_pages)
    base = Settings(s3=S3Settings(endpoint="127.0.0.1:9000", bucket="lorafaas-bench"))
    results: dict[str, dict] = {}
    with DevStack(base, args.workdir / "stack"):
        for name in args.systems.split(","):
            system = make(name, base, setup, args.workdir, args)
            sampler = PoolSampler()
            console.print(f"[bold]{name}[/bold]: starting")
            try:
                await sampler.start(system.settings)
                await system.start()
                records, mono_start, _ = await replay_system(system, requests, functions, args.seed)
                await asyncio.sleep(1.0)  # let the control plane apply the last results
                await attach_load_times(system, records)
            finally:
                await system.stop()
                await sampler.stop()
            measured = [r for r in records if r.arrival_s >= args.warmup]
            results[name] = summarize(measured, sampler, pool_pages, mono_start + args.warmup)
    comparisons = {}
    if "predictive" in results and "reactive" in results:
        p, r = results["predictive"], results["reactive"]
        comparisons = {
            "cold_start_added_total_reduction_vs_reactive": reduction(
                p["cold_start_added_total_s"], r["cold_start_added_total_s"]
            ),
            "cold_start_added_p50_reduction_vs_reactive": reduction(
                p["cold_start_added_p50_s"], r["cold_start_added_p50_s"]
            ),
            "ttft_p99_reduction_vs_reactive": reduction(p["ttft_p99_s"], r["ttft_p99_s"]),
            "ttft_p50_reduction_vs_reactive": reduction(p["ttft_p50_s"], r["ttft_p50_s"]),
        }
    print_table(results, comparisons)
    report = {"workload": described, "ranks": ranks, "adapter_pages": pages, "systems": results,
              "comparisons": comparisons, "config": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


def print_table(results: dict[str, dict], comparisons: dict[str, float]) -> None:
    table = Table(title="live replay: predictive prefetch vs reactive loading vs preload-what-fits")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    rows = [
        ("cold starts", lambda m: f"{m['cold_starts']}"),
        (
            "  by tier: count (added s)",
            lambda m: ", ".join(f"{k} {v['count']} ({v['added_s']:.2f})" for k, v in m["cold_starts_by_tier"].items()),
        ),
        ("cold-start added p50 (s)", lambda m: f"{m['cold_start_added_p50_s']:.3f}"),
        ("cold-start added total (s)", lambda m: f"{m['cold_start_added_total_s']:.2f}"),
        ("TTFT p50 / p99 (s)", lambda m: f"{m['ttft_p50_s']:.3f} / {m['ttft_p99_s']:.3f}"),
        ("pool pages used mean / peak", lambda m: f"{m['pool_pages_used_mean']:.0f} / {m['pool_pages_used_peak']}"),
        ("commands", lambda m: ", ".join(f"{k} {v}" for k, v in sorted(m["commands"].items())) or "-"),
        ("completed / failed", lambda m: f"{m['completed']} / {m['failed']}"),
    ]
    for label, fmt in rows:
        table.add_row(label, *(fmt(m) for m in results.values()))
    Console().print(table)
    for key, value in comparisons.items():
        Console().print(f"{key}: {value:.1%}")


def main(argv: list[str] | None = None) -> int:
    report = asyncio.run(run(parse_args(argv)))
    return 0 if all(m["failed"] == 0 for m in report["systems"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
