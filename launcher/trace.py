"""Production traces: load any CSV with ``TIMESTAMP, ContextTokens, GeneratedTokens``, take a
slice, scale time and token lengths to the machine, and assign requests to functions.

The trace has no function column: each request goes to one of N functions by a seeded Zipf
popularity, and each function draws its adapter rank from a rank mix. ``describe`` says
exactly what was done, so every run prints how it scaled and assigned the trace.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds since the start of the slice, after time scaling
    prompt_tokens: int
    output_tokens: int
    function_index: int


@dataclass(frozen=True)
class TraceScaling:
    start_s: float = 0.0
    duration_s: float = 60.0
    time_scale: float = 1.0  # replayed gap = original gap x time_scale
    token_scale: float = 1 / 16
    max_prompt_tokens: int = 256
    max_output_tokens: int = 32
    min_tokens: int = 1
    functions: int = 4
    zipf_s: float = 1.1
    seed: int = 0


def _parse_time(value: str) -> float:
    # Timestamps carry 7 fractional digits; datetime takes at most 6.
    head, _, frac = value.strip().partition(".")
    return datetime.fromisoformat(head).timestamp() + (float(f"0.{frac}") if frac else 0.0)


def read_rows(path: Path) -> list[tuple[float, int, int]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks columns {missing}; expected {list(COLUMNS)}")
        rows = [(_parse_time(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in reader]
    rows.sort()
    return rows


def zipf_weights(n: int, s: float) -> list[float]:
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _scale(tokens: int, scale: TraceScaling, cap: int) -> int:
    return max(scale.min_tokens, min(cap, round(tokens * scale.token_scale)))


def load_trace(path: Path, scale: TraceScaling) -> list[TraceRequest]:
    """The slice [start, start+duration) of the trace, scaled and assigned to functions."""
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} has no requests")
    t0 = rows[0][0] + scale.start_s
    rng = random.Random(scale.seed)
    weights = zipf_weights(scale.functions, scale.zipf_s)
    out = []
    for ts, prompt, output in rows:
        offset = ts - t0
        if offset < 0 or offset >= scale.duration_s:
            continue
        out.append(
            TraceRequest(
                arrival_s=offset * scale.time_scale,
                prompt_tokens=_scale(prompt, scale, scale.max_prompt_tokens),
                output_tokens=_scale(output, scale, scale.max_output_tokens),
                function_index=rng.choices(range(scale.functions), weights)[0],
            )
        )
    return out


def assign_ranks(functions: int, rank_mix: tuple[int, ...], seed: int) -> list[int]:
    """Each function's adapter rank, drawn from the mix with the seed."""
    rng = random.Random(seed + 1)
    return [rng.choice(rank_mix) for _ in range(functions)]


def describe(path: Path, scale: TraceScaling, requests: list[TraceRequest]) -> str:
    counts = [0] * scale.functions
    for r in requests:
        counts[r.function_index] += 1
    return (
        f"trace {Path(path).name}: slice [{scale.start_s:g}s, {scale.start_s + scale.duration_s:g}s) "
        f"-> {len(requests)} requests; time x{scale.time_scale:g}; tokens x{scale.token_scale:g} capped at "
        f"prompt {scale.max_prompt_tokens} / output {scale.max_output_tokens} (min {scale.min_tokens}); "
        f"assigned to {scale.functions} functions by Zipf(s={scale.zipf_s:g}, seed={scale.seed}): "
        f"requests per function {counts}"
    )


_WORDS = (
    "the quick brown fox jumps over the lazy dog serverless inference runs many functions on one shared backbone"
).split()


def synthetic_prompt(tokens: int, seed: int) -> str:
    """A prompt of about ``tokens`` tokens of the demo tokenizer (roughly one word each)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, tokens)))
