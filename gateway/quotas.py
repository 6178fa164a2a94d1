"""The gateway's quota guard: the control plane's numbers, cached, enforced on every accept.

Each tenant's limits are cached here and dropped as soon as the control plane announces a
change on ``Names.tenant_changed_subject`` (a TTL is the safety net if a message is lost).
The counters themselves (in flight, tokens of the last minute, this month's spend) are read
inside the accepting transaction, so every gateway sees the same totals.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from controlplane.services import quotas
from gateway.tenant_changes import TenantInvalidated
from lorafaas.settings import ControlPlaneSettings

log = logging.getLogger(__name__)


class QuotaGuard(TenantInvalidated):
    def __init__(self, settings: ControlPlaneSettings) -> None:
        self.settings = settings
        self._cache: dict[str, tuple[float, quotas.TenantQuota]] = {}

    def invalidate(self, tenant_id: str | None = None) -> None:
        if tenant_id is None:
            self._cache.clear()
        else:
            self._cache.pop(tenant_id, None)

    def cached(self, tenant_id: str) -> quotas.TenantQuota | None:
        cached = self._cache.get(tenant_id)
        if cached is not None and time.monotonic() - cached[0] < self.settings.quota_cache_ttl_s:
            return cached[1]
        return None

    async def quota(self, session: AsyncSession, tenant_id: str) -> quotas.TenantQuota:
        cached = self.cached(tenant_id)
        if cached is not None:
            return cached
        quota = await quotas.load_quota(session, tenant_id)
        self._cache[tenant_id] = (time.monotonic(), quota)
        return quota

    async def check(
        self, session: AsyncSession | AsyncConnection, quota: quotas.TenantQuota, requested_tokens: int
    ) -> None:
        """Raise PaymentRequired (402) or QuotaExceeded (429, Retry-After) if the tenant is over a limit."""
        await quotas.enforce(session, quota, requested_tokens, self.settings.in_flight_horizon_s)
