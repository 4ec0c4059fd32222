"""An archived audience's members exit once, through real Dagster runs over dbt and DuckDB: the
exits are events in the store and its `exited` workflows are triggered for them (its `entered`
ones never again). That later runs record nothing more is `test_changes.py`'s (the diff)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from condition_harness import init_project

from audiences import cli

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path, monkeypatch):
    """`audiences init`'s project (pro-users, a welcome workflow on entering it) and a goodbye
    workflow on leaving it."""
    folder = init_project(tmp_path / "project", monkeypatch)
    goodbye = folder / "data" / "workflows" / "goodbye-pro-users"
    goodbye.mkdir(parents=True)
    (goodbye / "trigger.json").write_text(json.dumps({"audience": "pro-users", "on": "exited"}))
    return folder


def audiences(capsys, *arguments: str, stderr: bool = False) -> str:
    code = cli.main(list(arguments))
    out, err = capsys.readouterr()
    assert code == 0, f"audiences {' '.join(arguments)} failed:\n{out}\n{err}"
    return err if stderr else out


def test_archived_audience_members_exit_once_with_its_exit_triggers(project, capsys):
    store = project / "data" / "store.sqlite"
    sink = project / "data" / "out" / "workflow_triggers.jsonl"

    def events() -> list[tuple]:
        with sqlite3.connect(store) as connection:
            return connection.execute(
                "select user_id, event_type, is_backfill = 1 from membership_events "
                "where audience_key = 'pro-users' order by event_type, user_id"
            ).fetchall()

    def triggers() -> list[tuple]:
        lines = sink.read_text().splitlines() if sink.exists() else []
        return sorted(
            (json.loads(line)["workflow_key"], json.loads(line)["recipients"][0]) for line in lines
        )

    audiences(capsys, "commit", "-m", "pro users")
    audiences(capsys, "--evaluation-time", "2026-11-01T08:00:00Z", "run")
    members = [
        json.loads(line)["user_id"]
        for line in audiences(capsys, "members", "pro-users").splitlines()
    ]
    assert len(members) >= 2 and events() == [] and triggers() == []  # first members: backfill
    [first] = json.loads(audiences(capsys, "commits", "--json"))

    # `explain` names the version it evaluates and its commit; when the working file has changed
    # since, also the version (and commit) the evaluation in force at that time used.
    explained = audiences(capsys, "explain", "pro-users", members[0]).splitlines()
    assert explained[1] == (
        f"  definition: version {first['version']}, commit {first['id']} ('pro users', ana, "
        f"{first['created_at']})"
    )
    definition = project / "data" / "audiences" / "pro-users" / "audience.json"
    definition.write_text(definition.read_text().replace("Pro users", "Pro plan users"))
    explained = audiences(capsys, "explain", "pro-users", members[0]).splitlines()
    assert explained[1].startswith("  definition: version ") and explained[1].endswith(
        ", not committed"
    )
    assert explained[2] == (
        "  pro-users at 2026-11-01T08:00:00.000000Z: the evaluation of "
        f"2026-11-01T08:00:00.000000Z used version {first['version']}, commit {first['id']} "
        f"('pro users', ana, {first['created_at']})"
    )

    # Its last audience archived, the project evaluates none: the run still diffs and publishes.
    audiences(capsys, "archive", "pro-users", "-m", "no longer needed")
    ran = audiences(capsys, "--evaluation-time", "2026-11-01T09:00:00Z", "run")
    assert f"pro-users archived 0 +0 -{len(members)}" in " ".join(ran.split()), ran
    assert events() == [(user, "exited", False) for user in sorted(members)]
    assert triggers() == [("goodbye-pro-users", user) for user in sorted(members)]
    later = audiences(capsys, "members", "pro-users", "--at", "2026-11-01T09:30:00Z")
    assert later == ""

    # `members --at` names the definition in force then (on stderr: stdout stays JSON lines).
    before = audiences(capsys, "members", "pro-users", "--at", "2026-11-01T08:30:00Z", stderr=True)
    assert f"used version {first['version']}, commit {first['id']} ('pro users'" in before
    [archive] = json.loads(audiences(capsys, "commits", "--json"))[:1]
    after = audiences(capsys, "members", "pro-users", "--at", "2026-11-01T09:30:00Z", stderr=True)
    assert after.startswith(
        f"pro-users at 2026-11-01T09:30:00.000000Z: archived by commit {archive['id']} "
        "('no longer needed', ana, "
    )
