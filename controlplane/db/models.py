"""The schema, as SQLAlchemy 2 declarative models. Alembic (``migrations/``) creates it.

Money: prices are integer micro-dollars per 1M tokens; amounts are integer pico-dollars
(tokens x micro-dollars-per-1M = 1e-12 dollars), so no single request is ever rounded.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


Timestamp = DateTime(timezone=True)


class TenantStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class InvocationState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (InvocationState.SUCCEEDED, InvocationState.FAILED, InvocationState.CANCELLED)


# Queued or running: what counts against queue limits and concurrency quotas.
IN_FLIGHT = (InvocationState.QUEUED, InvocationState.RUNNING)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=TenantStatus.ACTIVE)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    monthly_spend_cap_picousd: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    suspended_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Signs callbacks (HMAC-SHA256); made on first use, shown to the tenant on GET /v1/callbacks/secret.
    callback_secret: Mapped[str | None] = mapped_column(String(64))


class ApiKey(Base):
    """Only the SHA-256 of the secret is stored, with a short visible prefix to tell keys apart."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Backbone(Base):
    __tablename__ = "backbones"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    uri: Mapped[str] = mapped_column(Text)  # local folder or s3://bucket/prefix
    shape: Mapped[dict] = mapped_column(JSON, default=dict)
    max_context: Mapped[int] = mapped_column(Integer, default=2048)
    default_price_input_micros_per_1m: Mapped[int] = mapped_column(BigInteger, default=0)
    default_price_output_micros_per_1m: Mapped[int] = mapped_column(BigInteger, default=0)
    # Limits a new function on this backbone gets unless the operator sets its own.
    default_max_tokens: Mapped[int | None] = mapped_column(Integer)
    default_max_queue: Mapped[int | None] = mapped_column(Integer)
    # Other names the base model is known by (a Hub id); adapter_config.json may name any of them.
    aliases: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class Function(Base):
    __tablename__ = "functions"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", name="uq_functions_tenant_name"),
        CheckConstraint(
            "price_input_micros_per_1m >= 0 AND price_output_micros_per_1m >= 0", name="ck_functions_prices"
        ),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    backbone_id: Mapped[str] = mapped_column(ForeignKey("backbones.id"))
    # The artifact version the function serves now; older versions stay for rollback.
    artifact_id: Mapped[str | None] = mapped_column(
        ForeignKey("adapter_artifacts.id", use_alter=True, name="fk_functions_artifact")
    )
    price_input_micros_per_1m: Mapped[int] = mapped_column(BigInteger)
    price_output_micros_per_1m: Mapped[int] = mapped_column(BigInteger)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    max_queue: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now(), onupdate=func.now())


class AdapterArtifact(Base):
    """One stored version of a function's PEFT folder, keyed by content hash in S3."""

    __tablename__ = "adapter_artifacts"
    __table_args__ = (UniqueConstraint("function_id", "version", name="uq_artifacts_function_version"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    function_id: Mapped[str] = mapped_column(ForeignKey("functions.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    bucket: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    rank: Mapped[int] = mapped_column(Integer)
    target_modules: Mapped[list[str]] = mapped_column(JSON, default=list)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class Invocation(Base):
    __tablename__ = "invocations"
    __table_args__ = (
        Index("ix_invocations_tenant_accepted", "tenant_id", "accepted_at"),
        Index("ix_invocations_function_state", "function_id", "state"),
        # Quota checks count a tenant's in-flight invocations on every accept.
        Index("ix_invocations_tenant_state", "tenant_id", "state"),
        # The scheduler's arrival history counts invocations per function and time bucket.
        Index("ix_invocations_accepted", "accepted_at", postgresql_include=["function_id"]),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_invocations_idempotency"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    function_id: Mapped[str] = mapped_column(ForeignKey("functions.id", ondelete="CASCADE"))
    artifact_id: Mapped[str] = mapped_column(ForeignKey("adapter_artifacts.id"))
    mode: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=InvocationState.QUEUED)
    request: Mapped[dict] = mapped_column(JSON, default=dict)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    # The price at invocation time: a later price change never touches this invocation.
    price_input_micros_per_1m: Mapped[int] = mapped_column(BigInteger)
    price_output_micros_per_1m: Mapped[int] = mapped_column(BigInteger)
    accepted_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    first_token_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    result_text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    timings: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    # Async callbacks: where to POST the result, pending|delivered|failed, and every attempt.
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_state: Mapped[str | None] = mapped_column(String(16), index=True)
    callback_attempts: Mapped[list[dict] | None] = mapped_column(JSON)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(Timestamp)


class UsageRecord(Base):
    """Exactly one per finished invocation (unique on invocation_id)."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_tenant_time", "tenant_id", "recorded_at"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    invocation_id: Mapped[str] = mapped_column(ForeignKey("invocations.id", ondelete="CASCADE"), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    function_id: Mapped[str] = mapped_column(ForeignKey("functions.id", ondelete="CASCADE"), index=True)
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    price_input_micros_per_1m: Mapped[int] = mapped_column(BigInteger)
    price_output_micros_per_1m: Mapped[int] = mapped_column(BigInteger)
    amount_picousd: Mapped[int] = mapped_column(BigInteger)
    device_ns: Mapped[int] = mapped_column(BigInteger, default=0)
    worker_id: Mapped[str] = mapped_column(String(128), default="")
    recorded_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class Worker(Base):
    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    backbone: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(64), default="cpu")
    status: Mapped[str] = mapped_column(String(16), default="alive")
    started_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    last_heartbeat_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    dead_at: Mapped[datetime | None] = mapped_column(Timestamp)
