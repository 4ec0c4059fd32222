"""The sample audiences on Apache Spark through dbt-spark, end to end, against DuckDB.

Real parts only: the generated Spark project run by `dbt run` (dbt-spark's session mode: pyspark's
bundled Spark inside the dbt process, tables and a Hive metastore in a temporary folder), the
sample users exported from the DuckDB warehouse of the sample run, and DuckDB's own diff
(`record_changes`). The first Spark build is full. A week later some users change, one is deleted,
one is new, and "now" moves the time-relative audiences: that build is incremental. It is first
killed with SIGKILL (its whole process group, JVM included) while it writes its events, after it
replaced int_users_flattened and audience_members; the rerun, a Dagster materialization of the
Spark assets (AUDIENCES_ENGINE=spark's job, which also records and publishes the events), is
incremental again and must give DuckDB's members and exactly DuckDB's events (same ids), each
published once. So a full build and an incremental one (after a crash) both equal DuckDB for the
same input.

Slow (several Spark starts): one test, marked `slow`; skipped where Java or pyspark is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import replace
from datetime import UTC, datetime

import dagster as dg
import duckdb
import pytest
import sqlalchemy as sa
from condition_harness import ROOT
from spark_harness import DIALECT, matches, on_duckdb, require_spark

from audiences.conditions.definitions import evaluation_order, load_definition_set
from audiences.dbt.models import custom_audience_keys
from audiences.dbt.spark import (
    COMMITTED,
    EVENTS_FOLDER,
    SPARK_PROJECT_FOLDER,
    SparkRun,
    spark_run_for,
    spark_unsupported,
)
from audiences.delivery.loop import deliver_due
from audiences.delivery.setup import load_workflow_setup
from audiences.delivery.sinks import load_sinks
from audiences.membership.changes import CircuitBreaker, record_changes
from audiences.settings import Settings, format_time
from audiences.store import database as tables
from audiences.store.database import MembershipStore
from audiences.workflows.publish import publish_outbox, release_batch
from audiences.workflows.spark_events import publish_spark_builds

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


# Holds every audience that moves by two users or more (the default would hold none here): the
# breaker must hold the same audiences, with the same batches, for Spark's events as for DuckDB's.
BREAKER = CircuitBreaker(share=0.0, minimum=2)


def _mirror_settings(tmp_path) -> Settings:
    """The settings of the DuckDB warehouse and store that Spark's events are recorded in."""
    (tmp_path / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    return Settings.from_env(
        {},
        duckdb_path=str(tmp_path / "mirror.duckdb"),
        store_url=f"sqlite:///{tmp_path / 'mirror-store.sqlite'}",
        sinks_file=str(tmp_path / "sinks.yml"),
        workflows_dir=str(ROOT / "data" / "workflows"),
        definitions_dir=str(ROOT / "data" / "audiences"),
        dbt_project_dir=str(ROOT / "dbt_project"),
        breaker_share=BREAKER.share,
        breaker_minimum=BREAKER.minimum,
    )


def _outbox(connection, keys) -> tuple[set[tuple], set[tuple]]:
    """The outbox's events of these audiences, and their held batches."""
    events = {
        tuple(row)
        for row in connection.execute(
            "select event_id, audience_key, user_id, event_type, entry_number, is_backfill, "
            "batch_id, occurred_at from raw.membership_outbox "
            "where audience_key in (select unnest($keys))",
            {"keys": keys},
        ).fetchall()
    }
    batches = {
        tuple(row)
        for row in connection.execute(
            "select batch_id, audience_key, evaluated_at, entered, exited, audience_size "
            "from raw.membership_batches where audience_key in (select unnest($keys))",
            {"keys": keys},
        ).fetchall()
    }
    return events, batches


def _deliveries(store) -> set[tuple]:
    return {
        (row["delivery_id"], row["event_id"], row["workflow_key"], row["user_id"], row["status"])
        for row in store.rows(sa.select(tables.deliveries))
    }


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


def _versions_folder(tmp_path, table):
    return tmp_path / "spark" / "versions" / table


def _versions_on_disk(tmp_path) -> set[tuple[str, str]]:
    """(table, run_id=<run>) of every version folder in the test's Spark warehouse."""
    root = tmp_path / "spark" / "versions"
    return {p.relative_to(root).parts for p in root.glob("*/*") if p.is_dir()}


def _parquet_rows(reader, folder, run) -> list[tuple]:
    """The rows of one build's partition folder (`<folder>/run_id=<run>/`), read by DuckDB."""
    return reader.execute(
        "select * from read_parquet($files)", {"files": str(folder / f"run_id={run}" / "*.parquet")}
    ).fetchall()


def _dagster_spark_run(settings, tmp_path, users, monkeypatch) -> tuple[dict, dict]:
    """The Spark assets of the code location (AUDIENCES_ENGINE=spark) materialized by Dagster at
    LATER, with the code location's resources, on the test's Spark project and warehouse (the
    Spark project beside `dbt_project_dir`, AUDIENCES_SPARK_WAREHOUSE). Returns each asset's
    materialization metadata, as the UI shows it."""
    from pipelines.defs.resources import environment_resources
    from pipelines.defs.spark import EVENTS_KEY, MEMBERS_KEY, SPARK_ASSETS

    monkeypatch.setenv("AUDIENCES_ENGINE", "spark")
    monkeypatch.setenv("AUDIENCES_SPARK_WAREHOUSE", str(tmp_path / "spark"))
    settings = replace(settings, dbt_project_dir=tmp_path / "dbt_project")
    assert spark_run_for(settings).project_dir == tmp_path / SPARK_PROJECT_FOLDER
    result = dg.materialize(
        SPARK_ASSETS,
        resources=environment_resources({settings.environment: settings}, {}),
        run_config={
            "ops": {
                "spark__audience_members": {
                    "config": {"evaluation_time": format_time(LATER), "users_parquet": str(users)}
                }
            }
        },
    )
    assert result.success
    found = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        found[materialization.asset_key] = {
            name: value.value for name, value in materialization.metadata.items()
        }
    return found[MEMBERS_KEY], found[EVENTS_KEY]


def test_sample_audiences_on_spark_match_duckdb_and_a_killed_run_publishes_once(
    sample_run, tmp_path, monkeypatch
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
    # Between the two evaluations: three users change plan, one is deleted, one is new (a copy of
    # a member of most audiences), all loaded an hour after the sample (updated_at is the time of
    # the load, not of the evaluation).
    (changed_at,) = connection.execute(
        "select max(updated_at) + interval 1 hour from raw.users"
    ).fetchone()
    member_counts = connection.execute(
        "select user_key, count(*) from main.audience_members where audience_key in "
        "(select unnest($keys)) group by user_key order by 2 desc, 1 limit 5",
        {"keys": keys},
    ).fetchall()
    busiest, deleted, *changed = [row[0] for row in member_counts]
    connection.execute(
        "update raw.users set properties = json_merge_patch(properties, "
        'case when user_key % 2 = 0 then \'{"plan": "free"}\' else \'{"plan": "enterprise"}\' end), '
        "updated_at = $t where user_key in (select unnest($changed))",
        {"t": changed_at, "changed": changed},
    )
    connection.execute(
        "update raw.users set deleted_at = $t, updated_at = $t where user_key = $k",
        {"t": changed_at, "k": deleted},
    )
    connection.execute(
        "insert into raw.users select (select max(user_key) + 1 from raw.users), 'spark-new-user', "
        "properties, source_name, $t, $t, null from raw.users where user_key = $k",
        {"t": changed_at, "k": busiest},
    )
    (deleted_id,) = connection.execute(
        "select user_id from raw.users where user_key = $k", {"k": deleted}
    ).fetchone()
    later_users = tmp_path / "later-users.parquet"
    connection.execute(
        "copy (select user_key, user_id, cast(properties as varchar) as properties, updated_at, "
        f"deleted_at from raw.users) to '{later_users}' (format parquet)"
    )
    user_count = connection.execute("select count(*) from raw.users").fetchall()[0][0]
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
        BREAKER,
        members_table="main.later_members",
        catalog_table="main.later_catalog",
    )
    # DuckDB's publish step: the week's events into a store of their own, with the workflows.
    setup = load_workflow_setup(_mirror_settings(tmp_path))
    duckdb_store = MembershipStore(f"sqlite:///{tmp_path / 'duckdb-store.sqlite'}").create()
    publish_outbox(connection, duckdb_store, setup.triggers, setup.default_sink, LATER)
    duckdb_outbox = _outbox(connection, keys)
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
    assert any(e[2] == deleted_id and e[3] == "exited" for e in later_events)
    assert any(e[2] == "spark-new-user" and e[3] == "entered" for e in later_events)

    # Spark: the generated project, in a temporary copy (dbt writes its target/ and logs/ there).
    project = tmp_path / SPARK_PROJECT_FOLDER
    shutil.copytree(
        ROOT / SPARK_PROJECT_FOLDER, project, ignore=shutil.ignore_patterns("target", "logs")
    )
    spark = SparkRun(project, tmp_path / "spark")

    # 1. The first build: full. It writes the bases of the versioned tables (its log: one row, a
    # null user).
    first_output = spark.run(FIRST, users)
    assert "full build: every user evaluated" in first_output
    (first_run,) = COMMITTED.findall(first_output)
    # A full build's audiences read every user's typed columns (int_users_to_evaluate: a view).
    assert not (tmp_path / "spark" / "versions" / "int_users_to_evaluate").exists()

    # 2. A week later, with the changed users: incremental. Killed (SIGKILL, the whole process
    # group, JVM included) while it writes its events into their folder, before it attaches them,
    # after it wrote and attached its versions of int_users_flattened and audience_members. (A kill
    # at the "staged" line races with the attach, which follows within milliseconds; the write
    # takes Spark seconds.)
    process = spark.start(LATER, later_users)
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
    text = "".join(output)
    assert process.returncode == -signal.SIGKILL, text[-4000:]
    assert killed_run and "membership events published" not in text
    # A new time and new users re-parse nothing: dbt reuses the first build's parse (issue 16).
    assert "Unable to do partial parsing" not in text, text[:3000]
    assert "incremental build: " in text and "audience_members version written" in text
    assert _versions_on_disk(tmp_path) >= {("audience_members", f"run_id={killed_run}")}
    # What a reader sees after the kill: the first build's members, not the killed build's
    # (its versions are attached but not committed).
    after_kill = spark.query("select audience_key, user_id from audiences.audience_members")
    assert {
        key: {r["user_id"] for r in after_kill if r["audience_key"] == key} for key in keys
    } == {key: first_members[key] for key in keys}

    # 3. The rerun at the same time, as a Dagster run of the Spark assets (AUDIENCES_ENGINE=spark's
    # job): incremental again (the killed build's users included), and only the users that changed
    # or that "now" moved over are re-evaluated. Its second asset records Spark's committed builds
    # (not the killed one) in a DuckDB warehouse by the same steps as DuckDB's diff, and publishes
    # them to the store with the workflow triggers (checked in 4).
    settings = _mirror_settings(tmp_path)
    mirror = duckdb.connect(str(settings.duckdb_path))
    mirror.execute("set TimeZone = 'UTC'")
    mirror.execute("attach $path as source (read_only)", {"path": str(warehouse)})
    mirror.execute("create schema raw")
    mirror.execute("create table raw.users as select * from source.raw.users")  # for conditions
    mirror.execute("detach source")
    mirror.close()
    mirror_store = MembershipStore(settings.store_url).create()
    members_meta, events_meta = _dagster_spark_run(settings, tmp_path, later_users, monkeypatch)
    assert members_meta["build"] == "incremental"
    reevaluated = members_meta["users_reevaluated"]
    assert 5 <= reevaluated < user_count / 2, (reevaluated, user_count)
    # What the UI shows: each audience's members, as DuckDB finds them.
    assert members_meta["audience_sizes"] == {key: len(later_members[key]) for key in keys}
    assert members_meta["members"] == sum(len(ids) for ids in later_members.values())

    # On disk after the rerun: the first build's bases and the rerun's deltas. The killed build's
    # versions, log and staged events are gone (pruned once a build committed after it).
    committed = members_meta["committed_run"]
    assert _versions_on_disk(tmp_path) == {
        (table, f"run_id={run}")
        for table in ("audience_members", "int_users_flattened")
        for run in (first_run, committed)
    }
    logs = {p.name for p in (tmp_path / "spark" / "reevaluation_log").iterdir()}
    assert logs == {f"run_id={first_run}", f"run_id={committed}"}
    assert not (tmp_path / "spark" / EVENTS_FOLDER / f"run_id={killed_run}").exists()
    # The deltas hold the re-evaluated users' rows only: the write follows the changed users.
    with duckdb.connect() as reader:  # not the module's shared connection, left to other tests
        reader.execute("attach $path as duck (read_only)", {"path": str(warehouse)})
        logged = _parquet_rows(reader, tmp_path / "spark" / "reevaluation_log", committed)
        assert len(logged) == reevaluated
        reevaluated_ids = {
            row[0]
            for row in reader.execute(
                "select user_id from duck.raw.users where user_key in (select unnest($keys))",
                {"keys": [row[0] for row in logged]},
            ).fetchall()
        }
        assert {
            row[0]
            for row in _parquet_rows(reader, tmp_path / "spark" / "reevaluation_log", first_run)
        } == {None}
        flattened_delta = _parquet_rows(
            reader, _versions_folder(tmp_path, "int_users_flattened"), committed
        )
        members_delta = _parquet_rows(
            reader, _versions_folder(tmp_path, "audience_members"), committed
        )
    # Every re-evaluated user but the deleted one, who is in no audience (the diff exits it).
    assert len(flattened_delta) == reevaluated - 1
    assert {(row[0], row[2]) for row in members_delta} == {
        (key, user) for key in keys for user in later_members[key] if user in reevaluated_ids
    }

    # 3b. A build at the same time with nothing changed, made to compact (one delta since the
    # base is enough here): it re-evaluates nobody and writes new bases, the committed state as
    # it was; the first build's and the rerun's versions and logs are then pruned.
    settings_file = project / "dbt_project.yml"
    settings_file.write_text(
        settings_file.read_text().replace("compact_after_builds: 48", "compact_after_builds: 1")
    )
    compacted = spark.build(LATER)
    assert compacted.users_reevaluated == 0 and "writes new bases" in compacted.kind
    assert _versions_on_disk(tmp_path) == {
        ("audience_members", f"run_id={compacted.committed_run}"),
        ("int_users_flattened", f"run_id={compacted.committed_run}"),
    }
    assert {p.name for p in (tmp_path / "spark" / "reevaluation_log").iterdir()} == {
        f"run_id={compacted.committed_run}"
    }
    assert spark.member_counts(compacted.committed_run) == members_meta["audience_sizes"]

    rows = spark.query(
        "select 'event' as kind, event_id, audience_key, user_id, event_type, entry_number, "
        "is_backfill, cast(evaluated_at as string) as evaluated_at, run_id "
        "from raw.membership_events where event_type in ('entered', 'exited') "
        "union all "
        "select 'member', null, audience_key, user_id, null, null, null, null, null "
        "from audiences.audience_members"
    )
    events = [r for r in rows if r["kind"] == "event"]
    # Exactly once: no event id twice in the whole history, each evaluation in one partition.
    assert len(events) == len({r["event_id"] for r in events})
    spark_first = [r for r in events if r["evaluated_at"].startswith("2026-11-01")]
    spark_later = [r for r in events if r["evaluated_at"].startswith("2026-11-09")]
    assert len({r["run_id"] for r in spark_first}) == 1
    assert {r["run_id"] for r in spark_later} == {committed}
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

    # 4. Spark's committed builds (not the killed one) through DuckDB's path, by the Dagster run's
    # second asset: recorded in a DuckDB warehouse's outbox by the same steps as DuckDB's diff (the
    # circuit breaker holds the same audiences, with the same batches), published to the store
    # with the workflow triggers, and delivered to the file sink.
    assert members_meta["committed_run"] == spark_later[0]["run_id"]
    assert events_meta["builds_recorded"] == [format_time(FIRST), format_time(LATER)]
    assert events_meta["entered"] == sum(r["event_type"] == "entered" for r in events)
    assert events_meta["exited"] == sum(r["event_type"] == "exited" for r in events) > 0
    mirror = duckdb.connect(str(settings.duckdb_path))
    mirror_outbox = _outbox(mirror, keys)
    assert sorted(events_meta["held_batches"]) == sorted(
        {row[6] for row in mirror_outbox[0] if row[6]}
    )
    assert mirror_outbox[0] == duckdb_outbox[0], "the same events, ids and held batch ids"
    assert mirror_outbox[1] == duckdb_outbox[1] and duckdb_outbox[1], "the same held batches"
    # Recorded once: publishing the same builds again records and queues nothing more.
    again, _ = publish_spark_builds(
        mirror, mirror_store, setup, tmp_path / "spark", spark_later[0]["run_id"], BREAKER, LATER
    )
    assert again == []
    mirror.close()
    deliveries = _deliveries(mirror_store)
    assert deliveries == _deliveries(duckdb_store), "the same workflow deliveries, held or not"
    assert events_meta["deliveries_created"] == len(deliveries) > 0
    assert events_meta["events_published"] == len(events)
    assert "held" in {d[4] for d in deliveries}, (
        "the breaker holds the deliveries it holds on DuckDB"
    )
    # Held deliveries wait for a person; once released, every one reaches the file sink.
    for batch_id in {row[6] for row in mirror_outbox[0] if row[6]}:
        release_batch(mirror_store, batch_id)
    sinks, _ = load_sinks(settings.sinks_file)
    deliver_due(mirror_store, sinks)
    lines = (tmp_path / "out" / "triggers.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["delivery_id"] for line in lines) == sorted(
        d[0] for d in deliveries
    )
