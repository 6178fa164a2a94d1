"""Scale-to-zero: an adapter unloaded to disk serves its next request correctly, and says so.

The worker executes what the predictor's commands ask (``EVICT``: device -> host -> disk);
the next request's load names the tier it came from and times each move back down.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpuworker.adapters import AdapterManager, Tier, adapter_key
from gpuworker.engine import EngineRequest, LoraEngine
from gpuworker.models import load_backbone
from gpuworker.runner import EngineRunner
from lorafaas.artifacts import ArtifactStore
from lorafaas.settings import Settings
from lorafaas.wire import AdapterRef, Timings

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def _generate(manager: AdapterManager, runner: EngineRunner, ref: AdapterRef, rid: str):
    load = await manager.stage(ref)
    request = EngineRequest(rid, adapter_key(ref), [1, 5, 9, 12], max_tokens=4, ignore_eos=True)
    queue = await runner.submit(request, prepare=load)
    tokens = []
    while True:
        out = await queue.get()
        tokens.append(out.token_id)
        if out.finished:
            return tokens, load


async def test_function_unloaded_to_disk_serves_its_next_invocation_with_the_tier_in_its_timings(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    store = ArtifactStore(settings.s3)
    store.ensure_bucket()
    stored = store.upload_adapter(adapter_dirs["a8"], "scale-to-zero")
    ref = AdapterRef(function_id="fn-s2z", bucket=stored.bucket, prefix=stored.prefix, sha256=stored.sha256, rank=8)
    model, tokenizer = load_backbone(backbone_dir)
    runner = EngineRunner(LoraEngine(model, tokenizer, max_batch=4))
    manager = AdapterManager(store, tmp_path / "cache", runner, model.config, host_budget_bytes=1 << 30)
    runner.start()
    try:
        first, load = await _generate(manager, runner, ref, "first")
        assert load.tier == Tier.S3 and set(load.moves_s) == {"s3->disk", "disk->host", "host->device"}

        warm, load = await _generate(manager, runner, ref, "warm")
        assert load.tier == Tier.DEVICE and load.moves_s == {}

        await manager.evict(ref)  # scale to zero: off the device and out of host memory
        assert manager.tier_of(ref) == Tier.DISK and runner.engine.pool_stats().pages_used == 0

        again, load = await _generate(manager, runner, ref, "after-scale-to-zero")
        assert again == first == warm  # served correctly: same adapter, same greedy tokens
        assert load.tier == Tier.DISK
        assert set(load.moves_s) == {"disk->host", "host->device"}  # no S3 download: bounded by disk + copy
        assert all(s >= 0 for s in load.moves_s.values())
        timings = Timings(load_s=load.fetch_s + load.copy_s, load_tier=load.tier.value, load_moves_s=load.moves_s)
        assert Timings.model_validate_json(timings.model_dump_json()).load_tier == "disk"
    finally:
        await runner.stop()


async def test_two_functions_with_the_same_adapter_fetch_its_folder_once(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Functions registered with the same adapter share its disk folder (named by content): loaded
    at the same time, one downloads it and the other waits and reads it (a second download replaced
    the folder while the first was reading it: 'adapter_config.json is missing')."""
    store = ArtifactStore(settings.s3)
    store.ensure_bucket()
    stored = store.upload_adapter(adapter_dirs["a8"], "same-adapter")
    refs = [
        AdapterRef(function_id=f"fn-same-{i}", bucket=stored.bucket, prefix=stored.prefix, sha256=stored.sha256, rank=8)
        for i in range(4)
    ]
    model, tokenizer = load_backbone(backbone_dir)
    runner = EngineRunner(LoraEngine(model, tokenizer, max_batch=4))
    manager = AdapterManager(store, tmp_path / "cache", runner, model.config, host_budget_bytes=0)
    runner.start()
    try:
        loads = await asyncio.gather(*(manager.stage(ref) for ref in refs))
        assert sum("s3->disk" in load.moves_s for load in loads) == 1
        assert all(load.tier == Tier.S3 and "disk->host" in load.moves_s for load in loads)
    finally:
        await runner.stop()
