"""A key works only in its own environment, whatever `AUDIENCES_ENV` or store URLs the server and
`audiences keys` ran with: real `audiences keys` and `audiences serve` processes."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import httpx
from api_server import free_port, serve_process
from condition_harness import ROOT


def audiences(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "audiences.cli", *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def clean_env(tmp_path, **variables: str) -> dict:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        "AUDIENCES_DUCKDB": str(tmp_path / "warehouse.duckdb"),
        "AUDIENCES_DEFINITIONS": str(tmp_path / "audiences"),
        **variables,
    }


def create_key(env: dict, *arguments: str) -> str:
    created = audiences("keys", "create", *arguments, env=env)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


@contextmanager
def serving(env: dict):
    with serve_process(env, ROOT) as (url, _process):
        yield url


def add(url: str, secret: str, user_id: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/audiences/vips/members?create_audience=true",
        json={"members": [{"user": {"id": user_id}}]},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )


def listed(url: str, secret: str) -> list[str] | int:
    answer = httpx.get(
        f"{url}/v1/audiences/vips/members",
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )
    return (
        [entry["user_id"] for entry in answer.json()["entries"]]
        if answer.status_code == 200
        else answer.status_code
    )


def test_each_key_works_in_its_own_environment_whatever_audiences_env_the_server_runs_with(
    tmp_path,
):
    keys_env = clean_env(tmp_path)  # `keys` run with the default AUDIENCES_ENV (development)
    development = create_key(keys_env, "--name", "dev")
    production = create_key(keys_env, "--environment", "production", "--name", "prod")
    assert development.startswith("sk_development_") and production.startswith("sk_production_")
    with serving(clean_env(tmp_path, AUDIENCES_ENV="production")) as url:
        assert add(url, production, "prod-user").status_code == 204
        assert add(url, development, "dev-user").status_code == 204
        assert listed(url, production) == ["prod-user"]
        assert listed(url, development) == ["dev-user"]
    # The same keys, the same stores, with a server run the other way round.
    with serving(clean_env(tmp_path, AUDIENCES_ENV="development")) as url:
        assert listed(url, production) == ["prod-user"]
        assert listed(url, development) == ["dev-user"]


def test_a_key_of_an_environment_the_server_does_not_serve_is_refused_without_naming_it(tmp_path):
    development = create_key(clean_env(tmp_path), "--name", "dev")
    production = create_key(clean_env(tmp_path), "--environment", "production", "--name", "prod")
    with serving(
        clean_env(tmp_path, AUDIENCES_ENV="production", AUDIENCES_API_ENVIRONMENTS="production")
    ) as url:
        assert add(url, production, "prod-user").status_code == 204
        answer = add(url, development, "intruder")
        assert answer.status_code == 401
        assert development not in answer.text and development[-20:] not in answer.text
        assert listed(url, development) == 401
        assert listed(url, production) == ["prod-user"]


def test_a_store_given_to_another_environment_is_refused_at_start(tmp_path):
    create_key(
        clean_env(tmp_path), "--name", "dev"
    )  # the development store now holds a development key
    development_store = f"sqlite:///{tmp_path / 'store.sqlite'}"
    # A server told that the development store is production's: it would serve development's
    # keys and members as production's.
    env = clean_env(tmp_path, AUDIENCES_ENV="production", AUDIENCES_STORE_URL=development_store)
    for workers, served, message in [
        ("1", "production", "belongs to the development environment, not production"),
        ("2", "production", "belongs to the development environment, not production"),
        (
            "1",
            "development,production",
            "the environments development and production have the same store",
        ),
    ]:
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "audiences.cli",
                "serve",
                "--port",
                str(free_port()),
                "--workers",
                workers,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            env={**env, "AUDIENCES_API_ENVIRONMENTS": served},
        )
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
        assert message in refused.stderr and "sqlite:///" in refused.stderr
    env["AUDIENCES_API_ENVIRONMENTS"] = "production"
    # `keys create` with the same settings is refused the same way, so no key lands there.
    created = audiences("keys", "create", "--name", "prod", env=env)
    assert created.returncode == 1 and "belongs to the development environment" in created.stderr
