"""The official ``openai`` package against the OpenAI-compatible routes, streaming included."""

from __future__ import annotations

import openai
import pytest

from tests.support.platform import Platform

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


def client(platform: Platform, tenant: str = "alpha") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{platform.url}/v1", api_key=platform.keys[tenant], max_retries=0, timeout=60)


async def test_models_are_the_tenants_functions(platform: Platform) -> None:
    models = [m async for m in client(platform).models.list()]
    by_id = {m.id: m for m in models}
    assert {"alpha-a8", "alpha-b16"} <= set(by_id) and "beta-c32" not in by_id
    assert by_id["alpha-a8"].model_extra["parent"] == "tiny"


async def test_completions_stream_and_non_stream_agree(platform: Platform) -> None:
    api = client(platform)
    done = await api.completions.create(model="alpha-a8", prompt="the quick brown fox", max_tokens=8, temperature=0)
    chunks = [
        c
        async for c in await api.completions.create(
            model="alpha-a8",
            prompt="the quick brown fox",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert done.choices[0].text == text and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens == chunks[-1].usage.completion_tokens >= 1
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


async def test_chat_completions_stream_and_non_stream_agree(platform: Platform) -> None:
    api = client(platform)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}]
    done = await api.chat.completions.create(model="alpha-b16", messages=messages, max_tokens=8, temperature=0)
    stream = await api.chat.completions.create(
        model="alpha-b16", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content == text
    assert done.usage.completion_tokens >= 1 and chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_errors_come_in_openai_shape(platform: Platform) -> None:
    api = client(platform)
    with pytest.raises(openai.NotFoundError) as missing:
        await api.completions.create(model="beta-c32", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as too_long:
        await api.completions.create(model="alpha-a8", prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError) as context:
        await api.completions.create(model="alpha-a8", prompt="fox " * 600, max_tokens=8)
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{platform.url}/v1", api_key="lf_wrong", max_retries=0).models.list()
    assert "function 'beta-c32' not found" in missing.value.message
    assert too_long.value.body["param"] == "max_tokens" and "limit of 64" in too_long.value.message
    assert "context of 512 tokens" in context.value.message and context.value.body["limit"] == 512
