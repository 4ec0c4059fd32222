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


def _realtime_event(connection, patch, audience, user, event_type, entry, at, version="v1"):
    """What real time's `record` writes for one event: the event (with the version it
    evaluated) and its row."""
    identifier = event_id(audience, user, None, event_type, entry)
    connection.execute(
        tables.membership_events.insert().values(
            event_id=identifier,
            audience_key=audience,
            user_id=user,
            event_type=event_type,
            occurred_at=at,
            audience_version=version,
            entry_number=entry,
            is_backfill=False,
            published_at=at,
            source="realtime",
        )
    )
    connection.execute(
        tables.realtime_events.insert().values(
            event_id=identifier,
            audience_key=audience,
            user_id=user,
            event_type=event_type,
            entry_number=entry,
            occurred_at=at,
            patch_id=patch,
        )
    )


def test_an_interval_opened_by_a_realtime_event_names_its_definition_version(tmp_path, store):
    warehouse = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ensure_user_tables(warehouse)
    warehouse.execute(
        "insert into raw.users values (1, 'ada', '{\"plan\": \"pro\"}', 'crm', $t, $t, null)",
        {"t": datetime(2026, 11, 1, 9, tzinfo=UTC)},
    )
    with store.engine.begin() as connection:
        patch = connection.execute(
            tables.user_patches.insert().values(
                user_id="ada", patch='{"plan": "pro"}', received_at=AT, loaded=True
            )
        ).inserted_primary_key[0]
        _realtime_event(connection, patch, "pro-users", "ada", "entered", 1, AT, "5f3a9c1e2b7d")
    assert import_realtime_events(warehouse, store, datetime(2026, 11, 1, 10, 15, tzinfo=UTC)) == 1
    intervals = warehouse.execute(
        "select audience_key, user_id, entry_number, exited_at, audience_version "
        "from raw.membership_intervals"
    ).fetchall()
    assert intervals == [("pro-users", "ada", 1, None, "5f3a9c1e2b7d")]
    imported = store.scalar(sa.select(tables.realtime_events.c.imported_at))
    assert imported is not None
    warehouse.close()


def test_a_users_events_apply_in_order_and_touch_no_other_interval(tmp_path, store):
    """Several events of one user and audience in one import apply one after another, onto the
    intervals the pipeline had (one closed, one reopened, an entry already open left alone), and
    no other membership moves: another user's, another audience's, the same user's with a
    tenant. An event of a user the warehouse does not hold is remembered and changes nothing."""
    warehouse = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ensure_user_tables(warehouse)
    loaded = datetime(2026, 11, 1, 9, tzinfo=UTC)
    for key, user in ((1, "ada"), (2, "bob")):
        warehouse.execute(
            "insert into raw.users values ($k, $u, '{}', 'crm', $t, $t, null)",
            {"k": key, "u": user, "t": loaded},
        )
    import_realtime_events(warehouse, store, loaded)  # nothing yet: makes the history's tables
    before = datetime(2026, 11, 1, 8, tzinfo=UTC)
    pipeline = [  # what the pipeline's diffs left
        ("pro-users", 1, "ada", None, 1, before, None, "v0"),
        ("pro-users", 2, "bob", None, 1, before, None, "v0"),
        ("pro-users", 1, "ada", "acme", 1, before, None, "v0"),
        ("trial-users", 1, "ada", None, 1, before, None, "v0"),
    ]
    for row in pipeline:
        warehouse.execute(
            "insert into raw.membership_intervals values (?, ?, ?, ?, ?, ?, ?, ?)", row
        )
    times = [f"2026-11-01T10:0{minute}:00.000000Z" for minute in range(5)]
    with store.engine.begin() as connection:
        patch = connection.execute(
            tables.user_patches.insert().values(
                user_id="ada", patch="{}", received_at=times[0], loaded=True
            )
        ).inserted_primary_key[0]
        for event_type, entry, at in (
            ("exited", 1, times[0]),
            ("entered", 2, times[1]),
            ("exited", 2, times[2]),
            ("entered", 3, times[3]),
        ):
            _realtime_event(connection, patch, "pro-users", "ada", event_type, entry, at)
        # an entry the pipeline already opened: left as it is
        _realtime_event(connection, patch, "trial-users", "ada", "entered", 1, times[0])
        _realtime_event(connection, patch, "pro-users", "nobody", "entered", 1, times[4])
    evaluated_at = datetime(2026, 11, 1, 10, 15, tzinfo=UTC)
    assert import_realtime_events(warehouse, store, evaluated_at) == 6

    def at(text):
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    intervals = warehouse.execute(
        "select audience_key, user_id, tenant, entry_number, entered_at, exited_at, "
        "audience_version from raw.membership_intervals order by all"
    ).fetchall()
    assert intervals == sorted(
        [
            ("pro-users", "ada", "acme", 1, before, None, "v0"),
            ("pro-users", "ada", None, 1, before, at(times[0]), "v0"),
            ("pro-users", "ada", None, 2, at(times[1]), at(times[2]), "v1"),
            ("pro-users", "ada", None, 3, at(times[3]), None, "v1"),
            ("pro-users", "bob", None, 1, before, None, "v0"),
            ("trial-users", "ada", None, 1, before, None, "v0"),
        ],
        key=lambda row: tuple((value is None, value) for value in row),
    )
    assert warehouse.execute(
        "select user_id, event_type, entry_number from raw.realtime_imports order by all"
    ).fetchall() == [
        ("ada", "entered", 1),
        ("ada", "entered", 2),
        ("ada", "entered", 3),
        ("ada", "exited", 1),
        ("ada", "exited", 2),
        ("nobody", "entered", 1),
    ]
    # Imported once: a second pass finds nothing new and changes nothing.
    assert import_realtime_events(warehouse, store, evaluated_at) == 0
    assert warehouse.execute("select count(*) from raw.membership_intervals").fetchone() == (6,)
    warehouse.close()
