"""Runs launched through the project's run launcher are forked from a warm fork server
(`pipelines/fork_server.py`): a run killed with SIGKILL dies alone and is marked failed, the server
lives on, a change to what it loaded makes the next launch start a new one, and a forked run
materializes what the same run executed in its own process does."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta

import dagster as dg
import duckdb
import pytest
from condition_harness import NOW, ROOT, copy_sample_run
from dagster._core.definitions.reconstruct import ReconstructableRepository

from audiences.settings import Settings, format_time
from pipelines.fork_server import PID_TAG, ForkServer, _alive

pytestmark = pytest.mark.slow

EVALUATION = ("audience_definitions", "audience_models")


def _evaluation_job():
    """The re-evaluation job restricted to the evaluation (definitions and dbt models), loaded as
    the code location's: its reconstructable form, the run's code origin."""
    repository = ReconstructableRepository.for_module("pipelines.definitions", "defs", str(ROOT))
    defs = repository.get_definition()
    selection = frozenset(
        key
        for assets in defs.assets_defs_by_key.values()
        if assets.is_executable and assets.op.name in EVALUATION
        for key in assets.keys
    )
    job = repository.get_reconstructable_job("reevaluate_audiences").get_subset(
        asset_selection=selection
    )
    return job, selection


def _run_config(hours: int) -> dict:
    at = format_time(NOW + timedelta(hours=hours))
    return {"ops": {"audience_models": {"config": {"evaluation_time": at}}}}


def _wait_finished(
    instance: dg.DagsterInstance, run_id: str, timeout: float = 300
) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run.is_finished:
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not finish within {timeout} s")


def _materialized(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    return {
        entry.dagster_event.asset_key.to_user_string()
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    }


def _members(warehouse, hours: int) -> list[tuple]:
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return (
            connection.execute(
                """
            select audience_key, member_count from main.audience_evaluations
            where evaluated_at = ? order by all
            """,
                [NOW + timedelta(hours=hours)],
            ).fetchall()
            + connection.execute(
                "select audience_key, user_key, tenant from main.audience_members order by all"
            ).fetchall()
        )


@pytest.fixture
def project(tmp_path, sample_run, monkeypatch):
    """Two copies of the sample run's warehouse and store (one launched through the fork server,
    one executed in this process), and a Dagster instance with the project's `dagster.yaml`."""
    for name in ("forked", "here"):
        (tmp_path / name).mkdir()
        copy_sample_run(sample_run, tmp_path / name)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster_home" / "dagster.yaml").read_text())
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "forked" / "sinks.yml"))
    monkeypatch.setenv("AUDIENCES_STORE_URL", f"sqlite:///{tmp_path / 'forked' / 'store.sqlite'}")
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(tmp_path / "forked" / "warehouse.duckdb"))
    return tmp_path


def test_forked_runs_materialize_as_before_and_a_killed_run_dies_alone(project, monkeypatch):
    job, selection = _evaluation_job()
    with dg.DagsterInstance.get() as instance:

        def launch(hours: int) -> str:
            run = instance.create_run_for_job(
                job.get_definition(),
                run_config=_run_config(hours),
                asset_selection=selection,
                job_code_origin=job.get_python_origin(),
            )
            instance.launch_run(run.run_id, workspace=None)
            return run.run_id

        # The first launch starts the server; its run is killed once dbt is under way.
        killed = launch(1)
        server = ForkServer(job.get_python_origin().repository_origin)
        server_pid = server.request({"ping": True})["pid"]
        deadline = time.monotonic() + 300
        while not any(
            entry.step_key == "audience_models"
            for entry in instance.all_logs(killed, of_type=dg.DagsterEventType.STEP_START)
        ):
            assert time.monotonic() < deadline, "the run never started its dbt step"
            assert not instance.get_run_by_id(killed).is_finished, "the run ended on its own"
            time.sleep(0.05)
        worker = int(instance.get_run_by_id(killed).tags[PID_TAG])
        assert worker != server_pid
        os.kill(worker, signal.SIGKILL)
        run = _wait_finished(instance, killed, timeout=60)
        assert run.status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(killed, of_type=dg.DagsterEventType.RUN_FAILURE)[-1]
        assert f"pid {worker}) was killed by signal 9" in failure.dagster_event.message

        # The server lives on, idle. A file its load read changes (the dbt project's manifest):
        # it is stale, and the next launch starts a new one, whose run succeeds and leaves it warm.
        answer = server.request({"ping": True})
        assert (answer["pid"], answer["stale"], answer["runs"]) == (server_pid, False, [])
        manifest = Settings.from_env().dbt_project_dir / "target" / "manifest.json"
        later = time.time() + 5
        os.utime(manifest, (later, later))
        assert server.request({"ping": True})["stale"] is True
        forked = launch(2)
        run = _wait_finished(instance, forked)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        started = instance.all_logs(forked, of_type=dg.DagsterEventType.ENGINE_EVENT)
        pid = int(run.tags[PID_TAG])
        assert any(f"Started process for run (pid: {pid})" in e.message for e in started)
        deadline = time.monotonic() + 30
        while (answer := server.request({"ping": True}))["runs"]:  # the run's process exits
            assert time.monotonic() < deadline, "the run's process did not exit"
            time.sleep(0.1)
        new_pid = answer["pid"]
        assert new_pid not in (server_pid, pid)
        assert answer["stale"] is False
        server.stop()

        # The same run executed in this process, on the other copy, materializes the same.
        here = project / "here"
        monkeypatch.setenv("AUDIENCES_STORE_URL", f"sqlite:///{here / 'store.sqlite'}")
        monkeypatch.setenv("AUDIENCES_DUCKDB", str(here / "warehouse.duckdb"))
        monkeypatch.setenv("AUDIENCES_SINKS", str(here / "sinks.yml"))
        from pipelines import build_definitions

        in_process = (
            build_definitions()
            .resolve_job_def("reevaluate_audiences")
            .execute_in_process(
                run_config=_run_config(2), instance=instance, asset_selection=sorted(selection)
            )
        )
        assert in_process.success
        assert _materialized(instance, forked) == _materialized(instance, in_process.run_id)
        assert len(_materialized(instance, forked)) > 10
        assert _members(project / "forked" / "warehouse.duckdb", 2) == _members(
            here / "warehouse.duckdb", 2
        )
        deadline = time.monotonic() + 30
        while _alive(new_pid) or _alive(server_pid):
            assert time.monotonic() < deadline, "the fork servers did not exit"
            time.sleep(0.1)


# A fork server's load, then a run's dbt command in a process forked from it (as `Server._fork`
# forks a run): it prints the JSON schemas dbt built for that command, and its exit code.
FORKED_DBT_COMMAND = """
import json, os, shutil, sys
from pathlib import Path

import dbt_common.dataclass_schema as schemas
from audiences.dbt.runner import run_dbt_here
from audiences.settings import Settings
from pipelines.defs.dbt_in_process import parse_cache
from pipelines.fork_server import Server

socket_path, origin, target = sys.argv[1:]
server = Server(Path(socket_path), origin, os.getpid())
server.load()
print("loaded", flush=True)
sys.stdin.readline()  # the test lets go of the warehouse
built = []
build_json_schema = schemas.build_json_schema
schemas.build_json_schema = lambda cls, *a, **k: (built.append(cls.__name__), build_json_schema(cls, *a, **k))[1]
pid = os.fork()
if pid == 0:
    settings = Settings.from_env()
    project = settings.dbt_project_dir
    environment = {**os.environ, **settings.environment_variables()}
    Path(target).mkdir()
    parsed = parse_cache(project, environment)
    parsed = parsed if parsed.is_file() else project / "target" / "partial_parse.msgpack"
    shutil.copyfile(parsed, Path(target, "partial_parse.msgpack"))
    arguments = ["build", "--select", "stg_warehouse__tenants", "--target-path", target]
    code, _, error = run_dbt_here(arguments, environment, project)
    print(json.dumps({"code": code, "error": str(error), "built": built}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_forked_runs_dbt_builds_no_json_schema_and_the_load_opens_no_warehouse(project):
    """dbt checks the project and profile against JSON schemas it builds the first time a
    process needs them (about 0.9 CPU s of a run's first command with its artifacts' writers):
    the server builds them once, with a dbt command that selects nothing; that command opens no
    warehouse (here one another process holds for writing) and writes nothing in the project."""
    import subprocess
    import sys

    job, _ = _evaluation_job()
    origin = job.get_python_origin().repository_origin
    dbt_project = Settings.from_env().dbt_project_dir
    before = sorted((p, p.stat().st_mtime_ns) for p in dbt_project.rglob("*"))
    warehouse = duckdb.connect(str(project / "forked" / "warehouse.duckdb"))
    from dagster._serdes import serialize_value

    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            FORKED_DBT_COMMAND,
            str(project / "server.sock"),
            serialize_value(origin),
            str(project / "run_target"),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            while (line := process.stdout.readline()) and line.strip() != "loaded":
                pass
            assert line.strip() == "loaded", "the server's load did not finish"
            assert sorted((p, p.stat().st_mtime_ns) for p in dbt_project.rglob("*")) == before
            warehouse.close()
            output, _ = process.communicate("go\n", timeout=180)
        finally:
            warehouse.close()
            if process.poll() is None:
                process.kill()
    answer = json.loads(output.strip().splitlines()[-1])
    assert answer == {"code": 0, "error": "None", "built": []}
