"""Benchmark: importing real time's events into the warehouse's membership history
(`import_realtime_events`, the first step of the diff after real time ran), this checkout against
an earlier revision's, on the same synthetic warehouse, with the resulting history compared.

    .venv/bin/python bench/realtime_import.py [--users 1000000] [--intervals 3000000]
        [--events 2000] [--old-rev defdecd~1]

Each side gets its own copy in bench/data/realtime-import/ (removed after): `--users` users,
`--intervals` open intervals over 50 audiences, and `--events` real-time events (alternately an
exit of an open entry and a second entry) of users spread over the table. Prints, per side, wall
and CPU seconds of the import and whether both histories and import records are equal.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = BENCH / "data" / "realtime-import"
EVALUATED_AT = datetime(2026, 11, 1, 10, 15, tzinfo=UTC)
AT = "2026-11-01T10:00:00.000000Z"


def module_at(revision: str):
    """`audiences/workflows/realtime.py` as it was at `revision`, importable beside the current."""
    source = subprocess.run(
        ["git", "show", f"{revision}:audiences/workflows/realtime.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = DATA / "realtime_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("realtime_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["realtime_before"] = module
    spec.loader.exec_module(module)
    return module


def setup(folder: Path, users: int, intervals: int, events: int):
    from audiences.store import database as tables
    from audiences.store.database import MembershipStore
    from audiences.warehouse.schema import ensure_membership_tables, ensure_user_tables
    from audiences.workflows.realtime import event_id

    folder.mkdir(parents=True)
    warehouse = duckdb.connect(str(folder / "warehouse.duckdb"))
    ensure_user_tables(warehouse)
    ensure_membership_tables(warehouse)
    loaded = datetime(2026, 11, 1, tzinfo=UTC)
    warehouse.execute(
        "insert into raw.users select i, 'u' || i, '{}', 'bench', $t, $t, null "
        "from range(1, $n + 1) as r(i)",
        {"t": loaded, "n": users},
    )
    warehouse.execute(
        "insert into raw.membership_intervals select 'aud-' || (i % 50), (i // 50) % $u + 1, "
        "'u' || ((i // 50) % $u + 1), null, 1, $t, null, 'v0' from range($n) as r(i)",
        {"t": loaded, "n": intervals, "u": users},
    )
    warehouse.execute("checkpoint")
    store = MembershipStore(f"sqlite:///{folder / 'store.sqlite'}").create()
    with store.engine.begin() as connection:
        patch = connection.execute(
            tables.user_patches.insert().values(
                user_id="u1", patch="{}", received_at=AT, loaded=True
            )
        ).inserted_primary_key[0]
        for number in range(events):
            user, audience = f"u{(number * 7919) % users + 1}", f"aud-{number % 50}"
            event_type, entry = ("exited", 1) if number % 2 else ("entered", 2)
            identifier = event_id(audience, user, None, event_type, entry)
            row = dict(
                event_id=identifier,
                audience_key=audience,
                user_id=user,
                event_type=event_type,
                entry_number=entry,
                occurred_at=AT,
            )
            connection.execute(
                tables.membership_events.insert().values(
                    **row,
                    audience_version="v1",
                    is_backfill=False,
                    published_at=AT,
                    source="realtime",
                )
            )
            connection.execute(tables.realtime_events.insert().values(**row, patch_id=patch))
    return warehouse, store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--intervals", type=int, default=3_000_000)
    parser.add_argument("--events", type=int, default=2_000)
    parser.add_argument("--old-rev", default="defdecd~1")
    arguments = parser.parse_args()
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True)
    from audiences.workflows import realtime

    sides = {"this checkout": realtime, arguments.old_rev: module_at(arguments.old_rev)}
    try:
        for number, (name, module) in enumerate(sides.items()):
            warehouse, store = setup(
                DATA / str(number), arguments.users, arguments.intervals, arguments.events
            )
            before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            imported = module.import_realtime_events(warehouse, store, EVALUATED_AT)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            print(
                f"{name}: {imported} events imported, {wall:.2f} s wall, {cpu:.2f} CPU s, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            warehouse.close()
            store.dispose()
        with duckdb.connect() as connection:
            for number in range(len(sides)):
                path = str(DATA / str(number) / "warehouse.duckdb")
                connection.execute(f"attach $path as side{number} (read_only)", {"path": path})
            for table in ("membership_intervals", "realtime_imports"):
                differ = connection.execute(
                    f"select count(*) from ((from side0.raw.{table} except all "
                    f"from side1.raw.{table}) union all (from side1.raw.{table} except all "
                    f"from side0.raw.{table}))"
                ).fetchone()[0]
                print(f"raw.{table}: {'equal' if differ == 0 else f'{differ} rows differ'}")
    finally:
        shutil.rmtree(DATA, ignore_errors=True)


if __name__ == "__main__":
    main()
