"""The batched multi-LoRA inference engine: one shared Llama backbone, many adapters per forward pass.

Public API::

    from gpuworker.engine import LoraEngine, EngineRequest, StepOutput, AdapterWeights, PoolStats, PoolFullError
"""

from .adapter_weights import AdapterWeights
from .engine import LoraEngine
from .pool import ContiguousAllocator, PagedAdapterPool, PoolFullError, PoolStats
from .types import EngineRequest, StepOutput

__all__ = [
    "AdapterWeights",
    "ContiguousAllocator",
    "EngineRequest",
    "LoraEngine",
    "PagedAdapterPool",
    "PoolFullError",
    "PoolStats",
    "StepOutput",
]
