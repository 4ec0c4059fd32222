"""Issue 17, item 4: a run's events are stored without opening SQLite files once per event."""

import subprocess
import sys
from sqlite3 import dbapi2  # what SQLAlchemy's SQLite dialect connects with

import dagster as dg
from dagster import DagsterInstance

from pipelines.defs.dagster_storage import reuse_sqlite_connections

OUTPUTS = 30


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
