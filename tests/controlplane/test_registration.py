"""Function registration over HTTP: every bad adapter is a 422 that leaves nothing behind;
good ones arrive as files, a tar.gz or an s3:// prefix, keep versions and roll back."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from safetensors.numpy import load_file, save_file
from sqlalchemy import func, select

from controlplane.db.models import AdapterArtifact, Function
from launcher.platform import admin
from lorafaas.artifacts import ArtifactStore
from lorafaas.settings import Settings
from tests.controlplane.conftest import new_tenant, register, tenant_client

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / CONFIG).read_text())
        config.update(changes)
        (folder / CONFIG).write_text(json.dumps(config))

    return edit


def _edit_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        tensors = load_file(str(folder / WEIGHTS))
        change(tensors)
        save_file(tensors, str(folder / WEIGHTS))

    return edit


def _pickle(folder: Path) -> None:
    shutil.copy(folder / WEIGHTS, folder / "adapter_model.bin")


def _wrong_shape(tensors: dict) -> None:
    tensors[Q_A] = np.zeros((8, 32), dtype=np.float32)


def _nan(tensors: dict) -> None:
    tensors[Q_A] = tensors[Q_A].copy()
    tensors[Q_A][3, 5] = np.nan


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 100])


def _oversize(folder: Path) -> None:
    (folder / "README.md").write_bytes(b"x" * 200_000)


BAD = {
    "pickle": (_pickle, "adapter_model.bin: pickle weights are refused"),
    "wrong-shape": (_edit_tensors(_wrong_shape), f"{WEIGHTS}: tensor {Q_A}: shape [8, 32] does not match [8, 64]"),
    "unknown-module": (
        _edit_config(target_modules=["q_proj", "v_proj", "foo_proj"]),
        "target module(s) ['foo_proj'] do not exist",
    ),
    "rank-too-high": (_edit_config(r=256), "rank r=256 must be an integer in 1..128"),
    "nan": (_edit_tensors(_nan), f"tensor {Q_A}: holds NaN or infinite values"),
    "wrong-base-model": (
        _edit_config(base_model_name_or_path="meta-llama/Llama-2-7b-hf"),
        "base_model_name_or_path 'meta-llama/Llama-2-7b-hf' does not match backbone 'tiny'",
    ),
    "oversize": (_oversize, "over the limit of 100000 bytes"),
    "truncated": (_truncate, f"{WEIGHTS}: truncated"),
}


async def _nothing_stored(settings: Settings, tenant_id: str) -> None:
    store = ArtifactStore(settings.s3)
    assert not list(store.client.list_objects(store.bucket, prefix=f"tenants/{tenant_id}/", recursive=True))
    async with admin(settings) as a:
        assert (
            await a.session.scalar(select(func.count()).select_from(Function).where(Function.tenant_id == tenant_id))
            == 0
        )
        assert (
            await a.session.scalar(
                select(func.count()).select_from(AdapterArtifact).where(AdapterArtifact.tenant_id == tenant_id)
            )
            == 0
        )


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_adapter_is_422_and_leaves_nothing(
    case: str,
    cp_app: FastAPI,
    admin_client,
    settings: Settings,
    adapter_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch,
) -> None:
    edit, message = BAD[case]
    folder = tmp_path / case
    shutil.copytree(adapter_dirs["a8"], folder)
    edit(folder)
    if case == "oversize":
        runtime = cp_app.state.runtime
        monkeypatch.setattr(
            runtime,
            "settings",
            settings.model_copy(update={"limits": settings.limits.model_copy(update={"max_adapter_bytes": 100_000})}),
        )
    tenant_id, secret = await new_tenant(admin_client, f"bad-{case}")
    async with tenant_client(cp_app, secret) as client:
        r = await register(client, "fn", folder)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_artifact"
    assert message in r.json()["error"]["message"]
    await _nothing_stored(settings, tenant_id)


def _tarball(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname="my-adapter")
    return buf.getvalue()


async def test_register_by_files_tarball_and_s3_then_roll_back(
    cp_app: FastAPI, admin_client, settings: Settings, adapter_dirs: dict[str, Path]
) -> None:
    tenant_id, secret = await new_tenant(admin_client, "versions")
    async with tenant_client(cp_app, secret) as client:
        r = await register(client, "fn", adapter_dirs["a8"])
        assert r.status_code == 201, r.text
        v1 = r.json()
        assert (v1["version"], v1["rank"], v1["backbone"]) == (1, 8, "tiny")
        r = await client.post(
            "/v1/functions",
            data={"name": "fn", "backbone": "tiny"},
            files={"archive": ("a.tar.gz", _tarball(adapter_dirs["b16"]))},
        )
        assert r.status_code == 201, r.text
        assert (r.json()["version"], r.json()["rank"]) == (2, 16)
        # The tenant's own stored prefix is a valid s3:// source; a third version from it.
        store = ArtifactStore(settings.s3)
        r = await client.post(
            "/v1/functions",
            data={
                "name": "fn",
                "backbone": "tiny",
                "s3_uri": f"s3://{store.bucket}/tenants/{tenant_id}/adapters/{v1['sha256']}",
            },
        )
        assert r.status_code == 201, r.text
        assert (r.json()["version"], r.json()["sha256"]) == (3, v1["sha256"])
        versions = (await client.get("/v1/functions/fn/versions")).json()["data"]
        assert [(v["version"], v["serving"]) for v in versions] == [(1, False), (2, False), (3, True)]
        r = await client.post("/v1/functions/fn/rollback", json={"version": 2})
        assert r.status_code == 200 and r.json()["version"] == 2
        assert (await client.get("/v1/functions/fn")).json()["rank"] == 16
        r = await client.post("/v1/functions/fn/rollback")
        assert r.status_code == 200 and r.json()["version"] == 1
        assert (await client.post("/v1/functions/fn/rollback", json={"version": 9})).status_code == 404
        listed = (await client.get("/v1/functions")).json()["data"]
        assert [f["name"] for f in listed] == ["fn"]


async def test_registration_needs_the_manage_scope(
    cp_app: FastAPI, admin_client, adapter_dirs: dict[str, Path]
) -> None:
    tenant_id, _ = await new_tenant(admin_client, "scopes")
    r = await admin_client.post(f"/admin/tenants/{tenant_id}/keys", json={"scopes": ["invoke"]})
    async with tenant_client(cp_app, r.json()["secret"]) as client:
        r = await register(client, "fn", adapter_dirs["a8"])
    assert r.status_code == 403 and "manage-functions" in r.json()["error"]["message"]
