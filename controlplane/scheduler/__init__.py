"""The deciding half: pure policies over a cluster view, and the thin loop that applies them.

``model`` holds the plain data the policies read and return. Policies are pure functions of
(view, demand, catalog, previous plan, config, seed): no I/O, no clock, no global state. The
same functions run live (the control plane's scheduler loop), in unit tests and inside the
cluster simulator (``benchmarks/cluster_sim``), which replaces only the I/O and the clock.

Public API (stable; the live loop and the simulator call exactly these):

- ``placement.plan(view, demand, catalog, previous, config, seed) -> Plan``: rank-aware placement
  and contention decisions (replicas, PREFETCH/OFFLOAD commands, bounded moves, shed backbones).
- ``placement.rank_oblivious_plan(...)``: the baseline with the same signature (random placement).
- ``routing.choose_worker(function_id, placement, queue_depth, states, threshold, tiebreak, warming)
  -> RouteChoice | None``: affinity to the least-queued active holder that holds the adapter,
  spill-over (to a holder still loading it first) when every one is above ``threshold``;
  ``routing.least_loaded`` is the baseline with the same signature. ``routing.warming_replicas(
  placement, view)`` says which replicas are still loading (published in the placement table).
- ``model.PlacementConfig``, ``model.RouteChoice`` and the other plain data in ``model``.
"""
