"""The dashboard's pure parts: charts, cursors, time parsing, session cookies, the residency view."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import Response

from controlplane.dashboard import queries, session
from controlplane.dashboard.charts import Bar, bar_chart, bar_heights
from controlplane.dashboard.residency import STALE_AFTER_S, ResidencyTracker
from lorafaas.errors import InvalidInput
from lorafaas.wire import AdapterResidency, ContentionReport

pytestmark = pytest.mark.unit


@given(st.lists(st.integers(min_value=0, max_value=10**18), max_size=60), st.integers(min_value=1, max_value=500))
def test_bar_heights_are_proportional_and_never_hide_a_non_zero_value(values: list[int], height: int) -> None:
    heights = bar_heights(values, height)
    assert len(heights) == len(values)
    assert all(0 <= h <= height for h in heights)
    assert all((h > 0) == (v > 0) for h, v in zip(heights, values))
    if any(values):
        assert heights[values.index(max(values))] == height
    for (a, ha), (b, hb) in zip(zip(values, heights), zip(values[1:], heights[1:])):
        assert (a <= b) <= (ha <= hb)  # order is kept


def test_bar_chart_carries_exact_values_and_escapes_labels() -> None:
    svg = bar_chart([Bar("<01>", 123456789012345, "a & b"), Bar("02", 0, "none")], "spend")
    assert 'data-value="123456789012345"' in svg and 'data-value="0"' in svg
    assert "&lt;01&gt;" in svg and "a &amp; b" in svg and "<01>" not in svg


@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    st.text("0123456789abcdef", min_size=1, max_size=32),
)
def test_cursor_round_trips_to_the_microsecond(at: datetime, invocation_id: str) -> None:
    at = at.replace(tzinfo=UTC)
    assert queries.decode_cursor(queries.encode_cursor(at, invocation_id)) == (at, invocation_id)


def test_bad_cursor_and_time_are_refused() -> None:
    with pytest.raises(InvalidInput):
        queries.decode_cursor("nope.x")
    with pytest.raises(InvalidInput):
        queries.parse_time("yesterday", "since")
    assert queries.parse_time("2026-11-30T14:00", "since") == datetime(2026, 11, 30, 14, tzinfo=UTC)
    assert queries.parse_time("", "since") is None


def _request(cookie: str | None) -> Request:
    headers = [(b"cookie", f"{session.COOKIE}={cookie}".encode())] if cookie else []
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/dashboard",
            "headers": headers,
            "scheme": "http",
            "server": ("x", 80),
        }
    )


def _cookie_of(response: Response) -> str:
    header = response.headers["set-cookie"]
    assert "httponly" in header.lower() and "samesite=strict" in header.lower() and "path=/dashboard" in header.lower()
    return header.split(";", 1)[0].split("=", 1)[1]


def test_session_cookie_is_signed_and_names_the_key_not_its_secret() -> None:
    response = Response()
    data = session.SessionData(csrf="c1", key_id="key123")
    session.write(response, _request(None), "admin-token", data)
    cookie = _cookie_of(response)
    assert session.read(_request(cookie), "admin-token") == data
    assert session.read(_request(cookie), "another-token") is None  # a new operator token ends every session
    assert session.read(_request(cookie[:-2] + "xx"), "admin-token") is None  # tampered
    assert session.read(_request(None), "admin-token") is None
    assert session.operator_digest("admin-token") != session.operator_digest("other")
    assert "admin-token" not in session.operator_digest("admin-token")


def test_csrf_comparison() -> None:
    assert session.csrf_ok("abc", "abc")
    assert not session.csrf_ok("abc", "abd") and not session.csrf_ok("abc", None) and not session.csrf_ok("abc", "")


def _report(worker: str, *tiers: tuple[str, str]) -> ContentionReport:
    return ContentionReport(
        worker_id=worker, backbone="tiny", adapters=[AdapterResidency(function_id=f, rank=8, tier=t) for f, t in tiers]
    )


def test_residency_is_unknown_without_fresh_reports_and_fastest_tier_first() -> None:
    tracker = ResidencyTracker()
    assert tracker.locations("f1", now=0.0) is None
    tracker.observe(_report("w2", ("f1", "disk")), now=100.0)
    tracker.observe(_report("w1", ("f1", "device"), ("f2", "host")), now=100.0)
    assert [(loc.worker_id, loc.tier) for loc in tracker.locations("f1", now=101.0)] == [
        ("w1", "device"),
        ("w2", "disk"),
    ]
    assert tracker.locations("f3", now=101.0) == []  # reports, but no worker holds it: in S3 only
    assert tracker.locations("f1", now=100.0 + STALE_AFTER_S + 1) is None
    tracker.observe(_report("w1"), now=200.0)  # the latest report replaces the older one
    assert tracker.locations("f1", now=200.0) == []


def test_recent_periods_cross_the_year() -> None:
    from controlplane.dashboard.routes import _recent_periods

    assert _recent_periods(datetime(2026, 2, 10, tzinfo=UTC), 4) == ["2026-02", "2026-01", "2025-12", "2025-11"]
    assert len(set(_recent_periods(datetime.now(UTC) + timedelta(days=3), 12))) == 12
