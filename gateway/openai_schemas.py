"""OpenAI-compatible request bodies, the chat template, and the translation to a native request.

The backbones' tokenizers have no chat template, so chat messages are rendered with this
fixed one (documented in docs/api.md)::

    <|system|>
    {system content}
    <|user|>
    {user content}
    <|assistant|>
    {assistant content}
    ...
    <|assistant|>

The trailing ``<|assistant|>`` line asks the model for the next assistant turn.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.schemas import InvokeRequest
from lorafaas.errors import InvalidInput
from lorafaas.wire import InvocationMode

ROLES = ("system", "user", "assistant", "developer", "tool")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    # OpenAI clients send fields this platform does not use (user, logprobs, ...): ignore them.
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="The function name.")
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def _text(content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise InvalidInput(
                f"message content of type {part.get('type')!r} is not supported; send text", param="messages"
            )
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def render_chat(messages: list[ChatMessage]) -> str:
    """The documented template: one ``<|role|>`` line, then the content, per message."""
    role = {"developer": "system"}
    lines = [f"<|{role.get(m.role, m.role)}|>\n{_text(m.content)}\n" for m in messages]
    return "".join(lines) + "<|assistant|>\n"


def _prompt(body: CompletionRequest) -> str:
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise InvalidInput("send exactly one prompt per request; batched prompts are not supported", param="prompt")
    return body.prompt[0]


def to_invoke(body: CompletionRequest | ChatCompletionRequest) -> InvokeRequest:
    """The native request an OpenAI body stands for; a bad value is a 400 naming its field."""
    if body.n not in (None, 1):
        raise InvalidInput("n must be 1", param="n")
    if isinstance(body, ChatCompletionRequest):
        prompt, max_tokens = render_chat(body.messages), body.max_completion_tokens or body.max_tokens or 64
    else:
        prompt, max_tokens = _prompt(body), body.max_tokens or 16
    fields = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else (body.stop or []),
        "mode": InvocationMode.STREAM if body.stream else InvocationMode.SYNC,
    }
    try:
        return InvokeRequest(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ()))
        raise InvalidInput(f"{param}: {err.get('msg')}", param=param) from e
