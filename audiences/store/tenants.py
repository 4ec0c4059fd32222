"""Knock's tenants, kept in the environment's store (`tenants`), in Knock's shape.

A tenant is an id, an optional `name`, `settings` (branding, preference set) and custom
properties. Setting one is an upsert that merges, as Knock's `PUT /v1/tenants/{id}` does: objects
merge and a `null` removes a property (RFC 7396, the same `merge_patch` as users' identify).
`channel_data` and `preferences` are Knock's delivery settings, not properties: they are not kept
(docs/api.md). Memberships name tenants by id and do not need a tenant row; deleting a tenant
leaves memberships as they are.

Each write also queues its patch (`tenant_patches`, a deletion as `null`) for the warehouse's
`raw.tenants`, which per-tenant audiences read; `load_tenant_queue` applies the queue at the next
run, after the tenants sources, the way the identify queue applies to users.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import sqlalchemy as sa

from audiences.store import database as tables
from audiences.store.database import MembershipStore, now_text
from audiences.store.profiles import DELETION, apply_patch_queue, merge_patch
from audiences.users.sources import ROW_COLUMN, UserSource
from audiences.users.store import TENANTS, LoadResult, load_users
from audiences.users.validation import validate_users
from audiences.warehouse.schema import ensure_user_tables

TENANT_QUEUE_SOURCE = "tenant_api"

NOT_PROPERTIES = ("id", "name", "settings", "channel_data", "preferences", "__typename")


def _dump(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def tenant_object(row: dict) -> dict:
    """Knock's `Tenant`: `__typename`, `id`, `name`, `settings`, and the custom properties."""
    return {
        **json.loads(row["properties"]),
        "__typename": "Tenant",
        "id": row["tenant_id"],
        "name": row["name"],
        "settings": json.loads(row["settings"]) if row["settings"] else None,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def set_tenants(store: MembershipStore, connection, patches: list[tuple[str, dict]]) -> list[dict]:
    """Upsert tenants inside the caller's write transaction: each (tenant_id, patch) is merged
    into the stored tenant in order. Returns the resulting tenants in Knock's shape."""
    table = tables.tenants
    stamp = now_text()
    ids = sorted({tenant_id for tenant_id, _ in patches})
    stored = {
        row.tenant_id: dict(row._mapping)
        for row in connection.execute(sa.select(table).where(table.c.tenant_id.in_(ids)))
    }
    merged: dict[str, dict] = {}
    for tenant_id, patch in patches:
        current = merged.get(tenant_id) or stored.get(tenant_id)
        state = {
            "name": current["name"] if current else None,
            "properties": json.loads(current["properties"]) if current else {},
            "settings": json.loads(current["settings"])
            if current and current["settings"]
            else None,
            "created_at": current["created_at"] if current else stamp,
        }
        if "name" in patch:
            state["name"] = patch["name"]
        if "settings" in patch:
            settings = merge_patch(state["settings"] or {}, patch["settings"])
            state["settings"] = settings or None
        custom = {key: value for key, value in patch.items() if key not in NOT_PROPERTIES}
        state["properties"] = merge_patch(state["properties"], custom)
        merged[tenant_id] = {
            "tenant_id": tenant_id,
            "name": state["name"],
            "properties": _dump(state["properties"]),
            "settings": _dump(state["settings"]) if state["settings"] is not None else None,
            "created_at": state["created_at"],
            "updated_at": stamp,
        }
    for tenant_id, row in merged.items():
        if tenant_id in stored:
            connection.execute(table.update().where(table.c.tenant_id == tenant_id).values(**row))
        else:
            connection.execute(table.insert().values(**row))
    connection.execute(
        tables.tenant_patches.insert(),
        [
            {
                "tenant_id": tenant_id,
                "patch": _dump(warehouse_patch(patch)),
                "received_at": stamp,
                "loaded": False,
            }
            for tenant_id, patch in patches
        ],
    )
    return [tenant_object(row) for row in merged.values()]


def get_tenant(store: MembershipStore, tenant_id: str) -> dict | None:
    table = tables.tenants
    rows = store.rows(sa.select(table).where(table.c.tenant_id == tenant_id))
    return tenant_object(rows[0]) if rows else None


def delete_tenant(connection, tenant_id: str) -> bool:
    """Delete a tenant; False if there was none. Memberships that name it stay."""
    table = tables.tenants
    deleted = bool(
        connection.execute(table.delete().where(table.c.tenant_id == tenant_id)).rowcount
    )
    if deleted:
        connection.execute(
            tables.tenant_patches.insert().values(
                tenant_id=tenant_id, patch=DELETION, received_at=now_text(), loaded=False
            )
        )
    return deleted


def warehouse_patch(patch: dict) -> dict:
    """A tenant write as the warehouse keeps it (`raw.tenants.properties`, what `tenant.*` reads):
    Knock's tenant object without its id and delivery settings; merging it is the same RFC 7396
    merge as `set_tenants` (the name replaced, settings and custom properties merged)."""
    return {
        key: value
        for key, value in patch.items()
        if key not in ("id", "__typename", "channel_data", "preferences")
    }


def tenant_queue_waiting(store: MembershipStore) -> tuple[int, int | None]:
    """How many tenant writes wait in the store's queue for the warehouse, and the newest one's id
    (None when none wait), as `identify_queue_waiting` tells of identify calls."""
    patches = tables.tenant_patches
    with store.read_engine.connect() as connection:
        waiting, newest = connection.execute(
            sa.select(sa.func.count(), sa.func.max(patches.c.patch_id)).where(
                patches.c.loaded == sa.false()
            )
        ).one()
    return waiting, newest


def load_tenant_queue(
    connection: duckdb.DuckDBPyConnection, store: MembershipStore, loaded_at: datetime
) -> LoadResult:
    """Apply the tenant writes queued in the store (`PUT` and `DELETE /v1/tenants/{id}`) to
    `raw.tenants` as a stream source, in the order received; a deletion leaves a tombstone."""
    patches = tables.tenant_patches
    rows = store.rows(
        sa.select(patches.c.patch_id, patches.c.tenant_id, patches.c.patch)
        .where(patches.c.loaded == sa.false())
        .order_by(patches.c.patch_id)
    )
    ensure_user_tables(connection)
    source = UserSource(
        TENANT_QUEUE_SOURCE, "jsonl", Path("membership-store"), mode="stream", kind="tenants"
    )
    totals: dict[str, int] = {}

    def load(batch: list[dict]) -> None:
        frame = pl.DataFrame(
            {
                "id": [row["tenant_id"] for row in batch],
                "properties": [row["patch"] for row in batch],
            },
            schema={"id": pl.String, "properties": pl.String},
        ).with_row_index(ROW_COLUMN, offset=1)
        frame = frame.with_columns(pl.col(ROW_COLUMN).cast(pl.Int64))
        result = load_users(
            connection, source, validate_users(frame), loaded_at, False, entity=TENANTS
        )
        for key, value in result.as_metadata().items():
            totals[key] = totals.get(key, 0) + value

    apply_patch_queue(
        connection, store, patches, rows, load, "tenants", "tenant_id", loaded_at, totals
    )
    return LoadResult.from_totals(TENANT_QUEUE_SOURCE, totals)
