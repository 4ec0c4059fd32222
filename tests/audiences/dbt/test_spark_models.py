"""The sample audiences on Apache Spark through dbt-spark, end to end, against DuckDB.

Real parts only: the generated Spark project run by `dbt run` (dbt-spark's session mode: pyspark's
bundled Spark inside the dbt process, tables and a Hive metastore in a temporary folder), the
sample users exported from the DuckDB warehouse of the sample run, and DuckDB's own diff
(`record_changes`). The first Spark run is killed with SIGKILL (its whole process group, JVM
included) while it writes its events, before it publishes them; the rerun must publish
each event exactly once, with the ids DuckDB gives the same changes. A second evaluation, a week
later, moves the time-relative audiences: exits and entries against DuckDB's diff at that time.

Slow (several Spark starts): one test, marked `slow`; skipped where Java or pyspark is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
from datetime import UTC, datetime

import duckdb
import pytest
from condition_harness import ROOT
from spark_harness import DIALECT, matches, on_duckdb, require_spark

from audiences.conditions.definitions import evaluation_order, load_definition_set
from audiences.dbt.models import custom_audience_keys
from audiences.dbt.spark import SPARK_PROJECT_FOLDER, SparkRun, spark_unsupported
from audiences.membership.changes import CircuitBreaker, record_changes

pytestmark = pytest.mark.slow

FIRST = datetime(2026, 11, 1, tzinfo=UTC)  # the sample run's evaluation time (SAMPLE_TIME)
LATER = datetime(2026, 11, 9, 6, 30, tzinfo=UTC)


def _spark_audiences():
    found = load_definition_set(
        ROOT / "data" / "audiences", custom_audience_keys(ROOT / "dbt_project")
    )
    definitions = found.definitions
    unsupported = spark_unsupported(definitions)
    keys = [
        key
        for key in evaluation_order(definitions)
        if definitions[key].type == "dynamic" and key not in unsupported
    ]
    return definitions, keys


def _duckdb_members_at(connection, definitions, keys, moment) -> dict[str, set[str]]:
    """Each Spark audience's members at `moment`, by DuckDB (the compiler's DuckDB SQL)."""
    live = {
        row[0]
        for row in connection.execute(
            "select user_id from raw.users where deleted_at is null"
        ).fetchall()
    }
    members: dict[str, set[str]] = {}
    for key in keys:  # evaluation order: references first
        (found,) = matches(
            on_duckdb(connection), DIALECT, [definitions[key].segments], members, now=moment
        )
        members[key] = found & live  # deleted users are in no audience
    return members


def _events(rows) -> set[tuple]:
    return {
        (
            r["event_id"],
            r["audience_key"],
            r["user_id"],
            r["event_type"],
            r["entry_number"],
            r["is_backfill"],
        )
        for r in rows
    }


def test_sample_audiences_on_spark_match_duckdb_and_a_killed_run_publishes_once(
    sample_run, tmp_path
):
    require_spark()
    definitions, keys = _spark_audiences()
    assert len(keys) >= 10, "most sample audiences run on Spark"

    # DuckDB: the sample run at FIRST, then its diff at LATER over the members DuckDB finds then.
    warehouse = tmp_path / "warehouse.duckdb"
    shutil.copy(sample_run, warehouse)
    users = tmp_path / "users.parquet"
    connection = duckdb.connect(str(warehouse))
    connection.execute("set TimeZone = 'UTC'")
    connection.execute(
        "copy (select user_key, user_id, cast(properties as varchar) as properties, updated_at, "
        f"deleted_at from raw.users) to '{users}' (format parquet)"
    )
    first_members = {
        key: {
            row[0]
            for row in connection.execute(
                "select user_id from main.audience_members join raw.users using (user_key) "
                "where audience_key = $key",
                {"key": key},
            ).fetchall()
        }
        for key in keys
    }
    first_events = {
        tuple(row)
        for row in connection.execute(
            "select event_id, audience_key, user_id, event_type, entry_number, is_backfill "
            "from raw.membership_outbox where occurred_at = $t and audience_key in "
            "(select unnest($keys))",
            {"t": FIRST, "keys": keys},
        ).fetchall()
    }
    later_members = _duckdb_members_at(connection, definitions, keys, LATER)
    connection.execute(
        "create table main.later_members (audience_key varchar, user_key integer, tenant varchar)"
    )
    for key, ids in later_members.items():
        connection.execute(
            "insert into main.later_members select $key, user_key, null from raw.users "
            "where user_id in (select unnest($ids))",
            {"key": key, "ids": sorted(ids) or [""]},
        )
    connection.execute(
        "create table main.later_catalog as select * from main.audience_catalog "
        "where audience_key in (select unnest($keys))",
        {"keys": keys},
    )
    record_changes(
        connection,
        LATER,
        CircuitBreaker(share=1.0, minimum=10**9),
        members_table="main.later_members",
        catalog_table="main.later_catalog",
    )
    later_events = {
        tuple(row)
        for row in connection.execute(
            "select event_id, audience_key, user_id, event_type, entry_number, is_backfill "
            "from raw.membership_outbox where occurred_at = $t",
            {"t": LATER},
        ).fetchall()
    }
    connection.close()
    assert any(event[3] == "exited" for event in later_events), "the week moves someone out"
    assert any(event[3] == "entered" for event in later_events), "... and someone in"

    # Spark: the generated project, in a temporary copy (dbt writes its target/ and logs/ there).
    project = tmp_path / SPARK_PROJECT_FOLDER
    shutil.copytree(
        ROOT / SPARK_PROJECT_FOLDER, project, ignore=shutil.ignore_patterns("target", "logs")
    )
    spark = SparkRun(project, tmp_path / "spark")

    # 1. Killed (SIGKILL, the whole process group, JVM included) while it writes its events into
    # their folder, before it attaches them. (A kill at the "staged" line races with the attach,
    # which follows within milliseconds; the write takes Spark seconds.)
    process = spark.start(FIRST, users)
    output, killed_run = [], None
    for line in process.stdout:
        output.append(line)
        if "membership events staging" in line:  # while it writes them, before it attaches them
            os.killpg(process.pid, signal.SIGKILL)
            killed_run = line.rsplit("run_id=", 1)[1].strip()
            break
    output.append(process.stdout.read())
    process.stdout.close()
    process.wait()
    assert process.returncode == -signal.SIGKILL, "".join(output[-40:])
    assert killed_run and not any("membership events published" in line for line in output)

    # 2. The rerun at the same time, then the evaluation a week later.
    spark.run(FIRST, users)
    spark.run(LATER)

    rows = spark.query(
        "select 'event' as kind, event_id, audience_key, user_id, event_type, entry_number, "
        "is_backfill, cast(evaluated_at as string) as evaluated_at, run_id "
        "from raw.membership_events where event_type <> 'evaluated' "
        "union all "
        "select 'member', null, audience_key, user_id, null, null, null, null, null "
        "from audiences.audience_members"
    )
    events = [r for r in rows if r["kind"] == "event"]
    # Exactly once: no event id twice in the whole history, the first evaluation in one partition.
    assert len(events) == len({r["event_id"] for r in events})
    spark_first = [r for r in events if r["evaluated_at"].startswith("2026-11-01")]
    spark_later = [r for r in events if r["evaluated_at"].startswith("2026-11-09")]
    assert len({r["run_id"] for r in spark_first}) == 1
    assert killed_run not in {r["run_id"] for r in events}, "the killed run published nothing"
    assert len(spark_first) + len(spark_later) == len(events)

    # The first evaluation: every member entered (backfill), as on DuckDB, per audience.
    assert _events(spark_first) == first_events
    for key in keys:
        entered = {r["user_id"] for r in spark_first if r["audience_key"] == key}
        assert entered == first_members[key], key
    # A week later: the same members per audience, and the same entries and exits, same ids.
    spark_members = {key: set() for key in keys}
    for r in rows:
        if r["kind"] == "member":
            spark_members[r["audience_key"]].add(r["user_id"])
    for key in keys:
        assert spark_members[key] == later_members[key], key
    assert _events(spark_later) == later_events
