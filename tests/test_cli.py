"""The `audiences` command line, run the way a user runs it, against the sample run's warehouse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from audiences import cli
from condition_harness import ROOT, SAMPLE_TIME

pytestmark = pytest.mark.slow


def run_cli(capsys, *arguments: str) -> tuple[int, str, str]:
    code = cli.main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def at_sample(sample_run, monkeypatch):
    """Flags pointing at the sample run, from the repository root, with no stray environment."""
    monkeypatch.chdir(ROOT)
    for name in ("AUDIENCES_DUCKDB", "AUDIENCES_DEFINITIONS", "AUDIENCES_EVALUATION_TIME", "AUDIENCES_USERS_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    return ["--duckdb", str(sample_run), "--evaluation-time", SAMPLE_TIME]


@pytest.mark.parametrize("command", ["run", "preview", "members", "validate", "explain", "generate"])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "audiences.cli", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert f"usage: audiences {command}" in result.stdout
    assert len(result.stdout.splitlines()) > 3


def test_top_level_help_lists_the_environment_variables():
    result = subprocess.run([sys.executable, "-m", "audiences.cli", "--help"], capture_output=True, text=True)
    for name in ("AUDIENCES_DUCKDB", "AUDIENCES_DEFINITIONS", "AUDIENCES_USERS_SOURCE", "AUDIENCES_EVALUATION_TIME"):
        assert name in result.stdout


def test_members_prints_json_lines_matching_the_evaluation(capsys, at_sample):
    code, out, _ = run_cli(capsys, *at_sample, "members", "eu-customers")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) > 100
    assert set(lines[0]) == {"user_id", "tenant"} and all(line["tenant"] is None for line in lines)
    _, summary, _ = run_cli(capsys, *at_sample, "preview", "eu-customers", "--sample", "0")
    assert summary.startswith(f"eu-customers: {len(lines):,} matching users")


def test_preview_of_a_new_definition_file_writes_nothing(capsys, at_sample, tmp_path, sample_run):
    draft = tmp_path / "pro-in-paris" / "audience.json"
    draft.parent.mkdir()
    draft.write_text(json.dumps({"name": "Pro users", "type": "dynamic", "segments": [{"conditions": [
        {"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}]}]}))
    before = sample_run.stat().st_mtime_ns
    code, out, _ = run_cli(capsys, *at_sample, "preview", str(draft), "--sample", "3", "--sql")
    assert code == 0
    assert out.startswith("pro-in-paris: ") and "matching users" in out
    assert len([line for line in out.splitlines() if line.startswith('  {"user_id"')]) == 3
    assert "'pro'" in out
    assert sample_run.stat().st_mtime_ns == before


def test_explain_shows_values_and_verdicts_consistent_with_membership(capsys, at_sample):
    _, out, _ = run_cli(capsys, *at_sample, "members", "eu-customers")
    member = json.loads(out.splitlines()[0])["user_id"]
    code, explained, _ = run_cli(capsys, *at_sample, "explain", "eu-customers", member)
    assert code == 0
    assert explained.splitlines()[0] == f"{member} is IN eu-customers at 2026-11-01T00:00:00.000000Z"
    assert "recipient.address.country" in explained and "(value: " in explained


def test_explain_names_an_unknown_user(capsys, at_sample):
    code, _, err = run_cli(capsys, *at_sample, "explain", "eu-customers", "nobody-here")
    assert code == 1 and "no user 'nobody-here'" in err


def test_validate_reports_file_and_json_path(capsys, at_sample, tmp_path):
    bad = tmp_path / "bad" / "audience.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"name": "B", "type": "dynamic", "segments": [{"conditions": [
        {"property": "recipient.seen", "operator": "is_timestamp_before", "argument": "5 minutes ago"}]}]}))
    code, _, err = run_cli(capsys, "--definitions", str(tmp_path), "validate")
    assert code == 1
    assert f"{bad}: $.segments[0].conditions[0].argument: relative times must be at least 15 minutes" in err
    code, out, _ = run_cli(capsys, *at_sample, "validate")
    assert code == 0 and "14 definitions are valid" in out


def test_validate_rejects_a_type_change_against_the_warehouse(capsys, at_sample, tmp_path):
    changed = tmp_path / "vip-customers" / "audience.json"
    changed.parent.mkdir()
    changed.write_text(json.dumps({"name": "VIP", "type": "dynamic", "segments": [{"conditions": [
        {"property": "recipient.plan", "operator": "exists"}]}]}))
    code, _, err = run_cli(capsys, *at_sample, "--definitions", str(tmp_path), "validate")
    assert code == 1 and "$.type: audience 'vip-customers' is static; types cannot be changed" in err


def test_generated_models_are_up_to_date(capsys, at_sample):
    code, out, _ = run_cli(capsys, *at_sample, "generate", "--check")
    assert code == 0, out
