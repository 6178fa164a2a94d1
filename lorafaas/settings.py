"""Settings per concern, read from the environment (prefix ``LORAFAAS_``) only when built.

Nothing here is read at import time: services build one ``Settings`` in their factory and
pass it down.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_S3_SECRET = "lorafaas-dev-secret"


class NatsSettings(BaseModel):
    url: str = "nats://127.0.0.1:4222"
    # Prefix of every subject and stream name, so tests and demos can share one server.
    prefix: str = "lorafaas"
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    max_queue_per_function: int = 256


class DatabaseSettings(BaseModel):
    url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/lorafaas"
    pool_size: int = 10


class S3Settings(BaseModel):
    endpoint: str = "127.0.0.1:9000"
    access_key: str = "lorafaas"
    secret_key: str = DEV_S3_SECRET
    bucket: str = "lorafaas"
    secure: bool = False
    region: str = "us-east-1"


class LimitSettings(BaseModel):
    max_tokens: int = 256
    max_prompt_chars: int = 32_000
    sync_timeout_s: float = 60.0
    max_adapter_rank: int = 128
    max_adapter_bytes: int = 512 * 1024 * 1024


class WorkerSettings(BaseModel):
    worker_id: str = "worker-0"
    backbone: str = "demo"  # backbone name the worker serves; its invocations subject
    backbone_uri: str = ""  # local folder or s3://bucket/prefix of a Hugging Face folder
    cache_dir: Path = Path(".lorafaas/cache")
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"
    max_batch: int = 16
    # Pool pages of the paged adapter memory; 0 lets the engine size the pool itself.
    pool_pages: int = 0
    report_interval_s: float = 1.0
    step_latency_target_s: float = 0.5
    heartbeat_interval_s: float = 5.0


class Settings(BaseSettings):
    """Every setting of the platform; ``LORAFAAS_NATS__URL`` sets ``nats.url`` and so on."""

    model_config = SettingsConfigDict(env_prefix="LORAFAAS_", env_nested_delimiter="__", extra="ignore")

    environment: str = "development"
    admin_token: str = DEV_ADMIN_TOKEN
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    controlplane_host: str = "127.0.0.1"
    controlplane_port: int = 8081
    nats: NatsSettings = Field(default_factory=NatsSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> "Settings":
        if self.environment != "development":
            if self.admin_token == DEV_ADMIN_TOKEN:
                raise ValueError("LORAFAAS_ADMIN_TOKEN must be set outside development")
            if self.s3.secret_key == DEV_S3_SECRET:
                raise ValueError("LORAFAAS_S3__SECRET_KEY must be set outside development")
        return self
