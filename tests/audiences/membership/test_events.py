"""`MembershipEvent` is the one shape of an event: the outbox's columns, the store's
`membership_events` columns and the dataclass's fields are the same names."""

from __future__ import annotations

import duckdb

from audiences.membership.events import FIELDS, MembershipEvent
from audiences.store import database as tables
from audiences.warehouse.schema import ensure_membership_tables
from audiences.workflows.publish import OUTBOX_COLUMNS


def test_the_outbox_columns_are_the_event_fields():
    connection = duckdb.connect()
    ensure_membership_tables(connection)
    columns = [row[0] for row in connection.execute("describe raw.membership_outbox").fetchall()]
    assert columns == list(OUTBOX_COLUMNS)
    assert set(columns) == set(FIELDS)


def test_an_event_is_a_row_of_the_store_and_back():
    event = MembershipEvent(
        event_id="e1",
        audience_key="vips",
        user_id="ada",
        tenant="acme",
        event_type="entered",
        occurred_at="2026-11-27T00:00:00.000000Z",
        entry_number=2,
        sequence=7,
        audience_version="v1",
        is_backfill=False,
        batch_id="b1",
    )
    row = event.as_row()
    assert set(row) <= {column.name for column in tables.membership_events.columns}
    assert MembershipEvent.from_row({**row, "published_at": "x", "source": "static"}) == event
