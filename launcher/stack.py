"""The platform's own processes on one machine: control plane, gateway and workers.

Used by ``lorafaas dev up``, the demo and the end-to-end tests. Each process gets its
settings through ``LORAFAAS_`` environment variables and logs to ``workdir/logs``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel

from lorafaas.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """Flatten settings into the environment variables that rebuild them in a child process."""
    env: dict[str, str] = {}
    for name, value in settings:
        if isinstance(value, BaseModel):
            for field, inner in value:
                env[f"LORAFAAS_{name.upper()}__{field.upper()}"] = (
                    str(inner).lower()
                    if isinstance(inner, bool)
                    else json.dumps(inner)  # lists and dicts: pydantic-settings reads them as JSON
                    if isinstance(inner, (list, dict))
                    else str(inner)
                )
        else:
            env[f"LORAFAAS_{name.upper()}"] = str(value)
    return env


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was healthy:\n{tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout_s:g}s")


class PlatformProcesses:
    """Starts and stops the platform's processes; stops only what it started."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.logs = Path(workdir) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str], overrides: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**os.environ, **settings_env(self.settings), **(overrides or {})}
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "--verbose", *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[name] = proc
        return proc

    def start_controlplane(self, timeout_s: float = 180) -> None:
        s = self.settings
        proc = self._spawn("controlplane", ["controlplane"])
        wait_healthy(
            f"http://{s.controlplane_host}:{s.controlplane_port}/healthz",
            timeout_s,
            proc,
            self.logs / "controlplane.log",
        )

    def start_gateway(self, timeout_s: float = 180) -> None:
        s = self.settings
        proc = self._spawn("gateway", ["gateway"])
        wait_healthy(f"http://{s.gateway_host}:{s.gateway_port}/healthz", timeout_s, proc, self.logs / "gateway.log")

    def start_worker(self, worker_id: str, overrides: dict[str, str] | None = None) -> subprocess.Popen:
        return self._spawn(
            f"worker-{worker_id}", ["worker"], {"LORAFAAS_WORKER__WORKER_ID": worker_id, **(overrides or {})}
        )

    def kill(self, name: str) -> None:
        """SIGKILL one process (fault tests: a worker dying mid-invocation)."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop_one(self, name: str, timeout_s: float = 15) -> None:
        """SIGTERM one process (a worker drains its running invocations), SIGKILL after the timeout."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self, timeout_s: float = 15) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


async def wait_for_worker(settings: Settings, worker_id: str, timeout_s: float = 120, active: bool = True) -> None:
    """Wait until the worker's heartbeat or report arrives: its backbone is loaded and, with
    ``active``, the control plane prefetched its placements and it is pulling invocations."""
    import asyncio

    import nats

    from lorafaas.names import Names
    from lorafaas.wire import ContentionReport, WorkerHeartbeat

    nc = await nats.connect(settings.nats.url)
    names = Names(settings.nats.prefix)
    seen = asyncio.Event()

    def note(message: WorkerHeartbeat | ContentionReport) -> None:
        if message.worker_id == worker_id and (not active or message.state == "active"):
            seen.set()

    async def on_beat(msg) -> None:
        note(WorkerHeartbeat.decode(msg.data))

    async def on_report(msg) -> None:
        note(ContentionReport.decode(msg.data))

    subs = [
        await nc.subscribe(names.heartbeat_subject, cb=on_beat),
        await nc.subscribe(names.contention_subject, cb=on_report),
    ]
    try:
        await asyncio.wait_for(seen.wait(), timeout_s)
    except TimeoutError as e:
        state = "active " if active else ""
        raise TimeoutError(f"worker {worker_id} was not {state}within {timeout_s:g}s") from e
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await nc.close()
