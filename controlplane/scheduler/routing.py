"""Routing with adapter affinity: which worker gets one invocation (pure; the gateway calls it per request).

Among the function's holders that are active, the one with the least queue depth (ties broken
by ``tiebreak``, e.g. a per-gateway counter, so equal holders share the traffic). When every
holder is above ``threshold``, spill over to the least-loaded other active worker, which then
loads the adapter; a spill only happens where it shortens the wait. A function with no active
holder (not placed yet, or its holders died before the next plan) goes to the least-loaded
active worker. Cost: O(replicas) on the affinity path, O(workers) when spilling.
"""

from __future__ import annotations

from collections.abc import Mapping

from .model import Placement, RouteChoice, WorkerState


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
) -> RouteChoice | None:
    """The worker for one invocation of ``function_id``; None when no worker is active.

    ``queue_depth``: invocations waiting or running per worker as the caller last saw them;
    ``states``: worker states (workers missing here count as not active).
    """
    holders = [w for w in placement.replicas.get(function_id, ()) if states.get(w) == WorkerState.ACTIVE]
    if holders:
        best = _pick(holders, queue_depth, tiebreak)
        depth = queue_depth.get(best, 0)
        if depth <= threshold:
            return RouteChoice(best, spilled=False)
        others = [w for w, s in states.items() if s == WorkerState.ACTIVE and w not in holders]
        if others:
            spill = _pick(sorted(others), queue_depth, tiebreak)
            if queue_depth.get(spill, 0) < depth:
                return RouteChoice(spill, spilled=True)
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
) -> RouteChoice | None:
    """Baseline routing with the same signature: least queue depth among active holders, never spilling."""
    holders = [w for w in placement.replicas.get(function_id, ()) if states.get(w) == WorkerState.ACTIVE]
    active = holders or sorted(w for w, s in states.items() if s == WorkerState.ACTIVE)
    if not active:
        return None
    return RouteChoice(_pick(active, queue_depth, tiebreak), spilled=not holders)
