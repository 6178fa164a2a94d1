"""Intra-op thread count for the engine thread, by running batch size (see ``docs/engine.md``)."""

from __future__ import annotations

import os

import torch

SMALL_BATCH = 4  # at or below this many running requests a step reads weights (memory bound): one thread


class ThreadPolicy:
    """How many intra-op threads a step gets, by running batch size.

    A small decode batch is bound by reading the weights; a second OpenMP thread adds a barrier per
    op, and when the gateway, control plane and NATS hold the other core the barrier waits for a
    time slice. Larger batches get torch's count less one core left to the services beside the
    worker. ``apply`` must run on the engine thread: with OpenMP the setting is per thread.
    """

    def __init__(self, max_threads: int | None = None, small_batch: int = SMALL_BATCH) -> None:
        default = min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) - 1))
        self.max_threads = max_threads if max_threads is not None else default
        self.small_batch = small_batch

    def apply(self, running: int) -> None:
        """Set the calling thread's intra-op threads for a batch of ``running`` requests."""
        want = 1 if running <= self.small_batch else self.max_threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
