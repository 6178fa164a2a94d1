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
* the largest |logit| difference between our engine and PEFT on the same mixed batch;
* time per output token (TPOT) at batch 1, 2, 4, 8, 32: our engine with LoRA, our engine with the
  backbone alone, PEFT with one adapter active; and at batch 1 the worker path (the engine
  thread, its hand-off to asyncio and a per-token publish, to NATS when one is reachable);
* the decode stall per adapter load, by rank: ms added to the running batch's tokens while an
  adapter is loaded the old way (a copy on the engine thread between two steps) and the new way
  (pages reserved between steps, the copy on another thread / a CUDA side stream);
* cold-adapter TTFT per tier (host, disk) against its floor: bytes / measured tier bandwidth
  (a raw copy / a raw file read of the same bytes) + one prefill.

    python benchmarks/engine.py                     # CPU, "demo" shape (hidden 512, 8 layers)
    python benchmarks/engine.py --quick             # smoke run on the "tiny" shape
    python benchmarks/engine.py --device cuda --shape llama-7b --dtype bfloat16

On CUDA the backbone is built with random weights directly on the device (no CPU init, no
checkpoint on disk) and the adapters are written as PEFT folders from random tensors.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import statistics
import sys
import tempfile
import threading
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
from gpuworker.models import SHAPES, build_backbone, build_tokenizer, llama_config, load_backbone, make_adapter
from gpuworker.runner import EngineRunner
from gpuworker.threads import ThreadPolicy
from lorafaas.llama import ATTN_MODULES
from lorafaas.wire import TokenChunk

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = {  # value >= target
    "lora_over_base_throughput": 0.93,
    "speedup_vs_peft_set_adapter": 5.0,
    "speedup_vs_peft_mixed": 1.5,
    "pool_utilisation": 0.95,
}
CEILINGS = {  # value <= ceiling
    "tpot_batch1_over_base": 1.10,
    "tpot_batch1_over_peft": 1.0,
    "load_stall_over_step": 1.0,
    "cold_ttft_over_floor": 1.2,
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
    p.add_argument("--tpot-batches", default=None, help="batch sizes for TPOT (default: 1,2,4,8,32; '' skips)")
    p.add_argument("--stall-batch", type=int, default=8, help="running batch while adapters load (stall test)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222", help="NATS for the worker-path publish ('' skips)")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT baselines (a quick GPU check)")
    p.add_argument("--skip-churn", action="store_true", help="skip the pool churn simulation")
    p.add_argument("--on-device", action="store_true", help="build the backbone in memory on --device (always on CUDA)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shape, batch 8, 4 tokens, 1 round")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.quick else "demo")
    args.batches = [int(b) for b in (args.batches or ("8" if args.quick else "8,32")).split(",")]
    tpot = args.tpot_batches if args.tpot_batches is not None else ("1,4" if args.quick else "1,2,4,8,32")
    args.tpot_batches = [int(b) for b in tpot.split(",") if b]
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
    """Build (or reuse) the backbone and adapters, and load the model our engine runs on.

    On CPU the backbone is a Hugging Face folder (built once, reused) and the adapters are made
    with PEFT. On CUDA the backbone is built with random weights on the device itself (a 7B
    shape initialised on the CPU would take minutes and 28 GB of host memory) and the adapters are
    PEFT folders written from random tensors."""
    root = args.workdir or Path(tempfile.gettempdir()) / "lorafaas-bench-engine"
    ranks = [args.ranks[i % len(args.ranks)] for i in range(args.adapters)]
    on_device = args.on_device or args.device.startswith("cuda")
    if on_device:
        backbone = None
        model, tokenizer = build_on_device(args)
    else:
        backbone = root / f"{args.shape}-{args.dtype}"
        if not (backbone / "config.json").exists():
            build_backbone(backbone, args.shape, seed=args.seed, dtype=DTYPES[args.dtype])
        model, tokenizer = load_backbone(backbone, device=args.device, dtype=DTYPES[args.dtype])
    dirs = []
    for i, rank in enumerate(ranks):
        kind = "rand" if on_device else "peft"
        folder = root / f"{args.shape}-{args.dtype}-{kind}-adapter{i}-r{rank}-{'-'.join(args.targets)}"
        if not (folder / "adapter_model.safetensors").exists():
            if backbone is None:
                write_random_adapter(folder, model.config, rank, args.seed + 100 + i, args.targets, DTYPES[args.dtype])
            else:
                make_adapter(backbone, folder, rank=rank, seed=args.seed + 100 + i, target_modules=args.targets)
        dirs.append(folder)
    weights = [AdapterWeights.from_peft_folder(d, model.config).pin_memory() for d in dirs]
    return Setup(backbone, dirs, ranks, model, tokenizer, weights)


def build_on_device(args: argparse.Namespace) -> tuple[Any, Any]:
    """A random-weight Llama of ``args.shape`` initialised directly on ``args.device`` in ``args.dtype``."""
    from transformers import LlamaForCausalLM

    spec = SHAPES[args.shape]
    tokenizer = build_tokenizer(spec.vocab_size)
    config = llama_config(spec, tokenizer)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    with torch.device(args.device):
        try:
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            model = LlamaForCausalLM._from_config(config, torch_dtype=dtype)
    model = model.to(dtype)  # a no-op unless the version ignored the dtype
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def write_random_adapter(
    folder: Path, config: Any, rank: int, seed: int, targets: tuple[str, ...], dtype: torch.dtype
) -> Path:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) with random A and B."""
    from safetensors.torch import save_file

    dims = module_dims(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in targets:
            fan_in, fan_out = dims[module]
            parent = "self_attn" if module in ATTN_MODULES else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.5 / fan_in**0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.5 / rank**0.5).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(targets),
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(peft_config))
    return folder


def load_peft(setup: Setup, args: argparse.Namespace):
    """A PeftModel (on its own copy of the backbone) with every adapter loaded as a0..aN."""
    from peft import PeftModel

    if setup.backbone is None:
        model = copy.deepcopy(setup.model)  # on the device, no checkpoint to reload
    else:
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
    """Wait for the compute stream only: a load's side-stream copy must not count as step time."""
    if device.startswith("cuda"):
        torch.cuda.current_stream().synchronize()


# -- decode throughput ----------------------------------------------------------------------
def ours_pair_round(
    lora: LoraEngine, base: LoraEngine, prompts: list[list[int]], adapters: list[str], args
) -> tuple[float, float]:
    """Our engine with LoRA and with the backbone alone, decode steps interleaved one by one.

    Both engines admit the same prompts (prefill, untimed), then their ``decode_tokens`` decode
    steps alternate, so load from anything else on the machine hits both alike. Returns tokens/s.
    """
    args.policy.apply(len(prompts))
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


def peft_one_adapter_tpot(peft, prompts, adapter: str, args) -> float:
    """PEFT with one adapter active (set_adapter) for the whole batch: seconds per decode step."""
    args.policy.apply(len(prompts))
    peft.set_adapter(adapter)
    full = peft_generate_s(peft, prompts, args.decode_tokens + 1, args, None)
    prefill = peft_generate_s(peft, prompts, 1, args, None)
    return max(full - prefill, 1e-9) / args.decode_tokens


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
        if peft is not None:
            samples["peft_mixed"].append(peft_mixed_round(peft, prompts, adapters, args))
            samples["peft_set_adapter"].append(peft_set_adapter_round(peft, prompts, adapters, args))
        progress.advance(task)
    tps = {name: statistics.median(values) if values else None for name, values in samples.items()}
    with_peft = peft is not None
    return {
        "tokens_per_s": tps,
        "samples": samples,
        "lora_over_base_throughput": _paired(samples, "ours_lora", "ours_base"),
        "speedup_vs_peft_mixed": _paired(samples, "ours_lora", "peft_mixed") if with_peft else None,
        "speedup_vs_peft_set_adapter": _paired(samples, "ours_lora", "peft_set_adapter") if with_peft else None,
        "max_abs_logit_diff": logit_diff(lora, peft, prompts, adapters) if with_peft else None,
    }


def _engine(setup: Setup, batch: int, args, max_seq_len: int | None = None) -> LoraEngine:
    engine = LoraEngine(
        setup.model,
        setup.tokenizer,
        max_batch=batch,
        max_seq_len=max_seq_len or args.prompt_len + args.decode_tokens + 8,
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


# -- time per output token -------------------------------------------------------------------
def tpot_adapters(batch: int, args) -> list[str]:
    """The adapters of a TPOT batch: starting from a4 (rank 128 with the default ranks, the worst
    case at batch 1), cycled over all of them."""
    return [f"a{(4 + i) % args.adapters}" for i in range(batch)]


def bench_tpot(setup: Setup, peft, args, progress: Progress) -> dict[str, Any]:
    """TPOT (ms) per batch size: ours with LoRA, ours backbone-only, PEFT with one adapter, and at
    batch 1 the worker path. Variants interleaved round by round; medians and per-round ratios."""
    out: dict[str, Any] = {}
    task = progress.add_task("TPOT", total=len(args.tpot_batches) * args.rounds)
    for batch in args.tpot_batches:
        prompts = make_prompts(batch, args, setup.model.config.vocab_size)
        adapters = tpot_adapters(batch, args)
        lora, base = (_engine(setup, batch, args) for _ in range(2))
        ours_pair_round(lora, base, prompts, adapters, args)  # warm-up
        samples: dict[str, list[float]] = {"ours_lora": [], "ours_base": [], "peft_one_adapter": []}
        if batch == 1:
            samples["worker_lora"] = []
        for _ in range(args.rounds):
            lora_tps, base_tps = ours_pair_round(lora, base, prompts, adapters, args)
            samples["ours_lora"].append(batch / lora_tps * 1e3)
            samples["ours_base"].append(batch / base_tps * 1e3)
            if peft is not None:
                samples["peft_one_adapter"].append(peft_one_adapter_tpot(peft, prompts, adapters[0], args) * 1e3)
            if batch == 1:
                samples["worker_lora"].append(worker_path_tpot(lora, prompts[0], adapters[0], args) * 1e3)
            progress.advance(task)
        row: dict[str, Any] = {"adapters": adapters, "samples_ms": samples}
        row["tpot_ms"] = {k: statistics.median(v) for k, v in samples.items() if v}
        row["lora_over_base"] = _paired(samples, "ours_lora", "ours_base")
        if samples["peft_one_adapter"]:
            row["lora_over_peft_one_adapter"] = _paired(samples, "ours_lora", "peft_one_adapter")
        if batch == 1:
            row["worker_over_base"] = _paired(samples, "worker_lora", "ours_base")
            row["worker_over_engine"] = _paired(samples, "worker_lora", "ours_lora")  # the worker's own overhead
            if samples["peft_one_adapter"]:
                row["worker_over_peft_one_adapter"] = _paired(samples, "worker_lora", "peft_one_adapter")
            row["step_breakdown_ms"] = step_breakdown(lora, prompts[0], adapters[0], args)
        out[str(batch)] = row
    return out


def _paired(samples: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def worker_path_tpot(engine: LoraEngine, prompt: list[int], adapter: str, args) -> float:
    """One request through the worker's path: the engine thread (``EngineRunner``), the hand-off to
    the event loop, and per token a ``TokenChunk`` encoded and published (to NATS when reachable,
    as the worker streams tokens). Seconds per token after the first."""
    return asyncio.run(_worker_path(engine, prompt, adapter, args))


async def _worker_path(engine: LoraEngine, prompt: list[int], adapter: str, args) -> float:
    nc = await _nats(args.nats_url)
    runner = EngineRunner(engine, policy=ThreadPolicy(args.policy.max_threads))  # applied before every step
    runner.start()
    stamps: list[float] = []
    try:
        # A worker's engine thread lives as long as the process: warm this fresh one (its first
        # torch ops set up thread-local state) before timing, as a worker that has served before.
        warm = await runner.submit(EngineRequest("warm", adapter, prompt, max_tokens=3, ignore_eos=True))
        out = await warm.get()
        while not out.finished:  # drain the warm-up's outputs
            out = await warm.get()
        request = EngineRequest("w0", adapter, prompt, max_tokens=args.decode_tokens + 1, ignore_eos=True)
        queue = await runner.submit(request)
        while True:
            out = await queue.get()
            stamps.append(time.perf_counter())
            chunk = TokenChunk(invocation_id=out.request_id, index=out.index, text=out.text).encode()
            if nc is not None:
                await nc.publish("lorafaas-bench.tokens.w0", chunk)
            if out.finished:
                break
    finally:
        await runner.stop()
        if nc is not None:
            await nc.drain()
    return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)


async def _nats(url: str):
    if not url:
        return None
    try:
        import nats

        return await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0, allow_reconnect=False)
    except Exception:  # no NATS here (the GPU machine): encode only
        return None


def step_breakdown(engine: LoraEngine, prompt: list[int], adapter: str, args) -> dict[str, float]:
    """Median ms per decode step at batch 1 in the engine's phases (``LoraEngine.timings``)."""
    args.policy.apply(1)
    engine.add_request(EngineRequest("bd", adapter, prompt, max_tokens=args.decode_tokens + 1, ignore_eos=True))
    engine.step()
    phases: dict[str, list[float]] = {}
    while engine.has_work():
        engine.step()
        for name, seconds in engine.timings.items():
            phases.setdefault(name, []).append(seconds * 1e3)
    return {name: statistics.median(v) for name, v in phases.items()}


# -- adapter load stall -----------------------------------------------------------------------
def bench_load_stall(setup: Setup, args) -> dict[str, Any]:
    """ms a load adds to a running batch's next tokens, by rank, the old way and the new way.

    ``engine_thread``: ``load_adapter`` between two steps on the engine thread (what the worker
    did): every running request's next token waits for the whole copy.
    ``off_thread``: ``begin_load`` between two steps (bookkeeping), ``PendingLoad.copy`` on
    another thread while the batch keeps stepping, ``finish_load`` between two steps; the stall
    is those two calls plus what the steps during the copy took over the median step.
    """
    batch = args.stall_batch
    reps = max(3, min(args.rounds, 5))
    ranks = sorted(set(setup.adapter_ranks))
    steps_needed = len(ranks) * reps * 2 * 12 + 16
    engine = _engine(setup, batch, args, max_seq_len=args.prompt_len + steps_needed + 8)
    args.policy.apply(batch)
    prompts = make_prompts(batch, args, setup.model.config.vocab_size)
    for i, prompt in enumerate(prompts):
        adapter = f"a{i % args.adapters}"
        engine.add_request(EngineRequest(f"s{i}", adapter, prompt, max_tokens=steps_needed, ignore_eos=True))
    engine.step()
    step = lambda: _timed(engine.step, args.device)  # noqa: E731
    for _ in range(3):
        step()
    rows = []
    for rank in ranks:
        weights = setup.weights[setup.adapter_ranks.index(rank)]
        sync_ms, async_ms, base_ms = [], [], []
        for _ in range(reps):
            base = statistics.median(step() for _ in range(4))
            base_ms.append(base * 1e3)
            load_s = _timed(lambda: engine.load_adapter("stall", weights), args.device)  # noqa: B023
            sync_ms.append((load_s + max(0.0, step() - base)) * 1e3)
            engine.offload_adapter("stall")
            async_ms.append(_off_thread_stall(engine, weights, base, step, args) * 1e3)
            engine.offload_adapter("stall")
        rows.append(
            {
                "rank": rank,
                "bytes": weights.nbytes,
                "step_ms": statistics.median(base_ms),
                "engine_thread_stall_ms": statistics.median(sync_ms),
                "off_thread_stall_ms": statistics.median(async_ms),
            }
        )
    while engine.has_work():
        engine.abort(next(iter(engine._by_id)))
        engine.step()
    return {"batch": batch, "rows": rows}


def _off_thread_stall(engine: LoraEngine, weights: AdapterWeights, base: float, step, args) -> float:
    begin_s = time.perf_counter()
    pending = engine.begin_load("stall", weights)
    assert pending is not None
    begin_s = time.perf_counter() - begin_s
    copier = threading.Thread(target=pending.copy)
    copier.start()
    extra = 0.0
    while True:  # the batch keeps decoding while the copy runs (at least one step overlaps it)
        extra += max(0.0, step() - base)
        if not copier.is_alive():
            break
    copier.join()
    finish_s = _timed(lambda: engine.finish_load(pending), args.device)
    return begin_s + extra + finish_s


def _timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# -- cold-adapter TTFT ------------------------------------------------------------------------
def bench_cold_ttft(setup: Setup, args) -> dict[str, Any]:
    """TTFT of a request whose adapter is in host memory / on disk, on an idle engine, against
    its floor: bytes / measured bandwidth of each tier it crosses + one prefill (measured with a
    resident adapter). The host -> device bandwidth is a raw copy of the same bytes into a
    preallocated device buffer; the disk bandwidth a raw read of the same file (page cache)."""
    engine = _engine(setup, 1, args, max_seq_len=args.prompt_len + 8)
    args.policy.apply(1)
    prompt = make_prompts(1, args, setup.model.config.vocab_size)[0]
    reps = max(3, args.rounds)
    rows = []
    for rank in sorted(set(setup.adapter_ranks)):
        index = setup.adapter_ranks.index(rank)
        folder, host = setup.adapter_dirs[index], setup.weights[index]
        file = folder / "adapter_model.safetensors"
        disk_bytes = file.stat().st_size
        dst = torch.empty_like(host.flat, device=args.device)
        m: dict[str, list[float]] = {k: [] for k in ("disk_read", "h2d_copy", "prefill", "host", "disk")}
        for _ in range(reps):
            m["disk_read"].append(_timed(file.read_bytes, "cpu"))
            m["h2d_copy"].append(_timed(lambda: dst.copy_(host.flat, non_blocking=True), args.device))  # noqa: B023
            m["prefill"].append(_first_token_s(engine, f"a{index}", prompt, args))
            m["host"].append(_cold_first_token_s(engine, lambda: host, prompt, args))  # noqa: B023
            parse = lambda: AdapterWeights.from_peft_folder(folder, setup.model.config).pin_memory()  # noqa: B023, E731
            m["disk"].append(_cold_first_token_s(engine, parse, prompt, args))
        med = {k: statistics.median(v) for k, v in m.items()}
        floor_host = med["h2d_copy"] + med["prefill"]
        floor_disk = med["disk_read"] + floor_host
        rows.append(
            {
                "rank": rank,
                "disk_bytes": disk_bytes,
                "host_bytes": host.nbytes,
                "disk_GBps": disk_bytes / med["disk_read"] / 1e9,
                "host_to_device_GBps": host.nbytes / med["h2d_copy"] / 1e9,
                "prefill_ms": med["prefill"] * 1e3,
                "host_ttft_ms": med["host"] * 1e3,
                "host_floor_ms": floor_host * 1e3,
                "host_over_floor": med["host"] / floor_host,
                "disk_ttft_ms": med["disk"] * 1e3,
                "disk_floor_ms": floor_disk * 1e3,
                "disk_over_floor": med["disk"] / floor_disk,
            }
        )
    return {
        "rows": rows,
        "over_floor": {
            "host": max(r["host_over_floor"] for r in rows),
            "disk": max(r["disk_over_floor"] for r in rows),
        },
    }


def _first_token_s(engine: LoraEngine, adapter: str, prompt: list[int], args) -> float:
    def run() -> None:
        engine.add_request(EngineRequest("ttft", adapter, prompt, max_tokens=1, ignore_eos=True))
        engine.step()

    return _timed(run, args.device)


def _cold_first_token_s(engine: LoraEngine, host_weights, prompt: list[int], args) -> float:
    """From "the request needs this adapter" (in host memory, or a folder to parse) to its first
    token, through the worker's path: reserve, copy, commit, prefill."""

    def run() -> None:
        pending = engine.begin_load("cold", host_weights())
        assert pending is not None
        pending.copy()
        engine.finish_load(pending)
        engine.add_request(EngineRequest("ttft", "cold", prompt, max_tokens=1, ignore_eos=True))
        engine.step()

    seconds = _timed(run, args.device)
    engine.offload_adapter("cold")
    return seconds


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
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render(results: dict[str, Any]) -> None:
    out = Console(width=160)
    rounds = results["config"]["rounds"]
    title = f"decode throughput, tokens/s (medians of {rounds} interleaved rounds; ratios: medians of per-round ratios)"
    table = Table(title=title)
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
            _fmt(t["ours_lora"], ".0f"),
            _fmt(t["ours_base"], ".0f"),
            _fmt(t["peft_mixed"], ".0f"),
            _fmt(t["peft_set_adapter"], ".0f"),
            _fmt(r["lora_over_base_throughput"], ".3f"),
            _fmt(r["speedup_vs_peft_mixed"], ".2f", "x"),
            _fmt(r["speedup_vs_peft_set_adapter"], ".2f", "x"),
            _fmt(r["max_abs_logit_diff"], ".1e"),
        )
    out.print(table)
    if results.get("tpot"):
        tpot = Table(title=f"time per output token, ms (medians of {rounds} interleaved rounds)")
        for col in ("batch", "ours LoRA", "ours base", "PEFT 1 adapter", "worker path", "LoRA/base", "LoRA/PEFT"):
            tpot.add_column(col, justify="right")
        for batch, r in results["tpot"].items():
            t = r["tpot_ms"]
            tpot.add_row(
                batch,
                _fmt(t.get("ours_lora"), ".2f"),
                _fmt(t.get("ours_base"), ".2f"),
                _fmt(t.get("peft_one_adapter"), ".2f"),
                _fmt(t.get("worker_lora"), ".2f"),
                _fmt(r["lora_over_base"], ".3f"),
                _fmt(r.get("lora_over_peft_one_adapter"), ".3f"),
            )
        out.print(tpot)
        one = results["tpot"].get("1", {})
        if "worker_over_base" in one:
            out.print(
                f"batch 1: worker path / ours base {one['worker_over_base']:.3f}, worker path / ours LoRA (hand-off"
                f" + publish) {one['worker_over_engine']:.3f}, ours LoRA / ours base {one['lora_over_base']:.3f}"
            )
        breakdown = one.get("step_breakdown_ms")
        if breakdown:
            out.print("batch-1 decode step, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in breakdown.items()))
    if results.get("load_stall"):
        stall = Table(title=f"decode stall per adapter load (running batch {results['load_stall']['batch']}), ms")
        for col in ("rank", "MB", "decode step", "copy on engine thread", "copy off the engine thread"):
            stall.add_column(col, justify="right")
        for row in results["load_stall"]["rows"]:
            stall.add_row(
                str(row["rank"]),
                f"{row['bytes'] / 1e6:.2f}",
                f"{row['step_ms']:.2f}",
                f"{row['engine_thread_stall_ms']:.2f}",
                f"{row['off_thread_stall_ms']:.2f}",
            )
        out.print(stall)
    if results.get("cold_ttft"):
        cold = Table(title="cold-adapter TTFT against its floor (bytes / measured tier bandwidth + one prefill), ms")
        for col in ("rank", "prefill", "host TTFT", "host floor", "ratio", "disk TTFT", "disk floor", "ratio"):
            cold.add_column(col, justify="right")
        for row in results["cold_ttft"]["rows"]:
            cold.add_row(
                str(row["rank"]),
                f"{row['prefill_ms']:.2f}",
                f"{row['host_ttft_ms']:.2f}",
                f"{row['host_floor_ms']:.2f}",
                f"{row['host_over_floor']:.2f}",
                f"{row['disk_ttft_ms']:.2f}",
                f"{row['disk_floor_ms']:.2f}",
                f"{row['disk_over_floor']:.2f}",
            )
        out.print(cold)
    if results.get("pool_churn"):
        churn = results["pool_churn"]
        pool = Table(
            title=f"adapter memory under churn ({churn['events']} requests over {results['config']['churn_functions']} "
            f"adapters, ranks {results['config']['ranks']}, pool of ~{results['config']['churn_capacity']} adapters)"
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
            "contiguous first-fit",
            f"{churn['contiguous_utilisation']:.3f}",
            "1.000",
            str(churn["contiguous_evictions"]),
        )
        out.print(pool)
    summary = Table(title=f"targets (batch {results['headline_batch']} for throughput)")
    for col in ("metric", "value", "target", "met"):
        summary.add_column(col, justify="right")
    for metric, (value, bound, met) in results["targets"].items():
        summary.add_row(metric, _fmt(value, ".3f"), bound, {True: "yes", False: "NO", None: "-"}[met])
    out.print(summary)


def targets(results: dict[str, Any]) -> dict[str, tuple[float | None, str, bool | None]]:
    """metric -> (value, bound, met); met is None where the run did not measure it."""
    rows: dict[str, tuple[float | None, str, bool | None]] = {}
    for metric, target in TARGETS.items():
        value = results.get(metric)
        rows[metric] = (value, f">= {target}", None if value is None else value >= target)
    for metric, ceiling in CEILINGS.items():
        value = results.get(metric)
        rows[metric] = (value, f"<= {ceiling}", None if value is None else value <= ceiling)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.policy = ThreadPolicy(torch.get_num_threads())
    console.print(
        f"[bold]engine benchmark[/]: shape={args.shape} device={args.device} dtype={args.dtype} "
        f"batches={args.batches} tpot={args.tpot_batches} threads={torch.get_num_threads()} "
        f"(1 at batch <= {args.policy.small_batch})"
    )
    started = time.perf_counter()
    setup = prepare(args)
    peft = None if args.no_peft else load_peft(setup, args)
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, (Path, ThreadPolicy)) else v) for k, v in vars(args).items()},
        "adapter_ranks": setup.adapter_ranks,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "small_batch_threads": 1,
        "batches": {},
    }
    with Progress(console=console, transient=True) as progress:
        for batch in args.batches:
            results["batches"][str(batch)] = bench_batch(batch, setup, peft, args, progress)
        if args.tpot_batches:
            results["tpot"] = bench_tpot(setup, peft, args, progress)
    results["load_stall"] = bench_load_stall(setup, args)
    results["cold_ttft"] = bench_cold_ttft(setup, args)
    results["cold_load"] = bench_cold_load(setup, args)
    if not args.skip_churn:
        results["pool_churn"] = bench_pool_churn(setup, args)
    summarise(results, args)
    results["wall_s"] = time.perf_counter() - started
    render(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {args.out}")
    return 0


def summarise(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The headline keys (the existing ones, then the engine-speed ones) and the target table."""
    headline = str(max(args.batches))
    results["headline_batch"] = int(headline)
    for key in (
        "lora_over_base_throughput",
        "speedup_vs_peft_mixed",
        "speedup_vs_peft_set_adapter",
        "max_abs_logit_diff",
    ):
        results[key] = results["batches"][headline][key]
    churn = results.get("pool_churn")
    results["pool_utilisation"] = churn["pool_utilisation"] if churn else None
    results["contiguous_utilisation"] = churn["contiguous_utilisation"] if churn else None
    one = results.get("tpot", {}).get("1")
    results["tpot_batch1_over_base"] = one["worker_over_base"] if one else None
    results["tpot_batch1_engine_over_base"] = one["lora_over_base"] if one else None
    results["tpot_batch1_worker_over_engine"] = one["worker_over_engine"] if one else None
    results["tpot_batch1_over_peft"] = one.get("worker_over_peft_one_adapter") if one else None
    stall = results["load_stall"]["rows"]
    results["load_stall_ms_by_rank"] = {str(r["rank"]): r["off_thread_stall_ms"] for r in stall}
    results["load_stall_engine_thread_ms_by_rank"] = {str(r["rank"]): r["engine_thread_stall_ms"] for r in stall}
    results["load_stall_over_step"] = max(r["off_thread_stall_ms"] / r["step_ms"] for r in stall)
    results["cold_ttft_over_floor"] = results["cold_ttft"]["over_floor"]
    results["targets"] = targets({**results, "cold_ttft_over_floor": max(results["cold_ttft_over_floor"].values())})
    results["targets_met"] = {m: met for m, (_, _, met) in results["targets"].items()}


if __name__ == "__main__":
    sys.exit(main())
