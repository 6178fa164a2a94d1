"""Peer fetch (LoRAServe's remote adapter access): adapters move worker -> worker over NATS.

A worker holding an adapter in host memory answers on that adapter's peer subject (one per
content hash, in one queue group, so exactly one holder answers each request). A worker that
misses the adapter asks there first: ``no responders`` comes back at once when nobody holds
it, and then it downloads from S3 as before. The transfer is chunked (core NATS payloads are
bounded) and checked the way an S3 download is: the file hashes must give the adapter's
content hash, and every file must match its hash, before the folder enters the disk cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from lorafaas.artifacts import folder_digest
from lorafaas.names import Names
from lorafaas.wire import AdapterRef

log = logging.getLogger(__name__)

CHUNK_BYTES = 512 * 1024  # under NATS's default 1 MiB max payload
QUEUE_GROUP = "peers"
SYNC_INTERVAL_S = 0.25


@dataclass
class PeerStats:
    fetches: int = 0  # adapters received from a peer
    served: int = 0  # adapters sent to a peer (manifests answered)
    bytes_in: int = 0
    fallbacks: int = 0  # a peer answered but the transfer failed: S3 was used


class PeerServer:
    """Answers for the adapters this worker holds in host memory.

    ``holdings`` returns the refs of the adapters in host memory with their disk folders; the
    server keeps one subscription per held adapter, in step with it every ``SYNC_INTERVAL_S``.
    File bytes are read once per manifest request and kept while chunks are asked for.
    """

    def __init__(
        self, nc: NATS, names: Names, worker_id: str, holdings: Callable[[], dict[str, tuple[AdapterRef, Path]]]
    ) -> None:
        self.nc, self.names, self.worker_id, self.holdings = nc, names, worker_id, holdings
        self.subs: dict[str, Subscription] = {}  # sha256 -> subscription
        self.folders: dict[str, Path] = {}
        self._files: dict[str, dict[str, bytes]] = {}
        self.stats = PeerStats()

    async def run(self) -> None:
        try:
            while True:
                await self.sync()
                await asyncio.sleep(SYNC_INTERVAL_S)
        finally:
            for sub in self.subs.values():
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self.subs.clear()

    async def sync(self) -> None:
        """Subscribe for newly held adapters, unsubscribe for dropped ones."""
        held = {
            ref.sha256: folder for ref, folder in self.holdings().values() if (folder / "adapter_config.json").is_file()
        }
        for sha in [s for s in self.subs if s not in held]:
            with contextlib.suppress(Exception):
                await self.subs.pop(sha).unsubscribe()
            self.folders.pop(sha, None)
            self._files.pop(sha, None)
        for sha, folder in held.items():
            if sha not in self.subs:
                self.folders[sha] = folder
                self.subs[sha] = await self.nc.subscribe(
                    self.names.peer_adapter_subject(sha), queue=QUEUE_GROUP, cb=self._on_request
                )

    async def _on_request(self, msg: Msg) -> None:
        sha = msg.subject.rsplit(".", 1)[1]
        try:
            request = json.loads(msg.data or b"{}")
            if request.get("op") == "manifest":
                files = await asyncio.to_thread(_read_folder, self.folders[sha])
                self._files[sha] = files
                self.stats.served += 1
                manifest = {
                    "worker_id": self.worker_id,
                    "files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()},
                    "sizes": {n: len(b) for n, b in files.items()},
                    "chunk_bytes": CHUNK_BYTES,
                }
                await msg.respond(json.dumps(manifest).encode())
                return
            cached = self._files.get(sha)
            if cached is None:  # a chunk asked of a holder that did not answer the manifest
                cached = self._files[sha] = await asyncio.to_thread(_read_folder, self.folders[sha])
            offset = int(request["index"]) * CHUNK_BYTES
            await msg.respond(cached[request["file"]][offset : offset + CHUNK_BYTES])
        except Exception as e:  # a bad or late request: the asker falls back to S3
            log.warning("peer request for %s failed: %r", sha, e)
            with contextlib.suppress(Exception):
                await msg.respond(b"")


def _complete(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class PeerFetcher:
    """Brings an adapter folder from a peer into ``dest``; ``False`` means use S3."""

    def __init__(self, nc: NATS, names: Names, timeout_s: float = 2.0, max_bytes: int = 0) -> None:
        # Above ``max_bytes`` (0: no limit) S3 is the faster path here (benchmarks/peer_fetch.py).
        self.nc, self.names, self.timeout_s, self.max_bytes = nc, names, timeout_s, max_bytes
        self.stats = PeerStats()
        self.last_peer = ""

    async def fetch(self, ref: AdapterRef, dest: Path) -> bool:
        subject = self.names.peer_adapter_subject(ref.sha256)
        try:
            reply = await self.nc.request(subject, b'{"op":"manifest"}', timeout=self.timeout_s)
        except (NoRespondersError, NatsTimeout, TimeoutError):
            return False  # nobody holds it (answered at once) or nobody answered in time
        started = time.perf_counter()
        try:
            manifest = json.loads(reply.data)
            files: dict[str, str] = manifest["files"]
            if folder_digest(files) != ref.sha256:
                raise ValueError(f"peer {manifest.get('worker_id')} offers other content than {ref.sha256[:12]}")
            if self.max_bytes and sum(manifest["sizes"].values()) > self.max_bytes:
                return False  # large enough that S3 is faster than chunks over NATS
            await self._receive(subject, manifest, dest)
        except Exception as e:  # any failure of the peer path: S3 is the fallback
            log.warning("peer fetch of %s failed, using S3: %r", ref.function_id, e)
            self.stats.fallbacks += 1
            return False
        self.stats.fetches += 1
        self.last_peer = manifest.get("worker_id", "")
        log.info(
            "adapter %s fetched from peer %s in %.1f ms",
            ref.function_id,
            self.last_peer,
            (time.perf_counter() - started) * 1e3,
        )
        return True

    async def _receive(self, subject: str, manifest: dict, dest: Path) -> None:
        """Chunks into a staging folder, each file checked against its hash, then one rename."""
        chunk = int(manifest["chunk_bytes"])
        received: dict[str, bytes] = {}
        for name, sha in manifest["files"].items():
            size = int(manifest["sizes"][name])
            count = max(1, -(-size // chunk))
            parts = await asyncio.gather(
                *(
                    self.nc.request(
                        subject, json.dumps({"op": "chunk", "file": name, "index": i}).encode(), self.timeout_s
                    )
                    for i in range(count)
                )
            )
            data = b"".join(p.data for p in parts)
            if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                raise ValueError(f"{name} from the peer does not match its sha256")
            self.stats.bytes_in += size
            received[Path(name).name] = data
        await asyncio.to_thread(_write_folder, received, dest)


def _write_folder(files: dict[str, bytes], dest: Path) -> None:
    """Into a staging folder first, then one rename: the disk cache never holds half an adapter."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".peer-"))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
