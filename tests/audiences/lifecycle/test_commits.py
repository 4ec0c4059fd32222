"""Commits and promotion of definitions between environments, through the real `audiences` CLI
over real SQLite stores; every refused input leaves every environment's tables and files as they
were."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from condition_harness import ROOT
from project_state import project_state

from audiences import cli
from audiences.lifecycle import commits as lifecycle
from audiences.settings import Settings

PRO = {
    "name": "Pro",
    "type": "dynamic",
    "segments": [
        {"conditions": [{"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}]}
    ],
}
NEWSLETTER = {"name": "Newsletter", "type": "static"}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working folder with two definitions, and every environment's files under `data/`."""
    for name in [name for name in __import__("os").environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUDIENCES_DBT_PROJECT", str(ROOT / "dbt_project"))
    monkeypatch.setenv("AUDIENCES_AUTHOR", "ana")
    write(tmp_path / "data" / "audiences", "pro", PRO)
    write(tmp_path / "data" / "audiences", "newsletter", NEWSLETTER)
    return tmp_path


def write(folder: Path, key: str, definition: dict) -> None:
    (folder / key).mkdir(parents=True, exist_ok=True)
    (folder / key / "audience.json").write_text(json.dumps(definition, indent=2))


def audiences(*arguments: str, capsys=None) -> tuple[int, str, str]:
    code = cli.main(list(arguments))
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def test_commit_records_each_changed_audience_durably(project, capsys):
    code, out, err = audiences("commit", "-m", "first audiences", capsys=capsys)
    assert code == 0, err
    assert "committed 2 audiences in development" in out
    settings = Settings.from_env()
    store = lifecycle.open_store(settings, "development")
    made = lifecycle.commits_in(store)
    assert {commit.audience_key for commit in made} == {"pro", "newsletter"}
    assert {commit.message for commit in made} == {"first audiences"}
    assert {commit.author for commit in made} == {"ana"}
    pro = next(commit for commit in made if commit.audience_key == "pro")
    assert pro.definition == PRO
    assert pro.content_hash == lifecycle.content_hash(PRO)

    # A later edit of the file does not touch the committed version: it is a change to commit.
    edited = {**PRO, "name": "Pro plan"}
    write(project / "data" / "audiences", "pro", edited)
    assert lifecycle.commits_in(store, "pro")[0].definition == PRO
    code, out, _ = audiences("diff", capsys=capsys)
    assert "modified: pro" in out and '+  "name": "Pro plan"' in out
    assert "newsletter" not in out
    assert audiences("commit", "-m", "rename", capsys=capsys)[0] == 0
    code, out, _ = audiences("commits", "--audience", "pro", "--json", capsys=capsys)
    listed = json.loads(out)
    assert [row["message"] for row in listed] == ["rename", "first audiences"]
    assert listed[0]["definition"]["name"] == "Pro plan"
    assert listed[0]["environments"] == ["development"]
    store.dispose()


def test_promotion_moves_commits_in_order_and_only_promoted_versions_reach_production(
    project, capsys
):
    assert audiences("commit", "-m", "first", capsys=capsys)[0] == 0
    write(project / "data" / "audiences", "pro", {**PRO, "name": "Pro plan"})
    assert audiences("commit", "-m", "rename", capsys=capsys)[0] == 0
    settings = Settings.from_env()
    development = lifecycle.open_store(settings, "development")
    renamed = lifecycle.commits_in(development, "pro")[-1]

    # Only the first commits: production gets the old definition of pro.
    first_ids = [c.commit_id for c in lifecycle.commits_in(development) if c.message == "first"]
    for commit_id in first_ids:
        code, _, err = audiences(
            "promote", "--to", "production", "--commit", commit_id, "--no-evaluate", capsys=capsys
        )
        assert code == 0, err
    production_folder = project / "data" / "production" / "audiences"
    assert json.loads((production_folder / "pro" / "audience.json").read_text()) == PRO
    assert (project / "data" / "production" / "dbt_project" / "dbt_project.yml").exists()

    code, out, _ = audiences("promote", "--to", "production", "--dry-run", "--json", capsys=capsys)
    planned = json.loads(out)
    assert planned["commits"] == [renamed.commit_id]
    assert [a["audience_key"] for a in planned["impact"]["audiences"]] == ["pro"]
    assert audiences("promote", "--to", "production", "--no-evaluate", capsys=capsys)[0] == 0
    promoted = json.loads((production_folder / "pro" / "audience.json").read_text())
    assert promoted["name"] == "Pro plan"
    production_settings = Settings.from_env(environment="production")
    assert production_settings.definitions_dir == production_folder
    assert production_settings.duckdb_path == project / "data" / "production" / "warehouse.duckdb"

    # A commit made in production directly is refused without --force, and allowed with it.
    write(project / "data" / "audiences", "pro", {**PRO, "name": "Hotfix"})
    code, _, err = audiences("--environment", "production", "commit", "-m", "hot", capsys=capsys)
    assert code == 1 and "audiences promote --to production" in err
    code, _, err = audiences(
        "--environment", "production", "commit", "-m", "hot", "--force", capsys=capsys
    )
    assert code == 0, err
    assert json.loads((production_folder / "pro" / "audience.json").read_text())["name"] == "Hotfix"
    development.dispose()


def test_archive_is_a_commit_in_every_environment(project, capsys):
    audiences("commit", "-m", "first", capsys=capsys)
    audiences("promote", "--to", "production", "--no-evaluate", capsys=capsys)
    code, _, err = audiences("archive", "pro", "-m", "no longer needed", capsys=capsys)
    assert code == 0, err
    settings = Settings.from_env()
    for name in settings.environments:
        store = lifecycle.open_store(settings, name)
        latest = lifecycle.current_versions(store)["pro"]
        assert (latest.action, latest.message) == ("archive", "no longer needed")
        assert "pro" not in lifecycle.live_definitions(store)
        store.dispose()
    assert not (project / "data" / "audiences" / "pro").exists()
    assert not (project / "data" / "production" / "audiences" / "pro").exists()
    assert (project / "data" / "production" / "audiences" / "newsletter").exists()


# -- bad input: a clear error, and every environment exactly as it was ---------------------------


def refused(project: Path, capsys, *arguments: str) -> str:
    before = project_state(project)
    code, _, err = audiences(*arguments, capsys=capsys)
    assert code == 1
    assert project_state(project) == before, (
        "a refused command changed a store or a definition file"
    )
    assert "Traceback" not in err
    return err


def committed_and_promoted(project, capsys) -> None:
    assert audiences("commit", "-m", "first", capsys=capsys)[0] == 0
    assert audiences("promote", "--to", "production", "--no-evaluate", capsys=capsys)[0] == 0


def test_a_commit_with_an_invalid_definition_is_refused_naming_the_file_and_field(project, capsys):
    committed_and_promoted(project, capsys)
    broken = json.loads(json.dumps(PRO))
    broken["segments"][0]["conditions"][0]["operator"] = "equalz"
    write(project / "data" / "audiences", "pro", broken)
    err = refused(project, capsys, "commit", "-m", "broken")
    assert "pro/audience.json: $.segments[0].conditions[0].operator" in err
    assert "equalz" in err


def test_a_type_change_is_refused(project, capsys):
    committed_and_promoted(project, capsys)
    write(project / "data" / "audiences", "newsletter", {**PRO, "name": "Newsletter"})
    err = refused(project, capsys, "commit", "-m", "retype")
    assert "newsletter/audience.json: $.type" in err and "is static" in err


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("staging", "unknown environment 'staging'; the environments are development, production"),
        ("development", "development is the first environment"),
    ],
)
def test_a_promotion_to_an_unknown_or_earlier_environment_is_refused(
    project, capsys, target, message
):
    committed_and_promoted(project, capsys)
    write(project / "data" / "audiences", "pro", {**PRO, "name": "Pro plan"})
    audiences("commit", "-m", "rename", capsys=capsys)
    assert message in refused(project, capsys, "promote", "--to", target, "--no-evaluate")


def test_a_commit_id_that_does_not_exist_is_refused(project, capsys):
    committed_and_promoted(project, capsys)
    err = refused(
        project, capsys, "promote", "--to", "production", "--commit", "c0ffee", "--no-evaluate"
    )
    assert "commit 'c0ffee' does not exist" in err


def test_a_commit_already_promoted_is_refused(project, capsys):
    committed_and_promoted(project, capsys)
    settings = Settings.from_env()
    store = lifecycle.open_store(settings, "development")
    commit_id = lifecycle.commits_in(store)[0].commit_id
    store.dispose()
    err = refused(
        project, capsys, "promote", "--to", "production", "--commit", commit_id, "--no-evaluate"
    )
    assert f"commit {commit_id!r} is already in production" in err


def test_a_commit_while_a_promotion_runs_is_refused(project, capsys):
    committed_and_promoted(project, capsys)
    write(project / "data" / "audiences", "pro", {**PRO, "name": "Pro plan"})
    settings = Settings.from_env()
    store = lifecycle.open_store(settings, "development")
    promoting, release = threading.Event(), threading.Event()

    def promotion():
        with lifecycle.promotion_marker(store, "development", "production"):
            promoting.set()
            release.wait(30)

    worker = threading.Thread(target=promotion)
    worker.start()
    try:
        assert promoting.wait(30)
        err = refused(project, capsys, "commit", "-m", "during the promotion")
        assert "a promotion from development to production is in progress" in err
    finally:
        release.set()
        worker.join()
    assert audiences("commit", "-m", "after the promotion", capsys=capsys)[0] == 0
    store.dispose()


def test_nothing_to_commit_says_so(project, capsys):
    committed_and_promoted(project, capsys)
    assert "nothing to commit" in refused(project, capsys, "commit", "-m", "again")


def write_trigger(project: Path, workflow: str, audience: str) -> None:
    folder = project / "data" / "workflows" / workflow
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trigger.json").write_text(json.dumps({"audience": audience, "on": "entered"}))


def test_an_archived_audience_stops_its_triggers_and_an_unpromoted_one_waits(project, capsys):
    from audiences.delivery.setup import load_workflow_setup

    write_trigger(project, "welcome-pro", "pro")
    committed_and_promoted(project, capsys)
    write(project / "data" / "audiences", "trial", {**PRO, "name": "Trial"})
    write_trigger(project, "trial-nudge", "trial")
    audiences("commit", "-m", "trial", capsys=capsys)

    development = load_workflow_setup(Settings.from_env())
    production = load_workflow_setup(Settings.from_env(environment="production"))
    assert set(development.triggers) == {"welcome-pro", "trial-nudge"}
    assert set(production.triggers) == {"welcome-pro"}  # trial is not in production yet

    assert audiences("archive", "pro", capsys=capsys)[0] == 0
    for environment in ("development", "production"):
        setup = load_workflow_setup(Settings.from_env(environment=environment))
        assert "welcome-pro" not in setup.triggers


def test_a_later_environment_never_promoted_to_is_not_run(project, capsys):
    err = refused(project, capsys, "--environment", "production", "run")
    assert "production has no promoted definitions yet" in err
    assert "audiences promote --to production" in err


def test_each_environment_reports_the_version_it_evaluates(project, capsys):
    committed_and_promoted(project, capsys)
    write(project / "data" / "audiences", "pro", {**PRO, "name": "Pro plan"})
    development = lifecycle.version_metadata(Settings.from_env())
    production = lifecycle.version_metadata(Settings.from_env(environment="production"))
    assert development["pro"]["commit_id"] == "uncommitted"
    assert development["newsletter"]["commit_message"] == "first"
    assert production["pro"]["commit_message"] == "first"
    assert production["pro"]["commit_id"] != "uncommitted"


def test_members_at_names_the_version_in_force_and_its_commit(project, capsys):
    """Two evaluations of production (as dbt records them in `audience_evaluations`, with the
    version each used): `members --at` names the version in force then and the commit that
    brought it to production; stdout stays the members' JSON lines."""
    import duckdb

    committed_and_promoted(project, capsys)
    write(project / "data" / "audiences", "pro", {**PRO, "name": "Pro plan"})
    assert audiences("commit", "-m", "rename", capsys=capsys)[0] == 0
    assert audiences("promote", "--to", "production", "--no-evaluate", capsys=capsys)[0] == 0
    settings = Settings.from_env(environment="production")
    store = lifecycle.open_store(settings, "production")
    first, renamed = lifecycle.commits_in(store, "pro")
    store.dispose()
    with duckdb.connect(str(settings.duckdb_path)) as connection:
        connection.execute(
            "create table main.audience_evaluations as select * from (values "
            "('2026-11-01 08:00:00+00'::timestamptz, 'pro', 'dynamic', $v1, 3, 'i1'), "
            "('2026-11-01 09:00:00+00'::timestamptz, 'pro', 'dynamic', $v2, 4, 'i2')) "
            "as t(evaluated_at, audience_key, audience_type, audience_version, member_count, "
            "dbt_invocation_id)",
            {"v1": first.version, "v2": renamed.version},
        )

    def note(at: str) -> str:
        code, out, err = audiences(
            "--environment", "production", "members", "pro", "--at", at, capsys=capsys
        )
        assert code == 0 and out == "", err
        return err.strip()

    assert note("2026-11-01T08:30:00Z") == (
        "pro at 2026-11-01T08:30:00.000000Z: the evaluation of 2026-11-01T08:00:00.000000Z used "
        f"version {first.version}, commit {first.commit_id} ('first', ana, {first.promoted_at})"
    )
    assert note("2026-11-01T09:30:00Z").endswith(
        f"version {renamed.version}, commit {renamed.commit_id} ('rename', ana, "
        f"{renamed.promoted_at})"
    )
    assert note("2026-11-01T07:00:00Z") == (
        "pro: no evaluation at or before 2026-11-01T07:00:00.000000Z"
    )


def test_a_promotion_from_the_cli_is_a_run_of_the_promotion_job(project, capsys):
    """`audiences promote` runs the `promote_definitions` job in the instance `dg dev` shows, as
    the UI does: the run's metadata holds the promotion's commits and impact."""
    import os

    import dagster as dg

    assert audiences("commit", "-m", "first", capsys=capsys)[0] == 0
    development = lifecycle.open_store(Settings.from_env(), "development")
    committed = [commit.commit_id for commit in lifecycle.commits_in(development)]
    development.dispose()
    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as instance:
        earlier = {run.run_id for run in instance.get_runs()}
    code, out, err = audiences("promote", "--to", "production", "--no-evaluate", capsys=capsys)
    assert code == 0, err
    assert "promoted 2 commits from development to production" in out
    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as instance:
        [run] = [run for run in instance.get_runs() if run.run_id not in earlier]
        [output] = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_OUTPUT)
    assert run.job_name == "promote_definitions"
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert run.tags["audiences/launched_by"] == "audiences promote"
    metadata = {
        key: value.value for key, value in output.dagster_event.event_specific_data.metadata.items()
    }
    assert (metadata["source"], metadata["target"]) == ("development", "production")
    assert sorted(metadata["commits"]) == sorted(committed)
    assert metadata["impact"]["pro"]["change"] == "created"
