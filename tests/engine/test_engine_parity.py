"""Mixed-adapter batches match transformers + PEFT token for token, and logits to 1e-4 (fp32)."""

from __future__ import annotations

import itertools

import pytest
import torch

from gpuworker.engine import EngineRequest
from gpuworker.models import load_backbone

pytestmark = pytest.mark.unit

MAX_TOKENS = 12
LOGIT_STEPS = 3  # compare the prefill logits and the first two (batched, mixed) decode steps
PROMPTS = [
    "hello world, how are you today?",
    "the quick brown fox",
    "write a poem about the sea",
    "please summarise the following text",
    "serverless inference runs many functions",
    "1 2 3 4 5",
    "translate it to french",
    "tenants register functions, invoke them, watch usage and bills.",
]
# 8 requests over the 6 adapters (ranks 8, 16, 32, 64, 128 and all-linear rank 16).
ROUTING = ["r8", "r16", "r32", "r64", "r128", "all16", "r8", "all16"]


@pytest.fixture(scope="module")
def peft_model(assets):
    from peft import PeftModel

    model, _ = load_backbone(assets.backbone)
    names = list(assets.adapters)
    peft = PeftModel.from_pretrained(model, assets.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(assets.adapters[name], adapter_name=name)
    peft.eval()
    return peft


def _peft_generate(peft, adapter: str | None, prompt_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        if adapter is None:
            with peft.disable_adapter():
                out = peft.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
                )
        else:
            peft.set_adapter(adapter)
            out = peft.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
            )
    return out[0, len(prompt_ids) :].tolist()


def _peft_logits(peft, adapter: str, ids: list[int]) -> torch.Tensor:
    peft.set_adapter(adapter)
    with torch.inference_mode():
        return peft(input_ids=torch.tensor([ids])).logits[0, -1]


def _requests(tokenizer) -> list[EngineRequest]:
    return [
        EngineRequest(f"req{i}", adapter, tokenizer.encode(PROMPTS[i]), max_tokens=MAX_TOKENS)
        for i, adapter in enumerate(ROUTING)
    ]


def test_mixed_batch_matches_peft_tokens_and_logits(make_engine, model_and_tokenizer, peft_model, run_all) -> None:
    engine = make_engine(max_batch=8)
    captured: dict[str, list[torch.Tensor]] = {}
    engine.on_logits = lambda ids, logits: [
        captured.setdefault(r, []).append(logits[i].clone()) for i, r in enumerate(ids)
    ]
    requests = _requests(model_and_tokenizer[1])
    for req in requests:
        engine.add_request(req)
    outputs = run_all(engine)
    worst = 0.0
    for req in requests:
        ours = [o.token_id for o in outputs[req.request_id]]
        expected = _peft_generate(peft_model, req.adapter_id, req.prompt_ids)
        assert ours == expected, f"{req.request_id} ({req.adapter_id}) differs from PEFT"
        for step in range(LOGIT_STEPS):
            ref = _peft_logits(peft_model, req.adapter_id, req.prompt_ids + ours[:step])
            worst = max(worst, (captured[req.request_id][step] - ref).abs().max().item())
    print(f"max |logit diff| vs PEFT = {worst:.2e}")
    assert worst < 1e-4, f"max |logit diff| vs PEFT = {worst}"


def test_stacks_are_gathered_once_per_composition(make_engine, model_and_tokenizer) -> None:
    engine = make_engine(max_batch=8)
    for req in _requests(model_and_tokenizer[1]):
        req.max_tokens = 6
        engine.add_request(req)
    engine.step()  # prefill everything: on views of each adapter's weights, nothing stacked yet
    assert engine.stacks.builds == 0, "a cold adapter's first token waited for its stacks"
    engine.step()  # first mixed decode: gathers the stacks
    builds = engine.stacks.builds
    assert builds > 0
    for _ in range(3):
        engine.step()
    assert engine.stacks.builds == builds, "a steady batch re-gathered adapter weights"


def test_requests_joining_mid_batch_match_running_alone(make_engine, model_and_tokenizer, run_all) -> None:
    tokenizer = model_and_tokenizer[1]
    requests = [*_requests(tokenizer)[:6], EngineRequest("base", None, tokenizer.encode("the lazy dog"), MAX_TOKENS)]
    alone = {}
    for req in requests:
        engine = make_engine(max_batch=4)
        engine.add_request(req)
        alone[req.request_id] = [o.token_id for o in run_all(engine)[req.request_id]]

    engine = make_engine(max_batch=4)  # fewer slots than requests: some wait, then join as others leave
    outputs: dict[str, list[int]] = {}
    pending = list(requests)
    for step in range(200):
        if step % 3 == 0 and pending:  # a new arrival every third token
            engine.add_request(pending.pop(0))
        if not engine.has_work() and not pending:
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out.token_id)
        assert engine.num_running() <= 4
    assert outputs == alone


def test_rank_groups_do_not_pad_to_the_largest_rank(make_engine, model_and_tokenizer) -> None:
    engine = make_engine(max_batch=8)
    for req in _requests(model_and_tokenizer[1]):
        engine.add_request(req)
    engine.step()
    engine.step()
    lora = engine._batch.lora
    assert sorted(lora.order) == list(range(8))
    for (_layer, _site), groups in lora.groups.items():
        rows = [(g.start, g.start + g.k * g.m) for g in groups]
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(rows)), "groups overlap"
        for g in groups:
            assert g.a_cat.shape[2] == g.rank * len(g.modules), "a group computes more ranks than its adapters have"
            assert all(b.shape[1] == g.rank for b in g.b)
    qkv_ranks = sorted({g.rank for g in lora.groups[(0, "qkv")]})
    assert qkv_ranks == [8, 16, 64, 128]  # r32 targets only the MLP
