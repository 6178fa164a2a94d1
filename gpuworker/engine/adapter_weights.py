"""Parse and validate a PEFT LoRA folder into one flat host vector the page pool can hold.

Everything a tenant uploads is untrusted: only safetensors are read (a ``.bin`` is a
pickle and can run code on load), and every config field, tensor name, shape and value is
checked against the backbone before a byte reaches the device. Problems raise
``InvalidArtifact`` naming the file, the tensor and what is wrong.

Packed layout: for each targeted (layer, module) in model order, A (r x in) then B
(out x r), row-major. The engine keeps only this vector plus the offsets in ``layout``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafaas.errors import InvalidArtifact
from lorafaas.llama import ATTN_MODULES, LLAMA_MODULES, MLP_MODULES, llama_module_dims

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")

MODULES = LLAMA_MODULES
_PARENT = {m: "self_attn" for m in ATTN_MODULES} | {m: "mlp" for m in MLP_MODULES}

# PEFT names tensors base_model.model.model.layers.N.self_attn.q_proj.lora_A[.adapter].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


def module_dims(config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-targetable linear layer of a Llama config."""
    return llama_module_dims(
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        getattr(config, "head_dim", None),
    )


@dataclass(frozen=True)
class LoraSlice:
    """Where one (layer, module)'s A and B live inside the packed vector."""

    layer: int
    module: str
    in_features: int
    out_features: int
    a_offset: int
    b_offset: int


class AdapterWeights:
    """A validated LoRA adapter on the host: one flat tensor plus its layout."""

    def __init__(
        self, flat: torch.Tensor, layout: tuple[LoraSlice, ...], rank: int, scaling: float, source: str = ""
    ) -> None:
        self.flat = flat
        self.layout = layout
        self.rank = rank
        self.scaling = scaling
        self.source = source
        self.target_modules: tuple[str, ...] = tuple(m for m in MODULES if any(s.module == m for s in layout))

    @property
    def numel(self) -> int:
        return self.flat.numel()

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def pin_memory(self) -> AdapterWeights:
        """Page-lock the host copy so host->device copies are async; a no-op without CUDA."""
        if torch.cuda.is_available() and not self.flat.is_pinned():
            self.flat = self.flat.pin_memory()
        return self

    def lora_pair(
        self, layer: int, module: str, flat: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views (A r x in, B out x r) of one (layer, module) inside ``flat`` (default: the host copy)."""
        flat = self.flat if flat is None else flat
        for s in self.layout:
            if s.layer == layer and s.module == module:
                a = flat[s.a_offset : s.a_offset + self.rank * s.in_features].view(self.rank, s.in_features)
                b = flat[s.b_offset : s.b_offset + s.out_features * self.rank].view(s.out_features, self.rank)
                return a, b
        return None

    @classmethod
    def from_peft_folder(cls, folder: Path, model_config: Any) -> AdapterWeights:
        """Read adapter_config.json + adapter_model.safetensors and validate them against the backbone."""
        folder = Path(folder)
        cfg = _read_config(folder / CONFIG_FILE)
        rank, scaling = _rank_and_scaling(cfg, folder / CONFIG_FILE)
        _check_targets(cfg.get("target_modules"), model_config, folder / CONFIG_FILE)
        tensors = _read_tensors(folder)
        pairs = _group_pairs(tensors, model_config, folder / WEIGHTS_FILE)
        _check_pairs(pairs, rank, model_config, folder / WEIGHTS_FILE)
        flat, layout = _pack(pairs, model_config)
        return cls(flat, layout, rank, scaling, source=str(folder))


# -- config ---------------------------------------------------------------------------------
def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidArtifact(f"{path.name} is missing from the adapter folder", file=str(path))
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArtifact(f"{path.name} is not valid JSON: {e}", file=str(path)) from e
    if not isinstance(cfg, dict):
        raise InvalidArtifact(f"{path.name} must hold a JSON object", file=str(path))
    unsupported = {
        "peft_type": cfg.get("peft_type", "LORA") not in ("LORA", None),
        "use_dora": bool(cfg.get("use_dora")),
        "bias": cfg.get("bias", "none") not in ("none", None) or bool(cfg.get("lora_bias")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise InvalidArtifact(f"{path.name}: {key}={cfg.get(key)!r} is not supported by the engine", file=str(path))
    return cfg


def _rank_and_scaling(cfg: dict[str, Any], path: Path) -> tuple[int, float]:
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InvalidArtifact(f"{path.name}: r must be a positive integer, got {r!r}", file=str(path))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidArtifact(f"{path.name}: lora_alpha must be a positive number, got {alpha!r}", file=str(path))
    # PEFT: scaling = alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA.
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, float(scaling)


def _backbone_module_names(model_config: Any) -> list[str]:
    return [f"model.layers.{i}.{_PARENT[m]}.{m}" for i in range(model_config.num_hidden_layers) for m in MODULES]


def _check_targets(targets: Any, model_config: Any, path: Path) -> None:
    """Every target the config names must exist in the backbone (PEFT's list, regex and all-linear forms)."""
    if targets is None:
        raise InvalidArtifact(f"{path.name}: target_modules is missing", file=str(path))
    if targets == "all-linear":
        return
    names = _backbone_module_names(model_config)
    if isinstance(targets, str):
        # PEFT treats a string as a regex matched against full module names.
        if not any(re.fullmatch(targets, n) for n in names):
            raise InvalidArtifact(
                f"{path.name}: target_modules regex {targets!r} matches no backbone module", file=str(path)
            )
        return
    if not isinstance(targets, list) or not targets:
        raise InvalidArtifact(f"{path.name}: target_modules must be a non-empty list, got {targets!r}", file=str(path))
    for target in targets:
        if not isinstance(target, str) or not any(n == target or n.endswith("." + target) for n in names):
            raise InvalidArtifact(
                f"{path.name}: unknown target module {target!r}; the backbone has {', '.join(MODULES)}", file=str(path)
            )


# -- tensors --------------------------------------------------------------------------------
def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
        if pickles:
            raise InvalidArtifact(
                f"{pickles[0]} is a pickle and is refused (it can run code on load); upload {WEIGHTS_FILE}",
                file=str(folder / pickles[0]),
            )
        raise InvalidArtifact(f"{WEIGHTS_FILE} is missing from the adapter folder", file=str(path))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InvalidArtifact(f"{WEIGHTS_FILE} cannot be read (truncated or corrupt): {e}", file=str(path)) from e
    if not tensors:
        raise InvalidArtifact(f"{WEIGHTS_FILE} holds no tensors", file=str(path))
    return tensors


def _group_pairs(
    tensors: dict[str, torch.Tensor], model_config: Any, path: Path
) -> dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]]:
    """Map each tensor to its (layer, module) and A/B, refusing names the backbone lacks."""
    pairs: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        match = _KEY.match(name)
        if match is None:
            raise InvalidArtifact(
                f"{path.name}: tensor {name!r} is not a LoRA A/B weight of a decoder layer", file=str(path), tensor=name
            )
        layer, parent, module, which = int(match[1]), match[2], match[3], match[4]
        if module not in _PARENT or _PARENT[module] != parent:
            raise InvalidArtifact(
                f"{path.name}: tensor {name!r} targets unknown module {parent}.{module}", file=str(path), tensor=name
            )
        if layer >= model_config.num_hidden_layers:
            raise InvalidArtifact(
                f"{path.name}: tensor {name!r} targets layer {layer}; the backbone has {model_config.num_hidden_layers}",
                file=str(path),
                tensor=name,
            )
        pairs.setdefault((layer, module), {})[which] = (name, tensor)
    return pairs


def _check_pairs(
    pairs: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]], rank: int, model_config: Any, path: Path
) -> None:
    """Both halves present, shapes A: r x in and B: out x r, floating point, finite."""
    dims = module_dims(model_config)
    for (_layer, module), halves in pairs.items():
        fan_in, fan_out = dims[module]
        expected = {"A": (rank, fan_in), "B": (fan_out, rank)}
        for which in ("A", "B"):
            if which not in halves:
                other = next(iter(halves.values()))[0]
                raise InvalidArtifact(
                    f"{path.name}: lora_{which} is missing for {other!r}", file=str(path), tensor=other
                )
            name, tensor = halves[which]
            if not tensor.is_floating_point():
                raise InvalidArtifact(
                    f"{path.name}: tensor {name!r} has dtype {tensor.dtype}, not floating point",
                    file=str(path),
                    tensor=name,
                )
            if tuple(tensor.shape) != expected[which]:
                raise InvalidArtifact(
                    f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected[which]}",
                    file=str(path),
                    tensor=name,
                )
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidArtifact(
                    f"{path.name}: tensor {name!r} holds NaN or Inf values", file=str(path), tensor=name
                )


def _pack(
    pairs: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]], model_config: Any
) -> tuple[torch.Tensor, tuple[LoraSlice, ...]]:
    """Concatenate A and B of each (layer, module), in model order, into one flat vector."""
    dims = module_dims(model_config)
    dtypes = {t.dtype for halves in pairs.values() for _, t in halves.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    order = sorted(pairs, key=lambda lm: (lm[0], MODULES.index(lm[1])))
    chunks: list[torch.Tensor] = []
    layout: list[LoraSlice] = []
    offset = 0
    for layer, module in order:
        a, b = pairs[(layer, module)]["A"][1], pairs[(layer, module)]["B"][1]
        layout.append(LoraSlice(layer, module, dims[module][0], dims[module][1], offset, offset + a.numel()))
        chunks += [a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)]
        offset += a.numel() + b.numel()
    return torch.cat(chunks), tuple(layout)
