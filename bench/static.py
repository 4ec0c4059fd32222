"""Benchmark of static audiences: CSV upload and mirror syncs, each against its plain counterpart.

    .venv/bin/python bench/static.py --members 1000000

Measured in one run:

1. **Upload.** A 10 MB CSV (about 100k users with names, emails, plans, a nested field and 1% bad
   ids) uploaded end to end (read, validate, queue the identify patches, add the members with their
   events, write the rejects file) into a fresh SQLite store, against DuckDB's own `read_csv` of the
   same file into a table. Target: within 5 times of `read_csv`. Beside it, the *store floor*: the
   rows that upload left in the store (profiles, queued identify patches, members, events), written
   again into another fresh store in one transaction with nothing else to do, through the same
   insert path. No upload that records what this one records can be faster than that.
2. **Mirror sync.** A Parquet table of 1M members synced into a static audience; then 1% of rows
   change (0.5% removed, 0.5% new) and the mirror sync runs again, writing only the difference,
   against a full reload of the same table (the audience emptied and synced from scratch).
   Target: under 20% of the full reload.

Results go to `bench/static-results.md` and `.json`; data lives in `bench/data/` (ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import polars as pl  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from audiences.static.syncs import Sync, run_sync  # noqa: E402
from audiences.static.uploads import upload_csv  # noqa: E402
from audiences.store import database as store_tables  # noqa: E402
from audiences.store.database import MembershipStore  # noqa: E402
from audiences.store.profiles import apply_uploads, settle_uploads  # noqa: E402
from audiences.users.sources import UserSource  # noqa: E402

DATA = ROOT / "bench" / "data" / "static"
TYPES = {"uploaded": "static", "synced": "static"}


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def timed_cpu(function, *args, **kwargs):
    """The result, wall seconds and CPU seconds (every thread of this process): on a shared,
    loaded machine the CPU time is the steadier comparison."""
    start, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start, time.process_time() - cpu


def fresh_store(name: str) -> MembershipStore:
    path = DATA / f"{name}.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return MembershipStore(f"sqlite:///{path}").create()


def make_csv(path: Path, target_bytes: int) -> int:
    """Realistic rows until the file is just under `target_bytes`; 1% of ids are malformed."""
    rng = random.Random(7)
    plans = ["free", "starter", "pro", "enterprise"]
    cities = ["Paris", "Berlin", "Lima", "Tokyo", "São Paulo", "Zürich", "Montréal"]
    header = "id,name,email,plan,seats,address.city,signed_up_at\n"
    rows, size, lines = 0, len(header), [header]
    while True:
        identifier = f"user_{rows:07d}" if rows % 100 else f" bad id {rows}"
        line = (
            f"{identifier},User {rows} {rng.choice(['Ann', 'Bob', 'Zoë'])},u{rows}@example.com,"
            f"{rng.choice(plans)},{rng.randint(1, 500)},{rng.choice(cities)},"
            f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:00:00Z\n"
        )
        if size + len(line.encode()) > target_bytes:
            break
        lines.append(line)
        size += len(line.encode())
        rows += 1
    path.write_text("".join(lines), encoding="utf-8")
    return rows


def bench_upload(target_bytes: int, repeats: int = 3) -> dict:
    """The upload against DuckDB's `read_csv` of the same file, each the best of `repeats` runs,
    alternated (the machine is shared): the acknowledged upload (its rows and members journaled,
    one batch committed), then what follows it: its members and events written, then its identify
    patches applied, each into a fresh store. Imports are warmed first by a one-row upload, as in
    a running service."""
    path = DATA / "upload_10mb.csv"
    rows = make_csv(path, target_bytes)
    warm = DATA / "warm.csv"
    warm.write_text("id,name\nwarm,Warm\n", encoding="utf-8")
    upload_csv(fresh_store("warm"), "uploaded", warm, TYPES)
    reads, acknowledged, settled, applied = [], [], [], []
    for _ in range(repeats):
        with duckdb.connect() as connection:
            _, *seconds = timed_cpu(
                lambda connection=connection: connection.execute(
                    "create table users as select * from read_csv($p, all_varchar = true)",
                    {"p": str(path)},
                )
            )
            reads.append(seconds)
            loaded = connection.execute("select count(*) from users").fetchall()[0][0]
        store = fresh_store("upload")
        result, *seconds = timed_cpu(
            upload_csv,
            store,
            "uploaded",
            path,
            TYPES,
            rejects_file=DATA / "upload.rejects.csv",
            apply_patches=False,
        )
        acknowledged.append(seconds)
        _, *seconds = timed_cpu(settle, store)
        settled.append(seconds)
        _, *seconds = timed_cpu(apply_uploads, store)
        applied.append(seconds)
        if len(acknowledged) < repeats:
            store.dispose()
    read_csv, upload = min(wall for wall, _ in reads), min(wall for wall, _ in acknowledged)
    read_cpu, upload_cpu = min(cpu for _, cpu in reads), min(cpu for _, cpu in acknowledged)
    floor, floor_rows = store_floor(store)
    store.dispose()
    synchronous = floor["audience_members"] + floor["membership_events"]
    return {
        "file_bytes": path.stat().st_size,
        "rows": rows,
        "duckdb_read_csv_s": read_csv,
        "duckdb_read_csv_cpu_s": read_cpu,
        "duckdb_read_csv_runs": reads,
        "duckdb_rows": loaded,
        "upload_s": upload,
        "upload_cpu_s": upload_cpu,
        "upload_runs": acknowledged,
        "members_written_s": min(wall for wall, _ in settled),
        "members_written_cpu_s": min(cpu for _, cpu in settled),
        "members_written_runs": settled,
        "patches_applied_s": min(wall for wall, _ in applied),
        "patches_applied_cpu_s": min(cpu for _, cpu in applied),
        "members_added": result.members_added,
        "rejected": result.rejected,
        "ratio": upload / read_csv,
        "cpu_ratio": upload_cpu / read_cpu,
        "with_members_ratio": (upload + min(wall for wall, _ in settled)) / read_csv,
        "with_patches_ratio": (
            upload + min(wall for wall, _ in settled) + min(wall for wall, _ in applied)
        )
        / read_csv,
        "store_floor_s": floor,
        "store_floor_rows": floor_rows,
        "store_floor_ratio": sum(floor.values()) / read_csv,
        "synchronous_floor_s": synchronous,
        "synchronous_floor_ratio": synchronous / read_csv,
    }


def settle(store: MembershipStore) -> int:
    """Write the journaled upload's members and events, as the first write or read after its
    answer does."""
    with store.engine.begin() as connection:  # (its start writes them: `MembershipStore`)
        return settle_uploads(store, connection)


def store_floor(uploaded: MembershipStore) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds to write the upload's rows again, table by table, into a fresh store (one transaction)."""
    tables = (
        store_tables.user_profiles,
        store_tables.user_patches,
        store_tables.audience_members,
        store_tables.membership_events,
    )
    copies = {}
    with uploaded.read_engine.connect() as connection:
        for table in tables:
            columns = [column.name for column in table.columns if column.name != "patch_id"]
            copies[table.name] = (
                columns,
                [
                    tuple(row)
                    for row in connection.execute(
                        sa.select(*(table.c[column] for column in columns))
                    )
                ],
            )
    target = fresh_store("floor")
    seconds = {}
    with target.engine.begin() as connection:
        for table in tables:
            columns, rows = copies[table.name]
            start = time.perf_counter()
            target.insert_rows(connection, table, columns, rows)
            seconds[table.name] = time.perf_counter() - start
        start = time.perf_counter()
    seconds["commit"] = time.perf_counter() - start
    target.dispose()
    return seconds, {name: len(rows) for name, (_, rows) in copies.items()}


def bench_mirror(members: int) -> dict:
    table = DATA / "members.parquet"
    ids = [f"user_{i:08d}" for i in range(members)]
    pl.DataFrame({"id": ids}).write_parquet(table)
    sync = Sync("crm", "synced", UserSource("crm", "parquet", table, "stream"), None, "mirror")
    store = fresh_store("mirror")
    first, first_s = timed(run_sync, store, sync, TYPES)
    changed = members // 100
    kept = ids[changed // 2 :]
    new = [f"new_{i:08d}" for i in range(changed - changed // 2)]
    pl.DataFrame({"id": kept + new}).write_parquet(table)
    second, second_s = timed(run_sync, store, sync, TYPES)
    # The full reload of the same table: an empty audience and no sync state, then the sync.
    with store.engine.begin() as connection:
        for name in ("audience_members", "sync_state", "membership_events"):
            connection.exec_driver_sql(f"delete from {name}")
    reload, reload_s = timed(run_sync, store, sync, TYPES)
    size = store.scalar(sa.text("select count(*) from audience_members"))
    store.dispose()
    return {
        "members": members,
        "first_sync_s": first_s,
        "first_added": first.added,
        "changes": second.added + second.removed,
        "diff_sync_s": second_s,
        "diff_added": second.added,
        "diff_removed": second.removed,
        "full_reload_s": reload_s,
        "reload_added": reload.added,
        "final_members": size,
        "ratio": second_s / reload_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--upload-bytes", type=int, default=10 * 1024 * 1024 - 1)
    parser.add_argument(
        "--upload-only", action="store_true", help="measure the upload only (no mirror sync)"
    )
    options = parser.parse_args()
    if DATA.exists():
        shutil.rmtree(DATA)
    DATA.mkdir(parents=True)
    results = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "upload": bench_upload(options.upload_bytes),
        "load_average_after": os.getloadavg(),
    }
    print("upload", results["upload"], flush=True)
    u = results["upload"]
    lines = [
        "# Static audiences benchmark",
        "",
        f"Produced by `.venv/bin/python bench/static.py {' '.join(sys.argv[1:])}` on {results['started']} "
        f"({results['cores']} cores); the upload and `read_csv` are each the best of "
        f"{len(u['upload_runs'])} alternated runs on a shared, noisy machine (load average "
        f"{results['load_average_before'][0]:.1f} before, {results['load_average_after'][0]:.1f} "
        "after). Details: `bench/static.py`.",
        "",
        "| measurement | ours | plain counterpart | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| acknowledged upload of a {u['file_bytes'] / 1048576:.1f} MB CSV ({u['rows']:,} rows, "
        f"{u['rejected']:,} rejected: its rows and members journaled, one batch committed) "
        f"vs DuckDB `read_csv` | {u['upload_s']:.2f} s | {u['duckdb_read_csv_s']:.2f} s "
        f"| **{u['ratio']:.1f}×** | ≤ 5× |",
        f"| the same, in CPU time (every thread) | {u['upload_cpu_s']:.2f} s "
        f"| {u['duckdb_read_csv_cpu_s']:.2f} s | **{u['cpu_ratio']:.1f}×** | ≤ 5× |",
        f"| then its members and events written (before any read or write of the store) "
        f"| {u['members_written_s']:.2f} s ({u['members_written_cpu_s']:.2f} s CPU) | "
        f"| {u['with_members_ratio']:.1f}× with the upload | |",
        f"| then its identify patches applied (profiles merged, patches queued) "
        f"| {u['patches_applied_s']:.2f} s ({u['patches_applied_cpu_s']:.2f} s CPU) | "
        f"| {u['with_patches_ratio']:.1f}× with the upload and members | |",
        f"| the synchronous floor: the upload's members and events written again into a fresh "
        f"store, nothing else | {u['synchronous_floor_s']:.2f} s | {u['duckdb_read_csv_s']:.2f} s "
        f"| **{u['synchronous_floor_ratio']:.1f}×** | |",
        f"| the store floor: every row the upload leaves, written again "
        f"({', '.join(f'{name} {rows:,}' for name, rows in u['store_floor_rows'].items())}) "
        f"| {sum(u['store_floor_s'].values()):.2f} s | {u['duckdb_read_csv_s']:.2f} s "
        f"| **{u['store_floor_ratio']:.1f}×** | |",
    ]
    if not options.upload_only:
        results["mirror"] = bench_mirror(options.members)
        print("mirror", results["mirror"], flush=True)
        m = results["mirror"]
        lines += [
            f"| mirror sync of {m['members']:,} members with {m['changes']:,} changes vs a full reload "
            f"| {m['diff_sync_s']:.2f} s | {m['full_reload_s']:.2f} s | **{m['ratio']:.1%}** | < 20% |",
            "",
            f"The first sync of the {m['members']:,} members took {m['first_sync_s']:.1f} s "
            f"({m['first_added']:,} members added with their events).",
        ]
    lines += [
        "",
        "The store floor, by table: "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in u["store_floor_s"].items())
        + ".",
    ]
    name = "static-upload-results" if options.upload_only else "static-results"
    (ROOT / "bench" / f"{name}.json").write_text(json.dumps(results, indent=2))
    (ROOT / "bench" / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
