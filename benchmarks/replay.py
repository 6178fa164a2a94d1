"""Replay a production trace through the whole stack: lorafaas against the papers' baselines.

Each system (see ``replay_systems``) serves the same requests, from the same CSV slice, with
the same seed, through real HTTP (streaming, so TTFT is measured at the client), NATS,
Postgres, S3 and worker processes. Prints how the trace was scaled and assigned, a table, and
writes JSON (``--out``) and PNG plots (``--plots``).

    python benchmarks/replay.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.replay_systems import SYSTEMS, FunctionSpec, ReplaySetup, System, make_system  # noqa: E402
from benchmarks.trace_args import add_function_args, add_scaling_args, add_slice_args  # noqa: E402
from launcher import trace  # noqa: E402
from launcher.devstack import DevStack  # noqa: E402
from launcher.platform import invocation_timings  # noqa: E402
from lorafaas.heap import freeze_startup_heap  # noqa: E402
from lorafaas.settings import S3Settings, Settings  # noqa: E402

console = Console(stderr=True)


@dataclass
class RequestRecord:
    index: int
    function_index: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0
    first_token: float | None = None
    done: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    usage_prompt_tokens: int = 0
    invocation_id: str = ""
    status: int = 0
    error: str = ""
    backbone_ready: float | None = None  # set when the backbone was not resident at arrival
    load_s: float = 0.0
    load_tier: str = ""  # where the adapter came from when the request waited for it
    queue_wait_s: float = 0.0  # the worker's measure: accepted by the gateway -> in a batch
    worker_ttft_s: float = 0.0  # the worker's measure: accepted by the gateway -> first token

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done is not None and not self.error

    @property
    def ttft(self) -> float:
        return (self.first_token or self.done or self.sent) - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    def as_json(self) -> dict[str, Any]:
        """The request as the benchmarks' JSON keeps it: arrival, client and worker timings, tokens."""
        return {
            "function": self.function_index,
            "arrival_s": self.arrival_s,
            "ok": self.ok,
            "ttft_s": self.ttft,
            "queue_wait_s": self.queue_wait_s,
            "worker_ttft_s": self.worker_ttft_s,
            "load_s": self.load_s,
            "prompt_tokens": self.usage_prompt_tokens or self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "sent": self.sent,
            "done": self.done,
        }

    @property
    def cold(self) -> bool:
        return self.backbone_ready is not None or self.load_s > 0

    @property
    def cold_added_s(self) -> float:
        backbone = max(0.0, (self.backbone_ready or self.sent) - self.sent)
        return backbone + self.load_s


# --- client -----------------------------------------------------------------------------------
async def stream_completion(client: httpx.AsyncClient, model: str, prompt: str, rec: RequestRecord) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": rec.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/completions", json=body) as response:
        rec.status = response.status_code
        if response.status_code != 200:
            rec.error = (await response.aread()).decode()[:300]
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data.strip() == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                rec.error = str(chunk["error"])[:300]
                return
            rec.invocation_id = rec.invocation_id or chunk.get("id", "")
            choices = chunk.get("choices") or [{}]
            now = time.perf_counter()
            if choices[0].get("text"):
                rec.first_token = rec.first_token or now
                rec.chunk_times.append(now)
            elif choices[0].get("finish_reason"):  # finished without visible text (e.g. eos first)
                rec.first_token = rec.first_token or now
            if chunk.get("usage"):
                rec.completion_tokens = chunk["usage"]["completion_tokens"]
                rec.usage_prompt_tokens = chunk["usage"]["prompt_tokens"]
    rec.done = time.perf_counter()


async def replay_system(
    system: System, requests: list[trace.TraceRequest], functions: list[FunctionSpec], seed: int
) -> tuple[list[RequestRecord], float, float]:
    records = [
        RequestRecord(i, r.function_index, r.arrival_s, r.prompt_tokens, r.output_tokens)
        for i, r in enumerate(requests)
    ]
    headers = {"Authorization": f"Bearer {system.api_key}"}
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=128)
    async with httpx.AsyncClient(base_url=system.url, headers=headers, timeout=900, limits=limits) as client:
        with Progress(
            TextColumn(f"{system.name:>9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            bar = progress.add_task(system.name, total=len(records))
            freeze_startup_heap()  # a full collection here would stall every stream the client reads
            start = time.perf_counter()

            async def one(rec: RequestRecord) -> None:
                await asyncio.sleep(max(0.0, rec.arrival_s - (time.perf_counter() - start)))
                rec.sent = time.perf_counter()
                ready = await system.before_request(rec.function_index, time.monotonic())
                if ready is not None:  # monotonic -> perf_counter
                    rec.backbone_ready = rec.sent + (ready - (time.monotonic() - (time.perf_counter() - rec.sent)))
                try:
                    prompt = trace.synthetic_prompt(rec.prompt_tokens, seed + rec.index)
                    await stream_completion(client, functions[rec.function_index].name, prompt, rec)
                except httpx.HTTPError as e:
                    rec.error = repr(e)
                finally:
                    system.after_request(rec.function_index, time.monotonic())
                    progress.advance(bar)

            mono_start = time.monotonic()
            await asyncio.gather(*(one(r) for r in records))
            return records, mono_start, time.monotonic()


async def warm_up(system: System, functions: list[FunctionSpec], rounds: int, seed: int) -> None:
    """Serve ``rounds`` short requests per function, one at a time, before measuring: every
    system's fresh processes pay their first-use costs (allocator, kernels, connections) here,
    not in the first system's measured requests. Every system gets the same warm-up."""
    headers = {"Authorization": f"Bearer {system.api_key}"}
    async with httpx.AsyncClient(base_url=system.url, headers=headers, timeout=900) as client:
        for r in range(rounds):
            for i, fn in enumerate(functions):
                rec = RequestRecord(-1, i, 0.0, 8, 4)
                await system.before_request(i, time.monotonic())  # the dedicated system starts a backbone
                try:
                    prompt = trace.synthetic_prompt(8, seed + r * len(functions) + i)
                    await stream_completion(client, fn.name, prompt, rec)
                finally:
                    system.after_request(i, time.monotonic())
                if not rec.ok:
                    raise RuntimeError(f"{system.name}: warm-up request to {fn.name} failed: {rec.status} {rec.error}")


async def attach_load_times(system: System, records: list[RequestRecord]) -> None:
    """Where each invocation's time went, as the worker measured it (its stored ``timings``)."""
    ids = {r.invocation_id.removeprefix("cmpl-"): r for r in records if r.invocation_id}
    for inv_id, timings in (await invocation_timings(system.settings, list(ids))).items():
        ids[inv_id].load_s = float(timings.get("load_s", 0.0))
        ids[inv_id].load_tier = str(timings.get("load_tier", ""))
        ids[inv_id].queue_wait_s = float(timings.get("queue_wait_s", 0.0))
        ids[inv_id].worker_ttft_s = float(timings.get("ttft_s", 0.0))


# --- metrics ----------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(system: System, records: list[RequestRecord], start: float, end: float, args: argparse.Namespace) -> dict:
    ok = [r for r in records if r.ok]
    gaps = [g for r in ok for g in r.gaps]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.usage_prompt_tokens for r in ok)
    wall = max(1e-9, max((r.done for r in ok), default=0) - min((r.sent for r in ok), default=0))
    device_s = system.device_seconds(start, end)
    cost_usd = device_s / 3600 * args.device_price_per_hour
    slo_ok = [r for r in ok if r.ttft <= args.slo_ttft and (not r.gaps or statistics.fmean(r.gaps) <= args.slo_tbt)]
    cold = [r for r in ok if r.cold]
    return {
        "ttft_p50_s": pct([r.ttft for r in ok], 50),
        "ttft_p99_s": pct([r.ttft for r in ok], 99),
        "tbt_p50_s": pct(gaps, 50),
        "queue_wait_p50_s": pct([r.queue_wait_s for r in ok], 50),
        "queue_wait_p99_s": pct([r.queue_wait_s for r in ok], 99),
        "worker_ttft_p50_s": pct([r.worker_ttft_s for r in ok], 50),
        "worker_ttft_p99_s": pct([r.worker_ttft_s for r in ok], 99),
        "e2e_p50_s": pct([r.done - r.sent for r in ok], 50),
        "throughput_tokens_per_s": out_tokens / wall,
        "slo_attainment": len(slo_ok) / len(records) if records else 0.0,
        "cold_starts": len(cold),
        "cold_start_added_p50_s": pct([r.cold_added_s for r in cold], 50),
        "cost_per_1m_tokens_usd": cost_usd / max(1e-9, (in_tokens + out_tokens) / 1e6),
        "device_seconds": device_s,
        "peak_memory_bytes": system.peak_memory_bytes,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
    }


def reduction(ours: float, theirs: float) -> float:
    return 1.0 - ours / theirs if theirs > 0 else 0.0


def comparisons(results: dict[str, dict]) -> dict[str, float]:
    ours = results.get("lorafaas")
    out: dict[str, float] = {}
    if ours and "dedicated" in results:
        d = results["dedicated"]
        out["ttft_p50_reduction_vs_dedicated"] = reduction(ours["ttft_p50_s"], d["ttft_p50_s"])
        out["cost_reduction_vs_dedicated"] = reduction(ours["cost_per_1m_tokens_usd"], d["cost_per_1m_tokens_usd"])
    if ours and "reactive" in results:
        r = results["reactive"]
        out["cold_start_added_reduction_vs_reactive"] = reduction(
            ours["cold_start_added_p50_s"], r["cold_start_added_p50_s"]
        )
        out["throughput_vs_reactive"] = ours["throughput_tokens_per_s"] / max(1e-9, r["throughput_tokens_per_s"])
        out["ttft_p50_reduction_vs_reactive"] = reduction(ours["ttft_p50_s"], r["ttft_p50_s"])
    if ours and "rank-oblivious" in results:
        b = results["rank-oblivious"]
        out["ttft_p99_reduction_vs_rank_oblivious"] = reduction(ours["ttft_p99_s"], b["ttft_p99_s"])
        out["adapter_load_reduction_vs_rank_oblivious"] = reduction(
            ours.get("adapter_loads", 0), b.get("adapter_loads", 0)
        )
        out["throughput_vs_rank_oblivious"] = ours["throughput_tokens_per_s"] / max(1e-9, b["throughput_tokens_per_s"])
    return out


def print_table(results: dict[str, dict]) -> None:
    table = Table(title="trace replay: lorafaas against the papers' baselines")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    rows = [
        ("TTFT p50 / p99 (s)", lambda m: f"{m['ttft_p50_s']:.3f} / {m['ttft_p99_s']:.3f}"),
        ("TBT p50 (s)", lambda m: f"{m['tbt_p50_s']:.4f}"),
        ("queue wait p50 / p99 (s)", lambda m: f"{m['queue_wait_p50_s']:.3f} / {m['queue_wait_p99_s']:.3f}"),
        ("worker-side TTFT p50 / p99 (s)", lambda m: f"{m['worker_ttft_p50_s']:.3f} / {m['worker_ttft_p99_s']:.3f}"),
        ("e2e p50 (s)", lambda m: f"{m['e2e_p50_s']:.3f}"),
        ("throughput (out tok/s)", lambda m: f"{m['throughput_tokens_per_s']:.1f}"),
        ("SLO attainment", lambda m: f"{m['slo_attainment']:.1%}"),
        ("cold starts", lambda m: f"{m['cold_starts']}"),
        ("cold-start added p50 (s)", lambda m: f"{m['cold_start_added_p50_s']:.3f}"),
        ("device-seconds", lambda m: f"{m['device_seconds']:.1f}"),
        ("cost per 1M tokens (USD)", lambda m: f"{m['cost_per_1m_tokens_usd']:.4f}"),
        ("peak worker memory (MiB)", lambda m: f"{m['peak_memory_bytes'] / 2**20:.0f}"),
        ("completed / failed", lambda m: f"{m['completed']} / {m['failed']}"),
        ("adapter loads (host->device)", lambda m: f"{m.get('adapter_loads', 0):.0f}"),
        ("spill-overs / re-routes", lambda m: f"{m.get('spill_overs', 0):.0f} / {m.get('rerouted', 0):.0f}"),
        ("peer fetches", lambda m: f"{m.get('peer_fetches', 0):.0f}"),
        (
            "placement moves / worker commands",
            lambda m: f"{m.get('placement_moves', 0):.0f} / {m.get('worker_commands', 0):.0f}",
        ),
    ]
    for label, fmt in rows:
        table.add_row(label, *(fmt(m) for m in results.values()))
    Console().print(table)


def write_plots(out_dir: Path, per_system: dict[str, list[RequestRecord]], results: dict[str, dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(fig, name: str) -> None:
        paths.append(out_dir / name)
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, records in per_system.items():
        ttfts = sorted(r.ttft for r in records if r.ok)
        ax.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.legend()
    save(fig, "replay_ttft_cdf.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(
        list(results),
        [m["cost_per_1m_tokens_usd"] for m in results.values()],
        color=["tab:green", "tab:red", "tab:orange", "tab:blue"][: len(results)],
    )
    ax.set_ylabel("USD per 1M tokens")
    ax.set_title("cost per 1M tokens")
    save(fig, "replay_cost.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, records in per_system.items():
        arrivals = sorted(r.arrival_s for r in records if r.cold)
        ax.step(arrivals, range(1, len(arrivals) + 1), where="post", label=name)
    ax.set_xlabel("arrival time in the replay (s)")
    ax.set_ylabel("cumulative cold starts")
    ax.set_title("cold starts over time")
    ax.legend()
    save(fig, "replay_cold_starts.png")
    plt.close("all")
    return paths


# --- setup ------------------------------------------------------------------------------------
def build_models(workdir: Path, shape: str, ranks: list[int]) -> tuple[Path, list[Path]]:
    from gpuworker.models import build_backbone, make_adapter

    backbone = workdir / "backbones" / shape
    if not (backbone / "config.json").is_file():
        build_backbone(backbone, shape, seed=0)
    adapters = []
    for i, rank in enumerate(ranks):
        folder = workdir / "adapters" / f"{shape}-f{i:02d}-r{rank}"
        if not (folder / "adapter_model.safetensors").is_file():
            make_adapter(backbone, folder, rank, seed=1000 + i)
        adapters.append(folder)
    return backbone, adapters


@dataclass(frozen=True)
class AdapterSize:
    pages: int  # device pool pages it takes on this backbone
    nbytes: int


def adapter_sizes(backbone: Path, adapters: list[Path]) -> list[AdapterSize]:
    """Each adapter's size as the worker holds it (read once from its folder)."""
    from transformers import AutoConfig

    from gpuworker.engine import AdapterWeights
    from gpuworker.engine.engine import page_elems_for

    config = AutoConfig.from_pretrained(backbone)
    page = page_elems_for(config)
    weights = [AdapterWeights.from_peft_folder(a, config) for a in adapters]
    return [AdapterSize(-(-w.numel // page), w.nbytes) for w in weights]


def memory_for(sizes: list[AdapterSize], pool_fraction: float, host_fraction: float) -> tuple[int, int]:
    """(device pool pages, host cache bytes) that hold these fractions of the adapters' total size,
    never less than the largest one (a fraction of 0 = the worker's default, 0)."""

    def share(values: list[int], fraction: float) -> int:
        return max(max(values), int(sum(values) * fraction)) if fraction > 0 else 0

    return share([s.pages for s in sizes], pool_fraction), share([s.nbytes for s in sizes], host_fraction)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slice_args(p, duration=60.0)
    add_scaling_args(p)
    add_function_args(p, functions=10)
    p.add_argument(
        "--workers", type=int, default=1, help="shared-backbone workers (lorafaas, reactive, rank-oblivious)"
    )
    p.add_argument("--shape", default="demo", help="backbone shape (tiny, demo, small, llama-7b)")
    p.add_argument(
        "--pool-fraction",
        type=float,
        default=0.5,
        help="device pool size as a fraction of all adapters' bytes (0 = engine default)",
    )
    p.add_argument(
        "--host-fraction",
        type=float,
        default=0.0,
        help="host cache of each worker as a fraction of all adapters' bytes (0 = the worker's default, 2 GiB): "
        "below 1, adapters that fell out of it load from disk again",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=20.0,
        help="dedicated: stop a function's backbone after this idle time (s)",
    )
    p.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT SLO (s)")
    p.add_argument("--slo-tbt", type=float, default=0.25, help="mean time-between-tokens SLO (s)")
    p.add_argument(
        "--device-price-per-hour",
        type=float,
        default=3.00,
        help="USD per device-hour (default: a public on-demand H100 price)",
    )
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=1,
        help="short requests per function served (and not measured) before each system's replay",
    )
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    p.add_argument("--workdir", type=Path, default=ROOT / ".lorafaas" / "replay")
    p.add_argument("--out", type=Path, help="write JSON results here")
    p.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    args = p.parse_args(argv)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    return args


def scaled_trace(args: argparse.Namespace) -> tuple[trace.TraceScaling, list[trace.TraceRequest], list[int]]:
    """The trace slice the arguments name, scaled and assigned to functions, and each function's rank."""
    scale = trace.TraceScaling(
        start_s=args.start,
        duration_s=args.duration,
        time_scale=args.time_scale,
        token_scale=args.token_scale,
        max_prompt_tokens=args.max_prompt,
        max_output_tokens=args.max_output,
        functions=args.functions,
        zipf_s=args.zipf,
        seed=args.seed,
    )
    requests = trace.load_trace(args.trace, scale)
    ranks = trace.assign_ranks(args.functions, tuple(int(r) for r in args.ranks.split(",")), args.seed)
    console.print(trace.describe(args.trace, scale, requests))
    return scale, requests, ranks


async def run(args: argparse.Namespace) -> dict:
    scale, requests, ranks = scaled_trace(args)
    console.print(f"function ranks: {ranks}; systems: {args.systems}; shape {args.shape}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    backbone, adapter_dirs = await asyncio.to_thread(build_models, args.workdir, args.shape, ranks)
    functions = [FunctionSpec(f"f{i:02d}-r{rank}", rank, d) for i, (rank, d) in enumerate(zip(ranks, adapter_dirs))]
    sizes = adapter_sizes(backbone, adapter_dirs)
    pool_pages, host_cache_bytes = memory_for(sizes, args.pool_fraction, args.host_fraction)
    setup = ReplaySetup(
        backbone,
        functions,
        workers=args.workers,
        pool_pages=pool_pages,
        host_cache_bytes=host_cache_bytes,
        idle_timeout_s=args.idle_timeout,
    )
    base = Settings(s3=S3Settings(endpoint="127.0.0.1:9000", bucket="lorafaas-bench"))
    results: dict[str, dict] = {}
    per_system: dict[str, list[RequestRecord]] = {}
    with DevStack(base, args.workdir / "stack"):
        for name in args.systems.split(","):
            system = make_system(name, base, setup, args.workdir)
            console.print(f"[bold]{name}[/bold]: starting")
            try:
                await system.start()
                await warm_up(system, functions, args.warmup_rounds, args.seed)
                await asyncio.sleep(1.5)  # let the control plane apply the warm-up's reports
                before = await system.counters()
                records, start, end = await replay_system(system, requests, functions, args.seed)
                await asyncio.sleep(1.5)  # let the control plane apply the last results and reports
                await attach_load_times(system, records)
                counters = {k: v - before.get(k, 0.0) for k, v in (await system.counters()).items()}
            finally:
                await system.stop()
            results[name] = summarize(system, records, start, end, args) | counters
            per_system[name] = records
            failures = [r for r in records if not r.ok][:3]
            for r in failures:
                console.print(f"[red]{name} request {r.index} failed[/red] status={r.status} {r.error}")
    print_table(results)
    report = {
        "trace": trace.describe(args.trace, scale, requests),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "function_ranks": ranks,
        "pool_pages": setup.pool_pages,
        "systems": results,
        # per request, for plots and the simulator's validation: arrival, client TTFT, worker timings
        "requests": {name: [r.as_json() for r in records] for name, records in per_system.items()},
        "comparisons": comparisons(results),
    }
    for key, value in report["comparisons"].items():
        console.print(f"{key}: {value:.1%}" if "reduction" in key else f"{key}: {value:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    if args.plots:
        for path in write_plots(args.plots, per_system, results):
            console.print(f"plot: {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    return 0 if all(m["failed"] == 0 for m in report["systems"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
