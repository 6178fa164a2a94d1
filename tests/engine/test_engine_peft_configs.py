"""Whatever registration accepts, the engine loads and serves as PEFT does (issue 13.1).

Adapters are built with PEFT itself (``LoraConfig`` + ``get_peft_model`` + ``save_pretrained``)
over the options real adapters carry: per-module ranks and alphas (``rank_pattern``,
``alpha_pattern``), rank-stabilised scaling, every linear module of a Llama block, targets
as a list, a regex or ``all-linear``, restricted to some layers. Each is validated as the
control plane validates an upload, loaded by the engine beside other adapters, and its
logits compared with the PEFT model's over a prefill and two batched decode steps.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from controlplane.services.validation import BackboneSpec, validate_adapter
from gpuworker.engine import AdapterWeights, EngineRequest, LoraEngine
from lorafaas.llama import LLAMA_MODULES
from lorafaas.settings import LimitSettings

pytestmark = pytest.mark.unit

STEPS = 3  # prefill + two decode steps
PROMPTS = ["hello world, how are you today?", "the quick brown fox", "write a poem about the sea"]
PATTERN_KEYS = ["q_proj", "v_proj", r"mlp\.down_proj", r"layers\.1\.self_attn\.o_proj", "gate_proj", "k_proj"]
TARGET_REGEXES = [r".*\.(q|k|v|o)_proj", r".*mlp\.(gate|up|down)_proj", r"model\.layers\.0\..*_proj"]


@st.composite
def lora_configs(draw: st.DrawFn) -> dict:
    """LoraConfig arguments of plain LoRA adapters on a Llama: all of them must be registered and served."""
    config: dict = {"r": draw(st.sampled_from([2, 4, 8, 16])), "lora_alpha": draw(st.sampled_from([4, 16, 3.5]))}
    kind = draw(st.sampled_from(["list", "regex", "all-linear"]))
    if kind == "list":
        config["target_modules"] = draw(st.lists(st.sampled_from(LLAMA_MODULES), min_size=1, max_size=7, unique=True))
        config["layers_to_transform"] = draw(st.sampled_from([None, None, [0], [1]]))
    else:
        config["target_modules"] = draw(st.sampled_from(TARGET_REGEXES)) if kind == "regex" else "all-linear"
    config["rank_pattern"] = draw(st.dictionaries(st.sampled_from(PATTERN_KEYS), st.sampled_from([2, 4, 8, 32])))
    config["alpha_pattern"] = draw(st.dictionaries(st.sampled_from(PATTERN_KEYS), st.sampled_from([2, 8, 32])))
    config["use_rslora"] = draw(st.booleans())
    return config


def _peft_adapter(model, config: dict, folder: Path, seed: int):
    """A PEFT model with random (non-zero) LoRA weights under ``config``, saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(lora_dropout=0.0, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5 / param.shape[1] ** 0.5)
    peft.eval()
    peft.save_pretrained(folder)
    return peft


def _backbone_spec(model) -> BackboneSpec:
    c = model.config
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers")
    return BackboneSpec("tiny", {k: getattr(c, k) for k in keys})


@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: the assertion names the config
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(config={"r": 16, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 8}})
@example(
    config={
        "r": 8,
        "lora_alpha": 16,
        "target_modules": "all-linear",
        "rank_pattern": {r"mlp\.down_proj": 32, "q_proj": 2},
        "alpha_pattern": {"v_proj": 32},
        "use_rslora": True,
    }
)
@given(config=lora_configs())
def test_what_registration_accepts_the_engine_serves_like_peft(
    config: dict, model_and_tokenizer, weights, tmp_path_factory
) -> None:
    model, tokenizer = model_and_tokenizer
    folder = tmp_path_factory.mktemp("peft-config")
    peft = _peft_adapter(model, config, folder, seed=len(str(config)))

    spec = validate_adapter(folder, _backbone_spec(model), LimitSettings())  # what registration runs
    loaded = AdapterWeights.from_peft_folder(folder, model.config)
    assert spec.rank == loaded.rank and tuple(spec.target_modules) == loaded.target_modules

    engine = LoraEngine(model, tokenizer, max_batch=4)
    for name in ("new", "all16", "r8"):  # co-batched with adapters of other ranks and modules
        engine.load_adapter(name, loaded if name == "new" else weights[name])
    captured: dict[str, list[torch.Tensor]] = {}
    engine.on_logits = lambda ids, logits: [
        captured.setdefault(r, []).append(logits[i].clone()) for i, r in enumerate(ids)
    ]
    requests = [
        EngineRequest("a", "new", tokenizer.encode(PROMPTS[0]), max_tokens=STEPS, ignore_eos=True),
        EngineRequest("b", "all16", tokenizer.encode(PROMPTS[1]), max_tokens=STEPS, ignore_eos=True),
        EngineRequest("c", "new", tokenizer.encode(PROMPTS[2]), max_tokens=STEPS, ignore_eos=True),
        EngineRequest("d", "r8", tokenizer.encode(PROMPTS[1]), max_tokens=STEPS, ignore_eos=True),
    ]
    for req in requests:
        engine.add_request(req)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)

    worst = 0.0
    for req in requests[0], requests[2]:
        for step in range(STEPS):
            ids = torch.tensor([req.prompt_ids + tokens[req.request_id][:step]])
            with torch.inference_mode():
                ref = peft(input_ids=ids).logits[0, -1]
            worst = max(worst, (captured[req.request_id][step] - ref).abs().max().item())
    assert worst < 1e-4, f"max |logit diff| vs PEFT = {worst} for {config}"
