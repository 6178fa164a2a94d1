"""The discrete-event core: simulated workers running the engine's schedule, and one run.

A worker runs the schedule of ``gpuworker/engine``: prefill first (every admissible waiting
request, one prefill each, all first tokens at the end of the step), otherwise one decode step of
the whole running batch. Between events a batch does not change, so a run of k identical decode
steps is one event, cut short at the next step boundary when a request arrives (the engine admits
at step boundaries). Adapter tiers per worker: device pool (pages, LRU of unpinned adapters),
host cache (bytes, LRU), local disk; a miss fetches from a peer's host memory (when the system
allows), disk or S3 without blocking the engine; the host -> device copy blocks the step that
admits the request, as in the worker. The clock is the event queue's; nothing reads wall time.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import engine_model as em
from .profile import Profile
from .workload import Workload

if TYPE_CHECKING:
    from .systems import System


@dataclass(eq=False, slots=True)  # identity equality: list.remove must not compare fields
class Req:
    rid: int
    arrival: float
    fn: int
    prompt: int
    output: int
    remaining: int = 0
    first: float = -1.0
    done: float = -1.0
    worker: int = -1
    rejected: bool = False
    cold: bool = False  # waited for an adapter fetch


@dataclass(slots=True)
class Action:
    kind: str  # "prefill" or "decode"
    start: float
    end: float
    reqs: list[Req]
    step_s: float = 0.0
    steps: int = 0


@dataclass(eq=False)
class SimWorker:
    wid: int
    name: str
    waiting: deque[Req] = field(default_factory=deque)
    loading: dict[int, list[Req]] = field(default_factory=dict)
    running: list[Req] = field(default_factory=list)
    device: OrderedDict[int, int] = field(default_factory=OrderedDict)  # fn -> pages, LRU order
    pages_used: int = 0
    pinned: Counter[int] = field(default_factory=Counter)
    host: OrderedDict[int, int] = field(default_factory=OrderedDict)  # fn -> bytes, LRU order
    host_used: int = 0
    disk: set[int] = field(default_factory=set)
    prefetching: set[int] = field(default_factory=set)
    action: Action | None = None
    version: int = 0
    busy_s: float = 0.0
    depth: int = 0  # waiting + loading + running
    fn_rows: Counter[int] = field(default_factory=Counter)  # running rows per adapter
    sum_len: int = 0  # running rows' prompt + output tokens
    sum_rem: int = 0  # running rows' tokens still to generate
    owner: int = -1  # dedicated backbone: the one function it serves (-1: none)
    ready_at: float = 0.0  # dedicated backbone: when its cold start ends
    produced: deque[tuple[float, int]] = field(default_factory=deque)  # (step end, tokens) for reports

    def tokens_per_s(self, now: float, horizon_s: float = 5.0) -> float:
        """Generated tokens/s over the last ``horizon_s``, as the worker reports it (gpuworker StepStats)."""
        while self.produced and now - self.produced[0][0] > horizon_s:
            self.produced.popleft()
        return sum(n for _, n in self.produced) / horizon_s


@dataclass
class Counters:
    adapter_loads: int = 0  # host -> device copies
    request_path_loads: int = 0  # of those, on a request's critical path
    fetches: Counter[str] = field(default_factory=Counter)  # source -> count
    spills: int = 0
    moves: int = 0
    rejected: int = 0
    cold_starts: int = 0  # dedicated backbones started


class Sim:
    """One run: a workload through N workers under one system."""

    def __init__(
        self,
        profile: Profile,
        workload: Workload,
        workers: int,
        system: System,
        duration_s: float,
        warmup_s: float,
        seed: int = 0,
        request_delays: list[float] | None = None,
    ) -> None:
        self.p = profile
        self.wl = workload
        self.ranks = workload.ranks
        self.nbytes = [profile.adapter_bytes(r) for r in workload.ranks]
        self.npages = [profile.adapter_pages(r) for r in workload.ranks]
        self.workers = [SimWorker(i, f"w{i}") for i in range(workers)]
        self.depths = {w.name: 0 for w in self.workers}
        self.system = system
        self.duration_s = duration_s
        self.warmup_s = warmup_s
        self.seed = seed
        self.request_delays = request_delays
        self.now = 0.0
        self.c = Counters()
        self.reqs: list[Req] = []
        self.device_index: dict[int, set[int]] = {}  # fn -> workers holding it on the device
        self.host_index: dict[int, set[int]] = {}  # fn -> workers holding it in host memory
        self.global_queue: deque[Req] = deque()
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.device_pages_cap = profile.pool_pages
        self.device_slots_cap = 10**9  # adapters per device (Ray Serve's LRU of K sets it)

    # -- the event queue -------------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, drain_s: float) -> None:
        wl = self.wl
        for i in range(len(wl.arrival_s)):
            req = Req(i, float(wl.arrival_s[i]), int(wl.function[i]), int(wl.prompt[i]), int(wl.output[i]))
            self.reqs.append(req)
        self.system.setup(self)
        # The serving path (gateway, NATS, the worker's pull) delays each request on its way to a
        # worker: a constant from the profile, or draws from measured delays (``request_delays``).
        if self.request_delays:
            delays = np.random.default_rng(self.seed).choice(self.request_delays, size=len(self.reqs))
        else:
            delays = np.full(len(self.reqs), self.p.request_overhead_s)
        for req, delay in zip(self.reqs, delays):
            self.at(req.arrival + float(delay), self._arrive, req)
        end = self.duration_s + drain_s
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            if t > end:
                break
            self.now = t
            fn(*args)

    def _arrive(self, req: Req) -> None:
        self.system.route(self, req)

    # -- tiers -----------------------------------------------------------------------------
    def accept(self, w: SimWorker, req: Req) -> None:
        """The request reaches worker ``w`` (its queue); fetch the adapter if it is not in host or device."""
        req.worker = w.wid
        w.depth += 1
        self.depths[w.name] = w.depth
        fn = req.fn
        if fn in w.device or fn in w.host:
            w.waiting.append(req)
            self.kick(w)
        elif fn in w.loading:
            w.loading[fn].append(req)
            req.cold = True
        else:
            req.cold = True
            self.fetch(w, fn, [req])

    def fetch(self, w: SimWorker, fn: int, reqs: list[Req], extra_s: float = 0.0) -> None:
        """Bring fn to w's host memory: from disk, a peer's host memory (if allowed and faster), or S3."""
        nbytes = self.nbytes[fn]
        if fn in w.disk:
            source = "disk"
        elif self.system.peer_fetch and any(h != w.wid for h in self.host_index.get(fn, ())):
            source = "peer"
        else:
            source = "s3"
        if source == "peer" and em.move_s(self.p, nbytes, "s3") < em.move_s(self.p, nbytes, "peer"):
            source = "s3"
        self.c.fetches[source] += 1
        w.loading[fn] = reqs
        self.at(self.now + extra_s + em.move_s(self.p, nbytes, source), self._fetched, w, fn)

    def _fetched(self, w: SimWorker, fn: int) -> None:
        self.host_insert(w, fn)
        w.disk.add(fn)
        reqs = w.loading.pop(fn, [])
        w.waiting.extend(reqs)
        if fn in w.prefetching:
            w.prefetching.discard(fn)
            self.to_device(w, fn, background=True)
        if reqs:
            self.kick(w)

    def host_insert(self, w: SimWorker, fn: int) -> None:
        if fn in w.host:
            w.host.move_to_end(fn)
            return
        w.host[fn] = self.nbytes[fn]
        w.host_used += self.nbytes[fn]
        self.host_index.setdefault(fn, set()).add(w.wid)
        while w.host_used > self.p.host_cache_bytes and len(w.host) > 1:
            old, size = w.host.popitem(last=False)
            w.host_used -= size
            self.host_index[old].discard(w.wid)

    def to_device(self, w: SimWorker, fn: int, background: bool = False) -> float | None:
        """Make fn resident on w's device; the copy time, or None when the pool has no room."""
        if fn in w.device:
            w.device.move_to_end(fn)
            return 0.0
        need = self.npages[fn]
        if need > self.device_pages_cap:
            return None
        victims = []
        free = self.device_pages_cap - w.pages_used
        slots = self.device_slots_cap - len(w.device)
        for old in w.device:  # LRU first
            if free >= need and slots >= 1:
                break
            if w.pinned[old] == 0 and (not background or old not in self.system.keep(self, w)):
                victims.append(old)
                free += w.device[old]
                slots += 1
        if free < need or slots < 1:
            return None
        for old in victims:
            self.evict(w, old)
        w.device[fn] = need
        w.pages_used += need
        self.device_index.setdefault(fn, set()).add(w.wid)
        if fn not in w.host:  # a copy from disk first (the host copy was evicted meanwhile)
            self.host_insert(w, fn)
        self.c.adapter_loads += 1
        return em.h2d_s(self.p, self.nbytes[fn])

    def evict(self, w: SimWorker, fn: int) -> None:
        pages = w.device.pop(fn, None)
        if pages is not None:
            w.pages_used -= pages
            self.device_index[fn].discard(w.wid)
            self.host_insert(w, fn)

    def prefetch(self, w: SimWorker, fn: int) -> None:
        """A PREFETCH command: bring fn down the tiers to w's device without blocking its engine."""
        if fn in w.device:
            return
        if fn in w.host:
            self.to_device(w, fn, background=True)
        elif fn not in w.loading:
            w.prefetching.add(fn)
            self.fetch(w, fn, [])

    # -- the engine's schedule -------------------------------------------------------------
    def kick(self, w: SimWorker) -> None:
        """New admissible work: start now if idle, or cut a decode run at its next step boundary."""
        if w.action is None:
            if self.now >= w.ready_at:
                self._next(w, self.now)
            return
        a = w.action
        if a.kind != "decode" or len(w.running) >= self.p.max_batch:
            return
        done = min(a.steps, math.floor((self.now - a.start) / a.step_s) + 1)
        if done < a.steps:
            a.steps = done
            a.end = a.start + done * a.step_s
            w.version += 1
            self.at(a.end, self._wake, w, w.version)

    def _next(self, w: SimWorker, t: float) -> None:
        admitted, cost = self._admit(w)
        if admitted:
            w.action = Action("prefill", t, t + cost + self.p.step_overhead_s, admitted)
        elif w.running:
            rows = self.system.decode_rows(self, w)
            if rows is w.running:  # the whole batch: aggregates kept incrementally
                step = em.decode_s(self.p, w.fn_rows, len(rows), self.ranks, w.sum_len - w.sum_rem)
            else:
                ctx = sum(r.prompt + r.output - r.remaining for r in rows)
                step = em.decode_s(self.p, Counter(r.fn for r in rows), len(rows), self.ranks, ctx)
            step += self.p.step_overhead_s
            steps = min(r.remaining for r in rows)
            w.action = Action("decode", t, t + steps * step, rows, step, steps)
        else:
            w.action = None
            self.system.idle(self, w)
            return
        w.version += 1
        self.at(w.action.end, self._wake, w, w.version)

    def _admit(self, w: SimWorker) -> tuple[list[Req], float]:
        free = self.p.max_batch - len(w.running)
        out: list[Req] = []
        cost = 0.0
        kept: deque[Req] = deque()
        while w.waiting and len(out) < free:
            req = w.waiting.popleft()
            copy = self.to_device(w, req.fn)
            if copy is None:  # the pool is full of pinned adapters: wait for a slot
                kept.append(req)
                continue
            if copy > 0:
                self.c.request_path_loads += 1
            w.pinned[req.fn] += 1
            cost += copy + em.prefill_s(self.p, req.prompt, self.ranks[req.fn])
            out.append(req)
        kept.extend(w.waiting)
        w.waiting = kept
        return out, cost

    def _wake(self, w: SimWorker, version: int) -> None:
        if version != w.version or w.action is None:
            return
        a = w.action
        w.busy_s += a.end - a.start
        w.action = None
        w.produced.append((a.end, len(a.reqs) * max(a.steps, 1)))
        if a.kind == "prefill":
            for r in a.reqs:
                r.first = a.end
                r.remaining = r.output - 1
                if r.remaining <= 0:
                    self._finish(w, r)
                else:
                    w.running.append(r)
                    w.fn_rows[r.fn] += 1
                    w.sum_len += r.prompt + r.output
                    w.sum_rem += r.remaining
        else:
            finished = False
            w.sum_rem -= a.steps * len(a.reqs)
            for r in a.reqs:
                r.remaining -= a.steps
                if r.remaining <= 0:
                    finished = True
                    self._finish(w, r)
                    w.sum_len -= r.prompt + r.output
                    w.sum_rem -= r.remaining  # never below 0: steps <= every row's remaining
                    w.fn_rows[r.fn] -= 1
                    if not w.fn_rows[r.fn]:
                        del w.fn_rows[r.fn]
            if finished:
                w.running = [r for r in w.running if r.remaining > 0]
        self.system.refill(self, w)
        self._next(w, a.end)

    def _finish(self, w: SimWorker, r: Req) -> None:
        r.done = self.now
        w.pinned[r.fn] -= 1
        w.depth -= 1
        self.depths[w.name] = w.depth

    # -- results ---------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        measured = [r for r in self.reqs if r.arrival >= self.warmup_s]
        ttft = np.array([(r.first - r.arrival) if r.first >= 0 else np.inf for r in measured])
        window = self.duration_s - self.warmup_s
        tokens = sum(r.prompt + r.output for r in measured if r.done >= 0)
        busy = sum(w.busy_s for w in self.workers)
        return {
            "requests": len(measured),
            "ttft_p50_s": _quantile(ttft, 0.50),
            "ttft_p99_s": _quantile(ttft, 0.99),
            "ttft_s": ttft,
            "completed": sum(1 for r in measured if r.done >= 0),
            "tokens_per_s": tokens / window if window > 0 else 0.0,
            "adapter_loads": self.c.adapter_loads,
            "request_path_loads": self.c.request_path_loads,
            "fetches": dict(self.c.fetches),
            "spills": self.c.spills,
            "moves": self.c.moves,
            "rejected": self.c.rejected,
            "cold_starts": self.c.cold_starts,
            "busy_share": busy / (len(self.workers) * max(self.now, 1e-9)),
        }


def _quantile(x: np.ndarray, q: float) -> float:
    """Nearest-rank quantile that keeps infinities (a request never served counts as infinitely late)."""
    if len(x) == 0:
        return math.nan
    s = np.sort(x)
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))])
