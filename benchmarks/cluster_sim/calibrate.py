"""Fit this machine's profile from the real engine on CPU, print the fit error per term, write the JSON.

    python -m benchmarks.cluster_sim.calibrate                       # measures everything (minutes)
    python -m benchmarks.cluster_sim.calibrate --from benchmarks/results/rank_interference.json

Step costs come from ``benchmarks/rank_interference.py`` (decode steps over random rank mixes,
prefills per length and rank, least squares); adapter moves from timing the worker's own code
paths (``AdapterWeights.from_peft_folder`` for disk -> host, ``LoraEngine.load_adapter`` for
host -> device) per rank; the backbone cold start from ``load_backbone`` plus engine creation.
Terms the machine cannot measure (S3 is moto on loopback here, peer fetch belongs to the live
scheduler's benchmark) are stated as assumptions in ``sources``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import rank_interference as ri
from gpuworker.engine import AdapterWeights, LoraEngine
from gpuworker.engine.engine import default_pool_pages, page_elems_for
from gpuworker.models import load_backbone

from .profile import PROFILES_DIR

console = Console(stderr=True)


def measure_moves(bench: ri.Bench, args: argparse.Namespace) -> dict[str, Any]:
    """disk -> host and host -> device seconds per rank, and a bytes/s fit through the origin."""
    root = args.workdir or Path(tempfile.gettempdir()) / "lorafaas-bench-rank"
    cfg = bench.config
    rows = []
    engine = bench.engine
    for rank in ri.RANKS:
        folder = root / f"{args.shape}-r{rank}-0"
        disk, h2d = [], []
        for _ in range(5):
            start = time.perf_counter()
            w = AdapterWeights.from_peft_folder(folder, cfg)
            disk.append(time.perf_counter() - start)
            engine.offload_adapter("probe")
            start = time.perf_counter()
            engine.load_adapter("probe", w)
            h2d.append(time.perf_counter() - start)
        engine.offload_adapter("probe")
        rows.append(
            {"rank": rank, "bytes": w.nbytes, "disk_s": statistics.median(disk), "h2d_s": statistics.median(h2d)}
        )

    def rate(key: str) -> float:
        return sum(r["bytes"] for r in rows) / sum(r[key] for r in rows)

    return {"per_rank": rows, "disk_bytes_per_s": rate("disk_s"), "h2d_bytes_per_s": rate("h2d_s")}


def measure_cold_start(args: argparse.Namespace) -> float:
    root = args.workdir or Path(tempfile.gettempdir()) / "lorafaas-bench-rank"
    start = time.perf_counter()
    model, tok = load_backbone(root / f"{args.shape}-{args.dtype}")
    LoraEngine(model, tok, max_batch=16)
    return time.perf_counter() - start


def profile_from(fit: dict[str, Any], moves: dict[str, Any], cold_s: float, bench: ri.Bench) -> dict[str, Any]:
    d, p = fit["fit_additive"], fit["fit_prefill"]
    cfg = bench.config
    page_bytes = page_elems_for(cfg) * 4
    per_rank = moves["per_rank"][0]["bytes"] / moves["per_rank"][0]["rank"]

    def pos(x: float) -> float:
        return max(0.0, float(x))

    err = f"median relative error {d['median_rel_error']:.1%} over {len(fit['samples'])} compositions"
    perr = f"median relative error {p['median_rel_error']:.1%}"
    src = "python -m benchmarks.cluster_sim.calibrate (benchmarks/rank_interference.py fit, shape " + fit["shape"] + ")"
    values: dict[str, Any] = {
        "name": "cpu-this-machine",
        "rank_mode": "grouped",
        "prefill_base_s": pos(p["coef"]["intercept"]),
        "prefill_per_token_s": pos(p["coef"]["tokens"]),
        "prefill_per_token_rank_s": pos(p["coef"]["tokens_x_rank"]),
        "decode_base_s": pos(d["coef"]["intercept"]),
        "decode_per_seq_s": pos(d["coef"]["batch"]),
        "decode_per_ctx_token_s": 0.0,
        "decode_per_row_rank_s": pos(d["coef"]["rank_sum"]),
        "decode_per_adapter_rank_s": 0.0,
        "decode_per_group_s": pos(d["coef"]["groups"]),
        "max_batch": 16,
        "adapter_bytes_per_rank": int(per_rank),
        "page_bytes": page_bytes,
        "pool_bytes": default_pool_pages(cfg) * page_bytes,
        "host_cache_bytes": 2 * 1024**3,
        "h2d_bytes_per_s": moves["h2d_bytes_per_s"],
        "disk_bytes_per_s": moves["disk_bytes_per_s"],
        "disk_latency_s": 0.0,
        "s3_bytes_per_s": 1e8,
        "s3_latency_s": 0.02,
        "peer_bytes_per_s": 2e8,
        "peer_latency_s": 0.002,
        "backbone_cold_start_s": cold_s,
        "device_hour_usd": 0.0893,
        "token_scale": 1 / 16,
        "max_prompt_tokens": 256,
        "max_output_tokens": 32,
        "ttft_slo_s": 2.0,
    }
    values["sources"] = {
        "rank_mode": "our engine groups rows by rank (gpuworker/engine/lora_ops.py); decode fits: additive (sum of "
        f"ranks) median rel. error {d['median_rel_error']:.1%}, padded (batch x max rank) "
        f"{fit['fit_padded']['median_rel_error']:.1%}",
        "prefill_base_s": f"{src}: prefill fit intercept, {perr}",
        "prefill_per_token_s": f"{src}: prefill fit, tokens term",
        "prefill_per_token_rank_s": f"{src}: prefill fit, tokens x rank term",
        "decode_base_s": f"{src}: decode fit intercept, {err}",
        "decode_per_seq_s": f"{src}: decode fit, batch term",
        "decode_per_ctx_token_s": "not fitted: the benchmark's prompts are short (16 tokens); 0",
        "decode_per_row_rank_s": f"{src}: decode fit, sum of row ranks term",
        "decode_per_adapter_rank_s": "folded into decode_per_row_rank_s (not separable at this shape); 0",
        "decode_per_group_s": f"{src}: decode fit, rank groups term",
        "max_batch": "the worker's max_batch used by the replay on this machine",
        "adapter_bytes_per_rank": f"{src}: bytes of the q/v adapters built per rank, over rank",
        "page_bytes": "gpuworker/engine/engine.py page_elems_for(" + fit["shape"] + " config) x 4 bytes (float32)",
        "pool_bytes": "gpuworker/engine/engine.py default_pool_pages(" + fit["shape"] + " config)",
        "host_cache_bytes": "choice: 2 GiB of host cache per worker",
        "h2d_bytes_per_s": f"{src}: LoraEngine.load_adapter timed per rank (bytes / seconds over all ranks)",
        "disk_bytes_per_s": f"{src}: AdapterWeights.from_peft_folder timed per rank (page cache warm)",
        "disk_latency_s": "folded into disk_bytes_per_s",
        "s3_bytes_per_s": "assumption: a local MinIO at ~100 MB/s (moto on loopback is not a measurement of S3)",
        "s3_latency_s": "assumption: 20 ms per GET on a local MinIO",
        "peer_bytes_per_s": "assumption: chunked NATS transfer ~200 MB/s on loopback (the live scheduler measures it)",
        "peer_latency_s": "assumption: 2 ms",
        "backbone_cold_start_s": f"{src}: load_backbone + LoraEngine creation of the " + fit["shape"] + " shape, timed",
        "device_hour_usd": "on-demand price of a 2-vCPU machine (AWS c7i.large, us-east-1 list: $0.0893/h)",
        "token_scale": "the replay's scaling on this machine (launcher/trace.py TraceScaling: tokens x 1/16)",
        "max_prompt_tokens": "the replay's cap (launcher/trace.py TraceScaling)",
        "max_output_tokens": "the replay's cap (launcher/trace.py TraceScaling)",
        "ttft_slo_s": "choice: 2 s on this machine",
    }
    return values


def report(fit: dict[str, Any], moves: dict[str, Any], cold_s: float) -> None:
    t = Table(title="fit per term (value ± standard error)")
    for col in ("model", "term", "value", "stderr", "rel. stderr"):
        t.add_column(col, justify="right")
    for name in ("fit_additive", "fit_padded", "fit_prefill"):
        f = fit[name]
        for term, value in f["coef"].items():
            se = f["stderr"][term]
            t.add_row(name, term, f"{value:.4g}", f"{se:.2g}", f"{se / abs(value):.0%}" if value else "-")
        t.add_row(name, "(median rel. error)", f"{f['median_rel_error']:.1%}", "", f"max {f['max_rel_error']:.0%}")
    console.print(t)
    m = Table(title="adapter moves")
    for col in ("rank", "MB", "disk->host ms", "host->device ms"):
        m.add_column(col, justify="right")
    for r in moves["per_rank"]:
        m.add_row(str(r["rank"]), f"{r['bytes'] / 1e6:.2f}", f"{r['disk_s'] * 1e3:.2f}", f"{r['h2d_s'] * 1e3:.2f}")
    console.print(m)
    console.print(
        f"disk->host {moves['disk_bytes_per_s'] / 1e9:.2f} GB/s, "
        f"host->device {moves['h2d_bytes_per_s'] / 1e9:.2f} GB/s, backbone cold start {cold_s:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="from_json", type=Path, default=None, help="reuse a rank_interference.py JSON")
    p.add_argument("--out", type=Path, default=PROFILES_DIR / "cpu-this-machine.json")
    p.add_argument("--save-fit", type=Path, default=None, help="also write the rank_interference.py JSON here")
    p.add_argument("--quick", action="store_true")
    # Anything else goes to benchmarks/rank_interference.py (e.g. --shape tiny --rounds 3).
    args_in, rest = p.parse_known_args(argv)
    args = ri.parse_args((["--quick"] if args_in.quick else []) + rest)
    bench = ri.setup(args)
    if args_in.from_json:
        fit = json.loads(args_in.from_json.read_text())
    else:
        fit = ri.run(args)
        if args_in.save_fit:  # the raw measurement, for --from
            args_in.save_fit.parent.mkdir(parents=True, exist_ok=True)
            args_in.save_fit.write_text(json.dumps(fit, indent=1))
    moves = measure_moves(bench, args)
    cold_s = measure_cold_start(args)
    report(fit, moves, cold_s)
    args_in.out.write_text(json.dumps(profile_from(fit, moves, cold_s, bench), indent=2) + "\n")
    console.print(f"wrote {args_in.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
