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

    def joining(self, backbone: str | None = None) -> bool:
        """A worker (of ``backbone``, or any) is joining: capacity the operator added, not churn.

        While one joins, the hysteresis is waived (the loop's move budget, the plan's settle time and
        light-load floor), so the new worker gets its share at once.
        """
        return any(v.state == WorkerState.JOINING and backbone in (None, v.backbone) for v in self.workers.values())


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
    # function_id -> view time (``ClusterView.now_s``) its replicas last changed, while that is
    # within ``PlacementConfig.settle_s``: such a function loses no replica to an optional move.
    changed_at: dict[str, float] = field(default_factory=dict)


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
    forced_moves: int = 0  # of ``moves``, those not bounded by the budget (dead/draining workers, new functions)
    worker_load: dict[str, float] = field(default_factory=dict)  # expected cost units/s per worker after the plan


@dataclass(frozen=True)
class PlacementConfig:
    """The knobs of the placement and contention policies (``placement.plan``).

    Load is in *cost units per second*: tokens/s weighted by the rank's relative cost per token
    (``1 + rank_token_cost * rank``), the interference model fitted in
    ``benchmarks/rank_interference.py`` (numbers in docs/engine.md).
    """

    worker_capacity: float = 2000.0  # cost units/s one worker sustains at the SLO
    target_utilisation: float = 0.7  # plan loads up to this share of capacity
    # Extra per-token cost per unit of rank, relative to the backbone's: 0.0017 on this CPU (decode, demo
    # shape: rank 128 -> 1.22x a rank-8 row, docs/engine.md) and ~0.0008 on an H100 7B (LoRA FLOPs /
    # backbone FLOPs, benchmarks/profiles/gpu-h100-7b.json); the default is near the CPU value, where the
    # live replays run.
    rank_token_cost: float = 0.002
    rank_classes: tuple[int, ...] = (16, 64)  # class boundaries: ranks <= 16, <= 64, above
    rank_mix_penalty: float = 0.25  # score added for placing a function outside its worker's home rank class
    replica_load: float = 0.5  # a function gets another replica per this share of one worker's target load
    max_replicas: int = 8
    pool_fill: float = 0.8  # placed adapters use at most this share of a worker's pool pages (rest: spill loads)
    max_moves: int = 8  # optional replica adds/removes per round (hysteresis: no flapping)
    imbalance: float = 0.25  # rebalance only when a worker's load exceeds the mean by this share
    # ... and its load is past this share of its target: below it every worker has room, and a move
    # would only cost an adapter load (demand estimates wobble; balancing them at 10% load is churn).
    rebalance_above: float = 0.5
    settle_s: float = 30.0  # a function whose replicas changed this recently is not moved or trimmed
    remove_below: float = 0.5  # drop a replica only when demand fits in (replicas - 1) with this margin
    contended_queue: int = 8  # a worker with more queued invocations than this is contended
    saturated_queue: int = 32  # every live worker above this -> shed the backbone (429)


@dataclass(frozen=True)
class RouteChoice:
    """Where the gateway sends one invocation."""

    worker_id: str
    spilled: bool  # True when no holder was used (all over threshold, or none live)
