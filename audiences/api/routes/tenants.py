"""Knock's tenant routes: set (upsert, merging properties), get, delete and list, per environment.

Tenants live in the environment's store (`tenants`, store/tenants.py), where a warehouse source
can read them; the members routes also set tenants given inline as objects.
"""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from audiences.api.dependencies import Deleter, Reader, Writer, parsed_body, write
from audiences.api.errors import not_found
from audiences.api.identifiers import ID_PATTERN, MAX_ID_LENGTH
from audiences.api.models import ERRORS, PageInfo, TenantProperties, json_body
from audiences.api.pages import keyset_page
from audiences.api.service import check_properties
from audiences.store import database as tables
from audiences.store.tenants import delete_tenant, get_tenant, set_tenants, tenant_object

router = APIRouter(tags=["tenants"])

TenantId = Annotated[
    str,
    Path(
        pattern=ID_PATTERN,
        max_length=MAX_ID_LENGTH,
        description="The tenant's id (Knock's rule: no '/' or '#').",
    ),
]
TENANT_ADAPTER = TypeAdapter(TenantProperties)


class Tenant(BaseModel):
    """Knock's `Tenant`: id, name, settings, and the custom properties."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    typename: str = Field("Tenant", alias="__typename")
    id: str
    name: str | None = None
    settings: dict | None = None


class TenantsPage(BaseModel):
    entries: list[Tenant]
    page_info: PageInfo


@router.put(
    "/v1/tenants/{tenant_id}",
    response_model=Tenant,
    responses=ERRORS,
    summary="Set a tenant (upsert; properties merge, null removes one)",
    openapi_extra=json_body("TenantProperties", TENANT_ADAPTER),
)
async def set_tenant(tenant_id: TenantId, request: Request, caller: Writer):
    patch = dict(await parsed_body(request, TENANT_ADAPTER))
    patch.pop("id", None)
    check_properties(patch)
    environment = caller.environment
    return await write(
        request,
        caller,
        200,
        lambda claim: environment.write(
            lambda connection: set_tenants(environment.store, connection, [(tenant_id, patch)])[0],
            claim,
        ),
    )


@router.get(
    "/v1/tenants/{tenant_id}", response_model=Tenant, responses=ERRORS, summary="Get a tenant"
)
def get_tenant_route(tenant_id: TenantId, caller: Reader):
    tenant = get_tenant(caller.environment.store, tenant_id)
    if tenant is None:
        raise not_found(f"tenant {tenant_id!r}")
    return tenant


@router.delete(
    "/v1/tenants/{tenant_id}",
    status_code=204,
    responses=ERRORS,
    summary="Delete a tenant (memberships that name it stay)",
)
async def delete_tenant_route(tenant_id: TenantId, request: Request, caller: Deleter):
    environment = caller.environment

    def work(connection):
        if not delete_tenant(connection, tenant_id):
            raise not_found(f"tenant {tenant_id!r}")

    return await write(request, caller, 204, lambda claim: environment.write(work, claim))


@router.get(
    "/v1/tenants",
    response_model=TenantsPage,
    responses=ERRORS,
    summary="List tenants, a page at a time, by id",
)
def list_tenants(
    caller: Reader,
    page_size: int = Query(50, ge=1, le=50),
    after: str | None = Query(None, description="The `page_info.after` of the previous page."),
    before: str | None = Query(None, description="The `page_info.before` of the next page."),
    name: str | None = Query(None, description="Only tenants with this name."),
    tenant_id: str | None = Query(None, description="Only the tenant with this id."),
):
    table = tables.tenants
    query = sa.select(table)
    if name is not None:
        query = query.where(table.c.name == name)
    if tenant_id is not None:
        query = query.where(table.c.tenant_id == tenant_id)
    return keyset_page(
        caller.environment.store,
        query,
        table.c.tenant_id,
        page_size,
        after,
        before,
        tenant_object,
    )
