"""Peer fetch over real NATS: an adapter moves worker -> worker, hash-checked, S3 as the fallback."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from gpuworker.peer import PeerFetcher, PeerServer
from lorafaas.artifacts import ArtifactStore, adapter_files, file_sha256, folder_digest
from lorafaas.names import Names
from lorafaas.settings import Settings
from lorafaas.wire import AdapterRef

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


def ref_of(folder: Path, function_id: str = "fn-peer") -> AdapterRef:
    sha = folder_digest({p.name: file_sha256(p) for p in adapter_files(folder)})
    return AdapterRef(function_id=function_id, bucket="b", prefix=f"p/{sha}", sha256=sha, rank=8)


def held_copy(src: Path, dest: Path) -> Path:
    """A worker's disk cache holds exactly the artifact's files."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in adapter_files(src):
        shutil.copy(p, dest / p.name)
    return dest


async def test_fetch_from_a_peer_matches_the_artifact(js_conn, settings: Settings, adapter_dirs, tmp_path) -> None:
    nc, _ = js_conn
    names = Names(settings.nats.prefix + "peer1")
    src = held_copy(adapter_dirs["c32"], tmp_path / "holder" / "c32")
    ref = ref_of(src)
    server = PeerServer(nc, names, "holder", lambda: {"k": (ref, src)})
    await server.sync()
    fetcher = PeerFetcher(nc, names, timeout_s=2.0)
    dest = tmp_path / "asker" / ref.sha256
    assert await fetcher.fetch(ref, dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {p.name: p.read_bytes() for p in src.iterdir()}
    assert fetcher.stats.fetches == 1 and fetcher.last_peer == "holder" and server.stats.served == 1
    # The holder drops it from host memory: it stops answering, and the asker goes to S3.
    server.holdings = dict
    await server.sync()
    assert not server.subs
    started = time.perf_counter()
    assert not await fetcher.fetch(ref, tmp_path / "asker2" / ref.sha256)
    assert time.perf_counter() - started < 1.0  # "no responders" comes back at once


async def test_a_peer_with_other_bytes_is_refused(js_conn, settings: Settings, adapter_dirs, tmp_path) -> None:
    nc, _ = js_conn
    names = Names(settings.nats.prefix + "peer2")
    good = held_copy(adapter_dirs["a8"], tmp_path / "good")
    ref = ref_of(good)
    bad = held_copy(adapter_dirs["a8"], tmp_path / "bad")
    (bad / "adapter_config.json").write_text((bad / "adapter_config.json").read_text().replace("8", "9", 1))
    server = PeerServer(nc, names, "liar", lambda: {"k": (ref, bad)})
    await server.sync()
    fetcher = PeerFetcher(nc, names, timeout_s=2.0)
    dest = tmp_path / "asker" / ref.sha256
    assert not await fetcher.fetch(ref, dest)
    assert not dest.exists() and fetcher.stats.fallbacks == 1


async def test_adapter_manager_prefers_a_peer_and_falls_back_to_s3(
    js_conn, settings: Settings, adapter_dirs, backbone_dir, tmp_path
) -> None:
    """The tier owner asks its peers first; with no holder it downloads from S3, hash-checked."""
    from transformers import AutoConfig

    from gpuworker.adapters import AdapterManager, adapter_key

    nc, _ = js_conn
    names = Names(settings.nats.prefix + "peer3")
    store = ArtifactStore(settings.s3)
    await asyncio.to_thread(store.ensure_bucket)
    stored = await asyncio.to_thread(store.upload_adapter, adapter_dirs["b16"], "tenant-peer")
    ref = AdapterRef(function_id="fn-b16", bucket=stored.bucket, prefix=stored.prefix, sha256=stored.sha256, rank=16)

    class NoDevice:  # the tier owner's host tier needs no engine
        class engine:
            @staticmethod
            def is_resident(key: str) -> bool:
                return False

    config = AutoConfig.from_pretrained(backbone_dir)
    holder = AdapterManager(store, tmp_path / "holder", NoDevice(), config, 1 << 30)
    await holder._to_host(ref)  # from S3: nobody to ask
    holder.refs[adapter_key(ref)] = ref
    server = PeerServer(nc, names, "holder", holder.holdings)
    await server.sync()
    asker = AdapterManager(store, tmp_path / "asker", NoDevice(), config, 1 << 30)
    fetcher = PeerFetcher(nc, names)
    asker.peer_fetch = fetcher.fetch
    weights = await asker._to_host(ref)
    assert fetcher.stats.fetches == 1 and weights.nbytes == holder.host[next(iter(holder.host))].nbytes
