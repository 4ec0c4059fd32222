"""Knock's bulk user operations: `POST /v1/users/bulk/identify` and `/v1/users/bulk/delete` queue
a `BulkOperation` that a worker processes (api/bulk.py); `GET /v1/bulk_operations/{id}` reports
its progress and per-item errors."""

from __future__ import annotations

from typing import Annotated, Any, Required

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict

from audiences.api.bulk import MAX_ITEMS, get_operation, queue_operation
from audiences.api.dependencies import BulkWriter, Reader, parsed_body, write
from audiences.api.identifiers import Id
from audiences.api.models import ERRORS, InlineIdentifyUser, json_body

router = APIRouter(tags=["users"])


class BulkIdentifyRequest(TypedDict):
    __pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[misc]
    users: Required[
        Annotated[
            list[InlineIdentifyUser],
            Field(min_length=1, max_length=MAX_ITEMS, description="Up to 1,000 users."),
        ]
    ]


class BulkDeleteRequest(TypedDict):
    __pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[misc]
    user_ids: Required[
        Annotated[list[Id], Field(min_length=1, max_length=MAX_ITEMS, description="Up to 1,000.")]
    ]


IDENTIFY_ADAPTER = TypeAdapter(BulkIdentifyRequest)
DELETE_ADAPTER = TypeAdapter(BulkDeleteRequest)


class BulkOperation(BaseModel):
    """Knock's `BulkOperation`."""

    model_config = ConfigDict(populate_by_name=True)
    typename: str = Field("BulkOperation", alias="__typename")
    id: str
    name: str
    status: str = Field(description="queued, processing, completed or failed")
    estimated_total_rows: int
    processed_rows: int
    success_count: int
    error_count: int
    error_items: list[dict[str, Any]]
    progress_path: str
    inserted_at: str
    updated_at: str
    started_at: str | None
    completed_at: str | None
    failed_at: str | None


@router.post(
    "/v1/users/bulk/identify",
    response_model=BulkOperation,
    responses=ERRORS,
    summary="Identify up to 1,000 users, processed in the background",
    openapi_extra=json_body("BulkIdentifyRequest", IDENTIFY_ADAPTER),
)
async def bulk_identify(request: Request, caller: BulkWriter):
    users = (await parsed_body(request, IDENTIFY_ADAPTER))["users"]
    return await write(
        request,
        caller,
        200,
        lambda claim: queue_operation(caller.environment, "users.identify", users, claim),
    )


@router.post(
    "/v1/users/bulk/delete",
    response_model=BulkOperation,
    responses=ERRORS,
    summary="Delete up to 1,000 users (memberships end, with exit events), in the background",
    openapi_extra=json_body("BulkDeleteRequest", DELETE_ADAPTER),
)
async def bulk_delete(request: Request, caller: BulkWriter):
    user_ids = (await parsed_body(request, DELETE_ADAPTER))["user_ids"]
    return await write(
        request,
        caller,
        200,
        lambda claim: queue_operation(caller.environment, "users.delete", user_ids, claim),
    )


@router.get(
    "/v1/bulk_operations/{operation_id}",
    response_model=BulkOperation,
    responses=ERRORS,
    summary="A bulk operation's status and progress",
)
def bulk_operation(operation_id: Annotated[str, Path(max_length=64)], caller: Reader):
    return get_operation(caller.environment.store, operation_id)
