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
    # A worker sends in_progress every quarter of this for each message it holds, so a live
    # worker never loses one; a dead worker's messages are redelivered within this of its death.
    ack_wait_s: float = 6.0
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
    # How long a finished invocation's result stays readable on GET /v1/invocations/{id}.
    result_ttl_s: float = 7 * 24 * 3600.0
    # An Idempotency-Key names the same invocation for this long, then may be reused.
    idempotency_ttl_s: float = 24 * 3600.0


class CallbackSettings(BaseModel):
    """Delivery of async results to the caller's URL: exponential backoff with jitter."""

    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0
    timeout_s: float = 5.0
    # Callbacks never go to loopback, link-local or private addresses except inside these networks
    # (CIDRs, e.g. ["10.20.0.0/16"] for a receiver inside the operator's own network).
    allowed_networks: list[str] = Field(default_factory=list)


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
    # Host-memory tier of parsed adapters; 0 disables it (every device reload reads disk).
    host_cache_bytes: int = 2 * 1024**3
    # How long a request may wait for device pool pages that running requests have pinned.
    pool_wait_s: float = 120.0
    report_interval_s: float = 1.0
    step_latency_target_s: float = 0.5
    heartbeat_interval_s: float = 5.0
    # An engine holding work without completing a step for this long is declared stuck: the
    # worker stops taking work, naks what it holds and exits non-zero.
    engine_stall_exit_s: float = 120.0
    # A joining worker waits this long for the control plane to prefetch its placements and
    # activate it; past it (no control plane) it takes traffic anyway.
    join_timeout_s: float = 30.0
    # Fetch a missing adapter from a peer worker's host memory before trying S3.
    peer_fetch: bool = True
    peer_fetch_timeout_s: float = 2.0
    # Larger adapters come from S3: measured crossover on this machine (docs/benchmarks.md, peer fetch).
    peer_fetch_max_bytes: int = 8_000_000


class SchedulerSettings(BaseModel):
    """The control plane's placement loop and the routing it publishes (issue 14)."""

    enabled: bool = True
    # "rank-aware" (LoRAServe placement) or "rank-oblivious" (the baseline: random placement).
    policy: str = "rank-aware"
    # Gateways: "affinity" routes by the placement table; "shared" puts every invocation on the
    # backbone's shared subject (the baseline's single queue).
    routing: str = "affinity"
    interval_s: float = 0.5
    # A worker whose reports stopped this long ago is dead: its queue is re-routed, its functions re-placed.
    dead_after_s: float = 5.0
    # Gateways spill an invocation to a less loaded worker when every holder of its adapter has more
    # than this many in flight: the engine prefills arrivals one at a time, so a burst on one holder
    # waits behind its own prefills while another worker idles (docs/benchmarks.md, three workers).
    spill_threshold: int = 2
    # A holder with more of one function's invocations in flight than this is contended (the plan
    # adds a replica); a backbone whose every active worker has more than ``saturated_queue`` in
    # flight sheds new invocations (429 with Retry-After).
    contended_queue: int = 8
    # Hysteresis: optional placement moves (each an adapter load on a serving worker) per live worker
    # per minute; a round makes at most PlacementConfig.max_moves of them.
    moves_per_minute_per_worker: float = 4.0
    saturated_queue: int = 64
    retry_after_s: float = 2.0
    # A gone worker's subject is still swept this long, for gateways routing on an old table.
    reroute_ttl_s: float = 120.0
    seed: int = 0
    # Device residency of placed adapters (issue 15): "off" keeps every placed adapter loaded;
    # "hazard" predicts (the idle-time histogram read as a hazard, ``controlplane.scheduler.predict``):
    # prefetch before a function's forecast arrival, unload when it is forecast idle; "reactive"
    # loads an adapter only when an invocation needs it (the S-LoRA-style baseline).
    predictor: str = "off"
    predictor_bucket_s: float = 5.0
    # Keep an adapter where the odds of an invocation in the next bucket reach this.
    predictor_threshold: float = 0.2


class ControlPlaneSettings(BaseModel):
    # A worker silent for longer than this is marked dead in the registry.
    worker_dead_after_s: float = 15.0
    # A worker whose heartbeat reports its engine stalled this long (or failed) is marked stuck,
    # not alive: its process answers, its engine does not.
    engine_stuck_after_s: float = 30.0
    # Platform cost of device time: integer micro-dollars per device-hour (a public on-demand GPU price).
    device_price_micros_per_hour: int = 2_500_000
    # Safety net beside NATS invalidation: a gateway re-reads a tenant's quota at least this often.
    quota_cache_ttl_s: float = 5.0
    # Gateways cache authenticated keys this long at most, so a revocation, expiry or suspension
    # is honoured within it even if the change announcement is lost.
    key_cache_ttl_s: float = 1.0
    # Invocations accepted longer ago than this no longer count as in flight for concurrency quotas.
    in_flight_horizon_s: float = 900.0


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
    callbacks: CallbackSettings = Field(default_factory=CallbackSettings)
    controlplane: ControlPlaneSettings = Field(default_factory=ControlPlaneSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.environment != "development":
            if self.admin_token == DEV_ADMIN_TOKEN:
                raise ValueError("LORAFAAS_ADMIN_TOKEN must be set outside development")
            if self.s3.secret_key == DEV_S3_SECRET:
                raise ValueError("LORAFAAS_S3__SECRET_KEY must be set outside development")
        return self
