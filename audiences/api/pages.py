"""Cursor pages over one text key (users by id, tenants by id), in Knock's `{entries, page_info}`
shape: `after`/`before` are opaque cursors, `page_size` is 1-50 (default 50)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

import sqlalchemy as sa

from audiences.api.errors import invalid
from audiences.store.database import MembershipStore


def encode_position(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_position(cursor: str, field_name: str) -> str:
    try:
        position = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid(field_name, "not a cursor this API returned") from None
    return storable_position(position, field_name)


def storable_position(position: str, field_name: str) -> str:
    """A decoded cursor's position, refused unless a store can compare it: no lone surrogate
    (SQLite's driver cannot encode it) and no NUL (PostgreSQL refuses it). Positions this API
    returns are ids, which hold neither."""
    try:
        position.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(field_name, "not a cursor this API returned") from None
    if "\x00" in position:
        raise invalid(field_name, "not a cursor this API returned")
    return position


def keyset_page(
    store: MembershipStore,
    query: sa.Select,
    key: sa.ColumnElement,
    page_size: int,
    after: str | None,
    before: str | None,
    entry: Callable[[dict], dict],
    descending: bool = False,
) -> dict:
    """One page of `query`'s rows ordered by `key` (descending if asked), after or before a
    cursor, each row made an entry by `entry`."""
    if after is not None and before is not None:
        raise invalid("before", "give `after` or `before`, not both")
    forwards = before is None
    # Walking backwards reads the opposite order, then turns the page around.
    reading_descending = descending if forwards else not descending
    if after is not None:
        position = decode_position(after, "after")
        query = query.where(key < position if descending else key > position)
    if before is not None:
        position = decode_position(before, "before")
        query = query.where(key > position if descending else key < position)
    query = query.order_by(key.desc() if reading_descending else key)
    rows = store.rows(query.limit(page_size + 1))
    more = len(rows) > page_size
    rows = rows[:page_size]
    if not forwards:
        rows.reverse()
    name = key.key
    has_next = more if forwards else True
    has_previous = (after is not None) if forwards else more
    return {
        "entries": [entry(row) for row in rows],
        "page_info": {
            "__typename": "PageInfo",
            "page_size": page_size,
            "after": encode_position(rows[-1][name]) if has_next and rows else None,
            "before": encode_position(rows[0][name]) if has_previous and rows else None,
        },
    }
