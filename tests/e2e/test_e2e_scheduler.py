"""The scheduler live: three real workers (tiny backbone) behind one gateway and one control plane.

Placement, affinity routing, spill-over, kill -9 with 100+ async invocations queued, drain, and
a worker joining mid-traffic, on real NATS, Postgres and S3. The tests run in order on one
cluster (each leaves it as the next expects: w3 is killed, w2 drained, w4 joins).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest
from nats.js.errors import NotFoundError
from sqlalchemy import func, select

from controlplane.db.models import Invocation, InvocationState, UsageRecord
from launcher.devstack import free_port
from launcher.platform import admin, create_tenant_with_key, prepare, publish_backbone, register_function
from launcher.stack import PlatformProcesses, wait_for_worker
from lorafaas.names import Names
from lorafaas.settings import SchedulerSettings, Settings
from lorafaas.wire import InvocationResult
from tests.conftest import drop_private_state, make_settings

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

# Two functions per rank: placement has something to spread and group.
FUNCTIONS = {"f8a": "a8", "f8b": "a8", "f16a": "b16", "f16b": "b16", "f32a": "c32", "f32b": "c32"}
SPILL_THRESHOLD = 3


@dataclass
class Cluster:
    settings: Settings
    procs: PlatformProcesses
    key: str
    env: dict[str, str]
    function_ids: dict[str, str] = field(default_factory=dict)  # name -> id
    gone: list[str] = field(default_factory=list)  # killed or drained by an earlier test

    @property
    def gateway(self) -> str:
        return f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"

    @property
    def controlplane(self) -> str:
        return f"http://{self.settings.controlplane_host}:{self.settings.controlplane_port}"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.gateway, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)

    def admin_client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.settings.admin_token}"}
        return httpx.AsyncClient(base_url=self.controlplane, headers=headers, timeout=30)

    def start_worker(self, worker_id: str) -> None:
        # Each its own disk cache, as on separate machines: a missing adapter comes from a peer or S3.
        cache = self.procs.logs.parent / "cache" / worker_id
        self.procs.start_worker(worker_id, {**self.env, "LORAFAAS_WORKER__CACHE_DIR": str(cache)})

    async def placement(self) -> dict:
        async with self.admin_client() as c:
            response = await c.get("/admin/placement")
        response.raise_for_status()
        return response.json()

    async def gateway_counter(self, name: str, label: str) -> float:
        async with httpx.AsyncClient(base_url=self.gateway) as c:
            text = (await c.get("/metrics")).text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and label in line
        )


@pytest.fixture(scope="module")
def cluster(session_tmp: Path, s3_port: int, backbone_dir: Path, adapter_dirs: dict[str, Path]) -> Iterator[Cluster]:
    suffix = uuid.uuid4().hex[:8]
    base = make_settings(session_tmp / "sched", s3_port, f"lorafaas_sched_{suffix}", f"lfs{suffix}")
    settings = base.model_copy(
        update={
            "scheduler": SchedulerSettings(
                interval_s=0.3, dead_after_s=2.0, spill_threshold=SPILL_THRESHOLD, saturated_queue=10_000
            ),
            "gateway_port": free_port(),
            "controlplane_port": free_port(),
        }
    )
    asyncio.run(prepare(settings))
    uri = asyncio.run(publish_backbone(settings, "tiny", backbone_dir))
    env = {
        "LORAFAAS_WORKER__BACKBONE": "tiny",
        "LORAFAAS_WORKER__BACKBONE_URI": uri,
        "LORAFAAS_WORKER__JOIN_TIMEOUT_S": "60",
    }
    procs = PlatformProcesses(settings, session_tmp / "sched-platform")
    try:

        async def setup() -> Cluster:
            tenant_id, key = await create_tenant_with_key(settings, "sched")
            c = Cluster(settings, procs, key, env)
            for name, adapter in FUNCTIONS.items():
                served = await register_function(settings, tenant_id, name, "tiny", adapter_dirs[adapter], 1000, 1000)
                c.function_ids[name] = served.function.id
            return c

        cluster = asyncio.run(setup())
        procs.start_controlplane()
        procs.start_gateway()
        for w in ("w1", "w2", "w3"):
            cluster.start_worker(w)
        for w in ("w1", "w2", "w3"):
            asyncio.run(wait_for_worker(settings, w, timeout_s=400))
        yield cluster
    finally:
        procs.stop_all()
        asyncio.run(drop_private_state(settings))


async def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval_s)


async def worker_of(cluster: Cluster, invocation_id: str) -> str | None:
    """The worker that ran it, once the control plane applied its result (the caller hears it first)."""
    async with admin(cluster.settings) as a:
        row = await a.session.get(Invocation, invocation_id)
    return row.worker_id if row is not None else None


async def stable_placement(cluster: Cluster, quiet_s: float = 3.0, seen: dict[str, set[str]] | None = None) -> dict:
    """The placement once no round has changed it for ``quiet_s`` (rebalancing after the joins settled);
    ``seen`` collects every worker shown holding each function meanwhile."""
    loop = asyncio.get_running_loop()
    last, since = None, loop.time()
    deadline = since + 60
    while loop.time() < deadline:
        p = await cluster.placement()
        for f, ws in p["replicas"].items() if seen is not None else ():
            seen.setdefault(f, set()).update(ws)
        if p["replicas"] != last:
            last, since = p["replicas"], loop.time()
        elif loop.time() - since >= quiet_s:
            return p
        await asyncio.sleep(0.3)
    raise AssertionError("the placement did not settle within 60 s")


async def invoke_async(cluster: Cluster, names: list[str], max_tokens: int = 8) -> list[str]:
    limit = asyncio.Semaphore(4)  # the gateway's database pool in tests is small
    async with cluster.client() as c:

        async def one(i: int, name: str) -> str:
            body = {"prompt": f"request {i} for {name}", "max_tokens": max_tokens, "mode": "async"}
            async with limit:
                response = await c.post(f"/v1/functions/{name}/invoke", json=body)
            assert response.status_code in (200, 202), response.text
            return response.json()["id"]

        return list(await asyncio.gather(*(one(i, n) for i, n in enumerate(names))))


async def settled(cluster: Cluster, ids: list[str], timeout_s: float) -> dict[str, Invocation | InvocationResult]:
    """Wait until every invocation is terminal; returns the rows.

    Until issue 12 (2) is fixed, a result whose text holds a NUL byte never reaches Postgres (the
    event is retried without end); such an invocation counts as settled by the result it
    published, which is what a caller polling it would be answered from.
    """
    nc = await nats.connect(cluster.settings.nats.url)
    names = Names(cluster.settings.nats.prefix)
    last: dict[str, str] = {}

    async def published(invocation_id: str) -> InvocationResult | None:
        try:
            msg = await nc.jetstream().get_last_msg(names.events_stream, names.result_subject(invocation_id))
        except NotFoundError:
            return None
        result = InvocationResult.decode(msg.data)
        return result if "\x00" in result.text else None

    async def done() -> dict[str, Invocation | InvocationResult] | None:
        async with admin(cluster.settings) as a:
            rows = (await a.session.scalars(select(Invocation).where(Invocation.id.in_(ids)))).all()
        out: dict[str, Invocation | InvocationResult] = {r.id: r for r in rows if InvocationState(r.state).terminal}
        last.update({r.id: r.state for r in rows})
        for invocation_id in set(ids) - set(out):
            if (result := await published(invocation_id)) is not None:
                out[invocation_id] = result
        return out if len(out) == len(ids) else None

    try:
        return await wait_for(done, timeout_s, f"{len(ids)} invocations to settle", interval_s=0.5)
    except AssertionError as e:
        pending = {i: last.get(i, "unrecorded") for i in ids if last.get(i) not in ("succeeded", "failed")}
        raise AssertionError(f"{e}: {len(pending)} not settled: {list(pending.items())[:10]}") from None
    finally:
        await nc.close()


async def usage_counts(cluster: Cluster, ids: list[str]) -> dict[str, int]:
    async with admin(cluster.settings) as a:
        rows = await a.session.execute(
            select(UsageRecord.invocation_id, func.count())
            .where(UsageRecord.invocation_id.in_(ids))
            .group_by(UsageRecord.invocation_id)
        )
    return dict(rows.all())


def state_of(row: Invocation | InvocationResult) -> str:
    return row.status.value if isinstance(row, InvocationResult) else row.state


def assert_exactly_once(rows: dict[str, Invocation | InvocationResult], usage: dict[str, int]) -> None:
    failed = {i: (state_of(r), r.error) for i, r in rows.items() if state_of(r) != InvocationState.SUCCEEDED}
    assert not failed, failed
    assert set(usage) == set(rows) and set(usage.values()) == {1}, usage


async def test_every_function_is_placed_and_served_by_its_holders(cluster: Cluster) -> None:
    # Every worker the control plane showed holding each function: a rebalance may move a replica,
    # and a gateway routes on the last table its KV watch delivered, which may be older.
    held: dict[str, set[str]] = {}

    async def all_placed() -> dict | None:
        p = await cluster.placement()
        for f, ws in p["replicas"].items():
            held.setdefault(f, set()).update(ws)
        active = {w for w, v in p["workers"].items() if v["state"] == "active"}
        ok = active == {"w1", "w2", "w3"} and set(p["replicas"]) == set(cluster.function_ids.values())
        return p if ok else None

    await wait_for(all_placed, 60, "every function placed on the three active workers")
    placement = await stable_placement(cluster, seen=held)
    affinity_before = await cluster.gateway_counter("lorafaas_gateway_routes_total", 'outcome="affinity"')
    async with cluster.client() as c:
        for name, fid in cluster.function_ids.items():
            for i in range(2):
                response = await c.post(f"/v1/functions/{name}/invoke", json={"prompt": f"hi {i}", "max_tokens": 4})
                assert response.status_code == 200, response.text
                invocation_id = response.json()["id"]
                worker_id = await wait_for(
                    lambda i=invocation_id: worker_of(cluster, i), 15, "the result applied to Postgres"
                )
                placement = await cluster.placement()
                for f, ws in placement["replicas"].items():
                    held.setdefault(f, set()).update(ws)
                assert worker_id in held[fid], (name, worker_id, held[fid])
    affinity = await cluster.gateway_counter("lorafaas_gateway_routes_total", 'outcome="affinity"')
    assert affinity - affinity_before == 2 * len(cluster.function_ids)
    for w in ("w1", "w2", "w3"):  # what a worker is placed to hold is on its device (prefetched)
        view = placement["workers"][w]
        assert set(view["functions"]) <= set(view["adapters"]["device"]) | set(view["adapters"]["host"]), view


async def test_spill_over_past_the_threshold(cluster: Cluster) -> None:
    spills_before = await cluster.gateway_counter("lorafaas_gateway_routes_total", 'outcome="spill"')
    fid = cluster.function_ids["f8a"]
    ids = await invoke_async(cluster, ["f8a"] * 30, max_tokens=24)
    rows = await settled(cluster, ids, 120)
    assert_exactly_once(rows, await usage_counts(cluster, ids))
    spills = await cluster.gateway_counter("lorafaas_gateway_routes_total", 'outcome="spill"')
    assert spills - spills_before > 0
    placement = await cluster.placement()
    served_by = {r.worker_id for r in rows.values()}
    assert served_by - set(placement["replicas"][fid]) or len(served_by) > 1, served_by


async def test_kill_minus_9_with_queued_invocations(cluster: Cluster) -> None:
    names = [n for _ in range(20) for n in cluster.function_ids]  # 120 across every function
    ids = await invoke_async(cluster, names, max_tokens=16)
    assert len(ids) >= 100
    placement = await cluster.placement()
    victim = max(("w1", "w2", "w3"), key=lambda w: (len(placement["workers"][w]["functions"]), w))
    cluster.gone.append(victim)
    cluster.procs.kill(f"worker-{victim}")  # SIGKILL: no ack, no goodbye
    rows = await settled(cluster, ids, 180)
    assert_exactly_once(rows, await usage_counts(cluster, ids))

    async def replaced() -> dict | None:
        p = await cluster.placement()
        gone = p["workers"].get(victim, {}).get("state", "dead") == "dead"
        holders = {w for hs in p["replicas"].values() for w in hs}
        ok = gone and victim not in holders and set(p["replicas"]) == set(cluster.function_ids.values())
        return p if ok else None

    placement = await wait_for(replaced, 30, "the dead worker's functions re-placed")
    assert victim in placement["rerouting"]


async def test_drain_moves_functions_and_lets_the_worker_exit(cluster: Cluster) -> None:
    drained = min(w for w in ("w1", "w2", "w3") if w not in cluster.gone)
    cluster.gone.append(drained)
    names = [n for _ in range(6) for n in cluster.function_ids]
    ids = await invoke_async(cluster, names, max_tokens=16)
    async with cluster.admin_client() as c:
        response = await c.post(f"/admin/workers/{drained}/drain")
        assert response.status_code == 202, response.text
        assert response.json()["state"] == "draining"
        assert (await c.post("/admin/workers/nobody/drain")).status_code == 404
    proc = cluster.procs.procs[f"worker-{drained}"]
    await wait_for(lambda: _done(proc), 60, "the drained worker to exit")
    assert proc.returncode == 0
    rows = await settled(cluster, ids, 120)
    assert_exactly_once(rows, await usage_counts(cluster, ids))

    async def moved() -> dict | None:
        p = await cluster.placement()
        holders = {w for hs in p["replicas"].values() for w in hs}
        return p if drained not in holders and set(p["replicas"]) == set(cluster.function_ids.values()) else None

    await wait_for(moved, 30, "the drained worker's functions placed elsewhere")
    cluster.procs.procs.pop(f"worker-{drained}")


async def test_a_worker_joins_mid_traffic(cluster: Cluster) -> None:
    stop = asyncio.Event()
    traffic = asyncio.create_task(_steady_traffic(cluster, stop))
    await asyncio.sleep(1.0)
    cluster.start_worker("w4")

    async def joined() -> dict | None:
        async with cluster.admin_client() as c:
            workers = {w["id"]: w for w in (await c.get("/admin/workers")).json()["data"]}
        return workers if workers.get("w4", {}).get("state") == "active" else None

    await wait_for(joined, 400, "w4 to join and become active")

    async def held() -> bool:  # what it is placed to hold is prefetched (a rebalance may add more later)
        w4 = (await cluster.placement())["workers"]["w4"]
        return bool(w4["functions"]) and set(w4["functions"]) <= set(w4["adapters"]["device"]) | set(
            w4["adapters"]["host"]
        )

    await wait_for(held, 20, "w4's placements on its device")
    await asyncio.sleep(8.0)  # traffic goes on after the join
    stop.set()
    ids = await traffic
    rows = await settled(cluster, ids, 120)
    assert_exactly_once(rows, await usage_counts(cluster, ids))
    assert any(r.worker_id == "w4" for r in rows.values()), {r.worker_id for r in rows.values()}


async def _steady_traffic(cluster: Cluster, stop: asyncio.Event) -> list[str]:
    ids: list[str] = []
    while not stop.is_set():
        ids += await invoke_async(cluster, list(cluster.function_ids) * 2, max_tokens=16)
        await asyncio.sleep(0.5)
    return ids


async def _done(proc) -> bool:
    return proc.poll() is not None
