"""Request lifecycle: max_tokens, stop strings, eos, abort, seeded sampling, accounting, residency."""

from __future__ import annotations

import pytest

from gpuworker.engine import EngineRequest, PoolFullError
from gpuworker.engine.sequence import Detokenizer, StopMatcher
from lorafaas.errors import InvalidInput

pytestmark = pytest.mark.unit


def _req(
    tokenizer, rid: str, adapter: str | None = "r16", prompt: str = "hello world, how are you", **kw
) -> EngineRequest:
    kw.setdefault("max_tokens", 20)
    return EngineRequest(rid, adapter, tokenizer.encode(prompt), **kw)


def _alone(make_engine, run_all, req: EngineRequest) -> list:
    engine = make_engine()
    engine.add_request(req)
    return run_all(engine)[req.request_id]


def test_max_tokens_and_indices(make_engine, model_and_tokenizer, run_all) -> None:
    outs = _alone(make_engine, run_all, _req(model_and_tokenizer[1], "a", max_tokens=5))
    assert [o.index for o in outs] == [0, 1, 2, 3, 4]
    assert [o.finished for o in outs] == [False] * 4 + [True]
    assert outs[-1].finish_reason == "length"
    assert all(o.prompt_tokens == len(model_and_tokenizer[1].encode("hello world, how are you")) for o in outs)


def test_stop_string_ends_the_request_and_is_not_emitted(make_engine, model_and_tokenizer, run_all) -> None:
    tokenizer = model_and_tokenizer[1]
    full = "".join(o.text for o in _alone(make_engine, run_all, _req(tokenizer, "a", adapter="r64", max_tokens=30)))
    stop = full[6:9]
    assert len(stop) == 3
    outs = _alone(
        make_engine, run_all, _req(tokenizer, "b", adapter="r64", max_tokens=30, stop=["never-appears", stop])
    )
    assert "".join(o.text for o in outs) == full[: full.find(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].finished


def test_eos_stops_unless_ignored(make_engine, model_and_tokenizer, run_all) -> None:
    tokenizer = model_and_tokenizer[1]
    first = _alone(make_engine, run_all, _req(tokenizer, "a", max_tokens=4))[0].token_id
    engine = make_engine()
    engine.eos_ids = frozenset({first})  # pretend the model's first token is its eos
    engine.add_request(_req(tokenizer, "stops", max_tokens=4))
    engine.add_request(_req(tokenizer, "ignores", max_tokens=4, ignore_eos=True))
    outs = run_all(engine)
    assert len(outs["stops"]) == 1 and outs["stops"][0].finish_reason == "stop" and outs["stops"][0].text == ""
    assert len(outs["ignores"]) == 4 and outs["ignores"][-1].finish_reason == "length"


def test_abort_running_and_waiting(make_engine, model_and_tokenizer) -> None:
    tokenizer = model_and_tokenizer[1]
    engine = make_engine(max_batch=2)
    for rid in ("a", "b", "c"):
        engine.add_request(_req(tokenizer, rid, max_tokens=50))
    engine.step()
    engine.step()
    assert (engine.num_running(), engine.num_waiting()) == (2, 1)
    engine.abort("a")
    engine.abort("c")
    engine.abort("unknown")
    outs = {o.request_id: o for o in engine.step()}
    assert outs["a"].finished and outs["a"].finish_reason == "abort" and outs["a"].index == 2
    assert outs["c"].finish_reason == "abort" and outs["c"].index == 0
    assert not outs["b"].finished
    assert (engine.num_running(), engine.num_waiting()) == (1, 0)
    engine.abort("b")
    assert [o.finish_reason for o in engine.step()] == ["abort"]
    assert not engine.has_work()
    assert engine.lru_adapters()  # nothing is pinned any more
    assert "r16" in engine.lru_adapters()


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(make_engine, model_and_tokenizer, run_all) -> None:
    tokenizer = model_and_tokenizer[1]
    sampled = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=15)
    alone = [o.token_id for o in _alone(make_engine, run_all, _req(tokenizer, "s", adapter="r32", **sampled))]
    engine = make_engine()
    engine.add_request(_req(tokenizer, "other", adapter="r8", temperature=0.8, seed=7, max_tokens=20))
    engine.add_request(_req(tokenizer, "s", adapter="r32", **sampled))
    engine.add_request(_req(tokenizer, "greedy", adapter="all16"))
    assert [o.token_id for o in run_all(engine)["s"]] == alone
    other_seed = [
        o.token_id
        for o in _alone(make_engine, run_all, _req(tokenizer, "s", adapter="r32", **(sampled | {"seed": 99})))
    ]
    assert other_seed != alone


def test_device_time_is_apportioned_by_tokens(make_engine, model_and_tokenizer) -> None:
    tokenizer = model_and_tokenizer[1]
    engine = make_engine()
    engine.add_request(_req(tokenizer, "a"))
    first = engine.step()[0]
    assert first.prefill_s > 0 and first.device_s == pytest.approx(engine.last_step_s)
    prompt = "please summarise the following text, translate it to french"
    engine.add_request(_req(tokenizer, "b", prompt=prompt))
    outs = {o.request_id: o for o in engine.step()}  # prefill first: b alone, a waits a step
    assert set(outs) == {"b"} and outs["b"].prefill_s > 0
    assert outs["b"].device_s == pytest.approx(engine.last_step_s)
    outs = {o.request_id: o for o in engine.step()}  # one decode: one token each, an equal share
    assert outs["a"].device_s == pytest.approx(engine.last_step_s / 2)
    assert outs["b"].device_s == pytest.approx(engine.last_step_s / 2)
    assert outs["a"].prefill_s == 0.0 and outs["b"].prefill_s == 0.0


def test_finished_slot_is_wiped_and_reused_cleanly(make_engine, model_and_tokenizer, run_all) -> None:
    tokenizer = model_and_tokenizer[1]
    engine = make_engine(max_batch=1)
    engine.add_request(_req(tokenizer, "tenant-a", adapter="r128", prompt="a secret prompt of tenant a", max_tokens=3))
    run_all(engine)
    assert not engine.runner.k_cache.any() and not engine.runner.v_cache.any()
    fresh = _alone(make_engine, run_all, _req(tokenizer, "tenant-b", adapter="r8", max_tokens=8))
    engine.add_request(_req(tokenizer, "again", adapter="r8", max_tokens=8))
    assert [o.token_id for o in run_all(engine)["again"]] == [o.token_id for o in fresh]


def test_residency_pinning_and_eviction(make_engine, model_and_tokenizer, weights, run_all) -> None:
    tokenizer = model_and_tokenizer[1]
    probe = make_engine(load=False)
    pages = {name: probe.pool.pages_needed(w.numel) for name, w in weights.items()}
    # Room for r128 and r64 but not a third big adapter.
    engine = make_engine(load=False, pool_pages=pages["r128"] + pages["r64"] + pages["r8"])
    engine.load_adapter("r128", weights["r128"])
    engine.load_adapter("r64", weights["r64"])
    engine.load_adapter("r8", weights["r8"])
    assert engine.resident_adapters() == {"r128": 128, "r64": 64, "r8": 8}
    assert engine.lru_adapters() == ["r128", "r64", "r8"]
    engine.add_request(_req(tokenizer, "a", adapter="r128", max_tokens=3))
    assert engine.lru_adapters() == ["r64", "r8"]  # pinned adapters are not offered for offload
    with pytest.raises(ValueError):
        engine.offload_adapter("r128")
    with pytest.raises(PoolFullError):
        engine.load_adapter("r128b", weights["r128"])  # would need the pinned r128's pages
    assert engine.resident_adapters().keys() == {"r128", "r64", "r8"}, "a failed load evicts nothing"
    engine.load_adapter("r16", weights["r16"])  # evicts the coldest unpinned first
    assert engine.evicted_on_last_load[0] == "r64" and not engine.is_resident("r64")
    with pytest.raises(ValueError):
        engine.add_request(_req(tokenizer, "b", adapter="r64"))
    run_all(engine)
    engine.offload_adapter("r128")
    engine.offload_adapter("r128")  # idempotent
    stats = engine.pool_stats()
    assert stats.pages_used == sum(pages[a] for a in engine.resident_adapters())
    assert stats.live_bytes == sum(weights[a].nbytes for a in engine.resident_adapters())
    assert stats.utilisation == pytest.approx(stats.live_bytes / (stats.pages_total * stats.page_bytes))


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (dict(prompt_ids=[]), InvalidInput),
        (dict(max_tokens=0), InvalidInput),
        (dict(prompt_ids=[10**6]), InvalidInput),
        (dict(temperature=-1.0), InvalidInput),
        (dict(top_p=0.0), InvalidInput),
        (dict(adapter_id="nope"), ValueError),  # the worker's contract with the engine, not the caller's input
    ],
)
def test_invalid_requests_are_refused(make_engine, bad, error) -> None:
    engine = make_engine()
    req = EngineRequest("x", "r8", [5, 6, 7], max_tokens=3)
    for key, value in bad.items():
        setattr(req, key, value)
    with pytest.raises(error):
        engine.add_request(req)
    assert not engine.has_work()


def test_detokenizer_emits_only_complete_characters(model_and_tokenizer) -> None:
    tokenizer = model_and_tokenizer[1]
    ids = tokenizer.encode("the 日本 sea")
    detok = Detokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == "the 日本 sea"
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens only completed a character later


def test_stop_matcher_holds_possible_prefixes() -> None:
    stop = StopMatcher(["END", "##"])
    assert stop.feed("abc E") == ("abc ", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("x") == ("ENx", False)
    assert stop.feed("yy#") == ("yy", False)
    assert stop.feed("#zz") == ("", True)
    assert StopMatcher(["END"]).flush() == ""


def test_detokenizer_flush_gives_what_a_whole_decode_gives(model_and_tokenizer) -> None:
    tokenizer = model_and_tokenizer[1]
    ids = tokenizer.encode("the 日本 sea")
    for k in range(1, len(ids) + 1):  # every cut, including ones inside a character
        detok = Detokenizer(tokenizer)
        text = "".join(detok.push(i) for i in ids[:k]) + detok.flush()
        assert text == tokenizer.decode(ids[:k], skip_special_tokens=True)
