"""The whole platform as processes (control plane, gateway, a worker on the tiny backbone) for the
end-to-end tests; the session fixture ``platform`` in tests/conftest.py starts it once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from launcher.platform import create_tenant_with_key, publish_backbone, register_function
from launcher.stack import PlatformProcesses, wait_for_worker
from lorafaas.settings import Settings

PRICE_IN, PRICE_OUT = 150_000, 600_000


@dataclass
class Platform:
    settings: Settings
    procs: PlatformProcesses
    backbone_uri: str
    keys: dict[str, str] = field(default_factory=dict)  # tenant name -> API key
    tenant_ids: dict[str, str] = field(default_factory=dict)
    functions: dict[str, tuple[str, Path]] = field(default_factory=dict)  # function name -> (tenant, adapter dir)

    @property
    def url(self) -> str:
        return f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"

    def worker_env(self, backbone: str, uri: str | None = None) -> dict[str, str]:
        return {"LORAFAAS_WORKER__BACKBONE": backbone, "LORAFAAS_WORKER__BACKBONE_URI": uri or self.backbone_uri}

    def client(self, tenant: str | None = None, key: str | None = None) -> httpx.AsyncClient:
        secret = key or (self.keys[tenant] if tenant else None)
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60)


async def _setup(settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], platform: Platform) -> None:
    layout = {"alpha": {"alpha-a8": "a8", "alpha-b16": "b16"}, "beta": {"beta-c32": "c32"}}
    for tenant, functions in layout.items():
        tenant_id, key = await create_tenant_with_key(settings, f"e2e-{tenant}")
        platform.keys[tenant], platform.tenant_ids[tenant] = key, tenant_id
        for name, adapter in functions.items():
            await register_function(settings, tenant_id, name, "tiny", adapter_dirs[adapter], PRICE_IN, PRICE_OUT)
            platform.functions[name] = (tenant, adapter_dirs[adapter])


def run_platform(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], session_tmp: Path
) -> Iterator[Platform]:
    """Start the platform, yield it, stop it."""
    uri = asyncio.run(publish_backbone(settings, "tiny", backbone_dir))
    procs = PlatformProcesses(settings, session_tmp / "platform")
    p = Platform(settings, procs, uri)
    try:
        asyncio.run(_setup(settings, backbone_dir, adapter_dirs, p))
        procs.start_controlplane()
        procs.start_gateway()
        procs.start_worker("e2e-worker", p.worker_env("tiny"))
        asyncio.run(wait_for_worker(settings, "e2e-worker"))
        yield p
    finally:
        procs.stop_all()
