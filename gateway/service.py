"""The gateway's invocation service: the steps between an HTTP request and its answer.

accept (check, record, commit) -> publish -> answer by mode:
sync waits for the result; stream yields tokens then the result; async returns at once.
An idempotent replay skips accept and publish and answers from the recorded invocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from controlplane.db.models import Invocation, InvocationState
from controlplane.services import invocations, keys
from controlplane.services.egress import EgressPolicy
from controlplane.services.functions import ServedFunction, list_functions, served_function
from controlplane.services.keys import Principal
from controlplane.services.quotas import TenantQuota
from gateway import admission
from gateway.db import GuardedSessions
from gateway.dispatch import Dispatcher, Watch
from gateway.metrics import GatewayMetrics
from gateway.quotas import QuotaGuard
from gateway.schemas import CallbackAttempt, CallbackStatus, InvocationStatus, InvokeRequest, InvokeResponse, Usage
from gateway.tokens import TokenCounter
from lorafaas import wire
from lorafaas.errors import InvocationTimeout, LorafaasError, NotFound, ServiceUnavailable, error_for_code
from lorafaas.scopes import INVOKE
from lorafaas.settings import Settings

SERVED_TTL_S = 2.0


@dataclass
class Accepted:
    """An invocation ready to answer: new (to publish) or an idempotent replay of an earlier one."""

    invocation_id: str
    function: str
    invocation: wire.Invocation | None  # None for a replay: it was published the first time
    started: float  # monotonic time of the request, for latency metrics

    @property
    def replayed(self) -> bool:
        return self.invocation is None


@dataclass
class InvocationService:
    sessions: GuardedSessions
    dispatcher: Dispatcher
    settings: Settings
    tokens: TokenCounter
    metrics: GatewayMetrics
    # Tenant quotas: 402 past the spend cap, 429 past tokens/minute or concurrency; None enforces none.
    quotas: QuotaGuard | None = None
    # (tenant, function name) -> (expiry, resolved function): saves a join per request; a new
    # adapter version or limit is seen within SERVED_TTL_S.
    _served: dict[tuple[str, str], tuple[float, ServedFunction]] = field(default_factory=dict, init=False)
    egress: EgressPolicy = field(init=False)

    def __post_init__(self) -> None:
        self.egress = EgressPolicy.of(self.settings.callbacks)

    async def _served_function(self, tenant_id: str, name: str) -> ServedFunction:
        now = time.monotonic()
        cached = self._served.get((tenant_id, name))
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.sessions() as session:  # closing detaches the rows with their loaded values
            served = await served_function(session, tenant_id, name)
        self._served[(tenant_id, name)] = (now + SERVED_TTL_S, served)
        return served

    async def _quota(self, tenant_id: str) -> TenantQuota | None:
        if self.quotas is None:
            return None
        quota = self.quotas.cached(tenant_id)
        if quota is None:
            async with self.sessions() as session:
                quota = await self.quotas.quota(session, tenant_id)
        return quota

    # --- accept ------------------------------------------------------------------------
    async def accept(
        self,
        principal: Principal,
        function_name: str,
        req: InvokeRequest,
        idempotency_key: str | None = None,
        hashed_body: dict | None = None,
    ) -> Accepted:
        """Check and record the invocation; it is committed before anything is published."""
        principal.require(INVOKE)
        if req.callback_url is not None:
            self.egress.check_url(req.callback_url)
        self.dispatcher.require_connected()  # fail fast: do not record what cannot be queued
        started = time.monotonic()
        digest = (
            admission.request_hash(function_name, hashed_body or req.model_dump(mode="json"))
            if idempotency_key is not None
            else None
        )
        try:
            return await self._accept(principal, function_name, req, idempotency_key, digest, started)
        except IntegrityError:
            # Two requests raced with the same new key: the loser answers with the winner's invocation.
            return await self._accept(principal, function_name, req, idempotency_key, digest, started)

    async def _accept(
        self,
        principal: Principal,
        function_name: str,
        req: InvokeRequest,
        key: str | None,
        digest: str | None,
        started: float,
    ) -> Accepted:
        served = await self._served_function(principal.tenant_id, function_name)
        quota = await self._quota(principal.tenant_id)
        if key is None and not req.callback_url and (quota is None or quota.unlimited):
            # Nothing else to keep atomic: the invocation is one autocommitted statement.
            async with self.sessions.connect() as connection:
                return await self._record(connection, principal, served, quota, req, started)
        async with self.sessions.begin() as session:
            if key is not None:
                assert digest is not None  # the request's digest is computed whenever a key is given
                replay = await admission.idempotent_replay(
                    session, principal.tenant_id, key, digest, self.settings.limits.idempotency_ttl_s
                )
                if replay is not None:
                    return Accepted(replay.id, function_name, None, started)
            if req.callback_url:
                await keys.ensure_callback_secret(session, principal.tenant_id)
            return await self._record(session, principal, served, quota, req, started, key, digest)

    async def _record(
        self,
        session: AsyncSession | AsyncConnection,
        principal: Principal,
        served: ServedFunction,
        quota: TenantQuota | None,
        req: InvokeRequest,
        started: float,
        key: str | None = None,
        digest: str | None = None,
    ) -> Accepted:
        """Check the request against its limits and quotas, then record it (queue limit permitting)."""
        if self.dispatcher.router is not None:  # 429 while every worker of the backbone is saturated
            self.dispatcher.router.admit(served.backbone.name)
        prompt_tokens = await self.tokens.count(served.backbone.name, served.backbone.uri, req.prompt)
        admission.check_limits(served, self.settings.limits, req.prompt, req.max_tokens, prompt_tokens)
        if quota is not None:  # 402 past the spend cap, 429 past tokens/minute or concurrency
            assert self.quotas is not None  # a tenant quota is only read when the guard exists
            await self.quotas.check(session, quota, (prompt_tokens or 0) + req.max_tokens)
        sampling = wire.SamplingParams(
            max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop
        )
        limit = admission.queue_limit(served, self.settings.nats)
        admitted = await invocations.accept(
            session,
            served,
            req.prompt,
            sampling,
            req.mode,
            idempotency_key=key,
            request_hash=digest,
            callback_url=req.callback_url,
            queue_limit=limit,
        )
        self.metrics.queue_depth.labels(function=served.function.name).set(
            admitted.queue_depth + (admitted.id is not None)
        )
        admission.check_queue(served, admitted.queue_depth, limit)
        assert admitted.id is not None  # check_queue raised if the queue refused it
        invocation = wire.Invocation(
            invocation_id=admitted.id,
            tenant_id=principal.tenant_id,
            backbone=served.backbone.name,
            adapter=served.adapter_ref(),
            prompt=req.prompt,
            sampling=sampling,
            mode=req.mode,
            max_context=served.backbone.max_context,  # the record's limit: worker and engine hold to it too
        )
        return Accepted(admitted.id, served.function.name, invocation, started)

    async def _start(self, accepted: Accepted) -> wire.InvocationResult | None:
        """Publish a new invocation; for a replay, the recorded result if it already finished."""
        if accepted.replayed:  # the watch is already subscribed: a result published from now on is heard
            async with self.sessions() as session:
                row = await invocations.get(session, accepted.invocation_id)
            if InvocationState(row.state).terminal:
                return result_of(row)
            return await self.dispatcher.published_result(accepted.invocation_id)
        assert accepted.invocation is not None  # every accepted invocation but a replay carries its message
        try:
            await self.dispatcher.publish(accepted.invocation)
        except ServiceUnavailable as e:  # never published: nothing will answer it
            await self._fail_unpublished(accepted.invocation_id, e)
            raise
        return None

    async def _fail_unpublished(self, invocation_id: str, error: LorafaasError) -> None:
        failed = wire.InvocationResult(
            invocation_id=invocation_id, status=wire.ResultStatus.FAILED, error=error.message
        )
        with contextlib.suppress(LorafaasError):
            async with self.sessions.begin() as session:
                await invocations.apply_result(session, failed)

    # --- the three modes -----------------------------------------------------------------
    async def invoke_sync(self, accepted: Accepted, timeout_s: float) -> wire.InvocationResult:
        """Wait for the result; a failed one raises its domain error, past the timeout a 504."""
        async with self.dispatcher.watch(accepted.invocation_id) as watch:
            result = await self._start(accepted) or await watch.result(timeout_s, accepted.invocation_id)
        self._observe(accepted, result)
        raise_for_failure(result)
        return result

    async def invoke_async(self, principal: Principal, accepted: Accepted) -> InvocationStatus:
        await self._start(accepted)
        return await self.status(principal, accepted.invocation_id)

    async def open_stream(
        self, accepted: Accepted, timeout_s: float
    ) -> AsyncIterator[wire.TokenChunk | wire.InvocationResult]:
        """Publish, then yield tokens as they come and the result last.

        Subscribing and publishing happen here, before the response starts, so a 503 is still
        an HTTP status; the returned iterator owns the subscription until it is closed.
        """
        stack = contextlib.AsyncExitStack()
        watch = await stack.enter_async_context(self.dispatcher.watch(accepted.invocation_id, tokens=True))
        try:
            recorded = await self._start(accepted)
        except BaseException:
            await stack.aclose()
            raise
        return self._stream(stack, watch, accepted, recorded, timeout_s)

    async def _stream(
        self,
        stack: contextlib.AsyncExitStack,
        watch: Watch,
        accepted: Accepted,
        recorded: wire.InvocationResult | None,
        timeout_s: float,
    ) -> AsyncIterator[wire.TokenChunk | wire.InvocationResult]:
        async with stack:
            if recorded is not None:  # an idempotent replay of a finished invocation
                yield wire.TokenChunk(invocation_id=accepted.invocation_id, index=0, text=recorded.text)
                yield recorded
                return
            streamed: list[str] = []
            deadline = asyncio.get_running_loop().time() + timeout_s
            while True:
                try:
                    item = await asyncio.wait_for(
                        watch.queue.get(), max(0.0, deadline - asyncio.get_running_loop().time())
                    )
                except TimeoutError as e:
                    raise InvocationTimeout(
                        f"no result within {timeout_s:g}s; poll GET /v1/invocations/{accepted.invocation_id}",
                        invocation_id=accepted.invocation_id,
                    ) from e
                if isinstance(item, wire.TokenChunk):
                    if not streamed:
                        self.metrics.ttft.observe(time.monotonic() - accepted.started)
                    streamed.append(item.text)
                    yield item
                    continue
                # Tokens and the result travel on separate subscriptions: send what the tokens missed.
                sent = "".join(streamed)
                if item.text.startswith(sent) and len(item.text) > len(sent):
                    yield wire.TokenChunk(
                        invocation_id=item.invocation_id, index=len(streamed), text=item.text[len(sent) :]
                    )
                self._observe(accepted, item, ttft=False)
                yield item
                return

    def _observe(self, accepted: Accepted, result: wire.InvocationResult, ttft: bool = True) -> None:
        if accepted.replayed:
            return
        self.metrics.latency.observe(time.monotonic() - accepted.started)
        if ttft and result.first_token_at is not None:
            self.metrics.ttft.observe(result.timings.ttft_s)

    # --- status and cancel -----------------------------------------------------------------
    async def status(self, principal: Principal, invocation_id: str) -> InvocationStatus:
        """The invocation's state and result: for keys that may invoke (the result is the invoker's data)."""
        principal.require(INVOKE)
        async with self.sessions() as session:
            row = await invocations.get_for_tenant(session, principal.tenant_id, invocation_id)
        ttl = self.settings.limits.result_ttl_s
        if row.finished_at is not None and row.finished_at < datetime.now(UTC) - timedelta(seconds=ttl):
            raise NotFound(
                f"the result of invocation {invocation_id} expired; results are kept for {ttl:g}s",
                invocation_id=invocation_id,
            )
        return status_of(row)

    async def cancel(self, principal: Principal, invocation_id: str) -> InvocationStatus:
        """Stop a queued or running invocation; only the tokens it produced are billed.

        The cancel marker goes to the cancels stream: a worker running the invocation hears it
        live and aborts (it settles CANCELLED with the tokens so far); a worker that pulls it
        later sees the marker and skips it. A still-queued invocation is settled here at once.
        """
        principal.require(INVOKE)
        self.dispatcher.require_connected()
        async with self.sessions.begin() as session:
            row = await invocations.request_cancel(session, principal.tenant_id, invocation_id)
            queued = row.state == InvocationState.QUEUED
        await self.dispatcher.publish_cancel(invocation_id)
        # Postgres may still say queued while a worker already runs it: then the worker settles it.
        if queued and not await self.dispatcher.was_started(invocation_id):
            await self.dispatcher.publish_result(
                wire.InvocationResult(
                    invocation_id=invocation_id, status=wire.ResultStatus.CANCELLED, finish_reason="cancelled"
                )
            )
        return status_of(row)

    async def functions(self, principal: Principal) -> list[ServedFunction]:
        async with self.sessions() as session:
            return await list_functions(session, principal.tenant_id)

    async def callback_secret(self, principal: Principal) -> str:
        """The secret that signs this tenant's callbacks: for keys that may invoke (and so ask for callbacks)."""
        principal.require(INVOKE)
        async with self.sessions.begin() as session:
            return await keys.ensure_callback_secret(session, principal.tenant_id)


def raise_for_failure(result: wire.InvocationResult) -> None:
    if result.status == wire.ResultStatus.FAILED:
        raise error_for_code(
            result.error_code, result.error or "the invocation failed", invocation_id=result.invocation_id
        )


def response_of(accepted: Accepted, result: wire.InvocationResult) -> InvokeResponse:
    return InvokeResponse(
        id=accepted.invocation_id,
        function=accepted.function,
        state=result.status.value,
        text=result.text,
        finish_reason=result.finish_reason,
        usage=usage_of(result.prompt_tokens, result.completion_tokens),
        timings=result.timings,
    )


def usage_of(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def result_of(row: Invocation) -> wire.InvocationResult:
    """The recorded outcome of a finished invocation, as the wire result a worker sent."""
    return wire.InvocationResult(
        invocation_id=row.id,
        status=wire.ResultStatus(row.state),
        text=row.result_text or "",
        finish_reason=row.finish_reason,
        prompt_tokens=row.prompt_tokens or 0,
        completion_tokens=row.completion_tokens or 0,
        error=row.error,
        worker_id=row.worker_id or "",
        timings=wire.Timings(**(row.timings or {})),
        first_token_at=row.first_token_at,
        finished_at=row.finished_at or wire.utcnow(),  # a terminal row has its time; now only as a guard
    )


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def status_of(row: Invocation) -> InvocationStatus:
    usage = usage_of(row.prompt_tokens, row.completion_tokens or 0) if row.prompt_tokens is not None else None
    callback = None
    if row.callback_url:
        callback = CallbackStatus(
            url=row.callback_url,
            state=row.callback_state or invocations.CALLBACK_PENDING,
            attempts=[CallbackAttempt.model_validate(a) for a in row.callback_attempts or []],
        )
    return InvocationStatus(
        id=row.id,
        function_id=row.function_id,
        mode=row.mode,
        state=row.state,
        accepted_at=row.accepted_at.isoformat(),
        started_at=_iso(row.started_at),
        first_token_at=_iso(row.first_token_at),
        finished_at=_iso(row.finished_at),
        cancel_requested_at=_iso(row.cancel_requested_at),
        text=row.result_text,
        finish_reason=row.finish_reason,
        error=row.error,
        usage=usage,
        callback=callback,
    )
