"""Admission of one invocation: idempotency, limits and backpressure, before anything is queued.

- ``Idempotency-Key``: the same key and body within ``idempotency_ttl_s`` names the same
  invocation (no second run, no second bill); the same key with another body is a 409.
- Limits: ``max_tokens`` and the prompt against the function's and the backbone's limits,
  each 400 naming the limit.
- Backpressure: invocations of a function that are queued or running, counted in Postgres
  by the statement that records the invocation (``invocations.accept``), against
  ``functions.max_queue`` (or the platform default). Over it: 429 with Retry-After and
  ``x-ratelimit-*`` headers, never a silent drop.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import Invocation
from controlplane.services import invocations
from controlplane.services.functions import ServedFunction
from lorafaas.errors import Conflict, InvalidInput, QuotaExceeded
from lorafaas.settings import LimitSettings, NatsSettings

RETRY_AFTER_S = 1.0


def request_hash(function_name: str, body: dict) -> str:
    """A stable digest of what was asked: the function and the canonical JSON body."""
    canonical = json.dumps({"function": function_name, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def idempotent_replay(
    session: AsyncSession, tenant_id: str, key: str, digest: str, ttl_s: float
) -> Invocation | None:
    """The invocation this key already names, or None when the key is new (or expired, then freed)."""
    if not key or len(key) > 256:
        raise InvalidInput("Idempotency-Key must be 1-256 characters", param="Idempotency-Key")
    row = await invocations.by_idempotency_key(session, tenant_id, key)
    if row is None:
        return None
    if row.accepted_at < datetime.now(UTC) - timedelta(seconds=ttl_s):
        await invocations.release_idempotency_key(session, row.id)  # expired: the key may name a new invocation
        return None
    if row.request_hash != digest:
        raise Conflict(
            "this Idempotency-Key was used with a different request body; use a new key for a new request",
            invocation_id=row.id,
        )
    return row


def check_limits(
    served: ServedFunction, limits: LimitSettings, prompt: str, max_tokens: int, prompt_tokens: int | None
) -> None:
    limit = min(limits.max_tokens, served.function.max_tokens or limits.max_tokens)
    if max_tokens > limit:
        raise InvalidInput(
            f"max_tokens={max_tokens} is above this function's limit of {limit}", param="max_tokens", limit=limit
        )
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidInput(
            f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
            param="prompt",
            limit=limits.max_prompt_chars,
        )
    if not prompt.strip():
        raise InvalidInput("prompt is blank; send the text to complete", param="prompt")
    context = served.backbone.max_context
    if prompt_tokens is not None and prompt_tokens + max_tokens > context:
        raise InvalidInput(
            f"prompt of {prompt_tokens} tokens plus max_tokens={max_tokens} "
            f"exceeds the backbone's context of {context} tokens",
            param="prompt",
            limit=context,
        )


def queue_limit(served: ServedFunction, nats: NatsSettings) -> int:
    return served.function.max_queue or nats.max_queue_per_function


def check_queue(served: ServedFunction, depth: int, limit: int) -> None:
    if depth >= limit:
        raise QuotaExceeded(
            f"function '{served.function.name}' has {depth} invocations queued or running; "
            f"its queue limit is {limit}. Retry after {RETRY_AFTER_S:g}s",
            retry_after_s=RETRY_AFTER_S,
            headers={
                "x-ratelimit-limit-requests": str(limit),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{RETRY_AFTER_S:g}s",
            },
            limit=limit,
        )
