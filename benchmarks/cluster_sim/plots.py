"""The simulator's three plots: goodput against N, the TTFT CDF at one N, devices needed against load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
from matplotlib import pyplot as plt  # after the backend is chosen


def save_plots(out: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_goodput(out, folder / "sim_goodput.png"), _cdf(out, folder / "sim_ttft_cdf.png")]
    paths.append(_devices(out, folder / "sim_devices.png"))
    return paths


def _goodput(out: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, per in out["goodput"].items():
        by_n = {int(n): v for n, v in per.items()}  # int keys in memory, str keys from JSON
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n]["goodput_rps"] for n in ns], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers (devices)")
    ax.set_ylabel("goodput, requests/s at TTFT p99 <= SLO")
    ax.set_title(f"goodput against N ({out['profile']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cdf(out: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    s = out["same_load"]
    for system, values in out["ttft_cdf"].items():
        xs = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=system)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT, s")
    ax.set_ylabel("share of requests")
    ax.set_title(f"TTFT CDF at {s['offered_rps']:.0f} req/s, N={s['workers']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _devices(out: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    d = out["devices_needed"]
    loads = d["load_rps"]
    for system, per in d["systems"].items():
        pts = [(loads[k], v) for k, v in per.items() if v]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
    ax.set_xlabel("offered load, requests/s")
    ax.set_ylabel("devices needed at the SLO")
    ax.set_title("devices needed against load")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
