"""Entry backfill: send the `entered` triggers that a new audience's first members never got.

A new audience's first members are recorded as a backfill and trigger nothing (Knock's rule, the
reference's section 6): an event audience computed from months of history would otherwise trigger
every past buyer at once. `audiences backfill-entries KEY` is the explicit way to send them: for
each member whose current entry is such a backfill entry, each `entered` trigger of the audience
gets the delivery that entry would have had, under the same deterministic id, so it is sent once
however often the command runs. The trigger's conditions and frequency apply as for any entry.
With `dry_run`, the same work happens in a store transaction that is rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb

from audiences.membership.events import MembershipEvent
from audiences.store import database as tables
from audiences.store.database import MembershipStore
from audiences.warehouse.queries import table_exists
from audiences.workflows.publish import (
    OUTBOX_COLUMNS,
    PublishReport,
    _deliveries_for,
    outbox_select_list,
)


@dataclass(frozen=True)
class EntryBackfill:
    """What an entry backfill sends: the deliveries, and how many of them are new (not sent
    by an earlier backfill)."""

    audience_key: str
    workflows: list[str]
    members: int
    deliveries: list[dict]
    new_deliveries: int
    skipped_by_conditions: int
    skipped_by_frequency: int


def backfilled_entries(
    connection: duckdb.DuckDBPyConnection, audience_key: str
) -> list[MembershipEvent]:
    """The audience's current members whose entry was recorded as a backfill, as membership
    events (from the warehouse's outbox: a backfill entry never reaches the store's events)."""
    if not table_exists(connection, "raw.membership_outbox"):
        raise ValueError("no evaluation yet; run `audiences run` first")
    rows = connection.execute(
        f"""
        select {outbox_select_list("outbox")}
        from raw.membership_outbox as outbox
        join raw.membership_intervals as open_entry
            on open_entry.audience_key = outbox.audience_key
            and open_entry.user_id = outbox.user_id
            and open_entry.tenant is not distinct from outbox.tenant
            and open_entry.entry_number = outbox.entry_number
            and open_entry.exited_at is null
        where outbox.audience_key = $key and outbox.event_type = 'entered' and outbox.is_backfill
        order by outbox.sequence
        """,
        {"key": audience_key},
    ).fetchall()
    # Sent now as the entries they are: no longer a suppressed backfill.
    return [
        MembershipEvent.from_row(
            {**dict(zip(OUTBOX_COLUMNS, row, strict=True)), "is_backfill": False}
        )
        for row in rows
    ]


def backfill_entries(
    connection: duckdb.DuckDBPyConnection,
    store: MembershipStore,
    triggers: dict,
    default_sink: str,
    audience_key: str,
    now: datetime,
    dry_run: bool = False,
) -> EntryBackfill:
    """Queue (or, with `dry_run`, only compute) the entry triggers of the audience's backfilled
    members; see the module docstring. Raises ValueError when the audience has no `entered`
    trigger."""
    entered = {
        key: trigger
        for key, trigger in triggers.items()
        if trigger.audience_key == audience_key and trigger.on == "entered"
    }
    if not entered:
        raise ValueError(
            f"audience {audience_key!r} has no workflow trigger on `entered`: nothing to backfill"
        )
    events = backfilled_entries(connection, audience_key)
    report = PublishReport()
    with store.engine.connect() as store_connection:
        transaction = store_connection.begin()
        deliveries = _deliveries_for(
            connection, store, store_connection, events, entered, {}, default_sink, now, report
        )
        new = store.insert_ignoring_duplicates(store_connection, tables.deliveries, deliveries)
        if dry_run:
            transaction.rollback()
        else:
            transaction.commit()
    return EntryBackfill(
        audience_key,
        sorted(entered),
        len(events),
        deliveries,
        new,
        report.skipped_by_conditions,
        report.skipped_by_frequency,
    )
