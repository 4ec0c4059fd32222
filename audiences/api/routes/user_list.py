"""Knock's `GET /v1/users` (the SDK's `users.list()`): the environment's users, a page at a time."""

from __future__ import annotations

import json
from typing import Literal

import sqlalchemy as sa
from fastapi import APIRouter, Query
from pydantic import BaseModel

from audiences.api.dependencies import Reader
from audiences.api.models import ERRORS, PageInfo, User
from audiences.api.pages import keyset_page
from audiences.store import database as tables

router = APIRouter(tags=["users"])


class UsersPage(BaseModel):
    entries: list[User]
    page_info: PageInfo


def knock_user(row: dict) -> dict:
    return {
        **json.loads(row["properties"]),
        "__typename": "User",
        "id": row["user_id"],
        "updated_at": row["updated_at"],
    }


@router.get(
    "/v1/users",
    response_model=UsersPage,
    responses=ERRORS,
    summary="List users, a page at a time, ordered by id",
)
def list_users(
    caller: Reader,
    page_size: int = Query(50, ge=1, le=50),
    after: str | None = Query(None, description="The `page_info.after` of the previous page."),
    before: str | None = Query(None, description="The `page_info.before` of the next page."),
    order: Literal["asc", "desc"] = Query("asc", description="By id, ascending or descending."),
    include: list[str] | None = Query(
        None, alias="include[]", description="Accepted for Knock's SDK; preferences are not kept."
    ),
):
    users = tables.user_profiles
    query = sa.select(users.c.user_id, users.c.properties, users.c.updated_at).where(
        users.c.deleted_at.is_(None)
    )
    return keyset_page(
        caller.environment.store,
        query,
        users.c.user_id,
        page_size,
        after,
        before,
        knock_user,
        descending=order == "desc",
    )
