"""The dashboard in a real browser: sign in, walk every page, compare every total with the ledger.

Also: a key revoked on the keys page is refused by the gateway; another tenant's ids are 404s;
forms without the session's CSRF token are refused; the session cookie is httpOnly and
SameSite=Strict; the operator view equals the margin report.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from launcher.platform import bill
from lorafaas.settings import DEV_ADMIN_TOKEN
from tests.browser.conftest import Tenant, controlplane_url, keep_screenshot, run_async
from tests.support.platform import Platform

pytestmark = pytest.mark.e2e
BAR_VALUES = "els => els.map(e => e.dataset.value)"


def _usd(picousd: int) -> str:
    from controlplane.services.ledger import picousd_to_usd

    return f"${picousd_to_usd(picousd)}"


def _sign_in(page, base: str, secret: str) -> None:
    page.goto(f"{base}/dashboard/login")
    page.fill("input[name=secret]", secret)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def _shot(page, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    keep_screenshot(path, f"{name}.png")


def _picousd(page, selector: str) -> int:
    return int(page.get_attribute(selector, "data-picousd"))


def test_tenant_walks_every_page_and_totals_match_the_ledger(
    platform: Platform, dash_tenant: Tenant, browser, shots: Path
) -> None:
    base = controlplane_url(platform)
    now = datetime.now(UTC)
    period = f"{now:%Y-%m}"
    ledger_bill = run_async(bill(platform.settings, dash_tenant.tenant_id, now.year, now.month))
    api = httpx.get(f"{base}/v1/bills/{period}", headers={"Authorization": f"Bearer {dash_tenant.key}"}).json()
    assert api["total_picousd"] == ledger_bill.total_picousd > 0

    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, base, dash_tenant.key)
    assert page.url.endswith("/dashboard")

    # overview: spend, requests, tokens, by function, charts
    assert _picousd(page, "#spend") == ledger_bill.total_picousd
    assert page.inner_text("#spend") == _usd(ledger_bill.total_picousd) == f"${api['total_usd']}"
    assert int(page.get_attribute("#requests", "data-value")) == len(dash_tenant.invocation_ids)
    assert int(page.get_attribute("#tokens-in", "data-value")) == sum(x.input_tokens for x in ledger_bill.lines)
    assert int(page.get_attribute("#tokens-out", "data-value")) == sum(x.output_tokens for x in ledger_bill.lines)
    assert int(page.get_attribute("#errors", "data-value")) == 0
    for line in ledger_bill.lines:
        cell = f'#by-function tr[data-function="{line.function_name}"] td.amount'
        assert _picousd(page, cell) == line.amount_picousd
    hourly, daily = (
        [int(v) for v in page.locator("svg.chart").nth(i).locator("rect.bar").evaluate_all(BAR_VALUES)] for i in (0, 1)
    )
    assert len(hourly) == 48 and sum(daily) == ledger_bill.total_picousd and 0 < sum(hourly) <= sum(daily)
    _shot(page, shots, "overview")

    # functions: version, rank, prices, where the adapter is
    page.click("header nav >> text=Functions")
    rows = page.locator("#functions tbody tr")
    assert rows.count() == 2
    row = page.locator(f'#functions tr[data-function="{dash_tenant.functions[0]}"]')
    cells = row.locator("td").all_inner_texts()
    assert cells[2] == "1" and cells[4] == "8"  # version 1, rank 8 (adapter a8)
    assert cells[8] != "unknown"  # the worker reports every 0.5 s in tests
    _shot(page, shots, "functions")
    row.locator("a").first.click()
    assert page.inner_text("#serving") == "v1"
    assert page.locator("#versions tbody tr").count() == 1
    _shot(page, shots, "function")

    # invocations: every one listed, filters, the detail view with timings and the usage record
    page.click("header nav >> text=Invocations")
    listed = page.eval_on_selector_all("#invocations tbody tr[data-id]", "els => els.map(e => e.dataset.id)")
    assert set(listed) == set(dash_tenant.invocation_ids)
    page.select_option("select[name=function]", dash_tenant.functions[1])
    page.select_option("select[name=state]", "succeeded")
    page.click("form.filters button")
    listed = page.eval_on_selector_all("#invocations tbody tr[data-id]", "els => els.map(e => e.dataset.id)")
    assert listed == [dash_tenant.invocation_ids[2]]
    page.select_option("select[name=state]", "failed")
    page.click("form.filters button")
    assert page.locator("#invocations tbody tr[data-id]").count() == 0
    _shot(page, shots, "invocations")
    page.goto(f"{base}/dashboard/invocations/{dash_tenant.invocation_ids[0]}")
    assert page.inner_text("#state") == "succeeded"
    timings = page.eval_on_selector_all("#timings td", "els => els.map(e => e.dataset.timing + '=' + e.innerText)")
    assert [t.split("=")[0] for t in timings] == ["queue", "load", "prefill", "TTFT", "total"]
    assert all(t.endswith(" ms") for t in timings)
    record_total = sum(_picousd_of(page, i, base) for i in dash_tenant.invocation_ids)
    assert record_total == ledger_bill.total_picousd
    _shot(page, shots, "invocation")

    # bills: the page and its CSV equal the ledger's bill
    page.click("header nav >> text=Bills")
    assert _picousd(page, "#bill-total") == ledger_bill.total_picousd
    for line in ledger_bill.lines:
        assert _picousd(page, f'#bill tr[data-function="{line.function_name}"] td.amount') == line.amount_picousd
    _shot(page, shots, "bills")
    csv_text = page.request.get(f"{base}/dashboard/bills/{period}.csv").text()
    rows_csv = list(csv.DictReader(io.StringIO(csv_text)))
    assert rows_csv[-1]["function"] == "total" and int(rows_csv[-1]["amount_picousd"]) == ledger_bill.total_picousd
    assert rows_csv[-1]["amount_usd"] == api["total_usd"]
    by_name = {r["function"]: int(r["amount_picousd"]) for r in rows_csv[:-1]}
    assert by_name == {line.function_name: line.amount_picousd for line in ledger_bill.lines}

    page.click("header nav >> text=API keys")
    assert page.locator("#keys tbody tr").count() >= 1
    _shot(page, shots, "keys")
    context.close()


def _picousd_of(page, invocation_id: str, base: str) -> int:
    page.goto(f"{base}/dashboard/invocations/{invocation_id}")
    return _picousd(page, "#record-amount")


def test_a_key_revoked_on_the_keys_page_is_refused(
    platform: Platform, dash_tenant: Tenant, browser, shots: Path
) -> None:
    base = controlplane_url(platform)
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, base, dash_tenant.key)
    cookie = next(c for c in context.cookies() if c["name"] == "lorafaas_dashboard")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert dash_tenant.key not in cookie["value"]

    page.goto(f"{base}/dashboard/keys")
    page.fill("#create-key input[name=name]", "to-revoke")
    page.click("#create-key button")
    secret = page.inner_text("#new-secret")
    assert secret.startswith("lf_")
    gw = httpx.Client(base_url=platform.url, timeout=30)
    auth = {"Authorization": f"Bearer {secret}"}
    assert gw.get("/v1/models", headers=auth).status_code == 200

    row = page.locator(f'#keys tr[data-prefix="{secret[:10]}"]')
    row.locator("button.danger").click()
    page.wait_for_load_state()
    assert page.locator(f'#keys tr[data-prefix="{secret[:10]}"] td.key-state').inner_text() == "revoked"
    _shot(page, shots, "keys-revoked")
    deadline = time.monotonic() + 3  # gateways drop the key at once; their cache TTL is 1 s at most
    while gw.get("/v1/models", headers=auth).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.1)
    assert httpx.get(f"{base}/v1/functions", headers=auth).status_code == 401

    # nor does it sign in
    other = browser.new_context().new_page()
    _sign_in(other, base, secret)
    assert "/dashboard/login" in other.url and "revoked" in other.inner_text("#login-error")
    context.close()


def test_another_tenants_ids_are_not_found(platform: Platform, dash_tenant: Tenant, browser) -> None:
    base = controlplane_url(platform)
    alpha = httpx.post(
        f"{platform.url}/v1/functions/alpha-a8/invoke",
        headers={"Authorization": f"Bearer {platform.keys['alpha']}"},
        json={"prompt": "hello", "max_tokens": 2},
        timeout=60,
    )
    assert alpha.status_code == 200, alpha.text
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, base, dash_tenant.key)
    for path in (
        f"/dashboard/invocations/{alpha.json()['id']}",
        "/dashboard/functions/alpha-a8",
        "/dashboard/invocations?function=alpha-a8",
    ):
        response = page.goto(base + path)
        assert response.status == 404, path
        assert "not found" in page.inner_text("#error-message")
    # and the owner sees the same invocation
    owner = browser.new_context().new_page()
    _sign_in(owner, base, platform.keys["alpha"])
    assert owner.goto(f"{base}/dashboard/invocations/{alpha.json()['id']}").status == 200
    context.close()


def test_forms_need_the_sessions_csrf_token(platform: Platform, dash_tenant: Tenant, browser) -> None:
    base = controlplane_url(platform)
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, base, dash_tenant.key)
    keys_before = page.goto(f"{base}/dashboard/keys") and page.locator("#keys tbody tr").count()
    forged = page.request.post(f"{base}/dashboard/keys", form={"name": "forged", "scopes": "invoke", "csrf": "nope"})
    assert forged.status == 403
    missing = page.request.post(f"{base}/dashboard/keys", form={"name": "forged", "scopes": "invoke"})
    assert missing.status in (400, 422)  # the form lacks the field: refused before the handler runs
    page.goto(f"{base}/dashboard/keys")
    assert page.locator("#keys tbody tr").count() == keys_before
    # a forged cookie is no session at all
    fresh = browser.new_context()
    fresh.add_cookies([{"name": "lorafaas_dashboard", "value": "eyJjIjoieCJ9.forged.sig", "url": base + "/dashboard"}])
    p2 = fresh.new_page()
    p2.goto(f"{base}/dashboard")
    assert "/dashboard/login" in p2.url
    context.close()
    fresh.close()


def test_operator_view_equals_the_margin_report(platform: Platform, dash_tenant: Tenant, browser, shots: Path) -> None:
    base = controlplane_url(platform)
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{base}/dashboard/functions")  # a tenant page: the operator is sent to sign in
    assert "/dashboard/login" in page.url
    _sign_in(page, base, DEV_ADMIN_TOKEN)
    assert page.url.endswith("/dashboard/operator")
    report = httpx.get(f"{base}/admin/reports/margin", headers={"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"}).json()
    assert _picousd(page, "#revenue") == report["revenue_picousd"]
    assert _picousd(page, "#cost") == report["cost_picousd"]
    assert _picousd(page, "#margin") == report["margin_picousd"]
    for line in report["by_function"]:
        cells = page.locator(f'#margin-by-function tr[data-function-id="{line["function_id"]}"] td[data-picousd]')
        values = [int(v) for v in cells.evaluate_all("els => els.map(e => e.dataset.picousd)")]
        assert values == [line["revenue_picousd"], line["cost_picousd"], line["margin_picousd"]]
    assert page.locator(f'#tenants tr[data-tenant="{dash_tenant.name}"]').count() == 1
    assert page.locator('#workers tr[data-worker="e2e-worker"]').count() == 1
    _shot(page, shots, "operator")
    # the operator session opens no tenant page
    assert page.goto(f"{base}/dashboard/bills") and "/dashboard/login" in page.url
    context.close()
