"""Knock's audience member routes, plus membership checks and broadcasts."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from audiences.api.dependencies import Reader, Writer, members_body, parsed_body, write
from audiences.api.errors import invalid
from audiences.api.models import (
    BROADCAST_ADAPTER,
    ERRORS,
    MEMBERS_BODY,
    REMOVE_MEMBERS,
    UPLOAD_BODY,
    AudienceKey,
    AudienceMembersPage,
    BroadcastResult,
    Membership,
    Tenant,
    UploadAnswer,
    UserId,
    json_body,
)
from audiences.api.service import tenant_of
from audiences.static.uploads import UploadError, parse_mapping

router = APIRouter()


@router.post(
    "/v1/audiences/{key}/members",
    status_code=204,
    responses=ERRORS,
    tags=["audiences"],
    summary="Add members (inline identify upserts the users)",
    openapi_extra=MEMBERS_BODY,
)
async def add_members(
    key: AudienceKey,
    request: Request,
    caller: Writer,
    create_audience: bool = Query(False, description="Create a missing static audience."),
):
    body = await members_body(request)
    return await write(
        request,
        caller,
        204,
        lambda claim: caller.environment.change_members(
            key, body["members"], "add", create_audience, claim=claim
        ),
    )


@router.post(
    "/v1/audiences/{key}/members/upload",
    response_model=UploadAnswer,
    responses=ERRORS,
    tags=["audiences"],
    summary="Upload a CSV file of members (our extension; `audiences upload` over HTTP)",
    openapi_extra=UPLOAD_BODY,
)
async def upload_members(
    key: AudienceKey,
    request: Request,
    caller: Writer,
    columns: list[str] = Query(
        [],
        alias="map",
        description="`column=field` (dots for nested properties), as `audiences upload --map`.",
    ),
    tenant_column: str | None = Query(None, description="The column holding each row's tenant."),
    create_audience: bool = Query(False, description="Create a missing static audience."),
):
    """The answer comes once the members and the rows are journaled (one batch); the members and
    their events are written right after it, before any read or write of the store sees the
    upload, then the rows' identify patches (or when the service next starts, if it dies first)."""
    try:
        mapping = parse_mapping(columns)
    except UploadError as error:
        raise invalid("map", str(error)) from None
    environment = caller.environment
    if not create_audience:
        environment.require_audience(key)  # an unknown audience is a 404 before the body's checks
    body = await request.body()
    if not body.strip():
        raise invalid("body", "the request has no body; send the CSV file in it")
    response = await write(
        request,
        caller,
        200,
        lambda claim: environment.upload(
            key, body, mapping, tenant_column, create_audience, claim=claim
        ),
    )
    response.background = BackgroundTask(environment.after_upload)
    return response


@router.delete(
    "/v1/audiences/{key}/members",
    status_code=204,
    responses=ERRORS,
    tags=["audiences"],
    summary="Remove members (in the body, or as a `members` query parameter)",
    openapi_extra=REMOVE_MEMBERS,
)
async def remove_members(key: AudienceKey, request: Request, caller: Writer):
    body = await members_body(request, from_query=True)
    return await write(
        request,
        caller,
        204,
        lambda claim: caller.environment.change_members(
            key, body["members"], "remove", claim=claim
        ),
    )


@router.get(
    "/v1/audiences/{key}/members",
    response_model=AudienceMembersPage,
    responses=ERRORS,
    tags=["audiences"],
    summary="List members, a page at a time",
)
def list_members(
    key: AudienceKey,
    caller: Reader,
    page_size: int = Query(50, ge=1, le=50),
    after: str | None = Query(None, description="The `page_info.after` of the previous page."),
    before: str | None = Query(None, description="The `page_info.before` of the next page."),
    tenant: Tenant | None = Query(
        None, description="Only members with this tenant; empty: only members without tenant."
    ),
):
    return caller.environment.list_members(key, page_size, after, before, tenant)


@router.get(
    "/v1/audiences/{key}/members/{user_id}",
    response_model=Membership,
    responses=ERRORS,
    tags=["audiences"],
    summary="Check membership, tenant-strict (beyond Knock)",
)
async def check_member(
    key: AudienceKey,
    user_id: UserId,
    caller: Reader,
    tenant: Tenant | None = Query(None, description="The run's tenant; none or empty: no tenant."),
):
    # Two indexed reads, answered on the event loop: cheaper than a hop to a worker thread.
    return JSONResponse(caller.environment.check(key, user_id, tenant_of(tenant)))


@router.post(
    "/v1/audiences/{key}/broadcasts",
    status_code=202,
    response_model=BroadcastResult,
    responses=ERRORS,
    tags=["audiences"],
    summary="Trigger a workflow for every member (beyond Knock)",
    openapi_extra=json_body("BroadcastRequest"),
)
async def broadcast(key: AudienceKey, request: Request, caller: Writer):
    body = await parsed_body(request, BROADCAST_ADAPTER)
    return await write(
        request,
        caller,
        202,
        lambda claim: caller.environment.broadcast(
            key, body.workflow, body.data, body.tenant, body.sink, body.broadcast_id, claim
        ),
    )
