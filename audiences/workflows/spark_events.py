"""Spark's membership events into the outbox, the store and the workflows, by DuckDB's path.

A Spark build (`audiences spark-run`, dbt_spark/) diffs the members against its history in Spark
SQL and commits by attaching one partition of `raw.membership_events`: its entered and exited
events, one `evaluated` row per audience, and its completion marker (a `committed` row naming the
committed build before it, `after_run`). Here the committed builds not yet recorded, oldest first,
are recorded in the DuckDB warehouse by `record_computed_changes`, the same steps as DuckDB's own
diff (the circuit breaker, the outbox, the intervals), and the outbox is then drained into the
store by `publish_outbox` as after a DuckDB evaluation: workflows trigger the same way.

The partitions are read as the parquet files Spark wrote (`<warehouse>/membership_events_published/
run_id=<run>/`), starting from a build the caller saw commit and following the markers back: an
attached partition is known from its marker, never from a folder merely being there (a build
killed before it attached its folder leaves one).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from audiences.dbt.spark import EVENTS_FOLDER, committed_chain
from audiences.membership.changes import ChangeSummary, CircuitBreaker, record_computed_changes
from audiences.warehouse.schema import ensure_membership_tables
from audiences.workflows.publish import PublishReport, publish_outbox


def _partition(warehouse_dir: Path, run_id: str) -> str:
    folder = Path(warehouse_dir) / EVENTS_FOLDER / f"run_id={run_id}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no published Spark build {run_id} there")
    return str(folder / "*.parquet")


def unrecorded_builds(
    connection: duckdb.DuckDBPyConnection, warehouse_dir: Path, committed_run: str
) -> list[tuple[str, object]]:
    """(run id, evaluation time) of the committed Spark builds up to `committed_run` that are not
    recorded here yet, oldest first, following each marker's `after_run` (`committed_chain`)."""
    ensure_membership_tables(connection)
    chain = []
    for _, run, moment in committed_chain(warehouse_dir, committed_run):
        if connection.execute(
            "select count(*) from raw.recorded_runs where run_id = $run", {"run": run}
        ).fetchall()[0][0]:
            break
        chain.append((run, moment))
    return list(reversed(chain))


def record_spark_builds(
    connection: duckdb.DuckDBPyConnection,
    warehouse_dir: Path,
    committed_run: str,
    breaker: CircuitBreaker,
) -> list[ChangeSummary]:
    """Record the events of every committed Spark build up to `committed_run` not recorded yet
    (see the module docstring), one transaction each. Returns their summaries, oldest first."""
    summaries = []
    for run, evaluated_at in unrecorded_builds(connection, warehouse_dir, committed_run):
        files = _partition(warehouse_dir, run)
        connection.execute(
            "create or replace temp table spark_events as select event_id, audience_key, "
            "user_key, user_id, tenant, event_type, entry_number from read_parquet($files) "
            "where event_type in ('entered', 'exited')",
            {"files": files},
        )
        connection.execute(
            "create or replace temp table spark_catalog as select audience_key, audience_version "
            "from read_parquet($files) where event_type = 'evaluated'",
            {"files": files},
        )
        try:
            summary = record_computed_changes(
                connection, evaluated_at, breaker, "spark_events", "spark_catalog", run
            )
        finally:
            connection.execute("drop table if exists spark_events")
            connection.execute("drop table if exists spark_catalog")
        if summary is not None:
            summaries.append(summary)
    return summaries


def publish_spark_builds(
    connection: duckdb.DuckDBPyConnection,
    store,
    setup,
    warehouse_dir: Path,
    committed_run: str,
    breaker: CircuitBreaker,
    now,
) -> tuple[list[ChangeSummary], PublishReport]:
    """`record_spark_builds`, then the outbox drained into the store with the workflow triggers
    of `setup` (`delivery.setup.WorkflowSetup`), as the pipeline's publish step does after a
    DuckDB evaluation: `audiences deliver` then sends them."""
    summaries = record_spark_builds(connection, warehouse_dir, committed_run, breaker)
    report = publish_outbox(connection, store, setup.triggers, setup.default_sink, now)
    return summaries, report
