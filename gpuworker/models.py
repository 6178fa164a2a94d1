"""Backbones and adapters made in code: small random-weight Llama-style models with an
offline tokenizer, saved as ordinary Hugging Face folders, and PEFT adapters on them.

No weights can be downloaded here, so the demo, the tests and the benchmarks build their
models with a fixed seed; the loading path (``load_backbone``) is the same for any local
Hugging Face folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# A small deterministic corpus for the byte-level BPE tokenizer (no download needed).
_CORPUS = """
the quick brown fox jumps over the lazy dog. serverless inference runs many functions
on one shared backbone; every function is a low-rank adapter. a request asks a function
for a completion and pays for every token it reads and writes. tenants register
functions, invoke them, watch usage and bills. workers batch requests of many adapters
into one forward pass. hello world, how are you today? please summarise the following
text, translate it to french, answer the question, write a poem about the sea.
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } : ; , . ! ? ' " # @ $ % & _
"""

BACKBONE_META_FILE = "lorafaas_backbone.json"


@dataclass(frozen=True)
class BackboneShape:
    """The dimensions of a Llama-style backbone."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 1024
    max_position_embeddings: int = 2048


SHAPES: dict[str, BackboneShape] = {
    # Fast enough for unit tests on 2 cores.
    "tiny": BackboneShape("tiny", 64, 172, 2, 4, 2, vocab_size=512, max_position_embeddings=512),
    # The demo and default benchmark shape: hidden 512, 8 layers.
    "demo": BackboneShape("demo", 512, 1376, 8, 8, 8),
    "small": BackboneShape("small", 1024, 2752, 12, 16, 16),
    # 7B-shaped (Llama-2-7B dimensions) for a real GPU.
    "llama-7b": BackboneShape("llama-7b", 4096, 11008, 32, 32, 32, vocab_size=32000, max_position_embeddings=4096),
}


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a fixed corpus: deterministic and offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def llama_config(spec: BackboneShape, tokenizer: Any) -> Any:
    """The Hugging Face ``LlamaConfig`` of a shape, with the tokenizer's special token ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_backbone(
    out_dir: Path, shape: str | BackboneShape = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a random-weight Llama backbone and its tokenizer as a Hugging Face folder."""
    from transformers import LlamaForCausalLM

    spec = SHAPES[shape] if isinstance(shape, str) else shape
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    config = llama_config(spec, tokenizer)
    torch.manual_seed(seed)
    # transformers decorates PreTrainedModel.to with functools.wraps(nn.Module.to); typeshed's _Wrapped keeps
    # the unbound signature, so mypy wants the model itself as the first argument.
    model = LlamaForCausalLM(config).to(dtype)  # type: ignore[arg-type]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / BACKBONE_META_FILE).write_text(json.dumps({"shape": asdict(spec), "seed": seed}, indent=2))
    return out_dir


def load_backbone(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a Hugging Face causal LM folder read-only for inference, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # See build_backbone: functools.wraps' stub types the wrapped PreTrainedModel.to as unbound.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def make_adapter(
    backbone_dir: Path,
    out_dir: Path,
    rank: int,
    seed: int,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    alpha: int | None = None,
    scale: float = 0.5,
    **lora_options: object,
) -> Path:
    """Write a PEFT LoRA adapter of ``rank`` on the backbone, with non-zero A and B.

    PEFT initialises B to zero (an adapter that changes nothing); random B makes each
    adapter steer generation differently, which is what the tests need to tell them apart.
    ``lora_options`` go to PEFT's ``LoraConfig`` as they are (``rank_pattern``, ``use_rslora``, ...).
    """
    from peft import LoraConfig, get_peft_model

    model, _ = load_backbone(backbone_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        **lora_options,  # type: ignore[arg-type]
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                fan = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=gen) * scale / fan**0.5)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    return out_dir
