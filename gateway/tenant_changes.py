"""Gateway caches of tenant data, dropped when the control plane announces a tenant's change."""

from __future__ import annotations

from abc import ABC, abstractmethod

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from lorafaas.names import Names


class TenantInvalidated(ABC):
    """A cache that forgets a tenant's entries on ``Names.tenant_changed_subject``."""

    async def listen(self, nc: NATS, names: Names) -> None:
        """Subscribe to announcements (an empty payload drops every tenant)."""
        await nc.subscribe(names.tenant_changed_subject, cb=self._on_change)

    async def _on_change(self, msg: Msg) -> None:
        self.invalidate(msg.data.decode() or None)

    @abstractmethod
    def invalidate(self, tenant_id: str | None = None) -> None:
        """Drop one tenant's entries, or every entry for ``None``."""
