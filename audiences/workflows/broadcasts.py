"""Broadcasts: one workflow trigger per member of an audience, through the same delivery path.

A broadcast is identified by its content (audience, workflow, data, tenant filter) unless given an
explicit id, and each delivery by (broadcast, user, tenant), so running the same broadcast again
sends nothing twice. Members come from the membership store, so a broadcast can be sent while a
pipeline run holds the warehouse.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from audiences.store import database as tables
from audiences.store.database import MembershipStore, new_delivery, now_text
from audiences.store.queries import current_members


@dataclass(frozen=True)
class BroadcastResult:
    broadcast_id: str
    recipients: int
    new_deliveries: int


def broadcast(
    store: MembershipStore,
    audience_key: str,
    workflow_key: str,
    sink: str,
    data: dict | None = None,
    tenant: str | None = None,
    broadcast_id: str | None = None,
) -> BroadcastResult:
    """Queue one delivery per (member, tenant) of the audience; returns how many were new."""
    data = data or {}
    if broadcast_id is None:
        identity = json.dumps(
            [audience_key, workflow_key, data, tenant], sort_keys=True, separators=(",", ":")
        )
        broadcast_id = hashlib.sha256(identity.encode()).hexdigest()[:32]
    members = current_members(store, audience_key, tenant)
    stamp = now_text()
    rows = []
    for member in members:
        delivery_id = hashlib.sha256(
            f"{broadcast_id}\x1f{member['user_id']}\x1f{member['tenant'] or ''}".encode()
        ).hexdigest()[:32]
        payload = {
            "recipients": [member["user_id"]],
            "data": {**data, "audience_key": audience_key, "broadcast_id": broadcast_id},
        }
        if member["tenant"] is not None:
            payload["tenant"] = member["tenant"]
        rows.append(
            new_delivery(
                delivery_id,
                broadcast_id=broadcast_id,
                workflow_key=workflow_key,
                sink=sink,
                audience_key=audience_key,
                user_id=member["user_id"],
                tenant=member["tenant"],
                payload=json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
                stamp=stamp,
            )
        )
    with store.engine.begin() as connection:
        inserted = store.insert_ignoring_duplicates(connection, tables.deliveries, rows)
    return BroadcastResult(broadcast_id, len(members), inserted)
