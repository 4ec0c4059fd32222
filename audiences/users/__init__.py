"""Users in: read a source, validate its rows, upsert them into the DuckDB user store."""

from __future__ import annotations

from datetime import datetime

import duckdb

from audiences.users.sources import UserSource, read_source
from audiences.users.store import LoadResult, load_users
from audiences.users.validation import validate_users


def load_source(
    connection: duckdb.DuckDBPyConnection, source: UserSource, loaded_at: datetime
) -> LoadResult:
    """Read, validate and upsert one source; bad rows go to `raw.users_quarantine`. A snapshot holds
    each user once: an id on several rows keeps the last, and the earlier rows are quarantined."""
    frame = read_source(source)
    return load_users(
        connection,
        source,
        validate_users(frame, keep_last_duplicate=source.mode == "snapshot"),
        loaded_at,
    )


def configured_sources(settings) -> list[UserSource]:
    """The sources to load: the single `AUDIENCES_USERS_SOURCE` if set, else the sources file."""
    from audiences.users.sources import source_from_uri, sources_from_file

    if settings.users_source:
        return [source_from_uri(settings.users_source, mode=settings.source_mode)]
    return sources_from_file(settings.sources_file)
