"""Two runs at once: the second waits for the first, both complete, and the outbox is published.

Before, two overlapping `audiences run` both failed ("cannot open the warehouse"), leaving the
outbox half published until a third run: the instance's run queue serializes the runs Dagster's
daemon launches, but `audiences run` executes the job in its own process.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import sqlalchemy as sa
from condition_harness import ROOT, SAMPLE_TIME, copy_dbt_project

pytestmark = pytest.mark.slow


def audiences_run(folder: Path, environment: dict[str, str]) -> subprocess.Popen:
    """`audiences run` of the sample definitions in `folder`, with the dbt project in `folder`."""
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "audiences"),
            "--duckdb",
            str(folder / "warehouse.duckdb"),
            "--sinks",
            str(folder / "sinks.yml"),
            "--sources",
            str(folder / "sources.yml"),
            "--dbt-project",
            str(folder / "dbt_project"),
            "--definitions",
            str(ROOT / "data" / "audiences"),
            "--evaluation-time",
            SAMPLE_TIME,
            "run",
        ],
        cwd=folder,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_cli_runs_both_complete_one_after_the_other(tmp_path):
    from audiences.store.database import MembershipStore, membership_events

    (tmp_path / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    # The sample's sources, and one whose query takes seconds, while the run holds the warehouse.
    with sqlite3.connect(tmp_path / "slow.sqlite") as connection:
        connection.execute("create table users (id text, plan text)")
        connection.execute("insert into users values ('slow-user', 'free')")
    slow = (
        "select * from users where (with recursive counter(n) as (select 1 union all "
        "select n + 1 from counter where n < 3000000) select count(*) from counter) > 0"
    )
    (tmp_path / "sources.yml").write_text(
        "sources:\n"
        f"  - {{name: crm_export, path: '{ROOT / 'data' / 'sources' / 'users.csv'}', mode: snapshot}}\n"
        f"  - {{name: product_updates, path: '{ROOT / 'data' / 'sources' / 'user_updates.parquet'}', mode: stream}}\n"
        f"  - {{name: slow, path: slow.sqlite, format: sqlite, mode: stream, query: '{slow}'}}\n"
    )
    # No DAGSTER_HOME: both runs go to the working folder's `dagster_home`, the one `dg dev` shows.
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("AUDIENCES_") and name != "DAGSTER_HOME"
    }
    # The runs' dbt project: a copy of the engine's, parsed before they start together.
    from audiences.dbt.project import prepare
    from audiences.settings import Settings

    project = copy_dbt_project(tmp_path / "dbt_project")
    prepare(
        Settings.from_env({}, dbt_project_dir=project, definitions_dir=ROOT / "data" / "audiences")
    )
    # Started together, both reach the warehouse within moments of each other.
    runs = [audiences_run(tmp_path, environment), audiences_run(tmp_path, environment)]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
    assert all("evaluated at" in out for out, _ in outputs)
    # One waited for the other, and said which run it waited for.
    waited = [index for index, (_, err) in enumerate(outputs) if "waiting for it to finish" in err]
    assert len(waited) == 1
    assert f"pid {runs[1 - waited[0]].pid}" in outputs[waited[0]][1]
    # Everything the runs wrote to the outbox was published, and its events reached the store (a new
    # audience's first members, backfill, only as current membership).
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        published, written = connection.execute(
            "select (select max(published_sequence) from raw.outbox_published), "
            "(select max(sequence) from raw.membership_outbox)"
        ).fetchone()
        events = {
            event_id
            for (event_id,) in connection.execute(
                "select event_id from raw.membership_outbox where not is_backfill"
            ).fetchall()
        }
    assert written and published == written
    store = MembershipStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    stored = {row["event_id"] for row in store.rows(sa.select(membership_events.c.event_id))}
    store.dispose()
    assert events <= stored
    # Both runs are in the instance the UI shows, one after the other.
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="audiences_job"))
        assert [run.status for run in runs] == [dg.DagsterRunStatus.SUCCESS] * 2
        assert {run.tags.get("audiences/launched_by") for run in runs} == {"audiences run"}
        stats = sorted(
            (instance.get_run_stats(run.run_id) for run in runs), key=lambda s: s.start_time
        )
        assert stats[0].end_time <= stats[1].start_time


def test_cli_and_dg_dev_share_the_working_folders_dagster_home(tmp_path, monkeypatch):
    from audiences.settings import Settings, prepare_dagster_home

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    # README: `DAGSTER_HOME=$PWD/dagster_home dg dev`; the CLI uses the same folder unless told.
    assert settings.dagster_home == tmp_path / "dagster_home"
    prepare_dagster_home(settings.dagster_home)
    assert "audiences/duckdb" in (tmp_path / "dagster_home" / "dagster.yaml").read_text()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "elsewhere"))
    assert Settings.from_env({}).dagster_home == tmp_path / "elsewhere"


def test_a_run_killed_while_holding_the_warehouse_does_not_block_the_next(tmp_path):
    import signal
    import threading
    import time

    from audiences.warehouse.lock import hold_writer_lock, lock_path

    warehouse = tmp_path / "warehouse.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from audiences.warehouse.lock import hold_writer_lock\n"
                f"with hold_writer_lock({str(warehouse)!r}, {{'run_id': 'r-1', 'job': 'audiences_job'}}):\n"
                "    print('held', flush=True)\n"
                "    time.sleep(600)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    reports: list[str] = []
    try:
        killer = threading.Timer(1.5, lambda: os.kill(holder.pid, signal.SIGKILL))
        killer.start()
        started = time.monotonic()
        with hold_writer_lock(warehouse, {"job": "reevaluate_audiences"}, report=reports.append):
            waited = time.monotonic() - started
            assert f'"pid": {os.getpid()}' in lock_path(warehouse).read_text()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert 1 < waited < 30
    assert not lock_path(warehouse).exists()  # a finished run leaves no file behind
    assert reports == [
        f"{warehouse}: run r-1 (audiences_job, pid {holder.pid}, started "
        + reports[0].split("started ", 1)[1].split(")", 1)[0]
        + ") is writing this warehouse; waiting for it to finish"
    ]
