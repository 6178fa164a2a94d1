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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.schemas import MAX_TOKENS_BOUND, InvokeRequest, Text, Usage
from lorafaas.errors import InvalidInput
from lorafaas.wire import InvocationMode

ROLES = ("system", "user", "assistant", "developer", "tool")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


# OpenAI parameters this platform does not support, each with the value that asks for nothing
# (what clients send by default): any other value is a 400 naming the parameter, never ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}


class _Common(BaseModel):
    # OpenAI clients send fields that do not change the answer (user, metadata, store, ...): ignore those.
    model_config = ConfigDict(extra="allow")
    model: Text = Field(max_length=128, description="The function name.")
    temperature: float | None = Field(
        default=None, strict=True, description="0 is greedy; otherwise 0.01..2 (default 1)."
    )
    top_p: float | None = Field(default=None, strict=True, description="0.001..1 (default 1).")
    n: int | None = Field(default=None, strict=True, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, strict=True, description="0..2^63-1; makes sampling reproducible.")


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, strict=True, ge=1, le=MAX_TOKENS_BOUND, description="Default 16.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, strict=True, ge=1, le=MAX_TOKENS_BOUND, description="Default 64.")
    max_completion_tokens: int | None = Field(default=None, strict=True, ge=1, le=MAX_TOKENS_BOUND)


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


def refuse_unsupported(body: _Common) -> None:
    """A 400 naming the first parameter that asks for something this platform does not do."""
    for name, harmless in UNSUPPORTED.items():
        value = (body.model_extra or {}).get(name)
        if not any(value == h and type(value) is type(h) for h in harmless):
            raise InvalidInput(f"'{name}' is not supported by this platform; leave it out", param=name)


def _first(*values: int | None, default: int) -> int:
    return next((v for v in values if v is not None), default)


def to_invoke(body: CompletionRequest | ChatCompletionRequest) -> InvokeRequest:
    """The native request an OpenAI body stands for; a bad value is a 400 naming its field."""
    refuse_unsupported(body)
    if body.n not in (None, 1):
        raise InvalidInput("n must be 1", param="n")
    if isinstance(body, ChatCompletionRequest):
        prompt, max_tokens = render_chat(body.messages), _first(body.max_completion_tokens, body.max_tokens, default=64)
    else:
        prompt, max_tokens = _prompt(body), _first(body.max_tokens, default=16)
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


# --- responses, as documented in the OpenAPI document -------------------------------------------
class ModelObject(BaseModel):
    id: str = Field(description="The function name")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field(description="The tenant id")
    parent: str = Field(description="The backbone")
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
