"""The commands around event audiences, run as a user runs them on the sample run: `validate
--knock-compatible`, `explain` of an event condition, and `backfill-entries` (dry run, then once)."""

from __future__ import annotations

import json

import duckdb
import pytest
from condition_harness import ROOT, SAMPLE_TIME, copy_sample_run

from audiences import cli

pytestmark = pytest.mark.slow


def run_cli(capsys, *arguments: str) -> tuple[int, str, str]:
    code = cli.main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def sample_copy(sample_run, tmp_path, monkeypatch):
    """Flags pointing at a copy of the sample run (its warehouse, store and a file sink)."""
    monkeypatch.chdir(ROOT)
    for name in ("AUDIENCES_DUCKDB", "AUDIENCES_DEFINITIONS", "AUDIENCES_EVALUATION_TIME"):
        monkeypatch.delenv(name, raising=False)
    copy_sample_run(sample_run, tmp_path)
    return [
        "--duckdb",
        str(tmp_path / "warehouse.duckdb"),
        "--store",
        f"sqlite:///{tmp_path / 'store.sqlite'}",
        "--sinks",
        str(tmp_path / "sinks.yml"),
    ]


def test_knock_compatible_validation_names_every_event_condition(capsys, sample_copy):
    code, _, _ = run_cli(capsys, *sample_copy, "validate")
    assert code == 0
    code, _, err = run_cli(capsys, *sample_copy, "validate", "--knock-compatible")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 6
    assert lines[0].endswith(
        "frequent-buyers/audience.json: $.segments[0].conditions[0].operator: `performed` is an "
        "extension of this engine (event conditions); Knock's audiences cannot hold it, so this "
        "audience cannot be pushed to Knock"
    )
    assert all("Traceback" not in line for line in lines)


def test_explain_shows_the_events_an_event_condition_counted(capsys, sample_copy):
    with duckdb.connect(sample_copy[1], read_only=True) as connection:
        member, expected = connection.execute(
            """
            select users.user_id, count(*)
            from main.audience_members as members
            join raw.users as users using (user_key)
            join raw.events as events on events.user_id = users.user_id
                and events.event = 'Order Completed'
                and events."timestamp" > $now::timestamptz - interval 30 day
                and events."timestamp" <= $now::timestamptz
            where members.audience_key = 'frequent-buyers'
            group by all
            order by 1
            limit 1
            """,
            {"now": SAMPLE_TIME},
        ).fetchone()
    code, out, _ = run_cli(capsys, *sample_copy, "explain", "frequent-buyers", member)
    assert code == 0
    assert out.splitlines()[0].startswith(f"{member} is IN frequent-buyers")
    assert f"(value: {expected} events counted (first 20" in out
    assert "newest message ids: " in out


def test_backfill_entries_shows_then_sends_the_suppressed_entries_once(capsys, sample_copy):
    with duckdb.connect(sample_copy[1], read_only=True) as connection:
        members = connection.execute(
            "select count(*) from main.audience_members where audience_key = 'frequent-buyers'"
        ).fetchone()[0]
    assert members > 0
    # The first evaluation triggered nobody: the audience was new.
    code, out, _ = run_cli(capsys, *sample_copy, "backfill-entries", "frequent-buyers", "--dry-run")
    assert code == 0
    *lines, summary = out.strip().splitlines()
    assert len(lines) == members
    first = json.loads(lines[0])
    assert first["workflow_key"] == "frequent-buyer-perk"
    assert first["payload"]["data"]["event"] == "entered"
    assert first["payload"]["data"]["perk"] == "free-shipping"
    assert f"{members} backfilled members, would queue {members} new deliveries" in summary
    # A dry run changes nothing: it still would.
    _, again, _ = run_cli(capsys, *sample_copy, "backfill-entries", "frequent-buyers", "--dry-run")
    assert f"would queue {members} new deliveries" in again
    _, sent, _ = run_cli(capsys, *sample_copy, "backfill-entries", "frequent-buyers")
    assert f"queued {members} new deliveries" in sent
    _, twice, _ = run_cli(capsys, *sample_copy, "backfill-entries", "frequent-buyers")
    assert f"queued 0 new deliveries ({members} sent before" in twice
    code, _, err = run_cli(capsys, *sample_copy, "backfill-entries", "eu-customers")
    assert code == 1
    assert err.strip() == (
        "error: audience 'eu-customers' has no workflow trigger on `entered`: nothing to backfill"
    )
