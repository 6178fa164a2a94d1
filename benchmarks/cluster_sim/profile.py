"""Calibration profiles: a flat JSON of per-term costs, each with its source.

A profile says what one worker (one device with one backbone) costs per step, per token and per
adapter move, and what a device-hour costs. ``sources`` maps every term to where its number
comes from (a measurement command, or a publication); a term without a source is refused, so a
number never enters a result unexplained. The format is flat on purpose: a lead with a GPU can
overwrite single terms with their own measurement and say so in ``sources``.

Step time of the simulated engine (the structure of ``gpuworker/engine``: prefill-first, one
prefill per admitted request, then decode steps of the whole running batch):

    prefill_s = prefill_base_s + tokens * (prefill_per_token_s + rank * prefill_per_token_rank_s)
    decode_s  = decode_base_s + batch * decode_per_seq_s + context_tokens * decode_per_ctx_token_s
                + sum(rank of each row) * decode_per_row_rank_s
                + sum(rank of each distinct adapter) * decode_per_adapter_rank_s
                + groups * decode_per_group_s

where ``groups`` counts the rank groups the batch runs (one per distinct (rank, rows-per-adapter)
run, ``lora_ops.LoraBatchBuilder``). With ``rank_mode = "padded"`` every row is charged the batch's
largest rank instead (kernels that pad to the largest rank, as LoRAServe measured on vLLM).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    rank_mode: str  # "grouped" (our engine) or "padded"
    prefill_base_s: float
    prefill_per_token_s: float
    prefill_per_token_rank_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_ctx_token_s: float
    decode_per_row_rank_s: float
    decode_per_adapter_rank_s: float
    decode_per_group_s: float
    max_batch: int
    adapter_bytes_per_rank: int  # bytes of a rank-1 adapter on the targeted modules (all layers)
    page_bytes: int  # device pool page
    pool_bytes: int  # device pool for adapters, per worker
    host_cache_bytes: int  # host-memory adapter cache, per worker
    h2d_bytes_per_s: float
    disk_bytes_per_s: float
    disk_latency_s: float
    s3_bytes_per_s: float
    s3_latency_s: float
    peer_bytes_per_s: float
    peer_latency_s: float
    backbone_cold_start_s: float  # a dedicated backbone per function: start + load the backbone
    device_hour_usd: float
    token_scale: float  # trace token counts are multiplied by this (CPU: the demo shape is slow)
    max_prompt_tokens: int
    max_output_tokens: int
    ttft_slo_s: float
    sources: dict[str, str]
    # What the serving path adds outside the engine (optional; 0 when a profile does not say):
    # gateway + NATS + HTTP streaming per request (before the request reaches its worker), and the
    # worker's own cost per engine step (thread hop, token publishing). Calibrated from probe
    # requests through the live stack (``benchmarks.cluster_sim.validate``).
    request_overhead_s: float = 0.0
    step_overhead_s: float = 0.0

    def adapter_bytes(self, rank: int) -> int:
        return self.adapter_bytes_per_rank * rank

    def adapter_pages(self, rank: int) -> int:
        return -(-self.adapter_bytes(rank) // self.page_bytes)

    @property
    def pool_pages(self) -> int:
        return self.pool_bytes // self.page_bytes


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (``benchmarks/profiles/<name>.json``) or path; every term needs a source."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.json"
    raw = json.loads(path.read_text())
    names = {f.name for f in fields(Profile)}
    optional = {f.name for f in fields(Profile) if f.default is not MISSING}
    missing = names - optional - set(raw)
    if missing:
        raise ValueError(f"profile {path} lacks {sorted(missing)}")
    unsourced = sorted(n for n in names - {"name", "sources"} if n in raw and n not in raw["sources"])
    if unsourced:
        raise ValueError(f"profile {path}: no source for {unsourced}")
    return Profile(**{k: raw[k] for k in names if k in raw})
