"""Guide eligibility: who sees an in-app guide, by audience and property conditions.

A guide is a file `data/guides/<guide_key>/guide.json`, in Knock's shape:

```json
{"target_audience_key": "power-users",
 "target_property_conditions": {"all": [{"variable": "recipient.plan", "operator": "equal_to", "argument": "pro"}]},
 "tenancy_strict": false}
```

`target_audience_key: null` targets every user. With tenancy strict mode off (Knock's default),
the user must be a member with any tenant; on, the member's tenant must equal the request's tenant
(a blank tenant means "no tenant", not "any tenant").
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from audiences.store import database as tables
from audiences.store.database import MembershipStore
from audiences.store.members import is_member
from audiences.workflows.triggers import condition_segments


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    reason: str


def load_guide(folder: Path, guide_key: str) -> dict:
    path = Path(folder) / guide_key / "guide.json"
    if not path.exists():
        raise ValueError(f"no guide {guide_key!r} ({path} does not exist)")
    guide = json.loads(path.read_text(encoding="utf-8"))
    condition_segments(guide.get("target_property_conditions"), "$.target_property_conditions")
    return guide


def eligible(
    guide: dict,
    user_id: str,
    tenant: str | None,
    store: MembershipStore,
    warehouse,
    now: datetime,
) -> Eligibility:
    """Whether the user (with the request's tenant) is eligible for the guide, and why."""
    from audiences.warehouse.queries import matching_user_ids

    audience = guide.get("target_audience_key")
    strict = bool(guide.get("tenancy_strict", False))
    if audience:
        if strict:
            member = is_member(store, audience, user_id, tenant)
        else:
            members = tables.audience_members
            member = bool(
                store.scalar(
                    sa.select(sa.func.count()).where(
                        members.c.audience_key == audience, members.c.user_id == user_id
                    )
                )
            )
        if not member:
            scope = (
                f" with tenant {tenant!r}"
                if strict and tenant
                else (" with no tenant" if strict else "")
            )
            return Eligibility(False, f"not a member of {audience!r}{scope}")
    segments = condition_segments(
        guide.get("target_property_conditions"), "$.target_property_conditions"
    )
    if segments and user_id not in matching_user_ids(warehouse, segments, [user_id], now):
        return Eligibility(False, "the target property conditions do not hold")
    return Eligibility(True, f"member of {audience!r}" if audience else "every user is targeted")


@contextmanager
def profile_warehouse(store: MembershipStore, user_id: str):
    """An in-memory warehouse holding one user as the store knows them (properties and
    memberships), so the API can evaluate a guide's conditions with the same compiler while a
    pipeline run holds the real warehouse: real time's evaluator (`realtime.UserEvaluator`)."""
    from audiences.store.profiles import get_profile
    from audiences.workflows.realtime import UserEvaluator

    profile = get_profile(store, user_id)
    members = tables.audience_members
    memberships = store.rows(
        sa.select(members.c.audience_key, members.c.tenant).where(members.c.user_id == user_id)
    )
    evaluator = UserEvaluator()
    try:
        evaluator.load(
            [
                (
                    user_id,
                    None if profile is None else profile.properties,
                    [(row["audience_key"], row["tenant"]) for row in memberships],
                )
            ],
            datetime.now(UTC),
        )
        yield evaluator.connection
    finally:
        evaluator.close()
