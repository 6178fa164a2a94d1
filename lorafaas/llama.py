"""Shapes of a Llama block's LoRA-targetable linear layers (no torch: the control plane
validates adapters against them, the engine packs adapters by them)."""

from __future__ import annotations

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LLAMA_MODULES = ATTN_MODULES + MLP_MODULES


def llama_module_dims(
    hidden: int, heads: int, kv_heads: int, intermediate: int, head_dim: int | None = None
) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable linear layer of a Llama block."""
    head_dim = head_dim or hidden // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
