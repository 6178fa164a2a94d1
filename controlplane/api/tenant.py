"""The tenant's routes under ``/v1``, authenticated by the tenant's own API key.

Every query is scoped to the key's tenant: another tenant's function, version or invocation
is 'not found', exactly like one that does not exist. (The gateway owns
``/v1/functions/{name}/invoke``, ``/v1/invocations/{id}``, ``/v1/models`` and the
OpenAI routes; nothing here clashes with them.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, UploadFile

from controlplane.api.deps import PrincipalDep, ReadSessionDep, RuntimeDep
from controlplane.api.schemas import (
    INT32_MAX,
    MAX_UNIX_S,
    Amount,
    BillOut,
    FunctionOut,
    InvocationList,
    InvocationOut,
    KeyCreate,
    KeyCreated,
    KeyOut,
    Page,
    RollbackBody,
    UsageBucket,
    UsagePage,
    UsageResult,
    VersionOut,
    VersionsOut,
    usd,
)
from controlplane.api.upload_limit import UploadRoute
from controlplane.services import catalog, functions, invocations, keys, ledger
from controlplane.services.uploads import AdapterSource, staged
from lorafaas.http_errors import error_responses
from lorafaas.scopes import MANAGE, READ_USAGE

router = APIRouter(prefix="/v1", tags=["tenant"], responses=error_responses(400, 401, 403, 404, 503))

Version = Annotated[int, Path(ge=1, le=INT32_MAX)]


def _unix(description: str, default: int | None = None):
    return Query(default=default, ge=0, le=MAX_UNIX_S, description=description)


# --- functions --------------------------------------------------------------------------
@router.get("/functions", response_model=Page[FunctionOut])
async def list_functions(principal: PrincipalDep, session: ReadSessionDep) -> Page[FunctionOut]:
    return Page(data=[FunctionOut.of(s) for s in await functions.list_functions(session, principal.tenant_id)])


async def register_function(
    principal: PrincipalDep,
    rt: RuntimeDep,
    name: Annotated[str, Form(description="Function name; registering an existing name adds a version")],
    backbone: Annotated[str, Form()],
    files: Annotated[
        list[UploadFile] | None, File(description="The files save_pretrained wrote, one part each")
    ] = None,
    archive: Annotated[UploadFile | None, File(description="Or: the folder as one .tar.gz")] = None,
    s3_uri: Annotated[str | None, Form(description="Or: s3://bucket/prefix of the folder")] = None,
) -> FunctionOut:
    """Validate, store by content hash under the tenant's prefix, and serve the new version.

    A refused adapter is a 422 naming the file, tensor and problem, and leaves nothing stored.
    """
    principal.require(MANAGE)
    source = AdapterSource(
        files=[(f.filename or "", f.file) for f in files or []],
        archive=archive.file if archive is not None else None,
        s3_uri=s3_uri,
    )
    limits = rt.settings.limits
    async with (
        staged(source, rt.store, principal.tenant_id, limits.max_adapter_bytes) as folder,
        rt.transaction() as session,
    ):
        served = await catalog.register_function(session, rt.store, limits, principal.tenant_id, name, backbone, folder)
    return FunctionOut.of(served)


# Its own route class: an oversize body is refused before FastAPI spools it (a 413 naming the limit).
router.add_api_route(
    "/functions",
    register_function,
    methods=["POST"],
    status_code=201,
    response_model=FunctionOut,
    responses=error_responses(409, 413, 422),
    route_class_override=UploadRoute,
)


@router.get("/functions/{name}", response_model=FunctionOut)
async def get_function(name: str, principal: PrincipalDep, session: ReadSessionDep) -> FunctionOut:
    return FunctionOut.of(await functions.served_function(session, principal.tenant_id, name))


@router.get("/functions/{name}/versions", response_model=VersionsOut)
async def list_versions(name: str, principal: PrincipalDep, session: ReadSessionDep) -> VersionsOut:
    function, versions = await catalog.list_versions(session, principal.tenant_id, name)
    return VersionsOut(function=name, data=[VersionOut.of(a, function.artifact_id) for a in versions])


@router.get("/functions/{name}/versions/{version}", response_model=VersionOut)
async def get_version(name: str, version: Version, principal: PrincipalDep, session: ReadSessionDep) -> VersionOut:
    function = await catalog.function_by_name(session, principal.tenant_id, name)
    return VersionOut.of(await catalog.get_version(session, principal.tenant_id, name, version), function.artifact_id)


@router.post("/functions/{name}/rollback", response_model=FunctionOut, responses=error_responses(409))
async def rollback(name: str, principal: PrincipalDep, rt: RuntimeDep, body: RollbackBody | None = None) -> FunctionOut:
    """Serve an older stored version (default: the previous one); the next invocation uses it."""
    principal.require(MANAGE)
    async with rt.transaction() as session:
        served = await catalog.rollback(session, principal.tenant_id, name, body.version if body else None)
    return FunctionOut.of(served)


# --- invocations, usage, bills ----------------------------------------------------------
@router.get("/invocations", response_model=InvocationList)
async def list_invocations(
    principal: PrincipalDep,
    session: ReadSessionDep,
    function: str | None = Query(default=None, description="function name"),
    state: str | None = Query(default=None, description="queued | running | succeeded | failed | cancelled"),
    start_time: int | None = _unix("Unix seconds, inclusive (accepted at)"),
    end_time: int | None = _unix("Unix seconds, exclusive"),
    limit: int = Query(default=50, ge=1, le=500),
) -> InvocationList:
    principal.require(READ_USAGE)
    function_id = (await catalog.function_by_name(session, principal.tenant_id, function)).id if function else None
    rows = await invocations.list_for_tenant(
        session, principal.tenant_id, function_id, state, _ts(start_time), _ts(end_time), limit
    )
    return InvocationList(data=[InvocationOut.of(r) for r in rows])


@router.get("/usage", response_model=UsagePage)
async def usage(
    principal: PrincipalDep,
    session: ReadSessionDep,
    start_time: int = Query(ge=0, le=MAX_UNIX_S, description="Unix seconds, inclusive"),
    end_time: int | None = _unix("Unix seconds, exclusive (default: now)"),
    bucket_width: str = Query(default="1d", pattern="^(1h|1d)$"),
    group_by: str | None = Query(
        default=None, pattern="^function$", description="'function' for a result per function; omit for totals"
    ),
    function: str | None = Query(default=None, description="only this function"),
) -> UsagePage:
    """Usage per UTC hour or day, like OpenAI's usage API: invocations, input and output tokens, amount."""
    principal.require(READ_USAGE)
    start, end = datetime.fromtimestamp(start_time, UTC), _ts(end_time) or datetime.now(UTC)
    buckets = ledger.bucket_starts(start, end, bucket_width)
    function_id = (await catalog.function_by_name(session, principal.tenant_id, function)).id if function else None
    rows = await ledger.usage_by_bucket(
        session, principal.tenant_id, start, end, bucket_width, function_id, by_function=group_by == "function"
    )
    return UsagePage(data=_buckets(buckets, ledger.BUCKET_WIDTHS[bucket_width], rows))


@router.get("/bills/{period}", response_model=BillOut)
async def bill(period: str, principal: PrincipalDep, session: ReadSessionDep) -> BillOut:
    """The bill of a calendar month (UTC), ``YYYY-MM``: a line per function and the exact total."""
    principal.require(READ_USAGE)
    return BillOut.of(await ledger.monthly_bill(session, principal.tenant_id, *ledger.month_of(period)))


# --- API keys ---------------------------------------------------------------------------
@router.get("/keys", response_model=Page[KeyOut])
async def list_keys(principal: PrincipalDep, session: ReadSessionDep) -> Page[KeyOut]:
    """The tenant's keys (names, prefixes, scopes, expiry, revocation), never their secrets."""
    return Page(data=[KeyOut.of(k) for k in await keys.list_api_keys(session, principal.tenant_id)])


@router.post("/keys", status_code=201, response_model=KeyCreated)
async def create_key(body: KeyCreate, principal: PrincipalDep, rt: RuntimeDep) -> KeyCreated:
    """Another key of this tenant, with at most the calling key's scopes (by default exactly those).
    The secret is in this answer only."""
    principal.require(MANAGE)
    scopes = tuple(body.scopes) if "scopes" in body.model_fields_set else tuple(sorted(principal.scopes))
    async with rt.transaction() as session:
        key, secret = await keys.create_own_api_key(session, principal, body.name, scopes, body.expiry())
    return KeyCreated(**KeyOut.of(key).model_dump(), secret=secret)


@router.delete("/keys/{key_id}", response_model=KeyOut)
async def revoke_key(key_id: str, principal: PrincipalDep, rt: RuntimeDep) -> KeyOut:
    """Revoke one of the tenant's keys (the calling one too); the gateways drop their cached copy at once."""
    principal.require(MANAGE)
    async with rt.transaction() as session:
        key = await keys.revoke_api_key(session, principal.tenant_id, key_id)
    await rt.tenant_changed(principal.tenant_id)
    return KeyOut.of(key)


def _ts(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def _buckets(starts: list[datetime], width, rows: list[ledger.UsageRow]) -> list[UsageBucket]:
    by_start: dict[datetime, list[UsageResult]] = {s: [] for s in starts}
    for r in rows:
        result = UsageResult(
            function=r.function_name,
            function_id=r.function_id,
            num_model_requests=r.invocations,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            amount_picousd=r.amount_picousd,
            amount=Amount(value=usd(r.amount_picousd)),
        )
        by_start.setdefault(r.bucket_start, []).append(result)
    return [
        UsageBucket(start_time=int(s.timestamp()), end_time=int((s + width).timestamp()), results=res)
        for s, res in sorted(by_start.items())
    ]
