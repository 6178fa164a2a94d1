"""Authenticated keys, cached for at most a second.

Checking a key costs a Postgres round trip on every request; a short cache removes it from
the hot path. Entries of a tenant are dropped as soon as the control plane announces a change
(revoked key, suspended tenant) on ``Names.tenant_changed_subject``, and none outlives
``key_cache_ttl_s``, so a revocation takes effect within a second on every gateway even if the
announcement is lost. Failures are never cached.
"""

from __future__ import annotations

import time

from controlplane.services.keys import Principal, authenticate, hash_secret
from gateway.db import GuardedSessions
from gateway.tenant_changes import TenantInvalidated


class KeyCache(TenantInvalidated):
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal]] = {}  # secret hash -> (expiry, principal)

    def invalidate(self, tenant_id: str | None = None) -> None:
        """Drop one tenant's keys (or all, for an empty announcement)."""
        if tenant_id is None:
            self._entries.clear()
            return
        for digest in [d for d, (_, p) in self._entries.items() if p.tenant_id == tenant_id]:
            del self._entries[digest]

    async def principal(self, sessions: GuardedSessions, secret: str | None) -> Principal:
        digest = hash_secret(secret) if secret else ""
        cached = self._entries.get(digest)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        async with sessions() as session:
            principal = await authenticate(session, secret)
        self._entries[digest] = (now + self.ttl_s, principal)
        return principal
