"""Every environment in one code location (issue 15): development and production each run their
own job over their own warehouse, store and dbt project, their audiences name the commit they
were evaluated from, and a promotion is a run of its own with its impact in the metadata."""

from __future__ import annotations

import json
import os
import sqlite3

import dagster as dg
import duckdb
import pytest
from condition_harness import init_project

from audiences import cli
from pipelines import build_definitions

pytestmark = pytest.mark.slow

FREE_USERS = {
    "name": "Free users",
    "type": "dynamic",
    "segments": [
        {"conditions": [{"property": "recipient.plan", "operator": "equal_to", "argument": "free"}]}
    ],
}
AT = "2026-11-01T08:00:00+00:00"


def audiences(*arguments: str) -> None:
    assert cli.main(list(arguments)) == 0, f"audiences {' '.join(arguments)} failed"


def evaluated(warehouse) -> set[str]:
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return {
            row[0]
            for row in connection.execute(
                "select distinct audience_key from main.audience_evaluations"
            ).fetchall()
        }


def members(store) -> list[tuple]:
    """The store's current members (a new audience's first members set them and trigger
    nothing), and its membership events."""
    with sqlite3.connect(store) as connection:
        return (
            connection.execute(
                "select audience_key, user_id from audience_members order by audience_key, user_id"
            ).fetchall()
            + connection.execute(
                "select audience_key, user_id, event_type from membership_events "
                "order by audience_key, user_id"
            ).fetchall()
        )


def metadata(instance, *path: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(list(path)))
    assert event is not None, f"{'/'.join(path)} was never materialized"
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


@pytest.fixture(scope="module")
def environments(tmp_path_factory):
    """`audiences init`'s project with pro-users committed and promoted to production (whose
    models are generated), then renamed and committed in development only, and free-users only in
    development's working files; then each
    environment's main job run once from one code location that serves both."""
    folder = tmp_path_factory.mktemp("environments") / "project"
    with pytest.MonkeyPatch.context() as patch:
        init_project(folder, patch)
        audiences("commit", "-m", "pro users")
        audiences("promote", "--to", "production", "--no-evaluate")
        audiences("--environment", "production", "generate")
        # A newer version of pro-users, committed in development and not promoted.
        pro = folder / "data" / "audiences" / "pro-users" / "audience.json"
        pro.write_text(json.dumps({**json.loads(pro.read_text()), "name": "Pro plan users"}))
        audiences("commit", "-m", "rename pro users")
        working = folder / "data" / "audiences" / "free-users"
        working.mkdir()
        (working / "audience.json").write_text(json.dumps(FREE_USERS))
        audiences("generate")

        defs = build_definitions()
        with dg.DagsterInstance.ephemeral() as instance:
            for prefix in ("", "production__"):
                result = defs.resolve_job_def(f"{prefix}audiences_job").execute_in_process(
                    instance=instance,
                    run_config={
                        "ops": {f"{prefix}audience_models": {"config": {"evaluation_time": AT}}}
                    },
                )
                assert result.success, prefix
            yield folder, defs, instance


def commit_ids(folder, environment: str) -> dict[str, tuple[str, str]]:
    from audiences.lifecycle.commits import current_versions
    from audiences.store.database import MembershipStore

    name = "" if environment == "development" else f"{environment}/"
    store = MembershipStore(f"sqlite:///{folder / 'data' / name / 'store.sqlite'}")
    try:
        return {
            key: (commit.commit_id, commit.message)
            for key, commit in current_versions(store).items()
        }
    finally:
        store.dispose()


def test_each_environment_writes_only_its_own_warehouse_and_store(environments):
    folder, defs, instance = environments
    data = folder / "data"
    assert evaluated(data / "warehouse.duckdb") == {"pro-users", "free-users"}
    assert evaluated(data / "production" / "warehouse.duckdb") == {"pro-users"}
    # First evaluations: both audiences' members in development, pro-users' in production.
    assert members(data / "store.sqlite") == [
        ("free-users", "user_2"),
        ("pro-users", "user_1"),
        ("pro-users", "user_3"),
    ]
    assert members(data / "production" / "store.sqlite") == [
        ("pro-users", "user_1"),
        ("pro-users", "user_3"),
    ]
    # Each environment's assets have their own materializations and runs.
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey(["production", "audiences", "free_users"]) not in graph.get_all_asset_keys()
    assert metadata(instance, "production", "membership_changes")["entered"] == 2
    assert metadata(instance, "membership_changes")["entered"] == 3
    runs = {run.job_name: run.tags.get("audiences/environment") for run in instance.get_runs()}
    assert runs == {"audiences_job": "development", "production__audiences_job": "production"}


def test_each_environments_audiences_name_the_commit_they_were_evaluated_from(environments):
    folder, _, instance = environments
    pro_id, _ = commit_ids(folder, "production")["pro-users"]
    renamed_id, _ = commit_ids(folder, "development")["pro-users"]
    assert renamed_id != pro_id
    production = metadata(instance, "production", "audiences", "pro_users")
    assert (production["commit_id"], production["commit_message"]) == (pro_id, "pro users")
    development = metadata(instance, "audiences", "pro_users")
    assert (development["commit_id"], development["commit_message"]) == (
        renamed_id,
        "rename pro users",
    )
    # free-users is only a working file in development: not committed.
    assert metadata(instance, "audiences", "free_users")["commit_id"] == "uncommitted"
    # The definitions asset lists each audience's commit, in its environment.
    definitions = metadata(instance, "production", "audience_definitions")
    assert definitions["environment"] == "production"
    assert pro_id in definitions["definitions"]
    assert "free-users" not in definitions["definitions"]


def test_a_promotion_is_a_run_with_its_impact_and_evaluates_the_target_at_once(environments):
    folder, defs, instance = environments
    data = folder / "data"
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
            patch.delenv(name)
        patch.setenv("AUDIENCES_AUTHOR", "ana")
        patch.chdir(folder)
        audiences("commit", "-m", "free users too")
        development = members(data / "store.sqlite")
        result = defs.resolve_job_def("promote_definitions").execute_in_process(
            instance=instance,
            run_config={"ops": {"promote_commits": {"config": {"to": "production"}}}},
        )
    assert result.success
    [materialized] = [
        event
        for event in result.all_node_events
        if event.event_type_value == "STEP_OUTPUT" and event.step_key == "promote_commits"
    ]
    recorded = {
        key: value.value for key, value in materialized.event_specific_data.metadata.items()
    }
    assert recorded["target"] == "production"
    assert recorded["impact"]["free-users"]["change"] == "created"
    assert (
        recorded["impact"]["free-users"]["members_now"],
        recorded["impact"]["free-users"]["members_after"],
        recorded["impact"]["free-users"]["entered"],
        recorded["impact"]["free-users"]["exited"],
    ) == (0, 1, 1, 0)
    assert "| free-users | created | 0 | 1 | 1 | 0 |" in recorded["impact_per_audience"]
    # Evaluated at once, in production's own run, which the promotion names.
    assert recorded["evaluated"] is True
    assert recorded["evaluation_changes"]["free-users"]["is_backfill"] is True
    evaluation = instance.get_run_by_id(recorded["evaluation_run_id"])
    assert evaluation.job_name == "production__audiences_job"
    assert evaluation.tags["audiences/promotion"] == "development -> production"
    assert evaluated(data / "production" / "warehouse.duckdb") == {"pro-users", "free-users"}
    assert ("free-users", "user_2") in members(data / "production" / "store.sqlite")
    # Development was not touched by production's promotion and evaluation.
    assert members(data / "store.sqlite") == development


def test_a_promotion_reloads_the_dagster_ui_which_then_shows_the_new_audiences(
    tmp_path, monkeypatch
):
    """A real `dagster-webserver` over the project's instance: after `audiences promote`, with no
    reload by hand, the UI lists production's newly promoted audience (the promotion asks the UI
    to reload its code locations, `reload_code_locations`)."""
    import signal
    import subprocess
    import sys
    import time

    import httpx
    from api_server import free_port

    folder = init_project(tmp_path / "project", monkeypatch)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AUDIENCES_DAGSTER_URL", url)
    command = [sys.executable, "-m", "dagster_webserver", "-m", "pipelines.definitions"]
    webserver = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    query = "{ assetNodes { assetKey { path } } }"

    def asset_keys() -> set[str]:
        answer = httpx.post(f"{url}/graphql", json={"query": query}, timeout=60).json()
        return {"/".join(node["assetKey"]["path"]) for node in answer["data"]["assetNodes"]}

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if "production/audience_definitions" in asset_keys():
                    break  # loaded: production has nothing promoted yet
            except (httpx.HTTPError, KeyError, TypeError):
                pass
            assert time.monotonic() < deadline, "the Dagster UI did not load the code location"
            assert webserver.poll() is None, "dagster-webserver exited"
            time.sleep(1)
        assert "production/audiences/pro_users" not in asset_keys()
        audiences("commit", "-m", "pro users")
        audiences("--evaluation-time", AT, "promote", "--to", "production")
        assert "production/audiences/pro_users" in asset_keys()
    finally:
        webserver.send_signal(signal.SIGTERM)
        try:
            webserver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            webserver.kill()
            webserver.wait()
