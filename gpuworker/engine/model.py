"""Our own Llama forward over a Hugging Face model's weights, with a per-slot KV cache.

Reads the HF tensors in place (one copy of the backbone, shared by every adapter) and
computes exactly what ``LlamaForCausalLM`` computes: RMSNorm in fp32, HF's own rotary
module for cos/sin (so rope_theta and any rope scaling in the config apply), GQA, SiLU MLP.
What it adds is a LoRA hook per projection site (see ``lora_ops``) and a preallocated cache

    k_cache, v_cache: [layers, slots, kv_heads, max_seq_len, head_dim]

Running requests occupy slots 0..B-1 (the engine compacts on finish), so decode attention
reads a view of the first B slots up to the longest length and masks each slot by its own
length: a request never sees another slot's keys, nor stale positions past its own length.
The projections run with rows in LoRA order (see ``lora_ops``); only attention needs slot
order, so decode permutes q into slot order and the attention output back, two small gathers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from .lora_ops import LoraBatch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Layer i's attention over (q, k, v) rows -> [rows, heads * head_dim]; prefill and decode each
# define one per forward.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LayerWeights:
    """References (not copies) to one decoder layer's HF tensors."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    biases: dict[str, torch.Tensor | None]
    act: Callable[[torch.Tensor], torch.Tensor]


def _base_linear(module: torch.nn.Module) -> torch.nn.Linear:
    # If someone wrapped the model with PEFT, the HF Linear sits in .base_layer; read that.
    base = getattr(module, "base_layer", module)
    # The forward does F.linear on .weight, which is only right for nn.Linear's [out, in] layout.
    if not isinstance(base, torch.nn.Linear):
        raise TypeError(f"expected an nn.Linear projection, got {type(base).__name__}")
    return base


# Our name for each projection -> its submodule path in an HF decoder layer.
_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _layer_weights(layer: torch.nn.Module) -> LayerWeights:
    # get_submodule / get_parameter rather than attribute access: nn.Module.__getattr__ is typed
    # Tensor | Module, these are typed Module / Parameter (the same objects, no copies).
    linears = {name: _base_linear(layer.get_submodule(path)) for name, path in _LINEARS.items()}
    return LayerWeights(
        input_norm=layer.get_parameter("input_layernorm.weight"),
        post_norm=layer.get_parameter("post_attention_layernorm.weight"),
        biases={name: lin.bias for name, lin in linears.items()},
        act=layer.get_submodule("mlp.act_fn"),  # HF's ACT2FN gives an nn.Module (SiLU for Llama)
        **{name: lin.weight for name, lin in linears.items()},
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in fp32, cast back, then scale (the same order as HF)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb for one tensor: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _DecodeStep:
    """Per-step tensors shared by every layer's decode attention."""

    kv_rows: torch.Tensor  # [B * kv_heads] flat cache rows where each row's new key/value go
    slots: torch.Tensor  # [B] row -> KV slot
    inverse: torch.Tensor | None  # [B] slot -> row, None when rows are already in slot order
    max_len: int
    mask: torch.Tensor  # [B, 1, 1, max_len] in slot order
    cos: torch.Tensor
    sin: torch.Tensor


class LlamaRunner:
    """Prefill and decode over the shared HF weights and the slot KV cache."""

    def __init__(self, model: torch.nn.Module, num_slots: int, max_seq_len: int) -> None:
        # nn.Module.__getattr__ is typed Tensor | Module; an HF model's .config is its PretrainedConfig.
        cfg = cast("PretrainedConfig", model.config)
        self.config = cfg
        # Config values read once here as plain ints/floats, so the hot path does no lookups.
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.eps = float(cfg.rms_norm_eps)
        self.embed = model.get_parameter("model.embed_tokens.weight")
        self.final_norm = model.get_parameter("model.norm.weight")
        self.lm_head = model.get_parameter("lm_head.weight")
        # HF's module: reads rope_theta / rope_parameters from the config.
        self.rotary = model.get_submodule("model.rotary_emb")
        layers = model.get_submodule("model.layers")
        if not isinstance(layers, torch.nn.ModuleList):
            raise TypeError(f"expected model.layers to be an nn.ModuleList, got {type(layers).__name__}")
        self.layers = [_layer_weights(layer) for layer in layers]
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        shape = (self.num_layers, num_slots, self.num_kv_heads, max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    # -- cache management -------------------------------------------------------------------
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a running request's cache to another slot (compaction after a finish)."""
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def clear_slot(self, slot: int, length: int) -> None:
        """Zero what a finished request left, so no tenant's keys/values linger for the next one."""
        self.k_cache[:, slot, :, :length].zero_()
        self.v_cache[:, slot, :, :length].zero_()

    # -- forward ----------------------------------------------------------------------------
    def prefill(self, slot: int, token_ids: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """Run one request's prompt ([T] ids) into ``slot``; returns the last position's logits [V]."""
        n = token_ids.shape[0]
        positions = torch.arange(n, device=self.device)
        x = self.embed[token_ids]
        cos, sin = self.rotary(x, positions[None])  # [1, T, D]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._prefill_attn(i, slot, q, k, v, cos, sin)

        for i, w in enumerate(self.layers):
            x = self._layer(i, w, x, lora, attend)
        return self._logits(x[-1:])[0]

    def decode(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        inverse: torch.Tensor | None,
        max_len: int,
        lora: LoraBatch,
    ) -> torch.Tensor:
        """One token for each running request; returns [B, V] logits in row order.

        Row i is the request in KV slot ``slots[i]`` with ``positions[i]`` tokens cached. Rows
        are in LoRA order (each adapter's rows adjacent); attention runs in slot order over
        slots 0..B-1, so ``inverse`` (slot -> row) permutes around it; None when rows == slots.
        """
        x = self.embed[token_ids]
        cos, sin = self.rotary(x, positions[:, None])  # [B, 1, D]
        slot_pos = positions if inverse is None else positions.index_select(0, inverse)
        # Slot s may attend to its own positions 0..slot_pos[s] only.
        mask = (torch.arange(max_len, device=self.device)[None, :] <= slot_pos[:, None])[:, None, None, :]
        # Flat row of (slot, kv_head, position) in a layer's cache viewed as [slots*heads*len, D]:
        # one index_put_ per layer writes every row's new key (cheaper than 3-D advanced indexing).
        heads = torch.arange(self.num_kv_heads, device=self.device)
        kv_rows = ((slots[:, None] * self.num_kv_heads + heads) * self.max_seq_len + positions[:, None]).view(-1)
        step = _DecodeStep(kv_rows, slots, inverse, max_len, mask, cos[:, None], sin[:, None])

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._decode_attn(i, step, q, k, v)

        for i, w in enumerate(self.layers):
            x = self._layer(i, w, x, lora, attend)
        return self._logits(x)

    def _layer(self, i: int, w: LayerWeights, x: torch.Tensor, lora: LoraBatch, attend: Attend) -> torch.Tensor:
        h = rms_norm(x, w.input_norm, self.eps)
        b = w.biases
        q, k, v = F.linear(h, w.q, b["q"]), F.linear(h, w.k, b["k"]), F.linear(h, w.v, b["v"])
        lora.apply(i, "qkv", h, {"q_proj": q, "k_proj": k, "v_proj": v})
        attn = attend(i, q, k, v)
        o = F.linear(attn, w.o, b["o"])
        lora.apply(i, "o", attn, {"o_proj": o})
        x = x + o
        h = rms_norm(x, w.post_norm, self.eps)
        gate, up = F.linear(h, w.gate, b["gate"]), F.linear(h, w.up, b["up"])
        lora.apply(i, "gate_up", h, {"gate_proj": gate, "up_proj": up})
        act = w.act(gate) * up
        down = F.linear(act, w.down, b["down"])
        lora.apply(i, "down", act, {"down_proj": down})
        return x + down

    def _prefill_attn(
        self,
        i: int,
        slot: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        n = q.shape[0]
        q = rotate(q.view(1, n, self.num_heads, self.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
        k = rotate(k.view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
        v = v.view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache[i, slot, :, :n] = k[0]
        self.v_cache[i, slot, :, :n] = v[0]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(1, 2).reshape(n, self.num_heads * self.head_dim)

    def _decode_attn(
        self, i: int, step: _DecodeStep, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        bsz = q.shape[0]
        q = rotate(q.view(bsz, 1, self.num_heads, self.head_dim).transpose(1, 2), step.cos, step.sin)
        k = rotate(k.view(bsz, 1, self.num_kv_heads, self.head_dim).transpose(1, 2), step.cos, step.sin)
        v = v.view(bsz, self.num_kv_heads, self.head_dim)
        # Write each row's new key/value into its own slot at its own position (index_put_: on CPU
        # about 3x cheaper than index_copy_ at batch 32; the rows are distinct, so it is deterministic).
        self.k_cache[i].view(-1, self.head_dim).index_put_((step.kv_rows,), k.reshape(-1, self.head_dim))
        self.v_cache[i].view(-1, self.head_dim).index_put_((step.kv_rows,), v.reshape(-1, self.head_dim))
        if step.inverse is not None:
            q = q.index_select(0, step.inverse)  # rows -> slot order
        keys = self.k_cache[i, :bsz, :, : step.max_len]
        values = self.v_cache[i, :bsz, :, : step.max_len]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=step.mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        out = out.transpose(1, 2).reshape(bsz, self.num_heads * self.head_dim)
        return out if step.inverse is None else out.index_select(0, step.slots)  # slot -> row order

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.final_norm, self.eps), self.lm_head)
