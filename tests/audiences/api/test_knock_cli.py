"""Knock's own CLI (`@knocklabs/cli` from npm) against a real `audiences serve` on 127.0.0.1:
whoami, audience list/get/pull/validate/push/archive, commit, commit list and commit promote,
authenticated with a service token from `audiences keys create --service-token`. A malformed
push or a refused promotion leaves every store and definition file as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from api_server import serve_process
from project_state import project_state

pytestmark = pytest.mark.slow

KNOCK_CLI = "@knocklabs/cli@1.1.2"
PRO = {
    "name": "Pro",
    "type": "dynamic",
    "description": "Users on the pro plan",
    "segments": [
        {"conditions": [{"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}]}
    ],
}
NEWSLETTER = {"name": "Newsletter", "type": "static", "description": "Subscribers"}


@pytest.fixture(scope="session")
def knock(tmp_path_factory) -> Path:
    """The `knock` binary, installed from npm into a temporary folder for this session."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (.ci/run installs Debian's nodejs and npm)")
    folder = tmp_path_factory.mktemp("knock_cli")
    installed = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), KNOCK_CLI],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if installed.returncode != 0:
        if "ENOTFOUND" in installed.stderr or "EAI_AGAIN" in installed.stderr:
            pytest.skip(f"the npm registry is unreachable: {installed.stderr.strip()[-300:]}")
        raise AssertionError(f"npm install {KNOCK_CLI} failed:\n{installed.stderr}")
    return folder / "node_modules" / ".bin" / "knock"


@pytest.fixture
def served(tmp_path, dbt_project_copy):
    """A project (two definitions) served by `audiences serve`, and a service token. Its dbt
    project is a copy of its own: no test writes the repository's (or the session's) `target/`."""
    project = tmp_path / "project"
    dbt_project = shutil.copytree(dbt_project_copy, tmp_path / "dbt_project")
    for key, definition in {"pro": PRO, "newsletter": NEWSLETTER}.items():
        (project / "data" / "audiences" / key).mkdir(parents=True)
        (project / "data" / "audiences" / key / "audience.json").write_text(
            json.dumps(definition, indent=2) + "\n"
        )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        "AUDIENCES_DBT_PROJECT": str(dbt_project),
        "AUDIENCES_PROMOTION_EVALUATES": "false",
    }
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "audiences.cli",
            "keys",
            "create",
            "--service-token",
            "--name",
            "ci",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    with serve_process(env, project) as (url, _process):
        yield project, url, created.stdout.strip().splitlines()[-1]


def run_knock(knock: Path, served, *arguments: str, cwd: Path | None = None):
    project, url, token = served
    answer = subprocess.run(
        [str(knock), *arguments, "--api-origin", url, "--service-token", token],
        cwd=cwd or project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1"},
    )
    # oclif wraps errors at 80 columns, each line behind a "\u203a": one line, single spaces.
    answer.message = " ".join(answer.stderr.replace("\u203a", " ").split())
    return answer


def test_knock_cli_pulls_pushes_commits_and_promotes(knock, served, tmp_path):
    project, _url, _token = served
    working = project / "data" / "audiences"

    whoami = run_knock(knock, served, "whoami")
    assert whoami.returncode == 0, whoami.stderr
    assert "Service token name: ci" in whoami.stdout

    listed = run_knock(knock, served, "audience", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [entry["key"] for entry in json.loads(listed.stdout)["entries"]] == ["newsletter", "pro"]
    got = run_knock(knock, served, "audience", "get", "pro", "--json")
    assert json.loads(got.stdout)["segments"] == PRO["segments"]

    # Pulled files are Knock's layout: the definition, `__readonly` {key} and `$schema`.
    pulled = tmp_path / "pulled"
    pull = run_knock(
        knock, served, "audience", "pull", "--all", "--audiences-dir", str(pulled), "--force"
    )
    assert pull.returncode == 0, pull.stderr
    document = json.loads((pulled / "pro" / "audience.json").read_text())
    assert document == {
        **PRO,
        "__readonly": {"key": "pro"},
        "$schema": "https://schemas.knock.app/cli/audience.json",
    }

    # An edit pushed lands as the working file, in the layout `knock audience pull` reads.
    document["segments"][0]["conditions"][0]["argument"] = "enterprise"
    (pulled / "pro" / "audience.json").write_text(json.dumps(document, indent=2))
    validated = run_knock(knock, served, "audience", "validate", "pro", cwd=pulled)
    assert validated.returncode == 0, validated.stderr + validated.stdout
    pushed = run_knock(knock, served, "audience", "push", "pro", cwd=pulled)
    assert pushed.returncode == 0, pushed.stderr + pushed.stdout
    written = json.loads((working / "pro" / "audience.json").read_text())
    assert written["segments"][0]["conditions"][0]["argument"] == "enterprise"
    assert set(written) == {"name", "type", "description", "segments"}

    # A malformed audience and a type change are refused, naming the audience and the field.
    (pulled / "bad").mkdir()
    (pulled / "bad" / "audience.json").write_text(
        json.dumps(
            {
                "name": "Bad",
                "type": "dynamic",
                "segments": [
                    {"conditions": [{"property": "recipient.plan", "operator": "equalz"}]}
                ],
            }
        )
    )
    before = project_state(project)
    bad = run_knock(knock, served, "audience", "push", "bad", cwd=pulled)
    assert bad.returncode != 0
    assert "bad: $.segments[0].conditions[0].operator: unknown operator 'equalz'" in bad.message
    assert project_state(project) == before
    retyped = json.loads((pulled / "newsletter" / "audience.json").read_text())
    (pulled / "newsletter" / "audience.json").write_text(
        json.dumps({**retyped, "type": "dynamic", "segments": PRO["segments"]})
    )
    assert run_knock(knock, served, "commit", "-m", "first", "--force").returncode == 0
    before = project_state(project)
    retype = run_knock(knock, served, "audience", "push", "newsletter", cwd=pulled)
    assert retype.returncode != 0 and "newsletter: $.type" in retype.message
    assert project_state(project) == before

    # Commits are per audience; --only promotes one, --to the rest.
    commits = run_knock(knock, served, "commit", "list", "--json")
    entries = json.loads(commits.stdout)["entries"]
    assert {entry["resource"]["identifier"] for entry in entries} == {"pro", "newsletter"}
    assert {entry["commit_message"] for entry in entries} == {"first"}
    pro_commit = next(e["id"] for e in entries if e["resource"]["identifier"] == "pro")
    only = run_knock(knock, served, "commit", "promote", "--only", pro_commit, "--force")
    assert only.returncode == 0, only.stderr
    assert "into `production` environment" in only.stdout
    production = run_knock(
        knock, served, "audience", "list", "--environment", "production", "--json"
    )
    assert [entry["key"] for entry in json.loads(production.stdout)["entries"]] == ["pro"]

    before = project_state(project)
    earlier = run_knock(knock, served, "commit", "promote", "--to", "development", "--force")
    assert earlier.returncode != 0 and "development is the first environment" in earlier.message
    missing = run_knock(knock, served, "commit", "promote", "--only", "c0ffee", "--force")
    assert missing.returncode != 0 and "commit 'c0ffee' does not exist" in missing.message
    assert project_state(project) == before

    everything = run_knock(knock, served, "commit", "promote", "--to", "production", "--force")
    assert everything.returncode == 0, everything.stderr
    production = run_knock(
        knock, served, "audience", "list", "--environment", "production", "--json"
    )
    assert [entry["key"] for entry in json.loads(production.stdout)["entries"]] == [
        "newsletter",
        "pro",
    ]
    assert (
        json.loads(
            (project / "data" / "production" / "audiences" / "pro" / "audience.json").read_text()
        )
        == written
    )

    archived = run_knock(
        knock, served, "audience", "archive", "pro", "--environment", "development", "--force"
    )
    assert archived.returncode == 0, archived.stderr
    production = run_knock(
        knock, served, "audience", "list", "--environment", "production", "--json"
    )
    assert [entry["key"] for entry in json.loads(production.stdout)["entries"]] == ["newsletter"]


def test_knock_cli_keeps_a_per_tenant_audiences_tenancy_through_push_and_pull(
    knock, served, tmp_path
):
    """`tenancy` is our field: Knock's CLI pushes it as written and writes it back on pull."""
    project, _url, _token = served
    admins = {
        "name": "Workspace admins",
        "type": "dynamic",
        "description": "Each workspace's admins",
        "tenancy": "per_tenant",
        "segments": [
            {
                "conditions": [
                    {"property": "membership.role", "operator": "equal_to", "argument": "admin"}
                ]
            }
        ],
    }
    local = tmp_path / "local"
    (local / "admins").mkdir(parents=True)
    (local / "admins" / "audience.json").write_text(json.dumps(admins, indent=2))
    pushed = run_knock(knock, served, "audience", "push", "admins", cwd=local)
    assert pushed.returncode == 0, pushed.stderr + pushed.stdout
    written = json.loads((project / "data" / "audiences" / "admins" / "audience.json").read_text())
    assert written == admins
    pulled = tmp_path / "pulled"
    pull = run_knock(
        knock, served, "audience", "pull", "--all", "--audiences-dir", str(pulled), "--force"
    )
    assert pull.returncode == 0, pull.stderr
    document = json.loads((pulled / "admins" / "audience.json").read_text())
    assert document["tenancy"] == "per_tenant"
    assert {k: v for k, v in document.items() if not k.startswith(("$", "__"))} == admins
    # Pushed back unchanged, it stays per tenant.
    again = run_knock(knock, served, "audience", "push", "admins", cwd=pulled)
    assert again.returncode == 0, again.stderr + again.stdout
    assert (
        json.loads((project / "data" / "audiences" / "admins" / "audience.json").read_text())
        == admins
    )
