"""An analyst's day, with real Dagster runs, dbt and DuckDB in each environment: edit in
development, preview, dry run, commit, promote, see the events in production only, and roll back
by promoting a commit that restores the old definition."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from condition_harness import init_project

from audiences import cli

pytestmark = pytest.mark.slow

PRO_ONLY = {
    "name": "Pro users",
    "type": "dynamic",
    "segments": [
        {"conditions": [{"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}]}
    ],
}
PRO_OR_FREE = {
    **PRO_ONLY,
    "segments": [
        *PRO_ONLY["segments"],
        {
            "conditions": [
                {"property": "recipient.plan", "operator": "equal_to", "argument": "free"}
            ]
        },
    ],
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """`audiences init`'s project (pro-users over three users, a welcome workflow on entering
    it), with production's deliveries going to a file of its own."""
    folder = init_project(tmp_path / "project", monkeypatch)
    (folder / "data" / "production").mkdir(parents=True)
    (folder / "data" / "production" / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    return folder


def audiences(capsys, *arguments: str) -> str:
    code = cli.main(list(arguments))
    out, err = capsys.readouterr()
    assert code == 0, f"audiences {' '.join(arguments)} failed:\n{out}\n{err}"
    return out


def events(store) -> list[tuple]:
    with sqlite3.connect(store) as connection:
        return connection.execute(
            "select audience_key, user_id, event_type, audience_version from membership_events "
            "where not is_backfill order by occurred_at, user_id"
        ).fetchall()


def delivered_to(path) -> list[str]:
    if not path.exists():
        return []
    return sorted(json.loads(line)["recipients"][0] for line in path.read_text().splitlines())


def test_edit_preview_dry_run_commit_promote_and_roll_back(project, capsys):
    definition = project / "data" / "audiences" / "pro-users" / "audience.json"
    definition.write_text(json.dumps(PRO_ONLY, indent=2))
    development_store = project / "data" / "store.sqlite"
    production_store = project / "data" / "production" / "store.sqlite"
    production_sink = project / "data" / "production" / "out" / "triggers.jsonl"
    development_sink = project / "data" / "out" / "workflow_triggers.jsonl"

    # Morning: the audience as it is goes live; its first members trigger nothing.
    audiences(capsys, "commit", "-m", "pro users")
    audiences(capsys, "--evaluation-time", "2026-11-01T08:00:00Z", "promote", "--to", "production")
    audiences(capsys, "--evaluation-time", "2026-11-01T08:00:00Z", "run")

    # Edit in development, preview and diff it.
    definition.write_text(json.dumps(PRO_OR_FREE, indent=2))
    preview = audiences(capsys, "--evaluation-time", "2026-11-01T09:00:00Z", "preview", "pro-users")
    assert preview.startswith("pro-users: 3 matching users"), preview
    assert "modified: pro-users" in audiences(capsys, "diff")
    dry = json.loads(audiences(capsys, "commit", "--dry-run", "--json"))
    assert dry["impact"]["environment"] == "development"
    assert dry["impact"]["audiences"][0]["entered"] == 1

    # Commit, then a dry run of the promotion against production's users.
    audiences(capsys, "commit", "-m", "free users too")
    planned = json.loads(
        audiences(
            capsys,
            "--evaluation-time",
            "2026-11-01T10:00:00Z",
            "promote",
            "--to",
            "production",
            "--dry-run",
            "--json",
        )
    )
    [impact] = planned["impact"]["audiences"]
    assert (impact["members_now"], impact["members_after"]) == (2, 3)
    assert (impact["entered"], impact["exited"]) == (1, 0)
    assert impact["entered_sample"] == ["user_2"]
    assert impact["triggers"] == [
        {
            "workflow_key": "welcome-pro-users",
            "on": "entered",
            "deliveries": 1,
            "is_upper_bound": True,
        }
    ]
    assert impact["would_hold"] is False
    assert events(production_store) == []  # a dry run writes nothing

    # Promote: production evaluates at once; the event and the delivery are production's only.
    audiences(capsys, "--evaluation-time", "2026-11-01T10:00:00Z", "promote", "--to", "production")
    production_events = events(production_store)
    assert [event[:3] for event in production_events] == [("pro-users", "user_2", "entered")]
    assert delivered_to(production_sink) == ["user_2"]
    assert events(development_store) == []
    assert delivered_to(development_sink) == []
    # The promotion is a Dagster run of production, tagged with its commits and impact.
    import dagster as dg

    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs(
            filters=dg.RunsFilter(tags={"audiences/promotion": "development -> production"})
        )
        # Its audience's materialization (production's asset, under its name) names the version
        # it evaluated.
        latest = instance.get_latest_materialization_event(
            dg.AssetKey(["production", "audiences", "pro_users"])
        )
    assert {run.tags["audiences/environment"] for run in runs} == {"production"}
    assert "pro-users +1 -0" in {run.tags["audiences/impact"] for run in runs}
    metadata = latest.asset_materialization.metadata
    assert metadata["commit_message"].value == "free users too"
    assert metadata["commit_id"].value == planned["commits"][0]

    # Roll back: the old definition, committed again and promoted; user_2 exits in production.
    definition.write_text(json.dumps(PRO_ONLY, indent=2))
    audiences(capsys, "commit", "-m", "roll back: pro users only")
    audiences(capsys, "--evaluation-time", "2026-11-01T11:00:00Z", "promote", "--to", "production")
    assert [event[:3] for event in events(production_store)] == [
        ("pro-users", "user_2", "entered"),
        ("pro-users", "user_2", "exited"),
    ]
    listed = json.loads(audiences(capsys, "commits", "--audience", "pro-users", "--json"))
    assert [row["message"] for row in listed] == [
        "roll back: pro users only",
        "free users too",
        "pro users",
    ]
    assert all(row["environments"] == ["development", "production"] for row in listed)
    # The events name the version in force: the promoted commit's.
    assert production_events[0][3] == listed[1]["version"]
