"""Issue 17, item 4: a run's events are stored without opening SQLite files once per event."""

import json
import os
import subprocess
import sys
from sqlite3 import dbapi2  # what SQLAlchemy's SQLite dialect connects with

import dagster as dg
from condition_harness import ROOT
from dagster import DagsterInstance

from pipelines.defs.dagster_storage import reuse_sqlite_connections

OUTPUTS = 30


def _views_and_members_job(tmp_path, monkeypatch, count: int, parents: int):
    """A job of one step materializing `count` views and then `members`, whose parents are the
    first `parents` views, its outputs stored together as the dbt assets store theirs; in a
    Dagster instance of its own (DAGSTER_HOME), with the engine's SQLite patches applied as
    loading the code location applies them. Returns the job, the views and `members`."""
    from pipelines.defs.dagster_storage import stored_together

    reuse_sqlite_connections()  # what loading the code location does
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    views = [dg.AssetSpec(f"view{index}") for index in range(count)]
    members = dg.AssetSpec("members", deps=[view.key for view in views[:parents]])

    @dg.multi_asset(specs=[*views, members])
    def evaluation(context: dg.AssetExecutionContext):
        with stored_together(context.instance):  # as the dbt assets yield their outputs
            for index, spec in enumerate(views):
                yield dg.MaterializeResult(asset_key=spec.key, metadata={"member_count": index})
            yield dg.MaterializeResult(asset_key=members.key)

    job = dg.Definitions(assets=[evaluation]).resolve_implicit_global_asset_job_def()
    return job, views, members


def test_a_runs_events_reuse_their_connections_and_other_processes_read_them(tmp_path, monkeypatch):
    """Dagster's SQLite event log opened the run's file (and the index, for a materialization)
    anew for every event: two connections per materialization. Kept open, a run of 30
    materializations opens a handful; another process (the web server's) reads every event
    while this one still holds its connections, and wiping the history closes them first."""
    reuse_sqlite_connections()  # what loading the code location does
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    opened = 0
    connect = dbapi2.connect

    def counted(*arguments, **keywords):
        nonlocal opened
        opened += 1
        return connect(*arguments, **keywords)

    specs = [dg.AssetSpec(f"a{index}") for index in range(OUTPUTS)]

    @dg.multi_asset(specs=specs)
    def many():
        for spec in specs:
            yield dg.MaterializeResult(asset_key=spec.key, metadata={"index": 1})

    job = dg.Definitions(assets=[many]).resolve_implicit_global_asset_job_def()
    with DagsterInstance.get() as instance:
        job.execute_in_process(instance=instance)  # the index and storage are set up
        monkeypatch.setattr(dbapi2, "connect", counted)
        result = job.execute_in_process(instance=instance)
        monkeypatch.setattr(dbapi2, "connect", connect)
        assert result.success
        assert opened <= 10, opened  # was 2 per materialization and 1 per other event

        reader = subprocess.run(
            [
                sys.executable,
                "-c",
                "from dagster import DagsterInstance, AssetKey\n"
                "instance = DagsterInstance.get()\n"
                f"print(len(instance.all_logs({result.run_id!r})), "
                "instance.get_latest_materialization_event(AssetKey('a29')).run_id)",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        count, latest_run = reader.stdout.split()
        assert int(count) == len(instance.all_logs(result.run_id)) > OUTPUTS
        assert latest_run == result.run_id

        instance.wipe()  # Dagster removes the run files: none stays open, and runs go on after
        assert instance.get_latest_materialization_event(dg.AssetKey("a29")) is None
        assert job.execute_in_process(instance=instance).success
        assert instance.get_latest_materialization_event(dg.AssetKey("a29")) is not None


def _commits_counted() -> tuple[list[int], callable]:
    """A counter of the SQLite transactions committed by any SQLAlchemy engine, and its remover."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    committed = [0]

    def count(connection):
        committed[0] += 1

    event.listen(Engine, "commit", count)
    return committed, lambda: event.remove(Engine, "commit", count)


def test_a_steps_outputs_and_a_runs_planned_events_are_stored_together(tmp_path, monkeypatch):
    """Issue 25: Dagster stored each event in transactions of its own, a materialization in three
    (the run's file, then the index's event, tags and asset row), and a run's creation its planned
    materializations one by one: a run of 100 outputs committed 549 times, now 50 (20,000 times at
    2,000 audiences). What is stored
    is the same: every event in Dagster's order, each asset's latest materialization with its
    metadata, and the provenance of an asset whose parent was materialized earlier in the step
    pointing at that parent's stored record (events kept are written before any read)."""
    job, views, members = _views_and_members_job(tmp_path, monkeypatch, 100, parents=2)
    with DagsterInstance.get() as instance:
        job.execute_in_process(instance=instance)  # the index and storage are set up
        committed, stop = _commits_counted()
        try:
            result = job.execute_in_process(instance=instance)
        finally:
            stop()
        assert result.success
        assert committed[0] < 100, committed[0]  # 549 before, 50 after

        stored = [
            (entry.dagster_event.event_type_value, entry.dagster_event.step_key)
            for entry in instance.all_logs(result.run_id)
            if entry.dagster_event is not None
        ]
        produced = [(event.event_type_value, event.step_key) for event in result.all_events]
        assert [e for e in stored if e in produced] == [e for e in produced if e in stored]
        assert stored.count(("ASSET_MATERIALIZATION", "evaluation")) == 101
        assert stored.count(("STEP_OUTPUT", "evaluation")) == 101
        assert stored.count(("ASSET_MATERIALIZATION_PLANNED", "evaluation")) == 101
        latest = instance.get_latest_materialization_event(views[99].key)
        assert latest.run_id == result.run_id
        assert latest.asset_materialization.metadata["member_count"].value == 99
        [parent] = instance.get_asset_records([views[1].key])
        child = instance.get_latest_materialization_event(members.key)
        tags = child.asset_materialization.tags
        assert tags[f"dagster/input_event_pointer/{views[1].key.to_user_string()}"] == str(
            parent.asset_entry.last_materialization_record.storage_id
        )


KILLED_RUN = """
import os, signal
import dagster as dg
from dagster import DagsterInstance
from pipelines.defs import dagster_storage
from pipelines.defs.dagster_storage import reuse_sqlite_connections, stored_together

reuse_sqlite_connections()
dagster_storage.EVENTS_PER_TRANSACTION = 10**6
store_event = dagster_storage.SqliteEventLogStorage._audiences_store_event
store_rows = dagster_storage._store_rows
written = 0

def then_die():
    global written
    written += 1
    if written == 61:  # inside the transactions of the kept events: the run's file and the index
        os.kill(os.getpid(), signal.SIGKILL)

def store_then_die(storage, event):
    store_event(storage, event)
    then_die()

def store_rows_then_die(storage, writing, event):
    store_rows(storage, writing, event)
    then_die()

# Kept events are written by Dagster's store_event or as rows (_store_rows): either way
dagster_storage.SqliteEventLogStorage._audiences_store_event = store_then_die
dagster_storage._store_rows = store_rows_then_die
specs = [dg.AssetSpec(f"view{index}") for index in range(50)]

@dg.multi_asset(specs=specs)
def evaluation(context):
    with stored_together(context.instance):
        for spec in specs:
            yield dg.MaterializeResult(asset_key=spec.key, metadata={"run": "killed"})

job = dg.Definitions(assets=[evaluation]).resolve_implicit_global_asset_job_def()
with DagsterInstance.get() as instance:
    job.execute_in_process(instance=instance)
"""


def test_a_run_killed_while_its_events_are_written_leaves_the_history_usable(tmp_path, monkeypatch):
    """kill -9 while the kept events are being written: their transactions are rolled back whole
    (none of those events stored, in the run's file or in the index), the run is left as Dagster
    leaves a killed run, and the next run stores and reads its events as usual."""
    reuse_sqlite_connections()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN], capture_output=True, timeout=180)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]

    specs = [dg.AssetSpec(f"view{index}") for index in range(50)]

    @dg.multi_asset(specs=specs)
    def evaluation(context):
        for spec in specs:
            yield dg.MaterializeResult(asset_key=spec.key, metadata={"run": "next"})

    job = dg.Definitions(assets=[evaluation]).resolve_implicit_global_asset_job_def()
    with DagsterInstance.get() as instance:
        [run] = instance.get_runs()
        outputs = [
            entry
            for entry in instance.all_logs(run.run_id)
            if entry.dagster_event is not None
            and entry.dagster_event.event_type_value in ("STEP_OUTPUT", "ASSET_MATERIALIZATION")
        ]
        assert outputs == []  # the kept events' transaction was rolled back whole
        assert instance.get_latest_materialization_event(specs[0].key) is None
        result = job.execute_in_process(instance=instance)
        assert result.success
        latest = instance.get_latest_materialization_event(specs[49].key)
        assert latest.run_id == result.run_id
        assert latest.asset_materialization.metadata["run"].value == "next"


def test_a_steps_parents_are_taken_from_what_it_stored_and_each_event_serialized_once(
    tmp_path, monkeypatch
):
    """Issue 25, seventh pass: an asset's provenance read each parent's latest materialization
    back from the index (the whole record deserialized), though the same step had just stored it;
    and the event log serialized each materialization twice (its row, then the asset's latest
    record). Now neither: what the step records is what Dagster's own read gives (the parent's
    stored record: its id, data version, run and time), and the asset's latest record is the text
    Dagster's serializer writes for it."""
    from dagster._core.definitions.data_version import (
        extract_data_version_from_entry,
        get_input_data_version_tag,
        get_input_event_pointer_tag,
    )
    from dagster._core.event_api import EventLogRecord
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
    from dagster_shared.serdes import deserialize_value, serdes, serialize_value

    job, views, members = _views_and_members_job(tmp_path, monkeypatch, OUTPUTS, parents=OUTPUTS)

    read: list = []
    get_asset_records = SqlEventLogStorage.get_asset_records

    def counted_reads(self, asset_keys=None):
        read.extend(asset_keys or [])
        return get_asset_records(self, asset_keys)

    records_serialized = [0]
    transform = serdes._transform_for_serialization

    def counted_serialization(value, *arguments, **keywords):
        records_serialized[0] += type(value) is EventLogRecord
        return transform(value, *arguments, **keywords)

    with DagsterInstance.get() as instance:
        job.execute_in_process(instance=instance)  # the index and storage are set up
        monkeypatch.setattr(SqlEventLogStorage, "get_asset_records", counted_reads)
        monkeypatch.setattr(serdes, "_transform_for_serialization", counted_serialization)
        result = job.execute_in_process(instance=instance)
        monkeypatch.undo()
        assert result.success
        assert not {view.key for view in views} & set(read), read  # 30 parents read back before
        assert records_serialized[0] == 0  # one per materialization before (31)

        child = instance.get_latest_materialization_event(members.key).asset_materialization
        remembered = instance.event_log_storage.__dict__["_audiences_materialized"]
        for record in instance.get_asset_records([view.key for view in views]):
            key, latest = (
                record.asset_entry.asset_key,
                record.asset_entry.last_materialization_record,
            )
            assert latest.run_id == result.run_id
            version = extract_data_version_from_entry(latest.event_log_entry)
            assert child.tags[get_input_event_pointer_tag(key)] == str(latest.storage_id)
            assert child.tags[get_input_data_version_tag(key)] == version.value
            assert remembered[key] == (
                latest.storage_id,
                version,
                latest.run_id,
                latest.event_log_entry.timestamp,
            )

        # the asset's latest record as stored is the text Dagster's serializer writes for it
        import sqlite3

        with sqlite3.connect(tmp_path / "history" / "runs" / "index.db") as index:
            stored = dict(index.execute("select asset_key, last_materialization from asset_keys"))
        for key in (views[0].key, members.key):
            text = stored[key.to_string()]
            assert serialize_value(deserialize_value(text, EventLogRecord)) == text

        # a wiped asset is forgotten: its next reader reads the index again
        instance.wipe_assets([views[0].key])
        assert views[0].key not in instance.event_log_storage.__dict__.get(
            "_audiences_materialized", {}
        )


CREATE_RUN = """
import json, sys
import dagster as dg
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from sqlalchemy import event
from sqlalchemy.engine import Engine

specs = [dg.AssetSpec(f"view{index}") for index in range(100)]

@dg.multi_asset(specs=specs)
def evaluation():
    for spec in specs:
        yield dg.MaterializeResult(asset_key=spec.key)

job = dg.Definitions(assets=[evaluation]).resolve_implicit_global_asset_job_def()
with dg.DagsterInstance.get() as instance:
    instance.get_runs()  # the storages are set up
    committed = [0]
    def count(connection):
        committed[0] += 1
    event.listen(Engine, "commit", count)
    run = instance.create_run_for_job(job_def=job)  # what the daemon and the web server do
    event.remove(Engine, "commit", count)
    stored = [
        (entry.dagster_event.event_type_value, entry.dagster_event.asset_key.to_user_string())
        for entry in instance.all_logs(run.run_id)
    ]
    print(json.dumps({
        "commits": committed[0],
        "stored": stored,
        "patched": getattr(SqliteEventLogStorage, "_audiences_reuses_connections", False),
        "instance": type(instance).__name__,
        "code_location_loaded": "pipelines.defs.environments" in sys.modules,
    }))
"""


def test_runs_the_daemon_and_the_web_server_create_store_their_planned_events_together(tmp_path):
    """Issue 25: the patches of the SQLite history were applied where the code location loads;
    the daemon (schedules, sensors) and the web server (the UI's launches) create runs without
    loading it, and stored a run's planned materializations (one per asset, 2,000 at 2,000
    audiences) each in its own transactions: 209 commits for 100 assets. The project's
    `dagster.yaml` names an instance class that applies them as the instance is built: 11. The
    same events in the same order; with an event log other than Dagster's SQLite one (PostgreSQL,
    here Dagster's in-memory one, which is not SQLite's either) nothing is patched."""
    project_yaml = (ROOT / "dagster_home" / "dagster.yaml").read_text()
    assert "AudiencesInstance" in project_yaml
    homes = {
        "project": project_yaml,
        # A user's own dagster.yaml without the class: as before.
        "without the class": project_yaml.split("instance_class:")[0],
        "other event log": project_yaml
        + "event_log_storage:\n  module: dagster._core.storage.event_log\n"
        + "  class: InMemoryEventLogStorage\n",
    }
    results = {}
    for name, text in homes.items():
        home = tmp_path / name.replace(" ", "_")
        home.mkdir()
        (home / "dagster.yaml").write_text(text)
        created = subprocess.run(
            [sys.executable, "-c", CREATE_RUN],
            env={**os.environ, "DAGSTER_HOME": str(home)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert created.returncode == 0, created.stderr[-3000:]
        results[name] = json.loads(created.stdout.splitlines()[-1])

    project = results["project"]
    assert project["instance"] == "AudiencesInstance" and project["patched"]
    assert not project["code_location_loaded"]
    planned = [["ASSET_MATERIALIZATION_PLANNED", f"view{index}"] for index in range(100)]
    assert sorted(project["stored"]) == sorted(planned)
    assert project["commits"] < 20, project["commits"]  # 209 without the class

    without = results["without the class"]
    assert without["instance"] == "DagsterInstance" and not without["patched"]
    assert without["commits"] > 100
    assert project["stored"] == without["stored"]  # the same events, in Dagster's order

    other = results["other event log"]
    assert other["instance"] == "AudiencesInstance" and not other["patched"]
    assert other["stored"] == without["stored"]


HISTORY_EVENTS = """
import json, sys
import dagster as dg
from dagster import DagsterInstance

parents = [dg.AssetSpec(f"view{index}") for index in range(12)]
child = dg.AssetSpec("members", deps=[spec.key for spec in parents])

@dg.multi_asset(specs=[*parents, child], check_specs=[dg.AssetCheckSpec("counted", asset="members")])
def evaluation(context: dg.AssetExecutionContext):
    context.log.info("a message of the step's own")
    context.log_event(dg.AssetObservation(asset_key=parents[0].key, metadata={"seen": 1}))
    for index, spec in enumerate(parents):
        yield dg.MaterializeResult(
            asset_key=spec.key, metadata={"member_count": index}, data_version=dg.DataVersion(str(index % 3))
        )
    yield dg.MaterializeResult(asset_key=child.key, metadata={"members": 12})
    yield dg.AssetCheckResult(asset_key=child.key, check_name="counted", passed=True)

days = dg.StaticPartitionsDefinition(["a", "b"])

@dg.asset(partitions_def=days)
def daily(context):
    return dg.MaterializeResult(metadata={"partition": context.partition_key})

@dg.multi_asset(specs=[dg.AssetSpec("broken_a"), dg.AssetSpec("broken_b")])
def broken():
    yield dg.MaterializeResult(asset_key="broken_a")
    raise Exception("fails after one of its two outputs")

definitions = dg.Definitions(assets=[evaluation, daily, broken])
job = definitions.resolve_implicit_global_asset_job_def()
with DagsterInstance.get() as instance:
    runs = [
        job.execute_in_process(instance=instance, asset_selection=[*[s.key for s in parents], child.key]),
        job.execute_in_process(instance=instance, asset_selection=[*[s.key for s in parents], child.key]),
        job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("daily")], partition_key="b"),
        job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("broken_a"), dg.AssetKey("broken_b")], raise_on_error=False),
    ]
    print(json.dumps([result.run_id for result in runs]))
"""


def _tables(folder) -> dict:
    """Every row of every table of every SQLite file in an event log's folder (but the times the
    database sets on its own when a row is made: `create_timestamp`, a migration's completion)."""
    import sqlite3

    found = {}
    for path in sorted(folder.glob("*.db")):
        with sqlite3.connect(path) as database:
            names = [
                name
                for (name,) in database.execute(
                    "select name from sqlite_master where type = 'table' order by name"
                )
            ]
            for name in names:
                cursor = database.execute(f'select * from "{name}" order by rowid')
                columns = [column[0] for column in cursor.description]
                kept = [
                    index
                    for index, column in enumerate(columns)
                    if column not in ("create_timestamp", "migration_completed")
                ]
                found[(path.name, name)] = [tuple(row[i] for i in kept) for row in cursor]
    return found


def test_events_written_as_rows_equal_dagsters_own_writes(tmp_path, monkeypatch):
    """Issue 25, eighth pass: kept events are written as rows through the DB-API (`_store_rows`),
    not by Dagster's `store_event` one SQLAlchemy statement at a time. The events of real runs
    (planned and done materializations with data versions and provenance, an observation, a
    check, a partition, a failed step, run and step events, a message) are stored once as rows
    and once by Dagster's `store_event` on two new SQLite instances: every table of every file
    holds the same rows, and Dagster's reads give the same answers."""
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    from pipelines.defs import dagster_storage
    from pipelines.defs.dagster_storage import stored_together

    reuse_sqlite_connections()
    source = tmp_path / "source"
    source.mkdir()
    (source / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    made = subprocess.run(
        [sys.executable, "-c", HISTORY_EVENTS],
        env={**os.environ, "DAGSTER_HOME": str(source)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    run_ids = json.loads(made.stdout.splitlines()[-1])
    with DagsterInstance.from_config(str(source)) as instance:
        events = [entry for run_id in run_ids for entry in instance.all_logs(run_id)]
    types = {entry.dagster_event.event_type_value for entry in events if entry.dagster_event}
    assert {
        "ASSET_MATERIALIZATION_PLANNED",
        "ASSET_MATERIALIZATION",
        "ASSET_OBSERVATION",
        "ASSET_CHECK_EVALUATION",
        "STEP_OUTPUT",
        "STEP_FAILURE",
        "PIPELINE_SUCCESS",
        "PIPELINE_FAILURE",
    } <= types, sorted(types)
    assert any(entry.dagster_event is None for entry in events)
    assert any(entry.dagster_event and entry.dagster_event.partition for entry in events)

    written_as_rows = [0]
    store_rows = dagster_storage._store_rows

    def counted(*arguments):
        written_as_rows[0] += 1
        return store_rows(*arguments)

    monkeypatch.setattr(dagster_storage, "_store_rows", counted)
    instances = {}
    for name in ("rows", "dagster"):
        home = tmp_path / name
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        instance = instances[name] = DagsterInstance.from_config(str(home))
        storage = instance.event_log_storage
        if name == "rows":
            with stored_together(instance):
                for entry in events:
                    storage.store_event(entry)
        else:  # Dagster's own, one event after another
            for entry in events:
                SqliteEventLogStorage._audiences_store_event(storage, entry)
    assert written_as_rows[0] > len(events) * 0.8, (written_as_rows[0], len(events))

    rows, dagster = (_tables(tmp_path / name / "history" / "runs") for name in instances)
    assert rows.keys() == dagster.keys()
    assert ("index.db", "asset_event_tags") in rows
    for table, expected in dagster.items():
        assert rows[table] == expected, table
    assert all(dagster[(f"{run_id}.db", "event_logs")] for run_id in run_ids)

    def reads(instance) -> list:
        keys = sorted(instance.get_asset_keys(), key=str)
        answers = [[str(key) for key in keys]]
        for key in keys:
            latest = instance.get_latest_materialization_event(key)
            answers.append(None if latest is None else dg.serialize_value(latest))
            answers.append(
                dg.serialize_value(list(instance.fetch_materializations(key, limit=100).records))
            )
            answers.append(
                dg.serialize_value(list(instance.fetch_observations(key, limit=100).records))
            )
            answers.append(
                dg.serialize_value(
                    list(instance.fetch_planned_materializations(key, limit=100).records)
                )
            )
        for record in instance.get_asset_records(keys):
            entry = record.asset_entry
            answers.append(
                (
                    record.storage_id,
                    dg.serialize_value(entry.last_materialization_record),
                    entry.last_run_id,
                    entry.asset_details,
                )
            )
        for run_id in run_ids:
            answers.append(dg.serialize_value(list(instance.all_logs(run_id))))
        return answers

    assert reads(instances["rows"]) == reads(instances["dagster"])
    for instance in instances.values():
        instance.dispose()


def test_a_runs_snapshots_are_serialized_once_and_stored_as_dagster_writes_them(
    tmp_path, monkeypatch
):
    """Issue 25, eighth pass: creating a run serialized its execution plan's snapshot three times
    (its id twice, its body) and the job snapshots it stores twice (the subset's and its parent's:
    2,000 assets each at 2,000 audiences). Now each once; what is stored is what Dagster's serializer
    writes: each snapshot's body is its text, and its id that text's hash."""
    import zlib

    from dagster._core.snap.execution_plan_snapshot import ExecutionPlanSnapshot
    from dagster._core.snap.job_snapshot import JobSnap
    from dagster_shared.serdes import serdes
    from dagster_shared.serdes.utils import hash_str

    reuse_sqlite_connections()  # what loading the code location does
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    specs = [dg.AssetSpec(f"view{index}") for index in range(OUTPUTS)]

    @dg.multi_asset(specs=specs, can_subset=True)
    def evaluation(context: dg.AssetExecutionContext):
        for key in sorted(context.selected_asset_keys):
            yield dg.MaterializeResult(asset_key=key)

    serialized: list = []
    transform = serdes._transform_for_serialization

    def counted(value, *arguments, **keywords):
        if type(value) in (JobSnap, ExecutionPlanSnapshot):
            serialized.append(value)
        return transform(value, *arguments, **keywords)

    job = dg.Definitions(assets=[evaluation]).resolve_implicit_global_asset_job_def()
    with DagsterInstance.get() as instance:
        monkeypatch.setattr(serdes, "_transform_for_serialization", counted)
        result = job.execute_in_process(instance=instance, asset_selection=[specs[0].key])
        monkeypatch.undo()
        assert result.success
        kinds = [type(value).__name__ for value in serialized]
        # three job snapshots (the subset's, its parent's twice over) and the plan's, each
        # serialized once: 8 serializations before (the plan's 3 times, two job snapshots twice)
        assert sorted(kinds) == ["ExecutionPlanSnapshot", "JobSnap", "JobSnap", "JobSnap"], kinds
        assert len({id(value) for value in serialized}) == len(serialized)

        import sqlite3

        with sqlite3.connect(tmp_path / "history" / "runs.db") as runs:
            stored = runs.execute("select snapshot_id, snapshot_body from snapshots").fetchall()
        run = instance.get_run_by_id(result.run_id)
        assert {snapshot_id for snapshot_id, _ in stored} >= {
            run.job_snapshot_id,
            run.execution_plan_snapshot_id,
        }
        for snapshot_id, body in stored:
            text = zlib.decompress(body).decode("utf-8")
            snapshot = serdes.deserialize_value(text, (JobSnap, ExecutionPlanSnapshot))
            assert serdes.serialize_value(snapshot) == text  # Dagster's own serializer's text
            assert hash_str(text) == snapshot_id
