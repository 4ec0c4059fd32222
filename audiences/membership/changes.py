"""Membership changes: diff each evaluation against the last, keep history, fill the outbox.

After dbt has built `audience_members` for an evaluation, `record_changes` compares it with the
open membership intervals in DuckDB and, in one transaction:
- writes one `entered` / `exited` event per change to the outbox (`raw.membership_outbox`), each with
  a deterministic id: the same change (the n-th entry of a user into an audience, or its end) always
  gets the same id, so no re-run can mint a second event for it;
- closes and opens validity intervals (`raw.membership_intervals`), which answer "who was in S at T";
- marks a new audience's first members as backfill (they trigger nothing, Knock's default);
- holds the events of an audience whose change is too large to be believed (the circuit breaker).

An audience the catalog marks `is_skipped` (its definition has errors, so this run did not
evaluate it) is left out: its open intervals stay open and it gets no event, whatever
`audience_members` holds for it. An *archived* audience (named in `archived`: its latest commit in
the environment is an archive) that the catalog no longer evaluates has every open interval closed:
its members exit once, and having no open interval left it never moves again.

The outbox is drained into the operational store by `audiences.workflows.publish`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime

import duckdb

from audiences.settings import BREAKER_MINIMUM, BREAKER_SHARE
from audiences.warehouse.schema import ensure_membership_tables


@dataclass(frozen=True)
class CircuitBreaker:
    """Hold an audience's events when a run moves more than `share` of it, and at least `minimum`."""

    share: float = BREAKER_SHARE
    minimum: int = BREAKER_MINIMUM

    def trips(self, changed: int, audience_size: int) -> bool:
        return changed >= self.minimum and changed > self.share * audience_size


@dataclass
class AudienceChanges:
    audience_key: str
    entered: int
    exited: int
    size_before: int
    is_backfill: bool
    held_batch: str | None


@dataclass
class ChangeSummary:
    evaluated_at: datetime
    audiences: list[AudienceChanges] = field(default_factory=list)

    @property
    def entered(self) -> int:
        return sum(a.entered for a in self.audiences)

    @property
    def exited(self) -> int:
        return sum(a.exited for a in self.audiences)

    @property
    def held(self) -> list[AudienceChanges]:
        return [a for a in self.audiences if a.held_batch]


def record_changes(
    connection: duckdb.DuckDBPyConnection,
    evaluated_at: datetime,
    breaker: CircuitBreaker = CircuitBreaker(),
    members_table: str = "main.audience_members",
    catalog_table: str = "main.audience_catalog",
    archived: Collection[str] = (),
) -> ChangeSummary:
    """Diff the evaluation in `members_table` against the open intervals; see the module docstring.

    Only the rows that the builds since the last diff re-evaluated are compared: dbt logs them in
    `<members_table>__reevaluated` (see dbt_project/macros/audience_members.sql), and the diff
    empties that log in its transaction. Without a log, everything is compared. The `archived`
    audiences that the catalog does not evaluate lose every member (the circuit breaker applies to
    them as to any other audience).
    """
    ensure_membership_tables(connection)
    connection.execute("begin transaction")
    try:
        summary = _record(connection, evaluated_at, breaker, members_table, catalog_table, archived)
        connection.execute("commit")
    except BaseException:
        connection.execute("rollback")
        raise
    return summary


def _record(
    connection, evaluated_at, breaker, members_table, catalog_table, archived
) -> ChangeSummary:
    """The steps of `record_changes`, inside its transaction."""
    _refuse_earlier(connection, evaluated_at)
    log = _diff(connection, members_table, catalog_table, archived)
    _number_entries(connection)
    summary, batches = _hold_large_changes(
        connection, evaluated_at, breaker, _audience_moves(connection, evaluated_at, catalog_table)
    )
    _write_outbox(connection, evaluated_at, catalog_table, batches)
    _move_intervals(connection, evaluated_at, catalog_table)
    _clean_up(connection, log)
    return summary


def record_computed_changes(
    connection: duckdb.DuckDBPyConnection,
    evaluated_at: datetime,
    breaker: CircuitBreaker,
    events: str,
    catalog: str,
    run_id: str,
) -> ChangeSummary | None:
    """Record the changes another engine's diff computed, by the same steps as `record_changes`:
    the circuit breaker (on the sizes of the open intervals here), the outbox (each event's id
    computed here again, and checked against the engine's), the intervals, the audiences'
    first evaluation. `events`: a relation of the run's entered and exited rows (event_id,
    audience_key, user_key, user_id, tenant, event_type, entry_number), as Spark's
    membership_changes writes them; `catalog`: the audiences it evaluated (audience_key,
    audience_version). One transaction, with `run_id` recorded in raw.recorded_runs: a run
    already recorded is left alone (returns None).
    """
    ensure_membership_tables(connection)
    connection.execute("begin transaction")
    try:
        if connection.execute(
            "select count(*) from raw.recorded_runs where run_id = $run", {"run": run_id}
        ).fetchall()[0][0]:
            connection.execute("rollback")
            return None
        _refuse_earlier(connection, evaluated_at)
        connection.execute(
            f"""
            create or replace temp table computed_catalog as
            select audience_key, 'dynamic' as audience_type, audience_version, false as is_skipped
            from {catalog}
            """
        )
        connection.execute(
            "create or replace temp table archived_audiences (audience_key varchar, audience_version varchar)"
        )
        connection.execute(
            f"""
            create or replace temp table changes as
            select
                computed.audience_key, computed.user_key, computed.tenant, computed.user_id,
                computed.entry_number, open_intervals.interval_row, computed.event_type,
                computed.event_id
            from {events} as computed
            left join (
                select rowid as interval_row, audience_key, user_key, tenant
                from raw.membership_intervals where exited_at is null
            ) as open_intervals
                on computed.event_type = 'exited'
                and open_intervals.audience_key = computed.audience_key
                and open_intervals.user_key = computed.user_key
                and open_intervals.tenant is not distinct from computed.tenant
            """
        )
        disagreeing = connection.execute(
            """
            select count(*) filter (where event_type = 'exited' and interval_row is null),
                count(*) filter (where event_id <> substr(sha256(concat_ws(chr(31), audience_key,
                    user_id, coalesce(tenant, ''), event_type, entry_number::varchar)), 1, 32))
            from changes
            """
        ).fetchall()[0]
        if any(disagreeing):
            raise ValueError(
                f"run {run_id}: {disagreeing[0]} exits of memberships not open here and "
                f"{disagreeing[1]} event ids unlike ours; the history here is not the engine's"
            )
        connection.execute(
            "create or replace temp table entries as select audience_key, user_key, tenant, "
            "user_id, entry_number from changes where event_type = 'entered'"
        )
        catalog_table = "temp.computed_catalog"
        summary, batches = _hold_large_changes(
            connection,
            evaluated_at,
            breaker,
            _audience_moves(connection, evaluated_at, catalog_table),
        )
        _write_outbox(connection, evaluated_at, catalog_table, batches)
        _move_intervals(connection, evaluated_at, catalog_table)
        connection.execute(
            "insert into raw.recorded_runs values ($run, $t)", {"run": run_id, "t": evaluated_at}
        )
        for table in ("computed_catalog", "archived_audiences", "changes", "entries", "held"):
            connection.execute(f"drop table {table}")
        connection.execute("commit")
    except BaseException:
        connection.execute("rollback")
        raise
    return summary


@dataclass(frozen=True)
class _HeldBatch:
    batch_id: str
    audience_key: str
    entered: int
    exited: int
    size: int


def _refuse_earlier(connection, evaluated_at: datetime) -> None:
    """Membership history only moves forward: refuse a time before its last entry or exit."""
    latest = connection.execute("select max(entered_at) from raw.membership_intervals").fetchall()[
        0
    ][0]
    latest_exit = connection.execute(
        "select max(exited_at) from raw.membership_intervals"
    ).fetchall()[0][0]
    newest = max((t for t in (latest, latest_exit) if t is not None), default=None)
    if newest is not None and evaluated_at < newest:
        raise ValueError(
            f"evaluation time {evaluated_at.isoformat()} is before the last recorded change "
            f"({newest.isoformat()}); membership history only moves forward"
        )


def _number_entries(connection) -> None:
    """The temp table `entries`: each entered change with the user's id, and which entry this is
    (1 + earlier intervals of the same membership)."""
    connection.execute(
        """
        create or replace temp table entries as
        select
            changes.audience_key, changes.user_key, changes.tenant, users.user_id,
            1 + coalesce(earlier.intervals, 0) as entry_number
        from changes
        join raw.users as users on users.user_key = changes.user_key
        left join (
            select audience_key, user_key, tenant, count(*) as intervals
            from raw.membership_intervals
            -- the user's intervals first (an integer semi-join), then the audience
            where user_key in (select user_key from changes where event_type = 'entered')
                and (audience_key, user_key) in (select audience_key, user_key from changes where event_type = 'entered')
            group by all
        ) as earlier
            on earlier.audience_key = changes.audience_key
            and earlier.user_key = changes.user_key
            and earlier.tenant is not distinct from changes.tenant
        where changes.event_type = 'entered'
        """
    )


def _audience_moves(connection, evaluated_at: datetime, catalog_table: str) -> list[tuple]:
    """Per evaluated audience: (key, entered, exited, size before, is new)."""
    unmoved_sizes, unmoved_parameters = _unmoved_sizes(connection, evaluated_at, catalog_table)
    return connection.execute(
        f"""
        with sizes as (
            -- counting every audience's open intervals takes seconds at 10M users: only the moved ones
            select audience_key, count(*) as size_before
            from raw.membership_intervals where exited_at is null
                and audience_key in (select audience_key from changes)
            group by audience_key
            union all
            {unmoved_sizes}
        ),
        moved as (
            select
                audience_key,
                count(*) filter (where event_type = 'entered') as entered,
                count(*) filter (where event_type = 'exited') as exited
            from changes group by audience_key
        )
        select
            catalog.audience_key,
            coalesce(moved.entered, 0),
            coalesce(moved.exited, 0),
            coalesce(sizes.size_before, 0),
            catalog.audience_key not in (select audience_key from raw.membership_audiences) as is_new
        from {_with_archived(catalog_table)} as catalog
        left join moved using (audience_key)
        left join sizes using (audience_key)
        where catalog.audience_type <> 'static' and not catalog.is_skipped
        order by catalog.audience_key
        """,
        unmoved_parameters,
    ).fetchall()


def _hold_large_changes(
    connection, evaluated_at: datetime, breaker: CircuitBreaker, moves: list[tuple]
) -> tuple[ChangeSummary, list[_HeldBatch]]:
    """The circuit breaker: a held batch for each audience (not new) that moved too much, in the
    temp table `held`; and the run's summary."""
    summary = ChangeSummary(evaluated_at)
    batches = []
    for key, entered, exited, size_before, is_new in moves:
        held = None
        if not is_new and breaker.trips(max(entered, exited), size_before):
            held = _batch_id(connection, key, evaluated_at)
            batches.append(_HeldBatch(held, key, entered, exited, size_before))
        summary.audiences.append(
            AudienceChanges(key, entered, exited, size_before, bool(is_new), held)
        )
    connection.execute("create or replace temp table held (audience_key varchar, batch_id varchar)")
    for batch in batches:
        connection.execute(
            "insert into held values ($a, $b)", {"a": batch.audience_key, "b": batch.batch_id}
        )
    return summary, batches


def _write_outbox(
    connection, evaluated_at: datetime, catalog_table: str, batches: list[_HeldBatch]
) -> None:
    """One outbox event per change, with its deterministic id, then the held batches (each up to
    the outbox's last sequence)."""
    connection.execute(
        f"""
        insert into raw.membership_outbox
        with events as (
            select audience_key, user_id, tenant, 'entered' as event_type, entry_number from entries
            union all
            select audience_key, user_id, tenant, 'exited', entry_number from changes where event_type = 'exited'
        )
        select
            nextval('raw.membership_outbox_sequence'),
            substr(sha256(concat_ws(chr(31), events.audience_key, events.user_id, coalesce(events.tenant, ''),
                                    events.event_type, events.entry_number::varchar)), 1, 32),
            events.audience_key, events.user_id, events.tenant, events.event_type, $evaluated_at,
            catalog.audience_version, events.entry_number,
            events.audience_key not in (select audience_key from raw.membership_audiences),
            held.batch_id
        from events
        join {_with_archived(catalog_table)} as catalog using (audience_key)
        left join held using (audience_key)
        order by events.audience_key, events.event_type, events.user_id
        """,
        {"evaluated_at": evaluated_at},
    )
    for batch in batches:
        connection.execute(
            "insert into raw.membership_batches values ($b, $a, $evaluated_at, $entered, $exited, $size, "
            "(select max(sequence) from raw.membership_outbox))",
            {
                "b": batch.batch_id,
                "a": batch.audience_key,
                "evaluated_at": evaluated_at,
                "entered": batch.entered,
                "exited": batch.exited,
                "size": batch.size,
            },
        )


def _move_intervals(connection, evaluated_at: datetime, catalog_table: str) -> None:
    """Close the exited memberships' intervals, open the entered ones', and remember the audiences
    evaluated for the first time (their first members were backfill)."""
    parameters = {"evaluated_at": evaluated_at}
    connection.execute(
        """
        update raw.membership_intervals
        set exited_at = $evaluated_at
        where rowid in (select interval_row from changes where event_type = 'exited')
        """,
        parameters,
    )
    connection.execute(
        f"""
        insert into raw.membership_intervals
        select entries.audience_key, entries.user_key, entries.user_id, entries.tenant, entries.entry_number,
               $evaluated_at, null, catalog.audience_version
        from entries join {catalog_table} as catalog using (audience_key)
        """,
        parameters,
    )
    connection.execute(
        f"""
        insert into raw.membership_audiences
        select audience_key, $evaluated_at from {catalog_table}
        where audience_key not in (select audience_key from raw.membership_audiences)
            and audience_type <> 'static' and not is_skipped
        """,
        parameters,
    )


def _clean_up(connection, log: str | None) -> None:
    """Empty the re-evaluation log the diff read, and drop the diff's temp tables."""
    if log is not None:
        connection.execute(f"delete from {log}")
    for table in (
        "archived_audiences",
        "changes",
        "entries",
        "held",
        "evaluated_audiences",
        "whole_audiences",
        "reevaluated_users",
        "reevaluated_audience_users",
        "per_user_audiences",
    ):
        connection.execute(f"drop table {table}")


def _diff(
    connection, members_table: str, catalog_table: str, archived: Collection[str] = ()
) -> str | None:
    """Build the temp table `changes`: one row per membership that entered or exited since the last
    diff (the evaluated rows in scope against the open intervals). Returns the re-evaluation log
    the diff read, if any."""
    log = _diff_scope(connection, members_table, catalog_table, archived)
    connection.execute(f"create or replace temp table changes as {_changes_query(members_table)}")
    return log


def _diff_scope(
    connection, members_table: str, catalog_table: str, archived: Collection[str] = ()
) -> str | None:
    """The temp tables that scope the diff (`_changes_query`): the evaluated audiences, and the
    audiences, users and pairs whose rows may have changed since the last diff. Returns the
    re-evaluation log it read, if any."""
    _archived_audiences(connection, catalog_table, archived)
    connection.execute(
        f"""
        create or replace temp table evaluated_audiences as
        -- static audiences record their events when members are added or removed; a skipped
        -- audience (its definition has errors) was not evaluated: its memberships stay open
        select audience_key from {_with_archived(catalog_table)}
        where audience_type <> 'static' and not is_skipped
        """
    )
    # Which rows may have changed since the last diff: audiences evaluated whole, users
    # re-evaluated in every audience, and users re-evaluated in one audience (the users of the
    # pairs a per-tenant audience re-evaluated). Anything else kept its membership.
    log = _reevaluated_log(connection, members_table)
    connection.execute("create or replace temp table whole_audiences (audience_key varchar)")
    connection.execute("create or replace temp table reevaluated_users (user_key integer)")
    connection.execute(
        "create or replace temp table reevaluated_audience_users (audience_key varchar, user_key integer)"
    )
    if (
        log is None
        or connection.execute(
            f"select count(*) from {log} where audience_key is null and user_key is null"
        ).fetchall()[0][0]
    ):
        connection.execute(
            "insert into whole_audiences select audience_key from evaluated_audiences"
        )
    else:
        connection.execute(
            f"insert into whole_audiences select distinct audience_key from {log} "
            "where user_key is null and audience_key is not null"
        )
        connection.execute(
            f"insert into reevaluated_users select distinct user_key from {log} "
            "where audience_key is null and user_key is not null"
        )
        # An archived audience is compared whole: nobody is its member any more.
        connection.execute(
            "insert into whole_audiences select audience_key from archived_audiences"
        )
    connection.execute("""
        create or replace temp table per_user_audiences as
        select audience_key from evaluated_audiences
        where audience_key not in (select audience_key from whole_audiences)
    """)
    connection.execute(
        "delete from whole_audiences where audience_key not in (select audience_key from evaluated_audiences)"
    )
    if log is not None:
        # Rows the two other scopes do not already compare (each row is compared once).
        connection.execute(
            f"""
            insert into reevaluated_audience_users
            select distinct audience_key, user_key from {log}
            where audience_key is not null and user_key is not null
                and audience_key in (select audience_key from per_user_audiences)
                and user_key not in (select user_key from reevaluated_users)
            """
        )

    return log


def _changes_query(members_table: str) -> str:
    """The diff itself over `_diff_scope`'s tables: one row per membership that entered or exited
    (the evaluated rows in scope against the open intervals)."""

    def in_scope(relation: str, columns: str) -> str:
        # Two simple semi-joins, not one OR of them: DuckDB runs these about four times faster.
        return f"""
            select {columns} from {relation} where audience_key in (select audience_key from whole_audiences)
            union all
            select {columns} from {relation}
            where user_key in (select user_key from reevaluated_users)
                and audience_key in (select audience_key from per_user_audiences)
            union all
            select {columns} from {relation}
            where (audience_key, user_key) in (
                select audience_key, user_key from reevaluated_audience_users
            )
        """

    return f"""
        with evaluated as (
            {in_scope(members_table, "audience_key, user_key, tenant")}
        ),
        open_intervals as (
            {
        in_scope(
            "(select rowid as interval_row, * from raw.membership_intervals where exited_at is null)",
            "interval_row, audience_key, user_key, user_id, tenant, entry_number",
        )
    }
        )
        select
            coalesce(evaluated.audience_key, open_intervals.audience_key) as audience_key,
            coalesce(evaluated.user_key, open_intervals.user_key) as user_key,
            coalesce(evaluated.tenant, open_intervals.tenant) as tenant,
            open_intervals.user_id as user_id,
            open_intervals.entry_number as entry_number,
            open_intervals.interval_row as interval_row,
            case when open_intervals.user_key is null then 'entered' else 'exited' end as event_type
        from evaluated
        full outer join open_intervals
            on evaluated.audience_key = open_intervals.audience_key
            and evaluated.user_key = open_intervals.user_key
            and evaluated.tenant is not distinct from open_intervals.tenant
        where evaluated.user_key is null or open_intervals.user_key is null
    """


def _archived_audiences(connection, catalog_table: str, archived: Collection[str]) -> None:
    """The temp table `archived_audiences`: the archived audiences the catalog does not evaluate
    that still have open intervals, each with the version its members' intervals last recorded."""
    connection.execute(
        f"""
        create or replace temp table archived_audiences as
        select audience_key, arg_max(audience_version, entered_at) as audience_version
        from raw.membership_intervals
        where exited_at is null
            and audience_key in (select unnest($archived::varchar[]))
            and audience_key not in (
                select audience_key from {catalog_table}
                where audience_type <> 'static' and not is_skipped
            )
        group by audience_key
        """,
        {"archived": sorted(archived)},
    )


def _with_archived(catalog_table: str) -> str:
    """The catalog's columns the diff reads, with a row for each archived audience it closes."""
    return f"""(
        select audience_key, audience_type, audience_version, is_skipped from {catalog_table}
        union all
        select audience_key, 'dynamic', audience_version, false from archived_audiences
    )"""


def _unmoved_sizes(connection, evaluated_at: datetime, catalog_table: str) -> tuple[str, dict]:
    """A query (and its parameters) of the sizes of the audiences the diff found unmoved: their members now, which this
    evaluation counted in `audience_evaluations` (beside the catalog), else their open intervals."""
    schema = catalog_table.rpartition(".")[0] or "main"
    counted = connection.execute(
        "select count(*) from information_schema.tables where table_schema = $schema "
        "and table_name = 'audience_evaluations'",
        {"schema": schema},
    ).fetchall()[0][0]
    if (
        counted
        and connection.execute(
            f"select count(*) from {schema}.audience_evaluations where evaluated_at = $t",
            {"t": evaluated_at},
        ).fetchall()[0][0]
    ):
        return (
            f"select audience_key, member_count from {schema}.audience_evaluations "
            "where evaluated_at = $evaluated_at and audience_key not in (select audience_key from changes)",
            {"evaluated_at": evaluated_at},
        )
    return (
        "select audience_key, count(*) from raw.membership_intervals where exited_at is null "
        "and audience_key not in (select audience_key from changes) group by audience_key",
        {},
    )


def pending_changes(
    connection: duckdb.DuckDBPyConnection,
    members_table: str = "main.audience_members",
    catalog_table: str = "main.audience_catalog",
) -> dict[str, tuple[int, int]]:
    """(entered, exited) per evaluated audience that the next `record_changes` will record, without
    recording anything: the same diff, in a transaction that is rolled back. Audiences that moved
    nobody are (0, 0); static audiences, whose events are written when they change, are left out."""
    connection.execute("begin transaction")
    try:
        ensure_membership_tables(connection)
        _diff_scope(connection, members_table, catalog_table)
        moved = dict.fromkeys(
            (
                key
                for (key,) in connection.execute(
                    "select audience_key from evaluated_audiences"
                ).fetchall()
            ),
            (0, 0),
        )
        moved.update(
            {
                key: (entered, exited)
                for key, entered, exited in connection.execute(
                    # counted as the diff finds them: 6M rows at 2,000 audiences when nothing
                    # is recorded yet, not kept in a table only to be counted
                    "select audience_key, count(*) filter (where event_type = 'entered'), "
                    "count(*) filter (where event_type = 'exited') "
                    f"from ({_changes_query(members_table)}) group by audience_key"
                ).fetchall()
            }
        )
    finally:
        connection.execute("rollback")
    return moved


def _reevaluated_log(connection: duckdb.DuckDBPyConnection, members_table: str) -> str | None:
    """`<members_table>__reevaluated`, written by audience_members' builds, if it exists."""
    schema, _, name = members_table.rpartition(".")
    found = connection.execute(
        "select count(*) from information_schema.tables where table_schema = $schema and table_name = $name",
        {"schema": schema or "main", "name": f"{name}__reevaluated"},
    ).fetchall()[0][0]
    return f"{members_table}__reevaluated" if found else None


def _batch_id(connection, audience_key: str, evaluated_at: datetime) -> str:
    return connection.execute(
        "select substr(sha256(concat_ws(chr(31), 'held', $a, strftime($t, '%Y-%m-%dT%H:%M:%S.%fZ'))), 1, 32)",
        {"a": audience_key, "t": evaluated_at},
    ).fetchall()[0][0]


def members_at(
    connection: duckdb.DuckDBPyConnection, audience_key: str, moment: datetime
) -> list[dict]:
    """Who was in the audience at `moment`, from the validity intervals."""
    recorded = connection.execute(
        "select count(*) from information_schema.tables where table_schema = 'raw' and table_name = 'membership_intervals'"
    ).fetchall()[0][0]
    if not recorded:
        return []
    rows = connection.execute(
        """
        select user_id, tenant from raw.membership_intervals
        where audience_key = $a and entered_at <= $t and (exited_at is null or exited_at > $t)
        order by user_id, tenant nulls first
        """,
        {"a": audience_key, "t": moment},
    ).fetchall()
    return [{"user_id": user_id, "tenant": tenant} for user_id, tenant in rows]
