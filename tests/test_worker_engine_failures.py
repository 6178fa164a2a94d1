"""The engine thread as the worker sees it: loud failure, stall detection, liveness, snapshots.

Regressions (issues 12.1 and 13.3): an exception in ``engine.step`` ended the step loop without
a log line while the process kept its heartbeat and kept pulling work; the event loop read
``pool.stats()`` while the engine thread mutated the pool (``OrderedDict mutated during
iteration``), and one such error ended the contention reports for good.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane.registry import liveness
from controlplane.services.workers import WorkerStatus
from gpuworker.adapters import AdapterManager
from gpuworker.engine import AdapterWeights, EngineRequest, LoraEngine
from gpuworker.models import load_backbone
from gpuworker.runner import EngineFailed, EngineRunner
from gpuworker.service import PERMANENT, WorkerService, storable
from lorafaas import wire
from lorafaas.artifacts import ArtifactStore
from lorafaas.errors import InvalidInput
from lorafaas.names import Names
from lorafaas.settings import NatsSettings, S3Settings, WorkerSettings

pytestmark = [pytest.mark.unit, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def tiny(backbone_dir: Path):
    return load_backbone(backbone_dir)


def _runner(tiny) -> EngineRunner:
    model, tokenizer = tiny
    return EngineRunner(LoraEngine(model, tokenizer, max_batch=4))


def _service(runner: EngineRunner, tiny, tmp_path: Path, **worker: object) -> WorkerService:
    model, tokenizer = tiny
    settings = WorkerSettings(cache_dir=tmp_path, **worker)
    adapters = AdapterManager(ArtifactStore(S3Settings()), tmp_path, runner, model.config, 1 << 20)
    return WorkerService(
        None,
        None,
        Names("unit"),
        NatsSettings(),
        settings,
        runner,
        adapters,
        tokenizer,
        runner.engine.max_seq_len,
        "cpu",
    )  # type: ignore[arg-type]  # no NATS: these tests drive the service's engine side only


def _beat(service: WorkerService) -> wire.WorkerHeartbeat:
    base = wire.WorkerHeartbeat(worker_id="w", backbone="tiny", device="cpu", started_at=datetime.now(UTC))
    return service.heartbeat(base)


async def test_a_failing_step_is_loud_fails_what_it_held_and_stops_the_worker(tiny, tmp_path, caplog) -> None:
    runner = _runner(tiny)
    service = _service(runner, tiny, tmp_path)

    def broken_step() -> list:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    runner.engine.step = broken_step  # type: ignore[method-assign]
    runner.start()
    watchdog = asyncio.create_task(service._watch_engine())
    try:
        with caplog.at_level("CRITICAL", logger="gpuworker.runner"):
            queue = await runner.submit(EngineRequest("r1", None, [1, 5, 9], max_tokens=3))
            failure = await asyncio.wait_for(queue.get(), 10)
            await asyncio.wait_for(watchdog, 10)
    finally:
        await runner.stop()
    assert isinstance(failure, EngineFailed) and "illegal memory access" in str(failure)
    assert runner.failure is failure and service.draining.is_set()  # stops taking work
    assert any("engine loop stopped" in r.getMessage() for r in caplog.records)  # never silent
    with pytest.raises(EngineFailed):
        await runner.submit(EngineRequest("r2", None, [1, 5], max_tokens=1))
    beat = _beat(service)
    assert beat.engine_failed and "illegal memory access" in beat.engine_failed
    assert liveness(beat, stuck_after_s=30) == WorkerStatus.STUCK


async def test_a_hung_step_is_reported_then_declared_stuck(tiny, tmp_path) -> None:
    runner = _runner(tiny)
    service = _service(runner, tiny, tmp_path, engine_stall_exit_s=1.0)
    release = threading.Event()
    real_step = runner.engine.step

    def hung_step() -> list:
        release.wait(20)  # a kernel that never returns, until the test lets it
        return real_step()

    runner.engine.step = hung_step  # type: ignore[method-assign]
    runner.start()
    watchdog = asyncio.create_task(service._watch_engine())
    try:
        queue = await runner.submit(EngineRequest("r1", None, [1, 5, 9], max_tokens=2))
        await asyncio.sleep(0.6)
        beat = _beat(service)
        assert 0.3 < beat.engine_stalled_s and beat.engine_failed is None
        assert liveness(beat, stuck_after_s=0.3) == WorkerStatus.STUCK
        assert liveness(beat, stuck_after_s=30) == WorkerStatus.ALIVE
        failure = await asyncio.wait_for(queue.get(), 10)  # the watchdog gives up after 1 s
        await asyncio.wait_for(watchdog, 10)
    finally:
        release.set()
        await runner.stop()
    assert isinstance(failure, EngineFailed) and "no engine step completed" in str(failure)
    assert service.draining.is_set()


async def test_an_idle_or_moving_engine_is_alive(tiny, tmp_path) -> None:
    runner = _runner(tiny)
    service = _service(runner, tiny, tmp_path)
    runner.start()
    try:
        queue = await runner.submit(EngineRequest("r1", None, [1, 5, 9], max_tokens=3, ignore_eos=True))
        out = await queue.get()
        while not out.finished:  # run r1 to its end
            out = await queue.get()
        await asyncio.sleep(0.05)
        beat = _beat(service)
    finally:
        await runner.stop()
    assert beat.engine_steps >= 3 and beat.engine_stalled_s == 0.0 and beat.engine_failed is None
    assert liveness(beat, stuck_after_s=30) == WorkerStatus.ALIVE


async def test_reports_read_a_snapshot_never_the_live_engine(tiny, tmp_path, weights_for_tiny) -> None:
    """Every engine method the report could use is guarded: called off the engine thread, it fails the test."""
    runner = _runner(tiny)
    service = _service(runner, tiny, tmp_path)
    engine = runner.engine
    off_thread: list[str] = []

    def guard(name: str) -> None:
        real = getattr(engine, name)

        def checked(*args, **kwargs):
            if not threading.current_thread().name.startswith("engine"):
                off_thread.append(name)
            return real(*args, **kwargs)

        setattr(engine, name, checked)

    runner.start()
    for name in ("pool_stats", "num_running", "num_waiting", "resident_adapters", "lru_adapters"):
        guard(name)
    reports, errors = 0, 0
    stop = time.monotonic() + 3.0

    async def churn() -> None:  # the engine thread loads and offloads adapters as fast as it can
        i = 0
        while time.monotonic() < stop:
            name = f"a{i % 6}"
            await runner.call(engine.load_adapter, name, weights_for_tiny[i % len(weights_for_tiny)])
            if i % 2:
                await runner.call(engine.offload_adapter, name)
            i += 1

    churner = asyncio.create_task(churn())
    try:
        while time.monotonic() < stop:
            try:
                report = service.contention_report()
                assert report.pool_pages_used + report.pool_pages_free == engine.pool.num_pages
                reports += 1
            except Exception:
                errors += 1
            await asyncio.sleep(0)
        await churner
    finally:
        await runner.stop()
    assert errors == 0 and reports > 100 and not off_thread, (errors, reports, off_thread)
    snapshot = runner.snapshot
    assert snapshot.resident == engine.resident_adapters() and snapshot.pool == engine.pool_stats()
    with pytest.raises(AttributeError):
        snapshot.running = 1  # type: ignore[misc]  # frozen: readers cannot change what others read


@pytest.fixture(scope="module")
def weights_for_tiny(tiny, adapter_dirs: dict[str, Path]) -> list[AdapterWeights]:
    model, _ = tiny
    return [AdapterWeights.from_peft_folder(folder, model.config) for folder in adapter_dirs.values()]


async def test_nul_is_replaced_in_what_is_streamed_returned_and_stored() -> None:
    assert storable("a\x00b\x00") == "a\ufffdb\ufffd" and storable("plain") == "plain"


def _invocation(prompt: str, max_tokens: int, max_context: int | None) -> wire.Invocation:
    ref = wire.AdapterRef(function_id="f", bucket="b", prefix="p", sha256="0" * 64, rank=8)
    return wire.Invocation(
        invocation_id="i",
        tenant_id="t",
        backbone="tiny",
        adapter=ref,
        prompt=prompt,
        sampling=wire.SamplingParams(max_tokens=max_tokens),
        max_context=max_context,
    )


async def test_the_worker_holds_an_invocation_to_the_backbone_records_context(tiny, tmp_path) -> None:
    """Issue 13.2: one limit. The record's number travels with the invocation; the engine's is the backbone's."""
    runner = _runner(tiny)
    service = _service(runner, tiny, tmp_path)
    model = tiny[0]
    assert service.max_context == runner.engine.max_seq_len == model.config.max_position_embeddings
    prompt = "the quick brown fox " * 5
    n = len(service.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    assert service._tokenize(_invocation(prompt, 4, max_context=n + 4))  # exactly at the limit: fine
    with pytest.raises(InvalidInput) as refused:
        service._tokenize(_invocation(prompt, 5, max_context=n + 4))
    assert refused.value.details["limit"] == n + 4 and f"context of {n + 4} tokens" in refused.value.message
    with pytest.raises(InvalidInput):  # no record limit given: the engine's own
        service._tokenize(_invocation(prompt, service.max_context - n + 1, max_context=None))
    assert isinstance(refused.value, PERMANENT)  # never retried: answered failed at once
