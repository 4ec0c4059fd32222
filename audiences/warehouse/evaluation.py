"""Evaluation bookkeeping: the fixed "now" of a run, and the registry of known audience types.

Time only moves forward. Membership history records who entered and exited when, so an evaluation
at a time earlier than one already recorded would make members flip back (and trigger workflows
again) under a later time's name. A run at an earlier time is therefore refused, unless asked for
explicitly (`--allow-earlier`, or `allow_earlier` in a Dagster run's config): then it evaluates and
records the members and counts at that time, and records no membership events and queues no
workflow triggers.
"""

from __future__ import annotations

from datetime import datetime

import duckdb

from audiences.conditions.definitions import AudienceDefinition
from audiences.settings import format_time, parse_evaluation_time, utc_now
from audiences.warehouse.schema import ensure_user_tables


def evaluation_time_for(requested: datetime | str | None) -> datetime:
    """The run's evaluation time: the one asked for, else now (UTC). Fixed once per run."""
    if isinstance(requested, str):
        requested = parse_evaluation_time(requested)
    return requested or utc_now()


class EarlierEvaluationError(ValueError):
    """An evaluation time earlier than the last one this warehouse recorded, not explicitly allowed."""


def last_recorded_evaluation(connection: duckdb.DuckDBPyConnection) -> datetime | None:
    """The latest evaluation time this warehouse recorded: of an evaluation (`audience_evaluations`)
    or of a membership change (`raw.membership_intervals`); None before the first evaluation."""
    times = []
    for table, columns in (
        ("main.audience_evaluations", ("evaluated_at",)),
        ("raw.membership_intervals", ("entered_at", "exited_at")),
    ):
        if _table_exists(connection, table):
            times += connection.execute(
                f"select {', '.join(f'max({c})' for c in columns)} from {table}"
            ).fetchall()[0]
    return max((time for time in times if time is not None), default=None)


def check_evaluation_time(
    connection: duckdb.DuckDBPyConnection, evaluated_at: datetime, allow_earlier: bool
) -> bool:
    """Refuse an evaluation time earlier than the last recorded one unless `allow_earlier`.

    Returns True for an allowed earlier evaluation, whose members are recorded without events or
    workflow triggers; False for an evaluation at or after the last recorded time.
    """
    last = last_recorded_evaluation(connection)
    if last is None or evaluated_at >= last:
        return False
    if not allow_earlier:
        raise EarlierEvaluationError(
            f"evaluation time {format_time(evaluated_at)} is earlier than the last recorded evaluation "
            f"{format_time(last)}; --allow-earlier (run config allow_earlier: true) evaluates it without "
            f"recording membership events or triggering workflows"
        )
    return True


def members_evaluated_at(connection: duckdb.DuckDBPyConnection) -> datetime | None:
    """The evaluation time of the memberships in `audience_members`: its last build's, recorded in its
    state table (a failed build leaves the table and the state as they were)."""
    for table in ("main.audience_members__state", "main.audience_evaluations"):
        if _table_exists(connection, table):
            time = connection.execute(f"select max(evaluated_at) from {table}").fetchall()[0][0]
            if time is not None:
                return time
    return None


def is_earlier_evaluation(connection: duckdb.DuckDBPyConnection) -> bool:
    """Whether `audience_members` holds an evaluation earlier than the last recorded one (a run with
    `allow_earlier`): its differences from the history are not membership events."""
    evaluated_at = members_evaluated_at(connection)
    last = last_recorded_evaluation(connection)
    return evaluated_at is not None and last is not None and evaluated_at < last


def _table_exists(connection: duckdb.DuckDBPyConnection, qualified: str) -> bool:
    schema, name = qualified.split(".")
    return bool(
        connection.execute(
            "select count(*) from information_schema.tables where table_schema = $schema and table_name = $name",
            {"schema": schema, "name": name},
        ).fetchall()[0][0]
    )


def registered_types(connection: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Audience key -> type, for every audience this warehouse has evaluated (types are immutable)."""
    known = connection.execute(
        "select count(*) from information_schema.tables where table_schema = 'raw' and table_name = 'audience_registry'"
    ).fetchall()[0][0]
    if not known:
        return {}
    return dict(
        connection.execute(
            "select audience_key, audience_type from raw.audience_registry"
        ).fetchall()
    )


def record_registry(
    connection: duckdb.DuckDBPyConnection, definitions: dict[str, AudienceDefinition]
) -> None:
    """Remember each audience's type the first time it is seen."""
    ensure_user_tables(connection)
    known = registered_types(connection)
    for key, definition in sorted(definitions.items()):
        if key not in known:
            connection.execute(
                "insert into raw.audience_registry values ($key, $type, now())",
                {"key": key, "type": definition.type},
            )


def set_evaluation_clock(connection: duckdb.DuckDBPyConnection, evaluated_at: datetime) -> None:
    """Fix "now" for the next dbt build (read by the `evaluation_time()` macro)."""
    ensure_user_tables(connection)
    connection.execute("delete from raw.evaluation_clock")
    connection.execute("insert into raw.evaluation_clock values ($t)", {"t": evaluated_at})


def last_full_build(connection: duckdb.DuckDBPyConnection) -> str | None:
    """The dbt project fingerprint this warehouse was last fully built from."""
    ensure_user_tables(connection)
    rows = connection.execute(
        "select fingerprint from raw.dbt_full_builds order by built_at desc limit 1"
    ).fetchall()
    return rows[0][0] if rows else None


def record_full_build(connection: duckdb.DuckDBPyConnection, fingerprint: str) -> None:
    ensure_user_tables(connection)
    connection.execute("insert into raw.dbt_full_builds values ($f, now())", {"f": fingerprint})
