"""A membership event: a user entered or exited an audience (under a tenant or none).

Evaluated audiences' events are written to the warehouse outbox by `changes.record_changes` and
read back by `publish.publish_outbox`; static audiences' events are written straight to the store
(`store.members`) and read back by `publish.process_static_triggers`. Both reads make
`MembershipEvent`s, which the trigger rules, the trigger payload and the store's current-membership
table consume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

EventType = Literal["entered", "exited"]


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """One entered / exited event, as the outbox and the store's `membership_events` hold it."""

    event_id: str
    audience_key: str
    user_id: str
    tenant: str | None
    event_type: EventType
    # ISO 8601 text in UTC with microseconds (the store's time format).
    occurred_at: str
    # 1 for a user's first entry into the audience (under this tenant), then 2, ...
    entry_number: int
    # The outbox's order; None for static audiences' events, written to the store directly.
    sequence: int | None = None
    audience_version: str | None = None
    # A new audience's first members: recorded, never triggered.
    is_backfill: bool = False
    # The held batch (circuit breaker) the event belongs to, if any.
    batch_id: str | None = None

    @classmethod
    def from_row(cls, row: Mapping) -> MembershipEvent:
        """An event from a row with (at least) these columns: the outbox's or the store's."""
        return cls(**{name: row[name] for name in FIELDS})

    def as_row(self) -> dict:
        """The event's columns, for the store's `membership_events` (plus what the caller adds)."""
        return {name: getattr(self, name) for name in FIELDS}


FIELDS = tuple(field.name for field in fields(MembershipEvent))
