"""Validate a PEFT LoRA folder against its backbone before anything is stored.

A tenant's upload is untrusted, so nothing here imports torch or unpickles anything: the
safetensors header is parsed as the JSON it is, every tensor's name, dtype and shape is
checked against the backbone's shape, and the values are read through numpy straight from
the file's byte ranges. Each failure raises ``InvalidArtifact`` naming the file, the
tensor and the problem.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafaas.artifacts import ADAPTER_OPTIONAL, ADAPTER_REQUIRED
from lorafaas.errors import InvalidArtifact
from lorafaas.llama import LLAMA_MODULES, llama_module_dims
from lorafaas.settings import LimitSettings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Formats that unpickle on load and can run arbitrary code: refused whatever their name.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# dtype -> (numpy dtype of the raw bytes, bytes per element)
_DTYPES = {"F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own cap on header size
# PEFT names tensors base_model.model.model.layers.N.self_attn.q_proj.lora_A[.adapter].weight
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class BackboneSpec:
    """What an adapter is checked against: the backbone's shape and the names it is known by."""

    name: str
    shape: dict
    accepted_names: frozenset[str] = frozenset()  # its name, URI and aliases
    other_names: frozenset[str] = frozenset()  # names of every other registered backbone
    modules: tuple[str, ...] = LLAMA_MODULES

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable linear layer of a Llama block."""
        s = self.shape
        try:
            hidden, heads, kv, inter = (
                s["hidden_size"],
                s["num_attention_heads"],
                s["num_key_value_heads"],
                s["intermediate_size"],
            )
        except KeyError as e:
            raise InvalidArtifact(
                f"backbone '{self.name}' has no {e.args[0]} in its recorded shape; re-register it with its shape"
            ) from e
        return llama_module_dims(hidden, heads, kv, inter, s.get("head_dim"))


@dataclass(frozen=True)
class AdapterSpec:
    """What validation learned about an accepted adapter."""

    rank: int
    target_modules: list[str]
    size_bytes: int
    tensors: int = 0
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def validate_adapter(folder: Path, backbone: BackboneSpec, limits: LimitSettings) -> AdapterSpec:
    """Check a PEFT folder end to end; returns its spec or raises ``InvalidArtifact``."""
    folder = Path(folder)
    files = _check_files(folder, limits)
    config = _read_config(folder / CONFIG_FILE)
    rank, targets, rank_pattern = _check_config(config, backbone, limits)
    tensors = read_safetensors_header(folder / WEIGHTS_FILE)
    _check_tensors(tensors, backbone, rank, targets, rank_pattern, limits)
    _check_finite(folder / WEIGHTS_FILE, tensors)
    size = sum((folder / f).stat().st_size for f in files)
    return AdapterSpec(rank=rank, target_modules=sorted(targets), size_bytes=size, tensors=len(tensors), files=files)


# --- files ------------------------------------------------------------------------------
def _check_files(folder: Path, limits: LimitSettings) -> list[str]:
    if not folder.is_dir():
        raise InvalidArtifact(f"adapter folder {folder.name} does not exist")
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    for name in present:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise InvalidArtifact(
                f"{name}: pickle weights are refused (loading them can run code); save with safe_serialization=True to write {WEIGHTS_FILE}",
                file=name,
            )
    for name in ADAPTER_REQUIRED:
        if name not in present:
            raise InvalidArtifact(f"{name} is missing from the adapter folder", file=name)
    kept = [n for n in (*ADAPTER_REQUIRED, *ADAPTER_OPTIONAL) if n in present]
    size = sum((folder / n).stat().st_size for n in kept)
    if size > limits.max_adapter_bytes:
        raise InvalidArtifact(
            f"{WEIGHTS_FILE}: the adapter is {size} bytes, over the limit of {limits.max_adapter_bytes} bytes",
            file=WEIGHTS_FILE,
        )
    return kept


# --- adapter_config.json ----------------------------------------------------------------
def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArtifact(f"{CONFIG_FILE} cannot be parsed: {e}", file=CONFIG_FILE) from e
    if not isinstance(config, dict):
        raise InvalidArtifact(f"{CONFIG_FILE} must hold a JSON object", file=CONFIG_FILE)
    return config


def _check_config(config: dict, backbone: BackboneSpec, limits: LimitSettings) -> tuple[int, set[str], dict[str, int]]:
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidArtifact(f"{CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not LORA", file=CONFIG_FILE)
    if config.get("use_dora"):
        raise InvalidArtifact(
            f"{CONFIG_FILE}: use_dora=true is not supported; train a plain LoRA adapter", file=CONFIG_FILE
        )
    rank = config.get("r")
    rank_pattern = config.get("rank_pattern") or {}
    ranks = [rank, *rank_pattern.values()] if isinstance(rank_pattern, dict) else [rank]
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= limits.max_adapter_rank:
            raise InvalidArtifact(
                f"{CONFIG_FILE}: rank r={r!r} must be an integer in 1..{limits.max_adapter_rank}", file=CONFIG_FILE
            )
    _check_base_model(config.get("base_model_name_or_path"), backbone)
    targets = _target_modules(config.get("target_modules"), backbone)
    return rank, targets, rank_pattern if isinstance(rank_pattern, dict) else {}


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "\\")) or (len(value) > 2 and value[1] == ":")


def _check_base_model(value: object, backbone: BackboneSpec) -> None:
    """Refuse an adapter trained on a known, different base model.

    PEFT writes a local path (or null) for a locally built backbone, which proves nothing
    either way, so only a *known* name that is not this backbone's is refused: another
    registered backbone, or a Hub id ``org/model``.
    """
    if value is None or value == "" or not isinstance(value, str):
        return
    if value in backbone.accepted_names or _looks_like_path(value):
        return
    if value in backbone.other_names or re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        known = ", ".join(sorted(backbone.accepted_names)) or backbone.name
        raise InvalidArtifact(
            f"{CONFIG_FILE}: base_model_name_or_path {value!r} does not match backbone '{backbone.name}' (known as: {known})",
            file=CONFIG_FILE,
        )


def _target_modules(value: object, backbone: BackboneSpec) -> set[str]:
    if value == "all-linear":
        return set(backbone.modules)
    if isinstance(value, str):  # PEFT treats a string as a regex over module names
        matched = {m for m in backbone.modules if re.fullmatch(value, m) or re.search(rf"(^|\.){value}$", m)}
        if not matched:
            raise InvalidArtifact(
                f"{CONFIG_FILE}: target_modules {value!r} matches no module of backbone '{backbone.name}'",
                file=CONFIG_FILE,
            )
        return matched
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise InvalidArtifact(
            f"{CONFIG_FILE}: target_modules must be a non-empty list of module names", file=CONFIG_FILE
        )
    unknown = sorted(set(value) - set(backbone.modules))
    if unknown:
        raise InvalidArtifact(
            f"{CONFIG_FILE}: target module(s) {unknown} do not exist in backbone '{backbone.name}' (it has {list(backbone.modules)})",
            file=CONFIG_FILE,
        )
    return set(value)


# --- adapter_model.safetensors ----------------------------------------------------------
def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse the header (u64 length + JSON) and check every tensor's bytes lie in the file."""
    name = path.name
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidArtifact(f"{name}: truncated: {size} bytes is shorter than a safetensors header", file=name)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise InvalidArtifact(
                f"{name}: truncated or not safetensors: header of {header_len} bytes in a {size}-byte file", file=name
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArtifact(f"{name}: the safetensors header is not valid JSON: {e}", file=name) from e
    if not isinstance(header, dict):
        raise InvalidArtifact(f"{name}: the safetensors header is not a JSON object", file=name)
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors = [_tensor_info(name, key, entry, data_start, size) for key, entry in header.items()]
    if not tensors:
        raise InvalidArtifact(f"{name}: holds no tensors", file=name)
    return tensors


def _tensor_info(file: str, key: str, entry: object, data_start: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict) or "dtype" not in entry or "shape" not in entry or "data_offsets" not in entry:
        raise InvalidArtifact(f"{file}: tensor {key}: malformed header entry", file=file, tensor=key)
    dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    if dtype not in _DTYPES:
        raise InvalidArtifact(
            f"{file}: tensor {key}: dtype {dtype} is not a float type (F16, BF16, F32, F64)", file=file, tensor=key
        )
    expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
    if end - begin != expected or begin < 0:
        raise InvalidArtifact(
            f"{file}: tensor {key}: {end - begin} bytes for shape {list(shape)} {dtype} (expected {expected})",
            file=file,
            tensor=key,
        )
    if data_start + end > size:
        raise InvalidArtifact(
            f"{file}: truncated: tensor {key} ends at byte {data_start + end} but the file has {size}",
            file=file,
            tensor=key,
        )
    return TensorInfo(key, dtype, shape, data_start + begin, data_start + end)


def _check_tensors(
    tensors: Iterable[TensorInfo],
    backbone: BackboneSpec,
    rank: int,
    targets: set[str],
    rank_pattern: dict[str, int],
    limits: LimitSettings,
) -> None:
    dims = backbone.module_dims()
    layers = int(backbone.shape.get("num_hidden_layers") or 0)
    seen: dict[tuple[int, str], set[str]] = {}
    for t in tensors:
        match = _KEY.match(t.name)
        if match is None:
            raise InvalidArtifact(
                f"{WEIGHTS_FILE}: tensor {t.name}: not a LoRA A/B weight of a Llama linear layer",
                file=WEIGHTS_FILE,
                tensor=t.name,
            )
        layer, module, side = int(match.group(1)), match.group(3), match.group(4)
        if module not in dims:
            raise InvalidArtifact(
                f"{WEIGHTS_FILE}: tensor {t.name}: module {module} does not exist in backbone '{backbone.name}'",
                file=WEIGHTS_FILE,
                tensor=t.name,
            )
        if module not in targets:
            raise InvalidArtifact(
                f"{WEIGHTS_FILE}: tensor {t.name}: module {module} is not in target_modules {sorted(targets)}",
                file=WEIGHTS_FILE,
                tensor=t.name,
            )
        if not 0 <= layer < layers:
            raise InvalidArtifact(
                f"{WEIGHTS_FILE}: tensor {t.name}: layer {layer} does not exist (the backbone has {layers})",
                file=WEIGHTS_FILE,
                tensor=t.name,
            )
        r = _rank_for(t.name, rank, rank_pattern)
        fan_in, fan_out = dims[module]
        expected = (r, fan_in) if side == "A" else (fan_out, r)
        if t.shape != expected:
            what = "r x in" if side == "A" else "out x r"
            raise InvalidArtifact(
                f"{WEIGHTS_FILE}: tensor {t.name}: shape {list(t.shape)} does not match {list(expected)} ({what} for {module} of backbone '{backbone.name}')",
                file=WEIGHTS_FILE,
                tensor=t.name,
            )
        seen.setdefault((layer, module), set()).add(side)
    for (layer, module), sides in sorted(seen.items()):
        if sides != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            raise InvalidArtifact(
                f"{WEIGHTS_FILE}: layer {layer} {module} has no {missing} tensor",
                file=WEIGHTS_FILE,
                tensor=f"layers.{layer}.{module}",
            )


def _rank_for(key: str, rank: int, rank_pattern: dict[str, int]) -> int:
    """PEFT's rank_pattern overrides r for modules whose name ends with a pattern key."""
    module_path = key.split(".lora_", 1)[0]
    for pattern, r in rank_pattern.items():
        if module_path.endswith(pattern) or re.search(rf"(^|\.){pattern}$", module_path):
            return r
    return rank


def _check_finite(path: Path, tensors: list[TensorInfo]) -> None:
    """Every value finite, read in chunks through a memory map (no copy of the whole file)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for t in tensors:
            np_dtype, _width = _DTYPES[t.dtype]
            values = data[t.start : t.end].view(np_dtype)
            for i in range(0, values.size, _CHUNK_ELEMS):
                if not _all_finite(values[i : i + _CHUNK_ELEMS], t.dtype):
                    raise InvalidArtifact(
                        f"{path.name}: tensor {t.name}: holds NaN or infinite values", file=path.name, tensor=t.name
                    )
    finally:
        del data


def _all_finite(chunk: np.ndarray, dtype: str) -> bool:
    if dtype == "BF16":  # numpy has no bfloat16: exponent bits all ones means inf or NaN
        return not bool(np.any((chunk & 0x7F80) == 0x7F80))
    return bool(np.isfinite(chunk).all())
