"""Arrival history per function: invocation counts per time bucket, for the demand predictors.

Derived from the invocations table, not kept in a table of its own: every accepted invocation
already has a row with its function and ``accepted_at`` (the gateway's one admission
statement), so the history is a grouped count over a time range, served by the index
``ix_invocations_accepted`` (``accepted_at`` with ``function_id`` included: an index-only scan
of one bucket's rows). Nothing new is written on the gateway's hot path, the history cannot
disagree with the ledger, and it survives a control-plane restart by construction: the loop
reloads the last ``capacity`` buckets with one query when it starts.

In memory it keeps at most ``capacity`` buckets (older ones are dropped as new ones arrive).
Each round the loop recounts the last few buckets, so an admission committed a little after
its bucket ended (``accepted_at`` is the transaction's start) is still counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from controlplane.db.models import Invocation
from controlplane.db.session import make_engine, make_sessionmaker
from lorafaas.settings import DatabaseSettings


@dataclass
class ArrivalHistory:
    """Counts per (bucket, function) for the newest ``capacity`` buckets. Pure: no I/O, no clock."""

    bucket_s: float
    capacity: int
    # bucket index -> function -> count, inserted in ascending bucket order (see ``put``)
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    newest: int | None = None

    def bucket_of(self, t_s: float) -> int:
        """The bucket holding the epoch time ``t_s`` (seconds)."""
        return math.floor(t_s / self.bucket_s)

    def put(self, bucket: int, counts: dict[str, int]) -> None:
        """Set (not add) one bucket's counts: recounting a bucket is idempotent.

        New buckets come in ascending order (``HistoryStore.refresh`` recounts from the newest
        known one on), so the oldest kept buckets are the first keys and trimming is cheap; a
        bucket already past the kept window is ignored.
        """
        if self.newest is not None and bucket <= self.newest - self.capacity:
            return
        if self.newest is not None and bucket < self.newest and bucket not in self.counts:
            raise ValueError(f"bucket {bucket} is older than the newest ({self.newest}) and was never counted")
        self.counts[bucket] = dict(counts)
        self.newest = bucket if self.newest is None else max(self.newest, bucket)
        cutoff = self.newest - self.capacity
        while self.counts:
            oldest = next(iter(self.counts))
            if oldest > cutoff:
                break
            del self.counts[oldest]

    def put_many(self, rows: Iterable[tuple[int, str, int]], buckets: range) -> None:
        """Set every bucket of ``buckets`` from (bucket, function, count) rows; a bucket without rows is 0."""
        grouped: dict[int, dict[str, int]] = {b: {} for b in buckets}
        for bucket, function_id, count in rows:
            if bucket in grouped:
                grouped[bucket][function_id] = count
        for bucket in buckets:
            self.put(bucket, grouped[bucket])

    def matrix(self, functions: list[str], first: int, last: int) -> np.ndarray:
        """Counts of buckets ``first..last`` (inclusive) x ``functions``, zeros where nothing is known."""
        index = {f: i for i, f in enumerate(functions)}
        out = np.zeros((max(last - first + 1, 0), len(functions)))
        for bucket in range(first, last + 1):
            for function_id, count in self.counts.get(bucket, {}).items():
                if function_id in index:
                    out[bucket - first, index[function_id]] = count
        return out

    def functions(self) -> set[str]:
        return {f for row in self.counts.values() for f in row}


class HistoryStore:
    """Reads bucket counts from the invocations table (the I/O half of the history)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine | None = None) -> None:
        self.sessions = sessions
        self._engine = engine  # owned (and disposed by ``close``) only when built from settings

    @classmethod
    def from_settings(cls, db: DatabaseSettings) -> HistoryStore:
        """A store with its own small engine (for a process that has none, e.g. a benchmark driver)."""
        engine = make_engine(db)
        return cls(make_sessionmaker(engine), engine)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()

    async def counts(self, bucket_s: float, first: int, last: int) -> list[tuple[int, str, int]]:
        """(bucket, function_id, count) for buckets ``first..last`` (inclusive) of width ``bucket_s``."""
        since = datetime.fromtimestamp(first * bucket_s, UTC)
        until = datetime.fromtimestamp((last + 1) * bucket_s, UTC)
        bucket = func.floor(func.extract("epoch", Invocation.accepted_at) / bucket_s).label("bucket")
        query = (
            select(bucket, Invocation.function_id, func.count())
            .where(Invocation.accepted_at >= since, Invocation.accepted_at < until)
            # By position: the bucket expression carries a bound parameter, so repeating it in
            # GROUP BY would be a different expression to Postgres.
            .group_by(literal_column("1"), literal_column("2"))
        )
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
        return [(int(b), str(f), int(c)) for b, f, c in rows]

    async def refresh(self, history: ArrivalHistory, now_s: float, recount: int) -> int:
        """Count every finished bucket before ``now_s`` not counted yet, and recount the ``recount``
        newest (late commits); returns the newest. After an outage it catches up, window-bounded."""
        last = history.bucket_of(now_s) - 1
        first = last - recount + 1
        if history.newest is not None:
            first = min(first, history.newest + 1)
        first = max(first, last - history.capacity + 1)
        history.put_many(await self.counts(history.bucket_s, first, last), range(first, last + 1))
        return last

    async def load(self, history: ArrivalHistory, now_s: float) -> int:
        """After a (re)start: the whole kept window, one query."""
        return await self.refresh(history, now_s, history.capacity)
