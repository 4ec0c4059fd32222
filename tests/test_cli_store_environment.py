"""A store belongs to one environment: every command that opens it through the CLI (delivery,
reads, runs) refuses it under another environment, as `keys` and `serve` do (docs/api.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

AUDIENCES = Path(sys.executable).parent / "audiences"


def audiences(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}
    environment.pop("DAGSTER_HOME", None)
    return subprocess.run(
        [str(AUDIENCES), *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_store_of_development_is_refused_by_production_commands(tmp_path):
    store = f"sqlite:///{tmp_path / 'store.sqlite'}"
    created = audiences(tmp_path, "--store", store, "keys", "create", "--name", "backend")
    assert created.returncode == 0, created.stderr
    # The development store's own environment works with it.
    own = audiences(tmp_path, "--store", store, "deliver")
    assert own.returncode == 0, own.stderr
    for command in (["deliver"], ["deliveries"], ["run"]):
        result = audiences(tmp_path, "--environment", "production", "--store", store, *command)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f"error: the store {store} belongs to the development environment, not production; "
            "check AUDIENCES_ENV, AUDIENCES_STORE_URL and AUDIENCES_STORE_URL_PRODUCTION"
        ], command


def test_a_dagster_run_refuses_a_store_of_another_environment(tmp_path, monkeypatch):
    """The runs `dg dev` launches open the store through the run's resource: it refuses a store
    recorded as another environment's before any step writes to it."""
    import dagster as dg

    from pipelines import build_definitions

    store = f"sqlite:///{tmp_path / 'store.sqlite'}"
    created = audiences(tmp_path, "--environment", "production", "--store", store, "keys", "create")
    assert created.returncode == 0, created.stderr
    monkeypatch.setenv("AUDIENCES_STORE_URL", store)
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(tmp_path / "warehouse.duckdb"))
    job = build_definitions().resolve_job_def("deliver_workflow_triggers")
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    assert not result.get_asset_materialization_events()  # no step ran
    assert f"the store {store} belongs to the production environment, not development" in str(
        result.all_events
    )
