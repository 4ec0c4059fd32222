"""Publishing: drain the warehouse's membership outbox into the operational store.

Each chunk of outbox events, in sequence order, is written to the store in one transaction:
the events themselves (a new audience's backfill entries only as current membership: they stay in
the warehouse's outbox and history), the current-membership table, the held batches, and one
delivery per (event, matching workflow trigger). Only then does the warehouse's published watermark move. A
crash anywhere means the chunk is published again, and because events and deliveries have
deterministic ids and are inserted with "on conflict do nothing", publishing twice changes nothing.

Trigger rules applied here: no backfill (a new audience's first members, and events from before a
trigger was first seen, trigger nothing), `on` entered / exited, trigger frequency, and the
trigger's conditions evaluated against the recipient's current properties.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import sqlalchemy as sa

from audiences.membership.events import FIELDS as EVENT_FIELDS
from audiences.membership.events import MembershipEvent
from audiences.store import database as tables
from audiences.store.database import (
    MembershipStore,
    apply_membership_changes,
    new_delivery,
    now_text,
    tenant_key,
)
from audiences.warehouse.queries import matching_user_ids
from audiences.warehouse.schema import ensure_membership_tables
from audiences.workflows.triggers import WorkflowTrigger, trigger_payload

CHUNK = 50_000
# The outbox's columns, in MembershipEvent's names (occurred_at read as the store's text).
OUTBOX_COLUMNS = (
    "sequence",
    "event_id",
    "audience_key",
    "user_id",
    "tenant",
    "event_type",
    "occurred_at",
    "audience_version",
    "entry_number",
    "is_backfill",
    "batch_id",
)


def outbox_select_list(alias: str = "") -> str:
    """The SELECT list that reads the outbox's OUTBOX_COLUMNS in order (`occurred_at` as the
    store's text), from the table or its `alias`."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(
        f"strftime({prefix}{column}, '%Y-%m-%dT%H:%M:%S.%fZ') as {column}"
        if column == "occurred_at"
        else prefix + column
        for column in OUTBOX_COLUMNS
    )


@dataclass
class PublishReport:
    events: int = 0
    deliveries: int = 0
    held_deliveries: int = 0
    skipped_by_frequency: int = 0
    skipped_by_conditions: int = 0
    held_batches: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        """The report as `audiences publish` prints it."""
        line = (
            f"published {self.events:,} membership events; {self.deliveries:,} workflow triggers "
            f"queued ({self.held_deliveries:,} held), {self.skipped_by_frequency:,} skipped by "
            f"their frequency rule, {self.skipped_by_conditions:,} by their conditions"
        )
        for batch in self.held_batches:
            line += f"\nheld by the circuit breaker as {batch}: `audiences release` or `discard` it"
        return line


def outbox_position(connection: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """(last published sequence, last written sequence) of the warehouse's outbox."""
    ensure_membership_tables(connection)
    published = connection.execute(
        "select coalesce(max(published_sequence), 0) from raw.outbox_published"
    ).fetchall()[0][0]
    written = connection.execute(
        "select coalesce(max(sequence), 0) from raw.membership_outbox"
    ).fetchall()[0][0]
    return published, written


def register_triggers(
    store: MembershipStore, triggers: dict[str, WorkflowTrigger], current_sequence: int
) -> list[str]:
    """Record new (or re-pointed) triggers; they fire only for events after `current_sequence`."""
    added = []
    with store.engine.begin() as connection:
        known = {
            row.workflow_key: row for row in connection.execute(sa.select(tables.workflow_triggers))
        }
        for key, trigger in sorted(triggers.items()):
            existing = known.get(key)
            if existing is not None and existing.audience_key == trigger.audience_key:
                continue
            if existing is not None:
                connection.execute(
                    tables.workflow_triggers.delete().where(
                        tables.workflow_triggers.c.workflow_key == key
                    )
                )
            connection.execute(
                tables.workflow_triggers.insert().values(
                    workflow_key=key,
                    audience_key=trigger.audience_key,
                    first_seen_at=now_text(),
                    first_event_sequence=current_sequence,
                )
            )
            added.append(key)
    return added


def publish_outbox(
    connection: duckdb.DuckDBPyConnection,
    store: MembershipStore,
    triggers: dict[str, WorkflowTrigger],
    default_sink: str,
    now: datetime,
    chunk_size: int = CHUNK,
) -> PublishReport:
    """Publish every unpublished outbox event; see the module docstring."""
    published, written = outbox_position(connection)
    register_triggers(store, triggers, published)
    first_sequences = _trigger_starts(store)
    report = PublishReport()
    batches = _new_batches(connection, published)
    position = published
    while position < written:
        rows = connection.execute(
            f"""
            select {outbox_select_list()}
            from raw.membership_outbox
            where sequence > $after
            order by sequence
            limit $limit
            """,
            {"after": position, "limit": chunk_size},
        ).fetchall()
        if not rows:
            break
        events = [MembershipEvent(**dict(zip(OUTBOX_COLUMNS, row, strict=True))) for row in rows]
        stamp = now_text()
        # One store transaction per chunk: a crash leaves all of it, or none of it, published.
        with store.engine.begin() as store_connection:
            if position == published and batches:
                store.insert_ignoring_duplicates(
                    store_connection,
                    tables.held_batches,
                    [{**batch, "status": "held", "decided_at": None} for batch in batches],
                )
            deliveries = _deliveries_for(
                connection,
                store,
                store_connection,
                events,
                triggers,
                first_sequences,
                default_sink,
                now,
                report,
            )
            # A new audience's first members (backfill) only set the current membership: their
            # entries stay in the warehouse's history and outbox, and trigger nothing.
            store.insert_ignoring_duplicates(
                store_connection,
                tables.membership_events,
                [
                    {**event.as_row(), "published_at": stamp}
                    for event in events
                    if not event.is_backfill
                ],
            )
            apply_membership_changes(store, store_connection, events)
            report.deliveries += store.insert_ignoring_duplicates(
                store_connection, tables.deliveries, deliveries
            )
        position = events[-1].sequence
        connection.execute(
            "insert into raw.outbox_published values ($position)", {"position": position}
        )
        report.events += len(events)
    report.held_batches = sorted(batch["batch_id"] for batch in batches)
    return report


def _trigger_starts(store: MembershipStore) -> dict[str, tuple[int, str]]:
    """Per workflow: the outbox sequence and the time after which its events may trigger it."""
    with store.read_engine.connect() as connection:
        return {
            row.workflow_key: (row.first_event_sequence, row.first_seen_at)
            for row in connection.execute(sa.select(tables.workflow_triggers))
        }


def _after_trigger_start(event: MembershipEvent, start: tuple[int, str] | None) -> bool:
    if start is None:
        return True
    if event.sequence is not None:
        return event.sequence > start[0]
    return event.occurred_at >= start[1]


def process_static_triggers(
    connection: duckdb.DuckDBPyConnection,
    store: MembershipStore,
    triggers: dict[str, WorkflowTrigger],
    default_sink: str,
    now: datetime,
) -> PublishReport:
    """Queue deliveries for static audiences' events recorded since the last run.

    Runs in the pipeline after users were loaded, so trigger conditions see current properties. A
    member who is still a missing user (never identified) triggers nothing, now or later.
    """
    events_table = tables.membership_events
    published, _ = outbox_position(connection)
    register_triggers(store, triggers, published)
    starts = _trigger_starts(store)
    report = PublishReport()
    rows = [
        MembershipEvent.from_row(row)
        for row in store.rows(
            sa.select(*(events_table.c[name] for name in EVENT_FIELDS))
            .where(events_table.c.triggers_processed == sa.false())
            .order_by(events_table.c.occurred_at, events_table.c.event_id)
        )
    ]
    for start in range(0, len(rows), CHUNK):
        events = rows[start : start + CHUNK]
        known = _identified(connection, sorted({event.user_id for event in events}))
        with store.engine.begin() as store_connection:
            present = [event for event in events if event.user_id in known]
            deliveries = _deliveries_for(
                connection,
                store,
                store_connection,
                present,
                triggers,
                starts,
                default_sink,
                now,
                report,
            )
            report.deliveries += store.insert_ignoring_duplicates(
                store_connection, tables.deliveries, deliveries
            )
            store_connection.execute(
                events_table.update()
                .where(
                    events_table.c.triggers_processed == sa.false(),
                    events_table.c.event_id.in_([e.event_id for e in events]),
                )
                .values(triggers_processed=True)
            )
        report.events += len(events)
    return report


def queue_event_deliveries(
    connection: duckdb.DuckDBPyConnection,
    store: MembershipStore,
    store_connection,
    events: list[MembershipEvent],
    triggers: dict[str, WorkflowTrigger],
    default_sink: str,
    now: datetime,
) -> PublishReport:
    """Queue the deliveries of events recorded outside the outbox (real time, `realtime.py`)
    inside the caller's store transaction, by the same trigger rules as `publish_outbox`; trigger
    conditions are evaluated over the users `connection` holds."""
    report = PublishReport()
    starts = {
        row.workflow_key: (row.first_event_sequence, row.first_seen_at)
        for row in store_connection.execute(sa.select(tables.workflow_triggers))
    }
    deliveries = _deliveries_for(
        connection, store, store_connection, events, triggers, starts, default_sink, now, report
    )
    report.deliveries += store.insert_ignoring_duplicates(
        store_connection, tables.deliveries, deliveries
    )
    return report


def _identified(connection, user_ids: list[str]) -> set[str]:
    import polars as pl

    if not user_ids:
        return set()
    connection.register(
        "event_users", pl.DataFrame({"user_id": user_ids}, schema={"user_id": pl.String}).to_arrow()
    )
    try:
        return {
            row[0]
            for row in connection.execute(
                "select user_id from raw.users where deleted_at is null and user_id in (select user_id from event_users)"
            ).fetchall()
        }
    finally:
        connection.unregister("event_users")


def _new_batches(connection, published: int) -> list[dict]:
    rows = connection.execute(
        """
        select batch_id, audience_key, strftime(evaluated_at, '%Y-%m-%dT%H:%M:%S.%fZ'), entered, exited, audience_size
        from raw.membership_batches where last_sequence > $after
        """,
        {"after": published},
    ).fetchall()
    names = ("batch_id", "audience_key", "evaluated_at", "entered", "exited", "audience_size")
    return [dict(zip(names, row, strict=True)) for row in rows]


def _delivery_id(event: MembershipEvent, trigger: WorkflowTrigger) -> str:
    return hashlib.sha256(f"{event.event_id}\x1f{trigger.workflow_key}".encode()).hexdigest()[:32]


def _deliveries_for(
    connection,
    store,
    store_connection,
    events: list[MembershipEvent],
    triggers,
    first_sequences,
    default_sink,
    now,
    report,
) -> list[dict]:
    deliveries = []
    stamp = now_text()
    for trigger in triggers.values():
        start = first_sequences.get(trigger.workflow_key)
        candidates = [
            event
            for event in events
            if event.audience_key == trigger.audience_key
            and event.event_type == trigger.on
            and not event.is_backfill
            and _after_trigger_start(event, start)
        ]
        if not candidates:
            continue
        if trigger.has_conditions:
            passing = matching_user_ids(
                connection, trigger.segments, sorted({e.user_id for e in candidates}), now
            )
            report.skipped_by_conditions += sum(e.user_id not in passing for e in candidates)
            candidates = [event for event in candidates if event.user_id in passing]
        candidates = _apply_frequency(store, store_connection, trigger, candidates, report)
        for event in candidates:
            delivery_id = _delivery_id(event, trigger)
            status = (
                "held"
                if event.batch_id and _is_held(store_connection, event.batch_id)
                else "pending"
            )
            report.held_deliveries += status == "held"
            deliveries.append(
                new_delivery(
                    delivery_id,
                    event_id=event.event_id,
                    workflow_key=trigger.workflow_key,
                    sink=trigger.sink or default_sink,
                    audience_key=event.audience_key,
                    user_id=event.user_id,
                    tenant=event.tenant,
                    payload=_json(trigger_payload(trigger.data, event)),
                    stamp=stamp,
                    status=status,
                    batch_id=event.batch_id,
                )
            )
    return deliveries


def _is_held(store_connection, batch_id: str) -> bool:
    status = store_connection.execute(
        sa.select(tables.held_batches.c.status).where(tables.held_batches.c.batch_id == batch_id)
    ).scalar()
    return status in (None, "held")


def _apply_frequency(
    store, store_connection, trigger: WorkflowTrigger, events: list[MembershipEvent], report
) -> list[MembershipEvent]:
    """Drop events for recipients a once-per-recipient trigger already fired for, and remember the rest.

    Runs inside the publishing transaction, so "fired" is recorded together with the delivery.
    """
    if trigger.trigger_frequency == "every_trigger":
        return events
    per_tenant = trigger.trigger_frequency == "once_per_recipient_per_tenant"
    recipients = tables.trigger_recipients
    fired = {
        (row.user_id, row.tenant_key): row.delivery_id
        for row in store_connection.execute(
            sa.select(
                recipients.c.user_id, recipients.c.tenant_key, recipients.c.delivery_id
            ).where(recipients.c.workflow_key == trigger.workflow_key)
        )
    }
    kept, rows = [], []
    for event in events:
        recipient = (event.user_id, tenant_key(event.tenant) if per_tenant else "")
        delivery_id = _delivery_id(event, trigger)
        if (
            recipient in fired and fired[recipient] != delivery_id
        ):  # the same delivery again is a re-publish
            report.skipped_by_frequency += 1
            continue
        fired[recipient] = delivery_id
        kept.append(event)
        rows.append(
            {
                "workflow_key": trigger.workflow_key,
                "user_id": recipient[0],
                "tenant_key": recipient[1],
                "delivery_id": delivery_id,
            }
        )
    store.insert_ignoring_duplicates(store_connection, recipients, rows)
    return kept


def _json(value: dict) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def release_batch(store: MembershipStore, batch_id: str) -> int:
    """A person's decision: send a held batch's deliveries. Returns how many were released."""
    return _decide(store, batch_id, "released", "pending")


def discard_batch(store: MembershipStore, batch_id: str) -> int:
    """A person's decision: never send a held batch's deliveries (the events stay recorded)."""
    return _decide(store, batch_id, "discarded", "discarded")


def _decide(store: MembershipStore, batch_id: str, batch_status: str, delivery_status: str) -> int:
    batches, deliveries = tables.held_batches, tables.deliveries
    with store.engine.begin() as connection:
        status = connection.execute(
            sa.select(batches.c.status).where(batches.c.batch_id == batch_id)
        ).scalar()
        if status is None:
            raise ValueError(f"no held batch {batch_id!r}")
        if status != "held":
            raise ValueError(f"batch {batch_id!r} was already {status}")
        connection.execute(
            batches.update()
            .where(batches.c.batch_id == batch_id)
            .values(status=batch_status, decided_at=now_text())
        )
        if delivery_status == "discarded":
            # A once-per-recipient trigger has not fired for a recipient whose delivery is never
            # sent: a later entry of theirs triggers it.
            recipients = tables.trigger_recipients
            connection.execute(
                recipients.delete().where(
                    recipients.c.delivery_id.in_(
                        sa.select(deliveries.c.delivery_id).where(
                            deliveries.c.batch_id == batch_id, deliveries.c.status == "held"
                        )
                    )
                )
            )
        result = connection.execute(
            deliveries.update()
            .where(deliveries.c.batch_id == batch_id, deliveries.c.status == "held")
            .values(status=delivery_status, next_attempt_at=now_text())
        )
        if delivery_status == "pending" and result.rowcount:
            tables.deliveries_queued(connection)
        return result.rowcount
