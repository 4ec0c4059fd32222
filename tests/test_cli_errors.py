"""Bad input to every `audiences` command: one or two lines naming the file, field or flag, a
non-zero exit, and no traceback (`--debug` shows one). Run through the real `audiences` entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from condition_harness import ROOT, SAMPLE_TIME, copy_store

AUDIENCES = Path(sys.executable).parent / "audiences"


def audiences(
    *arguments: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the installed `audiences` script the way a user does, with no stray AUDIENCES_* variables."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("AUDIENCES_")
    }
    environment.pop("DAGSTER_HOME", None)
    return subprocess.run(
        [str(AUDIENCES), *arguments],
        cwd=cwd,
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(result: subprocess.CompletedProcess, *named: str, max_lines: int = 2) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= max_lines, result.stderr
    for text in named:
        assert text in result.stderr, result.stderr


@pytest.fixture
def scratch(tmp_path) -> Path:
    """A folder of bad files, one per case."""
    (tmp_path / "sources.yml").write_text("sources: [\n")
    (tmp_path / "sinks.yml").write_text("sinks:\n  file: {type: carrier-pigeon}\n")
    (tmp_path / "syncs.yml").write_text("syncs: [\n")
    (tmp_path / "draft.json").write_text("{not json")
    for name, other in [("orphan", "no-such-audience"), ("loop", "loop")]:
        condition = {"property": "recipient", "operator": "is_audience_member", "argument": other}
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"name": name, "type": "dynamic", "segments": [{"conditions": [condition]}]})
        )
    return tmp_path


# (arguments, the text the message must name); the folder `{tmp}` holds the scratch files.
CASES = {
    "bad store URL": (["--store", "foo://bar", "events"], ["foo://bar", "--store"]),
    "broadcast with --data not JSON": (
        ["broadcast", "eu-customers", "--workflow", "w", "--data", "{bad"],
        ["--data"],
    ),
    "events --since not a time": (["events", "--since", "yesterday"], ["--since", "ISO 8601"]),
    "events --until not a time": (["events", "--until", "2026-13-45"], ["--until", "ISO 8601"]),
    "members --at not a time": (
        ["members", "eu-customers", "--at", "last week"],
        ["--at", "ISO 8601"],
    ),
    "--evaluation-time not a time": (
        ["--evaluation-time", "tomorrow", "preview", "eu-customers"],
        ["--evaluation-time", "ISO 8601"],
    ),
    "--evaluation-time after the command": (
        ["explain", "eu-customers", "u", "--evaluation-time", "noon"],
        ["--evaluation-time", "ISO 8601"],
    ),
    "bad sinks.yml": (
        ["--sinks", "{tmp}/sinks.yml", "deliver"],
        ["{tmp}/sinks.yml", "carrier-pigeon"],
    ),
    "--sinks naming no file": (
        ["deliver", "--sinks", "{tmp}/typo.yml"],
        ["--sinks {tmp}/typo.yml"],
    ),
    "publish with no warehouse": (["publish"], ["{tmp}/w.duckdb", "no warehouse yet"]),
    "generate from a folder that does not exist": (
        ["--definitions", "{tmp}/nowhere", "generate"],
        ["{tmp}/nowhere"],
    ),
    "discard of an unknown batch": (["discard", "no-such-batch"], ["no-such-batch"]),
    "revoke of an unknown key": (["keys", "revoke", "no-such-key"], ["no-such-key"]),
    "remove from an unknown audience": (["remove", "no-such-audience", "u1"], ["no-such-audience"]),
    "deliveries from a store that is not a database": (
        ["deliveries", "--store", "{tmp}/draft.json"],
        ["{tmp}/draft.json", "--store"],
    ),
    "bad syncs.yml": (["--definitions", "{tmp}/audiences", "sync"], ["{tmp}/syncs.yml"]),
    "draft definition not JSON": (["preview", "{tmp}/draft.json"], ["{tmp}/draft.json"]),
    "draft definition referring to no audience": (
        ["preview", "{tmp}/orphan.json"],
        ["{tmp}/orphan.json", "unknown audience 'no-such-audience'"],
    ),
    "draft definition on a cycle": (
        ["explain", "{tmp}/loop.json", "u1"],
        ["{tmp}/loop.json", "cycle: loop -> loop"],
    ),
    "definitions folder that does not exist": (
        ["--definitions", "{tmp}/nowhere", "validate"],
        ["{tmp}/nowhere"],
    ),
    "upload of a file that does not exist": (
        ["upload", "vip-customers", "{tmp}/nowhere.csv"],
        ["{tmp}/nowhere.csv"],
    ),
    "serve on a port that cannot be": (["serve", "--port", "99999"], ["--port"]),
    "bad sources.yml when the run loads it": (
        ["--sources", "{tmp}/sources.yml", "--duckdb", "{tmp}/w.duckdb", "run"],
        ["{tmp}/sources.yml"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_or_two_lines_naming_it_without_a_traceback(case, scratch):
    arguments, named = CASES[case]
    (scratch / "audiences").mkdir()

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(scratch))

    result = audiences(
        "--duckdb",
        str(scratch / "w.duckdb"),
        "--store",
        f"sqlite:///{scratch}/store.sqlite",
        *map(fill, arguments),
        timeout=120,
    )
    assert_user_error(result, *map(fill, named))


@pytest.mark.parametrize(
    "variable, value",
    [
        ("AUDIENCES_EVALUATION_TIME", "soon"),
        ("AUDIENCES_BREAKER_SHARE", "a fifth"),
        ("AUDIENCES_UPLOAD_MAX_BYTES", "10MB"),
    ],
)
def test_a_bad_environment_variable_is_named(variable, value, tmp_path):
    result = audiences("--duckdb", str(tmp_path / "w.duckdb"), "events", env={variable: value})
    assert_user_error(result, variable, repr(value))
    assert not (tmp_path / "w.duckdb").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = audiences("--debug", "--store", "foo://bar", "events")
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "foo://bar" in result.stderr


def test_an_unexpected_error_is_one_line_that_points_at_debug(tmp_path):
    (tmp_path / "syncs.yml").write_text("- just\n- a list\n")
    (tmp_path / "audiences").mkdir()
    result = audiences(
        "--definitions", str(tmp_path / "audiences"), "--duckdb", str(tmp_path / "w.duckdb"), "sync"
    )
    assert_user_error(result, f"{tmp_path / 'syncs.yml'}")


@pytest.mark.slow
def test_a_run_that_fails_on_a_source_names_the_file_and_column_not_dagster(tmp_path, sample_run):
    shutil.copy(sample_run, tmp_path / "warehouse.duckdb")
    copy_store(sample_run.parent / "store.sqlite", tmp_path / "store.sqlite")
    (tmp_path / "users.csv").write_text("user_id,name\nu1,Ann\n")
    (tmp_path / "sources.yml").write_text("sources:\n  - name: crm\n    path: users.csv\n")
    result = audiences(
        "--duckdb",
        str(tmp_path / "warehouse.duckdb"),
        "--sources",
        str(tmp_path / "sources.yml"),
        "--sinks",
        str(sample_run.parent / "sinks.yml"),
        "--evaluation-time",
        SAMPLE_TIME,
        "run",
    )
    assert_user_error(result, f"{tmp_path / 'users.csv'}: no `id` column", "user_id", "users")
    assert "dagster" not in result.stderr.lower()
