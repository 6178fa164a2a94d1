"""HTTP request and response bodies of the native API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorafaas.wire import InvocationMode, Timings


class InvokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, description="The text to complete; must not be empty.")
    max_tokens: int = Field(default=64, ge=1, description="Tokens to generate, 1..the function's limit.")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, description="Makes sampling reproducible.")
    stop: list[str] = Field(default_factory=list, max_length=4, description="Up to 4 stop strings.")
    mode: InvocationMode = Field(
        default=InvocationMode.SYNC,
        description="sync: wait for the result; stream: server-sent events, token by token; async: 202 with an id to poll.",
    )
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description="async only: POST the signed result here when the invocation finishes.",
    )

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
