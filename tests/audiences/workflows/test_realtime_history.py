"""Real time's events join the pipeline's membership history (`import_realtime_events`): each
interval they open names the definition version real time evaluated, as the diff's intervals do,
so `members --at` and `explain` can name the version in force."""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import sqlalchemy as sa

from audiences.store import database as tables
from audiences.warehouse.schema import ensure_user_tables
from audiences.workflows.realtime import event_id, import_realtime_events

AT = "2026-11-01T10:00:00.000000Z"


def test_an_interval_opened_by_a_realtime_event_names_its_definition_version(tmp_path, store):
    warehouse = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ensure_user_tables(warehouse)
    warehouse.execute(
        "insert into raw.users values (1, 'ada', '{\"plan\": \"pro\"}', 'crm', $t, $t, null)",
        {"t": datetime(2026, 11, 1, 9, tzinfo=UTC)},
    )
    entered = event_id("pro-users", "ada", None, "entered", 1)
    with store.engine.begin() as connection:
        patch = connection.execute(
            tables.user_patches.insert().values(
                user_id="ada", patch='{"plan": "pro"}', received_at=AT, loaded=True
            )
        ).inserted_primary_key[0]
        # What real time's `record` writes: the event (with the version it evaluated) and its row.
        connection.execute(
            tables.membership_events.insert().values(
                event_id=entered,
                audience_key="pro-users",
                user_id="ada",
                event_type="entered",
                occurred_at=AT,
                audience_version="5f3a9c1e2b7d",
                entry_number=1,
                is_backfill=False,
                published_at=AT,
                source="realtime",
            )
        )
        connection.execute(
            tables.realtime_events.insert().values(
                event_id=entered,
                audience_key="pro-users",
                user_id="ada",
                event_type="entered",
                entry_number=1,
                occurred_at=AT,
                patch_id=patch,
            )
        )
    assert import_realtime_events(warehouse, store, datetime(2026, 11, 1, 10, 15, tzinfo=UTC)) == 1
    intervals = warehouse.execute(
        "select audience_key, user_id, entry_number, exited_at, audience_version "
        "from raw.membership_intervals"
    ).fetchall()
    assert intervals == [("pro-users", "ada", 1, None, "5f3a9c1e2b7d")]
    imported = store.scalar(sa.select(tables.realtime_events.c.imported_at))
    assert imported is not None
    warehouse.close()
