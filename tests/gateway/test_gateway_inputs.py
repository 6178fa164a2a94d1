"""Hostile and unsupported input on the gateway is a 4xx naming the problem, never a 500 or a
silent change: NUL characters, unbounded numbers, booleans as numbers, sampling parameters
outside their range, OpenAI parameters the platform does not support, scopes, callback
destinations, and bodies sent without a JSON content type (as ``curl -d`` does)."""

from __future__ import annotations

import json

import httpx
import pytest

from launcher.platform import create_api_key
from tests.support.platform import Platform

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

INVOKE = "/v1/functions/alpha-a8/invoke"


def _bad_request(response: httpx.Response, param: str) -> str:
    """The error message of a 400 whose ``param`` (or message) names ``param``."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param or param in error["message"], error
    return error["message"]


async def test_nul_characters_are_400_or_404(platform: Platform) -> None:
    async with platform.client("alpha") as client:
        assert (await client.get("/v1/invocations/%00")).status_code == 400
        assert (await client.post("/v1/invocations/%00/cancel")).status_code == 400
        assert (await client.post("/v1/functions/a%00b/invoke", json={"prompt": "hi"})).status_code == 400
        assert (await client.get("/v1/models/a%00b")).status_code == 400
        assert (await client.get("/v1/models?x=%00")).status_code == 400
        for route, body in (
            ("/v1/completions", {"model": "alpha\u0000a8", "prompt": "hi", "max_tokens": 2}),
            ("/v1/chat/completions", {"model": "\u0000", "messages": [{"role": "user", "content": "hi"}]}),
        ):
            response = await client.post(route, json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == "model", response.text
        for body in ({"prompt": "a\u0000b"}, {"prompt": "hi", "stop": ["\u0000"]}, {"prompt": "\ud800"}):
            raw = json.dumps(body).encode()  # \ud800: an unpaired surrogate, which UTF-8 cannot carry
            response = await client.post(INVOKE, content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 400, response.text
        job = {"prompt": "hi", "max_tokens": 2, "mode": "async", "callback_url": "https://example.com/\u0000"}
        _bad_request(await client.post(INVOKE, json=job), "callback_url")


async def test_unbounded_numbers_and_booleans_are_refused(platform: Platform) -> None:
    async with platform.client("alpha") as client:
        for body, param in (
            ({"max_tokens": 2**31}, "max_tokens"),
            ({"max_tokens": True}, "max_tokens"),
            ({"seed": 2**63}, "seed"),
            ({"seed": -1}, "seed"),
            ({"seed": True}, "seed"),
            ({"temperature": True}, "temperature"),
        ):
            _bad_request(await client.post(INVOKE, json={"prompt": "hi", **body}), param)
        for body, param in (
            ({"max_tokens": 2**31}, "max_tokens"),
            ({"seed": 2**63}, "seed"),
            ({"max_tokens": False}, "max_tokens"),
        ):
            response = await client.post("/v1/completions", json={"model": "alpha-a8", "prompt": "hi", **body})
            _bad_request(response, param)


async def test_sampling_parameters_out_of_range_name_the_range(platform: Platform) -> None:
    async with platform.client("alpha") as client:
        for temperature in (1e-300, 2.2e-308, 1e-40, 0.001, 2.5, -1):
            message = _bad_request(
                await client.post(INVOKE, json={"prompt": "hi", "max_tokens": 2, "temperature": temperature}),
                "temperature",
            )
            assert "between 0.01 and 2" in message, message
        for top_p in (1e-50, 0, 1.5):
            _bad_request(await client.post(INVOKE, json={"prompt": "hi", "max_tokens": 2, "top_p": top_p}), "top_p")
        response = await client.post(
            "/v1/completions", json={"model": "alpha-a8", "prompt": "hi", "max_tokens": 2, "temperature": 1e-300}
        )
        _bad_request(response, "temperature")
        # The edges of the ranges are served.
        ok = await client.post(INVOKE, json={"prompt": "hi", "max_tokens": 2, "temperature": 0.01, "top_p": 0.001})
        assert ok.status_code == 200 and ok.json()["state"] == "succeeded", ok.text


async def test_openai_max_tokens_zero_and_unsupported_parameters_are_400(platform: Platform) -> None:
    completion = {"model": "alpha-a8", "prompt": "hi"}
    chat = {"model": "alpha-a8", "messages": [{"role": "user", "content": "hi"}]}
    async with platform.client("alpha") as client:
        _bad_request(await client.post("/v1/completions", json={**completion, "max_tokens": 0}), "max_tokens")
        _bad_request(await client.post("/v1/chat/completions", json={**chat, "max_tokens": 0}), "max_tokens")
        _bad_request(
            await client.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 0}),
            "max_completion_tokens",
        )
        for param, value in (
            ("logprobs", 5),
            ("echo", True),
            ("best_of", 3),
            ("suffix", "tail"),
            ("frequency_penalty", 0.5),
            ("presence_penalty", -1),
            ("logit_bias", {"50256": -100}),
        ):
            body = {**completion, "max_tokens": 2, param: value}
            message = _bad_request(await client.post("/v1/completions", json=body), param)
            assert "not supported" in message
        for param, value in (
            ("tools", [{"type": "function", "function": {"name": "f"}}]),
            ("response_format", {"type": "json_object"}),
            ("logprobs", True),
        ):
            body = {**chat, "max_tokens": 2, param: value}
            _bad_request(await client.post("/v1/chat/completions", json=body), param)
        # What clients send by default asks for nothing unsupported, and is served.
        defaults = {"logprobs": None, "echo": False, "frequency_penalty": 0, "presence_penalty": 0.0, "best_of": 1}
        response = await client.post("/v1/completions", json={**completion, "max_tokens": 2, **defaults})
        assert response.status_code == 200, response.text


async def test_results_and_the_callback_secret_need_the_invoke_scope(platform: Platform) -> None:
    async with platform.client("alpha") as client:
        job = await client.post(INVOKE, json={"prompt": "hi", "max_tokens": 2, "mode": "async"})
        assert job.status_code == 202
    for scopes in (("read-usage",), ("manage-functions",), ("read-usage", "manage-functions")):
        _, secret = await create_api_key(platform.settings, platform.tenant_ids["alpha"], scopes=scopes)
        async with platform.client(key=secret) as limited:
            for response in (
                await limited.get(f"/v1/invocations/{job.json()['id']}"),
                await limited.get("/v1/callbacks/secret"),
                await limited.post(f"/v1/invocations/{job.json()['id']}/cancel"),
            ):
                assert response.status_code == 403 and "invoke" in response.json()["error"]["message"], response.text
    _, invoker = await create_api_key(platform.settings, platform.tenant_ids["alpha"], scopes=("invoke",))
    async with platform.client(key=invoker) as client:
        assert (await client.get(f"/v1/invocations/{job.json()['id']}")).status_code == 200
        assert (await client.get("/v1/callbacks/secret")).status_code == 200


async def test_callbacks_to_private_addresses_are_refused(platform: Platform) -> None:
    # The test settings allow 127.0.0.0/8 (the receivers of the callback tests); nothing else private.
    async with platform.client("alpha") as client:
        for url in (
            "http://10.1.2.3/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://192.168.0.1:8080/",
            "http://[::1]/hook",
            "http://[fe80::1]/hook",
            "http://0.0.0.0/",
            "http://[::ffff:10.0.0.1]/",
            "ftp://example.com/hook",
            "http://example.com:99999/hook",
        ):
            body = {"prompt": "hi", "max_tokens": 2, "mode": "async", "callback_url": url}
            _bad_request(await client.post(INVOKE, json=body), "callback_url")


async def test_json_bodies_without_a_json_content_type_are_read_as_json(platform: Platform) -> None:
    """What the curl examples in docs/api.md send: ``-d '{...}'`` without ``-H content-type``."""
    body = json.dumps({"prompt": "the quick brown fox", "max_tokens": 2}).encode()
    async with platform.client("alpha") as client:
        for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):
            response = await client.post(INVOKE, content=body, headers=headers)  # no content type unless given
            assert response.status_code == 200 and response.json()["state"] == "succeeded", (headers, response.text)
        chat = json.dumps({"model": "alpha-a8", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        response = await client.post(
            "/v1/chat/completions", content=chat, headers={"content-type": "application/x-www-form-urlencoded"}
        )
        assert response.status_code == 200, response.text
