"""Plain, frozen data that the scheduler's policies read and return (no torch, no SQL, no I/O).

The live loop builds a ``ClusterView`` from worker reports; the simulator builds one from its
simulated workers. Times are seconds on the caller's clock (``now_s``), passed in, never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class WorkerState(StrEnum):
    JOINING = "joining"  # registered, prefetching its placements; takes no traffic yet
    ACTIVE = "active"
    DRAINING = "draining"  # finishes running work, gets no new placements or traffic
    DEAD = "dead"  # missed heartbeats; its functions are re-placed, its queue re-routed


class Tier(StrEnum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    S3 = "s3"


@dataclass(frozen=True)
class AdapterSpec:
    """What the catalog says about one function's adapter."""

    function_id: str
    backbone: str
    rank: int
    bytes: int
    pages: int  # device pool pages it takes on a worker of this backbone


@dataclass(frozen=True)
class WorkerView:
    """One worker as its latest report shows it."""

    worker_id: str
    backbone: str
    state: WorkerState
    pool_pages_total: int
    pool_pages_free: int
    tiers: dict[str, Tier] = field(default_factory=dict)  # function_id -> highest tier it holds
    queue_depth: dict[str, int] = field(default_factory=dict)  # function_id -> waiting invocations
    running_batch: int = 0
    rank_mix: dict[int, int] = field(default_factory=dict)  # rank -> running requests of that rank
    step_latency_p50_s: float = 0.0
    step_latency_p95_s: float = 0.0
    tokens_per_s: float = 0.0
    last_report_s: float = 0.0

    @property
    def queued(self) -> int:
        return sum(self.queue_depth.values())


@dataclass(frozen=True)
class ClusterView:
    now_s: float
    workers: dict[str, WorkerView]


@dataclass(frozen=True)
class Demand:
    """Expected load of one function over the next planning period."""

    function_id: str
    requests_per_s: float
    tokens_per_s: float


@dataclass(frozen=True)
class Placement:
    """The placement table: which workers serve each function (first = preferred)."""

    version: int
    replicas: dict[str, tuple[str, ...]]  # function_id -> worker ids
    worker_states: dict[str, WorkerState] = field(default_factory=dict)


class CommandKind(StrEnum):
    PREFETCH = "prefetch"  # bring the adapter to the device ahead of traffic
    OFFLOAD = "offload"  # device -> host
    EVICT = "evict"  # drop it from every tier of that worker but disk
    DRAIN = "drain"


@dataclass(frozen=True)
class Command:
    worker_id: str
    kind: CommandKind
    function_id: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    """What one planning round decided; the loop publishes the table and sends the commands."""

    placement: Placement
    commands: tuple[Command, ...] = ()
    moves: int = 0  # replicas added + removed against the previous placement
    shed: frozenset[str] = frozenset()  # backbones where every worker is saturated: answer 429
