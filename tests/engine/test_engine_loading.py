"""Adapter loads outside the step (reserve / copy on another thread / commit) and the engine thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from gpuworker.engine import EngineRequest, LoraEngine, PoolFullError
from gpuworker.runner import EngineRunner
from gpuworker.threads import ThreadPolicy

pytestmark = pytest.mark.unit

PROMPT = "hello world, how are you"


def _tokens(outputs: list) -> list[int]:
    return [o.token_id for o in outputs]


def test_a_load_copied_on_another_thread_while_the_batch_decodes(
    make_engine, model_and_tokenizer, weights, run_all
) -> None:
    tokenizer = model_and_tokenizer[1]
    alone = make_engine(max_batch=4)
    alone.add_request(EngineRequest("a", "r16", tokenizer.encode(PROMPT), max_tokens=8, ignore_eos=True))
    expected = _tokens(run_all(alone)["a"])

    engine = make_engine(max_batch=4, load=False)
    engine.load_adapter("r16", weights["r16"])
    engine.add_request(EngineRequest("a", "r16", tokenizer.encode(PROMPT), max_tokens=8, ignore_eos=True))
    outputs = {"a": engine.step()}
    pending = engine.begin_load("r64", weights["r64"])
    assert pending is not None and not engine.is_resident("r64")
    with pytest.raises(ValueError, match="not resident"):  # not usable before the commit
        engine.add_request(EngineRequest("b", "r64", tokenizer.encode(PROMPT), max_tokens=4))
    with pytest.raises(ValueError, match="being loaded"):
        engine.begin_load("r64", weights["r64"])
    copier = threading.Thread(target=pending.copy)
    copier.start()
    while copier.is_alive() or len(outputs["a"]) < 3:  # the running request keeps decoding meanwhile
        outputs["a"] += engine.step()
    copier.join()
    engine.finish_load(pending)
    engine.finish_load(pending)  # idempotent
    assert engine.is_resident("r64") and pending.copy_s > 0
    engine.add_request(EngineRequest("b", "r64", tokenizer.encode(PROMPT), max_tokens=4, ignore_eos=True))
    for rid, outs in run_all(engine).items():
        outputs.setdefault(rid, []).extend(outs)
    assert _tokens(outputs["a"]) == expected  # the load changed nothing for the running request

    fresh = make_engine(max_batch=4)
    fresh.add_request(EngineRequest("b", "r64", tokenizer.encode(PROMPT), max_tokens=4, ignore_eos=True))
    assert _tokens(outputs["b"]) == _tokens(run_all(fresh)["b"])  # the copied weights are the right ones


def test_a_reserved_adapter_is_never_evicted_and_an_aborted_load_frees_its_pages(model_and_tokenizer, weights) -> None:
    model, tokenizer = model_and_tokenizer
    one = weights["r64"]
    pages = -(-one.numel // (8 * 2 * model.config.hidden_size))
    engine = LoraEngine(model, tokenizer, max_batch=2, pool_pages=pages)  # room for exactly one of it
    pending = engine.begin_load("x", one)
    assert pending is not None
    with pytest.raises(PoolFullError):  # the half-written adapter is pinned, not a victim
        engine.begin_load("y", one)
    assert engine.lru_adapters() == [] and engine.pool_stats().pages_free == 0
    engine.abort_load(pending)
    assert engine.pool_stats().pages_free == pages and not engine.pool.holds("x")
    engine.load_adapter("y", one)  # the same room serves the next load
    assert engine.is_resident("y")
    with pytest.raises(RuntimeError, match="before its copy"):
        engine.finish_load(engine.begin_load("z", weights["r8"]) or pytest.fail("z fit"))


async def test_engine_thread_applies_the_thread_policy_before_every_step(
    make_engine, model_and_tokenizer, run_all
) -> None:
    tokenizer = model_and_tokenizer[1]
    reference = make_engine(max_batch=4)
    requests = [
        EngineRequest(f"r{i}", adapter, tokenizer.encode(PROMPT), max_tokens=6, ignore_eos=True)
        for i, adapter in enumerate(("r8", "r16", None))
    ]
    for req in requests:
        reference.add_request(EngineRequest(req.request_id, req.adapter_id, req.prompt_ids, 6, ignore_eos=True))
    expected = {rid: _tokens(outs) for rid, outs in run_all(reference).items()}

    # The runner applies the policy itself before every step, on its own thread: a batch of up to
    # 2 rows gets one intra-op thread, 3 rows get 2 (small_batch=2 here, so both cases happen).
    runner = EngineRunner(make_engine(max_batch=4), policy=ThreadPolicy(max_threads=2, small_batch=2))
    seen: list[tuple[int, int]] = []  # (running, intra-op threads) at each step, seen on the engine thread
    engine_step = runner.engine.step

    def step() -> list:
        seen.append((runner.engine.num_running(), torch.get_num_threads()))
        return engine_step()

    runner.engine.step = step  # type: ignore[method-assign]
    try:
        # All three are queued before stepping starts: otherwise the first can finish before the
        # third arrives on a loaded machine, and no step ever runs 3 rows.
        queues = [await runner.submit(req) for req in requests]
        runner.start()
        got = {}
        for req, queue in zip(requests, queues):
            outs = [await asyncio.wait_for(queue.get(), 30)]
            while not outs[-1].finished:
                outs.append(await asyncio.wait_for(queue.get(), 30))
            got[req.request_id] = _tokens(outs)
        assert got == expected
        assert runner.stats.latencies and runner.steps == len(seen)
        assert {threads for running, threads in seen if running <= 2} == {1}
        assert {threads for running, threads in seen if running == 3} == {2}
    finally:
        await runner.stop()
    assert runner._thread is not None and not runner._thread.is_alive()  # stop() ends the thread


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream_load_matches_cpu(model_and_tokenizer, weights, run_all) -> None:
    """On CUDA: pinned host -> side-stream copy while the batch decodes; tokens match the CPU engine."""
    import copy

    model, tokenizer = model_and_tokenizer
    cpu = LoraEngine(model, tokenizer, max_batch=4)
    cuda_model = copy.deepcopy(model).to("cuda")
    gpu = LoraEngine(cuda_model, tokenizer, max_batch=4)
    for engine in (cpu, gpu):
        engine.load_adapter("r16", weights["r16"].pin_memory())
        engine.add_request(EngineRequest("a", "r16", tokenizer.encode(PROMPT), max_tokens=8, ignore_eos=True))
    outs = {"cpu": cpu.step(), "gpu": gpu.step()}
    pending = gpu.begin_load("r128", weights["r128"].pin_memory())
    assert pending is not None
    copier = threading.Thread(target=pending.copy)
    copier.start()
    while copier.is_alive():
        outs["gpu"] += gpu.step()
    copier.join()
    gpu.finish_load(pending)
    cpu.load_adapter("r128", weights["r128"])
    for engine in (cpu, gpu):
        engine.add_request(EngineRequest("b", "r128", tokenizer.encode(PROMPT), max_tokens=4, ignore_eos=True))
    cpu_all, gpu_all = run_all(cpu), run_all(gpu)
    assert _tokens(outs["gpu"] + gpu_all.get("a", [])) == _tokens(outs["cpu"] + cpu_all.get("a", []))
    assert _tokens(gpu_all["b"]) == _tokens(cpu_all["b"])
