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


def _edit_header(**entry: object) -> Callable[[Path], None]:
    """Rewrite one field of Q_A's safetensors header entry, keeping the data bytes as they are."""

    def edit(folder: Path) -> None:
        data = (folder / WEIGHTS).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header[Q_A].update(entry)
        if entry.get("data_offsets") == "shift":  # 4 bytes later: a gap before it, an overlap after
            header[Q_A]["data_offsets"] = [o + 4 for o in json.loads(data[8 : 8 + n])[Q_A]["data_offsets"]]
        raw = json.dumps(header).encode()
        (folder / WEIGHTS).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])

    return edit


BAD = {
    "pickle": (_pickle, "adapter_model.bin: pickle weights are refused"),
    "wrong-shape": (_edit_tensors(_wrong_shape), f"{WEIGHTS}: tensor {Q_A}: shape [8, 32] does not match [8, 64]"),
    "unknown-module": (
        _edit_config(target_modules=["q_proj", "v_proj", "foo_proj"]),
        "target_modules: module 'foo_proj' does not exist in the backbone",
    ),
    "rank-too-high": (_edit_config(r=256), "r: rank 256 must be an integer in 1..128"),
    "nan": (_edit_tensors(_nan), f"tensor {Q_A}: holds NaN or infinite values"),
    "wrong-base-model": (
        _edit_config(base_model_name_or_path="meta-llama/Llama-2-7b-hf"),
        "base_model_name_or_path 'meta-llama/Llama-2-7b-hf' does not match backbone 'tiny'",
    ),
    "oversize": (_oversize, "over the limit of 100000 bytes"),
    "truncated": (_truncate, f"{WEIGHTS}: truncated"),
    # Issue 13.1: each of these was accepted (201) and then refused on every invocation.
    "bias-all": (_edit_config(bias="all"), "bias: 'all' is not supported"),
    "modules-to-save": (_edit_config(modules_to_save=["lm_head"]), "modules_to_save: ['lm_head'] is not supported"),
    "lora-alpha-null": (_edit_config(lora_alpha=None), "lora_alpha: None must be a positive number"),
    "dora": (_edit_config(use_dora=True), "use_dora: True is not supported"),
    "lm-head-target": (_edit_config(target_modules=["q_proj", "lm_head"]), "target_modules: covers lm_head"),
    "rank-pattern-wrong-shape": (_edit_config(rank_pattern={"q_proj": 4}), f"tensor {Q_A}: shape [8, 64]"),
    # Issue 12.6: each of these answered 500.
    "target-modules-bad-regex": (_edit_config(target_modules="("), "target_modules: '(' is not a valid regular"),
    "rank-pattern-bad-regex": (_edit_config(rank_pattern={"(": 8}), "rank_pattern: '(' is not a valid regular"),
    "offsets-floats": (_edit_header(data_offsets=[0.0, 2048.0]), f"tensor {Q_A}: data_offsets [0.0, 2048.0] is not"),
    "offsets-three": (_edit_header(data_offsets=[0, 1024, 2048]), f"tensor {Q_A}: data_offsets [0, 1024, 2048]"),
    "offsets-string": (_edit_header(data_offsets="0-2048"), f"tensor {Q_A}: data_offsets '0-2048' is not"),
    "shape-string": (_edit_header(shape="8x512"), f"tensor {Q_A}: shape '8x512' is not a list"),
    "dtype-list": (_edit_header(dtype=["F32"]), f"tensor {Q_A}: dtype ['F32'] is not a float type"),
    "offsets-gap": (_edit_header(data_offsets="shift"), "leaves a gap at byte"),
}
# The field each refusal names in the error body.
FIELDS = {
    "bias-all": "bias",
    "modules-to-save": "modules_to_save",
    "lora-alpha-null": "lora_alpha",
    "dora": "use_dora",
    "lm-head-target": "target_modules",
    "target-modules-bad-regex": "target_modules",
    "rank-pattern-bad-regex": "rank_pattern",
    "offsets-floats": "data_offsets",
    "offsets-three": "data_offsets",
    "offsets-string": "data_offsets",
    "shape-string": "shape",
    "dtype-list": "dtype",
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
    if case in FIELDS:
        assert r.json()["error"]["field"] == FIELDS[case]
    await _nothing_stored(settings, tenant_id)


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix", "s3://Not_A_Bucket/x", "s3://b/" + "x" * 2000])
async def test_malformed_s3_uri_is_422_naming_it(uri: str, cp_app: FastAPI, admin_client, settings: Settings) -> None:
    tenant_id, secret = await new_tenant(admin_client, "bad-uri")
    async with tenant_client(cp_app, secret) as client:
        r = await client.post("/v1/functions", data={"name": "fn", "backbone": "tiny", "s3_uri": uri})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "s3_uri"
    await _nothing_stored(settings, tenant_id)


async def test_rank_and_alpha_patterns_register_with_their_largest_rank(
    cp_app: FastAPI, admin_client, backbone_dir: Path, tmp_path: Path
) -> None:
    from gpuworker.models import make_adapter

    folder = make_adapter(
        backbone_dir,
        tmp_path / "patterned",
        rank=8,
        seed=5,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        rank_pattern={"q_proj": 4, r"mlp\.down_proj": 16},
        alpha_pattern={"v_proj": 2},
        use_rslora=True,
    )
    _, secret = await new_tenant(admin_client, "patterns")
    async with tenant_client(cp_app, secret) as client:
        r = await register(client, "fn", folder)
    assert r.status_code == 201, r.text
    assert r.json()["rank"] == 16


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
