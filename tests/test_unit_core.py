"""Pure logic: money, wire messages, names, settings, trace scaling."""

from __future__ import annotations

import ast
import itertools
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from controlplane.services.ledger import amount_picousd, month_range, picousd_to_usd
from launcher import trace
from lorafaas import wire
from lorafaas.artifacts import folder_digest, parse_s3_uri
from lorafaas.errors import InvalidInput
from lorafaas.names import Names, adapter_prefix
from lorafaas.settings import Settings

pytestmark = pytest.mark.unit


def test_amount_is_exact_integer_picodollars() -> None:
    # 1 input token at $0.15/1M is 0.15e-6 dollars = 150,000 pico-dollars: nothing rounded.
    assert amount_picousd(1, 0, 150_000, 600_000) == 150_000
    assert amount_picousd(3, 7, 150_000, 600_000) == 3 * 150_000 + 7 * 600_000
    assert picousd_to_usd(amount_picousd(1, 0, 150_000, 0)) == Decimal("0.00000015")
    many = sum(amount_picousd(1, 1, 1, 1) for _ in range(10**6))
    assert picousd_to_usd(many) == Decimal("0.000002")


def test_month_range_wraps_the_year() -> None:
    start, end = month_range(2026, 12)
    assert start == datetime(2026, 12, 1, tzinfo=UTC)
    assert end == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidInput):
        month_range(2026, 13)


def test_wire_round_trip_carries_schema_version() -> None:
    inv = wire.Invocation(
        invocation_id="abc",
        tenant_id="t",
        backbone="demo",
        adapter=wire.AdapterRef(function_id="f", bucket="b", prefix="p", sha256="0" * 64, rank=8),
        prompt="hi",
        sampling=wire.SamplingParams(max_tokens=4, stop=["\n"]),
    )
    decoded = wire.Invocation.decode(inv.encode())
    assert decoded == inv
    assert decoded.schema_version == wire.SCHEMA_VERSION
    with pytest.raises(ValueError):
        wire.SamplingParams(max_tokens=0)


def test_wire_module_imports_no_torch_or_sqlalchemy() -> None:
    tree = ast.parse(Path(wire.__file__).read_text())
    imported = {n.name for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "sqlalchemy")}


def test_names_are_prefixed_and_subject_safe() -> None:
    names = Names("lft1")
    assert names.invoke_subject("demo.v2 x") == "lft1.invoke.demo_v2_x"
    assert names.invocations_stream == "LFT1_INVOCATIONS"
    assert names.result_subject("i1").startswith("lft1.events.")
    assert adapter_prefix("t1", "ab") == "tenants/t1/adapters/ab"


def test_settings_refuse_default_secrets_outside_development() -> None:
    with pytest.raises(ValueError, match="ADMIN_TOKEN"):
        Settings(environment="production")
    Settings(environment="production", admin_token="x" * 32, s3={"secret_key": "y" * 32})


def test_settings_read_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFAAS_NATS__URL", "nats://elsewhere:4222")
    monkeypatch.setenv("LORAFAAS_WORKER__MAX_BATCH", "3")
    s = Settings()
    assert s.nats.url == "nats://elsewhere:4222" and s.worker.max_batch == 3


def test_folder_digest_depends_on_names_and_contents() -> None:
    a = folder_digest({"x": "1", "y": "2"})
    assert a == folder_digest({"y": "2", "x": "1"})
    assert a != folder_digest({"x": "1", "y": "3"})
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")


def _write_trace(path: Path) -> Path:
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,3960,109\n"
        "2023-11-16 18:16:51.2224670,879,55\n"
    )
    return path


def test_trace_slices_scales_and_assigns(tmp_path: Path) -> None:
    path = _write_trace(tmp_path / "t.csv")
    scale = trace.TraceScaling(
        duration_s=60, time_scale=0.5, token_scale=0.1, max_prompt_tokens=100, functions=3, seed=1
    )
    requests = trace.load_trace(path, scale)
    assert len(requests) == 2  # the third arrives 64.5 s in
    assert requests[0].arrival_s == 0.0
    assert requests[1].arrival_s == pytest.approx(4.3145789 * 0.5, rel=1e-6)
    assert (requests[0].prompt_tokens, requests[1].prompt_tokens) == (37, 100)  # scaled, capped
    assert all(0 <= r.function_index < 3 for r in requests)
    assert trace.load_trace(path, scale) == requests  # seeded
    assert "Zipf(s=1.1, seed=1)" in trace.describe(path, scale, requests)


def test_trace_rejects_other_columns(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("time,prompt\n1,2\n")
    with pytest.raises(ValueError, match="lacks columns"):
        trace.load_trace(path, trace.TraceScaling())


def test_zipf_weights_sum_to_one_and_decrease() -> None:
    w = trace.zipf_weights(5, 1.1)
    assert sum(w) == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(w))
