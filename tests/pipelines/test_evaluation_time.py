"""Time only moves forward: an evaluation earlier than the last recorded one is refused, or, when
asked for (`--allow-earlier`, run config `allow_earlier`), evaluated without events or triggers.

The README's walk: command 1 evaluates the sample at 2026-11-01, the Dagster UI's schedule and
sensor then evaluate at a later time (legitimately: users move, triggers fire), and command 1 run
again must not flip members back under the later time's name and trigger everyone again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from condition_harness import FILE_SINKS as SINKS
from condition_harness import ROOT, SAMPLE_TIME, copy_sample_run, copy_store

from audiences import cli
from pipelines import build_definitions
from pipelines.defs.schedules import reevaluate_every_15_minutes

pytestmark = pytest.mark.slow

LATER = "2026-11-27T00:00:00Z"
LATER_STILL = "2026-11-28T00:00:00Z"


def copy_sample(sample_run, folder):
    """The sample run's warehouse and store in `folder`, triggers to `folder/out/triggers.jsonl`."""
    copy_sample_run(sample_run, folder)
    return ["--duckdb", str(folder / "warehouse.duckdb"), "--sinks", str(folder / "sinks.yml")]


@pytest.fixture(scope="module")
def later_run(sample_run, tmp_path_factory):
    """README command 1 (the sample at 2026-11-01), then a later evaluation (what the UI's schedule
    does): a folder with that warehouse, store and trigger file, to copy from."""
    folder = tmp_path_factory.mktemp("later_run")
    target = Path(os.environ["AUDIENCES_DBT_PROJECT"]) / "target"
    before = set(target.iterdir())
    with pytest.MonkeyPatch.context() as patch:
        _plain_environment(patch)
        assert cli.main([*copy_sample(sample_run, folder), "--evaluation-time", LATER, "run"]) == 0
    # The target folders of the run's dbt commands (each has its dbt.log), for the tests of how dbt ran.
    (folder / "dbt_targets.txt").write_text(
        "\n".join(
            str(path)
            for path in sorted(set(target.iterdir()) - before)
            if (path / "dbt.log").exists()
        )
    )
    assert (folder / "out" / "triggers.jsonl").read_text().count("\n") > 0, (
        "the later run triggers workflows"
    )
    return folder


@pytest.fixture
def walk(later_run, tmp_path, monkeypatch):
    """A copy of `later_run` in this test's folder; the flags that point the CLI at it."""
    shutil.copy(later_run / "warehouse.duckdb", tmp_path / "warehouse.duckdb")
    copy_store(later_run / "store.sqlite", tmp_path / "store.sqlite")
    shutil.copytree(later_run / "out", tmp_path / "out")
    (tmp_path / "sinks.yml").write_text(SINKS)
    _plain_environment(monkeypatch)
    return ["--duckdb", str(tmp_path / "warehouse.duckdb"), "--sinks", str(tmp_path / "sinks.yml")]


def test_a_later_evaluation_runs_dbt_in_the_run_process(later_run):
    """The fixed cost of a run (issue 17): dbt runs in the run's own process, not in a subprocess
    that imports dbt again; its log is where dagster-dbt puts it (the command's target folder)."""
    logs = [Path(path) / "dbt.log" for path in (later_run / "dbt_targets.txt").read_text().split()]
    events = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    assert {event["info"]["name"] for event in events} >= {"MainReportVersion", "CommandCompleted"}
    assert {event["info"]["pid"] for event in events} == {os.getpid()}


def test_dbt_in_the_run_process_fails_with_dbts_error_lets_go_of_the_warehouse_and_parses_once(
    walk, tmp_path
):
    """dbt in the run's process fails as the subprocess did, with dbt's own message; dbt-duckdb
    lets go of the warehouse, which this process then opens with its own settings (DuckDB refuses
    a second handle on a file with other settings); and the warehouse's next command reuses the
    parse of the first (dbt parses the whole project again when the profile's DuckDB path differs
    from the one its partial-parse file was written for: each profile keeps its own)."""
    from audiences.dbt.project import dbt_executable
    from pipelines.defs.resources import DbtResource

    project = os.environ["AUDIENCES_DBT_PROJECT"]
    warehouse = tmp_path / "warehouse.duckdb"
    dbt = DbtResource(
        project_dir=project,
        profiles_dir=project,
        dbt_executable=dbt_executable(),
        variables={"AUDIENCES_DUCKDB": str(warehouse)},
    )
    failed = dbt.cli(["show", "--inline", "select * from main.no_such_table"], raise_on_error=False)
    error = failed.get_error()
    assert error is not None
    assert "Table with name no_such_table does not exist" in str(error)
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        assert connection.execute("select count(*) from main.audience_members").fetchone()[0] > 0

    shown = dbt.cli(["show", "--inline", "select count(*) as n from main.audience_members"])
    shown.wait()
    log = [json.loads(line) for line in (shown.target_path / "dbt.log").read_text().splitlines()]
    assert "PartialParsingSkipParsing" in {event["info"]["name"] for event in log}
    assert not [event for event in log if event["info"]["name"] == "UnableToPartialParse"]


def _plain_environment(patch):
    patch.chdir(ROOT)
    for name in (
        "AUDIENCES_DUCKDB",
        "AUDIENCES_DEFINITIONS",
        "AUDIENCES_EVALUATION_TIME",
        "AUDIENCES_USERS_SOURCE",
        "AUDIENCES_SINKS",
        "AUDIENCES_STORE_URL",
        "AUDIENCES_WORKFLOWS",
        "DAGSTER_HOME",
    ):
        patch.delenv(name, raising=False)


def file_hashes(folder) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def recorded(folder) -> dict[str, int]:
    """What a run records: events and intervals in the warehouse, events and deliveries in the store,
    lines in the trigger file."""
    with duckdb.connect(str(folder / "warehouse.duckdb"), read_only=True) as connection:
        outbox, intervals = connection.execute(
            "select (select count(*) from raw.membership_outbox), (select count(*) from raw.membership_intervals)"
        ).fetchone()
    with sqlite3.connect(folder / "store.sqlite") as store:
        events, deliveries = store.execute(
            "select (select count(*) from membership_events), (select count(*) from deliveries)"
        ).fetchone()
    lines = (folder / "out" / "triggers.jsonl").read_text().count("\n")
    return {
        "outbox": outbox,
        "intervals": intervals,
        "events": events,
        "deliveries": deliveries,
        "triggers": lines,
    }


def members(path) -> set[tuple]:
    with duckdb.connect(str(path), read_only=True) as connection:
        return set(
            connection.execute(
                "select audience_key, user_key, tenant from main.audience_members"
            ).fetchall()
        )


def test_an_earlier_evaluation_time_is_refused_and_writes_nothing(capsys, walk, tmp_path):
    before = file_hashes(tmp_path)
    code = cli.main([*walk, "--evaluation-time", SAMPLE_TIME, "run"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == [
        "error: evaluation time 2026-11-01T00:00:00.000000Z is earlier than the last recorded evaluation "
        "2026-11-27T00:00:00.000000Z; --allow-earlier (run config allow_earlier: true) evaluates it without "
        "recording membership events or triggering workflows"
    ]
    assert file_hashes(tmp_path) == before


def test_allow_earlier_evaluates_without_events_or_triggers(
    capsys, walk, tmp_path, sample_run, later_run
):
    before = recorded(tmp_path)
    code = cli.main([*walk, "--evaluation-time", SAMPLE_TIME, "run", "--allow-earlier"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("evaluated at 2026-11-01T00:00:00.000000Z")
    assert "no membership events recorded, no workflows triggered" in out
    assert recorded(tmp_path) == before
    # Evaluated: the members are those of the sample run at the same time, and so are the counts.
    assert members(tmp_path / "warehouse.duckdb") == members(sample_run)
    count_query = (
        "select audience_key, member_count from main.audience_evaluations where evaluated_at = $t "
        "order by all"
    )
    at = {"t": datetime.fromisoformat(SAMPLE_TIME)}
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        counts = connection.execute(count_query, at).fetchall()
    with duckdb.connect(str(sample_run), read_only=True) as connection:
        assert counts == connection.execute(count_query, at).fetchall()

    # The next evaluation is diffed against the history (the later run's members), not against the
    # earlier evaluation: its events are exactly those of going from LATER to LATER_STILL directly.
    assert cli.main([*walk, "--evaluation-time", LATER_STILL, "run"]) == 0
    direct = tmp_path / "direct"
    direct.mkdir()
    assert (
        cli.main(
            [
                *copy_sample(later_run / "warehouse.duckdb", direct),
                "--evaluation-time",
                LATER_STILL,
                "run",
            ]
        )
        == 0
    )
    after_earlier, after_direct = (
        new_events(folder, before["outbox"]) for folder in (tmp_path, direct)
    )
    assert after_earlier == after_direct
    assert {event[-1] for event in after_earlier} <= {datetime.fromisoformat(LATER_STILL)}
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        dynamic = "(select audience_key from main.audience_catalog where audience_type = 'dynamic')"
        open_intervals = set(
            connection.execute(
                "select audience_key, user_key, tenant from raw.membership_intervals "
                f"where exited_at is null and audience_key in {dynamic}"
            ).fetchall()
        )
        evaluated = set(
            connection.execute(
                f"select audience_key, user_key, tenant from main.audience_members where audience_key in {dynamic}"
            ).fetchall()
        )
    assert open_intervals == evaluated


def new_events(folder, after: int) -> set[tuple]:
    with duckdb.connect(str(folder / "warehouse.duckdb"), read_only=True) as connection:
        return set(
            connection.execute(
                "select audience_key, user_id, tenant, event_type, occurred_at from raw.membership_outbox "
                "where sequence > $n",
                {"n": after},
            ).fetchall()
        )


def test_dagster_runs_refuse_an_earlier_time_unless_run_config_allows_it(
    later_run, tmp_path, monkeypatch
):
    copy_sample_later = tmp_path / "warehouse.duckdb"
    shutil.copy(later_run / "warehouse.duckdb", copy_sample_later)
    copy_store(later_run / "store.sqlite", tmp_path / "store.sqlite")
    shutil.copytree(later_run / "out", tmp_path / "out")
    (tmp_path / "sinks.yml").write_text(SINKS)
    _plain_environment(monkeypatch)
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(copy_sample_later))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "sinks.yml"))
    job = build_definitions().resolve_job_def("reevaluate_audiences")
    before = recorded(tmp_path)

    def launch(config: dict):
        with dg.DagsterInstance.ephemeral() as instance:
            return job.execute_in_process(
                run_config={"ops": {"audience_models": {"config": config}}},
                instance=instance,
                raise_on_error=False,
            )

    refused = launch({"evaluation_time": SAMPLE_TIME})
    assert not refused.success
    [failure] = [event for event in refused.all_events if event.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "audience_models"
    assert failure.event_specific_data.error.message.startswith(
        "dagster._core.definitions.events.Failure: evaluation time 2026-11-01T00:00:00.000000Z is earlier than "
        "the last recorded evaluation 2026-11-27T00:00:00.000000Z;"
    )
    assert recorded(tmp_path) == before
    with duckdb.connect(str(copy_sample_later), read_only=True) as connection:
        clock = connection.execute("select max(evaluated_at) from raw.evaluation_clock").fetchone()[
            0
        ]
    assert clock == datetime.fromisoformat(LATER)  # refused before "now" was set

    allowed = launch({"evaluation_time": SAMPLE_TIME, "allow_earlier": True})
    assert allowed.success
    metadata = {
        event.asset_key.to_user_string(): event.step_materialization_data.materialization.metadata
        for event in allowed.get_asset_materialization_events()
    }
    assert (
        metadata["membership_changes"]["entered"].value
        == metadata["membership_changes"]["exited"].value
        == 0
    )
    assert metadata["published_membership_events"]["deliveries_created"].value == 0
    checks = {
        evaluation.check_name: evaluation.passed
        for evaluation in allowed.get_asset_check_evaluations()
    }
    assert checks["every_audience_built"] is True and checks["no_mass_membership_change"] is True
    assert recorded(tmp_path) == before

    # The UI's schedule evaluates at its tick's time, later than any recorded: not refused.
    tick = datetime.fromisoformat("2026-11-27T00:15:00+00:00")
    request = reevaluate_every_15_minutes(dg.build_schedule_context(scheduled_execution_time=tick))
    with dg.DagsterInstance.ephemeral() as instance:
        assert job.execute_in_process(run_config=request.run_config, instance=instance).success
