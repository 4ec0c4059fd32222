"""What an incremental build of `int_event_state` reads of the state when a few users have new
events: only their rows, whatever the size of the state (issue 24, speed). Checked structurally,
from DuckDB's profile of the compiler's statement: the scan of the state by the new events'
(key, user) pairs hands on about those rows. A semi join on the pairs built its hash table on the
whole state instead (every row, with its kept times: 4 of 5 CPU s at 1M users)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import duckdb
from sqlglot import exp

from audiences.conditions.compiler import (
    CompileContext,
    Condition,
    event_state,
    event_state_sql,
    timestamp_literal,
)
from audiences.events.loading import EventSource, load_event_source
from audiences.warehouse.schema import ensure_user_tables

AT = datetime(2026, 11, 1, tzinfo=UTC)
USERS = 20_000
EVENTS = 200_000


def conditions() -> list[Condition]:
    """Event conditions of several shapes (counts in windows, last performed), two names."""
    found = []
    for index, name in enumerate(["Order Completed", "Page Viewed"] * 4):
        argument = {"event": name, "count": {"at_least": 1 + index % 3}, "within": "30 days"}
        if index % 4 == 3:
            argument = {"event": name, "time": f"{index} days ago"}
            operator = "last_performed_before"
        else:
            argument["within"] = f"{7 * (index + 1)} days"
            operator = "performed"
        found.append(
            Condition.from_json(
                {"property": "recipient", "operator": operator, "argument": argument}
            )
        )
    return [c for c in found if event_state(c) is not None]


def context() -> CompileContext:
    return CompileContext(
        events=exp.to_table("raw.events"),
        attribute=lambda attribute: exp.column(attribute.column_name, quoted=True),
        audience_members=lambda key: exp.select("user_key").from_("members"),
        evaluation_time=timestamp_literal(AT),
        user_key=exp.column("user_key", table="users"),
        user_id=exp.column("user_id", table="users"),
    )


def write_log(folder, name: str, count: int, offset: int) -> None:
    with duckdb.connect() as connection:  # not the module's shared one, left to other tests
        connection.execute(
            f"""
            copy (
                select
                    'm' || (range + {offset}) as messageId,
                    'u' || (hash(range + {offset}) % {USERS}) as userId,
                    ['Order Completed', 'Page Viewed'][1 + cast(range % 2 as bigint)] as event,
                    timestamptz '2026-08-05 00:00:00+00' + to_seconds((range + {offset}) * 30)
                        as "timestamp",
                    {{'total': range % 500}} as properties
                from range({count})
            ) to '{folder / name}' (format parquet)
            """
        )


def state_hash_builds(connection, sql: str) -> list[tuple[int, int]]:
    """For each hash join over a scan of `state` when `sql` ran (DuckDB's profile, as JSON):
    the rows its build side (the hash table) held, and the rows the scan handed on."""
    plan = json.loads(connection.execute("explain (analyze, format json) " + sql).fetchall()[0][1])
    found = []

    def scans(node) -> list[int]:
        own = (
            [node["intermediate_rows"]]
            if node.get("type") == "TABLE_SCAN"
            and str(node.get("extra_info", {}).get("Table", "")).endswith(".state")
            else []
        )
        return own + [rows for child in node.get("children", []) for rows in scans(child)]

    def walk(node):
        children = node.get("children", [])
        if node.get("type") == "HASH_JOIN" and len(children) == 2 and scans(node):
            found.append((children[1]["intermediate_rows"], max(scans(node))))
        for child in children:
            walk(child)

    for node in plan["operator"]:
        walk(node)
    return found


def test_new_events_of_a_few_users_read_only_their_state_rows(tmp_path):
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    connection.execute("set threads = 2")
    ensure_user_tables(connection)
    folder = tmp_path / "events"
    folder.mkdir()
    source = EventSource("log", "parquet", folder)
    write_log(folder, "log.parquet", EVENTS, 0)
    load_event_source(connection, source, AT)
    through = connection.execute("select max(event_seq) from raw.events").fetchone()[0]
    connection.execute(
        "create table state as "
        + event_state_sql(conditions(), context(), exp.Literal.number(through))
    )
    total = connection.execute("select count(*) from state").fetchone()[0]
    assert total > 50_000

    # 20 new events, of at most 20 users.
    write_log(folder, "new.parquet", 20, EVENTS)
    load_event_source(connection, source, AT + timedelta(minutes=1))
    now = connection.execute("select max(event_seq) from raw.events").fetchone()[0]
    sql = event_state_sql(
        conditions(),
        context(),
        exp.Literal.number(now),
        previous=exp.to_table("state"),
        markers=lambda key: (exp.Literal.number(through), exp.true()),
    )
    theirs = connection.execute(
        f"select count(*) from state where user_number in "
        f"(select user_number from raw.events where event_seq > {through})"
    ).fetchone()[0]
    assert 0 < theirs < 1_000
    builds = state_hash_builds(connection, sql)
    # The join of the state with the new events' pairs hashes the pairs (a few rows), never the
    # state: the state's rows are probed against it.
    assert builds, "no hash join over the state"
    assert all(build < total / 10 for build, _ in builds), (builds, total)
    # A row both due and with new events comes once without a window over the rows found, and
    # the keys the joins hash are short enough for DuckDB to keep inline (12 bytes at most).
    assert "WINDOW" not in operators(connection, sql)
    assert connection.execute("select max(length(state_key)) from state").fetchone()[0] <= 12


def operators(connection, sql: str) -> set[str]:
    """The operator types of `sql`'s plan (DuckDB's profile, as JSON)."""
    plan = json.loads(connection.execute("explain (analyze, format json) " + sql).fetchall()[0][1])
    found = set()

    def walk(node):
        found.add(node.get("type"))
        for child in node.get("children", []):
            walk(child)

    for node in plan["operator"]:
        walk(node)
    return found


def event_scans(connection, sql: str) -> int:
    """The rows the scans of `raw.events` handed on when `sql` ran (DuckDB's profile)."""
    plan = json.loads(connection.execute("explain (analyze, format json) " + sql).fetchall()[0][1])

    def walk(node) -> int:
        own = (
            node["intermediate_rows"]
            if node.get("type") == "TABLE_SCAN"
            and str(node.get("extra_info", {}).get("Table", "")).endswith("events")
            else 0
        )
        return own + sum(walk(child) for child in node.get("children", []))

    return sum(walk(node) for node in plan["operator"])


def test_the_first_build_reads_and_keeps_only_the_events_inside_a_window(tmp_path):
    """A condition over the last 7 days needs only the events after its start (the older ones can
    never count again): the first build's scan of the log hands on those alone, and a user with
    none of them has no row (an empty row means no event, as no row does)."""
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    connection.execute("set threads = 2")
    ensure_user_tables(connection)
    folder = tmp_path / "events"
    folder.mkdir()
    write_log(folder, "log.parquet", EVENTS, 0)
    load_event_source(connection, EventSource("log", "parquet", folder), AT)
    # The log spans 2026-08-05 to 2026-10-14; "now" two days before its end.
    now = datetime(2026, 10, 12, tzinfo=UTC)
    week = Condition.from_json(
        {
            "property": "recipient",
            "operator": "performed",
            "argument": {"event": "Order Completed", "count": {"at_least": 2}, "within": "7 days"},
        }
    )
    through = connection.execute("select max(event_seq) from raw.events").fetchone()[0]
    sql = event_state_sql(
        [week],
        replace(context(), evaluation_time=timestamp_literal(now)),
        exp.Literal.number(through),
    )
    after = connection.execute(
        "select count(*) from raw.events where event = 'Order Completed' and \"timestamp\" > $start",
        {"start": now - timedelta(days=7)},
    ).fetchone()[0]
    assert 0 < after < EVENTS / 2 / 5
    assert event_scans(connection, sql) <= after
    connection.execute("create table state as " + sql)
    empty = connection.execute(
        "select count(*) from state where user_number <> -1 and len(times) = 0"
    ).fetchone()[0]
    assert empty == 0
