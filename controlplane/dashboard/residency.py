"""Where each adapter is now: the latest contention report of every worker, kept in memory.

Workers publish a ``ContentionReport`` every ``report_interval_s`` on core NATS; the control
plane keeps the last one per worker. A report older than ``STALE_AFTER_S`` no longer says
where anything is, so the dashboard then shows "unknown" rather than an old answer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from lorafaas.names import Names
from lorafaas.wire import ContentionReport

log = logging.getLogger(__name__)

STALE_AFTER_S = 10.0
TIER_ORDER = {"device": 0, "host": 1, "disk": 2, "s3": 3}


@dataclass(frozen=True)
class Location:
    """One worker's copy of an adapter and the fastest tier it holds it in."""

    worker_id: str
    tier: str


class ResidencyTracker:
    """The last contention report of each worker, and what they say about each function."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, ContentionReport]] = {}
        self._sub: Subscription | None = None

    async def start(self, nc: NATS, names: Names) -> None:
        self._sub = await nc.subscribe(names.contention_subject, cb=self._on_report)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_report(self, msg: Msg) -> None:
        try:
            report = ContentionReport.decode(msg.data)
        except ValidationError as e:
            log.warning("dropping undecodable contention report: %s", e)
            return
        self.observe(report)

    def observe(self, report: ContentionReport, now: float | None = None) -> None:
        self._reports[report.worker_id] = (time.monotonic() if now is None else now, report)

    def fresh_reports(self, now: float | None = None) -> list[ContentionReport]:
        now = time.monotonic() if now is None else now
        return [r for seen, r in self._reports.values() if now - seen <= STALE_AFTER_S]

    def locations(self, function_id: str, now: float | None = None) -> list[Location] | None:
        """Where the function's adapter is, fastest tier first; None when no worker reported lately."""
        reports = self.fresh_reports(now)
        if not reports:
            return None
        found = [Location(r.worker_id, a.tier) for r in reports for a in r.adapters if a.function_id == function_id]
        return sorted(found, key=lambda loc: (TIER_ORDER.get(loc.tier, 9), loc.worker_id))
