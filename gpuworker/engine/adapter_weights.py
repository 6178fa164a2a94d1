"""Load a PEFT LoRA folder into one flat host vector the page pool can hold.

Everything a tenant uploads is untrusted: only safetensors are read (a ``.bin`` is a
pickle and can run code on load). ``adapter_config.json`` and the tensor names and shapes
are checked by ``lorafaas.peft_config``, the same parser registration uses, so what the
control plane accepts is what loads here, with the same rank and scaling per module
(``rank_pattern``, ``alpha_pattern``, ``use_rslora``). Problems raise ``InvalidArtifact``
naming the file, the tensor and what is wrong.

Packed layout: for each targeted (layer, module) in model order, A (r x in) then B
(out x r), row-major, r being that module's own rank. The engine keeps only this vector
plus the offsets, ranks and scalings in ``layout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafaas.errors import InvalidArtifact
from lorafaas.llama import LLAMA_MODULES, llama_module_dims
from lorafaas.peft_config import CONFIG_FILE, WEIGHTS_FILE, PeftLoraConfig, TensorPair

PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")

MODULES = LLAMA_MODULES


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
    """Where one (layer, module)'s A and B live inside the packed vector, with its rank and scaling."""

    layer: int
    module: str
    in_features: int
    out_features: int
    a_offset: int
    b_offset: int
    rank: int
    scaling: float  # PEFT's lora_alpha / r (or / sqrt(r) with rsLoRA), for this module

    def pair(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (A rank x in, B out x rank) of this slice inside ``flat``."""
        a = flat[self.a_offset : self.a_offset + self.rank * self.in_features].view(self.rank, self.in_features)
        b = flat[self.b_offset : self.b_offset + self.out_features * self.rank].view(self.out_features, self.rank)
        return a, b


class AdapterWeights:
    """A validated LoRA adapter on the host: one flat tensor plus its layout (ranks and scalings per module)."""

    def __init__(self, flat: torch.Tensor, layout: tuple[LoraSlice, ...], source: str = "") -> None:
        if not layout:
            raise ValueError("an adapter adapts at least one module")
        self.flat = flat
        self.layout = layout
        self.source = source
        # The largest rank of any module: what a batch computes for this adapter, and what
        # placement groups it by.
        self.rank = max(s.rank for s in layout)
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

    def slice(self, layer: int, module: str) -> LoraSlice | None:
        """The layout entry of one (layer, module), or None if the adapter leaves it alone."""
        return next((s for s in self.layout if s.layer == layer and s.module == module), None)

    def lora_pair(
        self, layer: int, module: str, flat: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views (A r x in, B out x r) of one (layer, module) inside ``flat`` (default: the host copy)."""
        s = self.slice(layer, module)
        return None if s is None else s.pair(self.flat if flat is None else flat)

    @classmethod
    def from_peft_folder(cls, folder: Path, model_config: Any) -> AdapterWeights:
        """Read adapter_config.json + adapter_model.safetensors and validate them against the backbone."""
        folder = Path(folder)
        plan = PeftLoraConfig.from_file(folder / CONFIG_FILE).plan(model_config.num_hidden_layers)
        dims = module_dims(model_config)
        mapped = _map_file(folder / WEIGHTS_FILE)
        if mapped is not None:  # the common case: one read, no copy; the file's data region is the flat
            data, tensors = mapped
            pairs = plan.match_tensors({n: tuple(t.shape) for n, t in tensors.items()}, dims)
            if _all_finite(data):
                return cls(data, _layout_in(data, pairs, tensors, dims), source=str(folder))
        else:
            tensors = _read_tensors(folder)
            pairs = plan.match_tensors({n: tuple(t.shape) for n, t in tensors.items()}, dims)
        for name, tensor in tensors.items():  # names the offending tensor
            _check_values(name, tensor)
        flat, layout = _pack(pairs, tensors, dims)
        return cls(flat, layout, source=str(folder))


# safetensors dtype names -> torch dtypes the fast path reads (floating point only: anything else
# takes the general path, which names the offending tensor).
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _map_file(path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Read a safetensors file once into one host buffer (page-locked when CUDA exists) and return its
    data region as one flat tensor plus a view per tensor, or None when the file is not the simple
    well-formed case (one floating dtype, aligned, tensors tiling the data region exactly): then the
    general path (``safetensors.load_file``) reads it and reports what is wrong.

    The floor of a disk load is one read of the file; ``load_file`` + packing made two more copies
    (tensors out of the file, then into the packed vector) and pinning a third. Here the tensors are
    views into the buffer and the layout's offsets point at them where the file put them.
    """
    import json
    import math

    try:
        size = path.stat().st_size
        if size < 8:
            return None
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        with path.open("rb") as f:
            if f.readinto(buf.numpy().data) != size:
                return None
        header_len = int.from_bytes(bytes(buf[:8].numpy()), "little")
        if not 0 < header_len <= min(_MAX_HEADER, size - 8):
            return None
        header = json.loads(bytes(buf[8 : 8 + header_len].numpy()))
    except (OSError, ValueError, RuntimeError):
        return None
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    start = 8 + header_len
    entries, dtypes = [], set()
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _FLOAT_DTYPES:
            return None
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            return None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return None
        dtype = _FLOAT_DTYPES[info["dtype"]]
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            return None
        entries.append((offsets[0], offsets[1], name, shape))
        dtypes.add(dtype)
    if len(dtypes) != 1 or not entries:
        return None
    dtype = dtypes.pop()
    entries.sort()
    end = 0
    for lo, hi, _, _ in entries:  # the tensors tile the data region: no gap, no overlap, nothing past the end
        if lo != end:
            return None
        end = hi
    if start + end != size or start % dtype.itemsize:
        return None
    data = buf[start:].view(dtype)
    tensors = {name: data[lo // dtype.itemsize : hi // dtype.itemsize].view(shape) for lo, hi, name, shape in entries}
    return data, tensors


def _all_finite(data: torch.Tensor) -> bool:
    """One pass over the weights: min and max are finite only if every value is (NaN propagates)."""
    lo, hi = torch.aminmax(data)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _layout_in(
    data: torch.Tensor, pairs: list[TensorPair], tensors: dict[str, torch.Tensor], dims: dict[str, tuple[int, int]]
) -> tuple[LoraSlice, ...]:
    """The layout of each (layer, module) at the offsets its tensors already have inside ``data``."""
    base = int(data.storage_offset())
    layout = []
    for p in pairs:
        t = p.target
        fan_in, fan_out = dims[t.module]
        a_offset, b_offset = int(tensors[p.a].storage_offset()) - base, int(tensors[p.b].storage_offset()) - base
        layout.append(LoraSlice(t.layer, t.module, fan_in, fan_out, a_offset, b_offset, t.rank, t.scaling))
    return tuple(layout)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
        if pickles:
            raise InvalidArtifact(
                f"{pickles[0]} is a pickle and is refused (it can run code on load); upload {WEIGHTS_FILE}",
                file=pickles[0],
            )
        raise InvalidArtifact(f"{WEIGHTS_FILE} is missing from the adapter folder", file=WEIGHTS_FILE)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InvalidArtifact(f"{WEIGHTS_FILE} cannot be read (truncated or corrupt): {e}", file=WEIGHTS_FILE) from e
    if not tensors:
        raise InvalidArtifact(f"{WEIGHTS_FILE} holds no tensors", file=WEIGHTS_FILE)
    return tensors


def _check_values(name: str, tensor: torch.Tensor) -> None:
    """Floating point and finite."""
    if not tensor.is_floating_point():
        raise InvalidArtifact(
            f"{WEIGHTS_FILE}: tensor {name}: dtype {tensor.dtype} is not floating point", file=WEIGHTS_FILE, tensor=name
        )
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidArtifact(
            f"{WEIGHTS_FILE}: tensor {name}: holds NaN or infinite values", file=WEIGHTS_FILE, tensor=name
        )


def _pack(
    pairs: list[TensorPair], tensors: dict[str, torch.Tensor], dims: dict[str, tuple[int, int]]
) -> tuple[torch.Tensor, tuple[LoraSlice, ...]]:
    """Concatenate A and B of each (layer, module), in model order, into one flat vector."""
    dtypes = {tensors[n].dtype for p in pairs for n in (p.a, p.b)}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    chunks: list[torch.Tensor] = []
    layout: list[LoraSlice] = []
    offset = 0
    for p in pairs:
        a, b, t = tensors[p.a], tensors[p.b], p.target
        fan_in, fan_out = dims[t.module]
        layout.append(LoraSlice(t.layer, t.module, fan_in, fan_out, offset, offset + a.numel(), t.rank, t.scaling))
        chunks += [a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)]
        offset += a.numel() + b.numel()
    return torch.cat(chunks), tuple(layout)
