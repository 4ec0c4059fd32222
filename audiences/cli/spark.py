"""`audiences spark-run`: evaluate the audiences on Apache Spark (dbt-spark) and publish their events."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from audiences.settings import Settings


def spark_run(settings: Settings, arguments) -> int:
    """Evaluate every Spark audience (dbt_spark/, written by `audiences generate --target spark`)
    at the evaluation time (--evaluation-time, else now) and publish the membership events to
    raw.membership_events, all or nothing. --users-parquet first replaces raw.users with those
    users (local runs). Target `spark` runs Spark inside dbt's process (a Java runtime is needed);
    `cluster` a Spark Thrift server at --spark-host. Both are checked before anything is written."""
    from audiences.dbt.spark import SparkRun, spark_project_dir

    warehouse = (
        Path(arguments.spark_warehouse)
        if arguments.spark_warehouse
        else settings.duckdb_path.parent / "spark-warehouse"
    )
    run = SparkRun(
        spark_project_dir(settings.dbt_project_dir),
        warehouse.resolve(),
        target=arguments.spark_target,
        host=arguments.spark_host,
        port=arguments.spark_port,
    )
    moment = settings.evaluation_time or datetime.now(UTC)
    users = Path(arguments.users_parquet) if arguments.users_parquet else None
    if users is not None and not users.exists():
        raise FileNotFoundError(f"--users-parquet {users}: no such file or folder")
    output = run.run(moment, users)
    published = [
        line.strip() for line in output.splitlines() if "membership events published" in line
    ]
    print(
        f"evaluated on Spark at {moment.isoformat()}; {published[-1] if published else 'no events published'}"
    )
    return 0


def register(command) -> None:
    """Add this group's commands to the parser (`command` makes one subcommand)."""
    sub = command("spark-run", spark_run, "evaluate the audiences on Spark (dbt-spark)")
    sub.add_argument(
        "--users-parquet", help="load raw.users from this parquet file or folder first"
    )
    sub.add_argument(
        "--spark-warehouse",
        help="the Spark warehouse folder: tables and metastore (default: spark-warehouse beside the DuckDB file)",
    )
    sub.add_argument(
        "--spark-target",
        choices=("spark", "cluster"),
        default="spark",
        help="spark: Spark in dbt's process (default); cluster: a Thrift server at --spark-host",
    )
    sub.add_argument("--spark-host", help="the Thrift server's host (--spark-target cluster)")
    sub.add_argument("--spark-port", type=int, default=10000, help="its port (default 10000)")
