"""Benchmark the multi-LoRA engine against PEFT, in one run, on the same prompts and batches.

Measures, interleaving the variants round by round and reporting medians:

* decode throughput (tokens/s) at each batch size with requests spread over N adapters of
  mixed ranks: our engine with LoRA, our engine with the backbone alone (the ceiling), PEFT's
  mixed-batch path (``generate(adapter_names=...)``) and PEFT ``set_adapter`` one adapter at a
  time (each adapter's requests as its own batch, in turn);
* adapter cold-load time per tier (disk -> host: ``AdapterWeights.from_peft_folder``;
  host -> device: ``LoraEngine.load_adapter``) against bytes moved;
* pool utilisation of the paged pool against a first-fit contiguous allocator under the same
  random churn of mixed ranks;
* the largest |logit| difference between our engine and PEFT on the same mixed batch.

    python benchmarks/engine.py                     # CPU, "demo" shape (hidden 512, 8 layers)
    python benchmarks/engine.py --quick             # smoke run on the "tiny" shape
    python benchmarks/engine.py --device cuda --shape llama-7b --dtype bfloat16
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

from gpuworker.engine import (
    AdapterWeights,
    ContiguousAllocator,
    EngineRequest,
    LoraEngine,
    PagedAdapterPool,
    PoolFullError,
)
from gpuworker.engine.adapter_weights import module_dims
from gpuworker.engine.engine import page_elems_for
from gpuworker.models import SHAPES, build_backbone, load_backbone, make_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = {
    "lora_over_base_throughput": 0.85,
    "speedup_vs_peft_set_adapter": 4.0,
    "speedup_vs_peft_mixed": 1.25,
    "pool_utilisation": 0.95,
}
console = Console(stderr=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="backbone shape (default: demo; tiny with --quick)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 8,32)")
    p.add_argument("--adapters", type=int, default=8, help="number of adapters the requests are spread over")
    p.add_argument("--ranks", default="8,16,32,64,128", help="adapter ranks, cycled over the adapters")
    p.add_argument("--targets", default="q_proj,v_proj", help="target modules of every adapter")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=None, help="decode steps timed per round (default: 32)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds; medians are reported (default: 7)")
    p.add_argument("--churn-events", type=int, default=4000, help="adapter requests in the pool churn simulation")
    p.add_argument("--churn-functions", type=int, default=128, help="distinct adapters in the churn simulation")
    p.add_argument(
        "--churn-capacity", type=int, default=32, help="pool size in the churn simulation, in adapters of the mix"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="where backbone and adapters are built (reused if present)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shape, batch 8, 4 tokens, 1 round")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.quick else "demo")
    args.batches = [int(b) for b in (args.batches or ("8" if args.quick else "8,32")).split(",")]
    args.decode_tokens = args.decode_tokens or (4 if args.quick else 32)
    args.rounds = args.rounds or (1 if args.quick else 7)
    args.churn_events = 500 if args.quick else args.churn_events
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.targets = tuple(args.targets.split(","))
    return args


# -- setup ----------------------------------------------------------------------------------
@dataclass
class Setup:
    backbone: Path
    adapter_dirs: list[Path]
    adapter_ranks: list[int]
    model: Any
    tokenizer: Any
    weights: list[AdapterWeights]


def prepare(args: argparse.Namespace) -> Setup:
    """Build (or reuse) the backbone and adapters, and load the model our engine runs on."""
    root = args.workdir or Path(tempfile.gettempdir()) / "lorafaas-bench-engine"
    backbone = root / f"{args.shape}-{args.dtype}"
    if not (backbone / "config.json").exists():
        build_backbone(backbone, args.shape, seed=args.seed, dtype=DTYPES[args.dtype])
    ranks = [args.ranks[i % len(args.ranks)] for i in range(args.adapters)]
    dirs = []
    for i, rank in enumerate(ranks):
        folder = root / f"{args.shape}-adapter{i}-r{rank}-{'-'.join(args.targets)}"
        if not (folder / "adapter_model.safetensors").exists():
            make_adapter(backbone, folder, rank=rank, seed=args.seed + 100 + i, target_modules=args.targets)
        dirs.append(folder)
    model, tokenizer = load_backbone(backbone, device=args.device, dtype=DTYPES[args.dtype])
    weights = [AdapterWeights.from_peft_folder(d, model.config) for d in dirs]
    return Setup(backbone, dirs, ranks, model, tokenizer, weights)


def load_peft(setup: Setup, args: argparse.Namespace):
    """A PeftModel (on its own copy of the backbone) with every adapter loaded as a0..aN."""
    from peft import PeftModel

    model, _ = load_backbone(setup.backbone, device=args.device, dtype=DTYPES[args.dtype])
    peft = PeftModel.from_pretrained(model, setup.adapter_dirs[0], adapter_name="a0")
    for i, folder in enumerate(setup.adapter_dirs[1:], start=1):
        peft.load_adapter(folder, adapter_name=f"a{i}")
    peft.eval()
    return peft


def make_prompts(batch: int, args: argparse.Namespace, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(args.seed + batch)
    return torch.randint(4, vocab, (batch, args.prompt_len), generator=gen).tolist()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- decode throughput ----------------------------------------------------------------------
def ours_pair_round(
    lora: LoraEngine, base: LoraEngine, prompts: list[list[int]], adapters: list[str], args
) -> tuple[float, float]:
    """Our engine with LoRA and with the backbone alone, decode steps interleaved one by one.

    Both engines admit the same prompts (prefill, untimed), then their ``decode_tokens`` decode
    steps alternate, so load from anything else on the machine hits both alike. Returns tokens/s.
    """
    for engine, routed in ((lora, adapters), (base, [None] * len(prompts))):
        for i, (prompt, adapter) in enumerate(zip(prompts, routed)):
            engine.add_request(
                EngineRequest(f"r{i}", adapter, prompt, max_tokens=args.decode_tokens + 1, ignore_eos=True)
            )
        engine.step()
    elapsed = {"lora": 0.0, "base": 0.0}
    for _ in range(args.decode_tokens):
        for name, engine in (("lora", lora), ("base", base)):
            sync(args.device)
            start = time.perf_counter()
            engine.step()
            sync(args.device)
            elapsed[name] += time.perf_counter() - start
    assert not lora.has_work() and not base.has_work()
    tokens = len(prompts) * args.decode_tokens
    return tokens / elapsed["lora"], tokens / elapsed["base"]


def peft_generate_s(peft, prompts: list[list[int]], new_tokens: int, args, adapter_names: list[str] | None) -> float:
    ids = torch.tensor(prompts, device=args.device)
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    sync(args.device)
    start = time.perf_counter()
    with torch.inference_mode():
        peft.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=getattr(peft.get_base_model().config, "pad_token_id", None),
            **kwargs,
        )
    sync(args.device)
    return time.perf_counter() - start


def peft_mixed_round(peft, prompts, adapters, args) -> float:
    """PEFT's mixed-batch path; decode time = generate(N+1) - generate(1) (the prefill)."""
    full = peft_generate_s(peft, prompts, args.decode_tokens + 1, args, adapters)
    prefill = peft_generate_s(peft, prompts, 1, args, adapters)
    return len(prompts) * args.decode_tokens / max(full - prefill, 1e-9)


def peft_set_adapter_round(peft, prompts, adapters, args) -> float:
    """One adapter at a time: set_adapter, then its requests as their own batch, in turn."""
    decode_s = 0.0
    for name in sorted(set(adapters)):
        group = [p for p, a in zip(prompts, adapters) if a == name]
        peft.set_adapter(name)
        decode_s += peft_generate_s(peft, group, args.decode_tokens + 1, args, None) - peft_generate_s(
            peft, group, 1, args, None
        )
    return len(prompts) * args.decode_tokens / max(decode_s, 1e-9)


def bench_batch(batch: int, setup: Setup, peft, args, progress: Progress) -> dict[str, Any]:
    """All four variants at one batch size, interleaved round by round.

    Reports the median tokens/s of each variant, and each ratio as the median of its per-round
    ratios (variants of one round ran back to back, so a burst of load elsewhere skews both).
    """
    prompts = make_prompts(batch, args, setup.model.config.vocab_size)
    adapters = [f"a{i % args.adapters}" for i in range(batch)]
    lora, base = (_engine(setup, batch, args) for _ in range(2))
    ours_pair_round(lora, base, prompts, adapters, args)  # warm-up: first gathers, allocator
    samples: dict[str, list[float]] = {"ours_lora": [], "ours_base": [], "peft_mixed": [], "peft_set_adapter": []}
    task = progress.add_task(f"batch {batch}", total=args.rounds)
    for _ in range(args.rounds):
        lora_tps, base_tps = ours_pair_round(lora, base, prompts, adapters, args)
        samples["ours_lora"].append(lora_tps)
        samples["ours_base"].append(base_tps)
        samples["peft_mixed"].append(peft_mixed_round(peft, prompts, adapters, args))
        samples["peft_set_adapter"].append(peft_set_adapter_round(peft, prompts, adapters, args))
        progress.advance(task)
    tps = {name: statistics.median(values) for name, values in samples.items()}

    def paired(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(samples[num], samples[den]))

    return {
        "tokens_per_s": tps,
        "samples": samples,
        "lora_over_base_throughput": paired("ours_lora", "ours_base"),
        "speedup_vs_peft_mixed": paired("ours_lora", "peft_mixed"),
        "speedup_vs_peft_set_adapter": paired("ours_lora", "peft_set_adapter"),
        "max_abs_logit_diff": logit_diff(lora, peft, prompts, adapters),
    }


def _engine(setup: Setup, batch: int, args) -> LoraEngine:
    engine = LoraEngine(
        setup.model, setup.tokenizer, max_batch=batch, max_seq_len=args.prompt_len + args.decode_tokens + 8
    )
    for i, w in enumerate(setup.weights):
        engine.load_adapter(f"a{i}", w)
    return engine


@torch.inference_mode()
def logit_diff(engine: LoraEngine, peft, prompts: list[list[int]], adapters: list[str]) -> float:
    """Max |ours - PEFT| over the prefill and first mixed decode step of every request."""
    captured: dict[str, list[torch.Tensor]] = {}
    engine.on_logits = lambda ids, logits: [
        captured.setdefault(r, []).append(logits[i].float().cpu()) for i, r in enumerate(ids)
    ]
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(EngineRequest(f"diff-{i}", adapter, prompt, max_tokens=2, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
    engine.on_logits = None
    worst = 0.0
    for step in range(2):
        ids = [p + tokens[f"diff-{i}"][:step] for i, p in enumerate(prompts)]
        device = next(peft.parameters()).device
        ref = peft(input_ids=torch.tensor(ids, device=device), adapter_names=adapters).logits[:, -1].float().cpu()
        for i in range(len(prompts)):
            worst = max(worst, (captured[f"diff-{i}"][step] - ref[i]).abs().max().item())
    return worst


# -- cold load ------------------------------------------------------------------------------
def bench_cold_load(setup: Setup, args) -> list[dict[str, Any]]:
    """Per rank: disk -> host (parse + validate) and host -> device pool copy, with bandwidth."""
    engine = LoraEngine(setup.model, setup.tokenizer, max_batch=1, max_seq_len=16)
    rows = []
    for rank in sorted(set(setup.adapter_ranks)):
        folder = setup.adapter_dirs[setup.adapter_ranks.index(rank)]
        disk_bytes = (folder / "adapter_model.safetensors").stat().st_size
        disk_s, host_s = [], []
        for _ in range(max(3, args.rounds)):
            start = time.perf_counter()
            weights = AdapterWeights.from_peft_folder(folder, setup.model.config).pin_memory()
            disk_s.append(time.perf_counter() - start)
            sync(args.device)
            start = time.perf_counter()
            engine.load_adapter("cold", weights)
            sync(args.device)
            host_s.append(time.perf_counter() - start)
            engine.offload_adapter("cold")
        d, h = statistics.median(disk_s), statistics.median(host_s)
        rows.append(
            {
                "rank": rank,
                "disk_bytes": disk_bytes,
                "disk_to_host_s": d,
                "disk_to_host_GBps": disk_bytes / d / 1e9,
                "host_bytes": weights.nbytes,
                "host_to_device_s": h,
                "host_to_device_GBps": weights.nbytes / h / 1e9,
            }
        )
    return rows


# -- pool churn -----------------------------------------------------------------------------
def bench_pool_churn(setup: Setup, args) -> dict[str, Any]:
    """The same seeded churn of mixed-rank adapters through the paged pool and a contiguous buffer.

    Each event requests one of --churn-functions adapters (Zipf popularity, ranks drawn from --ranks); a
    miss loads it, evicting LRU adapters until it fits. Utilisation = live adapter bytes /
    pool bytes, averaged over the events after the pool first fills.
    """
    cfg = setup.model.config
    dims = module_dims(cfg)
    per_rank = sum(sum(dims[m]) for m in args.targets) * cfg.num_hidden_layers
    rng = random.Random(args.seed)
    sizes = {f"f{i}": rng.choice(args.ranks) * per_rank for i in range(args.churn_functions)}
    page_elems = page_elems_for(cfg)
    mean_size = statistics.mean(sizes.values())
    num_pages = int(args.churn_capacity * mean_size // page_elems)  # room for about this many adapters of the mix
    paged = PagedAdapterPool(num_pages, page_elems, torch.float32, device="meta")
    contiguous = ContiguousAllocator(capacity=num_pages * page_elems)
    names = list(sizes)
    weights = [1 / (i + 1) ** 0.8 for i in range(len(names))]
    events = rng.choices(names, weights=weights, k=args.churn_events)
    util: dict[str, list[float]] = {"paged": [], "contiguous": [], "page_fill": []}
    evictions = {"paged": 0, "contiguous": 0}
    full = {"paged": False, "contiguous": False}
    for name in events:
        if name in paged:
            paged.touch(name)
        else:
            try:
                _, evicted = paged.load(name, sizes[name])
            except PoolFullError:
                evicted = []
            evictions["paged"] += len(evicted)
            full["paged"] |= bool(evicted)
        if name in contiguous:
            contiguous.touch(name)
        else:
            evicted = contiguous.load(name, sizes[name])
            evictions["contiguous"] += len(evicted)
            full["contiguous"] |= bool(evicted)
        if full["paged"]:
            stats = paged.stats()
            util["paged"].append(stats.utilisation)
            util["page_fill"].append(stats.live_bytes / max(1, stats.pages_used * stats.page_bytes))
        if full["contiguous"]:
            util["contiguous"].append(contiguous.utilisation())
    return {
        "pool_pages": num_pages,
        "page_bytes": page_elems * 4,
        "events": len(events),
        "pool_utilisation": statistics.mean(util["paged"]) if util["paged"] else paged.stats().utilisation,
        "contiguous_utilisation": statistics.mean(util["contiguous"])
        if util["contiguous"]
        else contiguous.utilisation(),
        "paged_page_fill": statistics.mean(util["page_fill"]) if util["page_fill"] else 1.0,
        "paged_evictions": evictions["paged"],
        "contiguous_evictions": evictions["contiguous"],
    }


# -- report ---------------------------------------------------------------------------------
def render(results: dict[str, Any]) -> None:
    out = Console(width=160)
    table = Table(
        title=f"decode throughput, tokens/s (medians of {results['config']['rounds']} interleaved rounds; ratios: median of per-round ratios)"
    )
    for col in (
        "batch",
        "ours LoRA",
        "ours base",
        "PEFT mixed",
        "PEFT set_adapter",
        "LoRA/base",
        "vs PEFT mixed",
        "vs set_adapter",
        "max |dlogit|",
    ):
        table.add_column(col, justify="right")
    for batch, r in results["batches"].items():
        t = r["tokens_per_s"]
        table.add_row(
            batch,
            f"{t['ours_lora']:.0f}",
            f"{t['ours_base']:.0f}",
            f"{t['peft_mixed']:.0f}",
            f"{t['peft_set_adapter']:.0f}",
            f"{r['lora_over_base_throughput']:.3f}",
            f"{r['speedup_vs_peft_mixed']:.2f}x",
            f"{r['speedup_vs_peft_set_adapter']:.2f}x",
            f"{r['max_abs_logit_diff']:.1e}",
        )
    out.print(table)
    cold = Table(title="adapter cold load per tier (median)")
    for col in ("rank", "disk->host ms", "MB", "GB/s", "host->device ms", "MB", "GB/s"):
        cold.add_column(col, justify="right")
    for row in results["cold_load"]:
        cold.add_row(
            str(row["rank"]),
            f"{row['disk_to_host_s'] * 1e3:.2f}",
            f"{row['disk_bytes'] / 1e6:.2f}",
            f"{row['disk_to_host_GBps']:.2f}",
            f"{row['host_to_device_s'] * 1e3:.2f}",
            f"{row['host_bytes'] / 1e6:.2f}",
            f"{row['host_to_device_GBps']:.2f}",
        )
    out.print(cold)
    churn = results["pool_churn"]
    pool = Table(
        title=f"adapter memory under churn ({churn['events']} requests over {results['config']['churn_functions']} adapters, "
        f"ranks {results['config']['ranks']}, pool of ~{results['config']['churn_capacity']} adapters)"
    )
    for col in ("allocator", "utilisation (live / pool bytes)", "live / allocated bytes", "evictions"):
        pool.add_column(col, justify="right")
    pool.add_row(
        "paged pool",
        f"{churn['pool_utilisation']:.3f}",
        f"{churn['paged_page_fill']:.3f}",
        str(churn["paged_evictions"]),
    )
    pool.add_row(
        "contiguous first-fit", f"{churn['contiguous_utilisation']:.3f}", "1.000", str(churn["contiguous_evictions"])
    )
    out.print(pool)
    summary = Table(title=f"targets (batch {results['headline_batch']})")
    for col in ("metric", "value", "target", "met"):
        summary.add_column(col, justify="right")
    for metric, target in TARGETS.items():
        value = results[metric]
        summary.add_row(metric, f"{value:.3f}", f">= {target}", "yes" if value >= target else "NO")
    out.print(summary)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.print(
        f"[bold]engine benchmark[/]: shape={args.shape} device={args.device} dtype={args.dtype} "
        f"batches={args.batches} threads={torch.get_num_threads()}"
    )
    setup = prepare(args)
    peft = load_peft(setup, args)
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "adapter_ranks": setup.adapter_ranks,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batches": {},
    }
    with Progress(console=console, transient=True) as progress:
        for batch in args.batches:
            results["batches"][str(batch)] = bench_batch(batch, setup, peft, args, progress)
    results["cold_load"] = bench_cold_load(setup, args)
    results["pool_churn"] = bench_pool_churn(setup, args)
    headline = str(max(args.batches))
    results["headline_batch"] = int(headline)
    for key in (
        "lora_over_base_throughput",
        "speedup_vs_peft_mixed",
        "speedup_vs_peft_set_adapter",
        "max_abs_logit_diff",
    ):
        results[key] = results["batches"][headline][key]
    results["pool_utilisation"] = results["pool_churn"]["pool_utilisation"]
    results["contiguous_utilisation"] = results["pool_churn"]["contiguous_utilisation"]
    results["targets_met"] = {m: results[m] >= t for m, t in TARGETS.items()}
    render(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
