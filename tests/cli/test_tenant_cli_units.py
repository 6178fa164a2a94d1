"""The tenant CLI's pure parts: exit codes, error messages, the streamed upload body, --since."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from launcher import tenant_cli
from launcher.cli import main

pytestmark = pytest.mark.unit


def test_error_statuses_pick_exit_codes_and_name_the_file() -> None:
    body = {
        "error": {
            "message": "adapter_model.safetensors: tensor x: bad shape",
            "code": "invalid_artifact",
            "file": "adapter_model.safetensors",
        }
    }
    with pytest.raises(tenant_cli.CliError) as e:
        tenant_cli.check(httpx.Response(422, json=body))
    assert e.value.code == tenant_cli.INVALID and "file: adapter_model.safetensors" in e.value.message
    for status, code in (
        (401, tenant_cli.AUTH),
        (404, tenant_cli.NOT_FOUND),
        (429, tenant_cli.LIMITED),
        (502, tenant_cli.FAILED),
    ):
        with pytest.raises(tenant_cli.CliError) as e:
            tenant_cli.check(httpx.Response(status, text="nope"))
        assert e.value.code == code
    tenant_cli.check(httpx.Response(200, json={}))


def test_multipart_body_streams_exactly_its_length(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 3000)
    files = [tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"]
    body = tenant_cli.MultipartUpload({"name": "fn", "backbone": "tiny"}, files)
    seen: list[int] = []
    body.on_bytes = seen.append
    data = b"".join(body)
    assert len(data) == len(body)
    assert sum(seen) == sum(p.stat().st_size for p in files)
    assert data.count(body.boundary.encode()) == 5 and data.endswith(f"--{body.boundary}--\r\n".encode())


def test_since_accepts_relative_dates_and_times() -> None:
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert tenant_cli.parse_since(None, now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert tenant_cli.parse_since("24h", now) == now - timedelta(hours=24)
    assert tenant_cli.parse_since("7d", now) == now - timedelta(days=7)
    assert tenant_cli.parse_since("2026-11-02", now) == datetime(2026, 11, 2, tzinfo=UTC)
    with pytest.raises(tenant_cli.CliError) as e:
        tenant_cli.parse_since("last week", now)
    assert e.value.code == tenant_cli.USAGE


def test_usd_is_exact() -> None:
    assert tenant_cli.usd(1996800000) == "0.0019968"
    assert tenant_cli.usd(10**12 + 1) == "1.000000000001"


def test_usage_errors_without_a_key_or_a_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LORAFAAS_API_KEY", raising=False)
    assert main(["functions", "list"]) == tenant_cli.USAGE
    assert "LORAFAAS_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("LORAFAAS_API_KEY", "lf_x")
    monkeypatch.setenv("LORAFAAS_CONTROLPLANE_URL", "http://127.0.0.1:9")
    assert main(["functions", "list"]) == tenant_cli.UNREACHABLE
    out, err = capsys.readouterr()
    assert out == "" and "cannot reach" in err
    assert main(["invoke", "fn", "hi", "--wait"]) == tenant_cli.USAGE
    with pytest.raises(SystemExit) as e:
        main(["invoke", "fn", "hi", "--stream", "--async"])
    assert e.value.code == 2
