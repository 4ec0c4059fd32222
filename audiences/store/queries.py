"""Read-side questions about the membership store: events, held batches, dead letters."""

from __future__ import annotations

import sqlalchemy as sa

from audiences.store import database as tables
from audiences.store.database import MembershipStore, tenant_key


def list_events(
    store: MembershipStore,
    audience_key: str | None = None,
    user_id: str | None = None,
    event_type: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int = 1000,
) -> list[dict]:
    """Membership events, newest last, filtered by audience, user, type and time (ISO 8601 bounds)."""
    events = tables.membership_events
    query = (
        sa.select(events)
        .order_by(events.c.occurred_at, events.c.sequence, events.c.event_id)
        .limit(limit)
    )
    if audience_key:
        query = query.where(events.c.audience_key == audience_key)
    if user_id:
        query = query.where(events.c.user_id == user_id)
    if event_type:
        query = query.where(events.c.event_type == event_type)
    if since:
        query = query.where(events.c.occurred_at >= since)
    if until:
        query = query.where(events.c.occurred_at < until)
    return store.rows(query)


def held_batches(store: MembershipStore, status: str | None = "held") -> list[dict]:
    batches = tables.held_batches
    query = sa.select(batches).order_by(batches.c.evaluated_at)
    if status:
        query = query.where(batches.c.status == status)
    return store.rows(query)


def dead_letters(store: MembershipStore, limit: int = 100) -> list[dict]:
    deliveries = tables.deliveries
    return store.rows(
        sa.select(
            deliveries.c.delivery_id,
            deliveries.c.workflow_key,
            deliveries.c.sink,
            deliveries.c.user_id,
            deliveries.c.tenant,
            deliveries.c.attempts,
            deliveries.c.last_error,
            deliveries.c.created_at,
        )
        .where(deliveries.c.status == "dead")
        .order_by(deliveries.c.created_at)
        .limit(limit)
    )


def current_members(
    store: MembershipStore, audience_key: str, tenant: str | None = None
) -> list[dict]:
    """The published members of an audience (optionally only those with one tenant)."""
    members = tables.audience_members
    query = (
        sa.select(members.c.user_id, members.c.tenant)
        .where(members.c.audience_key == audience_key)
        .order_by(members.c.user_id, members.c.tenant_key)
    )
    if tenant is not None:
        query = query.where(members.c.tenant_key == tenant_key(tenant))
    return store.rows(query)
