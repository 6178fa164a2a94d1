"""Live: predictive prefetch and scale-to-zero against reactive loading and preload-what-fits.

The trace slice is assigned to functions with per-function temporal structure
(``launcher.workloads``; its periods and sessions scaled with the trace's time) and replayed
through the whole stack (HTTP, NATS, Postgres, S3, a worker process) with more adapter bytes
than the device pool holds (``--pool-fraction``), once per system, same requests, same seed:

- ``predictive``: host cache on; beside the stack runs the predictive advisor
  (``controlplane.scheduler.prefetch``: arrival history from Postgres, the hazard-histogram
  predictor, ``residency_commands``), fed the worker's reports and sending its prefetch /
  offload / evict commands to the worker, every half bucket. (The scheduler loop runs the same
  advisor; this script drives it directly so the comparison does not depend on placement.)
- ``reactive``: the S-LoRA-style baseline of ``benchmarks/replay.py``: adapters load from disk
  when a request needs one, LRU eviction, no host cache.
- ``preload``: every adapter prefetched before traffic (``replay.py``'s ``lorafaas`` system);
  the pool keeps what fits (LRU) and the rest load on demand from the host cache.

Prints the table (cold starts, cold-start added latency, TTFT p50/p99, device pool pages used)
and writes JSON (``--out``).

    python benchmarks/replay_predict.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from benchmarks.replay import attach_load_times, build_models, pct, pool_pages_for, replay_system  # noqa: E402
from benchmarks.replay_systems import (  # noqa: E402
    FunctionSpec,
    LorafaasSystem,
    ReactiveSystem,
    ReplaySetup,
    System,
)
from controlplane.scheduler.history import HistoryStore  # noqa: E402
from controlplane.scheduler.model import (  # noqa: E402
    AdapterSpec,
    ClusterView,
    Command,
    Placement,
    Plan,
    Tier,
    WorkerState,
    WorkerView,
)
from controlplane.scheduler.predict import HazardHistogram  # noqa: E402
from controlplane.scheduler.prefetch import PredictiveAdvisor  # noqa: E402
from launcher import trace, workloads  # noqa: E402
from launcher.devstack import DevStack  # noqa: E402
from launcher.platform import adapter_refs  # noqa: E402
from lorafaas import wire  # noqa: E402
from lorafaas.names import Names  # noqa: E402
from lorafaas.settings import S3Settings, Settings  # noqa: E402

console = Console(stderr=True)
SYSTEMS = ("predictive", "reactive", "preload")


class PoolSampler:
    """Device pool pages in use, from the worker's contention reports (every system the same way)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.latest: dict[str, wire.ContentionReport] = {}
        self._nc: nats.NATS | None = None

    async def start(self, settings: Settings) -> None:
        self._nc = await nats.connect(settings.nats.url)
        await self._nc.subscribe(Names(settings.nats.prefix).contention_subject, cb=self._on_report)

    async def _on_report(self, msg: object) -> None:
        report = wire.ContentionReport.decode(msg.data)  # type: ignore[attr-defined]
        self.latest[report.worker_id] = report
        self.samples.append(report.pool_pages_used)

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.close()


class PredictiveSystem(System):
    """Shared backbone with host cache, driven by the predictive advisor."""

    name = "predictive"

    def __init__(self, base: Settings, setup: ReplaySetup, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(base, setup, workdir)
        self.args = args
        self.pages: dict[str, int] = {}
        self.sampler: PoolSampler | None = None
        self.commands_sent: dict[str, int] = {}
        self._driver: asyncio.Task | None = None

    async def start_workers(self) -> None:
        await super().start_workers()
        self._driver = asyncio.create_task(self._drive())

    async def stop(self) -> None:
        if self._driver:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
        await super().stop()

    async def _drive(self) -> None:
        names = Names(self.settings.nats.prefix)
        fnames = [fn.name for fn in self.setup.functions]
        refs = {r.function_id: r for r in await adapter_refs(self.settings, self.tenant_id, fnames)}
        ranks = {r.function_id: r.rank for r in refs.values()}
        specs = {
            f: AdapterSpec(f, "bench", ranks[f], 0, self.pages[name])
            for f, name in zip(refs, fnames)
        }  # fmt: skip
        store = HistoryStore.from_settings(self.settings.database)
        advisor = PredictiveAdvisor(
            store,
            specs=lambda: specs,
            bucket_s=self.args.bucket,
            capacity=3600,
            make=lambda n: HazardHistogram(n, threshold=self.args.threshold, range_buckets=self.args.range_buckets),
            grace_s=0.05,
        )
        nc = await nats.connect(self.settings.nats.url)
        inflight: dict[tuple[str, str, str], asyncio.Task] = {}  # one command per (worker, kind, function)
        try:
            await advisor.start()
            while True:
                await advisor.refresh()
                view = self._view()
                plan = Plan(placement=Placement(1, {f: tuple(self.lives) for f in refs}))
                for c in advisor.advise(view, {}, plan):
                    key = (c.worker_id, str(c.kind), c.function_id or "")
                    if key not in inflight and c.function_id in refs:
                        task = asyncio.create_task(self._send(nc, names, c, refs[c.function_id]))
                        inflight[key] = task
                        task.add_done_callback(lambda _, k=key: inflight.pop(k, None))
                await asyncio.sleep(self.args.bucket / 2)
        finally:
            await nc.close()
            await store.close()

    async def _send(self, nc: nats.NATS, names: Names, c: Command, ref: wire.AdapterRef) -> None:
        try:
            message = wire.WorkerCommand(command=wire.CommandKind(str(c.kind)), adapter=ref)
            await nc.request(names.worker_command_subject(c.worker_id), message.encode(), timeout=60)
            self.commands_sent[str(c.kind)] = self.commands_sent.get(str(c.kind), 0) + 1
        except Exception as e:  # a lost command: the next round decides again
            console.print(f"[yellow]command {c.kind} {c.function_id} failed: {e!r}[/yellow]")

    def _view(self) -> ClusterView:
        workers = {}
        for wid, r in (self.sampler.latest if self.sampler else {}).items():
            tiers = {a.function_id: Tier(a.tier) for a in r.adapters}
            total = r.pool_pages_used + r.pool_pages_free
            workers[wid] = WorkerView(wid, "bench", WorkerState.ACTIVE, total, r.pool_pages_free, tiers, r.queue_depth)
        return ClusterView(now_s=time.time(), workers=workers)


def adapter_pages(backbone: Path, adapters: list[Path]) -> list[int]:
    from transformers import AutoConfig

    from gpuworker.engine import AdapterWeights
    from gpuworker.engine.engine import page_elems_for

    config = AutoConfig.from_pretrained(backbone)
    page = page_elems_for(config)
    return [-(-AdapterWeights.from_peft_folder(a, config).numel // page) for a in adapters]


def summarize(records: list, sampler: PoolSampler, pool_pages: int) -> dict:
    ok = [r for r in records if r.ok]
    cold = [r for r in ok if r.load_s > 0]
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "cold_starts": len(cold),
        "cold_start_added_p50_s": pct([r.load_s for r in cold], 50),
        "cold_start_added_total_s": sum(r.load_s for r in cold),
        "cold_start_added_mean_per_request_s": sum(r.load_s for r in cold) / max(len(ok), 1),
        "ttft_p50_s": pct([r.ttft for r in ok], 50),
        "ttft_p99_s": pct([r.ttft for r in ok], 99),
        "pool_pages": pool_pages,
        "pool_pages_used_mean": sum(sampler.samples) / max(len(sampler.samples), 1),
        "pool_pages_used_peak": max(sampler.samples, default=0),
    }


def reduction(ours: float, theirs: float) -> float:
    return 1.0 - ours / theirs if theirs > 0 else 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=ROOT / "data" / "AzureLLMInferenceTrace_conv.csv")
    p.add_argument("--start", type=float, default=0.0, help="start offset of the slice (s)")
    p.add_argument("--duration", type=float, default=600.0, help="length of the slice (s)")
    p.add_argument("--time-scale", type=float, default=0.1, help="replayed gap = original gap x this")
    p.add_argument("--token-scale", type=float, default=1 / 64, help="token lengths x this")
    p.add_argument("--max-prompt", type=int, default=32, help="cap on scaled prompt tokens")
    p.add_argument("--max-output", type=int, default=4, help="cap on scaled output tokens")
    p.add_argument(
        "--sample", type=int, default=8, help="keep every Nth request of the slice (thins the rate, keeps the timing)"
    )
    p.add_argument("--functions", type=int, default=12)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--ranks", default="8,16,32,64,128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default="tiny", help="backbone shape (tiny, demo, small, llama-7b)")
    p.add_argument("--pool-fraction", type=float, default=0.4, help="device pool as a fraction of all adapters")
    p.add_argument("--bucket", type=float, default=1.0, help="predictor time bucket (s, replayed time)")
    p.add_argument("--threshold", type=float, default=0.2, help="odds threshold of the hazard predictor")
    p.add_argument("--range-buckets", type=int, default=120, help="idle-time histogram range (buckets)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workdir", type=Path, default=ROOT / ".lorafaas" / "replay_predict")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def make(name: str, base: Settings, setup: ReplaySetup, workdir: Path, args: argparse.Namespace) -> System:
    if name == "predictive":
        return PredictiveSystem(base, setup, workdir, args)
    if name == "reactive":
        return ReactiveSystem(base, setup, workdir)
    system = LorafaasSystem(base, setup, workdir)
    system.name = "preload"
    return system


async def run(args: argparse.Namespace) -> dict:
    scale = trace.TraceScaling(
        start_s=args.start, duration_s=args.duration, time_scale=args.time_scale, token_scale=args.token_scale,
        max_prompt_tokens=args.max_prompt, max_output_tokens=args.max_output, functions=args.functions,
        zipf_s=args.zipf, seed=args.seed,
    )  # fmt: skip
    plain = trace.load_trace(args.trace, scale)[:: args.sample]
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
    ranks = trace.assign_ranks(args.functions, tuple(int(r) for r in args.ranks.split(",")), args.seed)
    described = [
        trace.describe(args.trace, scale, plain) + f"; every {args.sample}th request kept",
        workloads.describe_mix(patterns, requests, mix),
    ]
    for line in described:
        console.print(line)
    args.workdir.mkdir(parents=True, exist_ok=True)
    backbone, adapter_dirs = await asyncio.to_thread(build_models, args.workdir, args.shape, ranks)
    functions = [FunctionSpec(f"f{i:02d}-r{rank}", rank, d) for i, (rank, d) in enumerate(zip(ranks, adapter_dirs))]
    pool_pages = pool_pages_for(backbone, adapter_dirs, args.pool_fraction)
    pages = adapter_pages(backbone, adapter_dirs)
    console.print(f"ranks {ranks}; adapter pages {pages} (sum {sum(pages)}); device pool {pool_pages} pages")
    setup = ReplaySetup(backbone, functions, workers=1, pool_pages=pool_pages)
    base = Settings(s3=S3Settings(endpoint="127.0.0.1:9000", bucket="lorafaas-bench"))
    results: dict[str, dict] = {}
    with DevStack(base, args.workdir / "stack"):
        for name in args.systems.split(","):
            system = make(name, base, setup, args.workdir, args)
            sampler = PoolSampler()
            if isinstance(system, PredictiveSystem):
                system.pages = {fn.name: p for fn, p in zip(functions, pages)}
                system.sampler = sampler
            console.print(f"[bold]{name}[/bold]: starting")
            try:
                await sampler.start(system.settings)
                await system.start()
                records, _, _ = await replay_system(system, requests, functions, args.seed)
                await asyncio.sleep(1.0)  # let the control plane apply the last results
                await attach_load_times(system, records)
            finally:
                await system.stop()
                await sampler.stop()
            results[name] = summarize(records, sampler, pool_pages)
            if isinstance(system, PredictiveSystem):
                results[name]["commands"] = system.commands_sent
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
        ("cold-start added p50 (s)", lambda m: f"{m['cold_start_added_p50_s']:.3f}"),
        ("cold-start added total (s)", lambda m: f"{m['cold_start_added_total_s']:.2f}"),
        ("TTFT p50 / p99 (s)", lambda m: f"{m['ttft_p50_s']:.3f} / {m['ttft_p99_s']:.3f}"),
        ("pool pages used mean / peak", lambda m: f"{m['pool_pages_used_mean']:.0f} / {m['pool_pages_used_peak']}"),
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
