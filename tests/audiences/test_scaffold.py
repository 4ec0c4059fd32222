"""A project of one's own: `audiences init`, and nothing run from a user's folder writes into the engine.

Running on one's own definitions from another folder used to generate their models into the
engine repository's `dbt_project/` (rewriting and deleting its tracked files), and the engine's
hand-written sample audience appeared in the user's results.
"""

from __future__ import annotations

import json
import os
import subprocess

import duckdb
import pytest
from condition_harness import ROOT

from audiences import cli

pytestmark = pytest.mark.slow

TIME = "2026-11-01T00:00:00Z"


def engine_state() -> tuple[str, dict]:
    """`git status` of the engine's repository, and every file under its dbt project and sample
    data with its size and modification time (git does not see inside ignored folders like
    `dbt_project/target`)."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files = {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for folder in (ROOT / "dbt_project", ROOT / "data")
        for path in folder.rglob("*")
        if path.is_file()
    }
    return status, files


@pytest.fixture
def own_folder(tmp_path, monkeypatch):
    """A folder outside the repository with someone's definitions (Knock CLI layout) and users."""
    folder = tmp_path / "mine"
    assert ROOT not in folder.parents
    for key, conditions in {
        "big-spenders": [
            {"property": "recipient.mrr", "operator": "greater_than", "argument": "100"}
        ],
        "germans": [{"property": "recipient.country", "operator": "equal_to", "argument": "DE"}],
    }.items():
        (folder / "audiences" / key).mkdir(parents=True)
        (folder / "audiences" / key / "audience.json").write_text(
            json.dumps({"name": key, "type": "dynamic", "segments": [{"conditions": conditions}]})
        )
    (folder / "users.csv").write_text("id,mrr,country\nu1,500,DE\nu2,50,DE\nu3,900,FR\nu4,10,US\n")
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(folder)
    return folder


def test_own_definitions_from_another_folder_never_write_into_the_engine(capsys, own_folder):
    before = engine_state()
    flags = ["--definitions", "audiences", "--users-source", "users.csv", "--evaluation-time", TIME]
    # No dbt project here: refused, with the way out, and nothing written anywhere.
    assert cli.main([*flags, "run"]) == 1
    error = capsys.readouterr().err
    assert error.splitlines() == [
        f"error: {own_folder / 'dbt_project'}: not a dbt project (no dbt_project.yml); run `audiences init` to make "
        f"this folder a project, or point --dbt-project or AUDIENCES_DBT_PROJECT at one"
    ]
    assert sorted(path.name for path in own_folder.iterdir()) == ["audiences", "users.csv"]
    for command in (["generate"], ["generate", "--check"]):
        assert cli.main([*flags, *command]) == 1
        assert "run `audiences init`" in capsys.readouterr().err
    assert engine_state() == before

    assert cli.main(["--definitions", "audiences", "init"]) == 0
    assert not (
        own_folder / "data" / "audiences"
    ).exists()  # no example beside one's own definitions
    assert cli.main([*flags, "run"]) == 0
    out = capsys.readouterr().out
    with duckdb.connect(
        str(own_folder / "data" / "warehouse.duckdb"), read_only=True
    ) as connection:
        catalog = connection.execute(
            "select audience_key from main.audience_catalog order by 1"
        ).fetchall()
        members = connection.execute(
            "select audience_key, user_id from main.audience_members join raw.users using (user_key) order by all"
        ).fetchall()
    assert catalog == [("big-spenders",), ("germans",)]
    assert members == [
        ("big-spenders", "u1"),
        ("big-spenders", "u3"),
        ("germans", "u1"),
        ("germans", "u2"),
    ]
    assert "high_value_accounts" not in out
    assert engine_state() == before


def test_the_engines_own_dbt_project_refuses_someone_elses_models(capsys, own_folder):
    before = engine_state()
    code = cli.main(
        ["--definitions", "audiences", "--dbt-project", str(ROOT / "dbt_project"), "generate"]
    )
    assert code == 1
    assert "is the engine's own dbt project" in capsys.readouterr().err
    assert engine_state() == before


def test_init_then_run_in_the_new_folder(capsys, tmp_path, monkeypatch):
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    before = engine_state()
    assert cli.main(["init", "project"]) == 0
    folder = tmp_path / "project"
    for expected in (
        "data/audiences/pro-users/audience.json",
        "data/sources.yml",
        "data/users.csv",
        "data/sinks.yml",
        "data/workflows/welcome-pro-users/trigger.json",
        "dbt_project/dbt_project.yml",
        "dbt_project/profiles.yml",
        "dbt_project/models/audiences/dynamic/pro_users.sql",
        "dbt_project/models/audiences/custom/_custom_audiences.yml",
        "dagster_home/dagster.yaml",
        "workspace.yaml",
        ".gitignore",
    ):
        assert (folder / expected).is_file(), expected
    # The engine's sample audiences stay behind: generated and hand-written alike.
    assert not list((folder / "dbt_project" / "models" / "audiences" / "custom").glob("*.sql"))
    assert [p.name for p in (folder / "dbt_project" / "models" / "audiences").rglob("*.sql")] == [
        "pro_users.sql"
    ]

    monkeypatch.chdir(folder)
    capsys.readouterr()
    assert cli.main(["generate", "--check"]) == 0
    capsys.readouterr()
    assert cli.main(["--evaluation-time", TIME, "run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:3] == [
        "  audience   type        members   entered    exited",
        "  pro-users  dynamic           2        +2        -0  first evaluation: no triggers",
    ]
    assert cli.main(["members", "pro-users"]) == 0
    assert [json.loads(line)["user_id"] for line in capsys.readouterr().out.splitlines()] == [
        "user_1",
        "user_3",
    ]
    assert (folder / "data" / "store.sqlite").is_file()

    # init again keeps every file that is there (the run's databases aside: the store's SQLite
    # connections, still open in this process, may checkpoint).
    def project_files():
        return {
            path: path.read_bytes()
            for path in folder.rglob("*")
            if path.is_file() and not path.name.startswith(("store.sqlite", "warehouse.duckdb"))
        }

    written = project_files()
    assert cli.main(["init"]) == 0
    assert project_files() == written
    assert engine_state() == before


def test_init_with_own_definitions_lets_the_ui_load_them_from_env(capsys, own_folder, monkeypatch):
    # `audiences --definitions audiences init`, then the UI (`dagster dev` here, no flags): its
    # code location looked for `data/audiences` and failed to load ("the definitions folder does
    # not exist"). init now names the folder in the project's `.env`, which Dagster loads.
    from dotenv import dotenv_values

    from pipelines import build_definitions

    assert cli.main(["--definitions", "audiences", "init"]) == 0
    capsys.readouterr()
    assert dotenv_values(own_folder / ".env") == {"AUDIENCES_DEFINITIONS": "audiences"}
    for name, value in dotenv_values(own_folder / ".env").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_HOME", str(own_folder / "dagster_home"))
    keys = {
        key.to_user_string() for key in build_definitions(["development"]).resolve_all_asset_keys()
    }
    assert {"audiences/big_spenders", "audiences/germans"} <= keys
    # A `.env` that names a folder already is kept as it is.
    (own_folder / ".env").write_text("AUDIENCES_DEFINITIONS=elsewhere\n")
    assert cli.main(["--definitions", "audiences", "init"]) == 0
    assert (own_folder / ".env").read_text() == "AUDIENCES_DEFINITIONS=elsewhere\n"
