"""Gateway overhead: what gateway + JetStream + worker + result path add to an invocation.

A null worker (benchmarks/null_worker.py) answers without a model, so every millisecond
measured is platform overhead: HTTP, auth and admission in Postgres, the JetStream publish,
the worker's pull and its result, and the gateway hearing it. A bare NATS request/reply
round trip is measured in the same run as the floor.

    python -m benchmarks.gateway --requests 500 --out gateway.json

Starts its own S3 (moto), control plane, gateway and null worker; uses the NATS and Postgres
of the settings (a private database and subject prefix, removed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import httpx
import nats
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from launcher.devstack import free_port, start_s3, stop_process
from launcher.platform import create_tenant_with_key, prepare, publish_backbone, register_function
from launcher.stack import PlatformProcesses
from lorafaas.names import Names
from lorafaas.settings import DatabaseSettings, NatsSettings, S3Settings, Settings
from lorafaas.streams import delete_streams

console = Console()
NULL_WORKER = Path(__file__).with_name("null_worker.py")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def nats_rtt(url: str, prefix: str, n: int) -> list[float]:
    """Bare core-NATS request/reply round trips, in ms."""
    nc = await nats.connect(url)
    subject = f"{prefix}.bench.echo"

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=echo)
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await nc.request(subject, b"x" * 64, timeout=2)
        out.append((time.perf_counter() - started) * 1000)
    await nc.close()
    return out


async def sync_latencies(url: str, key: str, n: int, progress: Progress) -> list[float]:
    """Sequential sync invocations, timed at the client. aiohttp: its per-request cost is a
    fraction of httpx's, so the client, which shares the machine, adds less to what is measured."""
    task = progress.add_task("sync invocations", total=n)
    out = []
    async with aiohttp.ClientSession(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        for i in range(n):
            started = time.perf_counter()
            async with client.post(
                "/v1/functions/bench/invoke", json={"prompt": f"ping {i}", "max_tokens": 1}
            ) as response:
                await response.read()
            out.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            progress.advance(task)
    return out


async def admitted_per_s(client: httpx.AsyncClient, n: int, concurrency: int, progress: Progress) -> float:
    """Async submissions (202) per second with ``concurrency`` callers."""
    task = progress.add_task("async admissions", total=n)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    admitted = 0

    async def caller() -> None:
        nonlocal admitted
        while not queue.empty():
            i = queue.get_nowait()
            response = await client.post(
                "/v1/functions/bench/invoke", json={"prompt": f"job {i}", "max_tokens": 1, "mode": "async"}
            )
            admitted += response.status_code == 202
            progress.advance(task)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return admitted / (time.perf_counter() - started)


def bench_settings(args: argparse.Namespace, s3_port: int, suffix: str) -> Settings:
    base = Settings()
    return base.model_copy(
        update={
            "nats": NatsSettings(
                url=args.nats_url or base.nats.url, prefix=f"lfbench{suffix}", max_queue_per_function=100_000
            ),
            "database": DatabaseSettings(
                url=args.database_url or base.database.url.rsplit("/", 1)[0] + f"/lorafaas_bench_{suffix}", pool_size=10
            ),
            "s3": S3Settings(endpoint=f"127.0.0.1:{s3_port}", bucket="lorafaas-bench"),
            "gateway_port": free_port(),
            "controlplane_port": free_port(),
        }
    )


async def setup_function(settings: Settings, workdir: Path) -> str:
    from gpuworker.models import build_backbone, make_adapter

    await prepare(settings)
    backbone = build_backbone(workdir / "backbone", "tiny", seed=0)
    adapter = make_adapter(backbone, workdir / "adapter", 8, 1)
    await publish_backbone(settings, "bench", backbone)
    tenant_id, key = await create_tenant_with_key(settings, "bench")
    await register_function(settings, tenant_id, "bench", "bench", adapter, 0, 0)
    return key


async def cleanup(settings: Settings) -> None:
    nc = await nats.connect(settings.nats.url)
    js = nc.jetstream()
    await delete_streams(js, Names(settings.nats.prefix))
    await nc.close()
    dsn = settings.database.url.replace("postgresql+asyncpg", "postgresql")
    conn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


async def measure(args: argparse.Namespace, settings: Settings, key: str) -> dict:
    url = f"http://{settings.gateway_host}:{settings.gateway_port}"
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30, limits=limits
    ) as client:
        with Progress(console=console, transient=True) as progress:
            await sync_latencies(url, key, args.warmup, progress)
            rtt = await nats_rtt(settings.nats.url, settings.nats.prefix, args.requests)
            sync = await sync_latencies(url, key, args.requests, progress)
            rate = await admitted_per_s(client, args.admissions, args.concurrency, progress)
    return {
        "requests": args.requests,
        "nats_rtt_p50_ms": round(statistics.median(rtt), 3),
        "nats_rtt_p99_ms": round(percentile(rtt, 0.99), 3),
        "sync_p50_ms": round(statistics.median(sync), 3),
        "sync_p99_ms": round(percentile(sync, 0.99), 3),
        # What the platform adds above the bare NATS round trip the path needs anyway.
        "overhead_p50_ms": round(statistics.median(sync) - statistics.median(rtt), 3),
        "overhead_p99_ms": round(percentile(sync, 0.99) - percentile(rtt, 0.99), 3),
        "admitted_per_s": round(rate, 1),
        "concurrency": args.concurrency,
    }


def print_table(result: dict) -> None:
    table = Table(title="Gateway overhead (null worker)")
    table.add_column("measure")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_row("bare NATS request/reply", f"{result['nats_rtt_p50_ms']:.3f}", f"{result['nats_rtt_p99_ms']:.3f}")
    table.add_row("sync invoke over HTTP", f"{result['sync_p50_ms']:.3f}", f"{result['sync_p99_ms']:.3f}")
    table.add_row("overhead (invoke - NATS)", f"{result['overhead_p50_ms']:.3f}", f"{result['overhead_p99_ms']:.3f}")
    console.print(table)
    verdict = "meets" if result["overhead_p50_ms"] <= 5 else "MISSES"
    console.print(
        f"admitted async invocations: {result['admitted_per_s']:.1f}/s at concurrency {result['concurrency']}; "
        f"overhead p50 {verdict} the 5 ms target"
    )


async def run(args: argparse.Namespace) -> dict:
    suffix = uuid.uuid4().hex[:8]
    s3_port = free_port()
    s3 = start_s3(s3_port)
    settings = bench_settings(args, s3_port, suffix)
    workdir = Path(tempfile.mkdtemp(prefix="lorafaas-bench-"))
    procs = PlatformProcesses(settings, workdir)
    worker = None
    try:
        with console.status("setting up: database, backbone, function, processes"):
            key = await setup_function(settings, workdir)
            await asyncio.to_thread(procs.start_controlplane)
            await asyncio.to_thread(procs.start_gateway)
            worker = subprocess.Popen(
                [sys.executable, str(NULL_WORKER), settings.nats.url, settings.nats.prefix, "bench"],
                stdout=subprocess.PIPE,
                text=True,
            )
            await asyncio.to_thread(worker.stdout.readline)
        return await measure(args, settings, key)
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        procs.stop_all()
        stop_process(s3)
        await cleanup(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--requests", type=int, default=500, help="sequential sync invocations measured (and NATS round trips)"
    )
    parser.add_argument("--warmup", type=int, default=50, help="sync invocations before measuring")
    parser.add_argument("--admissions", type=int, default=1000, help="async submissions for the admission rate")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers for the admission rate")
    parser.add_argument("--nats-url", default=None, help="NATS server (default: settings)")
    parser.add_argument(
        "--database-url",
        default=None,
        help="Postgres database URL (default: a private database on the settings' server)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
