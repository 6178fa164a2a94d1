"""Parsing and validating PEFT adapter folders; bad ones never reach the pool."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpuworker.engine import AdapterWeights, EngineRequest
from lorafaas.errors import InvalidArtifact

pytestmark = pytest.mark.unit

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_parses_rank_scaling_targets_and_bytes(weights) -> None:
    w = weights["r32"]
    assert w.rank == 32 and {(s.rank, s.scaling) for s in w.layout} == {(32, 1.0)}
    assert w.target_modules == ("gate_proj", "up_proj", "down_proj")
    # tiny: hidden 64, intermediate 172, 2 layers: (64+172) * 32 per module, 3 modules.
    assert w.nbytes == 2 * 3 * 32 * (64 + 172) * 4
    assert weights["all16"].target_modules == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert w.pin_memory() is w


def test_tensors_round_trip_from_the_file(assets, weights) -> None:
    tensors = load_file(str(assets.adapters["r8"] / "adapter_model.safetensors"))
    a, b = weights["r8"].lora_pair(0, "q_proj")
    assert torch.equal(a, tensors[A_KEY])
    assert torch.equal(b, tensors[A_KEY.replace("lora_A", "lora_B")])


def test_every_pair_is_read_in_place_from_the_file_and_matches_the_general_path(
    assets, weights, model_and_tokenizer, tmp_path
) -> None:
    """The fast path keeps the file's data region as the flat vector (no packing copy); its layout
    must give every (layer, module) exactly the tensors ``load_file`` gives, for every adapter."""
    for name, w in weights.items():
        path = assets.adapters[name] / "adapter_model.safetensors"
        tensors = load_file(str(path))
        assert w.nbytes == sum(t.numel() * t.element_size() for t in tensors.values()) < path.stat().st_size
        for s in w.layout:
            parent = "self_attn" if s.module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{s.layer}.{parent}.{s.module}.lora_A.weight"
            a, b = s.pair(w.flat)
            assert torch.equal(a, tensors[key]) and torch.equal(b, tensors[key.replace("lora_A", "lora_B")])
    # A file the fast path does not take (two dtypes) goes through load_file and packs the same values.
    folder = _copy(assets.adapters["r8"], tmp_path)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors[A_KEY] = tensors[A_KEY].double()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    mixed = AdapterWeights.from_peft_folder(folder, model_and_tokenizer[0].config)
    assert mixed.flat.dtype == torch.float32 and mixed.layout[0].a_offset == 0
    for s in mixed.layout:
        a, b = s.pair(mixed.flat)
        ref_a, ref_b = weights["r8"].lora_pair(s.layer, s.module)  # type: ignore[misc]
        assert torch.equal(a, ref_a) and torch.equal(b, ref_b)


def test_alpha_and_rslora_scaling(assets, model_and_tokenizer, tmp_path) -> None:
    folder = _copy(assets.adapters["r8"], tmp_path)
    _edit_config(folder, lora_alpha=32, use_rslora=True)
    w = AdapterWeights.from_peft_folder(folder, model_and_tokenizer[0].config)
    assert [s.scaling for s in w.layout] == pytest.approx([32 / 8**0.5] * len(w.layout))


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "adapter"))


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _pickle(folder: Path) -> str:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    return "adapter_model.bin"


def _wrong_shape(folder: Path) -> str:
    _edit_tensors(folder, lambda t: t.__setitem__(A_KEY, torch.zeros(8, 63)))
    return A_KEY


def _nan(folder: Path) -> str:
    def poison(t):
        t[A_KEY][0, 0] = float("nan")

    _edit_tensors(folder, poison)
    return A_KEY


def _unknown_target(folder: Path) -> str:
    _edit_config(folder, target_modules=["q_proj", "c_attn"])
    return "c_attn"


def _unknown_tensor_module(folder: Path) -> str:
    name = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"
    _edit_tensors(folder, lambda t: t.__setitem__(name, torch.zeros(8, 64)))
    return "qkv_proj"


def _truncated(folder: Path) -> str:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return "adapter_model.safetensors"


def _missing_b(folder: Path) -> str:
    _edit_tensors(folder, lambda t: t.pop(A_KEY.replace("lora_A", "lora_B")))
    return "lora_B"


def _bad_rank(folder: Path) -> str:
    _edit_config(folder, r=0)
    return "adapter_config.json"


def _layer_out_of_range(folder: Path) -> str:
    name = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    _edit_tensors(folder, lambda t: t.__setitem__(name, torch.zeros(8, 64)))
    return "layers.7"


@pytest.mark.parametrize(
    "corrupt",
    [
        _pickle,
        _wrong_shape,
        _nan,
        _unknown_target,
        _unknown_tensor_module,
        _truncated,
        _missing_b,
        _bad_rank,
        _layer_out_of_range,
    ],
)
def test_bad_folders_raise_invalid_artifact_naming_the_problem(corrupt, assets, model_and_tokenizer, tmp_path) -> None:
    folder = _copy(assets.adapters["r8"], tmp_path)
    named = corrupt(folder)
    with pytest.raises(InvalidArtifact) as info:
        AdapterWeights.from_peft_folder(folder, model_and_tokenizer[0].config)
    assert named in str(info.value)
    assert info.value.details.get("file"), "the error names the file"


def test_engine_keeps_serving_after_a_bad_adapter(assets, make_engine, run_all, model_and_tokenizer, tmp_path) -> None:
    engine = make_engine()
    folder = _copy(assets.adapters["r16"], tmp_path)
    _nan(folder)
    with pytest.raises(InvalidArtifact):
        engine.load_adapter("bad", AdapterWeights.from_peft_folder(folder, model_and_tokenizer[0].config))
    assert not engine.is_resident("bad")
    with pytest.raises(ValueError):
        engine.add_request(EngineRequest("x", "bad", [5, 6, 7], max_tokens=2))
    engine.add_request(EngineRequest("ok", "r16", [5, 6, 7], max_tokens=3))
    outs = run_all(engine)["ok"]
    assert [o.index for o in outs] == [0, 1, 2] and outs[-1].finish_reason == "length"
