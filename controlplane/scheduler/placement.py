"""Rank-aware, contention-aware placement (LoRAServe's placement, ServerlessLoRA's contention decisions).

``plan`` is a pure function of (cluster view, demand, catalog, previous placement, config, seed):
no I/O, no clock, no global state; the seed only breaks ties. One round:

1. keep every replica of the previous placement that is still on a live worker (active or
   joining) with room in its pool; replicas on dead, draining or vanished workers are dropped;
2. *forced*: place one replica of every function that has none left (new functions, functions
   of a dead or draining worker) on the best worker; these moves are not budgeted, since a
   function without a replica would only be served by spill-over;
3. *optional*, at most ``config.max_moves`` replica adds + removes per round (hysteresis):
   drop a replica of a function gone cold, add replicas to hot functions (demand, or every
   holder contended), then move replicas off workers loaded above the mean by ``imbalance``; a
   function whose replicas changed within ``settle_s`` loses none (no flapping on wobbling demand);
4. contention commands: offload adapters that sit on the device of a contended worker without
   being placed there or wanted by its queue; shed a backbone whose every worker is saturated.

Each round gives every worker a *home rank class*, with workers shared out in proportion to each
class's expected load (LoRAServe's rank-aware grouping). "Best worker" minimises expected
utilisation after the move plus ``rank_mix_penalty`` when the function's class is not the
worker's home, so ranks that slow each other are kept apart while load allows, and a worker's
batches stay rank-homogeneous. Load is tokens/s weighted by the per-token cost of the
rank, the model measured in ``benchmarks/rank_interference.py`` (docs/engine.md).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .model import (
    AdapterSpec,
    ClusterView,
    Command,
    CommandKind,
    Demand,
    Placement,
    PlacementConfig,
    Plan,
    Tier,
    WorkerState,
)

PLACEABLE = frozenset({WorkerState.ACTIVE, WorkerState.JOINING})


def rank_factor(rank: int, config: PlacementConfig) -> float:
    """Relative cost of one token of a request of this rank (1.0 = the backbone alone)."""
    return 1.0 + config.rank_token_cost * rank


def rank_class(rank: int, config: PlacementConfig) -> int:
    """Index of the rank class: 0 for ranks <= the first boundary, and so on."""
    return sum(1 for bound in config.rank_classes if rank > bound)


def function_cost(spec: AdapterSpec, demand: Demand | None, config: PlacementConfig) -> float:
    """Expected cost units/s of one function: its tokens/s weighted by its rank's cost."""
    return (demand.tokens_per_s if demand else 0.0) * rank_factor(spec.rank, config)


def replica_share(config: PlacementConfig) -> float:
    """Cost units/s one replica should carry before the function gets another."""
    return config.replica_load * config.worker_capacity * config.target_utilisation


def desired_replicas(cost: float, workers: int, config: PlacementConfig) -> int:
    """How many replicas a function of this cost wants (at least 1, at most the live workers)."""
    want = math.ceil(cost / replica_share(config)) if cost > 0 else 1
    return max(1, min(want, config.max_replicas, max(workers, 1)))


def _tiebreak(seed: int, key: str) -> int:
    """A stable per-seed order (Python's str hash is salted per process, so it is not used)."""
    return zlib.crc32(f"{seed}:{key}".encode())


@dataclass
class _Board:
    """The mutable working state of one backbone's round (private to ``plan``)."""

    config: PlacementConfig
    specs: dict[str, AdapterSpec]
    costs: dict[str, float]
    cap_pages: dict[str, int]
    seed: int
    holders: dict[str, list[str]] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    class_load: dict[str, dict[int, float]] = field(default_factory=dict)
    pages: dict[str, int] = field(default_factory=dict)
    added: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    home: dict[str, int] = field(default_factory=dict)  # worker -> the rank class it serves
    settling: frozenset[str] = frozenset()  # functions whose replicas changed within settle_s
    joining: bool = False  # a worker of the backbone is joining

    def __post_init__(self) -> None:
        for w in self.cap_pages:
            self.load[w] = 0.0
            self.pages[w] = 0
            self.class_load[w] = {}
        self.order = sorted(self.cap_pages, key=lambda w: _tiebreak(self.seed, w))
        self.classes = {fn: rank_class(s.rank, self.config) for fn, s in self.specs.items()}
        self.target = self.config.worker_capacity * self.config.target_utilisation

    def share(self, fn: str, replicas: int | None = None) -> float:
        n = replicas if replicas is not None else max(len(self.holders.get(fn, ())), 1)
        return self.costs[fn] / n

    def _account(self, fn: str, sign: float) -> None:
        """Add (sign=1) or take away (sign=-1) fn's load shares on its current holders."""
        hs = self.holders.get(fn, [])
        if not hs:
            return
        share = self.costs[fn] / len(hs)
        cls = self.classes[fn]
        for w in hs:
            self.load[w] += sign * share
            self.class_load[w][cls] = self.class_load[w].get(cls, 0.0) + sign * share

    def fits(self, fn: str, w: str) -> bool:
        return self.pages[w] + self.specs[fn].pages <= self.cap_pages[w]

    def add(self, fn: str, w: str) -> None:
        self._account(fn, -1)
        self.holders.setdefault(fn, []).append(w)
        self.pages[w] += self.specs[fn].pages
        self._account(fn, +1)

    def remove(self, fn: str, w: str) -> None:
        self._account(fn, -1)
        self.holders[fn].remove(w)
        self.pages[w] -= self.specs[fn].pages
        self._account(fn, +1)

    def score(self, fn: str, w: str) -> float:
        """Lower is better: utilisation after taking a share, rank-mix penalty, spread of pages."""
        cfg = self.config
        share = self.costs[fn] / (len(self.holders.get(fn, ())) + 1)
        util = (self.load[w] + share) / self.target
        mixed = self.home.get(w, self.classes[fn]) != self.classes[fn]
        cap = self.cap_pages[w]
        return util + (cfg.rank_mix_penalty if mixed else 0.0) + 0.05 * (self.pages[w] / cap if cap else 1.0)

    def assign_homes(self) -> None:
        """Give every worker a home rank class, in proportion to each class's expected load.

        Quotas by largest remainder (every class with load gets a worker while workers last);
        a worker keeps the class that already dominates its load where the quota allows, so
        homes stay put from round to round and the placement does not churn.
        """
        weight: dict[int, float] = {}
        for fn, cls in self.classes.items():
            weight[cls] = weight.get(cls, 0.0) + self.costs[fn]
        if sum(weight.values()) <= 1e-12:  # no demand yet: weigh classes by their number of functions
            weight = {cls: float(list(self.classes.values()).count(cls)) for cls in weight}
        workers, total = len(self.order), sum(weight.values())
        if not workers or total <= 0:
            return
        exact = {cls: w / total * workers for cls, w in weight.items() if w > 0}
        quota = {cls: max(1, int(x)) for cls, x in exact.items()}
        while sum(quota.values()) > workers:  # more classes than workers: the lightest go without
            quota[min(quota, key=lambda c: (exact[c], c))] -= 1
            quota = {c: q for c, q in quota.items() if q > 0}
        for cls in sorted(exact, key=lambda c: (-(exact[c] - int(exact[c])), c)):
            if sum(quota.values()) >= workers:
                break
            quota[cls] = quota.get(cls, 0) + 1
        free = []
        for w in self.order:
            mine = self.class_load[w]
            dominant = max(mine, key=lambda c: (mine[c], -c)) if mine and max(mine.values()) > 0 else None
            if dominant is not None and quota.get(dominant, 0) > 0:
                self.home[w] = dominant
                quota[dominant] -= 1
            else:
                free.append(w)
        spare = [cls for cls in sorted(quota) for _ in range(quota[cls])]
        for w, cls in zip(free, spare):
            self.home[w] = cls

    def best_worker(self, fn: str, exclude: Iterable[str] = ()) -> str | None:
        """The lowest-scoring worker with room that does not hold fn; ties go to the seeded worker order."""
        skip = set(self.holders.get(fn, ())) | set(exclude)
        best, best_score = None, math.inf
        need = self.specs[fn].pages
        for w in self.order:
            if w in skip or self.pages[w] + need > self.cap_pages[w]:
                continue
            sc = self.score(fn, w)
            if sc < best_score:
                best, best_score = w, sc
        return best


def plan(
    view: ClusterView,
    demand: Mapping[str, Demand],
    catalog: Mapping[str, AdapterSpec],
    previous: Placement,
    config: PlacementConfig,
    seed: int,
) -> Plan:
    """One planning round of rank-aware placement and contention decisions (see the module doc)."""
    replicas: dict[str, tuple[str, ...]] = {}
    commands: list[Command] = []
    moves = forced = 0
    shed: set[str] = set()
    loads: dict[str, float] = {}
    budget = [config.max_moves]  # optional moves, shared by every backbone of the round
    for backbone in sorted({s.backbone for s in catalog.values()}):
        board, dropped, placed = _plan_backbone(view, demand, catalog, previous, config, seed, backbone, budget)
        for fn, hs in board.holders.items():
            if hs:
                replicas[fn] = tuple(hs)
        commands += [Command(w, CommandKind.PREFETCH, fn, "placed") for fn, w in board.added]
        commands += [Command(w, CommandKind.OFFLOAD, fn, "replica removed") for fn, w in board.removed]
        commands += _contention_offloads(view, board, backbone, config)
        moves += len(board.added) + len(board.removed) + dropped
        forced += dropped + placed
        loads.update(board.load)
        if _saturated(view, backbone, config):
            shed.add(backbone)
    changed = replicas != previous.replicas
    states = {w: v.state for w, v in view.workers.items()}
    placement = Placement(
        previous.version + (1 if changed else 0), replicas, states, _changed_at(view, previous, replicas, config)
    )
    return Plan(placement, tuple(commands), moves, frozenset(shed), forced, loads)


def _settling(view: ClusterView, previous: Placement, config: PlacementConfig) -> frozenset[str]:
    return frozenset(fn for fn, t in previous.changed_at.items() if view.now_s - t < config.settle_s)


def _changed_at(
    view: ClusterView, previous: Placement, replicas: Mapping[str, tuple[str, ...]], config: PlacementConfig
) -> dict[str, float]:
    """When each function's replicas last changed; an entry lives only while it is within ``settle_s``."""
    settling = _settling(view, previous, config)
    stamps = {fn: previous.changed_at[fn] for fn in settling if fn in replicas}
    for fn, holders in replicas.items():
        if holders != previous.replicas.get(fn):
            stamps[fn] = view.now_s
    return dict(sorted(stamps.items()))


def _live_workers(view: ClusterView, backbone: str) -> dict[str, int]:
    """Placeable workers of the backbone -> the pool pages placement may use on each."""
    return {
        w: v.pool_pages_total
        for w, v in sorted(view.workers.items())
        if v.backbone == backbone and v.state in PLACEABLE
    }


def _plan_backbone(
    view: ClusterView,
    demand: Mapping[str, Demand],
    catalog: Mapping[str, AdapterSpec],
    previous: Placement,
    config: PlacementConfig,
    seed: int,
    backbone: str,
    budget: list[int],
) -> tuple[_Board, int, int]:
    """The round for one backbone: the board, replicas dropped (forced) and placed (forced)."""
    live = {w: int(p * config.pool_fill) for w, p in _live_workers(view, backbone).items()}
    specs = {fn: s for fn, s in sorted(catalog.items()) if s.backbone == backbone}
    costs = {fn: function_cost(s, demand.get(fn), config) for fn, s in specs.items()}
    joining = view.joining(backbone)
    settling = frozenset() if joining else _settling(view, previous, config)
    board = _Board(config, specs, costs, live, seed, settling=settling, joining=joining)
    order = sorted(specs, key=lambda fn: (-costs[fn], _tiebreak(seed, fn)))
    dropped = _keep_previous(board, previous, order)
    board.assign_homes()
    placed = _place_unplaced(board, order)
    _drop_cold(board, view, order, budget)
    _add_hot(board, view, order, budget)
    _rebalance(board, budget)
    return board, dropped, placed


def _keep_previous(board: _Board, previous: Placement, order: list[str]) -> int:
    """Keep live replicas; count the dropped ones (dead/draining/gone workers) as forced removals."""
    dropped = 0
    for fn in order:
        for w in previous.replicas.get(fn, ()):
            if w in board.cap_pages and w not in board.holders.get(fn, ()) and board.fits(fn, w):
                board.add(fn, w)
            else:
                dropped += 1
    return dropped


def _place_unplaced(board: _Board, order: list[str]) -> int:
    placed = 0
    for fn in order:
        if board.holders.get(fn):
            continue
        w = board.best_worker(fn)
        if w is not None:
            board.add(fn, w)
            board.added.append((fn, w))
            placed += 1
    return placed


def _contended(view: ClusterView, holders: list[str], fn: str, config: PlacementConfig) -> bool:
    """Every holder has more of fn's invocations queued than ``contended_queue``."""
    return all(view.workers[w].queue_depth.get(fn, 0) > config.contended_queue for w in holders)


def _drop_cold(board: _Board, view: ClusterView, order: list[str], budget: list[int]) -> None:
    """One replica less for a function whose load would stay well under a replica's share without it
    (never while a holder has a backlog of it: a replica added for a queue stays until it drains)."""
    limit = replica_share(board.config) * board.config.remove_below
    for fn in reversed(order):  # coldest first
        hs = board.holders.get(fn, [])
        if budget[0] <= 0:
            return
        backlog = any(view.workers[w].queue_depth.get(fn, 0) > board.config.contended_queue for w in hs)
        if len(hs) > 1 and board.costs[fn] / (len(hs) - 1) < limit and not backlog and fn not in board.settling:
            w = max(hs, key=lambda h: (board.load[h], h))
            board.remove(fn, w)
            board.removed.append((fn, w))
            budget[0] -= 1


def _add_hot(board: _Board, view: ClusterView, order: list[str], budget: list[int]) -> None:
    """Replicas for functions whose demand outgrew their replicas, or whose every holder is contended."""
    cfg = board.config
    for fn in order:  # hottest first
        if budget[0] <= 0:
            return
        hs = board.holders.get(fn, [])
        if not hs:
            continue
        want = desired_replicas(board.costs[fn], len(board.cap_pages), cfg)
        if _contended(view, hs, fn, cfg):
            want = max(want, min(len(hs) + 1, cfg.max_replicas, len(board.cap_pages)))
        while len(hs) < want and budget[0] > 0:
            w = board.best_worker(fn)
            if w is None:
                break
            board.add(fn, w)
            board.added.append((fn, w))
            budget[0] -= 1


def _rebalance(board: _Board, budget: list[int]) -> None:
    """Move replicas off workers loaded above the mean by ``imbalance`` and past ``rebalance_above``
    of their target (one move = add + remove).

    Against flapping (before these rules a function ping-ponged between workers every few seconds in
    the live replay, as the demand estimate wobbled): a move must leave its destination at or under
    the trigger, so a function too hot for any worker stays put (more load is the replica trigger's
    job); a function whose replicas changed within ``settle_s`` is not moved; and nothing moves while
    the hottest worker has room, unless a worker is joining.
    """
    cfg = board.config
    workers = list(board.cap_pages)
    if len(workers) < 2:
        return
    while budget[0] >= 2:
        mean = sum(board.load.values()) / len(workers)
        trigger = mean * (1 + cfg.imbalance)
        hot = max(workers, key=lambda w: (board.load[w], w))
        floor = 0.0 if board.joining else board.target * cfg.rebalance_above
        if mean <= 1e-9 or board.load[hot] <= max(trigger, floor):
            return
        move = _best_move(board, hot, trigger)
        if move is None:
            return
        fn, dest = move
        board.remove(fn, hot)
        board.add(fn, dest)
        board.removed.append((fn, hot))
        board.added.append((fn, dest))
        budget[0] -= 2


def _best_move(board: _Board, hot: str, trigger: float) -> tuple[str, str] | None:
    """The (function, destination) that lowers the hotter of the two workers the most, leaving the
    destination at or under ``trigger``."""
    best: tuple[float, int, str, str] | None = None
    for fn, hs in board.holders.items():
        if hot not in hs or fn in board.settling:
            continue
        share = board.share(fn)
        dest = board.best_worker(fn)
        if dest is None or share <= 0 or board.load[dest] + share > trigger + 1e-9:
            continue
        after = max(board.load[hot] - share, board.load[dest] + share)
        if after >= board.load[hot] - 1e-9:
            continue
        key = (after, _tiebreak(board.seed, fn), fn, dest)
        if best is None or key < best:
            best = key
    return (best[2], best[3]) if best else None


def _contention_offloads(view: ClusterView, board: _Board, backbone: str, config: PlacementConfig) -> list[Command]:
    """ServerlessLoRA: on a contended worker, offload device adapters that are neither placed nor queued there."""
    out = []
    for w in board.cap_pages:
        v = view.workers[w]
        if v.queued <= config.contended_queue and v.pool_pages_free > 0:
            continue
        placed_here = {fn for fn, hs in board.holders.items() if w in hs}
        for fn, tier in sorted(v.tiers.items()):
            if tier == Tier.DEVICE and fn not in placed_here and v.queue_depth.get(fn, 0) == 0:
                out.append(Command(w, CommandKind.OFFLOAD, fn, "cold adapter on a contended worker"))
    return out


def _saturated(view: ClusterView, backbone: str, config: PlacementConfig) -> bool:
    """True when the backbone has no active worker below the saturation queue depth."""
    active = [v for v in view.workers.values() if v.backbone == backbone and v.state == WorkerState.ACTIVE]
    return all(v.queued > config.saturated_queue for v in active)


def rank_oblivious_plan(
    view: ClusterView,
    demand: Mapping[str, Demand],
    catalog: Mapping[str, AdapterSpec],
    previous: Placement,
    config: PlacementConfig,
    seed: int,
) -> Plan:
    """The baseline: replicas by tokens/s alone, each on a seeded-random live worker with room.

    It ignores ranks (no rank weighting, no rank classes), load balance and contention, and never
    moves a replica that is still live: what LoRAServe compares against (random placement).
    """
    blind = PlacementConfig(**{**config.__dict__, "rank_token_cost": 0.0})
    rng = random.Random(seed)
    replicas: dict[str, tuple[str, ...]] = {}
    commands: list[Command] = []
    moves = forced = 0
    for backbone in sorted({s.backbone for s in catalog.values()}):
        live = {w: int(p * config.pool_fill) for w, p in _live_workers(view, backbone).items()}
        specs = {fn: s for fn, s in sorted(catalog.items()) if s.backbone == backbone}
        costs = {fn: function_cost(s, demand.get(fn), blind) for fn, s in specs.items()}
        board = _Board(blind, specs, costs, live, seed)
        dropped = _keep_previous(board, previous, sorted(specs))
        placed_before = len(board.added)
        for fn in sorted(specs):
            want = desired_replicas(costs[fn], len(live), blind)
            while len(board.holders.get(fn, [])) < want:
                room = [w for w in live if w not in board.holders.get(fn, []) and board.fits(fn, w)]
                if not room:
                    break
                w = rng.choice(room)
                board.add(fn, w)
                board.added.append((fn, w))
        for fn, hs in board.holders.items():
            if hs:
                replicas[fn] = tuple(hs)
        commands += [Command(w, CommandKind.PREFETCH, fn, "placed") for fn, w in board.added]
        moves += len(board.added) + dropped
        forced += dropped + len(board.added) - placed_before
    changed = replicas != previous.replicas
    states = {w: v.state for w, v in view.workers.items()}
    placement = Placement(previous.version + (1 if changed else 0), replicas, states)
    return Plan(placement, tuple(commands), moves, frozenset(), forced)
