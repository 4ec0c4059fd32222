"""Knock's tenants, kept in the environment's store (`tenants`), in Knock's shape.

A tenant is an id, an optional `name`, `settings` (branding, preference set) and custom
properties. Setting one is an upsert that merges, as Knock's `PUT /v1/tenants/{id}` does: objects
merge and a `null` removes a property (RFC 7396, the same `merge_patch` as users' identify).
`channel_data` and `preferences` are Knock's delivery settings, not properties: they are not kept
(docs/api.md). Memberships name tenants by id and do not need a tenant row; deleting a tenant
leaves memberships as they are.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from audiences.store import database as tables
from audiences.store.database import MembershipStore, now_text
from audiences.store.profiles import merge_patch

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
    return [tenant_object(row) for row in merged.values()]


def get_tenant(store: MembershipStore, tenant_id: str) -> dict | None:
    table = tables.tenants
    rows = store.rows(sa.select(table).where(table.c.tenant_id == tenant_id))
    return tenant_object(rows[0]) if rows else None


def delete_tenant(connection, tenant_id: str) -> bool:
    """Delete a tenant; False if there was none. Memberships that name it stay."""
    table = tables.tenants
    return bool(connection.execute(table.delete().where(table.c.tenant_id == tenant_id)).rowcount)
