"""Peer fetch against S3: how fast an adapter reaches a worker's disk cache by each path.

For each rank, one adapter of the chosen backbone shape is stored in S3 (the platform's own
S3 code, against the S3 server on loopback) and held by a "peer" (``gpuworker.peer.PeerServer``
on its own NATS connection). The asking side times ``ArtifactStore.download`` (manifest, every
file, hash checks, atomic rename) and ``PeerFetcher.fetch`` (manifest, chunks, hash checks,
atomic rename) into a fresh folder, interleaved, ``--repeats`` times each; medians are
reported in ms and MB/s. Both paths cross loopback on this machine, so the comparison is of
the protocols and their per-request costs, not of a network.

    python benchmarks/peer_fetch.py --shape demo --out benchmarks/results/peer_fetch.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from gpuworker.peer import PeerFetcher, PeerServer  # noqa: E402
from launcher.devstack import free_port, start_s3, stop_process  # noqa: E402
from lorafaas.artifacts import ArtifactStore  # noqa: E402
from lorafaas.names import Names  # noqa: E402
from lorafaas.settings import S3Settings  # noqa: E402
from lorafaas.wire import AdapterRef  # noqa: E402


def build(workdir: Path, shape: str, ranks: list[int]) -> dict[int, Path]:
    from gpuworker.models import build_backbone, make_adapter

    backbone = build_backbone(workdir / "backbone", shape, seed=0)
    return {r: make_adapter(backbone, workdir / f"adapter-r{r}", r, seed=r) for r in ranks}


async def measure(folders: dict[int, Path], s3: S3Settings, nats_url: str, repeats: int, work: Path) -> list[dict]:
    store = ArtifactStore(s3)
    await asyncio.to_thread(store.ensure_bucket)
    names = Names(f"peerbench{uuid.uuid4().hex[:6]}")
    holder_nc, asker_nc = await nats.connect(nats_url), await nats.connect(nats_url)
    rows = []
    try:
        held: dict[str, tuple[AdapterRef, Path]] = {}
        server = PeerServer(holder_nc, names, "peer", lambda: held)
        fetcher = PeerFetcher(asker_nc, names, timeout_s=10.0)
        for rank, folder in folders.items():
            stored = await asyncio.to_thread(store.upload_adapter, folder, "bench")
            ref = AdapterRef(
                function_id=f"r{rank}", bucket=stored.bucket, prefix=stored.prefix, sha256=stored.sha256, rank=rank
            )
            # The peer holds what a worker's disk cache holds: the artifact as downloaded.
            cached = await asyncio.to_thread(store.download, ref.prefix, work / f"held-{rank}", ref.sha256, ref.bucket)
            held[ref.sha256] = (ref, cached)
            await server.sync()
            s3_s, peer_s = [], []
            for i in range(repeats):  # interleaved: the machine's noise hits both paths alike
                dest = work / f"s3-{rank}-{i}"
                started = time.perf_counter()
                await asyncio.to_thread(store.download, ref.prefix, dest, ref.sha256, ref.bucket)
                s3_s.append(time.perf_counter() - started)
                dest = work / f"peer-{rank}-{i}"
                started = time.perf_counter()
                if not await fetcher.fetch(ref, dest):
                    raise RuntimeError(f"peer fetch of rank {rank} failed")
                peer_s.append(time.perf_counter() - started)
            mb = stored.size_bytes / 1e6
            s3_med, peer_med = statistics.median(s3_s), statistics.median(peer_s)
            rows.append(
                {
                    "rank": rank,
                    "bytes": stored.size_bytes,
                    "s3_ms": s3_med * 1e3,
                    "peer_ms": peer_med * 1e3,
                    "s3_mb_per_s": mb / s3_med,
                    "peer_mb_per_s": mb / peer_med,
                    "peer_speedup": s3_med / peer_med,
                }
            )
    finally:
        await holder_nc.close()
        await asker_nc.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="demo")
    p.add_argument("--ranks", default="8,16,32,64,128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nats", default="nats://127.0.0.1:4222")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        work = Path(tmp)
        folders = build(work / "models", args.shape, ranks)
        port = free_port()
        proc = start_s3(port)
        try:
            s3 = S3Settings(endpoint=f"127.0.0.1:{port}", bucket="peer-bench")
            rows = asyncio.run(measure(folders, s3, args.nats, args.repeats, work / "fetched"))
        finally:
            stop_process(proc)
            shutil.rmtree(work / "fetched", ignore_errors=True)
    print(f"{'rank':>5} {'MB':>7} {'S3 ms':>8} {'peer ms':>8} {'S3 MB/s':>8} {'peer MB/s':>9} {'speedup':>7}")
    for r in rows:
        print(
            f"{r['rank']:>5} {r['bytes'] / 1e6:>7.2f} {r['s3_ms']:>8.1f} {r['peer_ms']:>8.1f} "
            f"{r['s3_mb_per_s']:>8.1f} {r['peer_mb_per_s']:>9.1f} {r['peer_speedup']:>6.2f}x"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"shape": args.shape, "repeats": args.repeats, "rows": rows}
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
