"""Users in: read a source, validate its rows, upsert them into the DuckDB user store."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

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


IDENTIFY_SOURCE = "identify"


def identify_queue_waiting(store) -> tuple[int, int | None]:
    """How many identify calls wait in the store's queue for the `users` asset, and the newest
    one's id (None when none wait). Reads only the queue's index of waiting patches."""
    import sqlalchemy as sa

    from audiences.store import database as tables

    patches = tables.user_patches
    with store.read_engine.connect() as connection:
        waiting, newest = connection.execute(
            sa.select(sa.func.count(), sa.func.max(patches.c.patch_id)).where(
                patches.c.loaded == sa.false()
            )
        ).one()
    return waiting, newest


def load_identify_queue(
    connection: duckdb.DuckDBPyConnection, store, loaded_at: datetime
) -> LoadResult:
    """Load identify calls queued in the membership store (API, uploads) as a stream source."""
    import polars as pl
    import sqlalchemy as sa

    from audiences.store import database as tables
    from audiences.users.profiles import DELETION
    from audiences.users.sources import ROW_COLUMN

    patches = tables.user_patches
    rows = store.rows(
        sa.select(patches.c.patch_id, patches.c.user_id, patches.c.patch)
        .where(patches.c.loaded == sa.false())
        .order_by(patches.c.patch_id)
    )
    from audiences.users.store import ensure_schema

    ensure_schema(connection)
    source = UserSource(IDENTIFY_SOURCE, "jsonl", Path("membership-store"), mode="stream")
    totals: dict[str, int] = {}

    def load(batch: list[dict]) -> None:
        frame = (
            pl.DataFrame(
                {
                    "id": [row["user_id"] for row in batch],
                    "properties": [row["patch"] for row in batch],
                },
                schema={"id": pl.String, "properties": pl.String},
            )
            .with_row_index(ROW_COLUMN, offset=1)
            .with_columns(pl.col(ROW_COLUMN).cast(pl.Int64))
        )
        result = load_users(
            connection, source, validate_users(frame), loaded_at, only_changed_rows=False
        )
        for key, value in result.as_metadata().items():
            totals[key] = totals.get(key, 0) + value

    # Patches apply in the order received; a deletion (the patch `null`, from the API's delete user)
    # applies between the patches before and after it.
    batch: list[dict] = []
    for row in rows:
        if row["patch"] != DELETION:
            batch.append(row)
            continue
        if batch:
            load(batch)
            batch = []
        totals["users_deleted"] = (
            totals.get("users_deleted", 0)
            + connection.execute(
                "update raw.users set deleted_at = $at, updated_at = $at, properties = '{}' "
                "where user_id = $user_id and deleted_at is null",
                {"at": loaded_at, "user_id": row["user_id"]},
            ).fetchall()[0][0]
        )
    if batch or not rows:
        load(batch)
    # Loading is idempotent (the same patches merge to the same users), so marking them loaded
    # after the warehouse committed loses nothing if the process dies in between.
    loaded = [row["patch_id"] for row in rows]
    with store.engine.begin() as store_connection:
        for start in range(0, len(loaded), 500):
            store_connection.execute(
                patches.update()
                .where(patches.c.patch_id.in_(loaded[start : start + 500]))
                .values(loaded=True)
            )
    return LoadResult(
        source_name=IDENTIFY_SOURCE,
        **{
            key: totals.get(key, 0)
            for key in (
                "rows_read",
                "rows_quarantined",
                "users_inserted",
                "users_updated",
                "users_unchanged",
                "users_deleted",
            )
        },
    )
