"""Knock's `POST /v1/users/{user_id}/merge`: merge `from_user_id` into the user (static/merge.py)."""

from __future__ import annotations

from typing import Required

from fastapi import APIRouter, Request
from pydantic import ConfigDict, TypeAdapter
from typing_extensions import TypedDict

from audiences.api.dependencies import Deleter, parsed_body, write
from audiences.api.errors import not_found
from audiences.api.identifiers import Id
from audiences.api.models import ERRORS, User, UserId, json_body
from audiences.static.merge import merge_users

router = APIRouter(tags=["users"])


class MergeRequest(TypedDict):
    __pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[misc]
    from_user_id: Required[Id]


MERGE_ADAPTER = TypeAdapter(MergeRequest)


@router.post(
    "/v1/users/{user_id}/merge",
    response_model=User,
    responses=ERRORS,
    summary="Merge a user into this one: properties merge, static memberships move (with "
    "events), the other user is deleted",
    openapi_extra=json_body("MergeRequest", MERGE_ADAPTER),
)
async def merge(user_id: UserId, request: Request, caller: Deleter):
    from_user_id = (await parsed_body(request, MERGE_ADAPTER))["from_user_id"]
    environment = caller.environment
    if from_user_id == user_id:  # nothing to merge: the user as it is (404 if there is none)
        return environment.get_user(user_id)
    static = {key for key, kind in environment.audience_types().items() if kind == "static"}

    def work(connection):
        merged = merge_users(environment.store, connection, user_id, from_user_id, static)
        if merged is None:
            raise not_found(f"user {from_user_id!r}")
        return merged[0].as_knock_user()

    response = await write(request, caller, 200, lambda claim: environment.write(work, claim))
    environment.identified([user_id, from_user_id])  # real time: both users changed
    return response
