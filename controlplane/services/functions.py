"""Functions as served: the function, the adapter version it serves and its backbone, read by name.

The gateway's only way into the catalog: plain reads, with no adapter validator, numpy or S3
client behind them (registration lives in ``controlplane.services.catalog``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import AdapterArtifact, Backbone, Function
from lorafaas.errors import NotFound
from lorafaas.wire import AdapterRef

MAX_NAME = 128


def valid_name(name: str) -> bool:
    """Function names: 1-128 letters, digits, '-', '_' or '.'; nothing else can name a function."""
    return 0 < len(name) <= MAX_NAME and all(c.isalnum() or c in "-_." for c in name)


@dataclass(frozen=True)
class ServedFunction:
    """A function resolved for invocation: the row, the adapter version it serves, its backbone."""

    function: Function
    artifact: AdapterArtifact
    backbone: Backbone

    def adapter_ref(self) -> AdapterRef:
        a = self.artifact
        return AdapterRef(function_id=self.function.id, bucket=a.bucket, prefix=a.prefix, sha256=a.sha256, rank=a.rank)


async def served_function(session: AsyncSession, tenant_id: str, name: str) -> ServedFunction:
    """The tenant's function by name. Another tenant's function is 'not found', like a missing one."""
    if not valid_name(name):  # e.g. a NUL character: no such function, and no query to send
        raise NotFound(f"function {name[:MAX_NAME]!r} not found", function=name[:MAX_NAME])
    row = (
        await session.execute(
            select(Function, AdapterArtifact, Backbone)
            .join(AdapterArtifact, AdapterArtifact.id == Function.artifact_id)
            .join(Backbone, Backbone.id == Function.backbone_id)
            .where(Function.tenant_id == tenant_id, Function.name == name)
        )
    ).first()
    if row is None:
        raise NotFound(f"function '{name}' not found", function=name)
    return ServedFunction(*row)


async def list_functions(session: AsyncSession, tenant_id: str) -> list[ServedFunction]:
    rows = await session.execute(
        select(Function, AdapterArtifact, Backbone)
        .join(AdapterArtifact, AdapterArtifact.id == Function.artifact_id)
        .join(Backbone, Backbone.id == Function.backbone_id)
        .where(Function.tenant_id == tenant_id)
        .order_by(Function.name)
    )
    return [ServedFunction(*row) for row in rows]


async def list_all_functions(session: AsyncSession, tenant_id: str | None = None) -> list[ServedFunction]:
    """Every function (the operator's view), optionally of one tenant."""
    query = (
        select(Function, AdapterArtifact, Backbone)
        .join(AdapterArtifact, AdapterArtifact.id == Function.artifact_id)
        .join(Backbone, Backbone.id == Function.backbone_id)
        .order_by(Function.tenant_id, Function.name)
    )
    if tenant_id is not None:
        query = query.where(Function.tenant_id == tenant_id)
    return [ServedFunction(*row) for row in await session.execute(query)]
