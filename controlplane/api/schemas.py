"""Request and response bodies of the control plane API. Money is integer pico-dollars,
with an exact decimal-dollar string beside it for people."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from controlplane.db.models import AdapterArtifact, ApiKey, Backbone, Invocation, Tenant, Worker
from controlplane.services import ledger
from controlplane.services.functions import ServedFunction
from lorafaas.http_errors import check_text
from lorafaas.scopes import ALL_SCOPES, Scope

T = TypeVar("T")

# Bounds of every number a client may send: Postgres integer and bigint columns, and sums that
# must stay inside bigint (price x tokens <= 10^12 x 2^20 < 2^63). Booleans are not numbers here.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_PRICE = 10**12  # micro-dollars per 1M tokens: $1M per 1M tokens
MAX_TOKENS = 1 << 20  # per request; also the largest context a backbone may declare
MAX_KEY_LIFETIME_S = 100 * 365 * 24 * 3600.0
MAX_UNIX_S = 32_503_680_000  # 3000-01-01: times past it are typos, and year 10000 would overflow


Text = Annotated[str, AfterValidator(check_text)]
Price = Annotated[int, Field(strict=True, ge=0, le=MAX_PRICE, description="Micro-dollars per 1M tokens")]
Int32 = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
Int64 = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
Tokens = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS)]
Positive32 = Annotated[int, Field(strict=True, ge=1, le=INT32_MAX)]


def usd(picousd: int) -> str:
    return str(ledger.picousd_to_usd(picousd))


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- tenants and keys -------------------------------------------------------------------
class QuotaBody(Body):
    tokens_per_minute: Int64 | None = None
    max_concurrency: Int32 | None = None
    monthly_spend_cap_picousd: Int64 | None = Field(default=None, description="1 USD = 10**12")


class TenantCreate(QuotaBody):
    name: Text = Field(min_length=1, max_length=128)


class TenantOut(BaseModel):
    id: str
    name: str
    status: str
    tokens_per_minute: int | None
    max_concurrency: int | None
    monthly_spend_cap_picousd: int | None
    created_at: datetime
    suspended_at: datetime | None

    @classmethod
    def of(cls, t: Tenant) -> TenantOut:
        return cls(
            id=t.id,
            name=t.name,
            status=t.status,
            tokens_per_minute=t.tokens_per_minute,
            max_concurrency=t.max_concurrency,
            monthly_spend_cap_picousd=t.monthly_spend_cap_picousd,
            created_at=t.created_at,
            suspended_at=t.suspended_at,
        )


class KeyCreate(Body):
    name: Text = Field(default="", max_length=128)
    scopes: list[Scope] = Field(default_factory=lambda: list(ALL_SCOPES), min_length=1)
    expires_at: AwareDatetime | None = Field(
        default=None, description="With a time zone, e.g. 2027-01-01T00:00:00Z; before the year 3000"
    )
    expires_in_s: float | None = Field(
        default=None, gt=0, le=MAX_KEY_LIFETIME_S, strict=True, allow_inf_nan=False, description="At most 100 years"
    )

    @field_validator("expires_at")
    @classmethod
    def _expires_in_range(cls, value: datetime | None) -> datetime | None:
        if value is not None and not 0 <= value.timestamp() <= MAX_UNIX_S:
            raise ValueError("must be between 1970 and the year 3000")
        return value

    def expiry(self) -> datetime | None:
        """When the key stops working: ``expires_at``, else ``expires_in_s`` from now, else never."""
        if self.expires_at or not self.expires_in_s:
            return self.expires_at
        return datetime.now(UTC) + timedelta(seconds=self.expires_in_s)


class KeyOut(BaseModel):
    id: str
    tenant_id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, k: ApiKey) -> KeyOut:
        return cls(
            id=k.id,
            tenant_id=k.tenant_id,
            name=k.name,
            prefix=k.prefix,
            scopes=list(k.scopes),
            created_at=k.created_at,
            expires_at=k.expires_at,
            revoked_at=k.revoked_at,
        )


class KeyCreated(KeyOut):
    secret: str = Field(description="Shown once; only its hash is stored.")


# --- backbones and functions ------------------------------------------------------------
class BackboneDefaults(Body):
    default_price_input_micros_per_1m: Price | None = None
    default_price_output_micros_per_1m: Price | None = None
    default_max_tokens: Tokens | None = None
    default_max_queue: Positive32 | None = None
    aliases: list[Annotated[Text, Field(min_length=1, max_length=256)]] | None = Field(default=None, max_length=64)


class BackboneCreate(BackboneDefaults):
    name: Text = Field(min_length=1, max_length=128)
    uri: Text = Field(
        min_length=1,
        max_length=1024,
        description="A local folder (uploaded to S3) or s3://bucket/prefix of a Hugging Face folder",
    )
    shape: dict[str, Int32] | None = Field(default=None, description="Taken from config.json when omitted")
    max_context: Tokens | None = None


class BackboneOut(BaseModel):
    id: str
    name: str
    uri: str
    shape: dict
    max_context: int
    aliases: list[str]
    default_price_input_micros_per_1m: int
    default_price_output_micros_per_1m: int
    default_max_tokens: int | None
    default_max_queue: int | None

    @classmethod
    def of(cls, b: Backbone) -> BackboneOut:
        return cls(
            id=b.id,
            name=b.name,
            uri=b.uri,
            shape=b.shape or {},
            max_context=b.max_context,
            aliases=list(b.aliases or []),
            default_price_input_micros_per_1m=b.default_price_input_micros_per_1m,
            default_price_output_micros_per_1m=b.default_price_output_micros_per_1m,
            default_max_tokens=b.default_max_tokens,
            default_max_queue=b.default_max_queue,
        )


class FunctionUpdate(Body):
    price_input_micros_per_1m: Price | None = None
    price_output_micros_per_1m: Price | None = None
    max_tokens: Tokens | None = None
    max_queue: Positive32 | None = None


class VersionOut(BaseModel):
    version: int
    sha256: str
    rank: int
    target_modules: list[str]
    size_bytes: int
    created_at: datetime | None
    serving: bool

    @classmethod
    def of(cls, a: AdapterArtifact, serving_id: str | None) -> VersionOut:
        return cls(
            version=a.version,
            sha256=a.sha256,
            rank=a.rank,
            target_modules=list(a.target_modules),
            size_bytes=a.size_bytes,
            created_at=a.created_at,
            serving=a.id == serving_id,
        )


class FunctionOut(BaseModel):
    id: str
    object: Literal["function"] = "function"
    name: str
    tenant_id: str
    backbone: str
    version: int
    rank: int
    sha256: str
    price_input_micros_per_1m: int
    price_output_micros_per_1m: int
    max_tokens: int | None
    max_queue: int | None
    created_at: datetime | None

    @classmethod
    def of(cls, s: ServedFunction) -> FunctionOut:
        f, a = s.function, s.artifact
        return cls(
            id=f.id,
            name=f.name,
            tenant_id=f.tenant_id,
            backbone=s.backbone.name,
            version=a.version,
            rank=a.rank,
            sha256=a.sha256,
            price_input_micros_per_1m=f.price_input_micros_per_1m,
            price_output_micros_per_1m=f.price_output_micros_per_1m,
            max_tokens=f.max_tokens,
            max_queue=f.max_queue,
            created_at=f.created_at,
        )


class VersionsOut(BaseModel):
    function: str
    data: list[VersionOut]


class RollbackBody(Body):
    version: Positive32 | None = Field(default=None, description="Default: the version before the one served now")


# --- invocations, usage, bills ----------------------------------------------------------
class InvocationOut(BaseModel):
    id: str
    function_id: str
    mode: str
    state: str
    accepted_at: datetime
    finished_at: datetime | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None

    @classmethod
    def of(cls, i: Invocation) -> InvocationOut:
        return cls(
            id=i.id,
            function_id=i.function_id,
            mode=i.mode,
            state=i.state,
            accepted_at=i.accepted_at,
            finished_at=i.finished_at,
            prompt_tokens=i.prompt_tokens,
            completion_tokens=i.completion_tokens,
            error=i.error,
        )


class InvocationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InvocationOut]


class Amount(BaseModel):
    value: str = Field(description="Exact decimal dollars")
    currency: Literal["usd"] = "usd"


class UsageResult(BaseModel):
    """Field names follow OpenAI's usage API (completions usage) where they fit."""

    object: Literal["usage.result"] = "usage.result"
    function: str | None
    function_id: str | None
    num_model_requests: int
    input_tokens: int
    output_tokens: int
    amount_picousd: int
    amount: Amount


class UsageBucket(BaseModel):
    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[UsageResult]


class UsagePage(BaseModel):
    object: Literal["page"] = "page"
    data: list[UsageBucket]
    has_more: bool = False
    next_page: str | None = None


class BillLineOut(BaseModel):
    function_id: str
    function: str
    invocations: int
    input_tokens: int
    output_tokens: int
    amount_picousd: int
    amount_usd: str


class BillOut(BaseModel):
    object: Literal["bill"] = "bill"
    tenant_id: str
    period: str
    period_start: datetime
    period_end: datetime
    lines: list[BillLineOut]
    total_picousd: int
    total_usd: str

    @classmethod
    def of(cls, b: ledger.Bill) -> BillOut:
        lines = [
            BillLineOut(
                function_id=line.function_id,
                function=line.function_name,
                invocations=line.invocations,
                input_tokens=line.input_tokens,
                output_tokens=line.output_tokens,
                amount_picousd=line.amount_picousd,
                amount_usd=usd(line.amount_picousd),
            )
            for line in b.lines
        ]
        return cls(
            tenant_id=b.tenant_id,
            period=f"{b.period_start:%Y-%m}",
            period_start=b.period_start,
            period_end=b.period_end,
            lines=lines,
            total_picousd=b.total_picousd,
            total_usd=usd(b.total_picousd),
        )


# --- the operator's reports -------------------------------------------------------------
class _RevenueCostOut(BaseModel):
    """Revenue beside device cost, exact in pico-dollars and as dollar strings."""

    device_ns: int
    revenue_picousd: int
    cost_picousd: int
    margin_picousd: int
    revenue_usd: str
    cost_usd: str
    margin_usd: str

    @staticmethod
    def money(x: ledger.RevenueCost) -> dict:
        return dict(
            device_ns=x.device_ns,
            revenue_picousd=x.revenue_picousd,
            cost_picousd=x.cost_picousd,
            margin_picousd=x.margin_picousd,
            revenue_usd=usd(x.revenue_picousd),
            cost_usd=usd(x.cost_picousd),
            margin_usd=usd(x.margin_picousd),
        )


class MarginLineOut(_RevenueCostOut):
    tenant_id: str
    tenant: str
    function_id: str | None = None
    function: str | None = None
    invocations: int
    input_tokens: int
    output_tokens: int

    @classmethod
    def of(cls, line: ledger.MarginLine) -> MarginLineOut:
        return cls(
            tenant_id=line.tenant_id,
            tenant=line.tenant_name,
            function_id=line.function_id,
            function=line.function_name,
            invocations=line.invocations,
            input_tokens=line.input_tokens,
            output_tokens=line.output_tokens,
            **cls.money(line),
        )


class MarginReportOut(_RevenueCostOut):
    start: datetime
    end: datetime
    device_price_micros_per_hour: int
    by_function: list[MarginLineOut]
    by_tenant: list[MarginLineOut]

    @classmethod
    def of(cls, r: ledger.MarginReport) -> MarginReportOut:
        return cls(
            start=r.start,
            end=r.end,
            device_price_micros_per_hour=r.device_price_micros_per_hour,
            by_function=[MarginLineOut.of(line) for line in r.by_function],
            by_tenant=[MarginLineOut.of(line) for line in r.by_tenant],
            **cls.money(r),
        )


class WorkerOut(BaseModel):
    id: str
    backbone: str
    device: str
    status: str
    started_at: datetime
    last_heartbeat_at: datetime
    dead_at: datetime | None
    # The scheduler's view: joining, active, draining or dead (None when it has not heard the worker).
    state: str | None = None

    @classmethod
    def of(cls, w: Worker, state: str | None = None) -> WorkerOut:
        return cls(
            state=state,
            id=w.id,
            backbone=w.backbone,
            device=w.device,
            status=w.status,
            started_at=w.started_at,
            last_heartbeat_at=w.last_heartbeat_at,
            dead_at=w.dead_at,
        )


class Page(BaseModel, Generic[T]):
    """A list response: ``{"object": "list", "data": [...]}``."""

    object: Literal["list"] = "list"
    data: list[T]
