"""The engine's cost model: prefill, decode step and adapter move times from a profile."""

from __future__ import annotations

from collections.abc import Mapping

from .profile import Profile


def prefill_s(p: Profile, tokens: int, rank: int) -> float:
    return p.prefill_base_s + tokens * (p.prefill_per_token_s + rank * p.prefill_per_token_rank_s)


def decode_s(p: Profile, per_adapter: Mapping[int, int], batch: int, ranks: list[int], context_tokens: int) -> float:
    """One decode step of ``batch`` rows; ``per_adapter``: function -> its rows (rank of f: ranks[f])."""
    if p.rank_mode == "padded":
        top = max(ranks[f] for f in per_adapter)
        row_rank = top * batch
        adapter_rank = top * len(per_adapter)
        groups = len(set(per_adapter.values()))
    else:
        row_rank = sum(ranks[f] * m for f, m in per_adapter.items())
        adapter_rank = sum(ranks[f] for f in per_adapter)
        groups = len({(ranks[f], m) for f, m in per_adapter.items()})
    return (
        p.decode_base_s
        + batch * p.decode_per_seq_s
        + context_tokens * p.decode_per_ctx_token_s
        + row_rank * p.decode_per_row_rank_s
        + adapter_rank * p.decode_per_adapter_rank_s
        + groups * p.decode_per_group_s
    )


def move_s(p: Profile, nbytes: int, source: str) -> float:
    """Time to bring an adapter to host memory from ``source`` (disk, s3, peer)."""
    if source == "disk":
        return p.disk_latency_s + nbytes / p.disk_bytes_per_s
    if source == "peer":
        return p.peer_latency_s + nbytes / p.peer_bytes_per_s
    return p.s3_latency_s + nbytes / p.s3_bytes_per_s


def h2d_s(p: Profile, nbytes: int) -> float:
    return nbytes / p.h2d_bytes_per_s


def worker_capacity_tokens(p: Profile, mean_prompt: float, mean_output: float, mean_rank: float) -> float:
    """Tokens/s (prompt + output) one worker sustains with half-full batches of one rank class.

    The placement policy's ``worker_capacity`` for a simulated cluster (the live loop would read
    it from the workers' reported tokens/s).
    """
    batch = max(p.max_batch // 2, 1)
    step = (
        p.decode_base_s
        + batch * (p.decode_per_seq_s + mean_rank * p.decode_per_row_rank_s)
        + batch * (mean_prompt + mean_output / 2) * p.decode_per_ctx_token_s
        + 4 * (mean_rank * p.decode_per_adapter_rank_s + p.decode_per_group_s)
    )
    per_request_s = prefill_s(p, int(mean_prompt), int(mean_rank)) + mean_output * step / batch
    return (mean_prompt + mean_output) / per_request_s
