"""Two runs at once: the second waits for the first, both complete, and the outbox is published.

Before, two overlapping `audiences run` both failed ("cannot open the warehouse"), leaving the
outbox half published until a third run: the instance's run queue serializes the runs Dagster's
daemon launches, but `audiences run` executes the job in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import sqlalchemy as sa

from condition_harness import ROOT, SAMPLE_TIME

pytestmark = pytest.mark.slow


def audiences_run(folder: Path, environment: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "audiences"), "--duckdb", str(folder / "warehouse.duckdb"),
         "--sinks", str(folder / "sinks.yml"), "--sources", str(ROOT / "data" / "sources.yml"),
         "--definitions", str(ROOT / "data" / "audiences"), "--evaluation-time", SAMPLE_TIME, "run"],
        cwd=folder, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_cli_runs_both_complete_one_after_the_other(tmp_path):
    from audiences.membership.store import MembershipStore, membership_events
    from audiences.writer_lock import lock_path

    (tmp_path / "sinks.yml").write_text("default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n")
    # No DAGSTER_HOME: both runs go to the working folder's `dagster_home`, the one `dg dev` shows.
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("AUDIENCES_") and name != "DAGSTER_HOME"}
    first = audiences_run(tmp_path, environment)
    lock = lock_path(tmp_path / "warehouse.duckdb")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        holder = json.loads(lock.read_text() or "{}") if lock.exists() else {}
        if holder.get("pid") == first.pid:
            break
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    second = audiences_run(tmp_path, environment)
    first_out, first_err = first.communicate(timeout=900)
    second_out, second_err = second.communicate(timeout=900)
    assert first.returncode == 0, first_err
    assert second.returncode == 0, second_err
    # The second said which run it waited for.
    assert f"pid {first.pid}" in second_err and "waiting for it to finish" in second_err
    assert "evaluated at" in first_out and "evaluated at" in second_out
    # Everything the runs wrote to the outbox was published, and its events reached the store (a new
    # audience's first members, backfill, only as current membership).
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        published, written = connection.execute(
            "select (select max(published_sequence) from raw.outbox_published), "
            "(select max(sequence) from raw.membership_outbox)").fetchone()
        events = {event_id for (event_id,) in connection.execute(
            "select event_id from raw.membership_outbox where not is_backfill").fetchall()}
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
        stats = sorted((instance.get_run_stats(run.run_id) for run in runs), key=lambda s: s.start_time)
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
