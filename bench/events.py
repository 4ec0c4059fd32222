"""Benchmark of event audiences: cold build, new events, and time passing, against a GROUP BY floor.

    .venv/bin/python bench/events.py --users 1000000 --events 50000000   # the issue's size
    .venv/bin/python bench/events.py --users 100000 --events 2000000     # what a loaded laptop runs

Generates users and events (Parquet, Segment-like: 8 event names over 90 days, a `total`
property), loads the events with the real loader (`audiences/events/loading.py`), then times, in
one DuckDB file and one run:

- **floor**: `select user_id, event, count(*) from raw.events group by all`;
- **cold**: every event audience evaluated over every user, with the compiler's SQL (what the
  audience views and `audience_members` run), the results written to a table;
- **new events** (0.1% and 1% more, some late, some duplicates): loading them, finding the users to
  re-evaluate (the SQL of `int_event_users_to_reevaluate`: events past the `event_seq` watermark,
  and events whose shifted times "now" moved over) and re-evaluating only those users;
- **time passes** (one hour, one day, no new event): the same, the users found being only those
  whose windows lapsed or were reached.

Each incremental result is checked against a full evaluation at the same time. Prints a Markdown
table and writes `bench/events-results.json`. Peak memory is the process's maximum RSS.
"""

from __future__ import annotations

import argparse
import json
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
    event_windows,
    render,
    timestamp_literal,
)
from audiences.dbt.models import events_of_users
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


def context(now: datetime, events: str = "raw.events") -> CompileContext:
    return CompileContext(
        events=exp.to_table(events),
        attribute=lambda attribute: exp.column(attribute.column_name, quoted=True),
        audience_members=lambda key: exp.select("user_key").from_("members"),
        evaluation_time=timestamp_literal(now),
        user_key=exp.column("user_key", table="users"),
        user_id=exp.column("user_id", table="users"),
    )


def compiled(definitions, now, users_table: str, events: str = "raw.events") -> str:
    """Every audience over `users_table`, as SQL (rendered once, as `audiences generate` does)."""
    return " union all ".join(
        f"select '{key}' as audience_key, users.user_key from {users_table} as users "
        f"where {render(compile_segments(segments, context(now, events)), pretty=False)}"
        for key, segments in definitions.items()
    )


def evaluate(connection, sql: str) -> None:
    """Run the audiences' SQL into `bench_members` (audience, user_key)."""
    connection.execute("create or replace table bench_members as " + sql)


def users_to_reevaluate(connection, definitions, previous, now, watermark: int) -> int:
    """The users of int_event_users_to_reevaluate, into `bench_reevaluate`; returns how many."""
    windows = sorted(
        {window for segments in definitions.values() for window in event_windows(segments)},
        key=lambda w: (w.event, w.minutes),
    )
    low, high = (render(timestamp_literal(t), pretty=False) for t in (previous, now))
    moved = " union all ".join(
        f"select user_id from raw.events where event = {render(exp.Literal.string(w.event))} "
        f'and "timestamp" between {low} + to_minutes({w.minutes}) and {high} + to_minutes({w.minutes})'
        for w in windows
    )
    connection.execute(
        f"""
        create or replace table bench_reevaluate as
        select user_key, user_id from raw.users
        where user_id in (
            select user_id from raw.events where event_seq > {int(watermark)}
            union all {moved}
        )
        """
    )
    return connection.execute("select count(*) from bench_reevaluate").fetchone()[0]


def incremental(connection, sql: str, results: dict, label: str) -> None:
    """Re-evaluate the listed users: delete their rows, evaluate them over their own events (read
    once, by their numbers, with the SQL of audience_members' `events_to_reevaluate`), append.
    Each step is timed under `label`."""
    steps = [
        (
            "delete",
            "delete from bench_state where user_key in (select user_key from bench_reevaluate)",
        ),
        (
            "their events",
            "create or replace temp table bench_events_subset as "
            + events_of_users("bench_reevaluate", "raw.events", "raw.event_users"),
        ),
        ("evaluate", "create or replace table bench_members as " + sql),
        ("insert", "insert into bench_state select * from bench_members"),
    ]
    for step, statement in steps:
        timed(f"{label}: re-evaluate: {step}", results, connection.execute, statement)


def full_members(connection, definitions, now) -> set:
    evaluate(connection, compiled(definitions, now, "raw.users"))
    return set(connection.execute("select * from bench_members").fetchall())


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
    """A run (listing + re-evaluating) over the cold build, in wall and in CPU time."""
    steps = [f"{label}: {step}" for step in ("users to re-evaluate", "re-evaluate")]
    results[f"{label}: run / cold"] = round(
        sum(results[s] for s in steps) / results["cold build"], 4
    )
    cpu = results["cpu"]
    results[f"{label}: run / cold (CPU)"] = round(sum(cpu[s] for s in steps) / cpu["cold build"], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--audiences", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="3GB")
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
    timed("cold build", results, evaluate, connection, compiled(definitions, NOW, "raw.users"))
    connection.execute("create or replace table bench_state as select * from bench_members")
    results["members"] = connection.execute("select count(*) from bench_state").fetchone()[0]
    results["cold / floor"] = round(
        results["cold build"] / results["floor: group by user_id, event"], 2
    )

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
        timed(f"{label}: load", results, load_event_source, connection, source, now)
        listed = timed(
            f"{label}: users to re-evaluate",
            results,
            users_to_reevaluate,
            connection,
            definitions,
            previous,
            now,
            watermark,
        )
        results[f"{label}: users listed"] = listed
        sql = compiled(definitions, now, "bench_reevaluate", "bench_events_subset")
        timed(f"{label}: re-evaluate", results, incremental, connection, sql, results, label)
        ratios(results, label)
        assert set(connection.execute("select * from bench_state").fetchall()) == full_members(
            connection, definitions, now
        ), f"{label}: incremental differs from full"
        previous = now

    for step in (timedelta(hours=1), timedelta(days=1)):
        now = previous + step
        watermark = connection.execute("select max(event_seq) from raw.events").fetchone()[0]
        label = f"time passes {step}"
        listed = timed(
            f"{label}: users to re-evaluate",
            results,
            users_to_reevaluate,
            connection,
            definitions,
            previous,
            now,
            watermark,
        )
        results[f"{label}: users listed"] = listed
        sql = compiled(definitions, now, "bench_reevaluate", "bench_events_subset")
        timed(f"{label}: re-evaluate", results, incremental, connection, sql, results, label)
        ratios(results, label)
        assert set(connection.execute("select * from bench_state").fetchall()) == full_members(
            connection, definitions, now
        ), f"{label}: incremental differs from full"
        previous = now

    results["peak RSS (MB)"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("\n| measure | value |\n|---|---|")
    for key, value in results.items():
        if key != "cpu":
            print(f"| {key} | {value} |")
    Path(__file__).with_name("events-results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
