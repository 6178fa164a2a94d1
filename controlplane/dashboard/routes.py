"""The dashboard's pages under ``/dashboard``: thin handlers over the same services as the API.

Every amount on a page is the ledger's integer pico-dollars, shown with ``ledger.picousd_to_usd``
(the API's own conversion) and carried exactly in a ``data-picousd`` attribute. Every tenant
query is scoped to the signed-in key's tenant, so another tenant's id is a 404 like a missing one.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.api.deps import ControlPlaneRuntime, ReadSessionDep, RuntimeDep
from controlplane.dashboard import queries, session
from controlplane.dashboard.charts import Bar, bar_chart
from controlplane.dashboard.residency import ResidencyTracker
from controlplane.db.models import InvocationState
from controlplane.services import catalog, functions, invocations, keys, ledger, workers
from lorafaas import wire
from lorafaas.errors import Forbidden, InvalidInput, LorafaasError, Unauthenticated
from lorafaas.http_errors import status_of
from lorafaas.scopes import ALL_SCOPES, MANAGE, READ_USAGE

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["usd"] = lambda picousd: f"${ledger.picousd_to_usd(int(picousd))}"
templates.env.filters["ts"] = lambda t: t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if t else ""
templates.env.filters["ms"] = lambda s: f"{float(s) * 1000:.1f} ms" if s is not None else "-"
templates.env.filters["num"] = lambda n: f"{int(n):,}"

T = TypeVar("T")
PAGE_SIZE = 50
HOURS_CHARTED = 48


class _SignIn(Exception):
    """The page needs a signed-in viewer of another kind: send the browser to the sign-in page."""


class DashboardRoute(APIRoute):
    """Domain errors become an HTML page with the API's status code (404 for another tenant's id)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except _SignIn:
                # Back to the page after signing in; a form's target is no page to come back to.
                page = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                target = quote(page if request.method == "GET" else "/dashboard", safe="")
                response = RedirectResponse(f"/dashboard/login?next={target}", status_code=303)
                session.clear(response)
                return response
            except LorafaasError as e:
                return templates.TemplateResponse(
                    request, "error.html", {"viewer": None, "message": e.message}, status_code=status_of(e)
                )

        return route


router = APIRouter(prefix="/dashboard", route_class=DashboardRoute, include_in_schema=False)


# --- who is looking ---------------------------------------------------------------------
async def _viewer(request: Request) -> session.Viewer:
    rt: ControlPlaneRuntime = request.app.state.runtime
    data = session.read(request, rt.settings.admin_token)
    if data is None:
        raise _SignIn()
    if data.operator:
        if not session.csrf_ok(session.operator_digest(rt.settings.admin_token), data.operator):
            raise _SignIn()
        return session.Viewer(csrf=data.csrf, operator=True)
    if not data.key_id:
        raise _SignIn()
    try:
        async with rt.sessions() as s:
            principal = await keys.authenticate_key_id(s, data.key_id)
    except Unauthenticated as e:  # revoked, expired or suspended since sign-in: the session ends
        raise _SignIn() from e
    return session.Viewer(csrf=data.csrf, principal=principal)


async def _tenant(request: Request) -> session.Viewer:
    viewer = await _viewer(request)
    if viewer.principal is None:
        raise _SignIn()
    return viewer


async def _operator(request: Request) -> session.Viewer:
    viewer = await _viewer(request)
    if not viewer.operator:
        raise _SignIn()
    return viewer


TenantDep = Annotated[session.Viewer, Depends(_tenant)]
OperatorDep = Annotated[session.Viewer, Depends(_operator)]


def _check_csrf(viewer_csrf: str, sent: str | None) -> None:
    if not session.csrf_ok(viewer_csrf, sent):
        raise Forbidden("the form's CSRF token does not match this session; reload the page and try again")


def _page(request: Request, name: str, viewer: session.Viewer | None, status_code: int = 200, **context: Any):
    return templates.TemplateResponse(request, name, {"viewer": viewer, **context}, status_code=status_code)


def _period(period: str | None) -> tuple[str, datetime, datetime]:
    label = period or f"{datetime.now(UTC):%Y-%m}"
    start, end = ledger.month_range(*ledger.month_of(label))
    return label, start, end


# --- sign-in ----------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, rt: RuntimeDep, next: str = "/dashboard") -> Response:
    data = session.read(request, rt.settings.admin_token)
    csrf = data.csrf if data else session.new_csrf()
    response = _page(request, "login.html", None, csrf=csrf, next=next, error=None)
    session.write(response, request, rt.settings.admin_token, session.SessionData(csrf=csrf))
    return response


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    rt: RuntimeDep,
    secret: Annotated[str, Form()],
    csrf: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/dashboard",
) -> Response:
    """Sign in with a tenant API key (needs the read-usage scope) or the operator token."""
    token = rt.settings.admin_token
    data = session.read(request, token)
    if data is None or not session.csrf_ok(data.csrf, csrf):
        raise Forbidden("the sign-in form expired; reload the page and try again")
    fresh = session.new_csrf()  # a new CSRF token at every sign-in
    target = next if next.startswith("/dashboard") and not next.startswith("/dashboard/login") else "/dashboard"
    if session.csrf_ok(token, secret.strip()):
        response: Response = RedirectResponse("/dashboard/operator", status_code=303)
        session.write(
            response, request, token, session.SessionData(csrf=fresh, operator=session.operator_digest(token))
        )
        return response
    try:
        async with rt.sessions() as s:
            principal = await keys.authenticate(s, secret.strip())
        principal.require(READ_USAGE)
    except (Unauthenticated, Forbidden) as e:
        response = _page(request, "login.html", None, status_code=401, csrf=data.csrf, next=next, error=e.message)
        return response
    response = RedirectResponse(target, status_code=303)
    session.write(response, request, token, session.SessionData(csrf=fresh, key_id=principal.key_id))
    return response


@router.post("/logout")
async def logout(request: Request, rt: RuntimeDep, csrf: Annotated[str, Form()]) -> Response:
    data = session.read(request, rt.settings.admin_token)
    if data is not None:
        _check_csrf(data.csrf, csrf)
    response = RedirectResponse("/dashboard/login", status_code=303)
    session.clear(response)
    return response


# --- overview ---------------------------------------------------------------------------
@router.get("", response_class=HTMLResponse)
async def overview(request: Request, viewer: TenantDep, rt: RuntimeDep, period: str | None = None) -> Response:
    """Spend, tokens, requests and errors of the period, by function, with charts per hour and per day."""
    label, start, end = _period(period)
    tenant_id = viewer.tenant_id
    now = datetime.now(UTC)
    hours_end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    hours_start = hours_end - timedelta(hours=HOURS_CHARTED)

    async def read(query: Callable[[AsyncSession], Awaitable[T]]) -> T:
        async with rt.sessions() as db:
            return await query(db)

    # Independent reads, each a scan of the period's records: on sessions of their own, side by side.
    bill, errors, hourly, daily, served = await asyncio.gather(
        read(lambda db: ledger.monthly_bill(db, tenant_id, *ledger.month_of(label))),
        read(lambda db: queries.failed_counts(db, tenant_id, start, end)),
        read(
            lambda db: _chart(
                db, tenant_id, hours_start, hours_end, "1h", "%H:00", 6, "spend per hour (UTC), last 48 h"
            )
        ),
        read(lambda db: _chart(db, tenant_id, start, end, "1d", "%d", 3, f"spend per day (UTC), {label}")),
        read(lambda db: functions.list_functions(db, tenant_id)),
    )
    names = {s.function.id: s.function.name for s in served}
    return _page(
        request,
        "overview.html",
        viewer,
        period=label,
        bill=bill,
        requests=sum(line.invocations for line in bill.lines),
        input_tokens=sum(line.input_tokens for line in bill.lines),
        output_tokens=sum(line.output_tokens for line in bill.lines),
        errors=sum(errors.values()),
        errors_by_function={names.get(fid, fid): n for fid, n in errors.items()},
        hourly=hourly,
        daily=daily,
    )


async def _chart(
    db: AsyncSession, tenant_id: str, start: datetime, end: datetime, width: str, fmt: str, every: int, title: str
) -> Markup:
    starts = ledger.bucket_starts(start, end, width)
    rows = {
        r.bucket_start: r for r in await ledger.usage_by_bucket(db, tenant_id, start, end, width, by_function=False)
    }
    bars = []
    for s in starts:
        r = rows.get(s)
        amount, n = (r.amount_picousd, r.invocations) if r else (0, 0)
        tip = f"{s:%Y-%m-%d %H:00} UTC: ${ledger.picousd_to_usd(amount)}, {n} requests"
        bars.append(Bar(s.strftime(fmt), amount, tip))
    return bar_chart(bars, title, label_every=every)


# --- functions --------------------------------------------------------------------------
@router.get("/functions", response_class=HTMLResponse)
async def functions_page(request: Request, viewer: TenantDep, db: ReadSessionDep) -> Response:
    tracker: ResidencyTracker = request.app.state.dashboard_residency
    rows = []
    for served in await functions.list_functions(db, viewer.tenant_id):
        _, versions = await catalog.list_versions(db, viewer.tenant_id, served.function.name)
        rows.append((served, len(versions), tracker.locations(served.function.id)))
    return _page(request, "functions.html", viewer, rows=rows)


@router.get("/functions/{name}", response_class=HTMLResponse)
async def function_page(request: Request, name: str, viewer: TenantDep, db: ReadSessionDep) -> Response:
    served = await functions.served_function(db, viewer.tenant_id, name)
    _, versions = await catalog.list_versions(db, viewer.tenant_id, name)
    tracker: ResidencyTracker = request.app.state.dashboard_residency
    return _page(
        request,
        "function.html",
        viewer,
        served=served,
        versions=versions,
        locations=tracker.locations(served.function.id),
    )


# --- invocations ------------------------------------------------------------------------
@router.get("/invocations", response_class=HTMLResponse)
async def invocations_page(
    request: Request,
    viewer: TenantDep,
    db: ReadSessionDep,
    state: str | None = None,
    function: str | None = None,
    since: str | None = None,
    until: str | None = None,
    before: str | None = None,
) -> Response:
    """The tenant's invocations, newest first, a page of 50 at a time (keyset cursor ``before``)."""
    tenant_id = viewer.tenant_id
    state, function = state or None, function or None
    function_id = (await catalog.function_by_name(db, tenant_id, function)).id if function else None
    rows = await invocations.list_for_tenant(
        db,
        tenant_id,
        function_id,
        state,
        queries.parse_time(since, "since"),
        queries.parse_time(until, "until"),
        PAGE_SIZE + 1,
        queries.decode_cursor(before),
    )
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    filters = {"state": state or "", "function": function or "", "since": since or "", "until": until or ""}
    next_cursor = queries.encode_cursor(rows[-1].accepted_at, rows[-1].id) if more else None
    names = {s.function.id: s.function.name for s in await functions.list_functions(db, tenant_id)}
    return _page(
        request,
        "invocations.html",
        viewer,
        rows=rows,
        names=names,
        filters=filters,
        next_cursor=next_cursor,
        states=[s.value for s in InvocationState],
    )


@router.get("/invocations/{invocation_id}", response_class=HTMLResponse)
async def invocation_page(request: Request, invocation_id: str, viewer: TenantDep, db: ReadSessionDep) -> Response:
    invocation = await invocations.get_for_tenant(db, viewer.tenant_id, invocation_id)
    record = await ledger.usage_record(db, viewer.tenant_id, invocation_id)
    names = {s.function.id: s.function.name for s in await functions.list_functions(db, viewer.tenant_id)}
    timings = invocation.timings or {}
    return _page(
        request,
        "invocation.html",
        viewer,
        inv=invocation,
        record=record,
        function=names.get(invocation.function_id, invocation.function_id),
        timings=[
            ("queue", timings.get("queue_wait_s")),
            ("load", timings.get("load_s")),
            ("prefill", timings.get("prefill_s")),
            ("TTFT", timings.get("ttft_s")),
            ("total", timings.get("total_s")),
        ],
    )


# --- bills ------------------------------------------------------------------------------
def _recent_periods(now: datetime, count: int) -> list[str]:
    """This month and the ``count - 1`` before it, newest first, as ``YYYY-MM``."""
    year, month, out = now.year, now.month, []
    for _ in range(count):
        out.append(f"{year}-{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return out


@router.get("/bills", response_class=HTMLResponse)
async def bills_page(request: Request, viewer: TenantDep, db: ReadSessionDep, period: str | None = None) -> Response:
    label, _, _ = _period(period)
    bill = await ledger.monthly_bill(db, viewer.tenant_id, *ledger.month_of(label))
    periods = _recent_periods(datetime.now(UTC), 12)
    return _page(request, "bills.html", viewer, period=label, bill=bill, periods=periods)


@router.get("/bills/{period}.csv")
async def bill_csv(period: str, viewer: TenantDep, db: ReadSessionDep) -> Response:
    """The bill as CSV: a line per function and a total line, amounts in exact pico-dollars and dollars."""
    bill = await ledger.monthly_bill(db, viewer.tenant_id, *ledger.month_of(period))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(wire.BILL_CSV_COLUMNS)
    for line in bill.lines:
        w.writerow(
            [
                period,
                line.function_name,
                line.function_id,
                line.invocations,
                line.input_tokens,
                line.output_tokens,
                line.amount_picousd,
                ledger.picousd_to_usd(line.amount_picousd),
            ]
        )
    w.writerow([period, "total", "", "", "", "", bill.total_picousd, ledger.picousd_to_usd(bill.total_picousd)])
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="lorafaas-bill-{period}.csv"'},
    )


# --- API keys ---------------------------------------------------------------------------
@router.get("/keys", response_class=HTMLResponse)
async def keys_page(request: Request, viewer: TenantDep, db: ReadSessionDep) -> Response:
    return await _keys_page(request, viewer, db, created=None)


async def _keys_page(request: Request, viewer: session.Viewer, db: AsyncSession, created: str | None) -> Response:
    rows = await keys.list_api_keys(db, viewer.tenant_id)
    assert viewer.principal is not None
    return _page(
        request,
        "keys.html",
        viewer,
        keys=rows,
        created=created,
        now=datetime.now(UTC),
        scopes=ALL_SCOPES,
        own_scopes=viewer.principal.scopes,
        current_key=viewer.principal.key_id,
    )


@router.post("/keys", response_class=HTMLResponse)
async def create_key(
    request: Request,
    viewer: TenantDep,
    rt: RuntimeDep,
    db: ReadSessionDep,
    csrf: Annotated[str, Form()],
    name: Annotated[str, Form(max_length=128)] = "",
    scopes: Annotated[list[str] | None, Form()] = None,
    expires_in_days: Annotated[str, Form()] = "",
) -> Response:
    """A new key of this tenant; it may carry only scopes the signed-in key has. Its secret shows once."""
    _check_csrf(viewer.csrf, csrf)
    assert viewer.principal is not None
    viewer.principal.require(MANAGE)
    wanted = tuple(scopes or ())
    if not wanted:
        raise InvalidInput("choose at least one scope", param="scopes")
    expires = None
    if expires_in_days.strip():
        try:
            days = float(expires_in_days)
        except ValueError as e:
            raise InvalidInput("expires in: a number of days", param="expires_in_days") from e
        if days <= 0:
            raise InvalidInput("expires in: a positive number of days", param="expires_in_days")
        expires = datetime.now(UTC) + timedelta(days=days)
    async with rt.transaction() as s:
        _, secret = await keys.create_own_api_key(s, viewer.principal, name, wanted, expires)
    return await _keys_page(request, viewer, db, created=secret)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, viewer: TenantDep, rt: RuntimeDep, csrf: Annotated[str, Form()]) -> Response:
    """Revoke one of the tenant's keys; the gateways drop their cached copy at once."""
    _check_csrf(viewer.csrf, csrf)
    assert viewer.principal is not None
    viewer.principal.require(MANAGE)
    async with rt.transaction() as s:
        await keys.revoke_api_key(s, viewer.tenant_id, key_id)
    await rt.tenant_changed(viewer.tenant_id)
    return RedirectResponse("/dashboard/keys", status_code=303)


# --- the operator's view ----------------------------------------------------------------
@router.get("/operator", response_class=HTMLResponse)
async def operator_page(
    request: Request, viewer: OperatorDep, rt: RuntimeDep, db: ReadSessionDep, period: str | None = None
) -> Response:
    """Tenants, revenue, cost and margin per function (the margin report the API serves), workers."""
    label, start, end = _period(period)
    price = rt.settings.controlplane.device_price_micros_per_hour
    report = await ledger.margin_report(db, start, end, price)
    tracker: ResidencyTracker = request.app.state.dashboard_residency
    reports = {r.worker_id: r for r in tracker.fresh_reports()}
    return _page(
        request,
        "operator.html",
        viewer,
        period=label,
        report=report,
        tenants=await keys.list_tenants(db),
        workers=await workers.list_workers(db),
        reports=reports,
    )
