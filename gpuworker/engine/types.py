"""The engine's request and output records.

Plain dataclasses with no torch import, so the worker loop can build and read them
without pulling the engine's heavy dependencies into its own modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"  # this request failed alone (its ``StepOutput.error`` says why); the batch goes on


@dataclass
class EngineRequest:
    """One generation request for one adapter (``adapter_id=None`` runs the backbone alone)."""

    request_id: str
    adapter_id: str | None
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per-request torch.Generator so sampling is reproducible
    stop: list[str] = field(default_factory=list)  # matched on decoded text, never emitted
    ignore_eos: bool = False


@dataclass
class StepOutput:
    """One generated token of one request, as produced by one ``LoraEngine.step()``."""

    request_id: str
    token_id: int  # -1 on an abort output, which carries no token
    text: str  # newly decoded, complete text (held back while a multi-byte char or stop string is pending)
    index: int  # 0 for the first generated token
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", "error"
    prompt_tokens: int
    device_s: float  # share of the step's wall time, apportioned by tokens processed (prefill counts)
    prefill_s: float = 0.0  # on the first token: the wall time of this request's prefill
    error: str | None = None  # with finish_reason "error": why this request failed (token_id is -1)
