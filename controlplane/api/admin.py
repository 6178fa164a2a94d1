"""The operator's routes under ``/admin``: tenants, keys, quotas, backbones, prices, workers, margin.

Every route needs ``Authorization: Bearer <admin token>``. Handlers stay thin over the services.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Query, Request

from controlplane.api.deps import ReadSessionDep, RuntimeDep, require_operator
from controlplane.api.schemas import (
    BackboneCreate,
    BackboneDefaults,
    BackboneOut,
    BillOut,
    FunctionOut,
    FunctionUpdate,
    KeyCreate,
    KeyCreated,
    KeyOut,
    MarginReportOut,
    Page,
    QuotaBody,
    TenantCreate,
    TenantOut,
    WorkerOut,
)
from controlplane.db.models import TenantStatus
from controlplane.services import catalog, functions, keys, ledger, quotas, workers
from lorafaas.http_errors import error_responses

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_operator)],
    responses=error_responses(400, 401, 404, 409, 503),
)


# --- tenants ----------------------------------------------------------------------------
@router.post("/tenants", status_code=201, response_model=TenantOut)
async def create_tenant(body: TenantCreate, rt: RuntimeDep) -> TenantOut:
    async with rt.transaction() as session:
        tenant = await keys.create_tenant(session, body.name)
        await quotas.set_quota(session, tenant.id, **body.model_dump(exclude={"name"}, exclude_unset=True))
    return TenantOut.of(tenant)


@router.get("/tenants", response_model=Page[TenantOut])
async def list_tenants(session: ReadSessionDep) -> Page[TenantOut]:
    return Page(data=[TenantOut.of(t) for t in await keys.list_tenants(session)])


@router.get("/tenants/{tenant_id}", response_model=TenantOut)
async def get_tenant(tenant_id: str, session: ReadSessionDep) -> TenantOut:
    return TenantOut.of(await keys.get_tenant(session, tenant_id))


async def _set_status(rt: RuntimeDep, tenant_id: str, status: TenantStatus) -> TenantOut:
    async with rt.transaction() as session:
        tenant = await keys.set_tenant_status(session, tenant_id, status)
    await rt.tenant_changed(tenant_id)
    return TenantOut.of(tenant)


@router.post("/tenants/{tenant_id}/suspend", response_model=TenantOut)
async def suspend_tenant(tenant_id: str, rt: RuntimeDep) -> TenantOut:
    """Every key of the tenant stops working at once (keys are checked on every request)."""
    return await _set_status(rt, tenant_id, TenantStatus.SUSPENDED)


@router.post("/tenants/{tenant_id}/reactivate", response_model=TenantOut)
async def reactivate_tenant(tenant_id: str, rt: RuntimeDep) -> TenantOut:
    return await _set_status(rt, tenant_id, TenantStatus.ACTIVE)


@router.patch("/tenants/{tenant_id}/quotas", response_model=TenantOut)
async def set_quotas(tenant_id: str, body: QuotaBody, rt: RuntimeDep) -> TenantOut:
    """Only the fields sent change; null lifts a limit. Gateways drop their cached copy at once."""
    async with rt.transaction() as session:
        await quotas.set_quota(session, tenant_id, **body.model_dump(exclude_unset=True))
        tenant = await keys.get_tenant(session, tenant_id)
    await rt.tenant_changed(tenant_id)
    return TenantOut.of(tenant)


# --- API keys ---------------------------------------------------------------------------
@router.post("/tenants/{tenant_id}/keys", status_code=201, response_model=KeyCreated)
async def create_key(tenant_id: str, body: KeyCreate, rt: RuntimeDep) -> KeyCreated:
    """The secret is in this answer only; the platform keeps its SHA-256 and a visible prefix."""
    async with rt.transaction() as session:
        key, secret = await keys.create_api_key(session, tenant_id, body.name, tuple(body.scopes), body.expiry())
    return KeyCreated(**KeyOut.of(key).model_dump(), secret=secret)


@router.get("/tenants/{tenant_id}/keys", response_model=Page[KeyOut])
async def list_keys(tenant_id: str, session: ReadSessionDep) -> Page[KeyOut]:
    return Page(data=[KeyOut.of(k) for k in await keys.list_api_keys(session, tenant_id)])


@router.delete("/tenants/{tenant_id}/keys/{key_id}", response_model=KeyOut)
async def revoke_key(tenant_id: str, key_id: str, rt: RuntimeDep) -> KeyOut:
    """Revocation is committed before this answers and announced to the gateways, whose key cache
    holds an entry for at most ``key_cache_ttl_s`` (1 s) even if the announcement is lost."""
    async with rt.transaction() as session:
        key = await keys.revoke_api_key(session, tenant_id, key_id)
    await rt.tenant_changed(tenant_id)
    return KeyOut.of(key)


# --- bills and margin -------------------------------------------------------------------
@router.get("/tenants/{tenant_id}/bills/{period}", response_model=BillOut)
async def tenant_bill(tenant_id: str, period: str, session: ReadSessionDep) -> BillOut:
    await keys.get_tenant(session, tenant_id)
    return BillOut.of(await ledger.monthly_bill(session, tenant_id, *ledger.month_of(period)))


@router.get("/reports/margin", response_model=MarginReportOut)
async def margin(
    rt: RuntimeDep,
    session: ReadSessionDep,
    period: str | None = Query(default=None, description="YYYY-MM (default: this month)"),
    tenant_id: str | None = None,
) -> MarginReportOut:
    """Revenue, device cost and margin per function and per tenant for a calendar month."""
    start, end = ledger.month_range(*ledger.month_of(period or f"{datetime.now(UTC):%Y-%m}"))
    price = rt.settings.controlplane.device_price_micros_per_hour
    return MarginReportOut.of(await ledger.margin_report(session, start, end, price, tenant_id))


# --- backbones, functions, prices -------------------------------------------------------
@router.post("/backbones", status_code=201, response_model=BackboneOut)
async def register_backbone(body: BackboneCreate, rt: RuntimeDep) -> BackboneOut:
    """From a local folder (uploaded to S3) or an s3:// prefix; its shape is read from config.json."""
    async with rt.transaction() as session:
        await catalog.register_backbone_from(session, rt.store, body.name, body.uri, body.shape, body.max_context)
        backbone = await _apply_defaults(session, body.name, body)
    return BackboneOut.of(backbone)


@router.get("/backbones", response_model=Page[BackboneOut])
async def list_backbones(session: ReadSessionDep) -> Page[BackboneOut]:
    return Page(data=[BackboneOut.of(b) for b in await catalog.list_backbones(session)])


@router.patch("/backbones/{name}", response_model=BackboneOut)
async def update_backbone(name: str, body: BackboneDefaults, rt: RuntimeDep) -> BackboneOut:
    """Defaults for functions registered from now on; existing functions keep their own."""
    async with rt.transaction() as session:
        backbone = await _apply_defaults(session, name, body)
    return BackboneOut.of(backbone)


async def _apply_defaults(session, name: str, body: BackboneDefaults):
    return await catalog.update_backbone_defaults(
        session,
        name,
        body.default_price_input_micros_per_1m,
        body.default_price_output_micros_per_1m,
        body.default_max_tokens,
        body.default_max_queue,
        body.aliases,
    )


@router.get("/functions", response_model=Page[FunctionOut])
async def list_functions(session: ReadSessionDep, tenant_id: str | None = None) -> Page[FunctionOut]:
    return Page(data=[FunctionOut.of(s) for s in await functions.list_all_functions(session, tenant_id)])


@router.patch("/functions/{function_id}", response_model=FunctionOut)
async def update_function(function_id: str, body: FunctionUpdate, rt: RuntimeDep) -> FunctionOut:
    """Price and limits of one function; invocations already accepted keep their price snapshot."""
    async with rt.transaction() as session:
        fn = await catalog.update_function(session, function_id, **body.model_dump())
        served = await functions.served_function(session, fn.tenant_id, fn.name)
    return FunctionOut.of(served)


# --- workers ----------------------------------------------------------------------------
@router.get("/workers", response_model=Page[WorkerOut])
async def list_workers(
    request: Request, session: ReadSessionDep, status: str | None = Query(default=None, pattern="^(alive|dead)$")
) -> Page[WorkerOut]:
    """Registered workers; ``state`` is the scheduler's (joining, active, draining, dead) where it knows one."""
    scheduler = getattr(request.app.state, "scheduler", None)
    states = {w: s.value for w, s in scheduler.states().items()} if scheduler is not None else {}
    return Page(data=[WorkerOut.of(w, states.get(w.id)) for w in await workers.list_workers(session, status)])
