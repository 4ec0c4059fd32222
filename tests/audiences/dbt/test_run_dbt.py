"""`run_dbt` (the dbt commands outside a Dagster run: `prepare`'s parse, the tools) runs dbt in
this process, fails with dbt's own message, and lets go of the warehouse after each command."""

import json
import os

import duckdb
import pytest
from condition_harness import copy_dbt_project

from audiences.dbt.project import run_dbt
from audiences.settings import Settings


def test_run_dbt_runs_here_fails_with_dbts_message_and_lets_go_of_the_warehouse(tmp_path):
    project = copy_dbt_project(tmp_path / "dbt_project")
    warehouse = tmp_path / "warehouse.duckdb"
    settings = Settings.from_env({}, duckdb_path=warehouse, dbt_project_dir=project)

    run_dbt(["parse", "--log-format-file", "json"], settings)
    log = [json.loads(line) for line in (project / "logs" / "dbt.log").read_text().splitlines()]
    assert "CommandCompleted" in {event["info"]["name"] for event in log}
    assert {event["info"]["pid"] for event in log} == {os.getpid()}  # no dbt subprocess

    with pytest.raises(RuntimeError) as failed:
        run_dbt(["show", "--inline", "select * from main.no_such_table"], settings)
    assert str(failed.value).startswith(
        "`dbt show --inline select * from main.no_such_table` failed"
    )
    assert "Table with name no_such_table does not exist" in str(failed.value)
    # dbt-duckdb kept its handle open in this process after a command; released, this process
    # opens the warehouse with settings of its own (DuckDB refuses a second, different handle).
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        assert connection.execute("select 1").fetchone() == (1,)
