"""Evaluation bookkeeping: the fixed "now" of a run, and the registry of known audience types."""

from __future__ import annotations

from datetime import datetime

import duckdb

from audiences.definitions import AudienceDefinition
from audiences.settings import parse_evaluation_time, utc_now
from audiences.users.store import ensure_schema


def evaluation_time_for(requested: datetime | str | None) -> datetime:
    """The run's evaluation time: the one asked for, else now (UTC). Fixed once per run."""
    if isinstance(requested, str):
        requested = parse_evaluation_time(requested)
    return requested or utc_now()


def registered_types(connection: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Audience key -> type, for every audience this warehouse has evaluated (types are immutable)."""
    known = connection.execute(
        "select count(*) from information_schema.tables where table_schema = 'raw' and table_name = 'audience_registry'"
    ).fetchall()[0][0]
    if not known:
        return {}
    return dict(connection.execute("select audience_key, audience_type from raw.audience_registry").fetchall())


def record_registry(connection: duckdb.DuckDBPyConnection, definitions: dict[str, AudienceDefinition]) -> None:
    """Remember each audience's type the first time it is seen."""
    ensure_schema(connection)
    known = registered_types(connection)
    for key, definition in sorted(definitions.items()):
        if key not in known:
            connection.execute(
                "insert into raw.audience_registry values ($key, $type, now())",
                {"key": key, "type": definition.type},
            )


def set_evaluation_clock(connection: duckdb.DuckDBPyConnection, evaluated_at: datetime) -> None:
    """Fix "now" for the next dbt build (read by the `evaluation_time()` macro)."""
    ensure_schema(connection)
    connection.execute("delete from raw.evaluation_clock")
    connection.execute("insert into raw.evaluation_clock values ($t)", {"t": evaluated_at})


def last_full_build(connection: duckdb.DuckDBPyConnection) -> str | None:
    """The dbt project fingerprint this warehouse was last fully built from."""
    ensure_schema(connection)
    rows = connection.execute("select fingerprint from raw.dbt_full_builds order by built_at desc limit 1").fetchall()
    return rows[0][0] if rows else None


def record_full_build(connection: duckdb.DuckDBPyConnection, fingerprint: str) -> None:
    ensure_schema(connection)
    connection.execute("insert into raw.dbt_full_builds values ($f, now())", {"f": fingerprint})
