"""Static audiences: members added and removed directly, in the membership store.

A member is (audience, user, tenant or none); the same user can be a member once per distinct
tenant. Adding an existing member or removing a non-member is a successful no-op. Every real add
and remove records an `entered` / `exited` event (ids computed exactly like the evaluated
audiences' events) whose workflow triggers run at the next pipeline run, when the users' properties
are known. A user who does not exist yet is kept as a *missing user* member; when identified later,
no trigger fires retroactively (Knock's rule).

Everything here writes only to the store, so it works while a pipeline run holds the warehouse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import sqlalchemy as sa

from audiences.identifiers import is_blank
from audiences.store import database as tables
from audiences.store.database import (
    MembershipStore,
    delete_members,
    normalize_tenant,
    now_text,
    tenant_key,
)

MAX_MEMBERS_PER_CALL = 1000


class MembershipError(ValueError):
    """A membership change that cannot be made (unknown audience, dynamic audience, bad member)."""


class Member(NamedTuple):
    # A named tuple rather than a dataclass: uploads and syncs make a hundred thousand at a time.
    user_id: str
    tenant: str | None = None


@dataclass(frozen=True)
class ChangeResult:
    changed: int
    unchanged: int
    event_ids: list[str]


def event_id(
    audience_key: str, user_id: str, tenant: str | None, event_type: str, entry_number: int
) -> str:
    """The deterministic id of a membership change (the warehouse computes the same in SQL)."""
    text = f"{audience_key}\x1f{user_id}\x1f{tenant or ''}\x1f{event_type}\x1f{entry_number}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def first_event_ids(audience_key: str, members, event_type: str):
    """`event_id(audience_key, user_id, tenant, event_type, 1)` of many members at once (a polars
    frame of `user_id` and normalized `tenant`), as a polars Series, in DuckDB: the warehouse's SQL
    form of the id (`membership/changes.py`), which `test_members` holds equal to `event_id`. An
    upload's 100,000 ids took longer hashed one by one in Python than reading its file."""
    import duckdb
    import polars as pl

    with duckdb.connect() as connection:
        connection.register("members", members.select("user_id", "tenant").to_arrow())
        table = connection.sql(
            "select substr(sha256(concat_ws(chr(31), $audience, user_id, coalesce(tenant, ''), "
            "$kind, '1')), 1, 32) as event_id from members",
            params={"audience": audience_key, "kind": event_type},
        ).to_arrow_table()
    return pl.from_arrow(table)["event_id"]


def require_static(audience_key: str, audience_types: dict[str, str]) -> None:
    """Refuse changes to dynamic audiences (types are immutable) and to unknown ones."""
    kind = audience_types.get(audience_key)
    if kind is None:
        raise MembershipError(f"unknown audience {audience_key!r}")
    if kind != "static":
        raise MembershipError(
            f"{audience_key!r} is a {kind} audience: its members come from its conditions and cannot be "
            "added or removed; use a static audience"
        )


def audience_types(store: MembershipStore, definitions: dict) -> dict[str, str]:
    """Every audience's type: from definition files, plus static audiences created in the store."""
    types = {key: definition.type for key, definition in definitions.items()}
    for row in store.rows(sa.select(tables.static_audiences.c.audience_key)):
        types.setdefault(row["audience_key"], "static")
    return types


def create_static_audience(
    store: MembershipStore, audience_key: str, name: str | None = None
) -> bool:
    """Create a static audience in the store (the API's `create_audience=true`); False if it existed."""
    from audiences.conditions.definitions import KEY_PATTERN

    if not KEY_PATTERN.fullmatch(audience_key):
        raise MembershipError(
            f"bad audience key {audience_key!r}: use lower-case letters, digits, '-' and '_'"
        )
    with store.engine.begin() as connection:
        return (
            store.insert_ignoring_duplicates(
                connection,
                tables.static_audiences,
                [
                    {
                        "audience_key": audience_key,
                        "name": name or audience_key,
                        "created_at": now_text(),
                    }
                ],
            )
            == 1
        )


def change_members(
    store: MembershipStore,
    audience_key: str,
    members: Iterable[Member],
    action: str,
    source: str = "static",
    occurred_at: str | None = None,
    connection=None,
) -> ChangeResult:
    """Add or remove members in one transaction (the caller's, when `connection` is given);
    returns the real changes and their events."""
    change = prepare_change(audience_key, members, action, source, occurred_at)
    if connection is None:
        with store.engine.begin() as own:
            return apply_change(store, own, change)
    return apply_change(store, connection, change)


EVENT_COLUMNS = (
    "event_id",
    "sequence",
    "audience_key",
    "user_id",
    "tenant",
    "event_type",
    "occurred_at",
    "audience_version",
    "entry_number",
    "is_backfill",
    "batch_id",
    "published_at",
    "triggers_processed",
    "source",
)


@dataclass(frozen=True)
class PreparedChange:
    """A membership change worked out as far as it can be without the store: the members, and
    each one's event id for the usual case of a first entry or exit."""

    audience_key: str
    action: str
    source: str
    stamp: str
    wanted: dict[tuple[str, str], str | None]  # (user_id, tenant key) -> the tenant
    first_ids: dict[tuple[str, str], str]


def prepare_change(
    audience_key: str,
    members: Iterable[Member],
    action: str,
    source: str = "static",
    occurred_at: str | None = None,
) -> PreparedChange:
    """Everything of a change that needs no database (the API does it before taking its turn to write)."""
    if action not in ("add", "remove"):
        raise ValueError(f"action is add or remove, not {action!r}")
    wanted: dict[tuple[str, str], str | None] = {}
    for member in members:
        # Blank is ASCII whitespace only (`identifiers.is_blank`).
        if not isinstance(member.user_id, str) or is_blank(member.user_id):
            raise MembershipError(f"a member needs a user id, got {member.user_id!r}")
        tenant = normalize_tenant(member.tenant)
        if tenant is not member.tenant:  # a blank tenant is no tenant, on every write path
            member = member._replace(tenant=tenant)
        wanted.setdefault((member.user_id, tenant or ""), tenant)
    event_type = "entered" if action == "add" else "exited"
    first_ids = {
        key: event_id(audience_key, key[0], tenant, event_type, 1) for key, tenant in wanted.items()
    }
    return PreparedChange(
        audience_key, action, source, occurred_at or now_text(), wanted, first_ids
    )


def distinct_members(members):
    """An upload's members (a polars frame of checked `user_id` and `tenant`), each (user, tenant)
    once, in first-occurrence order, tenants normalized (`normalize_tenant`): `user_id`, `tenant`
    and `tenant_key` (the tenant or ''), worked out a column at a time."""
    import polars as pl

    given = [tenant for tenant in members["tenant"].unique().to_list() if tenant is not None]
    normalized = [normalize_tenant(tenant) for tenant in given]
    return (
        members.select(
            "user_id",
            pl.col("tenant").replace_strict(
                given, normalized, default=pl.col("tenant"), return_dtype=pl.String
            )
            if given
            else pl.col("tenant").cast(pl.String),
        )
        .with_columns(pl.col("tenant").fill_null("").alias("tenant_key"))
        .unique(["user_id", "tenant_key"], keep="first", maintain_order=True)
    )


def prepare_checked_change(
    audience_key: str,
    members,
    action: str,
    source: str = "static",
    occurred_at: str | None = None,
) -> PreparedChange:
    """`prepare_change` for a large batch whose user ids were already checked (an upload's rows,
    by `validate_users`), given as a polars frame of `user_id` and `tenant`: the same normalized
    tenants, first occurrences (`distinct_members`) and event ids, worked out a column at a time."""
    if action not in ("add", "remove"):
        raise ValueError(f"action is add or remove, not {action!r}")
    members = distinct_members(members)
    event_type = "entered" if action == "add" else "exited"
    keys = list(zip(members["user_id"].to_list(), members["tenant_key"].to_list(), strict=True))
    wanted = dict(zip(keys, members["tenant"].to_list(), strict=True))
    first_ids = dict(
        zip(keys, first_event_ids(audience_key, members, event_type).to_list(), strict=True)
    )
    return PreparedChange(
        audience_key, action, source, occurred_at or now_text(), wanted, first_ids
    )


def count_current_members(store: MembershipStore, connection, audience_key: str, members) -> int:
    """How many of these distinct members (`distinct_members`' frame) the audience holds now."""
    current, _ = _current_state(
        store, connection, audience_key, members["user_id"].unique().sort().to_list(), False
    )
    keys = zip(members["user_id"].to_list(), members["tenant_key"].to_list(), strict=True)
    return sum(1 for key in keys if key in current)


def _current_state(
    store: MembershipStore,
    connection,
    audience_key: str,
    user_ids: list[str],
    with_entries: bool = True,
) -> tuple[set[tuple[str, str]], dict[tuple[str, str], int]]:
    """The audience's current members among these users, and each one's number of entries
    (unless not `with_entries`: then none).

    An audience with fewer rows than the users asked about is read whole, through its index, in
    one range scan: an upload of 100,000 users into a new or small audience would otherwise probe
    the indexes once per user. (Counting stops at the number of users, so a large audience costs
    no more to decide than the probes would.)"""
    mark = store.placeholder
    bound = len(user_ids)
    current: set[tuple[str, str]] = set()
    entries: dict[tuple[str, str], int] = {}

    def smaller(table: str) -> bool:
        return (
            connection.exec_driver_sql(
                f"select count(*) from (select 1 from {table} where audience_key = {mark} "
                f"limit {mark}) as bounded",
                (audience_key, bound),
            ).scalar()
            < bound
        )

    wanted = set(user_ids)
    members_whole = smaller("audience_members")
    events_whole = smaller("membership_events") if with_entries else True
    if members_whole:
        current.update(
            (user_id, tenant)
            for user_id, tenant in connection.exec_driver_sql(
                f"select user_id, tenant_key from audience_members where audience_key = {mark}",
                (audience_key,),
            )
            if user_id in wanted
        )
    if events_whole and with_entries:
        for user_id, tenant, count in connection.exec_driver_sql(
            f"select user_id, tenant, count(*) from membership_events where audience_key = {mark} "
            "and event_type = 'entered' group by user_id, tenant",
            (audience_key,),
        ):
            if user_id in wanted:
                key = (user_id, tenant_key(tenant))  # events written before blanks were no tenant
                entries[key] = entries.get(key, 0) + count
    if members_whole and events_whole:
        return current, entries
    for start in range(0, len(user_ids), 5000):  # well under SQLite's 32,766 parameters
        chunk = user_ids[start : start + 5000]
        marks = ", ".join([mark] * len(chunk))
        if not members_whole:
            current.update(
                connection.exec_driver_sql(
                    f"select user_id, tenant_key from audience_members where audience_key = {mark} "
                    f"and user_id in ({marks})",
                    (audience_key, *chunk),
                ).all()
            )
        if not events_whole:
            for user_id, tenant, count in connection.exec_driver_sql(
                f"select user_id, tenant, count(*) from membership_events where audience_key = {mark} "
                f"and event_type = 'entered' and user_id in ({marks}) group by user_id, tenant",
                (audience_key, *chunk),
            ):
                key = (user_id, tenant_key(tenant))
                entries[key] = entries.get(key, 0) + count
    return current, entries


def apply_change(store: MembershipStore, connection, change: PreparedChange) -> ChangeResult:
    """Write a prepared change: the members that really change, and their events."""
    # The API's hot path (a batch of 1,000 members per request) and uploads (100,000): plain SQL
    # through the driver with tuples, since building SQLAlchemy statements and dicts per row costs
    # more than the writes.
    audience_key, wanted, stamp, source = (
        change.audience_key,
        change.wanted,
        change.stamp,
        change.source,
    )
    if not wanted:
        return ChangeResult(0, 0, [])
    current, entries = _current_state(
        store, connection, audience_key, sorted({user_id for user_id, _ in wanted})
    )
    adding = change.action == "add"
    event_type = "entered" if adding else "exited"
    events = []
    # In key order: the rows land in the indexes' order, next to each other.
    for key in sorted(wanted):
        if (key in current) == adding:
            continue
        tenant = wanted[key]
        entry = max(entries.get(key, 0) + (1 if adding else 0), 1)
        identifier = (
            change.first_ids[key]
            if entry == 1
            else event_id(audience_key, key[0], tenant, event_type, entry)
        )
        events.append(
            (
                identifier,
                None,
                audience_key,
                key[0],
                tenant,
                event_type,
                stamp,
                None,
                entry,
                False,
                None,
                stamp,
                False,
                source,
            )
        )
    store.insert_rows(connection, tables.membership_events, EVENT_COLUMNS, events)
    if adding:
        store.insert_rows(
            connection,
            tables.audience_members,
            ("audience_key", "user_id", "tenant_key", "tenant", "added_at"),
            [(audience_key, event[3], event[4] or "", event[4], stamp) for event in events],
        )
    else:
        delete_members(
            store, connection, audience_key, [(event[3], event[4] or "") for event in events]
        )
    return ChangeResult(len(events), len(wanted) - len(events), [event[0] for event in events])


def is_member(
    store: MembershipStore, audience_key: str, user_id: str, tenant: str | None = None
) -> bool:
    """Tenant-strict membership: a member for a run only when the run's tenant equals the
    membership's tenant; a run with no tenant matches only members added with no tenant.

    This is the one membership check: the CLI's `check`, guides, and workflow trigger conditions
    use it, and the condition compiler's `is_audience_member` is its SQL form.
    """
    mark = store.placeholder
    # Plain SQL on the primary key: the API answers this within a few milliseconds at 10M members.
    with store.read_engine.connect() as connection:
        return (
            connection.exec_driver_sql(
                f"select 1 from audience_members where audience_key = {mark} and user_id = {mark} "
                f"and tenant_key = {mark}",
                (audience_key, user_id, tenant_key(tenant)),
            ).first()
            is not None
        )


def copy_to_warehouse(connection, store: MembershipStore, static_keys: Iterable[str]) -> int:
    """Replace the warehouse's copy of static memberships (`raw.static_audience_members`), which
    dbt's static audience models and `is_audience_member` conditions read."""
    import polars as pl

    from audiences.conditions.compiler import normalized_tenant, render
    from audiences.warehouse.schema import ensure_user_tables

    keys = sorted(set(static_keys))
    members = tables.audience_members
    rows = (
        store.rows(
            sa.select(
                members.c.audience_key, members.c.user_id, members.c.tenant, members.c.added_at
            ).where(members.c.audience_key.in_(keys))
        )
        if keys
        else []
    )
    frame = pl.DataFrame(
        rows,
        schema={
            "audience_key": pl.String,
            "user_id": pl.String,
            "tenant": pl.String,
            "added_at": pl.String,
        },
        orient="row",
    )
    ensure_user_tables(connection)
    connection.register("static_rows", frame.to_arrow())
    try:
        connection.execute("begin transaction")
        connection.execute("delete from raw.static_audience_members")
        connection.execute(
            "insert into raw.static_audience_members select audience_key, user_id, "
            f"{render(normalized_tenant())}, added_at::timestamptz from static_rows"
        )
        connection.execute("commit")
    except BaseException:
        connection.execute("rollback")
        raise
    finally:
        connection.unregister("static_rows")
    return frame.height
