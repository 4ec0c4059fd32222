"""The `audiences` command line, run the way a user runs it, against the sample run's warehouse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from condition_harness import ROOT, SAMPLE_TIME, copy_sample_run

from audiences import cli

pytestmark = pytest.mark.slow


def run_cli(capsys, *arguments: str) -> tuple[int, str, str]:
    code = cli.main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def at_sample(sample_run, monkeypatch):
    """Flags pointing at the sample run, from the repository root, with no stray environment."""
    monkeypatch.chdir(ROOT)
    for name in (
        "AUDIENCES_DUCKDB",
        "AUDIENCES_DEFINITIONS",
        "AUDIENCES_EVALUATION_TIME",
        "AUDIENCES_USERS_SOURCE",
    ):
        monkeypatch.delenv(name, raising=False)
    return ["--duckdb", str(sample_run), "--evaluation-time", SAMPLE_TIME]


@pytest.mark.parametrize(
    "command",
    ["init", "run", "preview", "members", "validate", "explain", "generate", "serve", "keys"],
)
def test_every_command_has_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "audiences.cli", command, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert f"usage: audiences {command}" in result.stdout
    assert len(result.stdout.splitlines()) > 3


def test_top_level_help_lists_the_environment_variables():
    result = subprocess.run(
        [sys.executable, "-m", "audiences.cli", "--help"], capture_output=True, text=True
    )
    for name in (
        "AUDIENCES_DUCKDB",
        "AUDIENCES_DEFINITIONS",
        "AUDIENCES_USERS_SOURCE",
        "AUDIENCES_EVALUATION_TIME",
    ):
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
    draft.write_text(
        json.dumps(
            {
                "name": "Pro users",
                "type": "dynamic",
                "segments": [
                    {
                        "conditions": [
                            {
                                "property": "recipient.plan",
                                "operator": "equal_to",
                                "argument": "pro",
                            }
                        ]
                    }
                ],
            }
        )
    )
    before = sample_run.stat().st_mtime_ns
    code, out, _ = run_cli(capsys, *at_sample, "preview", str(draft), "--sample", "3", "--sql")
    assert code == 0
    assert out.startswith("pro-in-paris: ") and "matching users" in out
    assert len([line for line in out.splitlines() if line.startswith('  {"user_id"')]) == 3
    assert "'pro'" in out
    assert sample_run.stat().st_mtime_ns == before


def test_preview_of_a_draft_file_takes_its_key_from_the_file_name(capsys, at_sample, tmp_path):
    draft = tmp_path / "premium-users.json"
    draft.write_text(
        json.dumps(
            {
                "name": "Premium",
                "type": "dynamic",
                "segments": [
                    {
                        "conditions": [
                            {
                                "property": "recipient.plan",
                                "operator": "equal_to",
                                "argument": "pro",
                            }
                        ]
                    }
                ],
            }
        )
    )
    code, out, _ = run_cli(capsys, *at_sample, "preview", str(draft))
    assert code == 0 and out.startswith("premium-users: ")


def test_explain_shows_values_and_verdicts_consistent_with_membership(capsys, at_sample):
    _, out, _ = run_cli(capsys, *at_sample, "members", "eu-customers")
    member = json.loads(out.splitlines()[0])["user_id"]
    code, explained, _ = run_cli(capsys, *at_sample, "explain", "eu-customers", member)
    assert code == 0
    assert (
        explained.splitlines()[0]
        == f"{member} is IN eu-customers at 2026-11-01T00:00:00.000000Z (from --evaluation-time)"
    )
    assert "recipient.address.country" in explained and "(value: " in explained


def test_explain_names_an_unknown_user(capsys, at_sample):
    code, _, err = run_cli(capsys, *at_sample, "explain", "eu-customers", "nobody-here")
    assert code == 1 and "no user 'nobody-here'" in err


def test_validate_reports_file_and_json_path(capsys, at_sample, tmp_path):
    bad = tmp_path / "bad" / "audience.json"
    bad.parent.mkdir()
    bad.write_text(
        json.dumps(
            {
                "name": "B",
                "type": "dynamic",
                "segments": [
                    {
                        "conditions": [
                            {
                                "property": "recipient.seen",
                                "operator": "is_timestamp_before",
                                "argument": "5 minutes ago",
                            }
                        ]
                    }
                ],
            }
        )
    )
    code, _, err = run_cli(capsys, "--definitions", str(tmp_path), "validate")
    assert code == 1
    assert (
        f"{bad}: $.segments[0].conditions[0].argument: relative times must be at least 15 minutes"
        in err
    )
    code, out, _ = run_cli(capsys, *at_sample, "validate")
    assert code == 0 and "18 definitions are valid" in out


def test_validate_rejects_a_type_change_against_the_warehouse(capsys, at_sample, tmp_path):
    changed = tmp_path / "vip-customers" / "audience.json"
    changed.parent.mkdir()
    changed.write_text(
        json.dumps(
            {
                "name": "VIP",
                "type": "dynamic",
                "segments": [
                    {"conditions": [{"property": "recipient.plan", "operator": "exists"}]}
                ],
            }
        )
    )
    code, _, err = run_cli(capsys, *at_sample, "--definitions", str(tmp_path), "validate")
    assert (
        code == 1 and "$.type: audience 'vip-customers' is static; types cannot be changed" in err
    )


def test_generated_models_are_up_to_date(capsys, at_sample):
    """The repository's models, which no test writes (the runs use a copy of the project)."""
    flags = [*at_sample, "--dbt-project", str(ROOT / "dbt_project")]
    code, out, _ = run_cli(capsys, *flags, "generate", "--check")
    assert code == 0, out


def test_generate_check_fails_on_a_hand_made_drift_and_changes_nothing(
    capsys, tmp_path, dbt_project_copy
):
    import shutil

    project = shutil.copytree(dbt_project_copy, tmp_path / "dbt_project")
    model = project / "models" / "audiences" / "dynamic" / "eu_customers.sql"
    model.write_text(model.read_text() + "-- a hand edit\n")
    stale = project / "models" / "audiences" / "dynamic" / "left_over.sql"
    stale.write_text("select 1\n")
    flags = ["--dbt-project", str(project), "--definitions", str(ROOT / "data" / "audiences")]
    code, out, err = run_cli(capsys, *flags, "generate", "--check")
    assert code == 1
    assert f"out of date: {model}" in out and f"stale: {stale}" in out
    assert "run `audiences generate`" in err
    assert model.read_text().endswith("-- a hand edit\n") and stale.exists()


@pytest.fixture
def store_copy(sample_run, tmp_path, monkeypatch):
    """Flags for a copy of the sample run's warehouse and store, with triggers sent to a temp file."""
    monkeypatch.chdir(ROOT)
    copy_sample_run(sample_run, tmp_path)
    return ["--duckdb", str(tmp_path / "warehouse.duckdb"), "--sinks", str(tmp_path / "sinks.yml")]


def test_events_list_changes_but_not_a_first_evaluation(capsys, store_copy):
    code, out, _ = run_cli(capsys, *store_copy, "events", "--audience", "eu-customers")
    assert code == 0 and out == ""  # the first evaluation is backfill: history only, no events
    run_cli(capsys, *store_copy, "add", "vip-customers", "user_00005", "--tenant", "acme")
    _, out, _ = run_cli(
        capsys, *store_copy, "events", "--audience", "vip-customers", "--user", "user_00005"
    )
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["event_type"], e["tenant"], e["source"]) for e in events] == [
        ("entered", "acme", "manual")
    ]


def test_broadcast_is_delivered_once_even_when_sent_twice(capsys, store_copy, tmp_path):
    code, out, _ = run_cli(
        capsys,
        *store_copy,
        "broadcast",
        "enterprise-admins",
        "--workflow",
        "admin-digest",
        "--data",
        '{"issue": 12}',
    )
    assert code == 0 and ": 65 recipients, 65 new deliveries" in out
    _, again, _ = run_cli(
        capsys,
        *store_copy,
        "broadcast",
        "enterprise-admins",
        "--workflow",
        "admin-digest",
        "--data",
        '{"issue": 12}',
    )
    assert "65 recipients, 0 new deliveries" in again
    code, out, _ = run_cli(capsys, *store_copy, "deliver")
    assert code == 0
    assert out.splitlines() == [
        "deliveries: 65 delivered, 0 to retry, 0 dead-lettered (`audiences deliveries`)",
        "  file: 65 delivered",
    ]
    lines = [
        json.loads(line) for line in (tmp_path / "out" / "triggers.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 65 and {line["workflow_key"] for line in lines} == {"admin-digest"}
    assert all(line["data"]["issue"] == 12 for line in lines)
    _, status, _ = run_cli(capsys, *store_copy, "deliveries")
    assert '"delivered": 65' in status


def test_backfill_sends_entry_triggers_to_existing_members_once(capsys, store_copy):
    code, out, _ = run_cli(capsys, *store_copy, "backfill", "trial-ending-reminder")
    assert code == 0 and "52 members, 52 new deliveries" in out
    assert (
        "0 new deliveries" in run_cli(capsys, *store_copy, "backfill", "trial-ending-reminder")[1]
    )
    code, _, err = run_cli(capsys, *store_copy, "backfill", "churn-risk-exit")
    assert code == 1 and "triggers on exit" in err


def test_release_of_an_unknown_batch_is_a_clear_error(capsys, store_copy):
    code, _, err = run_cli(capsys, *store_copy, "release", "no-such-batch")
    assert code == 1 and "no held batch 'no-such-batch'" in err


def test_members_at_a_time_reads_the_history(capsys, store_copy):
    _, now, _ = run_cli(capsys, *store_copy, "members", "eu-customers")
    _, then, _ = run_cli(
        capsys, *store_copy, "members", "eu-customers", "--at", "2026-11-01T00:00:00Z"
    )
    _, before, _ = run_cli(
        capsys, *store_copy, "members", "eu-customers", "--at", "2026-10-31T23:59:59Z"
    )
    assert now == then and before == ""


def test_outside_the_repository_the_dbt_project_is_the_working_folders_never_the_engines(
    monkeypatch, tmp_path
):
    from audiences.settings import Settings

    monkeypatch.chdir(tmp_path)
    # The default, so no environment variable may name one (the test session names its copy).
    monkeypatch.delenv("AUDIENCES_DBT_PROJECT", raising=False)
    # Absent, it is refused with the way out (`audiences init`), rather than replaced by the engine's.
    assert Settings.from_env({}).dbt_project_dir == tmp_path / "dbt_project"


def test_run_names_a_dbt_project_folder_that_is_not_one(capsys, tmp_path):
    code = cli.main(
        ["--dbt-project", str(tmp_path / "nowhere"), "--duckdb", str(tmp_path / "w.duckdb"), "run"]
    )
    assert code == 1
    error = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'}: not a dbt project (no dbt_project.yml)" in error
    assert "--dbt-project" in error and not (tmp_path / "w.duckdb").exists()


def test_a_static_audiences_members_show_adds_and_removes_at_once(capsys, store_copy):
    _, before, _ = run_cli(capsys, *store_copy, "members", "vip-customers")
    code, out, _ = run_cli(
        capsys, *store_copy, "add", "vip-customers", "user_00005", "--tenant", "acme"
    )
    assert code == 0 and out.strip() == "user_00005 added to vip-customers with tenant 'acme'"
    _, after_add, _ = run_cli(capsys, *store_copy, "members", "vip-customers")
    added = {"user_id": "user_00005", "tenant": "acme"}
    assert added not in [json.loads(line) for line in before.splitlines()]
    assert [json.loads(line) for line in after_add.splitlines()].count(added) == 1
    run_cli(capsys, *store_copy, "remove", "vip-customers", "user_00005", "--tenant", "acme")
    _, after_remove, _ = run_cli(capsys, *store_copy, "members", "vip-customers")
    assert after_remove == before and before  # the sample's static members are still listed


def test_adding_a_user_nobody_identified_says_they_are_kept_as_a_missing_user(capsys, store_copy):
    _, out, _ = run_cli(capsys, *store_copy, "add", "vip-customers", "nobody-yet")
    assert out.strip() == (
        "nobody-yet added to vip-customers (no such user yet: kept as a missing user, "
        "and identifying them later triggers nothing)"
    )
    _, out, _ = run_cli(capsys, *store_copy, "add", "vip-customers", "user_00007")
    assert out.strip() == "user_00007 added to vip-customers"
    # An id that the warehouse's loader would quarantine never becomes a member (the API's rule).
    code, out, error = run_cli(capsys, *store_copy, "add", "vip-customers", " user_00007")
    assert (code, out, error.strip()) == (
        1,
        "",
        "error: user id: ' user_00007' has leading or trailing whitespace",
    )
    # So does a tenant the API refuses (given as a string or as an object alike).
    for command in ("add", "check"):
        code, out, error = run_cli(
            capsys, *store_copy, command, "vip-customers", "user_00007", "--tenant", "a/b"
        )
        assert (code, out, error.strip()) == (
            1,
            "",
            "error: --tenant: 'a/b' contains '/': Knock's ids cannot contain '/' or '#'",
        )


def test_members_of_a_dynamic_audience_survive_a_broken_definition_elsewhere(
    capsys, store_copy, tmp_path
):
    import shutil

    definitions = tmp_path / "audiences"
    shutil.copytree(ROOT / "data" / "audiences", definitions)
    (definitions / "broken").mkdir()
    (definitions / "broken" / "audience.json").write_text("{not json")
    _, expected, _ = run_cli(capsys, *store_copy, "members", "eu-customers")
    code, out, _ = run_cli(
        capsys, *store_copy, "--definitions", str(definitions), "members", "eu-customers"
    )
    assert code == 0 and out == expected and expected


def _summary_rows(out: str) -> dict[str, list[str]]:
    """The per-audience lines of `run`'s summary: key -> [type, members, entered, exited, ...]."""
    return {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.startswith("  ") and len(line.split()) >= 5 and line.split()[3].startswith("+")
    }


def test_run_reports_the_evaluation_it_ran_with_changes_deliveries_and_where_results_are(
    capsys, store_copy, tmp_path
):
    later = "2026-12-15T00:00:00Z"  # a month on: this week's signups are no longer new
    code, out, _ = run_cli(capsys, *store_copy, "--evaluation-time", later, "run")
    assert code == 0, out
    rows = _summary_rows(out)
    assert rows["new-signups-this-week"][:4] == ["dynamic", "0", "+0", "-80"]
    assert "deliveries:" in out and " queued" in out
    assert (
        str(tmp_path / "warehouse.duckdb") in out
        and f"sqlite:///{tmp_path / 'store.sqlite'}" in out
    )
    assert str(tmp_path / "out" / "triggers.jsonl") in out
    # Evaluating an earlier time again: the summary is that evaluation's, as members and preview say.
    _, out, _ = run_cli(
        capsys, *store_copy, "--evaluation-time", SAMPLE_TIME, "run", "--allow-earlier"
    )
    assert out.startswith("evaluated at 2026-11-01T00:00:00.000000Z")
    rows = _summary_rows(out)
    for audience in ("new-signups-this-week", "power-users"):
        _, members, _ = run_cli(capsys, *store_copy, "members", audience)
        _, preview, _ = run_cli(
            capsys, *store_copy, "--evaluation-time", SAMPLE_TIME, "preview", audience
        )
        assert int(rows[audience][1].replace(",", "")) == len(members.splitlines()) > 0
        assert preview.startswith(f"{audience}: {len(members.splitlines()):,} matching users")


@pytest.fixture
def at_last_evaluation(sample_run, monkeypatch):
    """Flags pointing at the sample run with no evaluation time given anywhere."""
    monkeypatch.chdir(ROOT)
    for name in (
        "AUDIENCES_DUCKDB",
        "AUDIENCES_DEFINITIONS",
        "AUDIENCES_EVALUATION_TIME",
        "AUDIENCES_USERS_SOURCE",
    ):
        monkeypatch.delenv(name, raising=False)
    return ["--duckdb", str(sample_run)]


def test_explain_uses_the_last_evaluations_time_so_a_listed_member_is_in(
    capsys, at_last_evaluation
):
    # This week's signups at the sample's time are no longer new at the time the test runs.
    _, out, _ = run_cli(capsys, *at_last_evaluation, "members", "new-signups-this-week")
    member = json.loads(out.splitlines()[0])["user_id"]
    code, explained, _ = run_cli(
        capsys, *at_last_evaluation, "explain", "new-signups-this-week", member
    )
    assert code == 0
    assert explained.splitlines()[0] == (
        f"{member} is IN new-signups-this-week at 2026-11-01T00:00:00.000000Z "
        "(the last evaluation's time, as `members` lists it; --evaluation-time "
        "picks another)"
    )
    _, later, _ = run_cli(
        capsys,
        *at_last_evaluation,
        "explain",
        "new-signups-this-week",
        member,
        "--evaluation-time",
        "2026-12-15",
    )
    assert later.splitlines()[0] == (
        f"{member} is OUT new-signups-this-week at 2026-12-15T00:00:00.000000Z "
        "(from --evaluation-time)"
    )


def test_preview_says_it_matches_now_and_when_the_last_evaluation_was(capsys, at_last_evaluation):
    from audiences.settings import utc_now

    before = utc_now()
    code, out, _ = run_cli(capsys, *at_last_evaluation, "preview", "eu-customers", "--sample", "0")
    moment = out.split(" at ", 1)[1].split(" ", 1)[0]
    assert code == 0 and moment >= before.strftime("%Y-%m-%dT%H:%M:%S")
    assert out.strip().endswith(
        "(now; the last evaluation was at 2026-11-01T00:00:00.000000Z; "
        "--evaluation-time picks another)"
    )


def test_events_since_and_until_take_times_in_any_iso_8601_form(capsys, store_copy):
    run_cli(capsys, *store_copy, "add", "vip-customers", "user_00005")
    _, everything, _ = run_cli(capsys, *store_copy, "events", "--audience", "vip-customers")
    occurred = json.loads(everything.splitlines()[-1])["occurred_at"]
    code, out, _ = run_cli(
        capsys, *store_copy, "events", "--audience", "vip-customers", "--since", occurred[:10]
    )
    assert code == 0 and json.loads(out.splitlines()[-1])["occurred_at"] == occurred
    # The same moment (to the second) in Paris's winter time, not the store's text form, still bounds it.
    from datetime import datetime, timedelta, timezone

    paris = (
        datetime.fromisoformat(occurred[:19] + "+00:00")
        .astimezone(timezone(timedelta(hours=1)))
        .isoformat()
    )
    _, out, _ = run_cli(
        capsys, *store_copy, "events", "--audience", "vip-customers", "--since", paris
    )
    assert json.loads(out.splitlines()[-1])["occurred_at"] == occurred
    _, out, _ = run_cli(
        capsys, *store_copy, "events", "--audience", "vip-customers", "--until", paris
    )
    assert occurred not in out
    with pytest.raises(SystemExit) as exited:
        cli.main([*store_copy, "events", "--since", "yesterday"])
    assert exited.value.code == 2
    assert "argument --since: 'yesterday' is not a time (ISO 8601" in capsys.readouterr().err


def test_every_command_lists_the_global_options_and_accepts_them_after_its_name(capsys):
    commands = cli._parser()._subparsers._group_actions[0].choices
    for name in commands:
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        help_text = capsys.readouterr().out
        for option in ("--duckdb", "--definitions", "--evaluation-time", "--store", "--debug"):
            assert option in help_text, (name, option)
    arguments = cli._parser().parse_args(
        ["--duckdb", "a.duckdb", "run", "--duckdb", "b.duckdb", "--debug"]
    )
    assert arguments.duckdb == "b.duckdb" and arguments.debug
    arguments = cli._parser().parse_args(["--duckdb", "a.duckdb", "run"])
    assert arguments.duckdb == "a.duckdb" and not arguments.debug


def test_dotenv_in_the_working_folder_is_read_with_the_environment_and_flags_winning(tmp_path):
    import shutil

    for folder in ("from-dotenv", "from-environment", "from-flag"):
        shutil.copytree(
            ROOT / "data" / "audiences" / "eu-customers", tmp_path / folder / "eu-customers"
        )
    (tmp_path / ".env").write_text("# as .env.example says\nAUDIENCES_DEFINITIONS=from-dotenv\n")
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("AUDIENCES_")
    }
    script = Path(sys.executable).parent / "audiences"

    def validate(*flags: str, **variables: str) -> str:
        result = subprocess.run(
            [str(script), "validate", *flags],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**environment, **variables},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert f"in {tmp_path / 'from-dotenv'};" in validate()
    assert f"in {tmp_path / 'from-environment'};" in validate(
        AUDIENCES_DEFINITIONS="from-environment"
    )
    assert f"in {tmp_path / 'from-flag'};" in validate(
        "--definitions", "from-flag", AUDIENCES_DEFINITIONS="from-environment"
    )
