"""Routing with adapter affinity: which worker gets one invocation (pure; the gateway calls it per request).

The candidates are the function's active holders: its placed replicas, then the active workers
that have its adapter on the device without being placed (``warm``: a spill or a replica being
removed loaded it there, so serving it costs no load). Among them, the one with the least queue
depth wins (ties broken by ``tiebreak``, e.g. a per-gateway counter, so equal holders share the
traffic). When every candidate is above ``threshold``, spill over to the least-loaded other
active worker, which then loads the adapter; a spill only happens where it shortens the wait.
A function with no active holder (not placed yet, or its holders died before the next plan)
goes to the least-loaded active worker. Cost: O(replicas + warm) on the affinity path,
O(workers) when spilling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    warm: Mapping[str, Sequence[str]] | None = None,
) -> RouteChoice | None:
    """The worker for one invocation of ``function_id``; None when no worker is active.

    ``queue_depth``: invocations waiting or running per worker as the caller last saw them;
    ``states``: worker states (workers missing here count as not active); ``warm``: function id
    -> workers with its adapter on the device (placed or not).
    """
    placed = placement.replicas.get(function_id, ())
    resident = [w for w in (warm or {}).get(function_id, ()) if w not in placed]
    holders = [w for w in (*placed, *resident) if states.get(w) == WorkerState.ACTIVE]
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
    warm: Mapping[str, Sequence[str]] | None = None,
) -> RouteChoice | None:
    """Baseline routing with the same signature: least queue depth among active placed holders, never
    spilling (``warm`` is ignored: the baseline knows only its placement)."""
    holders = [w for w in placement.replicas.get(function_id, ()) if states.get(w) == WorkerState.ACTIVE]
    active = holders or sorted(w for w, s in states.items() if s == WorkerState.ACTIVE)
    if not active:
        return None
    return RouteChoice(_pick(active, queue_depth, tiebreak), spilled=not holders)
