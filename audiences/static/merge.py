"""Merging two users, as Knock's `POST /v1/users/{user_id}/merge` does: the user `from_user_id`
is merged into `user_id`, then deleted.

In one write transaction:
- properties: the merged-away user's properties are merged into the kept user's, the kept user's
  winning where both have one (objects merge, as identify does); the result is an identify call,
  so it reaches the warehouse through the same queue;
- static memberships move: each (audience, tenant) of the merged-away user ends with an `exited`
  event and, unless the kept user already has it, begins for the kept user with an `entered`
  event (the same `change_members` as every other static change, so its triggers run as usual);
- the merged-away user is deleted (a tombstone queued for the warehouse).

Dynamic memberships follow from the data: the next evaluation sees the merged-away user deleted
(an `exited` event per membership) and the kept user with the merged properties (an `entered`
event where they now match), exactly as for any other identify and delete.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from audiences.store import database as tables
from audiences.store import profiles
from audiences.store.database import MembershipStore
from audiences.store.members import Member, change_members


def merge_users(
    store: MembershipStore,
    connection,
    user_id: str,
    from_user_id: str,
    static_audiences: set[str],
) -> tuple[profiles.Profile, int] | None:
    """Merge `from_user_id` into `user_id` inside the caller's write transaction. Returns the
    kept user and the number of static memberships moved, or None if the store knows nothing of
    `from_user_id` (no profile, no membership)."""
    users, members = tables.user_profiles, tables.audience_members
    profiles.lock_profiles(store, connection)  # uploads queued before apply first
    stored = {
        row.user_id: json.loads(row.properties)
        for row in connection.execute(
            sa.select(users.c.user_id, users.c.properties).where(
                users.c.user_id.in_([user_id, from_user_id]), users.c.deleted_at.is_(None)
            )
        )
    }
    memberships = connection.execute(
        sa.select(members.c.audience_key, members.c.tenant)
        .where(members.c.user_id == from_user_id)
        .order_by(members.c.audience_key, members.c.tenant_key)
    ).all()
    if from_user_id not in stored and not memberships:
        return None
    # The kept user's properties win: merge theirs over the merged-away user's.
    merged = profiles.merge_patch(stored.get(from_user_id, {}), stored.get(user_id, {}))
    kept = profiles.identify(store, connection, [(user_id, merged)])[user_id]
    moved = 0
    for audience_key in sorted({row.audience_key for row in memberships}):
        if audience_key not in static_audiences:
            continue
        tenants = [row.tenant for row in memberships if row.audience_key == audience_key]
        change_members(
            store,
            audience_key,
            [Member(from_user_id, tenant) for tenant in tenants],
            "remove",
            source="merge",
            connection=connection,
        )
        change_members(
            store,
            audience_key,
            [Member(user_id, tenant) for tenant in tenants],
            "add",
            source="merge",
            connection=connection,
        )
        moved += len(tenants)
    profiles.delete_user(store, connection, from_user_id)
    return kept, moved
