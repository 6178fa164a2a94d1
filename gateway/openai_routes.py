"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

``model`` names one of the tenant's functions; ``parent`` of a model is its backbone.
Errors already come in OpenAI's shape (``lorafaas.http_errors``). Streams follow OpenAI's
SSE: ``data: {chunk}`` lines, the last chunk carrying ``finish_reason`` and ``usage``,
then ``data: [DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.deps import PrincipalDep, ServiceDep
from gateway.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelList,
    ModelObject,
    to_invoke,
)
from gateway.routes import SSE_CONTENT, SUBMIT_ERRORS, IdempotencyKey, replay_headers
from gateway.service import Accepted, raise_for_failure, usage_of
from gateway.streaming import error_event, event_stream, guarded, sse
from lorafaas import wire
from lorafaas.errors import NotFound
from lorafaas.http_errors import error_responses

router = APIRouter(prefix="/v1", tags=["openai"])


def finish_reason(reason: str | None) -> str:
    # OpenAI knows stop and length; a cancelled or stop-string end reads as "stop".
    return "length" if reason == "length" else "stop"


def _model(served) -> dict:
    fn = served.function
    return {
        "id": fn.name,
        "object": "model",
        "created": int(fn.created_at.timestamp()) if fn.created_at else 0,
        "owned_by": fn.tenant_id,
        "parent": served.backbone.name,
        "root": served.backbone.name,
    }


@router.get("/models", response_model=ModelList, responses=error_responses(400, 401, 503))
async def list_models(principal: PrincipalDep, service: ServiceDep) -> dict:
    """The tenant's functions as models."""
    return {"object": "list", "data": [_model(s) for s in await service.functions(principal)]}


@router.get("/models/{model}", response_model=ModelObject, responses=error_responses(400, 401, 404, 503))
async def get_model(model: str, principal: PrincipalDep, service: ServiceDep) -> dict:
    for served in await service.functions(principal):
        if served.function.name == model:
            return _model(served)
    raise NotFound(f"model '{model}' not found", param="model")


def _completion_choice(result: wire.InvocationResult, chat: bool) -> dict:
    if chat:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": None,
            "finish_reason": finish_reason(result.finish_reason),
        }
    return {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish_reason(result.finish_reason)}


async def _complete(
    body: CompletionRequest | ChatCompletionRequest, chat: bool, principal, service, request: Request, key: str | None
):
    req = to_invoke(body)
    accepted = await service.accept(
        principal, body.model, req, key, hashed_body={"openai": body.model_dump(mode="json"), "chat": chat}
    )
    timeout = request.app.state.runtime.settings.limits.sync_timeout_s
    created = int(time.time())
    if body.stream:
        items = await service.open_stream(accepted, timeout)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_openai_events(accepted, items, chat, created, include_usage), replay_headers(accepted))
    result = await service.invoke_sync(accepted, timeout)
    payload = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{accepted.invocation_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": body.model,
        "choices": [_completion_choice(result, chat)],
        "usage": usage_of(result.prompt_tokens, result.completion_tokens).model_dump(),
    }
    return JSONResponse(payload, headers=replay_headers(accepted))


async def _openai_events(
    accepted: Accepted,
    items: AsyncIterator[wire.TokenChunk | wire.InvocationResult],
    chat: bool,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{accepted.invocation_id}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": accepted.function,
    }

    def chunk(text: str | None, reason: str | None, first: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}

    async def events() -> AsyncIterator[str]:
        if chat:
            yield sse(chunk(None, None, first=True))
        async for item in items:
            if isinstance(item, wire.TokenChunk):
                if item.text:
                    yield sse(chunk(item.text, None))
                continue
            raise_for_failure(item)
            usage = usage_of(item.prompt_tokens, item.completion_tokens).model_dump()
            # The usage rides on the finishing chunk; with include_usage also in its own chunk, as OpenAI does.
            yield sse({**chunk(None if chat else "", finish_reason(item.finish_reason)), "usage": usage})
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage})
        yield sse("[DONE]")

    async for line in guarded(events(), lambda e: error_event(e, event=None)):
        yield line


def _answers(model: type) -> dict:
    return {
        200: {
            "model": model,
            "description": "The completion (JSON), or with stream=true server-sent events "
            "of chunks ending with 'data: [DONE]'",
            "content": SSE_CONTENT,
        },
        **SUBMIT_ERRORS,
    }


@router.post("/completions", responses=_answers(Completion))
async def completions(
    body: CompletionRequest,
    principal: PrincipalDep,
    service: ServiceDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
):
    """OpenAI ``/v1/completions``; ``model`` is the function name."""
    return await _complete(body, False, principal, service, request, idempotency_key)


@router.post("/chat/completions", responses=_answers(ChatCompletion))
async def chat_completions(
    body: ChatCompletionRequest,
    principal: PrincipalDep,
    service: ServiceDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
):
    """OpenAI ``/v1/chat/completions``, with messages rendered by the documented chat template."""
    return await _complete(body, True, principal, service, request, idempotency_key)
