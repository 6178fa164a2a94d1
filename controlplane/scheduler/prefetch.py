"""Predictive prefetch and scale-to-zero in the live scheduler loop (the I/O around the predictors).

``PredictiveAdvisor`` keeps the arrival history (``history``), advances a forecaster bucket by
bucket and, when the scheduler loop asks (its ``Advisor`` protocol: ``advise(view, demand,
plan)``), returns the commands of ``predict.live.residency_commands``: prefetch the adapters
forecast hot on the workers they are placed on, unload the ones forecast idle. Its ``run``
task refreshes the history from Postgres twice per bucket; ``start`` reloads the kept window
after a (re)start, so the forecast survives a control-plane restart.

The predictor is a numpy model (no torch on the control plane's import path). The default is
the hazard reading of the idle-time histogram, which ``benchmarks/predict.py`` measured best
at equal wasted memory on the structured workload; any ``Predictor`` factory may be passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from controlplane.scheduler.history import ArrivalHistory, HistoryStore
from controlplane.scheduler.model import AdapterSpec, ClusterView, Command, Demand, Plan
from controlplane.scheduler.predict import HazardHistogram, Predictor
from controlplane.scheduler.predict.live import Forecaster, ResidencyConfig, residency_commands

log = logging.getLogger(__name__)

RECOUNT_BUCKETS = 3  # late admissions (a transaction's start time) land in the last few buckets


def default_predictor(functions: int, threshold: float = 0.2) -> Predictor:
    return HazardHistogram(functions, threshold=threshold)


PREDICTORS: dict[str, Callable[[int, float], Predictor]] = {"hazard": default_predictor}


class PredictiveAdvisor:
    def __init__(
        self,
        store: HistoryStore,
        specs: Callable[[], Mapping[str, AdapterSpec]],
        bucket_s: float = 5.0,
        capacity: int = 2880,  # four hours of 5 s buckets: the histogram's range
        make: Callable[[int], Predictor] = default_predictor,
        config: ResidencyConfig = ResidencyConfig(),
        wall_clock: Callable[[], float] = time.time,  # accepted_at is wall time (Postgres now())
        grace_s: float = 0.5,
        horizon: int = 2,
    ) -> None:
        self.store, self.specs, self.config, self.clock, self.grace_s = store, specs, config, wall_clock, grace_s
        # A bucket's counts are known ``grace_s`` after it ends, refreshed every half bucket and
        # acted on at the loop's next round: the forecast for the next bucket lands while it runs.
        # Decide for this bucket and the one after (``horizon`` 2) so a prefetch comes before it.
        self.horizon = horizon
        self.history = ArrivalHistory(bucket_s=bucket_s, capacity=capacity)
        self.forecaster = Forecaster(make)
        self.last_commands: tuple[Command, ...] = ()
        self.loaded = False
        self._stopping = asyncio.Event()

    async def start(self) -> int:
        """Reload the kept window of history and feed it to a fresh predictor (after a restart too)."""
        last = await self.store.load(self.history, self.clock() - self.grace_s)
        self.loaded = True
        fed = self.forecaster.advance(self.history, last)
        log.info("predictor rebuilt from %d buckets of arrival history", fed)
        return fed

    async def refresh(self) -> int:
        """Recount the newest finished buckets and feed the new ones; returns how many were fed.

        Until the kept window was loaded once (Postgres was away at ``start``), it loads it.
        """
        if not self.loaded:
            return await self.start()
        last = await self.store.refresh(self.history, self.clock() - self.grace_s, RECOUNT_BUCKETS)
        return self.forecaster.advance(self.history, last)

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.refresh()
            except Exception:  # Postgres away: forecast on what is known; the next refresh catches up
                log.exception("arrival history refresh failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.history.bucket_s / 2)

    def stop(self) -> None:
        self._stopping.set()

    def owns(self, function_id: str) -> bool:
        """The predictor decides every function's device residency: the loop must not keep a
        placed adapter loaded against it (that would undo its unloads), nor load a function it
        has no forecast for (one never invoked in the kept window stays scaled to zero)."""
        return True

    def advise(self, view: ClusterView, demand: Mapping[str, Demand], plan: Plan) -> Iterable[Command]:
        """The scheduler loop's hook: prefetch and unload commands for this round's placement."""
        self.last_commands = residency_commands(
            view, plan.placement, dict(self.specs()), self.forecaster.forecast(self.horizon), self.config
        )
        return self.last_commands


class OnDemand:
    """Reactive loading (``scheduler.predictor = "reactive"``, the S-LoRA-style baseline): the loop
    prefetches nothing, an adapter loads when an invocation needs it and leaves the device under
    the worker's LRU. It owns every function's residency, so keep-in-step does not load them."""

    def owns(self, function_id: str) -> bool:
        return True

    def advise(self, view: ClusterView, demand: Mapping[str, Demand], plan: Plan) -> Iterable[Command]:
        return ()
