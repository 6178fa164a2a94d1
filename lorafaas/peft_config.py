"""The one reader of PEFT's ``adapter_config.json`` and of a LoRA adapter's tensor names.

Registration (the control plane) and loading (the engine) both parse through here, so an
adapter accepted at registration is one the engine serves, with the same rank and scaling
per module (as vLLM's ``vllm/lora/peft_helper.py`` is the one parser there). No torch,
no numpy: the control plane reads untrusted uploads with it.

What is served: plain LoRA on the linear layers of a Llama block (q, k, v, o, gate, up,
down projections), with PEFT's ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
``target_modules`` (list, regex string or ``all-linear``), ``exclude_modules`` and
``layers_to_transform``, matched exactly as PEFT 0.21 matches them. Every other feature
that changes what the adapter computes (DoRA, biases, ``modules_to_save``, trainable
tokens, weight-mutating initialisations, ...) is refused with an ``InvalidArtifact`` that
names the field.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

from lorafaas.errors import InvalidArtifact
from lorafaas.llama import ATTN_MODULES, LLAMA_MODULES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_PARENT = {m: "self_attn" for m in ATTN_MODULES} | {m: "mlp" for m in LLAMA_MODULES if m not in ATTN_MODULES}
# Modules of a Llama causal LM (as transformers names them) that are not LoRA-able linear layers here.
_MODEL_LEVEL = ("model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
_NAMES = ", ".join(LLAMA_MODULES)
# Seconds tenant-written patterns may take to match one module name, and all of them every
# module of a backbone (plain patterns take microseconds).
_MATCH_BUDGET_S = 0.05
_PLAN_BUDGET_S = 2.0
_deadline: ContextVar[float] = ContextVar("peft_config_deadline", default=math.inf)
_LAYER_LEVEL = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm")

# Fields that do not change what the adapter computes at inference (or only configure a
# feature whose switch is checked below).
_INERT = frozenset(
    {
        "base_model_name_or_path",
        "revision",
        "task_type",
        "peft_type",
        "peft_version",
        "inference_mode",
        "auto_mapping",
        "lora_dropout",
        "fan_in_fan_out",  # PEFT ignores it on nn.Linear (Llama's layers)
        "megatron_config",
        "megatron_core",
        "qalora_group_size",
        "runtime_config",
        "ensure_weight_tying",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
    }
)
# Features this platform does not serve: field -> the values that mean "not used".
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "bias": ("none", None),
    "lora_bias": (False, None),
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "arrow_config": (None, {}),
    "use_bdlora": (None, False, {}),
    "velora_config": (None, {}),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
    "target_modules_to_tie": (None, []),
    "modules_to_tie": (None, []),
}
# Initialisations that leave the base model's weights as they are (the others, PiSSA,
# OLoRA, LoftQ, EVA, CorDA, ..., change the base weights and need their own backbone).
_PLAIN_INITS = (True, False, None, "gaussian", "orthogonal")
_PARSED = frozenset(
    {
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "init_lora_weights",
    }
)
# PEFT names tensors base_model.model.model.layers.N.self_attn.q_proj.lora_A[.adapter].weight
_TENSOR_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


def module_key(layer: int, module: str) -> str:
    """The module's name in a Llama causal LM, the key PEFT matches its patterns against."""
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


def _other_modules(num_layers: int) -> list[str]:
    return [*_MODEL_LEVEL, *(f"model.layers.{i}{s}" for i in range(num_layers) for s in _LAYER_LEVEL)]


def _fail(field: str, problem: str) -> InvalidArtifact:
    return InvalidArtifact(f"{CONFIG_FILE}: {field}: {problem}", file=CONFIG_FILE, field=field)


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-adapted linear layer: its rank and the factor its delta is scaled by."""

    layer: int
    module: str
    rank: int
    alpha: float
    scaling: float


@dataclass(frozen=True)
class TensorPair:
    """The names of one target's A (rank x in) and B (out x rank) tensors."""

    target: LoraTarget
    a: str
    b: str


@dataclass(frozen=True)
class LoraPlan:
    """What an adapter does to a backbone of ``num_layers`` Llama blocks, per (layer, module)."""

    targets: dict[tuple[int, str], LoraTarget]
    num_layers: int

    @property
    def max_rank(self) -> int:
        """The largest rank of any module: what a batch computes for this adapter."""
        return max(t.rank for t in self.targets.values())

    @property
    def modules(self) -> tuple[str, ...]:
        """The module types the adapter targets, in block order."""
        return tuple(m for m in LLAMA_MODULES if any(k[1] == m for k in self.targets))

    def match_tensors(
        self, shapes: Mapping[str, Sequence[int]], dims: Mapping[str, tuple[int, int]]
    ) -> list[TensorPair]:
        """Check tensor names and shapes against the plan: exactly one A and one B per target, nothing else.

        ``shapes`` maps each tensor name to its shape; ``dims`` each module to (in, out).
        Returns the pairs in model order; raises ``InvalidArtifact`` naming the tensor.
        """
        halves: dict[tuple[int, str], dict[str, str]] = {}
        for name, shape in shapes.items():
            target, side = self._target_of(name)
            fan_in, fan_out = dims[target.module]
            expected = (target.rank, fan_in) if side == "A" else (fan_out, target.rank)
            if tuple(shape) != expected:
                what = "rank x in" if side == "A" else "out x rank"
                raise _tensor_error(name, f"shape {list(shape)} does not match {list(expected)} ({what})")
            pair = halves.setdefault((target.layer, target.module), {})
            if side in pair:
                raise _tensor_error(name, f"a second lora_{side} for layer {target.layer} {target.module}")
            pair[side] = name
        pairs = []
        for key in sorted(self.targets, key=lambda k: (k[0], LLAMA_MODULES.index(k[1]))):
            found = halves.get(key, {})
            for side in ("A", "B"):
                if side not in found:
                    raise _tensor_error(
                        f"layers.{key[0]}.{key[1]}",
                        f"no lora_{side} tensor, though target_modules covers {module_key(*key)}",
                    )
            pairs.append(TensorPair(self.targets[key], found["A"], found["B"]))
        return pairs

    def _target_of(self, name: str) -> tuple[LoraTarget, str]:
        match = _TENSOR_KEY.match(name)
        if match is None:
            raise _tensor_error(name, "not a LoRA A/B weight of a Llama linear layer")
        layer, parent, module, side = int(match[1]), match[2], match[3], match[4]
        if _PARENT.get(module) != parent:
            raise _tensor_error(name, f"module {parent}.{module} does not exist in a Llama block")
        if layer >= self.num_layers:
            raise _tensor_error(name, f"layer {layer} does not exist (the backbone has {self.num_layers})")
        target = self.targets.get((layer, module))
        if target is None:
            raise _tensor_error(name, f"module {module_key(layer, module)} is not covered by target_modules")
        return target, side


def _tensor_error(name: str, problem: str) -> InvalidArtifact:
    return InvalidArtifact(f"{WEIGHTS_FILE}: tensor {name}: {problem}", file=WEIGHTS_FILE, tensor=name)


@dataclass(frozen=True)
class PeftLoraConfig:
    """A parsed, legal ``adapter_config.json`` of a plain LoRA adapter."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    exclude_modules: tuple[str, ...] | str | None
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None

    @classmethod
    def from_file(cls, path: Path, max_rank: int | None = None) -> PeftLoraConfig:
        """Read and parse ``adapter_config.json``; see ``from_dict``."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise InvalidArtifact(f"{CONFIG_FILE} is missing from the adapter folder", file=CONFIG_FILE) from e
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InvalidArtifact(f"{CONFIG_FILE} cannot be parsed: {e}", file=CONFIG_FILE) from e
        return cls.from_dict(raw, max_rank)

    @classmethod
    def from_dict(cls, raw: object, max_rank: int | None = None) -> PeftLoraConfig:
        """Parse a config and refuse what the engine cannot serve exactly as PEFT would.

        ``max_rank`` bounds ``r`` and every ``rank_pattern`` value (registration passes the
        platform's limit). Raises ``InvalidArtifact`` naming the field.
        """
        if not isinstance(raw, dict):
            raise InvalidArtifact(f"{CONFIG_FILE} must hold a JSON object", file=CONFIG_FILE)
        _check_features(raw)
        targets = _target_modules(raw.get("target_modules"))
        layers = _layers_to_transform(raw.get("layers_to_transform"))
        layers_pattern = _string_list("layers_pattern", raw.get("layers_pattern"), allow_str=True)
        for pattern in layers_pattern or ():
            _regex("layers_pattern", pattern, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.")
        if isinstance(raw.get("target_modules"), str) and (layers is not None or layers_pattern is not None):
            raise _fail("layers_to_transform", "cannot be used when target_modules is a regex string (PEFT refuses it)")
        if layers_pattern and layers is None:
            raise _fail("layers_pattern", "needs layers_to_transform (PEFT refuses it alone)")
        base = raw.get("base_model_name_or_path")
        return cls(
            r=_rank("r", raw.get("r"), max_rank),
            lora_alpha=_alpha("lora_alpha", raw.get("lora_alpha")),
            use_rslora=_flag("use_rslora", raw.get("use_rslora", False)),
            target_modules=targets,
            exclude_modules=_exclude_modules(raw.get("exclude_modules")),
            layers_to_transform=layers,
            layers_pattern=layers_pattern,
            rank_pattern={k: _rank(f"rank_pattern[{k!r}]", v, max_rank) for k, v in _patterns("rank_pattern", raw)},
            alpha_pattern={k: _alpha(f"alpha_pattern[{k!r}]", v) for k, v in _patterns("alpha_pattern", raw)},
            base_model_name_or_path=base if isinstance(base, str) else None,
        )

    # -- matching against a Llama backbone (PEFT's check_target_module_exists) -------------------
    def plan(self, num_layers: int) -> LoraPlan:
        """Every (layer, module) the config targets on a backbone of ``num_layers`` blocks.

        Refuses a target that names something other than a linear layer of a Llama block
        (``lm_head``, the embeddings, a whole block) and list entries that match nothing.
        """
        token = _deadline.set(time.monotonic() + _PLAN_BUDGET_S)
        try:
            return self._plan(num_layers)
        finally:
            _deadline.reset(token)

    def _plan(self, num_layers: int) -> LoraPlan:
        keys = {(i, m): module_key(i, m) for i in range(num_layers) for m in LLAMA_MODULES}
        chosen = {k for k, name in keys.items() if self._targets(name)}
        others = sorted(name for name in _other_modules(num_layers) if self._targets(name))
        if others:
            raise _fail(
                "target_modules",
                f"covers {others[0]}, which is not a LoRA-able linear layer of a Llama block ({_NAMES})",
            )
        if isinstance(self.target_modules, tuple):
            for entry in self.target_modules:
                if not any(n == entry or n.endswith("." + entry) for n in keys.values()):
                    raise _fail("target_modules", f"module {entry!r} does not exist in the backbone (it has {_NAMES})")
        if not chosen:
            raise _fail("target_modules", "covers no linear layer of the backbone")
        return LoraPlan({k: self._target(*k) for k in sorted(chosen)}, num_layers)

    def _target(self, layer: int, module: str) -> LoraTarget:
        key = module_key(layer, module)
        rank = self.rank_pattern.get(_pattern_key("rank_pattern", self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key("alpha_pattern", self.alpha_pattern, key), self.lora_alpha)
        # PEFT's LoraLayer.update_layer: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA.
        scaling = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        return LoraTarget(layer, module, rank, alpha, scaling)

    def _targets(self, key: str) -> bool:
        if self._excluded(key):
            return False
        if isinstance(self.target_modules, str):
            return _matches("target_modules", self.target_modules, key)
        if not (key in self.target_modules or any(key.endswith("." + t) for t in self.target_modules)):
            return False
        return self.layers_to_transform is None or _layer_index(key, self.layers_pattern) in self.layers_to_transform

    def _excluded(self, key: str) -> bool:
        if self.exclude_modules is None:
            return False
        if isinstance(self.exclude_modules, str):
            return _matches("exclude_modules", self.exclude_modules, key)
        return key in self.exclude_modules or any(key.endswith("." + e) for e in self.exclude_modules)


def _matches(field: str, pattern: str, key: str, whole: bool = True) -> bool:
    """``re.fullmatch`` (or ``re.match``) of a tenant's pattern, with a time budget.

    A pattern such as ``(.*)*(.*)*x`` backtracks for minutes on one module name; PEFT would
    hang on it too, and here it would hold a control-plane thread. The ``regex`` module
    matches as ``re`` does (patterns are also compiled with ``re`` first) but can stop.
    """
    try:
        found = (regex.fullmatch if whole else regex.match)(pattern, key, timeout=_budget())
    except TimeoutError as e:
        raise _fail(field, f"{pattern!r} takes too long to match the module names; write a simpler pattern") from e
    except regex.error as e:
        raise _fail(field, f"{pattern!r} is not a valid regular expression: {e}") from e
    return found is not None


def _budget() -> float:
    """Seconds the next match may take: what is left of the plan's budget, at most one match's."""
    left = _deadline.get() - time.monotonic()
    if left <= 0:
        raise TimeoutError("the plan's time budget is spent")
    return min(left, _MATCH_BUDGET_S)


def _pattern_key(field: str, patterns: Mapping[str, object], key: str) -> str:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module name."""
    for pattern in patterns:
        if _matches(field, rf"(.*\.)?({pattern})$", key, whole=False):
            return pattern
    return key


def _layer_index(key: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """The block index PEFT reads from a module name (the first numbered segment)."""
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in layers_pattern:
            try:
                match = regex.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, timeout=_budget())
            except (TimeoutError, regex.error) as e:
                raise _fail("layers_pattern", f"{pattern!r} cannot be matched against module names: {e}") from e
            if match is not None:
                break
    return int(match["idx"]) if match else None


# -- field parsers ---------------------------------------------------------------------------
def _check_features(raw: dict) -> None:
    peft_type = raw.get("peft_type", "LORA")
    if peft_type not in ("LORA", None):
        raise _fail("peft_type", f"{peft_type!r} is not LORA; only LoRA adapters are served")
    for name, off in _UNSUPPORTED.items():
        if name in raw and not any(_same(raw[name], v) for v in off):
            raise _fail(name, f"{raw[name]!r} is not supported; train a plain LoRA adapter without it")
    init = raw.get("init_lora_weights", True)
    if not any(_same(init, v) for v in _PLAIN_INITS):
        raise _fail(
            "init_lora_weights",
            f"{init!r} changes the base model's weights; convert the adapter to plain LoRA before saving",
        )
    if raw.get("loftq_config") and init == "loftq":
        raise _fail("loftq_config", "LoftQ adapters need their quantised backbone")
    for name in sorted(set(raw) - _INERT - _PARSED - set(_UNSUPPORTED)):
        if raw[name] not in (None, False, "", [], {}):
            raise _fail(name, f"{raw[name]!r}: this field is not understood; remove it or leave it unset")


def _same(value: object, reference: object) -> bool:
    """Equality that tells booleans from numbers (True == 1 in Python)."""
    return type(value) is type(reference) and value == reference


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rank(field: str, value: object, max_rank: int | None) -> int:
    top = max_rank if max_rank is not None else 1 << 16
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise _fail(field, f"rank {value!r} must be an integer in 1..{top}")
    return value


def _alpha(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field, f"{value!r} must be a positive number up to 1e6")
    if not 0 < value <= 1e6:
        raise _fail(field, f"{value!r} must be a positive number up to 1e6")
    return float(value)


def _flag(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, f"{value!r} must be true or false")
    return value


def _regex(field: str, pattern: str, used_as: str | None = None) -> None:
    """Refuse a pattern that does not compile (as itself, or inside ``used_as``)."""
    try:
        re.compile(used_as or pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise _fail(field, f"{pattern!r} is not a valid regular expression: {e}") from e


def _patterns(field: str, raw: dict) -> list[tuple[str, Any]]:
    value = raw.get(field)
    if value is None:
        return []
    if not isinstance(value, dict):
        raise _fail(field, f"must be an object of module pattern -> value, got {value!r}")
    for key in value:
        if not key:
            raise _fail(field, "an empty pattern matches every module; name the modules")
        _regex(field, key, rf"(.*\.)?({key})$")
    return list(value.items())


def _string_list(field: str, value: object, allow_str: bool) -> tuple[str, ...] | None:
    if value is None:
        return None
    if allow_str and isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _fail(field, f"must be a list of module names, got {value!r}")
    return tuple(value)


def _target_modules(value: object) -> tuple[str, ...] | str:
    if value is None:
        raise _fail("target_modules", "is missing; name the modules the adapter adapts")
    if value == "all-linear":  # PEFT expands it to every linear layer except the output layer
        return LLAMA_MODULES
    if isinstance(value, str):  # PEFT matches a string as a regex over full module names
        _regex("target_modules", value)
        return value
    names = _string_list("target_modules", value, allow_str=False)
    if not names:
        raise _fail("target_modules", "is empty; name the modules the adapter adapts")
    return names


def _exclude_modules(value: object) -> tuple[str, ...] | str | None:
    if isinstance(value, str):
        _regex("exclude_modules", value)
        return value
    return _string_list("exclude_modules", value, allow_str=False) or None


def _layers_to_transform(value: object) -> tuple[int, ...] | None:
    if value is None or value == []:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise _fail("layers_to_transform", f"must be a layer index or a list of them, got {value!r}")
    return tuple(value)
