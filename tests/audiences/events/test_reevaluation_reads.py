"""What re-evaluating a few users reads of `raw.events`: only their events' rows, whatever the size
of the log (issue 24, speed). Checked structurally, not by timing: DuckDB's profile of the very
statement `audience_members` runs (`events_of_users`, as generated) says how many rows the scan of
`raw.events` handed on. Also: the users' numbers that make this possible are given at load, once
per user id, and a log written before they existed gains them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import duckdb

from audiences.dbt.models import events_of_users
from audiences.events.loading import EventSource, load_event_source
from audiences.warehouse.schema import ensure_event_tables, ensure_user_tables

AT = datetime(2026, 11, 1, tzinfo=UTC)
USERS = 4_000
EVENTS = 300_000  # three row groups of DuckDB's 122,880 rows and more


def load_log(tmp_path, connection) -> None:
    """`EVENTS` events of `USERS` users, in time order (as a log arrives), through the loader."""
    folder = tmp_path / "events"
    folder.mkdir()
    connection.execute(
        f"""
        copy (
            select
                'm' || range as messageId,
                'u' || (hash(range) % {USERS}) as userId,
                ['Order Completed', 'Page Viewed'][1 + cast(range % 2 as bigint)] as event,
                timestamptz '2026-08-01 00:00:00+00' + to_seconds(range * 20) as "timestamp",
                {{'total': range % 500}} as properties
            from range({EVENTS})
        ) to '{folder / "log.parquet"}' (format parquet)
        """
    )
    load_event_source(connection, EventSource("log", "parquet", folder), AT)


def scanned_rows(connection, sql: str) -> int:
    """Rows the scan of raw.events handed on when `sql` ran (DuckDB's profile, as JSON)."""
    plan = json.loads(connection.execute("explain (analyze, format json) " + sql).fetchall()[0][1])
    found = []

    def walk(node):
        if node.get("type") == "TABLE_SCAN" and str(
            node.get("extra_info", {}).get("Table", "")
        ).endswith("raw.events"):
            found.append(node["intermediate_rows"])
        for child in node.get("children", []):
            walk(child)

    for node in plan["operator"]:
        walk(node)
    assert len(found) == 1, plan
    return found[0]


def test_reevaluating_a_few_users_reads_only_their_events_rows(tmp_path):
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    connection.execute("set threads = 2")
    ensure_user_tables(connection)
    load_log(tmp_path, connection)
    connection.execute(
        "create temp table listed as select 'u' || range * 97 as user_id from range(20)"
    )
    theirs = connection.execute(
        "select count(*) from raw.events where user_id in (select user_id from listed)"
    ).fetchall()[0][0]
    assert 0 < theirs < EVENTS / 100
    sql = events_of_users("listed", events="raw.events", event_users="raw.event_users")

    # The statement selects exactly those users' events...
    assert connection.execute(f"select count(*), count(distinct user_id) from ({sql})").fetchall()[
        0
    ] == (theirs, 20)
    # ... and the scan hands on only their rows (a join filter may let a few others through),
    # not every event for a join to drop, which is what made re-evaluation cost as much as a
    # scan of the whole log.
    assert scanned_rows(connection, sql) <= 2 * theirs


def test_user_numbers_are_given_once_per_user_and_a_log_without_them_gains_them(tmp_path):
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    # A raw.events as written before user numbers existed.
    connection.execute("create schema raw")
    connection.execute(
        """
        create table raw.events (
            event_seq bigint not null, message_id varchar not null, user_id varchar not null,
            event varchar not null, "timestamp" timestamptz not null, properties json not null,
            source_name varchar not null, loaded_at timestamptz not null
        )
        """
    )
    connection.execute(
        "insert into raw.events values "
        "(1, 'a', 'ann', 'X', '2026-10-01', '{}', 's', '2026-10-01'), "
        "(2, 'b', 'bob', 'X', '2026-10-01', '{}', 's', '2026-10-01'), "
        "(3, 'c', 'ann', 'Y', '2026-10-02', '{}', 's', '2026-10-02')"
    )
    ensure_event_tables(connection)
    ensure_event_tables(connection)  # idempotent
    numbers = dict(
        connection.execute("select user_id, user_number from raw.event_users").fetchall()
    )
    assert sorted(numbers) == ["ann", "bob"] and len(set(numbers.values())) == 2
    assert (
        connection.execute(
            "select count(*) from raw.events join raw.event_users using (user_id) "
            "where events.user_number = event_users.user_number"
        ).fetchall()[0][0]
        == 3
    )

    # A later load numbers only the user ids it has not seen, and stamps its events with them.
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "a.jsonl").write_text(
        "".join(
            json.dumps(
                {"userId": user, "event": "X", "timestamp": "2026-10-03T00:00:00Z", "messageId": m}
            )
            + "\n"
            for user, m in [("bob", "d"), ("cat", "e"), ("cat", "f")]
        )
    )
    load_event_source(connection, EventSource("more", "jsonl", folder), AT)
    after = dict(connection.execute("select user_id, user_number from raw.event_users").fetchall())
    assert {key: after[key] for key in numbers} == numbers
    assert sorted(after) == ["ann", "bob", "cat"] and len(set(after.values())) == 3
    assert (
        connection.execute(
            "select count(*) from raw.events join raw.event_users using (user_id) "
            "where events.user_number = event_users.user_number"
        ).fetchall()[0][0]
        == 6
    )
