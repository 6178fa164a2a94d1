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

    def stacked_pair(self, flat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T in x rank, scaling * B^T rank x out), zero-padded from this slice's rank to ``rank``.

        A batch computes one rank per group of modules; the zero rows and columns of a module
        with a smaller rank (``rank_pattern``) add exactly nothing to its delta.
        """
        a, b = self.pair(flat)
        a_t, b_t = a.t(), b.t() * self.scaling
        if rank > self.rank:
            a_t = torch.nn.functional.pad(a_t, (0, rank - self.rank))
            b_t = torch.nn.functional.pad(b_t, (0, 0, 0, rank - self.rank))
        return a_t, b_t


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
        tensors = _read_tensors(folder)
        pairs = plan.match_tensors({n: tuple(t.shape) for n, t in tensors.items()}, module_dims(model_config))
        for name, tensor in tensors.items():
            _check_values(name, tensor)
        flat, layout = _pack(pairs, tensors, module_dims(model_config))
        return cls(flat, layout, source=str(folder))


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
