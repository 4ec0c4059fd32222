"""Fault experiment: `audiences run` killed with SIGKILL at random moments loses and doubles nothing.

    .venv/bin/audiences --evaluation-time 2026-11-01T00:00:00Z run     # the sample, once
    .venv/bin/python bench/kill_runs.py --days 8                        # then this, from the same folder

For each day after 2026-11-01 (or after --first-day), a run at that day's midnight is started and
killed with SIGKILL after a random 1-15 s (a run that finishes first is not killed), then the same
evaluation runs again to the end. Afterwards, over the whole history:

- every membership's events in the warehouse outbox alternate entered / exited, starting with entered;
- the store holds exactly the outbox's published (non-backfill) evaluation events: none missing,
  none extra;
- the open membership intervals equal the dynamic audiences' rows of `audience_members`;
- the file sink holds no delivery twice.

It prints one line per run and the counts; a non-zero count other than `kills` is a defect.
It uses the folder's own settings (`data/warehouse.duckdb`, `data/store.sqlite`, the file sink).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
from pathlib import Path

import duckdb

SINK_FILE = Path("data/out/workflow_triggers.jsonl")


def run_and_kill(evaluation_time: str, delay: float) -> bool:
    """Start a run, kill it with SIGKILL after `delay` seconds; True if it was killed."""
    process = subprocess.Popen(
        [".venv/bin/audiences", "--evaluation-time", evaluation_time, "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def check(warehouse: Path, store: Path) -> dict:
    connection = duckdb.connect(str(warehouse), read_only=True)
    outbox = connection.execute(
        "select audience_key, user_id, coalesce(tenant, ''), event_type from raw.membership_outbox "
        "order by audience_key, user_id, 3, sequence"
    ).fetchall()
    last, not_alternating = {}, 0
    for audience, user, tenant, event in outbox:
        previous = last.get((audience, user, tenant))
        not_alternating += (previous is None and event != "entered") or previous == event
        last[(audience, user, tenant)] = event
    published = {
        row[0]
        for row in connection.execute(
            "select event_id from raw.membership_outbox where not is_backfill"
        ).fetchall()
    }
    dynamic = "audience_key in (select audience_key from audience_catalog where audience_type <> 'static')"
    intervals = set(
        connection.execute(
            f"select audience_key, user_key, coalesce(tenant, '') from raw.membership_intervals "
            f"where exited_at is null and {dynamic}"
        ).fetchall()
    )
    members = set(
        connection.execute(
            f"select audience_key, user_key, coalesce(tenant, '') from audience_members where {dynamic}"
        ).fetchall()
    )
    stored = {
        row[0]
        for row in sqlite3.connect(store)
        .execute("select event_id from membership_events where source = 'evaluation'")
        .fetchall()
    }
    sent = (
        [json.loads(line) for line in SINK_FILE.read_text().splitlines()]
        if SINK_FILE.exists()
        else []
    )
    ids = [line.get("delivery_id") or json.dumps(line, sort_keys=True) for line in sent]
    return {
        "outbox_events": len(outbox),
        "not_alternating": not_alternating,
        "store_missing": len(published - stored),
        "store_extra": len(stored - published),
        "open_intervals": len(intervals),
        "intervals_not_members": len(intervals ^ members),
        "sink_lines": len(sent),
        "sink_duplicates": len(ids) - len(set(ids)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=8, help="how many evaluations (default 8)")
    parser.add_argument(
        "--first-day", type=int, default=2, help="the first November day (default 2)"
    )
    parser.add_argument("--seed", type=int, default=7)
    options = parser.parse_args()
    randomness = random.Random(options.seed)
    kills = 0
    for day in range(options.first_day, options.first_day + options.days):
        evaluation_time = f"2026-11-{day:02d}T00:00:00Z"
        delay = randomness.uniform(1, 15)
        killed = run_and_kill(evaluation_time, delay)
        kills += killed
        again = subprocess.run(
            [".venv/bin/audiences", "--evaluation-time", evaluation_time, "run"],
            capture_output=True,
            text=True,
        )
        print(
            f"{evaluation_time}: {'killed at' if killed else 'finished before'} {delay:.1f} s; "
            f"run again: exit {again.returncode}",
            flush=True,
        )
    print(
        json.dumps(
            {"kills": kills, **check(Path("data/warehouse.duckdb"), Path("data/store.sqlite"))}
        )
    )


if __name__ == "__main__":
    main()
