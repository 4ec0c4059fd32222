"""`audiences spark-run`: evaluate the audiences on Apache Spark (dbt-spark) and publish their events."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from audiences.settings import SPARK_PORT, SPARK_TARGETS, Settings


def spark_run(settings: Settings, arguments) -> int:
    """Evaluate every Spark audience (dbt_spark/, written by `audiences generate --target spark`)
    at the evaluation time (--evaluation-time, else now) and publish the membership events to
    raw.membership_events, all or nothing. --users-parquet first replaces raw.users with those
    users (local runs). Target `spark` runs Spark inside dbt's process (a Java runtime is needed);
    `cluster` a Spark Thrift server at --spark-host. Both are checked before anything is written.
    Then (target `spark`, unless --no-publish) the committed builds' events are recorded in the
    DuckDB warehouse's outbox, the circuit breaker applied, and published to the store with their
    workflow triggers, as after a DuckDB evaluation (`audiences deliver` sends them). The Dagster
    job `spark_audiences_job` (AUDIENCES_ENGINE=spark) runs the same steps."""
    from audiences.dbt.spark import spark_run_for

    run = spark_run_for(
        settings,
        Path(arguments.spark_warehouse) if arguments.spark_warehouse else None,
        target=arguments.spark_target,
        host=arguments.spark_host,
        port=arguments.spark_port,
    )
    moment = settings.evaluation_time or datetime.now(UTC)
    users = Path(arguments.users_parquet) if arguments.users_parquet else None
    if users is not None and not users.exists():
        raise FileNotFoundError(f"--users-parquet {users}: no such file or folder")
    build = run.build(moment, users)
    print(build.summary())
    if build.committed_run and not arguments.no_publish:
        if run.target != "spark":
            print(
                "the events stay in the cluster's raw.membership_events: recording them in the "
                "store reads the warehouse's files, which only the local target has here"
            )
        else:
            _publish(settings, run.warehouse_dir, build.committed_run, moment)
    return 0


def _publish(settings: Settings, warehouse: Path, committed_run: str, moment: datetime) -> None:
    """The committed Spark builds' events into the DuckDB warehouse's outbox (the circuit breaker
    applies), then into the store with their workflow triggers, as after a DuckDB evaluation."""
    from audiences.cli.common import open_store, write_warehouse
    from audiences.delivery.setup import load_workflow_setup
    from audiences.membership.changes import CircuitBreaker
    from audiences.workflows.spark_events import publish_spark_builds

    breaker = CircuitBreaker(settings.breaker_share, settings.breaker_minimum)
    with write_warehouse(settings, "audiences spark-run") as connection:
        summaries, report = publish_spark_builds(
            connection,
            open_store(settings),
            load_workflow_setup(settings),
            warehouse,
            committed_run,
            breaker,
            moment,
        )
    for summary in summaries:
        print(
            f"recorded the Spark build at {summary.evaluated_at.isoformat()}: "
            f"{summary.entered} entered, {summary.exited} exited"
        )
        for held in summary.held:
            print(
                f"{held.audience_key}: {held.entered} entered and {held.exited} exited of "
                f"{held.size_before}: events held as batch {held.held_batch}; "
                f"`audiences release {held.held_batch}` or `audiences discard {held.held_batch}`"
            )
    print(
        f"published {report.events} events to the store, {report.deliveries} workflow "
        f"deliveries queued ({report.held_deliveries} held)"
    )


def register(command) -> None:
    """Add this group's commands to the parser (`command` makes one subcommand)."""
    sub = command("spark-run", spark_run, "evaluate the audiences on Spark (dbt-spark)")
    sub.add_argument(
        "--users-parquet", help="load raw.users from this parquet file or folder first"
    )
    sub.add_argument(
        "--spark-warehouse",
        help="the Spark warehouse folder: tables and metastore (default: AUDIENCES_SPARK_WAREHOUSE, "
        "else spark-warehouse beside the DuckDB file)",
    )
    sub.add_argument(
        "--spark-target",
        choices=SPARK_TARGETS,
        help="spark: Spark in dbt's process (default: AUDIENCES_SPARK_TARGET, else spark); "
        "cluster: a Thrift server at --spark-host",
    )
    sub.add_argument(
        "--spark-host",
        help="the Thrift server's host (--spark-target cluster; default AUDIENCES_SPARK_HOST)",
    )
    sub.add_argument(
        "--spark-port",
        type=int,
        help=f"its port (default AUDIENCES_SPARK_PORT, else {SPARK_PORT})",
    )
    sub.add_argument(
        "--no-publish",
        action="store_true",
        help="leave the events in Spark: do not record them in the DuckDB warehouse's outbox "
        "nor publish them to the store (workflows are not triggered)",
    )
