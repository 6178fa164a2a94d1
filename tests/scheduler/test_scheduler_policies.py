"""Properties of the pure scheduler policies (placement, routing), over generated clusters."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.scheduler.hysteresis import MoveBudget
from controlplane.scheduler.model import (
    AdapterSpec,
    ClusterView,
    CommandKind,
    Demand,
    Placement,
    PlacementConfig,
    RouteChoice,
    Tier,
    WorkerState,
    WorkerView,
)
from controlplane.scheduler.placement import PLACEABLE, plan, rank_class, rank_oblivious_plan
from controlplane.scheduler.routing import choose_worker, least_loaded, warming_replicas

pytestmark = pytest.mark.unit

RANKS = (8, 16, 32, 64, 128)
POLICIES = (plan, rank_oblivious_plan)


@st.composite
def scenarios(draw, min_workers: int = 0):
    """A cluster view, demand, catalog, a previous placement (stale ids included), config and seed."""
    n_workers = draw(st.integers(min_workers, 8))
    workers = {}
    for i in range(n_workers):
        name = f"w{i}"
        total = draw(st.integers(0, 200))
        queue = draw(st.dictionaries(st.sampled_from([f"f{j}" for j in range(12)]), st.integers(0, 50), max_size=4))
        workers[name] = WorkerView(
            name,
            draw(st.sampled_from(["bb", "bb", "other"])),
            draw(st.sampled_from(list(WorkerState))),
            total,
            draw(st.integers(0, total)),
            queue_depth=queue,
        )
    n_fns = draw(st.integers(0, 25))
    catalog = {}
    for j in range(n_fns):
        rank = draw(st.sampled_from(RANKS))
        catalog[f"f{j}"] = AdapterSpec(f"f{j}", draw(st.sampled_from(["bb", "other"])), rank, rank * 1000, rank // 8)
    demand = {fn: Demand(fn, draw(st.floats(0, 20)), draw(st.floats(0, 8000))) for fn in catalog if draw(st.booleans())}
    ids = [*workers, "gone"]
    previous = Placement(
        draw(st.integers(0, 5)),
        {fn: tuple(draw(st.lists(st.sampled_from(ids), max_size=3, unique=True))) for fn in catalog},
    )
    config = PlacementConfig(
        worker_capacity=draw(st.floats(100, 10000)),
        max_moves=draw(st.integers(0, 10)),
        pool_fill=draw(st.sampled_from([0.5, 0.8, 1.0])),
        max_replicas=draw(st.integers(1, 4)),
    )
    return ClusterView(0.0, workers), demand, catalog, previous, config, draw(st.integers(0, 2**31))


# Sized for 2 shared CI cores: every example plans a cluster of up to 8 workers and 25 functions.
COMMON = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(scenarios())
def test_plans_are_deterministic(s):
    for policy in POLICIES:
        assert policy(*s) == policy(*s)


@COMMON
@given(scenarios())
def test_no_worker_over_capacity_and_only_live_workers_hold_functions(s):
    view, _, catalog, _, config, _ = s
    for policy in POLICIES:
        result = policy(*s)
        used: dict[str, int] = {}
        for fn, holders in result.placement.replicas.items():
            assert len(set(holders)) == len(holders)
            for w in holders:
                assert w in view.workers and view.workers[w].state in PLACEABLE  # dead/draining hold nothing
                assert view.workers[w].backbone == catalog[fn].backbone
                used[w] = used.get(w, 0) + catalog[fn].pages
        for w, pages in used.items():
            assert pages <= int(view.workers[w].pool_pages_total * config.pool_fill)


@COMMON
@given(scenarios())
def test_optional_moves_per_round_are_bounded(s):
    config = s[4]
    result = plan(*s)
    assert 0 <= result.forced_moves <= result.moves
    assert result.moves - result.forced_moves <= config.max_moves
    added = sum(1 for c in result.commands if c.kind == CommandKind.PREFETCH)
    assert added <= result.moves


@COMMON
@given(scenarios(min_workers=1))
def test_every_function_placed_when_capacity_allows(s):
    view, demand, catalog, previous, config, seed = s
    roomy = {
        w: WorkerView(w, v.backbone, v.state, 10_000, 10_000, queue_depth=v.queue_depth)
        for w, v in view.workers.items()
    }
    view = ClusterView(0.0, roomy)
    for policy in POLICIES:
        result = policy(view, demand, catalog, previous, config, seed)
        for fn, spec in catalog.items():
            live = [w for w, v in roomy.items() if v.state in PLACEABLE and v.backbone == spec.backbone]
            if live:
                assert result.placement.replicas.get(fn), f"{fn} unplaced with {live} live"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_replanning_the_same_input_settles(s):
    """Hysteresis: with nothing changing, rounds stop moving replicas (no flapping)."""
    view, demand, catalog, previous, config, seed = s
    current = previous
    for _ in range(20):
        result = plan(view, demand, catalog, current, config, seed)
        current = result.placement
        if result.moves == 0:
            break
    assert result.moves == 0
    assert result.placement.version == current.version


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(2, 5),
    st.floats(50.0, 2000.0),
    st.lists(st.lists(st.floats(0.3, 1.7), min_size=12, max_size=12), min_size=10, max_size=80),
    st.integers(0, 2**31),
)
def test_wobbling_demand_never_takes_a_replica_away_within_the_settle_time(n, capacity, rounds, seed):
    """No flapping: the live loop's demand estimate wobbles round to round (0.5 s apart); a function
    whose replicas changed less than ``settle_s`` ago gains replicas at most, it loses none (before
    this rule a hot function ping-ponged between workers every few seconds in the live replay)."""
    catalog = _catalog([8, 16, 32, 64, 128, 8, 16, 32, 64, 128, 16, 64])
    config = PlacementConfig(worker_capacity=capacity, max_moves=4)
    base = [1000.0 / (i + 1) for i in range(12)]  # Zipf-like
    current, changed = Placement(0, {}), {}
    for r, wobble in enumerate(rounds):
        now = r * 0.5
        demand = {f"f{i}": Demand(f"f{i}", 1.0, base[i] * wobble[i]) for i in range(12)}
        result = plan(_cluster(n, now=now), demand, catalog, current, config, seed)
        for fn, holders in result.placement.replicas.items():
            before = current.replicas.get(fn, ())
            if holders != before:
                if fn in changed and now - changed[fn] < config.settle_s:
                    assert set(before) <= set(holders), f"{fn}: {before} -> {holders} at {now}"
                changed[fn] = now
        current = result.placement


def test_no_rebalancing_while_every_worker_has_room():
    """Imbalance at light load is not worth an adapter load: the hottest worker is under
    ``rebalance_above`` of its target, so nothing moves even though it holds everything."""
    catalog = _catalog([16] * 6)
    demand = {fn: Demand(fn, 1.0, 50.0) for fn in catalog}  # 300 units/s of a 1,400 target
    previous = Placement(1, {fn: ("w0",) for fn in catalog})
    config = PlacementConfig(worker_capacity=2000.0)
    assert plan(_cluster(3), demand, catalog, previous, config, 0).moves == 0
    busy = {fn: Demand(fn, 1.0, 300.0) for fn in catalog}  # 1,800 units/s on w0: past half its target
    assert plan(_cluster(3), busy, catalog, previous, config, 0).moves > 0


def _cluster(n: int, pages: int = 1000, states: dict[str, WorkerState] | None = None, now: float = 0.0) -> ClusterView:
    states = states or {}
    return ClusterView(
        now,
        {f"w{i}": WorkerView(f"w{i}", "bb", states.get(f"w{i}", WorkerState.ACTIVE), pages, pages) for i in range(n)},
    )


def _catalog(ranks: list[int]) -> dict[str, AdapterSpec]:
    return {f"f{i}": AdapterSpec(f"f{i}", "bb", r, r * 1000, r // 8) for i, r in enumerate(ranks)}


def test_dead_and_draining_workers_functions_are_replaced():
    catalog = _catalog([8, 128, 32])
    previous = Placement(3, {"f0": ("w0",), "f1": ("w1",), "f2": ("w0", "w2")})
    view = _cluster(4, states={"w0": WorkerState.DEAD, "w1": WorkerState.DRAINING})
    result = plan(view, {}, catalog, previous, PlacementConfig(max_moves=0), 0)
    reps = result.placement.replicas
    assert set(reps) == {"f0", "f1", "f2"}
    assert all(w in ("w2", "w3") for hs in reps.values() for w in hs)
    assert reps["f2"] == ("w2",)  # a live replica is kept, not moved
    assert result.forced_moves == result.moves == 3 + 2  # 3 dropped + 2 re-placed, with a zero budget
    assert result.placement.version == 4
    prefetch = {(c.worker_id, c.function_id) for c in result.commands if c.kind == CommandKind.PREFETCH}
    assert prefetch == {(reps["f0"][0], "f0"), (reps["f1"][0], "f1")}


def test_joining_worker_receives_placements_when_load_is_imbalanced():
    catalog = _catalog([16] * 8)
    demand = {fn: Demand(fn, 1.0, 500.0) for fn in catalog}
    view = _cluster(2)
    config = PlacementConfig(worker_capacity=4000.0, max_moves=8)
    first = plan(view, demand, catalog, Placement(0, {}), config, 1)
    joined = _cluster(3, states={"w2": WorkerState.JOINING})
    assert joined.joining() and joined.joining("bb") and not joined.joining("other-backbone")
    second = plan(joined, demand, catalog, first.placement, config, 1)
    assert any("w2" in hs for hs in second.placement.replicas.values())
    assert second.moves - second.forced_moves <= config.max_moves


def test_hot_function_gets_replicas_and_cold_one_loses_them():
    catalog = _catalog([32, 32])
    config = PlacementConfig(worker_capacity=1000.0, max_moves=10, max_replicas=4)
    hot = {"f0": Demand("f0", 10.0, 1400.0), "f1": Demand("f1", 0.1, 10.0)}
    result = plan(_cluster(4), hot, catalog, Placement(0, {}), config, 0)
    assert len(result.placement.replicas["f0"]) == 4  # 1400 * 1.064 / (0.5 * 1000 * 0.7) -> 5, capped at 4
    assert len(result.placement.replicas["f1"]) == 1
    cold = {"f0": Demand("f0", 0.1, 10.0)}
    assert plan(_cluster(4), cold, catalog, result.placement, config, 0).placement == result.placement  # settling
    after = plan(_cluster(4, now=config.settle_s), cold, catalog, result.placement, config, 0)
    assert len(after.placement.replicas["f0"]) == 3  # one replica less per round, not all at once


def test_ranks_are_kept_apart_when_load_allows():
    """Equal load of rank-8 and rank-128 functions on two workers: each worker gets one rank class."""
    catalog = _catalog([8, 128, 8, 128, 8, 128, 8, 128])
    demand = {fn: Demand(fn, 1.0, 100.0 / (1 + 0.002 * catalog[fn].rank)) for fn in catalog}
    config = PlacementConfig(worker_capacity=10_000.0)
    result = plan(_cluster(2), demand, catalog, Placement(0, {}), config, 0)
    classes = {
        w: {rank_class(catalog[fn].rank, config) for fn, hs in result.placement.replicas.items() if w in hs}
        for w in ("w0", "w1")
    }
    assert classes["w0"] != classes["w1"] and all(len(c) == 1 for c in classes.values())


def test_contention_offloads_cold_adapters_and_sheds_a_saturated_backbone():
    catalog = _catalog([8, 8])
    busy = WorkerView(
        "w0",
        "bb",
        WorkerState.ACTIVE,
        100,
        0,
        tiers={"f0": "device", "f1": "device", "stray": "device"},
        queue_depth={"f0": 40},
    )
    view = ClusterView(0.0, {"w0": busy})
    previous = Placement(1, {"f0": ("w0",), "f1": ("w0",)})
    result = plan(view, {"f0": Demand("f0", 5.0, 100.0)}, catalog, previous, PlacementConfig(), 0)
    offloads = {c.function_id for c in result.commands if c.kind == CommandKind.OFFLOAD}
    assert offloads == {"stray"}  # placed adapters stay; the queued one stays
    assert result.shed == frozenset({"bb"})
    calm = ClusterView(0.0, {"w0": WorkerView("w0", "bb", WorkerState.ACTIVE, 100, 50)})
    assert plan(calm, {}, catalog, previous, PlacementConfig(), 0).shed == frozenset()


# -- routing --------------------------------------------------------------------------------
@st.composite
def routes(draw):
    n = draw(st.integers(0, 6))
    names = [f"w{i}" for i in range(n)]
    states = {w: draw(st.sampled_from(list(WorkerState))) for w in names}
    holders = tuple(draw(st.lists(st.sampled_from([*names, "gone"]), max_size=4, unique=True))) if names else ()
    depth = {w: draw(st.integers(0, 20)) for w in names}
    warming = tuple(w for w in holders if draw(st.booleans()))
    placement = Placement(1, {"f": holders}, states)
    return placement, depth, states, draw(st.integers(0, 10)), draw(st.integers(0, 99)), warming


@settings(max_examples=300, deadline=None)
@given(routes())
def test_routing_returns_an_active_worker_and_spills_only_when_every_ready_holder_is_over(r):
    placement, depth, states, threshold, tiebreak, warming = r
    active = [w for w, s in states.items() if s == WorkerState.ACTIVE]
    for route in (choose_worker, least_loaded):
        choice = route("f", placement, depth, states, threshold, tiebreak, warming)
        assert (choice is None) == (not active)
        if choice is None:
            continue
        assert states[choice.worker_id] == WorkerState.ACTIVE
        assert route("f", placement, depth, states, threshold, tiebreak, warming) == choice
    choice = choose_worker("f", placement, depth, states, threshold, tiebreak, warming)
    holders = [w for w in placement.replicas["f"] if states.get(w) == WorkerState.ACTIVE]
    ready = [w for w in holders if w not in warming] or holders
    if choice is None:
        return
    if choice.spilled:
        assert choice.worker_id not in holders
        assert all(depth[h] > threshold for h in ready)
        assert all(depth[h] >= min(depth[r] for r in ready) for h in holders if h not in ready)
    elif min((depth[h] for h in ready), default=threshold + 1) <= threshold:  # a ready holder has room
        assert choice.worker_id in ready and depth[choice.worker_id] == min(depth[h] for h in ready)
    else:
        assert choice.worker_id in holders


def test_routing_sends_to_a_replica_still_loading_only_past_the_ready_ones():
    states = {w: WorkerState.ACTIVE for w in ("ready", "new", "other")}
    placement = Placement(1, {"f": ("ready", "new")}, states)
    idle_new = {"ready": 2, "new": 0, "other": 0}
    assert choose_worker("f", placement, idle_new, states, 2, warming=("new",)).worker_id == "ready"
    over = choose_worker("f", placement, {"ready": 3, "new": 1, "other": 0}, states, 2, warming=("new",))
    assert over == RouteChoice("new", spilled=False)  # its load is under way: before a worker without it
    only_loading = choose_worker("f", placement, idle_new, states, 2, warming=("ready", "new"))
    assert only_loading == RouteChoice("new", spilled=False)


def test_warming_replicas_are_those_without_the_adapter_in_memory():
    def worker(name: str, tier: Tier | None) -> WorkerView:
        return WorkerView(name, "b", WorkerState.ACTIVE, 10, 10, {"f": tier} if tier else {})

    view = ClusterView(
        0.0,
        {
            w.worker_id: w
            for w in (worker("d", Tier.DEVICE), worker("h", Tier.HOST), worker("k", Tier.DISK), worker("n", None))
        },
    )
    placement = Placement(1, {"f": ("d", "h", "k", "n", "gone"), "g": ("d",)})
    assert warming_replicas(placement, view) == {"f": ("k", "n"), "g": ("d",)}  # a worker not in the view: no route


def test_routing_prefers_the_least_queued_holder_and_rotates_ties():
    states = {w: WorkerState.ACTIVE for w in ("a", "b", "c")}
    placement = Placement(1, {"f": ("a", "b")}, states)
    assert choose_worker("f", placement, {"a": 3, "b": 1, "c": 0}, states, 5).worker_id == "b"
    picks = {choose_worker("f", placement, {"a": 1, "b": 1}, states, 5, t).worker_id for t in range(4)}
    assert picks == {"a", "b"}
    spill = choose_worker("f", placement, {"a": 9, "b": 8, "c": 0}, states, 5)
    assert spill is not None and spill.worker_id == "c" and spill.spilled


# -- hysteresis across rounds --------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(0, 10)), max_size=60),
    st.integers(1, 20),
    st.floats(0.5, 10.0),
)
def test_move_budget_never_lets_a_minute_hold_more_than_its_limit(rounds, workers, per_worker):
    """Whatever each round wants, the optional moves granted in any 60 s window stay within the limit."""
    budget = MoveBudget(per_worker)
    limit = math.ceil(per_worker * workers)
    now, granted = 0.0, []
    for gap, wanted in rounds:
        now += gap
        moves = min(wanted, budget.available(now, workers))
        budget.spend(now, moves)
        granted.append((now, moves))
    for t, _ in granted:
        assert sum(n for u, n in granted if t - 60.0 < u <= t) <= limit


def test_move_budget_refills_after_a_minute():
    budget = MoveBudget(per_worker_per_minute=4.0)
    assert budget.available(0.0, 3) == 12
    budget.spend(0.0, 12)
    assert budget.available(30.0, 3) == 0
    assert budget.available(60.0, 3) == 12
