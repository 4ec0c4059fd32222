"""Knock's user routes: identify, get, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request

from audiences.api.dependencies import Deleter, Reader, Writer, parsed_body, write
from audiences.api.errors import invalid
from audiences.api.models import ERRORS, PROPERTIES_ADAPTER, PROPERTIES_BODY, User, UserId

router = APIRouter()


@router.put(
    "/v1/users/{user_id}",
    response_model=User,
    responses=ERRORS,
    tags=["users"],
    summary="Identify a user (merge properties; null removes one)",
    openapi_extra=PROPERTIES_BODY,
)
async def identify(user_id: UserId, request: Request, caller: Writer):
    properties = dict(await parsed_body(request, PROPERTIES_ADAPTER))
    if properties.get("id", user_id) != user_id:
        raise invalid("id", "differs from the user id in the path")
    properties.pop("id", None)
    return await write(
        request,
        caller,
        200,
        lambda claim: caller.environment.identify(user_id, properties, claim),
    )


@router.get(
    "/v1/users/{user_id}",
    response_model=User,
    responses=ERRORS,
    tags=["users"],
    summary="Get a user",
)
def get_user(user_id: UserId, caller: Reader):
    return caller.environment.get_user(user_id)


@router.delete(
    "/v1/users/{user_id}",
    status_code=204,
    responses=ERRORS,
    tags=["users"],
    summary="Delete a user; their memberships end, with exit events",
)
async def delete_user(user_id: UserId, request: Request, caller: Deleter):
    return await write(
        request, caller, 204, lambda claim: caller.environment.delete_user(user_id, claim)
    )
