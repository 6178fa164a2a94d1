"""Pure logic of the gateway: chat template, signatures, backoff, request hashing."""

from __future__ import annotations

import pytest

from controlplane.callbacks import backoff_s, signature_header, verify
from gateway.admission import request_hash
from gateway.openai_schemas import ChatMessage, render_chat
from lorafaas.settings import CallbackSettings

pytestmark = pytest.mark.unit


def test_chat_template_is_the_documented_one() -> None:
    prompt = render_chat(
        [
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content=[{"type": "text", "text": "hi"}]),
        ]
    )
    assert prompt == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


def test_signature_verifies_and_refuses_tampering_and_staleness() -> None:
    body = b'{"id":"x"}'
    header = signature_header("whsec_test", body)
    assert verify("whsec_test", header, body)
    assert not verify("whsec_test", header, body + b" ")
    assert not verify("other", header, body)
    assert not verify("whsec_test", signature_header("whsec_test", body, timestamp=1), body)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    s = CallbackSettings(base_delay_s=1.0, max_delay_s=8.0)
    assert 0.5 <= backoff_s(1, s) <= 1.5 and 1.0 <= backoff_s(2, s) <= 3.0
    assert backoff_s(10, s) <= 12.0


def test_request_hash_ignores_key_order() -> None:
    assert (
        request_hash("f", {"a": 1, "b": 2})
        == request_hash("f", {"b": 2, "a": 1})
        != request_hash("g", {"a": 1, "b": 2})
    )
