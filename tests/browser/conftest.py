"""Headless Chromium (Debian's ``chromium``) driven by playwright-python, and a tenant with usage.

Never ``playwright install``: the browser is the system's ``/usr/bin/chromium`` (``.ci/run``
installs it when missing). Screenshots of every page go to the test's tmp dir as artifacts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from launcher.platform import bill, create_tenant_with_key, register_function
from tests.support.platform import PRICE_IN, PRICE_OUT, Platform

T = TypeVar("T")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Tenant:
    """A tenant of the browser tests: its key, its functions, the invocations it made."""

    name: str
    tenant_id: str
    key: str
    functions: list[str]
    invocation_ids: list[str]


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from a thread of its own: playwright's sync API keeps an
    event loop running in the test's thread, where ``asyncio.run`` is refused."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def controlplane_url(platform: Platform) -> str:
    s = platform.settings
    return f"http://{s.controlplane_host}:{s.controlplane_port}"


def wait_for_usage(platform: Platform, tenant: Tenant, timeout_s: float = 30.0) -> None:
    """Until every invocation of ``tenant`` has its usage record in the ledger."""
    now = datetime.now(UTC)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = run_async(bill(platform.settings, tenant.tenant_id, now.year, now.month))
        if sum(line.invocations for line in result.lines) >= len(tenant.invocation_ids):
            return
        time.sleep(0.2)
    raise AssertionError(f"usage of {tenant.name} did not reach the ledger in {timeout_s}s")


@pytest.fixture(scope="session")
def dash_tenant(platform: Platform, adapter_dirs: dict[str, Path]) -> Tenant:
    """A tenant of its own (so other tests' usage never moves its totals) with two functions and usage."""
    name = f"dash-{uuid.uuid4().hex[:6]}"
    tenant_id, key = run_async(create_tenant_with_key(platform.settings, name))
    functions = [f"{name}-summarise", f"{name}-classify"]
    for fn, adapter in zip(functions, ("a8", "b16")):
        run_async(
            register_function(platform.settings, tenant_id, fn, "tiny", adapter_dirs[adapter], PRICE_IN, PRICE_OUT)
        )
    tenant = Tenant(name, tenant_id, key, functions, [])
    with httpx.Client(base_url=platform.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as gw:
        for i, (fn, max_tokens) in enumerate([(functions[0], 8), (functions[0], 5), (functions[1], 7)]):
            r = gw.post(
                f"/v1/functions/{fn}/invoke", json={"prompt": f"the quick brown fox {i}", "max_tokens": max_tokens}
            )
            assert r.status_code == 200, r.text
            tenant.invocation_ids.append(r.json()["id"])
    wait_for_usage(platform, tenant)
    return tenant


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Chromium for one test module. Not for the session: playwright's sync API keeps its event
    loop set as running in this thread until it stops, and later asyncio tests need the thread."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where this test's screenshots go (kept by pytest under its basetemp)."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


def keep_screenshot(source: Path, name: str) -> None:
    """Copy a screenshot to $LORAFAAS_SCREENSHOTS when set (CI artifact folder, docs/img refresh)."""
    target = os.environ.get("LORAFAAS_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, Path(target) / name)
