"""Messages that cross NATS. Plain pydantic, no torch or SQLAlchemy, each with a schema version.

The gateway publishes an ``Invocation``; a worker answers with ``Started``, ``TokenChunk``
(core NATS, streaming only) and one ``InvocationResult``, which also carries what to bill
(``Billing``): the control plane records the usage from the result it stores, so the bill
always counts the tokens of the result the caller received. The gateway publishes
``CancelRequest`` to stop one. Workers receive ``WorkerCommand`` and publish
``ContentionReport`` and ``WorkerHeartbeat``.

Every message names its ``kind`` and ``schema_version``; decoding refuses a version this code
does not know with ``UnknownSchemaVersion`` (never a guess at what the fields mean), and the
events stream is decoded by ``kind`` (``decode_event``), not by subject.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

SCHEMA_VERSION = 1

M = TypeVar("M", bound="WireMessage")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UnknownSchemaVersion(Exception):
    """A message written under a schema version this code does not know.

    Deliberately not a ``ValueError``: pydantic would fold it into a ``ValidationError``, and a
    version mismatch (a rolling upgrade gone wrong) must be told apart from a malformed message.
    """

    def __init__(self, version: object, kind: object) -> None:
        super().__init__(f"{kind or 'message'} of schema_version {version!r}; this code reads version {SCHEMA_VERSION}")
        self.version, self.kind = version, kind


class WireMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    schema_version: int = SCHEMA_VERSION

    @model_validator(mode="before")
    @classmethod
    def _known_version(cls, data: Any) -> Any:
        if isinstance(data, dict):
            version = data.get("schema_version", SCHEMA_VERSION)
            if version != SCHEMA_VERSION or isinstance(version, bool):
                raise UnknownSchemaVersion(version, data.get("kind"))
        return data

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        """Parse one message; ``ValidationError`` if malformed, ``UnknownSchemaVersion`` if from another version."""
        return cls.model_validate_json(data)


class AdapterRef(BaseModel):
    """Where a function's adapter lives; the worker checks the hash after download."""

    model_config = ConfigDict(frozen=True)
    function_id: str
    bucket: str
    prefix: str
    sha256: str
    rank: int


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True)
    max_tokens: int = Field(ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class InvocationMode(StrEnum):
    SYNC = "sync"
    STREAM = "stream"
    ASYNC = "async"


class Invocation(WireMessage):
    kind: Literal["invocation"] = "invocation"
    invocation_id: str
    tenant_id: str
    backbone: str
    adapter: AdapterRef
    prompt: str
    sampling: SamplingParams
    mode: InvocationMode = InvocationMode.SYNC
    accepted_at: datetime = Field(default_factory=utcnow)
    # The backbone record's context limit (prompt + max_tokens), as the gateway checked it; the
    # worker and the engine hold the invocation to the same number. None: the engine's own.
    max_context: int | None = Field(default=None, ge=1)


class Started(WireMessage):
    kind: Literal["started"] = "started"
    invocation_id: str
    worker_id: str
    started_at: datetime = Field(default_factory=utcnow)


class TokenChunk(WireMessage):
    kind: Literal["token"] = "token"
    invocation_id: str
    index: int
    text: str


class Timings(BaseModel):
    """Where the time to first token went, in seconds."""

    model_config = ConfigDict(frozen=True)
    queue_wait_s: float = 0.0
    load_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    # Where the adapter was when the request needed it ("device": warm; "host", "disk", "s3": a
    # cold start from that tier) and the seconds of each move it took ("s3->disk", "disk->host",
    # "host->device"); a scaled-to-zero function's next invocation shows its bounded cold start here.
    load_tier: str = ""
    load_moves_s: dict[str, float] = Field(default_factory=dict)


class ResultStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The columns of a monthly bill as CSV, the same from the dashboard's download and the CLI's --csv:
# a line per function, then a total line; amounts exact in pico-dollars, then in dollars.
BILL_CSV_COLUMNS = (
    "period",
    "function",
    "function_id",
    "invocations",
    "input_tokens",
    "output_tokens",
    "amount_picousd",
    "amount_usd",
)


class Billing(BaseModel):
    """Whom a result bills and the device time it used; the tokens are the result's own counts."""

    model_config = ConfigDict(frozen=True)
    tenant_id: str
    function_id: str
    # Device time of the batch steps this request took part in, apportioned by tokens.
    device_ns: int = Field(default=0, ge=0)


class InvocationResult(WireMessage):
    kind: Literal["result"] = "result"
    invocation_id: str
    status: ResultStatus
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # The domain error code of a failure (lorafaas.errors), so the gateway answers with its status.
    error_code: str | None = None
    worker_id: str = ""
    timings: Timings = Field(default_factory=Timings)
    first_token_at: datetime | None = None
    finished_at: datetime = Field(default_factory=utcnow)
    # Set on a result that is billed (a run a worker started, finished or cancelled mid-way);
    # None on a failure or a cancel before start: nothing is billed.
    billing: Billing | None = None

    def usage(self) -> UsageEvent | None:
        """The usage record this result bills: exactly its own token counts, or None."""
        if self.billing is None or self.status == ResultStatus.FAILED:
            return None
        return UsageEvent(
            invocation_id=self.invocation_id,
            tenant_id=self.billing.tenant_id,
            function_id=self.billing.function_id,
            input_tokens=self.prompt_tokens,
            output_tokens=self.completion_tokens,
            device_ns=self.billing.device_ns,
            worker_id=self.worker_id,
            finished_at=self.finished_at,
        )


class UsageEvent(WireMessage):
    """What one finished invocation consumed; the control plane prices it.

    Derived from the stored result (``InvocationResult.usage``), never sent on its own: two
    messages could come from two runs of one invocation and disagree.
    """

    kind: Literal["usage"] = "usage"
    invocation_id: str
    tenant_id: str
    function_id: str
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    # Device time of the batch steps this request took part in, apportioned by tokens.
    device_ns: int = Field(default=0, ge=0)
    worker_id: str = ""
    finished_at: datetime = Field(default_factory=utcnow)


class CancelRequest(WireMessage):
    """Stop an invocation: a worker running it aborts; a worker about to start it skips it.

    Published to the cancels stream (kept, so a worker that pulls the invocation later sees
    it) and thereby also to core NATS subscribers of the cancel subject.
    """

    kind: Literal["cancel"] = "cancel"
    invocation_id: str
    requested_at: datetime = Field(default_factory=utcnow)


class CommandKind(StrEnum):
    PREFETCH = "prefetch"
    OFFLOAD = "offload"
    EVICT = "evict"
    DRAIN = "drain"
    # A joining worker's placements are prefetched: it may start pulling invocations.
    ACTIVATE = "activate"


class WorkerCommand(WireMessage):
    kind: Literal["command"] = "command"
    command: CommandKind
    adapter: AdapterRef | None = None


class AdapterResidency(BaseModel):
    model_config = ConfigDict(frozen=True)
    function_id: str
    rank: int
    tier: Literal["s3", "disk", "host", "device"]
    bytes: int = 0


class ContentionReport(WireMessage):
    kind: Literal["contention"] = "contention"
    worker_id: str
    backbone: str
    adapters: list[AdapterResidency] = Field(default_factory=list)
    pool_pages_used: int = 0
    pool_pages_free: int = 0
    pool_utilisation: float = 0.0
    queue_depth: dict[str, int] = Field(default_factory=dict)
    running_batch: int = 0
    tokens_per_s: float = 0.0
    step_latency_p50_s: float = 0.0
    step_latency_p95_s: float = 0.0
    host_cache_bytes: int = 0
    # Scheduler inputs (issue 14): lifecycle state, ranks of the requests on the worker, and
    # cumulative counters of device loads and of adapters fetched from a peer instead of S3.
    state: Literal["joining", "active", "draining"] = "active"
    pool_page_bytes: int = 0
    rank_mix: dict[int, int] = Field(default_factory=dict)
    adapter_loads: int = 0
    peer_fetches: int = 0
    reported_at: datetime = Field(default_factory=utcnow)


class WorkerHeartbeat(WireMessage):
    """A worker's sign of life: sent by its event loop, it reports the engine thread's progress too,
    so a process whose engine is stuck or dead is not taken for a live worker."""

    kind: Literal["heartbeat"] = "heartbeat"
    worker_id: str
    backbone: str
    device: str
    started_at: datetime
    state: Literal["joining", "active", "draining"] = "active"
    sent_at: datetime = Field(default_factory=utcnow)
    engine_steps: int = 0  # engine steps completed since start
    # Seconds the engine has held work without completing a step (0 while idle or progressing).
    engine_stalled_s: float = 0.0
    engine_failed: str | None = None  # why the engine loop stopped, once it has


# The kinds on the events stream, told apart by their ``kind`` field.
Event = Annotated[Started | InvocationResult, Field(discriminator="kind")]
_EVENTS: TypeAdapter[Started | InvocationResult] = TypeAdapter(Event)


def decode_event(data: bytes) -> Started | InvocationResult:
    """One message of the events stream, by its ``kind`` (``ValidationError`` for an unknown kind)."""
    return _EVENTS.validate_json(data)


class RoutedWorker(BaseModel):
    """What a gateway needs of one worker to route to it."""

    model_config = ConfigDict(frozen=True)
    state: Literal["joining", "active", "draining", "dead"]
    queued: int = 0  # invocations waiting on or running at the worker when the table was built


class PlacementTable(WireMessage):
    """One backbone's placement, as the control plane publishes it to the placement bucket.

    Gateways watch it and route each invocation with ``controlplane.scheduler.routing.choose_worker``:
    to a ready replica of its function (the one with the shortest queue), past ``spill_threshold``
    in flight to a warming replica or another worker. ``shed``: every worker is saturated, answer 429.
    """

    kind: Literal["placement"] = "placement"
    backbone: str
    version: int
    replicas: dict[str, list[str]] = Field(default_factory=dict)  # function_id -> worker ids, preferred first
    # function_id -> its replicas still loading the adapter (spill targets only until they hold it)
    warming: dict[str, list[str]] = Field(default_factory=dict)
    workers: dict[str, RoutedWorker] = Field(default_factory=dict)
    spill_threshold: int  # the control plane's ``scheduler.spill_threshold``
    shed: bool = False
    retry_after_s: float = 1.0
    published_at: datetime = Field(default_factory=utcnow)
