"""The predictors in the live loop: a forecaster fed from the arrival history, and the commands.

``Forecaster`` turns the history's finished buckets into one predictor's forecast per function
id (it feeds each bucket once, in order, and grows the predictor when a new function appears).
``residency_commands`` is the step the scheduler loop calls each round: from the cluster view,
the placement and the forecast it returns the prefetch / offload / evict commands that bring
each placed, forecast-hot adapter down the tiers (S3 -> disk -> host -> device) before its
arrival, and scale forecast-idle ones to zero on the device (device -> host, and after a long
idle time host -> disk). Both are pure: the loop passes the history and the view in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from controlplane.scheduler.history import ArrivalHistory
from controlplane.scheduler.model import (
    AdapterSpec,
    ClusterView,
    Command,
    CommandKind,
    Placement,
    Tier,
    WorkerState,
)
from controlplane.scheduler.predict.base import Predictor


@dataclass(frozen=True)
class FunctionForecast:
    score: float  # likelihood of an invocation in the next bucket
    keep: bool  # resident on the device during the next bucket
    idle_buckets: float  # buckets since its last invocation


class Forecaster:
    """One predictor over every function the history has seen, advanced bucket by bucket.

    After a restart a new forecaster fed the reloaded history reaches the state of one that had
    been fed the same buckets live (predictors are deterministic); functions are ordered by the
    bucket they first appeared in, then by id, so the order is the same both ways.
    """

    def __init__(self, make: Callable[[int], Predictor]) -> None:
        self.predictor = make(0)
        self.functions: list[str] = []
        self._index: dict[str, int] = {}
        self.next_bucket: int | None = None

    def advance(self, history: ArrivalHistory, last: int) -> int:
        """Feed every bucket up to ``last`` (inclusive) not fed yet; returns how many were fed."""
        if self.next_bucket is None:
            if not history.counts:
                return 0
            self.next_bucket = min(history.counts)
        fed = 0
        for bucket in range(self.next_bucket, last + 1):
            row = history.counts.get(bucket, {})
            new = sorted(f for f in row if f not in self._index)
            if new:
                self.functions.extend(new)
                self._index.update({f: len(self._index) + i for i, f in enumerate(new)})
                self.predictor.grow(len(self.functions))
            self.predictor.observe(history.matrix(self.functions, bucket, bucket)[0])
            fed += 1
        self.next_bucket = max(self.next_bucket, last + 1)
        return fed

    def forecast(self, horizon: int = 1) -> dict[str, FunctionForecast]:
        """Per function, the forecast over the next ``horizon`` buckets (``Predictor.forecast_within``)."""
        f = self.predictor.forecast_within(horizon)
        idle = self.predictor.since_last
        return {
            fid: FunctionForecast(float(f.score[i]), bool(f.keep[i]), float(idle[i]))
            for i, fid in enumerate(self.functions)
        }


@dataclass(frozen=True)
class ResidencyConfig:
    headroom_pages: int = 0  # pages each worker keeps free for reactive loads
    evict_after_buckets: float = 120  # idle this long: drop the host copy too (disk stays)


def residency_commands(
    view: ClusterView,
    placement: Placement,
    catalog: dict[str, AdapterSpec],
    forecast: dict[str, FunctionForecast],
    config: ResidencyConfig = ResidencyConfig(),
) -> tuple[Command, ...]:
    """Prefetch what is forecast hot on the workers it is placed on; unload what is forecast idle.

    Per worker, the forecast-hot placed functions are ranked by score per page and admitted
    while they fit in the pool (less the headroom); those not on the device get ``PREFETCH``.
    A function on the device that is not admitted and has nothing queued there is unloaded:
    ``OFFLOAD`` (device -> host), or ``EVICT`` (to disk) once idle ``evict_after_buckets``.
    Functions the forecast does not know (no invocation yet) are left alone.
    """
    commands: list[Command] = []
    for wid, worker in sorted(view.workers.items()):
        if worker.state not in (WorkerState.ACTIVE, WorkerState.JOINING):
            continue
        placed = sorted(f for f, ws in placement.replicas.items() if wid in ws and f in catalog and f in forecast)
        hot = [f for f in placed if forecast[f].keep]
        hot.sort(key=lambda f: (-forecast[f].score / max(catalog[f].pages, 1), f))
        budget, admitted = worker.pool_pages_total - config.headroom_pages, set()
        for f in hot:
            if catalog[f].pages <= budget:
                admitted.add(f)
                budget -= catalog[f].pages
                if worker.tiers.get(f) != Tier.DEVICE:
                    commands.append(Command(wid, CommandKind.PREFETCH, f, f"forecast p={forecast[f].score:.2f}"))
        for f in placed:
            if f in admitted or worker.tiers.get(f) != Tier.DEVICE or worker.queue_depth.get(f, 0) > 0:
                continue
            idle = forecast[f].idle_buckets
            kind = CommandKind.EVICT if idle >= config.evict_after_buckets else CommandKind.OFFLOAD
            commands.append(Command(wid, kind, f, f"forecast idle (p={forecast[f].score:.2f}, idle {idle:g})"))
    return tuple(commands)
