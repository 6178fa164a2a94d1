"""One simulated run, and the searches built from runs: goodput and devices needed at the SLO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .profile import Profile
from .sim import Sim
from .systems import PlannerSettings, make_system
from .workload import TraceShape, WorkloadSpec, build


@dataclass(frozen=True)
class RunSpec:
    profile: Profile
    shape: TraceShape
    workload: WorkloadSpec
    duration_s: float = 60.0
    warmup_s: float = 10.0
    seed: int = 0
    settings: PlannerSettings | None = None
    ray_k: int = 8

    @property
    def drain_s(self) -> float:
        return max(5 * self.profile.ttft_slo_s, 5.0)


def run_once(spec: RunSpec, system: str, workers: int, rate_per_s: float) -> dict[str, Any]:
    """One run of ``system`` on ``workers`` workers at ``rate_per_s`` offered requests/s (cluster-wide)."""
    p = spec.profile
    wl = build(
        spec.shape, spec.workload, rate_per_s, spec.duration_s, p.token_scale, p.max_prompt_tokens, p.max_output_tokens
    )
    sim = Sim(p, wl, workers, make_system(system, spec.settings, spec.ray_k), spec.duration_s, spec.warmup_s, spec.seed)
    sim.run(spec.drain_s)
    res = sim.results()
    res.update(system=system, workers=workers, offered_rps=rate_per_s, workload=wl.description)
    return res


def meets_slo(res: dict[str, Any], slo_s: float) -> bool:
    return res["ttft_p99_s"] <= slo_s


def goodput(
    spec: RunSpec, system: str, workers: int, start_rps: float, steps: int = 5
) -> tuple[float, dict[str, Any] | None]:
    """The highest offered requests/s whose TTFT p99 meets the SLO (geometric bracket, then bisection).

    Returns (rate, the run at that rate) or (0, None) when even start_rps / 64 misses the SLO.
    """
    slo = spec.profile.ttft_slo_s
    lo, lo_res, hi = 0.0, None, None
    rate = start_rps
    for _ in range(7):  # bracket
        res = run_once(spec, system, workers, rate)
        if meets_slo(res, slo):
            lo, lo_res = rate, res
            if hi is not None:
                break
            rate *= 2
        else:
            hi = rate
            if lo > 0:
                break
            rate /= 4
    if lo == 0.0:
        return 0.0, None
    if hi is None:
        return lo, lo_res
    for _ in range(steps):
        mid = (lo + hi) / 2
        res = run_once(spec, system, workers, mid)
        if meets_slo(res, slo):
            lo, lo_res = mid, res
        else:
            hi = mid
    return lo, lo_res


def devices_needed(spec: RunSpec, system: str, rate_rps: float, max_workers: int) -> int | None:
    """The fewest workers that serve ``rate_rps`` within the SLO (bisection; None if max_workers do not)."""
    slo = spec.profile.ttft_slo_s
    if not meets_slo(run_once(spec, system, max_workers, rate_rps), slo):
        return None
    lo, hi = 0, max_workers  # lo fails (or is 0), hi meets
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets_slo(run_once(spec, system, mid, rate_rps), slo):
            hi = mid
        else:
            lo = mid
    return hi
