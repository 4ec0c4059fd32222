"""Benchmark of event audiences: cold build, new events, and time passing, against a GROUP BY floor.

    .venv/bin/python bench/events.py --users 1000000 --events 50000000   # the issue's size
    .venv/bin/python bench/events.py --users 100000 --events 2000000     # what a loaded laptop runs

Generates users and events (Parquet, Segment-like: 8 event names over 90 days, a `total`
property), loads the events with the real loader (`audiences/events/loading.py`), then times, in
one DuckDB file and one run:

- **floor**: `select user_id, event, count(*) from raw.events group by all`;
- **cold**: every event audience evaluated over every user, with the compiler's SQL (what the
  audience views and `audience_members`' first build run), the results written to a table, plus
  the first build of the event state (`int_event_state`: per user and event condition, the kept
  times and the next change, from every event);
- **new events** (0.1% and 1% more, some late, some duplicates): loading them, updating the event
  state (the users with new events and those whose next change "now" reached, from their kept
  times and new events alone, replaced by (state_key, user_number) as dbt's delete+insert does),
  finding the users to re-evaluate (as `int_event_users_to_reevaluate`: rows whose verdict a
  build changed since, `changed_at`) and re-evaluating only those, from their state rows (a
  current verdict, `holds`, without the kept times);
  then a `checkpoint`: each run (and the cold build) pays for writing its own changes out, which
  DuckDB otherwise does in whichever statement passes its log's 16 MB (the load of the new events
  and the bench's checks checkpoint outside the timings);
- **time passes** (one hour, one day, no new event): the same, the users found being only those
  whose verdicts changed as their windows lapsed;
- **nothing new** (no new event, no time passed): the same steps, the fixed cost of a run; and,
  as the floor of a run over new events, one scan of the new events alone.

Each incremental result is checked against a full evaluation at the same time (in DuckDB, so
that the check adds nothing to the peak memory). Prints a Markdown
table and writes `bench/events-results.json`. Peak memory is the process's maximum RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
from sqlglot import exp

from audiences.conditions.compiler import (
    CompileContext,
    Condition,
    compile_segments,
    event_state,
    event_state_sql,
    render,
    timestamp_literal,
)
from audiences.dbt.models import events_state_of_users
from audiences.events.loading import EventSource, load_event_source
from audiences.warehouse.schema import ensure_user_tables

NOW = datetime(2026, 11, 1, tzinfo=UTC)
NAMES = [
    "Order Completed",
    "Page Viewed",
    "Signed Up",
    "Product Viewed",
    "Cart Viewed",
    "Checkout Started",
    "Email Opened",
    "Feature Used",
]


def audiences(count: int) -> dict[str, list[list[Condition]]]:
    """`count` event audiences: counts, windows, did-not-perform, last performed, a `where`."""
    kinds = []
    for index in range(count):
        name = NAMES[index % len(NAMES)]
        days = [1, 7, 14, 30, 60][index % 5]
        shape = index % 4
        if shape == 0:
            argument = {
                "event": name,
                "count": {"at_least": 1 + index % 3},
                "within": f"{days} days",
            }
            operator = "performed"
        elif shape == 1:
            argument = {"event": name, "count": {"at_most": 0}, "within": f"{days} days"}
            operator = "performed"
        elif shape == 2:
            argument = {"event": name, "time": f"{days} days ago"}
            operator = "last_performed_before"
        else:
            argument = {
                "event": name,
                "count": {"at_least": 1},
                "within": f"{days} days",
                "where": [
                    {"property": "data.total", "operator": "greater_than", "argument": "100"}
                ],
            }
            operator = "performed"
        kinds.append(
            (
                f"event_{index:02d}",
                [
                    [
                        Condition.from_json(
                            {"property": "recipient", "operator": operator, "argument": argument}
                        )
                    ]
                ],
            )
        )
    return dict(kinds)


def context(now: datetime, events: str = "raw.events", state: str | None = None) -> CompileContext:
    return CompileContext(
        events=exp.to_table(events),
        attribute=lambda attribute: exp.column(attribute.column_name, quoted=True),
        audience_members=lambda key: exp.select("user_key").from_("members"),
        evaluation_time=timestamp_literal(now),
        user_key=exp.column("user_key", table="users"),
        user_id=exp.column("user_id", table="users"),
        event_state=exp.to_table(state) if state is not None else None,
    )


def compiled(definitions, now, users_table: str, state: str | None = None) -> str:
    """Every audience over `users_table`, as SQL (rendered once, as `audiences generate` does):
    counting the events, or, given `state`, reading the verdicts from those state rows."""
    return " union all ".join(
        f"select '{key}' as audience_key, users.user_key from {users_table} as users "
        f"where {render(compile_segments(segments, context(now, state=state)), pretty=False)}"
        for key, segments in definitions.items()
    )


def evaluate(connection, sql: str) -> None:
    """Run the audiences' SQL into `bench_members` (audience, user_key)."""
    connection.execute("create or replace table bench_members as " + sql)


def state_conditions(definitions) -> list[Condition]:
    found = {}
    for segments in definitions.values():
        for segment in segments:
            for condition in segment:
                state = event_state(condition)
                if state is not None:
                    found.setdefault(state.key, condition)
    return list(found.values())


def build_state(connection, definitions, now) -> None:
    """The first build of int_event_state: every condition's rows from every event."""
    through = connection.execute("select coalesce(max(event_seq), 0) from raw.events").fetchone()[0]
    rows = event_state_sql(state_conditions(definitions), context(now), exp.Literal.number(through))
    connection.execute("create or replace table bench_state_rows as " + rows)


def update_state(connection, definitions, now, results: dict, label: str) -> None:
    """An incremental build of int_event_state, as dbt's delete+insert runs the model: the rows
    of the users with new events or a due verdict, then those keys replaced (each step timed
    under `label`)."""
    through, after = timed(
        f"{label}: event state: markers",
        results,
        lambda: connection.execute(
            "select coalesce(max(event_seq), 0), "
            "(select max(events_through) from bench_state_rows where user_number = -1) from raw.events"
        ).fetchone(),
    )
    # Rendered outside the timings, as `audiences generate` renders the model once (in dbt the
    # markers are subqueries of the rendered SQL).
    rows = event_state_sql(
        state_conditions(definitions),
        context(now),
        exp.Literal.number(through),
        previous=exp.to_table("bench_state_rows"),
        markers=lambda key: (exp.Literal.number(after), exp.true()),
    )
    steps = [
        ("rows", "create or replace temp table bench_fresh as " + rows),
        (
            "delete",
            "delete from bench_state_rows using bench_fresh "
            "where bench_state_rows.state_key = bench_fresh.state_key "
            "and bench_state_rows.user_number = bench_fresh.user_number",
        ),
        ("insert", "insert into bench_state_rows select * from bench_fresh"),
    ]
    for step, statement in steps:
        timed(f"{label}: event state: {step}", results, connection.execute, statement)
    for where in (results, results["cpu"]):
        where[f"{label}: event state"] = round(
            sum(where[f"{label}: event state: {step}"] for step in ("markers", *dict(steps))), 3
        )
    results[f"{label}: event state rows rewritten"] = connection.execute(
        "select count(*) from bench_fresh"
    ).fetchone()[0]


def users_to_reevaluate(connection, previous, now, watermark: int) -> int:
    """The users of int_event_users_to_reevaluate, into `bench_reevaluate`; returns how many:
    those whose verdict of an event condition changed since the last build (`changed_at` where
    "now" moved, or at this "now" by events past `watermark`, the last build's; every condition
    here keeps a state, so new events list no one by themselves)."""
    low, high = (render(timestamp_literal(t), pretty=False) for t in (previous, now))
    connection.execute(
        f"""
        create or replace table bench_reevaluate as
        select user_key, user_id from raw.users
        where user_id in (
            select user_id from bench_state_rows join raw.event_users using (user_number)
            where (changed_at > {low} and changed_at <= {high})
                or (changed_at = {high} and (coalesce({low} > {high}, true)
                    or events_through > {int(watermark)}))
        )
        """
    )
    return connection.execute("select count(*) from bench_reevaluate").fetchone()[0]


def incremental(connection, sql: str, results: dict, label: str, now) -> None:
    """Re-evaluate the listed users: delete their rows, select their state rows (by their
    numbers, with the SQL of audience_members' `event_state_to_reevaluate`), evaluate the
    audiences from them, append. Each step is timed under `label`."""
    steps = [
        (
            "delete",
            "delete from bench_state where user_key in (select user_key from bench_reevaluate)",
        ),
        (
            "their state",
            "create or replace temp table bench_state_subset as "
            + events_state_of_users(
                "bench_reevaluate",
                "bench_state_rows",
                "raw.event_users",
                render(timestamp_literal(now), pretty=False),
            ),
        ),
        ("evaluate", "create or replace table bench_members as " + sql),
        ("insert", "insert into bench_state select * from bench_members"),
    ]
    for step, statement in steps:
        timed(f"{label}: re-evaluate: {step}", results, connection.execute, statement)


def differences(connection, definitions, now) -> int:
    """Rows in which the incremental members (`bench_state`) and a full evaluation at `now`
    differ, counted in DuckDB: sets of millions of rows in Python would dominate the peak RSS."""
    evaluate(connection, compiled(definitions, now, "raw.users"))
    found = connection.execute(
        "select count(*) from ((select * from bench_state except all select * from bench_members) "
        "union all (select * from bench_members except all select * from bench_state))"
    ).fetchone()[0]
    connection.execute("checkpoint")  # the check's own writes, not the next run's
    return found


def load_and_checkpoint(connection, source, now) -> None:
    """Load new events and write them out (DuckDB checkpoints once its log passes 16 MB, in
    whichever statement commits then: the next run would otherwise pay for the load's writes)."""
    load_event_source(connection, source, now)
    connection.execute("checkpoint")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(label, results, function, *arguments):
    """Wall time into `results[label]`, and the process's CPU time (both threads) into
    `results["cpu"][label]`: on a shared machine the CPU time is the steadier of the two."""
    started, cpu = time.perf_counter(), cpu_seconds()
    value = function(*arguments)
    results[label] = round(time.perf_counter() - started, 3)
    results.setdefault("cpu", {})[label] = round(cpu_seconds() - cpu, 3)
    print(f"{label}: {results[label]:.3f} s (CPU {results['cpu'][label]:.3f} s)", flush=True)
    return value


def ratios(results: dict, label: str) -> None:
    """A run (updating the state, listing, re-evaluating) over the cold build, wall and CPU."""
    steps = [
        f"{label}: {step}"
        for step in ("event state", "users to re-evaluate", "re-evaluate", "checkpoint")
    ]
    results[f"{label}: run / cold"] = round(
        sum(results[s] for s in steps) / results["cold build"], 4
    )
    cpu = results["cpu"]
    results[f"{label}: run / cold (CPU)"] = round(sum(cpu[s] for s in steps) / cpu["cold build"], 4)
    # The machine is shared: the load beside each ratio (`uptime`'s 1-minute figure).
    results[f"{label}: load average (1 min)"] = round(os.getloadavg()[0], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--audiences", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="3GB")
    parser.add_argument("--output", default="events-results.json", help="file name under bench/")
    arguments = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-events-"))
    connection = duckdb.connect(str(folder / "warehouse.duckdb"))
    connection.execute("set TimeZone = 'UTC'")
    connection.execute(f"set threads = {int(arguments.threads)}")
    connection.execute(f"set memory_limit = '{arguments.memory_limit}'")
    ensure_user_tables(connection)
    connection.execute(
        f"insert into raw.users select range + 1, 'u' || range, '{{}}', 'bench', now(), now(), null "
        f"from range({int(arguments.users)})"
    )
    definitions = audiences(arguments.audiences)
    results: dict = {
        "load average (1 min) at the start": round(os.getloadavg()[0], 1),
        "users": arguments.users,
        "events": arguments.events,
        "audiences": len(definitions),
    }

    def generate(path: Path, count: int, offset: int, start_days: int, base: datetime) -> None:
        # Stamped over `start_days` days before `base` (late ones before the last evaluation);
        # after the first file, one in ten repeats an earlier message id (a retried delivery).
        repeat = (
            f"case when range % 10 = 0 then 'm' || (hash(range) % {offset}) "
            f"else 'm' || (range + {offset}) end"
            if offset
            else f"'m' || (range + {offset})"
        )
        connection.execute(
            f"""
            copy (
                select
                    {repeat} as messageId,
                    'u' || (hash(range + {offset}) % {int(arguments.users)}) as userId,
                    {render(exp.Array(expressions=[exp.Literal.string(n) for n in NAMES]))}[
                        cast(1 + (hash(range + {offset} + 7) % {len(NAMES)}) as bigint)] as event,
                    {render(timestamp_literal(base))} - to_seconds(
                        cast(hash(range + {offset} + 13) % {start_days * 86400} as bigint)) as "timestamp",
                    {{'total': (hash(range + {offset} + 17) % 500)}} as properties
                from range({count})
                -- an append-only event log arrives roughly in time order
                order by "timestamp"
            ) to '{path}' (format parquet)
            """
        )

    generate(folder / "events-0.parquet", arguments.events, 0, 90, NOW)
    source = EventSource("bench", "parquet", folder / "events")
    (folder / "events").mkdir()
    (folder / "events-0.parquet").rename(folder / "events" / "events-0.parquet")
    timed("load (cold)", results, load_event_source, connection, source, NOW)
    timed(
        "floor: group by user_id, event",
        results,
        lambda: connection.execute(
            "create or replace table bench_floor as select user_id, event, count(*) from raw.events group by all"
        ),
    )
    timed(
        "cold build: evaluate",
        results,
        evaluate,
        connection,
        compiled(definitions, NOW, "raw.users"),
    )
    timed("cold build: event state", results, build_state, connection, definitions, NOW)
    timed("cold build: checkpoint", results, connection.execute, "checkpoint")
    for kind in ("", "cpu"):
        where = results["cpu"] if kind else results
        where["cold build"] = round(
            sum(where[f"cold build: {step}"] for step in ("evaluate", "event state", "checkpoint")),
            3,
        )
    results["event state rows"] = connection.execute(
        "select count(*) from bench_state_rows"
    ).fetchone()[0]
    connection.execute("create or replace table bench_state as select * from bench_members")
    connection.execute("checkpoint")
    results["members"] = connection.execute("select count(*) from bench_state").fetchone()[0]
    results["cold / floor"] = round(
        results["cold build"] / results["floor: group by user_id, event"], 2
    )
    results["cold / floor (CPU)"] = round(
        results["cpu"]["cold build"] / results["cpu"]["floor: group by user_id, event"], 2
    )
    results["cold: load average (1 min)"] = round(os.getloadavg()[0], 1)

    previous, offset = NOW, arguments.events
    for share in (0.001, 0.01):
        now = previous + timedelta(minutes=15)
        count = int(arguments.events * share)
        path = folder / "events" / f"events-{share}.parquet"
        # New events of the last 15 minutes, some late (up to 3 days old), 10% repeats of old ids.
        generate(path, count, offset, 3, now)
        offset += count
        watermark = connection.execute("select max(event_seq) from raw.events").fetchone()[0]
        label = f"{share:.1%} new events"
        timed(f"{label}: load", results, load_and_checkpoint, connection, source, now)
        # A floor of any run over new events: one scan of them, reading the columns the state
        # update reads (not in the ratios).
        timed(
            f"{label}: floor: one scan of the new events",
            results,
            lambda watermark=watermark: connection.execute(
                'select count(*), max(user_number), max(event), max("timestamp"), '
                f"max(length(cast(properties as varchar))) from raw.events where event_seq > {int(watermark)}"
            ).fetchall(),
        )
        update_state(connection, definitions, now, results, label)
        listed = timed(
            f"{label}: users to re-evaluate",
            results,
            users_to_reevaluate,
            connection,
            previous,
            now,
            watermark,
        )
        results[f"{label}: users listed"] = listed
        sql = compiled(definitions, now, "bench_reevaluate", "bench_state_subset")
        timed(f"{label}: re-evaluate", results, incremental, connection, sql, results, label, now)
        timed(f"{label}: checkpoint", results, connection.execute, "checkpoint")
        ratios(results, label)
        assert not differences(connection, definitions, now), f"{label}: incremental differs"
        previous = now

    for step in (timedelta(hours=1), timedelta(days=1)):
        now = previous + step
        watermark = connection.execute("select max(event_seq) from raw.events").fetchone()[0]
        label = f"time passes {step}"
        update_state(connection, definitions, now, results, label)
        listed = timed(
            f"{label}: users to re-evaluate",
            results,
            users_to_reevaluate,
            connection,
            previous,
            now,
            watermark,
        )
        results[f"{label}: users listed"] = listed
        sql = compiled(definitions, now, "bench_reevaluate", "bench_state_subset")
        timed(f"{label}: re-evaluate", results, incremental, connection, sql, results, label, now)
        timed(f"{label}: checkpoint", results, connection.execute, "checkpoint")
        ratios(results, label)
        assert not differences(connection, definitions, now), f"{label}: incremental differs"
        previous = now

    # The fixed cost of a run: nothing new and no time passed (no user listed), the same steps.
    label = "nothing new"
    # What reading the state costs whatever is new: a scan of its next changes (O(state rows)).
    timed(
        f"{label}: floor: one scan of the state's next changes",
        results,
        lambda: connection.execute(
            "select count(*) from bench_state_rows where next_change <= "
            + render(timestamp_literal(previous), pretty=False)
        ).fetchall(),
    )
    watermark = connection.execute("select max(event_seq) from raw.events").fetchone()[0]
    update_state(connection, definitions, previous, results, label)
    results[f"{label}: users listed"] = timed(
        f"{label}: users to re-evaluate",
        results,
        users_to_reevaluate,
        connection,
        previous,
        previous,
        watermark,
    )
    sql = compiled(definitions, previous, "bench_reevaluate", "bench_state_subset")
    timed(f"{label}: re-evaluate", results, incremental, connection, sql, results, label, previous)
    timed(f"{label}: checkpoint", results, connection.execute, "checkpoint")
    ratios(results, label)

    results["members at the end"] = connection.execute(
        "select count(*) from bench_state"
    ).fetchone()[0]
    results["load average (1 min) at the end"] = round(os.getloadavg()[0], 1)
    results["peak RSS (MB)"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("\n| measure | value |\n|---|---|")
    for key, value in results.items():
        if key != "cpu":
            print(f"| {key} | {value} |")
    Path(__file__).with_name(arguments.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
