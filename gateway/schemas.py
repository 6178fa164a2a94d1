"""HTTP request and response bodies of the native API."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from lorafaas.http_errors import check_text
from lorafaas.wire import InvocationMode, Timings

# Sampling bounds: a temperature between 0 and MIN_TEMPERATURE divides the logits into
# infinities (1e-300 overflowed the engine's softmax), and a smaller top_p than MIN_TOP_P
# keeps the top token anyway; 0 is greedy.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 2.0
MIN_TOP_P = 0.001
# Tokens one request may ask for: far above any function's limit (which refuses with a 400 naming
# it), low enough that sums with prompt tokens stay inside Postgres integers.
MAX_TOKENS_BOUND = 1 << 20
MAX_SEED = 2**63 - 1
# Client text: no NUL, no unpaired surrogate (neither can be queued or stored).
Text = Annotated[str, AfterValidator(check_text)]


class InvokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text = Field(min_length=1, description="The text to complete; must not be empty.")
    max_tokens: int = Field(
        default=64, ge=1, le=MAX_TOKENS_BOUND, strict=True, description="Tokens to generate, 1..the function's limit."
    )
    # Ranges checked by the validators below, so that every refusal names the whole range.
    temperature: float = Field(
        default=0.0,
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={"anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE}]},
        description=f"0 is greedy; otherwise {MIN_TEMPERATURE}..{MAX_TEMPERATURE}.",
    )
    top_p: float = Field(
        default=1.0,
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={"minimum": MIN_TOP_P, "maximum": 1.0},
        description=f"{MIN_TOP_P}..1.",
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, strict=True, description="Makes sampling reproducible; 0..2^63-1."
    )
    stop: list[Text] = Field(default_factory=list, max_length=4, description="Up to 4 stop strings.")
    mode: InvocationMode = Field(
        default=InvocationMode.SYNC,
        description="sync: wait for the result; stream: server-sent events, token by token; "
        "async: 202 with an id to poll.",
    )
    callback_url: Text | None = Field(
        default=None,
        max_length=2048,
        description="async only: POST the signed result here when the invocation finishes "
        "(public addresses only, unless the operator allows a network).",
    )

    @field_validator("temperature")
    @classmethod
    def _temperature_range(cls, value: float) -> float:
        if value != 0.0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p_range(cls, value: float) -> float:
        if not MIN_TOP_P <= value <= 1.0:
            raise ValueError(f"top_p must be between {MIN_TOP_P} and 1")
        return value

    @model_validator(mode="after")
    def _callback_only_async(self) -> InvokeRequest:
        if self.callback_url is not None:
            if self.mode != InvocationMode.ASYNC:
                raise ValueError("callback_url needs mode 'async'")
            if not self.callback_url.startswith(("http://", "https://")):
                raise ValueError("callback_url must be an http:// or https:// URL")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class InvokeResponse(BaseModel):
    id: str
    function: str
    state: str
    text: str
    finish_reason: str | None
    usage: Usage
    timings: Timings


class CallbackAttempt(BaseModel):
    attempt: int
    at: str
    status_code: int | None = None
    error: str | None = None
    duration_ms: float


class CallbackStatus(BaseModel):
    url: str
    state: str = Field(description="pending | delivered | failed")
    attempts: list[CallbackAttempt]


class InvocationStatus(BaseModel):
    id: str
    function_id: str
    mode: str
    state: str = Field(description="queued -> running -> succeeded | failed | cancelled")
    accepted_at: str
    started_at: str | None
    first_token_at: str | None
    finished_at: str | None
    cancel_requested_at: str | None = None
    text: str | None
    finish_reason: str | None
    error: str | None
    usage: Usage | None
    callback: CallbackStatus | None = None


class CallbackSecret(BaseModel):
    secret: str
    header: str
    scheme: str
