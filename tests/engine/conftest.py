"""Shared fixtures for the engine tests: one tiny random backbone and six PEFT adapters per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gpuworker.engine import AdapterWeights, LoraEngine
from gpuworker.models import build_backbone, load_backbone, make_adapter
from lorafaas.llama import LLAMA_MODULES as LLAMA_LINEAR_MODULES


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    targets: tuple[str, ...]
    seed: int


# Ranks 8..128 over different module subsets, plus one rank-16 adapter on every linear layer.
ADAPTERS = (
    AdapterSpec("r8", 8, ("q_proj", "v_proj"), 11),
    AdapterSpec("r16", 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 12),
    AdapterSpec("r32", 32, ("gate_proj", "up_proj", "down_proj"), 13),
    AdapterSpec("r64", 64, ("q_proj", "v_proj"), 14),
    AdapterSpec("r128", 128, ("v_proj", "down_proj"), 15),
    AdapterSpec("all16", 16, LLAMA_LINEAR_MODULES, 16),
)


@dataclass
class EngineAssets:
    backbone: Path
    adapters: dict[str, Path]
    specs: dict[str, AdapterSpec]


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> EngineAssets:
    root = tmp_path_factory.mktemp("engine")
    backbone = build_backbone(root / "backbone", "tiny", seed=0)
    folders = {
        s.name: make_adapter(backbone, root / s.name, rank=s.rank, seed=s.seed, target_modules=s.targets)
        for s in ADAPTERS
    }
    return EngineAssets(backbone, folders, {s.name: s for s in ADAPTERS})


@pytest.fixture(scope="session")
def model_and_tokenizer(assets: EngineAssets):
    return load_backbone(assets.backbone)


@pytest.fixture(scope="session")
def weights(assets: EngineAssets, model_and_tokenizer) -> dict[str, AdapterWeights]:
    model, _ = model_and_tokenizer
    return {name: AdapterWeights.from_peft_folder(folder, model.config) for name, folder in assets.adapters.items()}


@pytest.fixture
def make_engine(model_and_tokenizer, weights):
    """A fresh engine on the shared read-only model with every test adapter loaded."""

    def factory(max_batch: int = 8, load: bool = True, **kwargs) -> LoraEngine:
        model, tokenizer = model_and_tokenizer
        engine = LoraEngine(model, tokenizer, max_batch=max_batch, **kwargs)
        if load:
            for name, w in weights.items():
                engine.load_adapter(name, w)
        return engine

    return factory


def run_to_completion(engine: LoraEngine, max_steps: int = 1000) -> dict[str, list]:
    """Step until idle; returns request id -> its StepOutputs in order."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert not engine.has_work()
    return outputs


@pytest.fixture
def run_all():
    """The ``run_to_completion`` helper, as a fixture (test modules here are not a package)."""
    return run_to_completion


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
