"""Event audiences through the real pipeline (`audiences init`, `audiences run`: Dagster, dbt,
DuckDB, the membership diff): new events move users in, a window that lapses moves them out with no
new event, and the members always equal a full evaluation by the reference evaluator."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from audiences import cli
from audiences.conditions.reference import evaluate_audience

pytestmark = pytest.mark.slow

T0 = datetime(2026, 11, 1, tzinfo=UTC)
DAY = timedelta(days=1)

AUDIENCES = {
    "frequent-buyers": [
        {
            "property": "recipient",
            "operator": "performed",
            "argument": {"event": "Order Completed", "count": {"at_least": 2}, "within": "7 days"},
        }
    ],
    "signed-up-no-order": [
        {
            "property": "recipient",
            "operator": "last_performed_before",
            "argument": {"event": "Signed Up", "time": "1 day ago"},
        },
        {
            "property": "recipient",
            "operator": "performed",
            "argument": {"event": "Order Completed", "count": {"at_most": 0}, "within": "7 days"},
        },
    ],
    "pro-plan": [{"property": "plan", "operator": "equal_to", "argument": "pro"}],
}


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def track(user: str, name: str, at: datetime, message_id: str) -> dict:
    return {
        "userId": user,
        "event": name,
        "timestamp": stamp(at),
        "messageId": message_id,
        "properties": {},
    }


@pytest.fixture
def project(tmp_path, monkeypatch):
    folder = tmp_path / "shop"
    for key, conditions in AUDIENCES.items():
        (folder / "audiences" / key).mkdir(parents=True)
        (folder / "audiences" / key / "audience.json").write_text(
            json.dumps({"name": key, "type": "dynamic", "segments": [{"conditions": conditions}]})
        )
    (folder / "users.csv").write_text("id,plan\nann,pro\nbob,free\ncat,free\n")
    (folder / "events").mkdir()
    (folder / "sources.yml").write_text(
        "sources:\n  - {name: crm, path: users.csv, mode: snapshot}\n"
        "events:\n  - {name: segment, path: events, format: jsonl}\n"
    )
    (folder / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(folder)
    assert cli.main(["--definitions", "audiences", "init"]) == 0
    return folder


def run(at: datetime) -> None:
    flags = ["--definitions", "audiences", "--sources", "sources.yml", "--sinks", "sinks.yml"]
    assert cli.main([*flags, "--evaluation-time", stamp(at), "run"]) == 0


def members(folder) -> dict[str, set[str]]:
    with duckdb.connect(str(folder / "data" / "warehouse.duckdb"), read_only=True) as connection:
        rows = connection.execute(
            "select audience_key, user_id from main.audience_members join raw.users using (user_key)"
        ).fetchall()
    found: dict[str, set[str]] = {key: set() for key in AUDIENCES}
    for key, user in rows:
        found[key].add(user)
    return found


def expected(events: list[dict], now: datetime) -> dict[str, set[str]]:
    users = [
        {"id": "ann", "plan": "pro"},
        {"id": "bob", "plan": "free"},
        {"id": "cat", "plan": "free"},
    ]
    return {
        key: {
            user["id"]
            for user in users
            if evaluate_audience(
                {"segments": [{"conditions": conditions}]}, user, now=now, events=events
            )
        }
        for key, conditions in AUDIENCES.items()
    }


def outbox(folder) -> list[tuple]:
    with duckdb.connect(str(folder / "data" / "warehouse.duckdb"), read_only=True) as connection:
        return connection.execute(
            "select audience_key, user_id, event_type, occurred_at, is_backfill "
            "from raw.membership_outbox order by sequence"
        ).fetchall()


def write_events(folder, name: str, events: list[dict]) -> None:
    (folder / "events" / name).write_text("".join(json.dumps(e) + "\n" for e in events))


def test_new_events_move_users_in_and_a_lapsed_window_moves_them_out(project):
    history = [
        track("ann", "Signed Up", T0 - 20 * DAY, "s-ann"),
        track("bob", "Signed Up", T0 - 3 * DAY, "s-bob"),
        track("cat", "Signed Up", T0 - 2 * DAY, "s-cat"),
        track("ann", "Order Completed", T0 - 5 * DAY, "o1"),
        track("ann", "Order Completed", T0 - 2 * DAY, "o2"),
        track("ann", "Order Completed", T0 - 2 * DAY, "o2"),  # a duplicate: counts once
        track("bob", "Order Completed", T0 - 1 * DAY, "o3"),
        track("dan", "Order Completed", T0 - 1 * DAY, "o4"),  # nobody loaded dan
        {"userId": "cat", "event": "Order Completed", "timestamp": "soon", "messageId": "bad"},
    ]
    write_events(project, "day-0.jsonl", history)
    run(T0)
    assert members(project) == expected(history, T0)
    assert members(project)["frequent-buyers"] == {"ann"}
    assert members(project)["signed-up-no-order"] == {"cat"}
    # A new audience's first members trigger nothing (no backfill).
    assert all(row[4] for row in outbox(project))

    # New events: bob orders again, and becomes a frequent buyer; cat orders and leaves the
    # "no order" audience.
    later = [
        track("bob", "Order Completed", T0 + DAY / 2, "o5"),
        track("cat", "Order Completed", T0 + DAY / 2, "o6"),
    ]
    write_events(project, "day-1.jsonl", later)
    run(T0 + DAY)
    assert members(project) == expected(history + later, T0 + DAY)
    new = [row[:3] for row in outbox(project) if not row[4]]
    assert sorted(new) == [
        ("frequent-buyers", "bob", "entered"),
        ("signed-up-no-order", "cat", "exited"),
    ]

    # No new event, time passes: ann's order of T0 - 5 days leaves the window at T0 + 2 days, so
    # she exits at the first evaluation after that, with no new event.
    lapsed = T0 + 2 * DAY + timedelta(minutes=1)
    run(lapsed)
    assert members(project) == expected(history + later, lapsed)
    exits = [row for row in outbox(project) if row[2] == "exited" and row[0] == "frequent-buyers"]
    assert [(row[1], row[3]) for row in exits] == [("ann", lapsed)]
    # Incrementally: the event audiences were re-evaluated per user, and only for ann, whose order
    # of T0 - 5 days is the one event that "now" moved past the end of a window.
    with duckdb.connect(str(project / "data" / "warehouse.duckdb"), read_only=True) as connection:
        assert connection.execute(
            "select user_id, changed from main.int_users_to_reevaluate join raw.users using (user_key)"
        ).fetchall() == [("ann", False)]
        hashes = dict(
            connection.execute(
                "select audience_key, audience_hash from main.audience_members__state"
            ).fetchall()
        )
    assert hashes["frequent-buyers"] and hashes["signed-up-no-order"]
    # ... and then the rest lapse too.
    run(T0 + 9 * DAY)
    assert members(project) == expected(history + later, T0 + 9 * DAY)
    assert members(project)["frequent-buyers"] == set()

    # Evaluated back in time (`--allow-earlier`): the event state is recomputed from every event,
    # and dbt replaces only the (condition, user) pairs it writes. At T0 + 8 days no order is in
    # the window: the rows that the T0 + 9 days run rewrote (their orders had left it) get no new
    # row and stay, yet the members are the reference's; back to T0 + 1 day, every order counts.
    for back in (T0 + 8 * DAY, T0 + DAY):
        flags = ["--definitions", "audiences", "--sources", "sources.yml", "--sinks", "sinks.yml"]
        assert cli.main([*flags, "--evaluation-time", stamp(back), "run", "--allow-earlier"]) == 0
        assert members(project) == expected(history + later, back), back
        if back == T0 + 8 * DAY:
            warehouse = str(project / "data" / "warehouse.duckdb")
            with duckdb.connect(warehouse, read_only=True) as connection:
                left = connection.execute(
                    "select count(*) from main.int_event_state "
                    "where user_number <> -1 and evaluated_at > $back",
                    {"back": back},
                ).fetchone()[0]
            assert left > 0


def test_incremental_runs_over_random_streams_with_late_and_duplicate_events_match_a_full_evaluation(
    project,
):
    """Random event streams, loaded in several batches: late events (stamped before the last
    evaluation), repeated message ids across batches, events of users not loaded, events stamped in
    the future; at every run the members equal the reference evaluator's over every event so far."""
    import random

    chance = random.Random(24)
    names = ["Order Completed", "Signed Up", "Page Viewed"]
    now, loaded, ids = T0, [], []
    for step in range(4):
        batch = []
        for _ in range(chance.randint(5, 14)):
            message_id = chance.choice(ids) if ids and chance.random() < 0.2 else f"m{len(ids)}"
            ids.append(message_id)
            offset = timedelta(hours=chance.randint(-10 * 24, 2 * 24))  # late, recent and future
            batch.append(
                track(
                    chance.choice(["ann", "bob", "cat", "dan"]),
                    chance.choice(names),
                    now + offset,
                    message_id,
                )
            )
        loaded += batch
        write_events(project, f"step-{step}.jsonl", batch)
        run(now)
        assert members(project) == expected(loaded, now), f"step {step} at {now}"
        now += timedelta(hours=chance.randint(6, 4 * 24))


def test_an_event_mapping_naming_a_missing_column_is_one_line_and_loads_nothing(project, capsys):
    import duckdb as database

    with database.connect(str(project / "segment.duckdb")) as origin:
        origin.execute("create table tracks (id varchar, user_id varchar, event varchar)")
    (project / "sources.yml").write_text(
        "sources:\n  - {name: crm, path: users.csv, mode: snapshot}\n"
        "events:\n  - name: warehouse_tracks\n    path: segment.duckdb\n    table: tracks\n"
        "    columns: {message_id: id, user_id: user_id, event: event, timestamp: sent_at}\n"
    )
    flags = ["--definitions", "audiences", "--sources", "sources.yml", "--sinks", "sinks.yml"]
    assert cli.main([*flags, "--evaluation-time", stamp(T0), "run"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: step events failed: event source 'warehouse_tracks': no column 'sent_at' "
        "(it has id, user_id, event)"
    ]
    with duckdb.connect(str(project / "data" / "warehouse.duckdb"), read_only=True) as connection:
        assert connection.execute("select count(*) from raw.events").fetchone()[0] == 0


def test_a_state_table_of_the_layout_before_verdicts_is_upgraded_in_place(project):
    """A workspace whose `int_event_state` was built before the state kept its verdicts (no
    `holds`, no `changed_at`: the layout of 40ed7f0) is run by this code: dbt appends the two
    columns (`on_schema_change='append_new_columns'`), a kept row without `holds` counts as
    changed when it is rewritten and is tested over its times when it is read, so the members
    equal a full evaluation, and the only events sent are the real changes."""
    history = [
        track("ann", "Order Completed", T0 - 5 * DAY, "o1"),
        track("ann", "Order Completed", T0 - 2 * DAY, "o2"),
        track("bob", "Order Completed", T0 - 1 * DAY, "o3"),
        track("bob", "Signed Up", T0 - 3 * DAY, "s-bob"),
        track("cat", "Signed Up", T0 - 2 * DAY, "s-cat"),
    ]
    write_events(project, "day-0.jsonl", history)
    run(T0)
    assert members(project) == expected(history, T0)
    database = project / "data" / "warehouse.duckdb"
    with duckdb.connect(str(database)) as connection:
        connection.execute("alter table main.int_event_state drop column holds")
        connection.execute("alter table main.int_event_state drop column changed_at")
    before = len(outbox(project))

    # bob orders again (enters frequent-buyers); cat orders (leaves signed-up-no-order).
    later = [
        track("bob", "Order Completed", T0 + DAY / 2, "o5"),
        track("cat", "Order Completed", T0 + DAY / 2, "o6"),
    ]
    write_events(project, "day-1.jsonl", later)
    run(T0 + DAY)
    with duckdb.connect(str(database), read_only=True) as connection:
        columns = {row[0] for row in connection.execute("describe main.int_event_state").fetchall()}
        kept = connection.execute(
            "select count(*) from main.int_event_state where user_number <> -1 and holds is null"
        ).fetchone()[0]
    assert {"holds", "changed_at"} <= columns
    assert kept  # rows the run did not rewrite keep no verdict, and are tested over their times
    assert members(project) == expected(history + later, T0 + DAY)
    assert sorted(row[:3] for row in outbox(project)[before:]) == [
        ("frequent-buyers", "bob", "entered"),
        ("signed-up-no-order", "cat", "exited"),
    ]

    # Time passes with no event: ann's first order leaves the 7 days, and she exits, once.
    lapsed = T0 + 2 * DAY + timedelta(minutes=1)
    count = len(outbox(project))
    run(lapsed)
    assert members(project) == expected(history + later, lapsed)
    assert [row[:3] for row in outbox(project)[count:]] == [("frequent-buyers", "ann", "exited")]
