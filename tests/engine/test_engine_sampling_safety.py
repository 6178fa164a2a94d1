"""One request can no longer freeze the engine (issue 12.1) and the context limit is the backbone's (13.2).

Regressions: temperature 1e-300 / 1e-40 / 2.2e-308 and top_p 1e-50 made ``torch.multinomial``
raise inside ``step()``; an adapter with huge finite weights overflowed the logits to
inf/NaN with the same effect. Now such a request either samples safely (tiny temperatures
are greedy) or fails alone with a reason, and the rest of its batch runs on unchanged.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuworker.engine import AdapterWeights, EngineRequest
from gpuworker.engine.sampling import make_generator, select_tokens
from gpuworker.engine.types import FINISH_ERROR
from lorafaas.errors import InvalidInput

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("temperature", "top_p"), [(1e-300, 1.0), (1e-40, 1.0), (2.2e-308, 0.9), (0.8, 1e-50)])
def test_extreme_sampling_parameters_select_a_token(temperature: float, top_p: float) -> None:
    logits = torch.randn(3, 50) * 30
    gens = [make_generator(7, torch.device("cpu")) for _ in range(3)]
    tokens, failed = select_tokens(logits, [temperature] * 3, [top_p] * 3, gens)
    assert not failed
    assert tokens == logits.argmax(dim=-1).tolist()  # the limit t -> 0 (or top_p -> 0) is the argmax


def test_non_finite_logits_fail_only_their_row() -> None:
    logits = torch.randn(4, 50)
    logits[1, 3] = float("nan")
    logits[2] = float("-inf")
    logits[3, 7] = float("inf")
    gens = [make_generator(1, torch.device("cpu")) for _ in range(4)]
    tokens, failed = select_tokens(logits, [0.0, 0.8, 0.0, 0.8], [1.0] * 4, gens)
    assert set(failed) == {1, 2, 3} and "non-finite" in failed[1]
    assert tokens[0] == int(logits[0].argmax())


@settings(max_examples=60, deadline=None)
@given(
    temperature=st.floats(min_value=0.0, max_value=2.0, allow_subnormal=True),
    top_p=st.floats(min_value=1e-300, max_value=1.0, exclude_min=False),
    scale=st.sampled_from([1.0, 1e10, 1e30, 3e38]),
    seed=st.integers(min_value=-(2**70), max_value=2**70),
)
def test_sampling_never_raises_on_finite_logits(temperature: float, top_p: float, scale: float, seed: int) -> None:
    logits = (torch.randn(2, 40) * scale).clamp(-3e38, 3e38)
    gen = make_generator(seed, torch.device("cpu"))
    tokens, failed = select_tokens(logits, [temperature, 0.0], [top_p, 1.0], [gen, None])
    assert not failed and all(0 <= t < 40 for t in tokens)


def _huge(weights: AdapterWeights) -> AdapterWeights:
    """The same adapter with weights scaled by 1e30: finite, but the LoRA delta overflows float32."""
    return AdapterWeights(weights.flat * 1e30, weights.layout, weights.rank, weights.scaling, "huge")


def test_a_poisoned_request_fails_alone_and_the_batch_goes_on(
    make_engine, model_and_tokenizer, weights, run_all
) -> None:
    tokenizer = model_and_tokenizer[1]
    prompt = tokenizer.encode("hello world, how are you")
    alone = make_engine()
    alone.add_request(EngineRequest("ok", "r16", prompt, max_tokens=6, ignore_eos=True))
    expected = [o.token_id for o in run_all(alone)["ok"]]

    engine = make_engine()
    engine.load_adapter("huge", _huge(weights["r16"]))
    engine.add_request(EngineRequest("ok", "r16", prompt, max_tokens=6, ignore_eos=True))
    engine.add_request(EngineRequest("huge", "huge", prompt, max_tokens=6, temperature=0.8, seed=1))
    engine.add_request(EngineRequest("cold", "r8", prompt, max_tokens=6, temperature=1e-300, seed=2))
    engine.add_request(EngineRequest("narrow", "r8", prompt, max_tokens=6, temperature=0.9, top_p=1e-50))
    outs = run_all(engine)
    assert [o.token_id for o in outs["ok"]] == expected  # untouched by its neighbours' failure
    assert outs["huge"][-1].finish_reason == FINISH_ERROR and "non-finite" in outs["huge"][-1].error
    assert outs["huge"][-1].token_id == -1 and outs["huge"][-1].finished
    for rid in ("cold", "narrow"):
        assert outs[rid][-1].finished and outs[rid][-1].finish_reason != FINISH_ERROR
    assert "huge" in engine.lru_adapters()  # unpinned again: the failed request let go of its adapter
    assert not engine.has_work()


def test_context_limit_is_the_backbones_and_a_domain_error(make_engine, model_and_tokenizer) -> None:
    model = model_and_tokenizer[0]
    engine = make_engine()
    assert engine.max_seq_len == model.config.max_position_embeddings  # one number, from the backbone
    prompt = [5] * (engine.max_seq_len - 4)
    engine.add_request(EngineRequest("fits", "r8", prompt, max_tokens=4))
    with pytest.raises(InvalidInput) as refused:
        engine.add_request(EngineRequest("over", "r8", prompt, max_tokens=5))
    assert refused.value.details["limit"] == engine.max_seq_len
    assert f"context of {engine.max_seq_len} tokens" in refused.value.message
