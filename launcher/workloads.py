"""Workloads with per-function temporal structure, built on a real trace's arrival times.

The trace keeps its own arrival times, prompt and output lengths (``launcher.trace`` loads and
scales them); only the function each request goes to changes. Each function gets a Zipf
popularity (as in the plain control) times a temporal pattern, and every arrival goes to a
function drawn with probability proportional to ``popularity x pattern(t)`` at its time:

- **periodic** (timer-triggered functions, a large share of applications in Shahrad et al.,
  "Serverless in the Wild", USENIX ATC 2020, whose inter-arrival times have a CV near 0): on
  for ``on_s`` seconds every ``period_s`` seconds (period log-uniform in
  ``periodic_period_s``), each firing moved by a seeded jitter; off in between.
- **session** (interactive use: a user or an agent works in bursts, then leaves; the
  ON/OFF sessions of chat and agent traffic): alternating on and off spells with exponential
  lengths (means ``session_on_s`` and ``session_off_s``).
- **drift** (popularity that moves during the day: a function gaining or losing users; the
  diurnal drift in the Azure Functions and LLM traces): always on, weight ramping
  log-linearly between ``drift_range`` factors from start to end, up or down.
- **steady**: always on with its popularity only (a stationary Poisson share; the plain Zipf
  control gives every function this pattern).

The default mix (``WorkloadMix``) is 40% periodic, 30% session, 20% drift, 10% steady; the
kind of each function is drawn with the seed, independently of its popularity. A period or a
session is on a given function, not on the trace: when several structured functions are off
at once, their share goes to the others, so the aggregate arrival process stays the trace's.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field

from launcher.trace import TraceRequest, zipf_weights

KINDS = ("periodic", "session", "drift", "steady")


@dataclass(frozen=True)
class WorkloadMix:
    periodic: float = 0.4
    session: float = 0.3
    drift: float = 0.2
    steady: float = 0.1
    periodic_period_s: tuple[float, float] = (60.0, 600.0)
    periodic_on_s: tuple[float, float] = (5.0, 20.0)
    periodic_jitter_s: float = 3.0
    session_on_s: float = 60.0
    session_off_s: float = 300.0
    drift_range: tuple[float, float] = (0.1, 3.0)
    on_boost: float = 8.0  # weight of an "on" structured function relative to its popularity


@dataclass
class FunctionPattern:
    kind: str
    popularity: float
    on: list[tuple[float, float]] = field(default_factory=list)  # on spells (periodic, session), seconds
    drift: tuple[float, float] = (1.0, 1.0)  # weight factor at the start and at the end (drift)
    boost: float = 1.0  # weight factor while on (periodic, session)

    def weight(self, t: float, duration_s: float) -> float:
        if self.kind == "steady":
            return self.popularity
        if self.kind == "drift":
            a, b = self.drift
            frac = min(max(t / max(duration_s, 1e-9), 0.0), 1.0)
            return self.popularity * math.exp(math.log(a) + frac * (math.log(b) - math.log(a)))
        # Spells are sorted and disjoint: only the last one starting at or before t can hold it.
        i = bisect.bisect_right(self.on, (t, math.inf)) - 1
        return self.popularity * self.boost if i >= 0 and t < self.on[i][1] else 0.0


def _periodic_spells(rng: random.Random, mix: WorkloadMix, duration_s: float) -> list[tuple[float, float]]:
    lo, hi = mix.periodic_period_s
    period = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    on = rng.uniform(*mix.periodic_on_s)
    phase = rng.uniform(0, period)
    spells, k = [], 0
    while (start := phase + k * period) < duration_s:
        s = start + rng.uniform(-mix.periodic_jitter_s, mix.periodic_jitter_s)
        spells.append((s, s + on))
        k += 1
    return spells


def _session_spells(rng: random.Random, mix: WorkloadMix, duration_s: float) -> list[tuple[float, float]]:
    spells, t = [], rng.uniform(0, mix.session_off_s)
    while t < duration_s:
        on = rng.expovariate(1 / mix.session_on_s)
        spells.append((t, t + on))
        t += on + rng.expovariate(1 / mix.session_off_s)
    return spells


def make_patterns(
    functions: int, mix: WorkloadMix, duration_s: float, zipf_s: float, seed: int
) -> list[FunctionPattern]:
    """Each function's kind, popularity and on spells, drawn with the seed."""
    rng = random.Random(seed)
    popularity = zipf_weights(functions, zipf_s)
    shares = [mix.periodic, mix.session, mix.drift, mix.steady]
    out = []
    for f in range(functions):
        kind = rng.choices(KINDS, shares)[0]
        p = FunctionPattern(kind=kind, popularity=popularity[f], boost=mix.on_boost)
        if kind == "periodic":
            p.on = _periodic_spells(rng, mix, duration_s)
        elif kind == "session":
            p.on = _session_spells(rng, mix, duration_s)
        elif kind == "drift":
            lo, hi = mix.drift_range
            p.drift = (lo, hi) if rng.random() < 0.5 else (hi, lo)
        out.append(p)
    return out


def assign_structured(
    requests: list[TraceRequest], patterns: list[FunctionPattern], duration_s: float, seed: int
) -> list[TraceRequest]:
    """The same requests, each re-assigned to a function by the patterns' weights at its arrival.

    ``duration_s`` and the patterns' times are on the requests' time axis (after time scaling).
    An arrival at a moment when every function has weight 0 goes to the steadiest fallback: a
    function drawn by popularity alone.
    """
    rng = random.Random(seed + 7)
    indices = list(range(len(patterns)))
    base = [p.popularity for p in patterns]
    out = []
    for r in requests:
        weights = [p.weight(r.arrival_s, duration_s) for p in patterns]
        f = rng.choices(indices, weights if sum(weights) > 0 else base)[0]
        out.append(TraceRequest(r.arrival_s, r.prompt_tokens, r.output_tokens, f))
    return out


def describe_mix(patterns: list[FunctionPattern], requests: list[TraceRequest], mix: WorkloadMix) -> str:
    counts: dict[str, int] = dict.fromkeys(KINDS, 0)
    funcs: dict[str, int] = dict.fromkeys(KINDS, 0)
    for p in patterns:
        funcs[p.kind] += 1
    for r in requests:
        counts[patterns[r.function_index].kind] += 1
    parts = ", ".join(f"{k} {funcs[k]} functions / {counts[k]} requests" for k in KINDS)
    return (
        f"structured mix (periodic {mix.periodic:g}, session {mix.session:g}, drift {mix.drift:g}, "
        f"steady {mix.steady:g}; period {mix.periodic_period_s[0]:g}-{mix.periodic_period_s[1]:g} s, "
        f"session on/off {mix.session_on_s:g}/{mix.session_off_s:g} s): {parts}"
    )
