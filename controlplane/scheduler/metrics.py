"""Prometheus metrics of the scheduler loop: every decision it carries out is counted."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class SchedulerMetrics:
    """One registry per control plane (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("lorafaas_scheduler_rounds_total", "Planning rounds run", registry=r)
        self.moves = Counter(
            "lorafaas_scheduler_placement_moves_total",
            "Replicas added or removed by the placement policy",
            ["kind"],  # optional (budgeted) | forced (dead/draining workers, new functions)
            registry=r,
        )
        self.commands = Counter(
            "lorafaas_scheduler_commands_total",
            "Worker commands sent, by kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.reroutes = Counter(
            "lorafaas_scheduler_reroutes_total",
            "Invocations moved off a dead or drained worker's queue to the shared subject",
            ["reason"],
            registry=r,
        )
        self.sheds = Counter(
            "lorafaas_scheduler_shed_rounds_total",
            "Rounds in which a backbone was shed (every worker saturated: gateways answer 429)",
            ["backbone"],
            registry=r,
        )
        self.workers = Gauge("lorafaas_scheduler_workers", "Workers by state", ["state"], registry=r)
        self.table_version = Gauge("lorafaas_scheduler_table_version", "Placement table version", registry=r)
        self.adapter_loads = Gauge(
            "lorafaas_worker_adapter_loads",
            "Host-to-device adapter loads, as the worker reports",
            ["worker"],
            registry=r,
        )
        self.peer_fetches = Gauge(
            "lorafaas_worker_peer_fetches",
            "Adapters a worker fetched from a peer instead of S3, as it reports",
            ["worker"],
            registry=r,
        )
