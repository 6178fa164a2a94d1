"""HTTP request and response bodies of the native API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lorafaas.wire import Timings


class InvokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, description="The text to complete; must not be empty.")
    max_tokens: int = Field(default=64, ge=1, description="Tokens to generate, 1..the function's limit.")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, description="Makes sampling reproducible.")
    stop: list[str] = Field(default_factory=list, max_length=4, description="Up to 4 stop strings.")


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


class InvocationStatus(BaseModel):
    id: str
    function_id: str
    mode: str
    state: str
    accepted_at: str
    started_at: str | None
    first_token_at: str | None
    finished_at: str | None
    text: str | None
    finish_reason: str | None
    error: str | None
    usage: Usage | None
