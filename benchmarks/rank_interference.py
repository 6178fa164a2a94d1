"""How much does a rank-128 adapter slow the rank-8 requests batched with it, in our engine?

LoRAServe reports that rank-8 requests co-batched with rank-128 ones take the larger rank's
time (kernels that pad every adapter to the largest rank). Our engine groups rows by rank
(``gpuworker/engine/lora_ops.py``), so the question is measured, not assumed:

* decode step time of named compositions (8 rank-8 rows alone; with 8 rank-128 rows; 16 rank-8;
  16 rank-128), interleaved round by round, medians;
* prefill time per prompt length and rank;
* a least-squares fit of decode step time over many random compositions, three times: the
  additive model ``a + b*batch + c*sum(rank of each row) + d*groups`` (groups = rank groups the
  batch runs, one per distinct (rank, rows-per-adapter) run), the padded model
  ``a + b*batch + c*batch*max_rank + d*groups`` and the weight-read model
  ``a + b*batch + c*sum(rank of each distinct adapter) + d*groups`` (a decode step reads each
  adapter's A and B once, however many rows use it); whichever fits best is our engine's
  interference model. The fit's per-term values feed the placement policy's ``rank_token_cost``
  and the simulator's CPU profile (``python -m benchmarks.cluster_sim.calibrate``).

    python benchmarks/rank_interference.py                 # demo shape, CPU
    python benchmarks/rank_interference.py --quick         # tiny shape, a smoke run
    python benchmarks/rank_interference.py --device cuda --shape llama-7b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from gpuworker.engine import AdapterWeights, EngineRequest, LoraEngine
from gpuworker.engine.engine import page_elems_for
from gpuworker.models import build_backbone, load_backbone, make_adapter

RANKS = (8, 16, 32, 64, 128)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
console = Console(stderr=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=None, help="backbone shape (default demo; tiny with --quick)")
    p.add_argument("--per-rank", type=int, default=4, help="adapters built per rank")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed per composition and round")
    p.add_argument("--fit-samples", type=int, default=None, help="random compositions for the fit (default 40)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.quick else "demo")
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.steps = args.steps or (3 if args.quick else 8)
    args.fit_samples = args.fit_samples or (12 if args.quick else 40)
    return args


@dataclass
class Bench:
    engine: LoraEngine
    adapters: dict[int, list[str]]  # rank -> adapter ids loaded in the engine
    bytes_by_rank: dict[int, int]
    config: Any
    args: argparse.Namespace


def setup(args: argparse.Namespace) -> Bench:
    """Build (or reuse) the backbone and ``per_rank`` q/v adapters of every rank; load them all."""
    root = args.workdir or Path(tempfile.gettempdir()) / "lorafaas-bench-rank"
    backbone = root / f"{args.shape}-{args.dtype}"
    if not (backbone / "config.json").exists():
        build_backbone(backbone, args.shape, seed=args.seed, dtype=DTYPES[args.dtype])
    model, tokenizer = load_backbone(backbone, device=args.device, dtype=DTYPES[args.dtype])
    weights: dict[str, AdapterWeights] = {}
    adapters: dict[int, list[str]] = {}
    for rank in RANKS:
        for i in range(args.per_rank):
            folder = root / f"{args.shape}-r{rank}-{i}"
            if not (folder / "adapter_model.safetensors").exists():
                make_adapter(backbone, folder, rank=rank, seed=args.seed + 1000 * rank + i)
            weights[f"r{rank}-{i}"] = AdapterWeights.from_peft_folder(folder, model.config)
            adapters.setdefault(rank, []).append(f"r{rank}-{i}")
    pages = sum(-(-w.numel // page_elems_for(model.config)) for w in weights.values()) + 8
    longest = max(args.prompt_len, *prefill_lengths(args))
    engine = LoraEngine(
        model, tokenizer, device=args.device, max_batch=32, pool_pages=pages, max_seq_len=longest + args.steps + 8
    )
    for name, w in weights.items():
        engine.load_adapter(name, w)
    by_rank = {rank: weights[ids[0]].nbytes for rank, ids in adapters.items()}
    return Bench(engine, adapters, by_rank, model.config, args)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rows_for(bench: Bench, mix: list[tuple[int, int]], adapters: int | None = None) -> list[str]:
    """(rank, rows) pairs -> one row per request, spread over ``adapters`` (default: all) of that
    rank's adapters round-robin."""
    rows: list[str] = []
    for rank, count in mix:
        ids = bench.adapters[rank][:adapters]
        rows += [ids[i % len(ids)] for i in range(count)]
    return rows


def decode_step_s(bench: Bench, rows: list[str], rng: random.Random) -> float:
    """Median wall time of one decode step of a batch with these adapter rows."""
    engine, args = bench.engine, bench.args
    vocab = bench.config.vocab_size
    for i, adapter in enumerate(rows):
        prompt = [rng.randrange(4, vocab) for _ in range(args.prompt_len)]
        engine.add_request(EngineRequest(f"d{i}", adapter, prompt, max_tokens=args.steps + 2, ignore_eos=True))
    engine.step()  # admit + prefill every row
    engine.step()  # first decode: builds the batch's stacks (a composition change, not steady state)
    times = []
    for _ in range(args.steps):
        _sync(args.device)
        start = time.perf_counter()
        engine.step()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    while engine.has_work():
        engine.step()
    return statistics.median(times)


def prefill_s(bench: Bench, adapter: str, tokens: int, rng: random.Random) -> float:
    vocab = bench.config.vocab_size
    prompt = [rng.randrange(4, vocab) for _ in range(tokens)]
    bench.engine.add_request(EngineRequest("p", adapter, prompt, max_tokens=1, ignore_eos=True))
    _sync(bench.args.device)
    start = time.perf_counter()
    bench.engine.step()
    _sync(bench.args.device)
    elapsed = time.perf_counter() - start
    while bench.engine.has_work():
        bench.engine.step()
    return elapsed


def prefill_lengths(args: argparse.Namespace) -> tuple[int, ...]:
    return (16, 64) if args.quick else (32, 128, 256)


# name -> ((rank, rows) pairs, adapters per rank: None = all of them, rows spread round-robin)
NAMED: dict[str, tuple[list[tuple[int, int]], int | None]] = {
    "8 x r8": ([(8, 8)], None),
    "8 x r8 + 8 x r128": ([(8, 8), (128, 8)], None),
    "16 x r8": ([(8, 16)], None),
    "16 x r128": ([(128, 16)], None),
    "8 x r128": ([(128, 8)], None),
    # Same rows and ranks, one adapter per rank instead of four: what a step pays per adapter.
    "16 x r128, 1 adapter": ([(128, 16)], 1),
    "8 x r8 + 8 x r128, 1 adapter each": ([(8, 8), (128, 8)], 1),
}


def groups_of(rows: list[str]) -> int:
    """Rank groups the builder forms per site: runs of adapters with the same (rank, rows each)."""
    counts: dict[str, int] = {}
    for a in rows:
        counts[a] = counts.get(a, 0) + 1
    return len({(_rank(a), m) for a, m in counts.items()})


def _rank(adapter: str) -> int:
    return int(adapter.split("-")[0][1:])


def features(rows: list[str]) -> dict[str, float]:
    ranks = [_rank(a) for a in rows]
    return {
        "batch": float(len(rows)),
        "rank_sum": float(sum(ranks)),
        "batch_x_max_rank": float(len(rows) * max(ranks)),
        "adapter_rank_sum": float(sum(_rank(a) for a in set(rows))),
        "groups": float(groups_of(rows)),
    }


def random_mix(rng: random.Random, max_batch: int) -> list[tuple[int, int]]:
    kinds = rng.sample(RANKS, rng.randint(1, 3))
    return [(rank, rng.randint(1, max_batch // 4)) for rank in kinds]


def fit(samples: list[tuple[dict[str, float], float]], terms: list[str]) -> dict[str, Any]:
    """Least squares of step seconds on [1, terms...]: coefficients, per-term error, relative error."""
    x = torch.tensor([[1.0] + [f[t] for t in terms] for f, _ in samples], dtype=torch.float64)
    y = torch.tensor([s for _, s in samples], dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    pred = x @ coef
    rel = ((pred - y).abs() / y).tolist()
    # Per-term standard error (how well the data pins each term down).
    resid = y - pred
    dof = max(len(samples) - x.shape[1], 1)
    cov = (resid @ resid / dof) * torch.linalg.pinv(x.T @ x)
    names = ["intercept", *terms]
    return {
        "coef": {n: float(c) for n, c in zip(names, coef)},
        "stderr": {n: float(cov[i, i].clamp(min=0).sqrt()) for i, n in enumerate(names)},
        "median_rel_error": statistics.median(rel),
        "max_rel_error": max(rel),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    bench = setup(args)
    fit_mixes = [random_mix(rng, 32) for _ in range(args.fit_samples)]
    named: dict[str, list[float]] = {k: [] for k in NAMED}
    fit_times: list[list[float]] = [[] for _ in fit_mixes]
    prefill_lens = prefill_lengths(args)
    prefill: dict[tuple[int, int], list[float]] = {(r, n): [] for r in (8, 128) for n in prefill_lens}
    decode_step_s(bench, rows_for(bench, [(8, 4)]), rng)  # warm-up
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("rounds", total=args.rounds)
        for _ in range(args.rounds):
            jobs: list[tuple[str, Any]] = [("named", k) for k in NAMED] + [("fit", i) for i in range(len(fit_mixes))]
            jobs += [("prefill", key) for key in prefill]
            rng.shuffle(jobs)  # interleaved in a new order each round: outside load hits all alike
            for kind, key in jobs:
                if kind == "named":
                    named[key].append(decode_step_s(bench, rows_for(bench, *NAMED[key]), rng))
                elif kind == "fit":
                    fit_times[key].append(decode_step_s(bench, rows_for(bench, fit_mixes[key]), rng))
                else:
                    rank, n = key
                    prefill[key].append(prefill_s(bench, bench.adapters[rank][0], n, rng))
            progress.advance(task)
    samples = [(features(rows_for(bench, mix)), statistics.median(t)) for mix, t in zip(fit_mixes, fit_times)]
    named_med = {k: statistics.median(v) for k, v in named.items()}
    pre = {f"r{r}_{n}": statistics.median(v) for (r, n), v in prefill.items()}
    additive = fit(samples, ["batch", "rank_sum", "groups"])
    padded = fit(samples, ["batch", "batch_x_max_rank", "groups"])
    weights = fit(samples, ["batch", "adapter_rank_sum", "groups"])
    prefill_samples = [
        ({"tokens": float(n), "tokens_x_rank": float(n * r)}, statistics.median(v)) for (r, n), v in prefill.items()
    ]
    return {
        "shape": args.shape,
        "rounds": args.rounds,
        "named_decode_step_s": named_med,
        "mixed_over_homogeneous_same_batch": named_med["8 x r8 + 8 x r128"] / named_med["16 x r8"],
        "mixed_over_all_r128_same_batch": named_med["8 x r8 + 8 x r128"] / named_med["16 x r128"],
        "prefill_s": pre,
        "fit_additive": additive,
        "fit_padded": padded,
        "fit_weight_read": weights,
        "fit_prefill": fit(prefill_samples, ["tokens", "tokens_x_rank"]),
        "adapter_bytes_by_rank": bench.bytes_by_rank,
        "samples": [{"features": f, "step_s": s} for f, s in samples],
    }


def report(res: dict[str, Any]) -> None:
    t = Table(title=f"decode step, shape {res['shape']} (median of {res['rounds']} interleaved rounds)")
    t.add_column("composition")
    t.add_column("step ms", justify="right")
    for k, v in res["named_decode_step_s"].items():
        t.add_row(k, f"{v * 1e3:.2f}")
    console.print(t)
    console.print(
        f"mixed / 16 x r8 = {res['mixed_over_homogeneous_same_batch']:.3f}; "
        f"mixed / 16 x r128 = {res['mixed_over_all_r128_same_batch']:.3f} "
        "(LoRAServe's padded-kernel effect would make the second ~1.0)"
    )
    for name in ("fit_additive", "fit_padded", "fit_weight_read", "fit_prefill"):
        f = res[name]
        terms = ", ".join(f"{k}={v:.3g}±{f['stderr'][k]:.2g}" for k, v in f["coef"].items())
        console.print(f"{name}: {terms}; median rel err {f['median_rel_error']:.3f}, max {f['max_rel_error']:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    report(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
