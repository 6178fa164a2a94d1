"""The worker's adapter tiers against a real S3 server: S3 -> disk -> host -> device and back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gpuworker.adapters import AdapterManager, Tier, adapter_key
from gpuworker.engine import EngineRequest, LoraEngine
from gpuworker.models import load_backbone
from gpuworker.runner import EngineRunner
from lorafaas.artifacts import ArtifactStore
from lorafaas.errors import ArtifactIntegrityError, InvalidArtifact
from lorafaas.settings import Settings
from lorafaas.wire import AdapterRef

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


def _upload(store: ArtifactStore, folder: Path, function_id: str, rank: int) -> AdapterRef:
    stored = store.upload_adapter(folder, "tiers-tenant")
    return AdapterRef(
        function_id=function_id, bucket=stored.bucket, prefix=stored.prefix, sha256=stored.sha256, rank=rank
    )


async def _generate(runner: EngineRunner, ref: AdapterRef, request_id: str) -> list[int]:
    queue = await runner.submit(
        EngineRequest(request_id, adapter_key(ref), [1, 5, 9, 12], max_tokens=4, ignore_eos=True)
    )
    tokens = []
    while True:
        out = await queue.get()
        tokens.append(out.token_id)
        if out.finished:
            return tokens


async def test_tiers_prefetch_offload_and_a_bad_adapter_fails_alone(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    store = ArtifactStore(settings.s3)
    store.ensure_bucket()
    model, tokenizer = load_backbone(backbone_dir)
    runner = EngineRunner(LoraEngine(model, tokenizer, max_batch=4))
    manager = AdapterManager(store, tmp_path / "cache", runner, model.config, host_budget_bytes=1 << 30)
    runner.start()
    try:
        good = _upload(store, adapter_dirs["a8"], "fn-good", 8)
        assert manager.tier_of(good) == Tier.S3
        load_s = await manager.ensure_on_device(good)  # S3 -> disk -> host -> device
        assert load_s > 0 and manager.tier_of(good) == Tier.DEVICE
        assert (tmp_path / "cache" / "adapters" / good.sha256 / "adapter_model.safetensors").is_file()
        used = runner.engine.pool_stats().pages_used
        assert used > 0 and await manager.ensure_on_device(good) == 0.0  # resident: no load

        assert await manager.offload(good)
        assert runner.engine.pool_stats().pages_used == 0 and manager.tier_of(good) == Tier.HOST
        await manager.ensure_on_device(good)  # back from host, no download
        assert runner.engine.pool_stats().pages_used == used

        # An adapter whose tensors do not fit this backbone (wrong shape): that function fails, clearly.
        mismatched = tmp_path / "mismatched"
        shutil.copytree(adapter_dirs["b16"], mismatched)
        config = json.loads((mismatched / "adapter_config.json").read_text())
        (mismatched / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
        bad = _upload(store, mismatched, "fn-mismatched", 8)
        with pytest.raises(InvalidArtifact, match="adapter_model.safetensors"):
            await manager.ensure_on_device(bad)

        # Bytes corrupted in S3 after upload: the hash check refuses them before parsing.
        corrupt = _upload(store, adapter_dirs["c32"], "fn-corrupt", 32)
        junk = tmp_path / "junk"
        junk.write_bytes(b"\0" * 64)
        store.client.fput_object(store.bucket, f"{corrupt.prefix}/adapter_model.safetensors", str(junk))
        with pytest.raises(ArtifactIntegrityError):
            await manager.ensure_on_device(corrupt)
        assert manager.tier_of(corrupt) == Tier.S3  # nothing half-downloaded left behind

        # The worker keeps serving the good function.
        assert len(await _generate(runner, good, "after-failures")) == 4
    finally:
        await runner.stop()
