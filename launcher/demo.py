"""The platform's main job on one machine: stack up, demo functions registered, a slice of the
production trace replayed through the gateway, a summary printed. Also ``lorafaas dev up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controlplane.services.ledger import UsageTotals, monthly_bill, picousd_to_usd, usage_totals
from launcher import trace
from launcher.devstack import DevStack
from launcher.platform import admin, create_tenant_with_key, prepare, publish_backbone, register_function
from launcher.stack import PlatformProcesses, wait_for_worker
from lorafaas.settings import Settings

DEMO_BACKBONE = "demo"
DEMO_RANKS = (8, 16, 32, 64)
# Integer micro-dollars per 1M tokens: $0.15 in, $0.60 out.
DEMO_PRICE_INPUT = 150_000
DEMO_PRICE_OUTPUT = 600_000

console = Console(stderr=True)


@dataclass
class DemoOptions:
    trace: Path
    duration_s: float = 60.0
    workdir: Path = Path(".lorafaas")
    seed: int = 0
    shape: str = DEMO_BACKBONE


@dataclass
class Outcome:
    status: int
    e2e_s: float
    ttft_s: float = 0.0
    completion_tokens: int = 0
    invocation_id: str | None = None
    error: str = ""


@dataclass
class DemoSetup:
    api_key: str
    tenant_id: str
    functions: list[str] = field(default_factory=list)


def _worker_env(settings: Settings, uri: str, workdir: Path) -> dict[str, str]:
    return {
        "LORAFAAS_WORKER__BACKBONE": DEMO_BACKBONE,
        "LORAFAAS_WORKER__BACKBONE_URI": uri,
        "LORAFAAS_WORKER__CACHE_DIR": str(workdir / "cache"),
    }


async def setup_demo(settings: Settings, workdir: Path, shape: str = DEMO_BACKBONE) -> tuple[str, DemoSetup]:
    """Migrate, publish the demo backbone, create the demo tenant and its four functions."""
    from gpuworker.models import build_backbone, make_adapter

    await prepare(settings)
    folder = workdir / "backbones" / shape
    if not (folder / "config.json").is_file():
        console.print(f"building the random-weight '{shape}' backbone in {folder}")
        await asyncio.to_thread(build_backbone, folder, shape, 0)
    uri = await publish_backbone(settings, DEMO_BACKBONE, folder)
    tenant_id, key = await create_tenant_with_key(settings, "demo")
    setup = DemoSetup(api_key=key, tenant_id=tenant_id)
    for i, rank in enumerate(DEMO_RANKS):
        adapter = workdir / "adapters" / f"demo-r{rank}"
        if not (adapter / "adapter_model.safetensors").is_file():
            await asyncio.to_thread(make_adapter, folder, adapter, rank, 100 + i)
        name = f"demo-r{rank}"
        await register_function(settings, tenant_id, name, DEMO_BACKBONE, adapter, DEMO_PRICE_INPUT, DEMO_PRICE_OUTPUT)
        setup.functions.append(name)
    return uri, setup


async def _invoke(client: httpx.AsyncClient, function: str, prompt: str, max_tokens: int) -> Outcome:
    started = time.perf_counter()
    try:
        response = await client.post(
            f"/v1/functions/{function}/invoke", json={"prompt": prompt, "max_tokens": max_tokens}
        )
    except httpx.HTTPError as e:
        return Outcome(status=0, e2e_s=time.perf_counter() - started, error=repr(e))
    e2e = time.perf_counter() - started
    body = response.json()
    if response.status_code != 200:
        return Outcome(response.status_code, e2e, error=body.get("error", {}).get("message", ""))
    return Outcome(200, e2e, body["timings"]["ttft_s"], body["usage"]["completion_tokens"], body["id"])


async def replay(
    base_url: str, api_key: str, functions: list[str], requests: list[trace.TraceRequest], seed: int
) -> tuple[list[Outcome], float]:
    """Send each request at its (scaled) arrival time; returns outcomes and wall time."""
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300, limits=limits) as client:
        with Progress(
            TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            bar = progress.add_task("replay", total=len(requests))
            start = time.perf_counter()

            async def one(i: int, req: trace.TraceRequest) -> Outcome:
                await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - start)))
                outcome = await _invoke(
                    client,
                    functions[req.function_index],
                    trace.synthetic_prompt(req.prompt_tokens, seed + i),
                    req.output_tokens,
                )
                progress.advance(bar)
                return outcome

            outcomes = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
            return list(outcomes), time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass(frozen=True)
class Billing:
    run: UsageTotals  # this run's invocations
    all_records: UsageTotals  # every usage record of the demo tenant
    month_bill_picousd: int  # this month's bill total, computed per function and summed


async def _billed(settings: Settings, tenant_id: str, ids: list[str], timeout_s: float = 30.0) -> Billing:
    """Wait for the control plane to record every invocation's usage, then sum the records
    and the month's bill, which must agree to the pico-dollar."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with admin(settings) as a:
            totals = await usage_totals(a.session, tenant_id, ids)
            if totals.records >= len(ids) or time.monotonic() > deadline:
                now = datetime.now(UTC)
                bill = await monthly_bill(a.session, tenant_id, now.year, now.month)
                return Billing(totals, await usage_totals(a.session, tenant_id), bill.total_picousd)
        await asyncio.sleep(0.5)


def summary_table(outcomes: list[Outcome], wall_s: float, billing: Billing) -> Table:
    ok = [o for o in outcomes if o.status == 200]
    ttft = [o.ttft_s for o in ok]
    e2e = [o.e2e_s for o in ok]
    tokens = sum(o.completion_tokens for o in ok)
    table = Table(title="lorafaas demo: trace replay summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("requests", f"{len(outcomes)}"),
        ("succeeded / failed", f"{len(ok)} / {len(outcomes) - len(ok)}"),
        ("TTFT p50 / p99 (s)", f"{_pct(ttft, 50):.3f} / {_pct(ttft, 99):.3f}"),
        ("end-to-end p50 / p99 (s)", f"{_pct(e2e, 50):.3f} / {_pct(e2e, 99):.3f}"),
        ("output tokens/s", f"{tokens / wall_s:.1f}"),
        ("usage records (this run)", f"{billing.run.records}"),
        ("tokens billed (in / out)", f"{billing.run.input_tokens} / {billing.run.output_tokens}"),
        ("amount billed this run (USD)", f"{picousd_to_usd(billing.run.amount_picousd)}"),
        ("demo tenant: month's bill (USD)", f"{picousd_to_usd(billing.month_bill_picousd)}"),
        ("demo tenant: sum of all usage records (USD)", f"{picousd_to_usd(billing.all_records.amount_picousd)}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


@contextlib.asynccontextmanager
async def running_platform(settings: Settings, workdir: Path, shape: str = DEMO_BACKBONE):
    """Services up, demo set up, control plane + gateway + one worker running; all stopped after."""
    with DevStack(settings, workdir):
        uri, setup = await setup_demo(settings, workdir, shape)
        procs = PlatformProcesses(settings, workdir)
        try:
            console.print("starting control plane, gateway and worker")
            await asyncio.to_thread(procs.start_controlplane)
            await asyncio.to_thread(procs.start_gateway)
            procs.start_worker("worker-0", _worker_env(settings, uri, workdir))
            await wait_for_worker(settings, "worker-0")
            yield setup
        finally:
            procs.stop_all()


async def run_demo(settings: Settings, options: DemoOptions) -> None:
    scale = trace.TraceScaling(duration_s=options.duration_s, functions=len(DEMO_RANKS), seed=options.seed)
    requests = trace.load_trace(options.trace, scale)
    console.print(trace.describe(options.trace, scale, requests))
    async with running_platform(settings, options.workdir, options.shape) as setup:
        base_url = f"http://{settings.gateway_host}:{settings.gateway_port}"
        outcomes, wall = await replay(base_url, setup.api_key, setup.functions, requests, options.seed)
        ids = [o.invocation_id for o in outcomes if o.invocation_id]
        billing = await _billed(settings, setup.tenant_id, ids)
    Console().print(summary_table(outcomes, wall, billing))
    failures = [o for o in outcomes if o.status != 200]
    for o in failures[:5]:
        console.print(f"[red]failed[/red] status={o.status}: {o.error}")


async def dev_up(settings: Settings, workdir: Path, shape: str = DEMO_BACKBONE) -> None:
    """The whole stack until SIGINT or SIGTERM; either stops every child (a service manager sends
    SIGTERM, and a bare SIGTERM would otherwise leave S3, gateway, control plane and worker running)."""
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)  # cancellation runs every cleanup block below
    with contextlib.suppress(asyncio.CancelledError):
        async with running_platform(settings, workdir, shape) as setup:
            console.print(
                f"gateway on http://{settings.gateway_host}:{settings.gateway_port}; demo functions {setup.functions}"
            )
            console.print(f"demo API key (shown once): {setup.api_key}")
            console.print("Ctrl-C or SIGTERM to stop")
            await asyncio.Event().wait()
