"""`generate --target spark`, `validate --target spark`, the Spark target's one-line errors, and
the compile checks of the generated Spark SQL for Databricks and Trino (no server runs here).

Fast: no Spark starts. The Spark run itself is tested in test_spark_models.py.
"""

from __future__ import annotations

import shutil

import pytest
import sqlglot
from condition_harness import ROOT
from sqlglot import ErrorLevel, exp

from audiences import cli
from audiences.dbt.spark import SPARK_PROJECT_FOLDER

GENERATED = ROOT / SPARK_PROJECT_FOLDER / "models" / "generated"
# Functions of the Spark models that Trino lacks: Spark 4's VARIANT reading, and two conversions.
# The Trino port renders these differently in the compiler (docs/scale-out.md); a new one here
# means the port grew.
NOT_IN_TRINO = {"schema_of_variant", "try_variant_get", "timestamp_seconds", "conv"}


@pytest.fixture
def projects(tmp_path):
    """A DuckDB and a Spark dbt project side by side in a temporary folder."""
    shutil.copytree(
        ROOT / "dbt_project",
        tmp_path / "dbt_project",
        ignore=shutil.ignore_patterns("target", "logs"),
    )
    shutil.copytree(
        ROOT / SPARK_PROJECT_FOLDER,
        tmp_path / SPARK_PROJECT_FOLDER,
        ignore=shutil.ignore_patterns("target", "logs"),
    )
    shutil.copytree(ROOT / "data" / "audiences", tmp_path / "audiences")
    return tmp_path


def _cli(projects, *arguments: str) -> int:
    return cli.main(
        [
            "--dbt-project",
            str(projects / "dbt_project"),
            "--definitions",
            str(projects / "audiences"),
            *arguments,
        ]
    )


def test_generate_for_spark_writes_the_committed_models_and_checks_drift(projects, capsys):
    generated = projects / SPARK_PROJECT_FOLDER / "models" / "generated"
    shutil.rmtree(generated)
    assert _cli(projects, "generate", "--target", "spark") == 0
    written = {path.name: path.read_text() for path in generated.glob("*.sql")}
    committed = {path.name: path.read_text() for path in GENERATED.glob("*.sql")}
    assert written == committed, "the committed Spark models are the ones the definitions generate"
    # Event audiences are left out, and said so.
    assert "frequent_buyers.sql" not in written
    assert "not on Spark: frequent-buyers: event conditions" in capsys.readouterr().err
    assert _cli(projects, "generate", "--target", "spark", "--check") == 0

    definition = projects / "audiences" / "power-users" / "audience.json"
    definition.write_text(definition.read_text().replace('"2000"', '"3000"'))
    assert _cli(projects, "generate", "--target", "spark", "--check") == 1
    assert "out of date" in capsys.readouterr().out


def test_validate_for_spark_names_each_audience_and_condition_spark_cannot_run(projects, capsys):
    assert _cli(projects, "validate") == 0
    capsys.readouterr()
    assert _cli(projects, "validate", "--target", "spark") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "frequent-buyers" in line)
    assert "audience.json: $.segments[0].conditions[" in line
    assert "cannot run on the Spark target: event conditions" in line
    tenancy = next(line for line in err.splitlines() if "workspace-admins-trial-ending" in line)
    assert (
        "audience.json: $.tenancy: cannot run on the Spark target: a per-tenant audience" in tenancy
    )
    assert sum("cannot run on the Spark target" in line for line in err.splitlines()) == 4


def test_spark_run_without_java_or_a_reachable_cluster_is_one_line_and_writes_nothing(
    projects, tmp_path, monkeypatch, capsys
):
    warehouse = tmp_path / "spark-warehouse"
    empty = tmp_path / "no-java"
    empty.mkdir()
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    assert _cli(projects, "spark-run", "--spark-warehouse", str(warehouse)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no Java runtime: Spark needs one")

    monkeypatch.setenv("JAVA_HOME", str(empty))
    assert _cli(projects, "spark-run", "--spark-warehouse", str(warehouse)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"JAVA_HOME={empty} has no bin/java" in err

    with __import__("socket").socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    arguments = [
        "--spark-target",
        "cluster",
        "--spark-host",
        "127.0.0.1",
        "--spark-port",
        str(port),
    ]
    assert _cli(projects, "spark-run", "--spark-warehouse", str(warehouse), *arguments) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        f"the Spark target at 127.0.0.1:{port} (--spark-host, --spark-port or AUDIENCES_SPARK_HOST, _PORT) is not reachable"
        in err
    )
    assert not warehouse.exists(), "nothing is written before the target is known to work"

    # The same target from the settings (AUDIENCES_SPARK_*, what the Dagster Spark job reads);
    # the warehouse too. A target that is not one is named.
    monkeypatch.setenv("AUDIENCES_SPARK_TARGET", "cluster")
    monkeypatch.setenv("AUDIENCES_SPARK_HOST", "127.0.0.1")
    monkeypatch.setenv("AUDIENCES_SPARK_PORT", str(port))
    monkeypatch.setenv("AUDIENCES_SPARK_WAREHOUSE", str(warehouse))
    assert _cli(projects, "spark-run") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the Spark target at 127.0.0.1:{port} (" in err
    monkeypatch.setenv("AUDIENCES_SPARK_TARGET", "yarn")
    assert _cli(projects, "spark-run") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "AUDIENCES_SPARK_TARGET='yarn' is not one of spark, cluster" in err
    assert not warehouse.exists()


def _plain_sql(text: str, full: bool, compacting: bool = False) -> str:
    """A generated model as the SQL dbt runs, in a full, an incremental or a compacting build
    (the project's macros stood in for by what they return)."""
    import jinja2

    plan = {
        "full": full,
        "writes_base": full or compacting,
        "compacting": compacting,
        "reason": "",
        "build_sequence": 2,
        "after_run": "run-1",
        "previous_now": "2026-10-31 00:00:00.000000",
        "users_after": "2026-10-31 00:00:00.000000",
        "users_through": "2026-11-01 00:00:00.000000",
    }
    return (
        jinja2.Environment()
        .from_string(text)
        .render(
            config=lambda **options: "",
            ref=lambda name: name,
            source=lambda schema, table: f"{schema}.{table}",
            this="audiences.the_model_itself",
            evaluation_time=lambda: "timestamp'2026-11-01 00:00:00'",
            plan_build=lambda models_hash: plan,
            build_plan=lambda: plan,
            changed_users_filter=lambda plan: (
                "updated_at > timestamp'2026-10-31 00:00:00' "
                "and updated_at <= timestamp'2026-11-01 00:00:00'"
            ),
            timestamp_literal=lambda text: "null" if text is None else f"timestamp'{text}'",
            run_id_literal=lambda run: f"'{run}'",
            committed_state=lambda name: f"audiences.{name}",
        )
    )


def test_generated_spark_models_compile_for_databricks_and_trino():
    files = sorted(GENERATED.glob("*.sql"))
    assert len(files) > 10
    missing_in_trino: set[str] = set()
    modes = ((True, False), (False, False), (False, True))  # full, incremental, compacting
    for path, (full, compacting) in ((path, mode) for path in files for mode in modes):
        sql = _plain_sql(path.read_text(), full, compacting)
        # Databricks SQL is Spark SQL with VARIANT (DBR 15.3+): the same models, parsed strictly.
        for dialect in ("spark", "databricks"):
            sqlglot.parse_one(sql, read=dialect, error_level=ErrorLevel.RAISE)
        spark_tree = sqlglot.parse_one(sql, read="spark")
        # Join hints (`BROADCAST`) are Spark's plan advice, not semantics: Trino chooses its
        # joins' distribution itself, so its rendering drops them.
        for hint in list(spark_tree.find_all(exp.Hint)):
            hint.pop()
        trino = spark_tree.sql(dialect="trino", unsupported_level=ErrorLevel.RAISE)
        tree = sqlglot.parse_one(trino, read="trino", error_level=ErrorLevel.RAISE)
        missing_in_trino |= {node.name.lower() for node in tree.find_all(exp.Anonymous)} - {
            "arrays_overlap"
        }  # Trino has it
    assert missing_in_trino == NOT_IN_TRINO


def test_spark_run_hands_dbt_its_time_and_users_in_the_environment_not_as_vars(
    tmp_path, monkeypatch
):
    """dbt re-parses the whole Spark project (seconds, each run) when its `--vars` change: the
    engine's `dbt run` is the same command at every time, its evaluation time and users' parquet
    in the environment (read only while executing: macros/evaluation_time.sql). The e2e test
    checks dbt's own log (test_spark_models.py)."""
    from datetime import UTC, datetime

    from audiences.dbt.spark import EVALUATION_TIME_VARIABLE, USERS_PARQUET_VARIABLE, SparkRun

    run = SparkRun(tmp_path / SPARK_PROJECT_FOLDER, tmp_path / "spark")
    first = datetime(2026, 11, 1, tzinfo=UTC)
    later = datetime(2026, 11, 8, 12, 30, tzinfo=UTC)
    assert "--vars" not in run.command()
    environment = run.environment(later, tmp_path / "users.parquet")
    assert environment[EVALUATION_TIME_VARIABLE] == "2026-11-08T12:30:00.000000Z"
    assert environment[USERS_PARQUET_VARIABLE] == str(tmp_path / "users.parquet")
    assert run.environment(first)[EVALUATION_TIME_VARIABLE] == "2026-11-01T00:00:00.000000Z"
    # A run without users' parquet loads none, whatever the engine's own environment holds.
    monkeypatch.setenv(USERS_PARQUET_VARIABLE, str(tmp_path / "stale.parquet"))
    assert USERS_PARQUET_VARIABLE not in run.environment(first)
