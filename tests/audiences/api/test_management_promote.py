"""The management API's promote (what `knock commit promote` calls) is the one promotion path: a
run of the `promote_definitions` job, in the Dagster instance's history, that evaluates the
target at once and records its membership events before answering; a commit or a promotion while
another promotion runs is refused in Knock's error shape and changes nothing. Through a real HTTP
server on 127.0.0.1 over `audiences init`'s project (three users)."""

from __future__ import annotations

import os
import sqlite3
import threading

import dagster as dg
import duckdb
import httpx
import pytest
from api_server import running_server
from condition_harness import init_project
from project_state import project_state

from audiences.api.app import asgi_app, close_app
from audiences.api.management import create_service_token
from audiences.lifecycle import commits as lifecycle
from audiences.settings import Settings
from audiences.store.database import MembershipStore

PRO_OR_FREE = {
    "name": "Pro users",
    "type": "dynamic",
    "segments": [
        {"conditions": [{"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}]},
        {
            "conditions": [
                {"property": "recipient.plan", "operator": "equal_to", "argument": "free"}
            ]
        },
    ],
}


@pytest.fixture
def served(tmp_path, monkeypatch):
    """`audiences init`'s project served over HTTP, with a service token."""
    project = init_project(tmp_path / "project", monkeypatch)
    (project / "data" / "production").mkdir(parents=True)
    (project / "data" / "production" / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    settings = Settings.from_env()
    store = MembershipStore(settings.store_url).create()
    token = create_service_token(store, "ci")[1]
    store.dispose()
    app = asgi_app(settings)
    with (
        running_server(app) as url,
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600
        ) as http,
    ):
        yield project, settings, http
    close_app(app.app)


@pytest.mark.slow
def test_promote_through_the_api_is_a_promotion_run_that_evaluates_production(served):
    project, _settings, http = served
    committed = http.put("/v1/commits", params={"commit_message": "first"})
    assert committed.status_code == 200, committed.text
    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as instance:
        earlier = {run.run_id for run in instance.get_runs()}

    promoted = http.put("/v1/commits/promote", params={"to_environment": "production"})
    assert promoted.status_code == 200, promoted.text

    # Answered once production was evaluated: its first members (no events: no backfill).
    production = project / "data" / "production"
    with duckdb.connect(str(production / "warehouse.duckdb"), read_only=True) as connection:
        members = connection.execute(
            "select count(*) from main.audience_members where audience_key = 'pro-users'"
        ).fetchall()[0][0]
    assert members == 2

    # A change pushed and committed with the API, then promoted: user_2 enters in production, and
    # its event is recorded before the answer.
    pushed = http.put(
        "/v1/audiences/pro-users",
        params={"commit": "true", "commit_message": "free users too"},
        json={"audience": PRO_OR_FREE},
    )
    assert pushed.status_code == 200, pushed.text
    promoted = http.put("/v1/commits/promote", params={"to_environment": "production"})
    assert promoted.status_code == 200, promoted.text
    with sqlite3.connect(production / "store.sqlite") as connection:
        events = connection.execute(
            "select audience_key, user_id, event_type from membership_events where not is_backfill"
        ).fetchall()
    assert events == [("pro-users", "user_2", "entered")]
    # In the history: the promotion's run, and production's evaluation tagged with it.
    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as instance:
        runs = [run for run in instance.get_runs() if run.run_id not in earlier]
    promotions = [run for run in runs if run.job_name == "promote_definitions"]
    assert len(promotions) == 2
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in promotions)
    assert {run.tags["audiences/launched_by"] for run in promotions} == {"knock commit promote"}
    evaluations = [run for run in runs if run.tags.get("audiences/promotion")]
    assert len(evaluations) == 2
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in evaluations)
    assert "pro-users +1 -0" in {run.tags["audiences/impact"] for run in evaluations}


def test_a_commit_or_promotion_while_a_promotion_runs_is_refused_and_changes_nothing(served):
    project, settings, http = served
    assert http.put("/v1/commits", params={"commit_message": "first"}).status_code == 200
    (project / "data" / "audiences" / "pro-users" / "audience.json").write_text(
        '{"name": "Pro", "type": "dynamic", "segments": [{"conditions": '
        '[{"property": "recipient.plan", "operator": "equal_to", "argument": "free"}]}]}'
    )
    store = lifecycle.open_store(settings, "development")
    promoting, release = threading.Event(), threading.Event()

    def promotion():
        with lifecycle.promotion_marker(store, "development", "production"):
            promoting.set()
            release.wait(60)

    worker = threading.Thread(target=promotion)
    worker.start()
    try:
        assert promoting.wait(30)
        before = project_state(project, "*.sqlite")
        for answer in (
            http.put("/v1/commits", params={"commit_message": "during the promotion"}),
            http.put("/v1/commits/promote", params={"to_environment": "production"}),
        ):
            assert answer.status_code == 422, answer.text
            body = answer.json()
            assert (body["code"], body["status"], body["type"]) == (
                "invalid_params",
                422,
                "invalid_params_error",
            )
            assert "a promotion from development to production is in progress" in body["message"]
        assert project_state(project, "*.sqlite") == before
    finally:
        release.set()
        worker.join()
        store.dispose()
