"""Users in: read a source, validate its rows, upsert them into the DuckDB user store."""

from __future__ import annotations

from datetime import datetime

import duckdb

from audiences.users.sources import MEMBERSHIP_ID_COLUMNS, UserSource, read_source
from audiences.users.store import LoadResult, load_users
from audiences.users.validation import validate_users


def load_source(
    connection: duckdb.DuckDBPyConnection, source: UserSource, loaded_at: datetime
) -> LoadResult:
    """Read, validate and upsert one source; bad rows go to `raw.users_quarantine`. A snapshot holds
    each user once: an id on several rows keeps the last, and the earlier rows are quarantined.
    A tenants or tenant memberships source (`source.kind`) loads the same way into its own tables
    (`raw.tenants`, `raw.tenant_memberships` and their quarantines)."""
    frame = read_source(source)
    id_columns = MEMBERSHIP_ID_COLUMNS if source.kind == "tenant_memberships" else ("id",)
    return load_users(
        connection,
        source,
        validate_users(frame, keep_last_duplicate=source.mode == "snapshot", id_columns=id_columns),
        loaded_at,
    )


def configured_sources(settings) -> list[UserSource]:
    """The sources to load: the single `AUDIENCES_USERS_SOURCE` if set, else the sources file."""
    from audiences.users.sources import source_from_uri, sources_from_file

    if settings.users_source:
        return [source_from_uri(settings.users_source, mode=settings.source_mode)]
    return sources_from_file(settings.sources_file)


def configured_tenant_sources(settings) -> list[UserSource]:
    """The tenants sources, then the tenant memberships sources, of the sources file (none when
    a single `AUDIENCES_USERS_SOURCE` is set, or the file declares none)."""
    from audiences.users.sources import sources_from_file

    if settings.users_source or not settings.sources_file.exists():
        return []
    return sources_from_file(settings.sources_file, "tenants") + sources_from_file(
        settings.sources_file, "tenant_memberships"
    )


def missing_memberships(connection: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Memberships kept though they name a user or a tenant that is not loaded (or deleted): they
    are not evaluated until both exist. Counts, for the `users` asset's report."""
    users, tenants = connection.execute(
        """
        select
            count(*) filter (where users.user_id is null),
            count(*) filter (where tenants.tenant_id is null)
        from raw.tenant_memberships as memberships
        left join raw.users as users
            on users.user_id = memberships.user_id and users.deleted_at is null
        left join raw.tenants as tenants
            on tenants.tenant_id = memberships.tenant_id and tenants.deleted_at is null
        where memberships.deleted_at is null
        """
    ).fetchall()[0]
    return {"memberships_missing_user": users, "memberships_missing_tenant": tenants}


def missing_membership_rows(connection: duckdb.DuckDBPyConnection, limit: int = 5) -> list[tuple]:
    """The first `limit` memberships `missing_memberships` counts, by user and tenant id:
    `(user_id, tenant_id, what is missing)`, for the `users` asset's report to name them."""
    return connection.execute(
        """
        select
            memberships.user_id,
            memberships.tenant_id,
            case
                when users.user_id is null and tenants.tenant_id is null then 'user and tenant'
                when users.user_id is null then 'user'
                else 'tenant'
            end
        from raw.tenant_memberships as memberships
        left join raw.users as users
            on users.user_id = memberships.user_id and users.deleted_at is null
        left join raw.tenants as tenants
            on tenants.tenant_id = memberships.tenant_id and tenants.deleted_at is null
        where memberships.deleted_at is null
            and (users.user_id is null or tenants.tenant_id is null)
        order by memberships.user_id, memberships.tenant_id
        limit $limit
        """,
        {"limit": limit},
    ).fetchall()


def missing_memberships_report(connection: duckdb.DuckDBPyConnection) -> str | None:
    """One line naming the memberships kept but not evaluated (a user or tenant not loaded), with
    the first few by id; None when there are none."""
    missing = missing_memberships(connection)
    if not any(missing.values()):
        return None
    shown = 5
    rows = missing_membership_rows(connection, shown + 1)
    named = ", ".join(
        f"{user_id!r} in {tenant_id!r} (no such {what})"
        for user_id, tenant_id, what in rows[:shown]
    )
    more = ", ..." if len(rows) > shown else ""
    return (
        f"tenant memberships kept but not evaluated: {missing['memberships_missing_user']} name a "
        f"user and {missing['memberships_missing_tenant']} a tenant that is not loaded: {named}{more}"
    )
