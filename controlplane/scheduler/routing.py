"""Routing with adapter affinity: which worker gets one invocation (pure; the gateway calls it per request).

Among the function's holders that are active and ready (the adapter in device or host memory at
their last report), the one with the least queue depth (ties broken by ``tiebreak``, e.g. a
per-gateway counter, so equal holders share the traffic). A replica placed but still loading
(``warming``) gets traffic only as a spill target, first among them: a request sent there waits
for the load that a ready holder with room would not make it wait for. When every ready holder is
above ``threshold``, spill over to the least-loaded warming holder, else the least-loaded other
active worker, which then loads the adapter; a spill only happens where it shortens the wait. A
function with no active holder (not placed yet, or its holders died before the next plan) goes
to the least-loaded active worker. Cost: O(replicas) on the affinity path, O(workers) when spilling.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from .model import ClusterView, Placement, RouteChoice, Tier, WorkerState

READY_TIERS = (Tier.DEVICE, Tier.HOST)  # a copy to the device away: ms, not a download


def warming_replicas(placement: Placement, view: ClusterView) -> dict[str, tuple[str, ...]]:
    """Per function, its replicas whose last report shows its adapter in neither device nor host memory."""
    warming: dict[str, tuple[str, ...]] = {}
    for function_id, replicas in placement.replicas.items():
        loading = tuple(
            w for w in replicas if w in view.workers and view.workers[w].tiers.get(function_id) not in READY_TIERS
        )
        if loading:
            warming[function_id] = loading
    return warming


def _pick(candidates: list[str], queue_depth: Mapping[str, int], tiebreak: int) -> str:
    """The least queued candidate; among equals the one ``tiebreak`` selects (rotation)."""
    least = min(queue_depth.get(w, 0) for w in candidates)
    tied = [w for w in candidates if queue_depth.get(w, 0) == least]
    return tied[tiebreak % len(tied)]


def choose_worker(
    function_id: str,
    placement: Placement,
    queue_depth: Mapping[str, int],
    states: Mapping[str, WorkerState],
    threshold: int,
    tiebreak: int = 0,
    warming: Collection[str] = (),
) -> RouteChoice | None:
    """The worker for one invocation of ``function_id``; None when no worker is active.

    ``queue_depth``: invocations waiting or running per worker as the caller last saw them;
    ``states``: worker states (workers missing here count as not active); ``warming``: the
    function's replicas still loading its adapter (``warming_replicas``).
    """
    holders = [w for w in placement.replicas.get(function_id, ()) if states.get(w) == WorkerState.ACTIVE]
    if holders:
        ready = [w for w in holders if w not in warming] or holders  # all loading: still the best bet
        best = _pick(ready, queue_depth, tiebreak)
        depth = queue_depth.get(best, 0)
        if depth <= threshold:
            return RouteChoice(best, spilled=False)
        loading = [w for w in holders if w not in ready]
        others = sorted(w for w, s in states.items() if s == WorkerState.ACTIVE and w not in holders)
        for candidates, spilled in ((loading, False), (others, True)):
            if candidates:
                spill = _pick(candidates, queue_depth, tiebreak)
                if queue_depth.get(spill, 0) < depth:
                    return RouteChoice(spill, spilled=spilled)
        return RouteChoice(best, spilled=False)
    active = sorted(w for w, s in states.items() if s == WorkerState.ACTIVE)
    if not active:
        return None
    return RouteChoice(_pick(active, queue_depth, tiebreak), spilled=True)


def least_loaded(
    function_id: str,
    placement: Placement,
    queue_depth: Mapping[str, int],
    states: Mapping[str, WorkerState],
    threshold: int,
    tiebreak: int = 0,
    warming: Collection[str] = (),
) -> RouteChoice | None:
    """Baseline routing with the same signature: least queue depth among active holders, never spilling."""
    holders = [w for w in placement.replicas.get(function_id, ()) if states.get(w) == WorkerState.ACTIVE]
    active = holders or sorted(w for w, s in states.items() if s == WorkerState.ACTIVE)
    if not active:
        return None
    return RouteChoice(_pick(active, queue_depth, tiebreak), spilled=not holders)
