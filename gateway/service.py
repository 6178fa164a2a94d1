"""The gateway's invocation service: the steps between an HTTP request and its answer."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from controlplane.db.models import Invocation
from controlplane.services import catalog, invocations
from controlplane.services.keys import Principal
from gateway.dispatch import Dispatcher
from gateway.schemas import InvocationStatus, InvokeRequest, InvokeResponse, Usage
from lorafaas import wire
from lorafaas.errors import InvalidInput, LorafaasError, ServiceUnavailable, error_for_code
from lorafaas.settings import LimitSettings


@dataclass
class InvocationService:
    sessions: async_sessionmaker[AsyncSession]
    dispatcher: Dispatcher
    limits: LimitSettings

    def _check_limits(self, served: catalog.ServedFunction, req: InvokeRequest) -> None:
        limit = min(self.limits.max_tokens, served.function.max_tokens or self.limits.max_tokens)
        if req.max_tokens > limit:
            raise InvalidInput(f"max_tokens={req.max_tokens} is above this function's limit of {limit}", param="max_tokens")
        if len(req.prompt) > self.limits.max_prompt_chars:
            raise InvalidInput(f"prompt has {len(req.prompt)} characters; the limit is {self.limits.max_prompt_chars}", param="prompt")
        if not req.prompt.strip():
            raise InvalidInput("prompt is blank; send the text to complete", param="prompt")

    async def accept(self, principal: Principal, function_name: str, req: InvokeRequest, mode: wire.InvocationMode) -> wire.Invocation:
        """Check and record the invocation; it is committed before anything is published."""
        principal.require("invoke")
        sampling = wire.SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop)
        async with self.sessions.begin() as session:
            served = await catalog.served_function(session, principal.tenant_id, function_name)
            self._check_limits(served, req)
            row = await invocations.accept(session, served, req.prompt, sampling, mode)
        return wire.Invocation(
            invocation_id=row.id,
            tenant_id=principal.tenant_id,
            backbone=served.backbone.name,
            adapter=served.adapter_ref(),
            prompt=req.prompt,
            sampling=sampling,
            mode=mode,
        )

    async def _fail_unpublished(self, invocation: wire.Invocation, error: LorafaasError) -> None:
        failed = wire.InvocationResult(invocation_id=invocation.invocation_id, status=wire.ResultStatus.FAILED, error=error.message)
        async with self.sessions.begin() as session:
            await invocations.apply_result(session, failed)

    async def invoke_sync(self, principal: Principal, function_name: str, req: InvokeRequest, timeout_s: float) -> InvokeResponse:
        invocation = await self.accept(principal, function_name, req, wire.InvocationMode.SYNC)
        try:
            result = await self.dispatcher.invoke_and_wait(invocation, timeout_s)
        except LorafaasError as e:
            if isinstance(e, ServiceUnavailable):  # never published: nothing will answer it
                await self._fail_unpublished(invocation, e)
            raise
        if result.status == wire.ResultStatus.FAILED:
            raise error_for_code(result.error_code, result.error or "the invocation failed", invocation_id=invocation.invocation_id)
        return InvokeResponse(
            id=invocation.invocation_id,
            function=function_name,
            state=result.status.value,
            text=result.text,
            finish_reason=result.finish_reason,
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            ),
            timings=result.timings,
        )

    async def status(self, principal: Principal, invocation_id: str) -> InvocationStatus:
        async with self.sessions() as session:
            row = await invocations.get_for_tenant(session, principal.tenant_id, invocation_id)
        return status_of(row)


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def status_of(row: Invocation) -> InvocationStatus:
    usage = None
    if row.prompt_tokens is not None:
        usage = Usage(
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens or 0,
            total_tokens=row.prompt_tokens + (row.completion_tokens or 0),
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
        text=row.result_text,
        finish_reason=row.finish_reason,
        error=row.error,
        usage=usage,
    )
