"""The tenant CLI end to end: a PEFT ``save_pretrained`` folder -> a function -> a streamed
invocation, an async job -> usage and a bill equal to the usage records. Over HTTP only."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane.services import ledger
from launcher import tenant_cli
from launcher.cli import main
from launcher.platform import admin, create_tenant_with_key
from lorafaas.settings import DEV_ADMIN_TOKEN
from tests.support.platform import PRICE_IN, PRICE_OUT, Platform

pytestmark = pytest.mark.e2e


class Cli:
    """``lorafaas`` in-process, against the running platform, as one tenant."""

    def __init__(self, platform: Platform, key: str, capsys: pytest.CaptureFixture[str]) -> None:
        s = platform.settings
        self.conn = [
            "--url",
            platform.url,
            "--controlplane-url",
            f"http://{s.controlplane_host}:{s.controlplane_port}",
            "--api-key",
            key,
        ]
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main([*argv, *self.conn])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> dict:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


async def _usage_of(platform: Platform, tenant_id: str, invocation_ids: list[str]) -> ledger.UsageTotals:
    async with admin(platform.settings) as a:
        return await ledger.usage_totals(a.session, tenant_id, invocation_ids)


def test_from_a_save_pretrained_folder_to_a_bill(
    platform: Platform, adapter_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant_id, key = asyncio.run(create_tenant_with_key(platform.settings, f"cli-{uuid.uuid4().hex[:6]}"))
    cli = Cli(platform, key, capsys)
    folder = adapter_dirs["b16"]  # written by PEFT's save_pretrained (gpuworker.models.make_adapter)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()

    created = cli.json(
        "functions", "create", "writer", "--adapter", str(folder), "--backbone", "tiny",
        "--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT), "--admin-token", DEV_ADMIN_TOKEN,
    )  # fmt: skip
    assert created["name"] == "writer" and created["version"] == 1 and created["rank"] == 16
    assert (created["price_input_micros_per_1m"], created["price_output_micros_per_1m"]) == (PRICE_IN, PRICE_OUT)
    code, out, _ = cli("functions", "create", "writer", "--adapter", str(adapter_dirs["a8"]), "--backbone", "tiny")
    assert code == 0 and "v2" in out
    assert [f["name"] for f in cli.json("functions", "list")["data"]] == ["writer"]
    versions = cli.json("functions", "versions", "writer")["data"]
    assert [(v["version"], v["serving"]) for v in versions] == [(1, False), (2, True)]
    assert cli.json("functions", "rollback", "writer")["version"] == 1
    assert cli.json("functions", "show", "writer")["rank"] == 16

    # a streamed invocation: tokens on stdout, then the usage line
    code, out, err = cli("invoke", "writer", "the quick brown fox", "--max-tokens", "6", "--stream")
    assert code == 0, err
    streamed_id = out.strip().rsplit("id ", 1)[1].rstrip("]")
    assert "6 out" in out

    # an async job, waited for; another one, shown by id
    done = cli.json("invoke", "writer", "jumps over", "--max-tokens", "5", "--async", "--wait")
    assert done["state"] == "succeeded" and done["usage"]["completion_tokens"] == 5
    code, job_id, _ = cli("invoke", "writer", "the lazy dog", "--max-tokens", "4", "--async")
    assert code == 0
    job_id = job_id.strip()
    deadline = time.monotonic() + 60
    while (shown := cli.json("jobs", "show", job_id))["state"] not in tenant_cli.TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert shown["state"] == "succeeded"
    code, _, err = cli("jobs", "cancel", job_id)
    assert code == tenant_cli.INVALID and "409" in err  # finished: nothing to cancel

    ids = [streamed_id, done["id"], job_id]
    deadline = time.monotonic() + 30
    while (totals := asyncio.run(_usage_of(platform, tenant_id, ids))).records < 3:
        assert time.monotonic() < deadline, "usage records did not arrive"
        time.sleep(0.2)

    period = f"{datetime.now(UTC):%Y-%m}"
    bill = cli.json("bills", "show", period)
    assert bill["total_picousd"] == totals.amount_picousd > 0
    assert totals.amount_picousd == totals.input_tokens * PRICE_IN + totals.output_tokens * PRICE_OUT
    assert bill["lines"][0]["invocations"] == 3
    assert bill["lines"][0]["input_tokens"] == totals.input_tokens
    assert bill["lines"][0]["output_tokens"] == totals.output_tokens == 6 + 5 + 4
    code, out, _ = cli("bills", "show", period, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and rows[-1]["function"] == "total" and int(rows[-1]["amount_picousd"]) == totals.amount_picousd
    assert rows[-1]["amount_usd"] == str(ledger.picousd_to_usd(totals.amount_picousd)) == bill["total_usd"]

    for by in ("function", "hour", "day"):
        usage = cli.json("usage", "--by", by, "--since", "2d")
        assert usage["total_picousd"] == totals.amount_picousd, by
        assert sum(r["requests"] for r in usage["rows"]) == 3
    code, out, _ = cli("usage")
    assert code == 0 and f"${bill['total_usd']}" in out


def test_errors_name_the_problem_and_pick_the_exit_code(
    platform: Platform, adapter_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = Cli(platform, platform.keys["beta"], capsys)
    # an adapter whose tensors do not fit the backbone: the server's 422 names the file and the tensor
    bad = tmp_path / "bad-adapter"
    shutil.copytree(adapter_dirs["a8"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_module"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = cli("functions", "create", "bad", "--adapter", str(bad), "--backbone", "tiny")
    assert code == tenant_cli.INVALID and "adapter_config.json" in err and "no_such_module" in err, err
    (bad / "adapter_config.json").write_text("{not json")
    code, _, err = cli("functions", "create", "bad", "--adapter", str(bad), "--backbone", "tiny")
    assert code == tenant_cli.INVALID and "adapter_config.json" in err
    (bad / "adapter_model.safetensors").unlink()
    code, _, err = cli("functions", "create", "bad", "--adapter", str(bad), "--backbone", "tiny")
    assert code == tenant_cli.INVALID and "adapter_model.safetensors" in err
    code, _, err = cli(
        "functions", "create", "x", "--adapter", str(adapter_dirs["a8"]), "--backbone", "tiny", "--price-in", "5"
    )
    assert code == tenant_cli.USAGE and "admin-token" in err

    assert cli("functions", "show", "alpha-a8")[0] == tenant_cli.NOT_FOUND  # another tenant's: not found
    assert cli("jobs", "show", "0" * 32)[0] == tenant_cli.NOT_FOUND
    code, _, err = Cli(platform, "lf_not_a_key", capsys)("functions", "list")
    assert code == tenant_cli.AUTH and "401" in err
    code, out, err = cli("invoke", "beta-c32", "hi", "--max-tokens", "100000")
    assert code == tenant_cli.INVALID and out == "" and "max_tokens" in err


def test_keys_are_made_listed_and_revoked_from_the_cli(platform: Platform, capsys: pytest.CaptureFixture[str]) -> None:
    _, key = asyncio.run(create_tenant_with_key(platform.settings, f"cli-keys-{uuid.uuid4().hex[:6]}"))
    cli = Cli(platform, key, capsys)
    made = cli.json("keys", "create", "--name", "dashboards", "--scope", "read-usage", "--expires-in-days", "1")
    assert made["scopes"] == ["read-usage"] and made["secret"].startswith(made["prefix"]) and made["expires_at"]
    code, out, _ = cli("keys", "list")
    assert code == 0 and made["id"] in out and "dashboards" in out and made["secret"] not in out
    assert [k["id"] for k in cli.json("keys", "list")["data"]][-1] == made["id"]

    reader = Cli(platform, made["secret"], capsys)
    assert reader("bills", "show")[0] == tenant_cli.OK
    code, out, err = reader("keys", "create")
    assert code == tenant_cli.AUTH and out == "" and "manage-functions" in err
    code, _, err = cli("keys", "create", "--expires-in-days", "0")
    assert code == tenant_cli.USAGE and "expires-in-days" in err

    code, out, _ = cli("keys", "revoke", made["id"])
    assert code == tenant_cli.OK and f"revoked {made['id']}" in out
    code, _, err = reader("bills", "show")
    assert code == tenant_cli.AUTH and "revoked" in err
    assert cli("keys", "revoke", "no-such-key")[0] == tenant_cli.NOT_FOUND
