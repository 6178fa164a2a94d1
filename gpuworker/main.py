"""Build a worker from settings and run it: backbone once, engine thread, NATS service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import nats
import torch

from gpuworker.adapters import AdapterManager
from gpuworker.engine import LoraEngine
from gpuworker.models import load_backbone
from gpuworker.runner import EngineRunner
from gpuworker.service import WorkerService
from lorafaas.artifacts import ArtifactStore, parse_s3_uri
from lorafaas.heap import freeze_startup_heap
from lorafaas.names import Names
from lorafaas.settings import Settings
from lorafaas.streams import ensure_streams

log = logging.getLogger(__name__)

# The process exit status when the engine loop failed or hung: a supervisor restarts the worker,
# and JetStream redelivers what it held.
EXIT_ENGINE_FAILED = 3


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def fetch_backbone(uri: str, store: ArtifactStore, cache_dir: Path, name: str) -> Path:
    """A local folder as it is; an ``s3://`` prefix downloaded (hash-checked) into the cache."""
    if not uri.startswith("s3://"):
        return Path(uri)
    bucket, prefix = parse_s3_uri(uri)
    dest = Path(cache_dir) / "backbones" / name
    if not (dest / "config.json").is_file():
        store.download(prefix, dest, bucket=bucket)
    return dest


async def build_service(settings: Settings) -> tuple[WorkerService, EngineRunner, nats.NATS]:
    ws = settings.worker
    if not ws.backbone_uri:
        raise ValueError("set LORAFAAS_WORKER__BACKBONE_URI to a local folder or s3:// prefix of the backbone")
    device = resolve_device(ws.device)
    store = ArtifactStore(settings.s3)
    folder = await asyncio.to_thread(fetch_backbone, ws.backbone_uri, store, ws.cache_dir, ws.backbone)
    model, tokenizer = await asyncio.to_thread(load_backbone, folder, device, getattr(torch, ws.dtype))
    engine = LoraEngine(model, tokenizer, device=device, max_batch=ws.max_batch, pool_pages=ws.pool_pages or None)
    runner = EngineRunner(engine)
    adapters = AdapterManager(
        store, ws.cache_dir, runner, model.config, ws.host_cache_bytes, pin_memory=device.startswith("cuda")
    )
    nc = await nats.connect(
        settings.nats.url, name=f"lorafaas-worker-{ws.worker_id}", max_reconnect_attempts=-1, reconnect_time_wait=0.5
    )
    js = nc.jetstream()
    names = Names(settings.nats.prefix)
    await ensure_streams(js, names)
    service = WorkerService(nc, js, names, settings.nats, ws, runner, adapters, tokenizer, engine.max_seq_len, device)
    return service, runner, nc


async def run_worker(settings: Settings) -> None:
    service, runner, nc = await build_service(settings)
    freeze_startup_heap()  # the backbone, torch and transformers: never scanned again
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, service.drain)
    runner.start()
    log.info("worker %s serving backbone %s", settings.worker.worker_id, settings.worker.backbone)
    try:
        await service.run()
    finally:
        await runner.stop()
        await nc.drain()
    if runner.failure is not None:
        log.critical("worker %s exits: %s", settings.worker.worker_id, runner.failure)
        logging.shutdown()
        # The engine thread may still sit in the step that hung: it cannot be joined, so leave now.
        os._exit(EXIT_ENGINE_FAILED)
