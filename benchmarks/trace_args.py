"""Command-line options the trace-driven benchmarks share: the trace slice, its scaling, the functions.

Each script passes its own defaults (a replay wants minutes of the trace, the offline predictor
benchmark an hour); the names, types and meanings are stated here once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "data" / "AzureLLMInferenceTrace_conv.csv"


def add_slice_args(p: argparse.ArgumentParser, *, duration: float) -> None:
    """--trace, --start, --duration: which part of which trace."""
    p.add_argument(
        "--trace", type=Path, default=DEFAULT_TRACE, help="CSV with TIMESTAMP, ContextTokens, GeneratedTokens"
    )
    p.add_argument("--start", type=float, default=0.0, help="start offset of the slice (s)")
    p.add_argument("--duration", type=float, default=duration, help="length of the slice (s)")


def add_scaling_args(
    p: argparse.ArgumentParser,
    *,
    time_scale: float = 1.0,
    token_scale: float = 1 / 16,
    max_prompt: int = 128,
    max_output: int = 32,
) -> None:
    """--time-scale, --token-scale, --max-prompt, --max-output: how the slice is replayed."""
    p.add_argument("--time-scale", type=float, default=time_scale, help="replayed gap = original gap x this")
    p.add_argument("--token-scale", type=float, default=token_scale, help="token lengths x this")
    p.add_argument("--max-prompt", type=int, default=max_prompt, help="cap on scaled prompt tokens")
    p.add_argument("--max-output", type=int, default=max_output, help="cap on scaled output tokens")


def add_function_args(p: argparse.ArgumentParser, *, functions: int) -> None:
    """--functions, --zipf, --ranks, --seed: the functions the requests are assigned to."""
    p.add_argument("--functions", type=int, default=functions, help="number of LoRA functions")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of function popularity")
    p.add_argument("--ranks", default="8,16,32,64,128", help="rank mix each function's rank is drawn from")
    p.add_argument("--seed", type=int, default=0)
