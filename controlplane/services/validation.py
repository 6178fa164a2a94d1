"""Validate a PEFT LoRA folder against its backbone before anything is stored.

A tenant's upload is untrusted, so nothing here imports torch or unpickles anything:
``adapter_config.json`` and the tensor names and shapes are checked by
``lorafaas.peft_config`` (the same parser the engine loads with, so what is accepted here
is served there), the safetensors header is parsed as the JSON it is under the same rules
the safetensors library applies on load, and the values are read through numpy straight
from the file's byte ranges. Each failure raises ``InvalidArtifact`` naming the file, the
tensor or field, and the problem.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafaas.artifacts import ADAPTER_OPTIONAL, ADAPTER_REQUIRED
from lorafaas.errors import InvalidArtifact
from lorafaas.llama import llama_module_dims
from lorafaas.peft_config import CONFIG_FILE, WEIGHTS_FILE, PeftLoraConfig
from lorafaas.settings import LimitSettings

# Formats that unpickle on load and can run arbitrary code: refused whatever their name.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# dtype -> (numpy dtype of the raw bytes, bytes per element)
_DTYPES = {"F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own cap on header size
_MAX_DIMS = 8  # a LoRA tensor has 2; bounds the work a hostile header can ask for
_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class BackboneSpec:
    """What an adapter is checked against: the backbone's shape and the names it is known by."""

    name: str
    shape: dict
    accepted_names: frozenset[str] = frozenset()  # its name, URI and aliases
    other_names: frozenset[str] = frozenset()  # names of every other registered backbone

    def num_layers(self) -> int:
        """How many Llama blocks the backbone has (from its recorded shape)."""
        layers = self.shape.get("num_hidden_layers")
        if not isinstance(layers, int) or layers < 1:
            raise InvalidArtifact(
                f"backbone '{self.name}' has no num_hidden_layers in its recorded shape; re-register it with its shape"
            )
        return layers

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
    config = PeftLoraConfig.from_file(folder / CONFIG_FILE, max_rank=limits.max_adapter_rank)
    _check_base_model(config.base_model_name_or_path, backbone)
    plan = config.plan(backbone.num_layers())
    tensors = read_safetensors_header(folder / WEIGHTS_FILE)
    plan.match_tensors({t.name: t.shape for t in tensors}, backbone.module_dims())
    _check_finite(folder / WEIGHTS_FILE, tensors)
    size = sum((folder / f).stat().st_size for f in files)
    return AdapterSpec(
        rank=plan.max_rank, target_modules=list(plan.modules), size_bytes=size, tensors=len(tensors), files=files
    )


# --- files ------------------------------------------------------------------------------
def _check_files(folder: Path, limits: LimitSettings) -> list[str]:
    if not folder.is_dir():
        raise InvalidArtifact(f"adapter folder {folder.name} does not exist")
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    for name in present:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise InvalidArtifact(
                f"{name}: pickle weights are refused (loading them can run code); "
                f"save with safe_serialization=True to write {WEIGHTS_FILE}",
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


# --- adapter_config.json: which backbone it was trained on -------------------------------
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
            f"{CONFIG_FILE}: base_model_name_or_path {value!r} does not match backbone '{backbone.name}' "
            f"(known as: {known})",
            file=CONFIG_FILE,
        )


# --- adapter_model.safetensors ----------------------------------------------------------
def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse the header (u64 length + JSON) as the safetensors library does on load.

    Every entry needs a float ``dtype``, a ``shape`` of non-negative integers and
    ``data_offsets`` of two integers whose span holds exactly that shape; the tensors must
    tile the data section with no gap, overlap or trailing byte. So a file accepted here
    is one the worker's ``safetensors.torch.load_file`` reads.
    """
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
    header = _header_json(name, raw)
    data_start = 8 + header_len
    tensors = [_tensor_info(name, key, entry) for key, entry in header.items()]
    if not tensors:
        raise InvalidArtifact(f"{name}: holds no tensors", file=name)
    _check_tiling(name, tensors, size - data_start)
    return [TensorInfo(t.name, t.dtype, t.shape, data_start + t.start, data_start + t.end) for t in tensors]


def _header_json(name: str, raw: bytes) -> dict:
    if not raw.startswith(b"{"):
        raise InvalidArtifact(f"{name}: the safetensors header is not a JSON object", file=name)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidArtifact(f"{name}: the safetensors header is not valid JSON: {e}", file=name) from e
    if not isinstance(header, dict):
        raise InvalidArtifact(f"{name}: the safetensors header is not a JSON object", file=name)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise InvalidArtifact(f"{name}: __metadata__ must map names to strings", file=name, field="__metadata__")
    return header


def _no_constant(token: str) -> object:
    raise ValueError(f"{token} is not JSON")


def _tensor_info(file: str, key: str, entry: object) -> TensorInfo:
    """One header entry, its offsets still relative to the data section."""

    def bad(field: str, problem: str) -> InvalidArtifact:
        return InvalidArtifact(f"{file}: tensor {key}: {field} {problem}", file=file, tensor=key, field=field)

    if not isinstance(entry, dict):
        raise InvalidArtifact(f"{file}: tensor {key}: malformed header entry", file=file, tensor=key)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise bad("dtype", f"{dtype!r} is not a float type (F16, BF16, F32, F64)")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_size(d) for d in shape):
        raise bad("shape", f"{_short(shape)} is not a list of at most {_MAX_DIMS} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise bad("data_offsets", f"{_short(offsets)} is not two non-negative integers [begin, end]")
    begin, end = offsets
    expected = math.prod(shape) * _DTYPES[dtype][1]
    if end - begin != expected:
        raise bad("data_offsets", f"span {end - begin} bytes for shape {shape} {dtype} (expected {expected})")
    return TensorInfo(key, dtype, tuple(shape), begin, end)


def _check_tiling(file: str, tensors: list[TensorInfo], data_bytes: int) -> None:
    """The tensors cover the data section exactly, in offset order (the library refuses anything else)."""
    position = 0
    for t in sorted(tensors, key=lambda t: (t.start, t.end)):
        if t.start != position:
            problem = "overlaps another tensor" if t.start < position else f"leaves a gap at byte {position}"
            raise InvalidArtifact(
                f"{file}: tensor {t.name}: data_offsets [{t.start}, {t.end}] {problem}",
                file=file,
                tensor=t.name,
                field="data_offsets",
            )
        position = t.end
    if position > data_bytes:
        raise InvalidArtifact(
            f"{file}: truncated: its tensors need {position} bytes of data but the file holds {data_bytes}", file=file
        )
    if position < data_bytes:
        raise InvalidArtifact(
            f"{file}: {data_bytes - position} bytes after the last tensor are not part of any tensor", file=file
        )


def _is_size(value: object) -> bool:
    """A non-negative integer that fits the format's u64 (and not a bool, a float or a string)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
