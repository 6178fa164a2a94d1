"""Callbacks of async invocations: POST the result to the caller's URL, signed, retried.

The control plane's event consumer sees every result; for an invocation with a
``callback_url`` it hands the id to ``CallbackDispatcher``, which delivers in the
background. Each POST carries ``Lorafaas-Signature: t=<unix>,v1=<hex>`` where ``v1`` is
HMAC-SHA256 of ``"<t>.<raw body>"`` under the tenant's callback secret, so a receiver can
check both origin and freshness. Timeouts, connection errors, 408, 429 and 5xx are retried
with exponential backoff and full jitter; any other 4xx is final. A host that resolves to a
loopback, link-local or private address is refused before connecting
(``controlplane.services.egress``), and that refusal is final too. Every attempt is appended
to ``invocations.callback_attempts`` and shows in the invocation's status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from datetime import UTC, datetime

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from controlplane.db.models import Invocation
from controlplane.services.egress import EgressPolicy
from controlplane.services.invocations import CALLBACK_DELIVERED, CALLBACK_FAILED, CALLBACK_PENDING, TERMINAL
from controlplane.services.keys import callback_secret
from lorafaas.names import CALLBACK_ID_HEADER, SIGNATURE_HEADER
from lorafaas.settings import CallbackSettings
from lorafaas.wire import InvocationResult

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = CALLBACK_PENDING, CALLBACK_DELIVERED, CALLBACK_FAILED


# --- signing (shared with receivers and tests) ---------------------------------------------
def sign(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},v1={sign(secret, ts, body)}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300.0) -> bool:
    """What a receiver does: recompute the HMAC and refuse stale timestamps (replays)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), parts.get("v1", ""))


def payload(row: Invocation) -> dict:
    usage = None
    if row.prompt_tokens is not None:
        completion = row.completion_tokens or 0
        usage = {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": row.prompt_tokens + completion,
        }
    return {
        "id": row.id,
        "function_id": row.function_id,
        "state": row.state,
        "text": row.result_text,
        "finish_reason": row.finish_reason,
        "error": row.error,
        "usage": usage,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }


def backoff_s(attempt: int, settings: CallbackSettings) -> float:
    """Exponential backoff with full jitter: uniform in [0.5, 1.5] x base x 2^(attempt-1), capped."""
    return min(settings.max_delay_s, settings.base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


class CallbackDispatcher:
    """Delivers callbacks in background tasks; resumes pending ones after a restart."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: CallbackSettings,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.sessions, self.settings = sessions, settings
        self.egress = EgressPolicy.of(settings)
        self.client = client or httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False)
        self._tasks: set[asyncio.Task] = set()

    def on_result(self, event: InvocationResult) -> None:
        """Hook for the event consumer: called once per newly settled invocation."""
        self._spawn(event.invocation_id)

    def _spawn(self, invocation_id: str) -> None:
        task = asyncio.create_task(self.deliver(invocation_id), name=f"callback-{invocation_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume(self) -> None:
        async with self.sessions() as session:
            ids = (
                await session.scalars(
                    select(Invocation.id).where(Invocation.callback_state == PENDING, Invocation.state.in_(TERMINAL))
                )
            ).all()
        for invocation_id in ids:
            self._spawn(invocation_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()

    async def deliver(self, invocation_id: str) -> None:
        try:
            await self._deliver(invocation_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not take the consumer down; resume() retries later
            log.exception("callback delivery of %s crashed", invocation_id)

    async def _deliver(self, invocation_id: str) -> None:
        async with self.sessions() as session:
            row = await session.get(Invocation, invocation_id)
            if row is None or not row.callback_url or row.callback_state != PENDING:
                return
            secret = await callback_secret(session, row.tenant_id)
            url, body, attempt = row.callback_url, json.dumps(payload(row)).encode(), len(row.callback_attempts or [])
        while attempt < self.settings.max_attempts:
            attempt += 1
            refused = await self.egress.refused_address(url)
            if refused is None:
                status, error, duration_ms = await self._post(url, body, secret or "", invocation_id)
            else:  # never connect; a name that resolves to a private address will not change by retrying soon
                status, error, duration_ms = None, refused, 0.0
            ok = status is not None and 200 <= status < 300
            final = (
                ok
                or refused is not None
                or attempt >= self.settings.max_attempts
                or (status is not None and not retryable(status))
            )
            state = DELIVERED if ok else (FAILED if final else PENDING)
            await self._record(
                invocation_id,
                {
                    "attempt": attempt,
                    "at": datetime.now(UTC).isoformat(),
                    "status_code": status,
                    "error": error,
                    "duration_ms": duration_ms,
                },
                state,
            )
            if final:
                return
            await asyncio.sleep(backoff_s(attempt, self.settings))

    async def _post(
        self, url: str, body: bytes, secret: str, invocation_id: str
    ) -> tuple[int | None, str | None, float]:
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: signature_header(secret, body),
            CALLBACK_ID_HEADER: invocation_id,
        }
        started = time.perf_counter()
        try:
            response = await self.client.post(url, content=body, headers=headers, timeout=self.settings.timeout_s)
            return response.status_code, None, round((time.perf_counter() - started) * 1000, 2)
        except httpx.HTTPError as e:
            return (
                None,
                f"{type(e).__name__}: {e}" or type(e).__name__,
                round((time.perf_counter() - started) * 1000, 2),
            )

    async def _record(self, invocation_id: str, attempt: dict, state: str) -> None:
        async with self.sessions.begin() as session:
            row = await session.get(Invocation, invocation_id, with_for_update=True)
            row.callback_attempts = [
                *(row.callback_attempts or []),
                attempt,
            ]  # a new list: JSON columns track assignment
            row.callback_state = state
