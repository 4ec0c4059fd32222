"""The warehouse's own tables: every `raw.*` table the engine creates in DuckDB, declared here.

Two groups, each created where it is first written (statements are idempotent):
- `USER_TABLES`: what loading writes and dbt reads: `raw.users` and its quarantine, the sources'
  row hashes, the static memberships' copy, the evaluation clock, full builds, the audience
  registry (`ensure_user_tables`, from users loading, evaluation and the static copy);
- `EVENT_TABLES`: tracked events (`raw.events`, append-only by message id), their users' numbers
  (`raw.event_users`), their quarantine and each event source's load log (`ensure_event_tables`,
  also from `ensure_user_tables`);
- `MEMBERSHIP_TABLES`: what the membership diff writes: validity intervals, the outbox and its
  sequence, held batches, first evaluations, the published watermark (`ensure_membership_tables`,
  from `membership.changes` and `workflows.publish`).

`AUDIENCE_MEMBERS_STAND_IN` is the shape of dbt's `audience_members` that conditions read, for a
warehouse without dbt (guide eligibility's one-user DuckDB).

This module imports nothing from the engine, so every stage may import it.
"""

from __future__ import annotations

import duckdb

USER_TABLES = (
    "create schema if not exists raw",
    """
    create table if not exists raw.users (
        user_key integer not null,
        user_id varchar not null,
        properties json not null,
        source_name varchar,
        first_loaded_at timestamptz not null,
        updated_at timestamptz not null,
        deleted_at timestamptz
    )
    """,
    """
    create table if not exists raw.users_quarantine (
        source_name varchar not null,
        location varchar not null,
        row_number bigint not null,
        user_id varchar,
        reason varchar not null,
        raw_row json,
        quarantined_at timestamptz not null
    )
    """,
    """
    create table if not exists raw.static_audience_members (
        audience_key varchar not null,
        user_id varchar not null,
        tenant varchar,
        added_at timestamptz not null
    )
    """,
    # Per source, each user's rows as its last load read them (a hash of their patches): a row that
    # did not change since changes nothing, so identifies written after it stay (last change wins).
    """
    create table if not exists raw.source_rows (
        source_name varchar not null,
        user_id varchar not null,
        row_hash uhugeint not null,
        loaded_at timestamptz not null
    )
    """,
    # Knock's tenants and which users belong to which tenants (sources.yml `tenants:` and
    # `tenant_memberships:`, and the API's `PUT /v1/tenants/{id}` through the store's queue), in
    # the users' shape and by the users' rules (audiences/users/store.py `Entity`). A membership's
    # id is `{"user_id": ..., "tenant_id": ...}`; one naming a user or tenant not loaded is kept.
    """
    create table if not exists raw.tenants (
        tenant_key integer not null,
        tenant_id varchar not null,
        properties json not null,
        source_name varchar,
        first_loaded_at timestamptz not null,
        updated_at timestamptz not null,
        deleted_at timestamptz
    )
    """,
    """
    create table if not exists raw.tenant_memberships (
        membership_key integer not null,
        membership_id varchar not null,
        properties json not null,
        source_name varchar,
        first_loaded_at timestamptz not null,
        updated_at timestamptz not null,
        deleted_at timestamptz,
        user_id varchar not null,
        tenant_id varchar not null
    )
    """,
    """
    create table if not exists raw.tenants_quarantine (
        source_name varchar not null,
        location varchar not null,
        row_number bigint not null,
        tenant_id varchar,
        reason varchar not null,
        raw_row json,
        quarantined_at timestamptz not null
    )
    """,
    """
    create table if not exists raw.tenant_memberships_quarantine (
        source_name varchar not null,
        location varchar not null,
        row_number bigint not null,
        user_id varchar,
        tenant_id varchar,
        reason varchar not null,
        raw_row json,
        quarantined_at timestamptz not null
    )
    """,
    """
    create table if not exists raw.tenant_source_rows (
        source_name varchar not null,
        tenant_id varchar not null,
        row_hash uhugeint not null,
        loaded_at timestamptz not null
    )
    """,
    """
    create table if not exists raw.membership_source_rows (
        source_name varchar not null,
        membership_id varchar not null,
        row_hash uhugeint not null,
        loaded_at timestamptz not null
    )
    """,
    "create table if not exists raw.evaluation_clock (evaluated_at timestamptz not null)",
    "create table if not exists raw.dbt_full_builds (fingerprint varchar not null, built_at timestamptz not null)",
    """
    create table if not exists raw.audience_registry (
        audience_key varchar not null,
        audience_type varchar not null,
        first_seen_at timestamptz not null
    )
    """,
)


# What the events asset writes and event conditions read (audiences/events/loading.py).
EVENT_TABLES = (
    "create schema if not exists raw",
    """
    create table if not exists raw.events (
        event_seq bigint not null,
        message_id varchar not null,
        user_id varchar not null,
        event varchar not null,
        "timestamp" timestamptz not null,
        properties json not null,
        source_name varchar not null,
        loaded_at timestamptz not null,
        user_number bigint
    )
    """,
    # Each user id that events name, numbered at first sight: `raw.events.user_number`. A user's
    # events are selected by this integer, which DuckDB's join filter checks in the scan before
    # it reads any other column (re-evaluating a few users then reads only their events' rows).
    """
    create table if not exists raw.event_users (
        user_id varchar not null,
        user_number bigint not null
    )
    """,
    """
    create table if not exists raw.events_quarantine (
        source_name varchar not null,
        location varchar not null,
        row_number bigint not null,
        message_id varchar,
        reason varchar not null,
        raw_row varchar,
        quarantined_at timestamptz not null
    )
    """,
    # What each source has loaded: a file's fingerprint, or a table's ingestion-time watermark.
    """
    create table if not exists raw.event_loads (
        source_name varchar not null,
        loaded varchar not null,
        loaded_at timestamptz not null
    )
    """,
)


MEMBERSHIP_TABLES = (
    "create schema if not exists raw",
    "create sequence if not exists raw.membership_outbox_sequence start 1",
    """
    create table if not exists raw.membership_intervals (
        audience_key varchar not null,
        user_key integer not null,
        user_id varchar not null,
        tenant varchar,
        entry_number integer not null,
        entered_at timestamptz not null,
        exited_at timestamptz,
        audience_version varchar
    )
    """,
    """
    create table if not exists raw.membership_outbox (
        sequence bigint not null,
        event_id varchar not null,
        audience_key varchar not null,
        user_id varchar not null,
        tenant varchar,
        event_type varchar not null,
        occurred_at timestamptz not null,
        audience_version varchar,
        entry_number integer not null,
        is_backfill boolean not null,
        batch_id varchar
    )
    """,
    """
    create table if not exists raw.membership_batches (
        batch_id varchar not null,
        audience_key varchar not null,
        evaluated_at timestamptz not null,
        entered integer not null,
        exited integer not null,
        audience_size integer not null,
        last_sequence bigint not null
    )
    """,
    "create table if not exists raw.membership_audiences (audience_key varchar not null, first_evaluated_at timestamptz not null)",
    "create table if not exists raw.outbox_published (published_sequence bigint not null)",
    # The runs of another engine (Spark) whose computed changes were recorded (record_computed_changes).
    "create table if not exists raw.recorded_runs (run_id varchar not null, evaluated_at timestamptz not null)",
    # Replaced by audience_members__reevaluated, which says which rows a build may have changed.
    "drop table if exists raw.membership_signatures",
)


AUDIENCE_MEMBERS_STAND_IN = (
    "create table main.audience_members (audience_key varchar, user_key integer, "
    "user_id varchar, tenant varchar)"
)


def ensure_user_tables(connection: duckdb.DuckDBPyConnection) -> None:
    """Create the users' raw tables if they are not there yet (idempotent), and the events' ones:
    event conditions read `raw.events`, so it exists (empty) before any event source loads."""
    for statement in USER_TABLES:
        connection.execute(statement)
    ensure_event_tables(connection)


def ensure_event_tables(connection: duckdb.DuckDBPyConnection) -> None:
    """Create `raw.events`, its quarantine, its users' numbers and its load log if they are not
    there (idempotent). A `raw.events` written before `user_number` existed gains the column and
    its users their numbers, once."""
    for statement in EVENT_TABLES:
        connection.execute(statement)
    numbered = connection.execute(
        "select count(*) from duckdb_columns() where schema_name = 'raw' "
        "and table_name = 'events' and column_name = 'user_number'"
    ).fetchall()[0][0]
    if not numbered:
        connection.execute("alter table raw.events add column user_number bigint").fetchall()
    if connection.execute(
        "select exists (select 1 from raw.events where user_number is null)"
    ).fetchall()[0][0]:
        number_event_users(connection, "select user_id from raw.events")
        connection.execute(
            "update raw.events set user_number = numbers.user_number from raw.event_users as numbers "
            "where numbers.user_id = raw.events.user_id and raw.events.user_number is null"
        ).fetchall()


def number_event_users(connection: duckdb.DuckDBPyConnection, user_ids_sql: str) -> None:
    """Give each user id that `user_ids_sql` selects and `raw.event_users` lacks the next number."""
    connection.execute(
        f"""
        insert into raw.event_users
        select
            user_id,
            coalesce((select max(user_number) from raw.event_users), 0)
                + row_number() over (order by user_id)
        from (select distinct user_id from ({user_ids_sql}) where user_id is not null)
        where user_id not in (select user_id from raw.event_users)
        """
    ).fetchall()


def ensure_membership_tables(connection: duckdb.DuckDBPyConnection) -> None:
    """Create the membership history's raw tables if they are not there yet (idempotent)."""
    for statement in MEMBERSHIP_TABLES:
        connection.execute(statement)
