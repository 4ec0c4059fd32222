"""Users as the operational store sees them: what the API's identify, get and delete work on.

The warehouse (`raw.users` in DuckDB) is the user store that audiences are evaluated over, but a
pipeline run can hold it for minutes. So the membership store keeps a copy of each user's
properties (`user_profiles`):

- an identify call (API, inline identify in an add) merges its patch into the copy at once, so a
  `GET` right after a `PUT` sees it, and queues the same patch (`user_patches`) for the warehouse;
- after each load, the `users` asset publishes the users that changed in the warehouse, with the
  patches that arrived since re-applied on top, so no identify call is lost in between.

A patch follows Knock's identify: objects merge, `null` removes a property (RFC 7396), exactly as
`json_merge_patch` does in the warehouse. A deletion is queued as the patch `null`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from pathlib import Path

import duckdb
import polars as pl
import sqlalchemy as sa

from audiences.settings import FAULT_POINT
from audiences.store import database as tables
from audiences.store.database import MembershipStore, now_text
from audiences.store.journal import FAULT_BEFORE_APPLIED, Entry, journal_of
from audiences.store.journal import MARKER as JOURNAL_MARKER
from audiences.store.members import apply_change, prepare_checked_change
from audiences.users.sources import ROW_COLUMN, UserSource
from audiences.users.store import LoadResult, load_users
from audiences.users.validation import row_patches, validate_users
from audiences.warehouse.schema import ensure_user_tables

DELETION = "null"  # the queued patch that deletes a user in the warehouse
# Knock's identify takes these beside the properties, but they are delivery settings, not user
# properties (they never reach `recipient.*`): they are not kept (docs/api.md).
NOT_PROPERTIES = ("preferences", "channel_data")


def user_properties(patch: Mapping) -> dict:
    """An identify call's properties: the patch without `id` and Knock's non-properties."""
    return {name: value for name, value in patch.items() if name not in ("id", *NOT_PROPERTIES)}


def merge_patch(target: object, patch: object) -> object:
    """RFC 7396 JSON merge patch, the same rule as DuckDB's `json_merge_patch`."""
    if not isinstance(patch, Mapping):
        return patch
    merged = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _dump(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _same_json(after: str, before: str | None) -> bool:
    """Whether two JSON texts DuckDB wrote hold the same document. DuckDB's `json_merge_patch`
    moves a key it patches to the end of its object, so a patch that changes nothing can change
    the text's key order: texts of the same length are compared as documents, keys in any order
    (values by type: `1`, `1.0` and `true` stay different)."""
    if before is None:
        return False
    if after == before:
        return True
    if len(after) != len(before):
        return False
    return _canonical(after) == _canonical(before)


def _canonical(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def dump_patch(patch: dict) -> str:
    """An identify patch as the identify queue and the journal keep it (JSON text)."""
    return _dump(patch)


@dataclass(frozen=True)
class Profile:
    user_id: str
    properties: dict
    updated_at: str
    created: bool = False  # from `identify`: the user had no profile (or a deleted one) before

    def as_knock_user(self) -> dict:
        """Knock's `User` shape: id, `__typename`, `updated_at`, and every property."""
        return {
            **self.properties,
            "__typename": "User",
            "id": self.user_id,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class PreparedIdentify:
    """Identify patches with their queue rows serialized ahead of the write transaction."""

    patches: list[tuple[str, dict]]
    patch_texts: list[str]
    stamp: str


def prepare_identify(patches: Iterable[tuple[str, dict]]) -> PreparedIdentify:
    patches = list(patches)
    return PreparedIdentify(patches, [_dump(patch) for _, patch in patches], now_text())


def identify(
    store: MembershipStore, connection, patches: Iterable[tuple[str, dict]] | PreparedIdentify
) -> dict[str, Profile]:
    """Apply identify patches inside the caller's write transaction: merge them into the users'
    profiles and queue them for the warehouse. Returns the resulting profiles.

    A known user whose properties the patches leave as they were is neither rewritten nor queued
    (their `updated_at` stays), so identifying the same data again costs the warehouse nothing."""
    prepared = patches if isinstance(patches, PreparedIdentify) else prepare_identify(patches)
    if not prepared.patches:
        return {}
    stamp = prepared.stamp
    lock_profiles(store, connection)
    stored = {
        user_id: (None if deleted_at else properties, updated_at)
        for user_id, properties, deleted_at, updated_at in _stored_profiles(
            store, connection, {user_id for user_id, _ in prepared.patches}
        )
    }
    current = {
        user_id: json.loads(properties)
        for user_id, (properties, _) in stored.items()
        if properties is not None
    }
    merged: dict[str, dict] = {}
    for user_id, patch in prepared.patches:
        merged[user_id] = merge_patch(merged.get(user_id, current.get(user_id, {})), patch)
    texts = {user_id: _dump(properties) for user_id, properties in merged.items()}
    unchanged = {
        user_id
        for user_id, text in texts.items()
        if user_id in current and text == _dump(current[user_id])
    }
    _upsert_profiles(
        store,
        connection,
        [
            (user_id, text, stamp, None)
            for user_id, text in texts.items()
            if user_id not in unchanged
        ],
    )
    _queue_patches(
        store,
        connection,
        [
            (user_id, text)
            for (user_id, _), text in zip(prepared.patches, prepared.patch_texts, strict=True)
            if user_id not in unchanged
        ],
        stamp,
    )
    return {
        user_id: Profile(
            user_id,
            properties,
            stored[user_id][1] if user_id in unchanged else stamp,
            created=user_id not in current,
        )
        for user_id, properties in merged.items()
    }


def identify_many(store: MembershipStore, connection, patches: pl.DataFrame) -> int:
    """`identify` for a large batch (an upload), merged in DuckDB instead of row by row in Python:
    `patches` holds `user_id` and `patch` (JSON object text) in the order they apply. Profiles are
    merged and patches queued inside the caller's write transaction, except for known users whose
    properties they leave as they were (as `identify`); returns the users identified."""
    if patches.is_empty():
        return 0
    lock_profiles(store, connection)
    return _identify_rows(store, connection, patches)


def _identify_rows(store: MembershipStore, connection, patches: pl.DataFrame) -> int:
    """`identify_many` once the profiles are locked."""
    if patches.is_empty():
        return 0
    stamp = now_text()
    current = _stored_profiles(store, connection, patches["user_id"].unique().to_list())
    with duckdb.connect() as merging:
        merging.register(
            "patches", patches.select("user_id", "patch").with_row_index("position").to_arrow()
        )
        merging.register(
            "current",
            pl.DataFrame(
                current,
                orient="row",
                schema={
                    "user_id": pl.String,
                    "properties": pl.String,
                    "deleted_at": pl.String,
                    "updated_at": pl.String,
                },
            ).to_arrow(),
        )
        # The same rule as `merge_patch` (tested against each other), one user's patches in order.
        # A live user's stored properties go through `json_merge_patch` with `{}` too, so that both
        # sides of the comparison are written the same way.
        merged = merging.sql("""
            with merged as (
                select patches.user_id,
                    list_reduce(
                        list_prepend(
                            coalesce(any_value(case when current.deleted_at is null then current.properties end),
                                     '{}')::json,
                            list(patches.patch::json order by patches.position)
                        ),
                        lambda properties, patch: json_merge_patch(properties, patch)
                    )::varchar as properties,
                    any_value(case when current.user_id is not null and current.deleted_at is null
                                   then json_merge_patch(current.properties::json, '{}')::varchar end) as before
                from patches
                left join current on current.user_id = patches.user_id
                group by patches.user_id
            )
            select user_id, properties, before
            from merged
            order by user_id
        """).fetchall()
    unchanged = {user_id for user_id, after, before in merged if _same_json(after, before)}
    _upsert_profiles(
        store,
        connection,
        [
            (user_id, properties, stamp, None)
            for user_id, properties, _ in merged
            if user_id not in unchanged
        ],
    )
    _queue_patches(
        store,
        connection,
        [
            (user_id, patch)
            for user_id, patch in patches.select("user_id", "patch").iter_rows()
            if user_id not in unchanged
        ],
        stamp,
    )
    return len(merged)


def _stored_profiles(store: MembershipStore, connection, user_ids: Iterable[str]) -> list[tuple]:
    """(user_id, properties, deleted_at, updated_at) of the stored profiles among these users."""
    user_ids, mark, rows = sorted(set(user_ids)), store.placeholder, []
    for start in range(0, len(user_ids), 5000):  # well under SQLite's 32,766 parameters
        chunk = user_ids[start : start + 5000]
        rows.extend(
            connection.exec_driver_sql(
                f"select user_id, properties, deleted_at, updated_at from user_profiles "
                f"where user_id in ({', '.join([mark] * len(chunk))})",
                tuple(chunk),
            ).all()
        )
    return rows


def _queue_patches(
    store: MembershipStore, connection, patches: Iterable[tuple[str, str]], stamp: str
) -> None:
    """Queue (user_id, patch text) pairs for the warehouse's next load, in order."""
    store.insert_rows(
        connection,
        tables.user_patches,
        ("user_id", "patch", "received_at", "loaded"),
        [(user_id, text, stamp, False) for user_id, text in patches],
    )


def _upsert_profiles(store: MembershipStore, connection, rows: list[tuple]) -> None:
    """Insert or replace profiles, given as (user_id, properties, updated_at, deleted_at) tuples
    with distinct user ids."""
    if not rows:
        return
    mark = store.placeholder
    values = f"({mark}, {mark}, {mark}, {mark})"
    head = "insert into user_profiles (user_id, properties, updated_at, deleted_at) values "
    tail = (
        " on conflict (user_id) do update set properties = excluded.properties, "
        "updated_at = excluded.updated_at, deleted_at = excluded.deleted_at"
    )
    if store.engine.dialect.name != "sqlite":
        connection.exec_driver_sql(head + values + tail, rows)
        return
    # Multi-row statements on SQLite, as `MembershipStore.insert_rows` explains.
    for start in range(0, len(rows), 8000):
        chunk = rows[start : start + 8000]
        connection.exec_driver_sql(
            head + ", ".join([values] * len(chunk)) + tail, tuple(chain.from_iterable(chunk))
        )


def get_profile(store: MembershipStore, user_id: str) -> Profile | None:
    """The user as the store knows them, with their identifies that wait in the identify journal
    (`store/journal.py`) applied on top; None for a user the store does not know (or deleted)."""
    journal = journal_of(store)
    # The journal first, then the store: an entry deleted from the journal in between was applied
    # before the store is read, and one the store's marker has passed is not applied twice.
    pending = journal.entries_after(0, user_id) if journal is not None else []
    profiles, markers = tables.user_profiles, tables.store_markers
    marker = sa.select(markers.c.value).where(markers.c.name == JOURNAL_MARKER).scalar_subquery()
    with store.read_engine.connect() as connection:
        # One statement, one snapshot: the profile and the marker of what it holds.
        row = connection.execute(
            sa.select(
                marker.label("marker"),
                profiles.c.properties,
                profiles.c.updated_at,
                profiles.c.deleted_at,
            )
            .select_from(sa.select(sa.literal(1).label("one")).subquery())
            .outerjoin(profiles, profiles.c.user_id == user_id)
        ).one()
    state = {}
    if row.properties is not None and row.deleted_at is None:
        state[user_id] = (json.loads(row.properties), row.updated_at)
    if pending:
        applied = journal.applied_in(row.marker)
        replay(state, [entry for entry in pending if entry.seq > applied])
    if state.get(user_id, (None,))[0] is None:
        return None
    properties, updated_at = state[user_id]
    return Profile(user_id, properties, updated_at)


def replay(
    state: dict[str, tuple[dict | None, str | None]], entries: Iterable[Entry]
) -> list[tuple[Entry, bool, bool]]:
    """Apply identify journal entries in order to `state` (user id -> (properties, or None for a
    user unknown or deleted; updated_at)), in place, as `identify` applies patches: merged by
    `merge_patch`, and a known user whose properties an entry leaves as they were is not changed
    (their `updated_at` stays). Returns, per entry, (entry, whether the user existed before it,
    whether it changed them)."""
    results = []
    for entry in entries:
        properties, _ = state.get(entry.user_id, (None, None))
        merged = merge_patch(properties or {}, json.loads(entry.patch))
        changed = properties is None or _dump(merged) != _dump(properties)
        if changed:
            state[entry.user_id] = (merged, entry.received_at)
        results.append((entry, properties is not None, changed))
    return results


@dataclass(frozen=True)
class Applied:
    """An identify journal entry applied to the store: its user, the top-level properties it set,
    and whether the user existed before it (if so, it can move them only in the audiences that
    read those properties)."""

    user_id: str
    properties: frozenset[str]
    existed: bool


def apply_journal_in(store: MembershipStore, connection) -> dict[int, Applied]:
    """Apply the identify journal's entries the store has not applied yet, in order, inside the
    caller's write transaction (profiles locked): profiles merged, patches queued for the
    warehouse (those that change their user), the store's marker moved. Returns each entry
    applied, by its number. `lock_profiles` calls it."""
    journal = journal_of(store)
    if journal is None or os.environ.get(FAULT_POINT) == FAULT_BEFORE_APPLIED:
        return {}  # (a test's fault: the service is about to die with the entries unapplied)
    entries = journal.entries_after(journal.applied(connection))
    if not entries:
        return {}
    state = {
        user_id: (None if deleted_at else json.loads(properties), updated_at)
        for user_id, properties, deleted_at, updated_at in _stored_profiles(
            store, connection, {entry.user_id for entry in entries}
        )
    }
    results = replay(state, entries)
    changed = sorted({entry.user_id for entry, _, moved in results if moved})
    _upsert_profiles(
        store,
        connection,
        [(user_id, _dump(state[user_id][0]), state[user_id][1], None) for user_id in changed],
    )
    store.insert_rows(
        connection,
        tables.user_patches,
        ("user_id", "patch", "received_at", "loaded"),
        [
            (entry.user_id, entry.patch, entry.received_at, False)
            for entry, _, moved in results
            if moved
        ],
    )
    journal.set_applied(connection, entries[-1].seq)
    return {
        entry.seq: Applied(entry.user_id, frozenset(json.loads(entry.patch)), existed)
        for entry, existed, _ in results
    }


def apply_journal(store: MembershipStore) -> list[str]:
    """Apply the identify journal's waiting entries in a store transaction of their own (the
    service's and the worker process's start, the pipeline's load of the identify queue); returns
    the users they identified."""
    journal = journal_of(store)
    if journal is None or not journal.waiting(store):
        return []
    with store.engine.begin() as connection:
        _lock_profiles_only(store, connection)
        applied = journal.applied(connection)
        users = {entry.user_id for entry in journal.entries_after(applied)}
        apply_journal_in(store, connection)
    journal.forget_applied(store)
    return sorted(users)


def delete_user(store: MembershipStore, connection, user_id: str) -> bool:
    """Mark the user deleted in the store and queue the deletion for the warehouse; False if the
    store knows no such user. (Their memberships are removed by the caller, with exit events.)"""
    lock_profiles(store, connection)
    profiles = tables.user_profiles
    stamp = now_text()
    changed = connection.execute(
        profiles.update()
        .where(profiles.c.user_id == user_id, profiles.c.deleted_at.is_(None))
        .values(deleted_at=stamp, properties="{}", updated_at=stamp)
    ).rowcount
    store.insert_ignoring_duplicates(
        connection,
        tables.user_patches,
        [{"user_id": user_id, "patch": DELETION, "received_at": stamp, "loaded": False}],
    )
    return bool(changed)


def publish_warehouse_users(store: MembershipStore, warehouse, since: str | None) -> int:
    """Copy users that changed in the warehouse after `since` (ISO 8601, or None for all) into the
    store's profiles, re-applying identify patches the warehouse has not loaded yet."""
    where = "where updated_at > $since::timestamptz" if since is not None else ""
    cursor = warehouse.execute(
        f"select user_id, properties::varchar, deleted_at is not null, "
        f"strftime(updated_at at time zone 'UTC', '%Y-%m-%dT%H:%M:%S.%fZ') "
        f"from raw.users {where}",
        {"since": since} if since is not None else {},
    )
    patches = tables.user_patches
    published = 0
    with store.engine.begin() as connection:
        # Pending patches are read in the writing transaction, with identify calls locked out, so
        # a patch cannot arrive between reading them and writing the profiles.
        lock_profiles(store, connection)
        pending: dict[str, list[str]] = {}
        for user_id, patch in connection.execute(
            sa.select(patches.c.user_id, patches.c.patch)
            .where(patches.c.loaded == sa.false())
            .order_by(patches.c.patch_id)
        ):
            pending.setdefault(user_id, []).append(patch)
        while chunk := cursor.fetchmany(100_000):
            rows = []
            for user_id, properties, deleted, updated_at in chunk:
                if user_id in pending:
                    state: dict | None = None if deleted else json.loads(properties)
                    for patch in pending[user_id]:
                        state = (
                            None
                            if patch == DELETION
                            else merge_patch(state or {}, json.loads(patch))
                        )
                    deleted, properties = state is None, _dump(state or {})
                rows.append(
                    (
                        user_id,
                        "{}" if deleted else properties,
                        updated_at,
                        updated_at if deleted else None,
                    )
                )
            _upsert_profiles(store, connection, rows)
            published += len(rows)
    return published


def lock_profiles(store: MembershipStore, connection) -> None:
    """Serialize writers of profiles: SQLite's write transactions already are ("begin immediate");
    on PostgreSQL a transaction-scoped advisory lock does it. Then the uploads queued before and
    the identify journal's waiting entries are applied (`apply_queued_uploads`,
    `apply_journal_in`), so that every writer of profiles (identify, delete, merge, publishing the
    warehouse's users) comes after them: patches apply in the order they arrived."""
    _lock_profiles_only(store, connection)
    apply_queued_uploads(store, connection)
    apply_journal_in(store, connection)


def _lock_profiles_only(store: MembershipStore, connection) -> None:
    if store.engine.dialect.name == "postgresql":
        connection.execute(
            sa.text("select pg_advisory_xact_lock(hashtext('audiences.user_profiles'))")
        )


# An upload's batch, as Arrow IPC: LZ4 compresses a 10 MB CSV's rows to a few MB in milliseconds.
UPLOAD_COMPRESSION = "lz4"
# On PostgreSQL, the advisory lock that serializes journaling an upload (and counting what it adds)
# with writing journaled uploads' members.
UPLOAD_MEMBERS_LOCK = "audiences.upload_members"


def _ipc(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc(buffer, compression=UPLOAD_COMPRESSION)
    return buffer.getvalue()


def lock_upload_members(store: MembershipStore, connection) -> None:
    """Serialize an upload's journaling with the writing of journaled members: SQLite's write
    transactions already are; on PostgreSQL a transaction-scoped advisory lock does it."""
    if store.engine.dialect.name == "postgresql":
        connection.execute(
            sa.text("select pg_advisory_xact_lock(hashtext(:name))"),
            {"name": UPLOAD_MEMBERS_LOCK},
        )


def queue_upload(
    store: MembershipStore,
    connection,
    audience_key: str,
    rows: pl.DataFrame,
    members: pl.DataFrame,
    received_at: str,
) -> None:
    """Journal an upload inside its write transaction, as one batch: its members (`user_id`,
    `tenant`, each once), whose entered events are written right after the answer
    (`settle_uploads`), and its checked rows (`_row`, `id` and its other cells, every one text),
    whose identify patches follow those (`apply_queued_uploads`). The upload is answered once the
    batch is committed; `received_at` is its members' `added_at` and their events' time."""
    connection.execute(
        tables.upload_batches.insert().values(
            audience_key=audience_key,
            received_at=received_at,
            row_count=rows.height,
            rows=_ipc(rows),
            members=_ipc(members.select("user_id", "tenant")),
        )
    )


def settle_uploads(store: MembershipStore, connection) -> int:
    """Write the members and entered events of every journaled upload that waits, oldest first,
    inside the caller's write transaction, each with the time of its answer and the event ids any
    add gives; each batch's `members` is cleared in the same transaction, so each is written
    exactly once whenever the process dies. `MembershipStore` calls it at the start of every write
    transaction (and so before every read) while one waits; returns the members added."""
    lock_upload_members(store, connection)
    batches = tables.upload_batches
    waiting = connection.execute(
        sa.select(batches.c.batch_id, batches.c.audience_key, batches.c.received_at)
        .where(batches.c.members.is_not(None))
        .order_by(batches.c.batch_id)
    ).all()
    added = 0
    for batch_id, audience_key, received_at in waiting:
        data = connection.execute(
            sa.select(batches.c.members).where(batches.c.batch_id == batch_id)
        ).scalar_one()
        change = prepare_checked_change(
            audience_key, pl.read_ipc(data), "add", source="upload", occurred_at=received_at
        )
        added += apply_change(store, connection, change).changed
        connection.execute(
            batches.update().where(batches.c.batch_id == batch_id).values(members=None)
        )
    return added


def apply_queued_uploads(store: MembershipStore, connection) -> int:
    """Apply queued uploads' identify patches inside the caller's write transaction, oldest first,
    and remove their batches in it (so each applies exactly once, whenever the process dies);
    returns how many users they identified. Only batches whose members are written: the write
    transaction wrote those that waited when it began. `lock_profiles` calls it: call that instead."""
    batches = tables.upload_batches
    queued = connection.execute(
        sa.select(batches.c.batch_id)
        .where(batches.c.members.is_(None))
        .order_by(batches.c.batch_id)
    ).scalars()
    identified = 0
    for batch_id in list(queued):
        data = connection.execute(
            sa.select(batches.c.rows).where(batches.c.batch_id == batch_id)
        ).scalar_one()
        rows = pl.read_ipc(data)
        if rows.height:
            identified += _identify_rows(store, connection, upload_patches(rows))
        connection.execute(batches.delete().where(batches.c.batch_id == batch_id))
    return identified


def apply_uploads(store: MembershipStore) -> int:
    """Write what journaled uploads wait for: their members and events in one transaction (which
    any write or read would do first anyway), then their identify patches in another (after an
    upload's answer, and when a service starts); returns the users identified."""
    batches = tables.upload_batches
    if store.scalar(sa.select(sa.func.count()).select_from(batches)) == 0:
        return 0
    with store.engine.begin() as connection:
        # (None wait by now, unless a PostgreSQL writer journaled one since.)
        settle_uploads(store, connection)
    with store.engine.begin() as connection:
        _lock_profiles_only(store, connection)
        return apply_queued_uploads(store, connection)


def upload_patches(rows: pl.DataFrame) -> pl.DataFrame:
    """The identify patches of an upload's checked rows (`user_id`, `patch`), in the order the
    warehouse's loader applies them: per row its `properties` JSON, then its other cells (dotted
    fields nested); an empty cell is "not given" and a row with none gives no patch."""
    patches = row_patches(rows, empty_cells="skip")
    return (
        pl.concat(
            [
                patches.filter(pl.col("properties_patch").is_not_null()).select(
                    ROW_COLUMN,
                    "user_id",
                    pl.lit(0).alias("part"),
                    pl.col("properties_patch").alias("patch"),
                ),
                patches.filter(pl.col("columns_patch") != "{}").select(
                    ROW_COLUMN,
                    "user_id",
                    pl.lit(1).alias("part"),
                    pl.col("columns_patch").alias("patch"),
                ),
            ]
        )
        .sort(ROW_COLUMN, "part")
        .select("user_id", "patch")
    )


WATERMARK = "users_published_through"


def publish_changed_users(store: MembershipStore, warehouse) -> int:
    """Publish the warehouse users that changed since the last publication (all, the first time)."""
    markers = tables.store_markers
    since = store.scalar(sa.select(markers.c.value).where(markers.c.name == WATERMARK))
    through = warehouse.execute("select max(updated_at) from raw.users").fetchall()[0][0]
    if through is None:
        return 0
    published = publish_warehouse_users(store, warehouse, since)
    with store.engine.begin() as connection:
        connection.execute(markers.delete().where(markers.c.name == WATERMARK))
        connection.execute(markers.insert().values(name=WATERMARK, value=through.isoformat()))
    return published


IDENTIFY_SOURCE = "identify"


def identify_queue_waiting(store) -> tuple[int, int | None]:
    """How many identify calls wait in the store's queue for the `users` asset, and the newest
    one's id (None when none wait). Reads only the queue's index of waiting patches."""
    patches = tables.user_patches
    with store.read_engine.connect() as connection:
        waiting, newest = connection.execute(
            sa.select(sa.func.count(), sa.func.max(patches.c.patch_id)).where(
                patches.c.loaded == sa.false()
            )
        ).one()
        # An upload whose patches are not applied yet counts as its rows.
        uploads = connection.execute(
            sa.select(sa.func.coalesce(sa.func.sum(tables.upload_batches.c.row_count), 0))
        ).scalar()
    # And identifies journaled by an API that has not applied them (it died): the load applies them.
    journal = journal_of(store)
    journaled = journal.waiting(store) if journal is not None else 0
    return waiting + uploads + journaled, newest


def load_identify_queue(
    connection: duckdb.DuckDBPyConnection, store, loaded_at: datetime
) -> LoadResult:
    """Load identify calls queued in the membership store (API, uploads) as a stream source."""
    apply_uploads(store)  # an upload's patches join the queue first, in the order they came
    apply_journal(store)  # and identifies the API journaled and had not applied (it died)
    patches = tables.user_patches
    rows = store.rows(
        sa.select(patches.c.patch_id, patches.c.user_id, patches.c.patch)
        .where(patches.c.loaded == sa.false())
        .order_by(patches.c.patch_id)
    )
    ensure_user_tables(connection)
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
    apply_patch_queue(connection, store, patches, rows, load, "users", "user_id", loaded_at, totals)
    return LoadResult.from_totals(IDENTIFY_SOURCE, totals)


def apply_patch_queue(
    connection,
    store: MembershipStore,
    patches: sa.Table,
    rows: list[dict],
    load,
    table: str,
    id_column: str,
    loaded_at: datetime,
    totals: dict[str, int],
) -> None:
    """Apply queued patches (identify or tenant writes) in the order received: runs of patches go
    to `load`, and a deletion (the patch `null`) tombstones its row of `raw.<table>` between the
    patches before and after it; then the patches are marked loaded. Loading is idempotent (the
    same patches merge to the same rows), so marking them after the warehouse committed loses
    nothing if the process dies in between. `table` and `id_column` are the engine's own names."""
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
                f"update raw.{table} set deleted_at = $at, updated_at = $at, properties = '{{}}' "
                f"where {id_column} = $id and deleted_at is null",
                {"at": loaded_at, "id": row[id_column]},
            ).fetchall()[0][0]
        )
    if batch or not rows:
        load(batch)
    loaded = [row["patch_id"] for row in rows]
    with store.engine.begin() as store_connection:
        for start in range(0, len(loaded), 500):
            store_connection.execute(
                patches.update()
                .where(patches.c.patch_id.in_(loaded[start : start + 500]))
                .values(loaded=True)
            )
