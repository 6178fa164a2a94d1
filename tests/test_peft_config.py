"""The one adapter-config parser: PEFT's own matching rules, and a named refusal for everything else."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafaas.errors import InvalidArtifact
from lorafaas.llama import LLAMA_MODULES
from lorafaas.peft_config import PeftLoraConfig, _other_modules, module_key

pytestmark = pytest.mark.unit

LAYERS = 2
LINEAR = {module_key(i, m): (i, m) for i in range(LAYERS) for m in LLAMA_MODULES}
A = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.{}.self_attn.q_proj.lora_B.weight"
DIMS = {m: (64, 32) for m in LLAMA_MODULES}


def _config(**changes: object) -> dict:
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **changes}


def test_module_names_are_those_of_a_transformers_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=LAYERS, vocab_size=32, **shape))
    names = {n for n, _ in model.named_modules()} - {""}
    assert names == set(LINEAR) | set(_other_modules(LAYERS))


# --- the same targets, ranks and alphas as PEFT ----------------------------------------------
TARGET_ENTRIES = [*LLAMA_MODULES, "self_attn.q_proj", "mlp.down_proj", "layers.1.mlp.up_proj", module_key(0, "v_proj")]
TARGET_REGEXES = [r".*\.(q|v)_proj", r".*mlp\.(gate|up)_proj", r".*_proj", r"model\.layers\.1\..*", r".*"]
PATTERN_KEYS = ["q_proj", r"mlp\..*", "layers.1.self_attn.v_proj", "down_proj", r"model\.layers\.0\..*", "o_proj"]


@st.composite
def peft_configs(draw: st.DrawFn) -> dict:
    """Config dicts PEFT's LoraConfig accepts, over the options that change which modules are adapted and how."""
    config: dict = {"r": draw(st.integers(1, 16)), "lora_alpha": draw(st.sampled_from([1, 8, 16, 3.5]))}
    kind = draw(st.sampled_from(["list", "regex", "all-linear"]))
    if kind == "list":
        config["target_modules"] = draw(st.lists(st.sampled_from(TARGET_ENTRIES), min_size=1, max_size=4, unique=True))
        layers = draw(st.sampled_from([None, 0, [1], [0, 1]]))
        if layers is not None:
            config["layers_to_transform"] = layers
            config["layers_pattern"] = draw(st.sampled_from([None, "layers"]))
    else:
        config["target_modules"] = draw(st.sampled_from(TARGET_REGEXES)) if kind == "regex" else "all-linear"
    config["exclude_modules"] = draw(
        st.sampled_from([None, ["k_proj"], ["layers.0.mlp.down_proj"], r".*layers\.0\.self_attn\..*"])
    )
    config["rank_pattern"] = draw(st.dictionaries(st.sampled_from(PATTERN_KEYS), st.integers(1, 16), max_size=3))
    config["alpha_pattern"] = draw(st.dictionaries(st.sampled_from(PATTERN_KEYS), st.integers(1, 64), max_size=3))
    config["use_rslora"] = draw(st.booleans())
    return config


def _peft_view(config: dict) -> tuple[set[str], dict[str, tuple[int, float]]]:
    """Which module names PEFT adapts under ``config``, and each linear one's (rank, alpha)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    peft = LoraConfig(**config)
    if peft.target_modules == "all-linear":  # what PEFT's injection expands it to on a Llama
        peft.target_modules = set(LLAMA_MODULES)
    names = [*LINEAR, *_other_modules(LAYERS)]
    chosen = {n for n in names if check_target_module_exists(peft, n) is True or _is_match(peft, n)}
    ranks = {
        n: (
            peft.rank_pattern.get(get_pattern_key(peft.rank_pattern.keys(), n), peft.r),
            peft.alpha_pattern.get(get_pattern_key(peft.alpha_pattern.keys(), n), peft.lora_alpha),
        )
        for n in chosen & set(LINEAR)
    }
    return chosen, ranks


def _is_match(peft: object, name: str) -> bool:
    import re

    from peft.tuners.tuners_utils import check_target_module_exists

    return isinstance(check_target_module_exists(peft, name), re.Match)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(peft_configs())
def test_targets_ranks_and_alphas_are_peft_s(config: dict) -> None:
    chosen, ranks = _peft_view(config)
    try:
        plan = PeftLoraConfig.from_dict(config).plan(LAYERS)
    except InvalidArtifact as e:
        # Refused only where PEFT would adapt something that is not a Llama linear layer, nothing
        # at all, or where a listed module names nothing in the backbone.
        entries = config["target_modules"] if isinstance(config["target_modules"], list) else []
        unknown = [t for t in entries if not any(n == t or n.endswith("." + t) for n in LINEAR)]
        assert chosen - set(LINEAR) or not chosen or unknown, f"refused a config PEFT serves: {e}"
        assert e.details["field"] == "target_modules"
        return
    assert chosen == {module_key(*k) for k in plan.targets}
    for (layer, module), t in plan.targets.items():
        rank, alpha = ranks[module_key(layer, module)]
        assert (t.rank, t.alpha) == (rank, alpha)
        assert t.scaling == pytest.approx(alpha / rank**0.5 if config["use_rslora"] else alpha / rank)


# --- refusals name the field -----------------------------------------------------------------
REFUSED = [
    ({"bias": "all"}, "bias"),
    ({"bias": "lora_only"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"target_parameters": ["mlp.experts.weight"]}, "target_parameters"),
    ({"alora_invocation_tokens": [5]}, "alora_invocation_tokens"),
    ({"use_qalora": True}, "use_qalora"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"lora_alpha": None}, "lora_alpha"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_alpha": True}, "lora_alpha"),
    ({"lora_alpha": "16"}, "lora_alpha"),
    ({"r": 0}, "r"),
    ({"r": 1.5}, "r"),
    ({"r": True}, "r"),
    ({"r": 4096}, "r"),
    ({"r": None}, "r"),
    ({"use_rslora": "yes"}, "use_rslora"),
    ({"target_modules": "("}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": None}, "target_modules"),
    ({"target_modules": [1, 2]}, "target_modules"),
    ({"target_modules": ["lm_head"]}, "target_modules"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "target_modules"),
    ({"target_modules": ["q_proj", "c_attn"]}, "target_modules"),
    ({"target_modules": r"model\.layers\.0\.mlp"}, "target_modules"),
    ({"target_modules": ".*"}, "target_modules"),
    ({"exclude_modules": ["q_proj", "v_proj"]}, "target_modules"),
    ({"exclude_modules": "("}, "exclude_modules"),
    ({"rank_pattern": {"(": 8}}, "rank_pattern"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']"),
    ({"rank_pattern": {"q_proj": 999}}, "rank_pattern['q_proj']"),
    ({"rank_pattern": [8]}, "rank_pattern"),
    ({"rank_pattern": {"": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern['q_proj']"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern['q_proj']"),
    ({"layers_to_transform": "1"}, "layers_to_transform"),
    ({"layers_to_transform": [5]}, "target_modules"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"target_modules": "all-linear", "layers_to_transform": 1}, "layers_to_transform"),
    ({"a_future_feature": {"on": True}}, "a_future_feature"),
]


@pytest.mark.parametrize(("changes", "field"), REFUSED, ids=[str(c) for c, _ in REFUSED])
def test_refusals_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(InvalidArtifact) as info:
        PeftLoraConfig.from_dict(_config(**changes), max_rank=128).plan(LAYERS)
    assert info.value.details["field"] == field
    assert f"adapter_config.json: {field}:" in info.value.message


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"bias": "none", "lora_bias": False, "use_dora": False, "modules_to_save": None, "fan_in_fan_out": True},
        {"init_lora_weights": "gaussian", "lora_dropout": 0.1, "task_type": "CAUSAL_LM", "inference_mode": True},
        {"loftq_config": {}, "eva_config": None, "megatron_core": "megatron.core", "a_future_feature": None},
        {"target_modules": "all-linear", "lora_alpha": 0.5},
        {"target_modules": r".*\.(q|v)_proj", "exclude_modules": r".*layers\.0\..*"},
    ],
)
def test_plain_lora_configs_are_accepted(changes: dict) -> None:
    assert PeftLoraConfig.from_dict(_config(**changes), max_rank=128).plan(LAYERS).targets


def test_rank_pattern_sets_each_module_s_rank_and_scaling() -> None:
    config = _config(
        r=8,
        lora_alpha=16,
        rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 16},
        alpha_pattern={"v_proj": 32},
    )
    plan = PeftLoraConfig.from_dict(config).plan(LAYERS)
    got = {(t.layer, t.module): (t.rank, t.scaling) for t in plan.targets.values()}
    assert got == {
        (0, "q_proj"): (4, 4.0),
        (0, "v_proj"): (8, 4.0),
        (1, "q_proj"): (4, 4.0),
        (1, "v_proj"): (16, 2.0),
    }
    assert plan.max_rank == 16 and plan.modules == ("q_proj", "v_proj")


# --- tensors against the plan ----------------------------------------------------------------
def _q_only_plan(**changes: object):
    return PeftLoraConfig.from_dict(_config(target_modules=["q_proj"], r=4, **changes)).plan(LAYERS)


def _q_tensors(rank: int = 4) -> dict[str, tuple[int, ...]]:
    return {f(i): s for i in range(LAYERS) for f, s in ((A.format, (rank, 64)), (B.format, (32, rank)))}


def test_tensors_pair_up_in_model_order() -> None:
    pairs = _q_only_plan().match_tensors(_q_tensors(), DIMS)
    assert [(p.target.layer, p.a, p.b) for p in pairs] == [(i, A.format(i), B.format(i)) for i in range(LAYERS)]


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda t: t.pop(B.format(1)), "no lora_B tensor"),
        (lambda t: t.update({A.format(0): (8, 64)}), "shape [8, 64] does not match [4, 64]"),
        (lambda t: t.update({A.format(0).replace("q_proj", "k_proj"): (4, 64)}), "is not covered by target_modules"),
        (lambda t: t.update({A.format(0).replace("self_attn", "mlp"): (4, 64)}), "mlp.q_proj does not exist"),
        (lambda t: t.update({A.format(7): (4, 64)}), "layer 7 does not exist"),
        (lambda t: t.update({"model.embed_tokens.weight": (10, 64)}), "not a LoRA A/B weight"),
        (lambda t: t.update({A.format(0).removeprefix("base_model.model."): (4, 64)}), "a second lora_A"),
    ],
)
def test_bad_tensors_are_named(edit, named: str) -> None:
    tensors = _q_tensors()
    edit(tensors)
    with pytest.raises(InvalidArtifact) as info:
        _q_only_plan().match_tensors(tensors, DIMS)
    assert named in info.value.message
    assert info.value.details["tensor"]


def test_rank_pattern_shapes_the_tensors() -> None:
    plan = _q_only_plan(rank_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    tensors = _q_tensors()
    tensors[A.format(1)], tensors[B.format(1)] = (2, 64), (32, 2)
    assert [p.target.rank for p in plan.match_tensors(tensors, DIMS)] == [4, 2]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target_modules": r"(.*){1,30}\d\d"}, "target_modules"),
        ({"rank_pattern": {r"(?:[a-z]|\w|.)*(?:[a-z]|\w|.)*(?:[a-z]|\w|.)*_\d": 4}}, "rank_pattern"),
    ],
)
def test_a_pattern_that_backtracks_for_minutes_is_refused_in_seconds(changes: dict, field: str) -> None:
    import time

    start = time.monotonic()
    with pytest.raises(InvalidArtifact) as info:
        PeftLoraConfig.from_dict(_config(**changes)).plan(80)  # a Llama-70B-deep backbone
    assert info.value.details["field"] == field and "takes too long" in info.value.message
    assert time.monotonic() - start < 30  # with re (as PEFT matches) it runs for minutes
