"""The operational membership store: events, current membership, held batches and deliveries.

Other processes (the delivery loop, the API, people releasing held batches) read and write it while
a pipeline run holds the DuckDB file, so it lives in its own database: SQLite in WAL mode by default
(`data/store.sqlite`), PostgreSQL in production, through SQLAlchemy Core so the SQL is the same.
Every write is idempotent: events and deliveries are keyed by deterministic ids and inserted with
"on conflict do nothing", so publishing the same events twice changes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from audiences.conditions.compiler import BLANK_TENANT
from audiences.membership.events import MembershipEvent

metadata = sa.MetaData()

membership_events = sa.Table(
    "membership_events",
    metadata,
    # Unique, but kept unique through the natural key below rather than an index of its own: a
    # hash is random, so an index on it made every event write touch a random page (half the
    # cost of a static add). Stores created before keep event_id as their primary key.
    sa.Column("event_id", sa.String(64), nullable=False),
    # The warehouse outbox's order for evaluated audiences; null for static audiences' events,
    # which are written here directly.
    sa.Column("sequence", sa.BigInteger),
    sa.Column("audience_key", sa.String(255), nullable=False),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("tenant", sa.String(255)),
    sa.Column("event_type", sa.String(16), nullable=False),  # entered | exited
    sa.Column("occurred_at", sa.String(32), nullable=False),  # the evaluation time, ISO 8601 UTC
    sa.Column("audience_version", sa.String(64)),
    sa.Column("entry_number", sa.Integer, nullable=False),
    sa.Column("is_backfill", sa.Boolean, nullable=False, default=False),
    sa.Column("batch_id", sa.String(64)),  # set when a circuit breaker held the run's events
    sa.Column("published_at", sa.String(32), nullable=False),
    # False until workflow triggers were considered for the event (static events wait for the next
    # pipeline run, which knows the users' properties).
    sa.Column(
        "triggers_processed", sa.Boolean, nullable=False, default=True, server_default=sa.true()
    ),
    sa.Column(
        "source", sa.String(32), nullable=False, default="evaluation", server_default="evaluation"
    ),
    sa.Index("membership_events_by_audience", "audience_key", "occurred_at"),
)
# An event's identity: (user, audience, tenant, entered or exited, entry number), exactly what its
# id hashes, so "insert, ignore duplicates" keeps publishing idempotent. It also serves a user's
# events and a member's earlier entries (read for every static add and remove).
sa.Index(
    "membership_events_identity",
    membership_events.c.user_id,
    membership_events.c.audience_key,
    sa.func.coalesce(membership_events.c.tenant, sa.literal_column("''")),
    membership_events.c.event_type,
    membership_events.c.entry_number,
    unique=True,
)
# Static audiences' events whose workflow triggers were not considered yet.
sa.Index(
    "membership_events_pending_triggers",
    membership_events.c.occurred_at,
    sqlite_where=membership_events.c.triggers_processed == sa.false(),
    postgresql_where=membership_events.c.triggers_processed == sa.false(),
)

# Indexes of older stores that newer ones replace.
OBSOLETE_INDEXES = ("membership_events_by_user", "membership_events_by_member")

# Current members, one row per (audience, user, tenant); `tenant_key` is the tenant or '' so the
# primary key treats "no tenant" as one value on every database.
audience_members = sa.Table(
    "audience_members",
    metadata,
    sa.Column("audience_key", sa.String(255), primary_key=True),
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column("tenant_key", sa.String(255), primary_key=True),
    sa.Column("tenant", sa.String(255)),
    sa.Column("added_at", sa.String(32), nullable=False),
    # A user's memberships, which real time reads for each user it evaluates.
    sa.Index("audience_members_by_user", "user_id"),
    # On SQLite the rows live in the primary key's B-tree: one tree to update per change, not two.
    sqlite_with_rowid=False,
)

held_batches = sa.Table(
    "held_batches",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("audience_key", sa.String(255), nullable=False),
    sa.Column("evaluated_at", sa.String(32), nullable=False),
    sa.Column("entered", sa.Integer, nullable=False),
    sa.Column("exited", sa.Integer, nullable=False),
    sa.Column("audience_size", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # held | released | discarded
    sa.Column("decided_at", sa.String(32)),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("delivery_id", sa.String(64), primary_key=True),
    sa.Column("event_id", sa.String(64)),
    sa.Column("broadcast_id", sa.String(64)),
    sa.Column("workflow_key", sa.String(255), nullable=False),
    sa.Column("sink", sa.String(255), nullable=False),
    sa.Column("audience_key", sa.String(255), nullable=False),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("tenant", sa.String(255)),
    sa.Column("payload", sa.Text, nullable=False),
    # pending | delivered | dead | held | discarded
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("next_attempt_at", sa.String(32), nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("batch_id", sa.String(64)),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("delivered_at", sa.String(32)),
    # The webhook id of the message a batching sink first sent the delivery in: kept for life, so a
    # retry goes out as the same batch under the same id (null: the delivery id is its own).
    sa.Column("message_id", sa.String(64)),
    # The claim of the worker sending the delivery, and when its lease ends (ISO 8601 UTC): another
    # worker takes the delivery only when it is unclaimed or the lease has ended.
    sa.Column("claimed_by", sa.String(64)),
    sa.Column("claimed_until", sa.String(32)),
    # The delivery loop's query: due pending rows across sinks, oldest first.
    sa.Index("deliveries_due", "status", "next_attempt_at", "created_at", "delivery_id"),
    sa.Index("deliveries_by_batch", "batch_id"),
    sa.Index("deliveries_by_message", "message_id"),
    # A recipient's earlier pending deliveries to a sink, which its next one waits for (the loop's
    # `first_of_its_recipient`).
    sa.Index("deliveries_by_recipient", "user_id", "audience_key", "sink", "status", "created_at"),
)


def new_delivery(
    delivery_id: str,
    *,
    workflow_key: str,
    sink: str,
    audience_key: str,
    user_id: str,
    tenant: str | None,
    payload: str,
    stamp: str,
    event_id: str | None = None,
    broadcast_id: str | None = None,
    status: str = "pending",
    batch_id: str | None = None,
) -> dict:
    """A `deliveries` row as it is first queued (for an event's trigger or a broadcast's member):
    due at once, no attempts yet. The one place such rows are built."""
    return {
        "delivery_id": delivery_id,
        "event_id": event_id,
        "broadcast_id": broadcast_id,
        "workflow_key": workflow_key,
        "sink": sink,
        "audience_key": audience_key,
        "user_id": user_id,
        "tenant": tenant,
        "payload": payload,
        "status": status,
        "attempts": 0,
        "next_attempt_at": stamp,
        "last_error": None,
        "batch_id": batch_id,
        "created_at": stamp,
        "delivered_at": None,
    }


# Each rate-limited sink's token bucket, shared by every worker delivering from this store: the
# tokens it held at `updated_at` (seconds on the workers' wall clock), for `rate` per second.
sink_rate_limits = sa.Table(
    "sink_rate_limits",
    metadata,
    sa.Column("sink", sa.String(255), primary_key=True),
    sa.Column("rate", sa.Float, nullable=False),
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# Identify calls received while the warehouse may be busy; the `users` asset loads them.
user_patches = sa.Table(
    "user_patches",
    metadata,
    sa.Column("patch_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("patch", sa.Text, nullable=False),  # a JSON object, Knock identify semantics
    sa.Column("received_at", sa.String(32), nullable=False),
    sa.Column("loaded", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Index("user_patches_waiting", "loaded", "patch_id"),
    # A user's newest patch, which real time reads for each user it evaluates.
    sa.Index("user_patches_by_user", "user_id", "patch_id"),
)

# The uploads' journal (`store/profiles.py`): an upload is answered once its checked rows and its
# members are committed here as one batch (Arrow IPC). Its members and their events are written
# right after, before any other write or read of the store sees it (`settle_uploads`, which every
# transaction and every read connection of `MembershipStore` runs first while `members` is set);
# then its identify patches go to the profiles and the identify queue, in the order batches came.
upload_batches = sa.Table(
    "upload_batches",
    metadata,
    sa.Column("batch_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("audience_key", sa.String(255), nullable=False),
    # When the upload was answered: its events' time and its members' `added_at`.
    sa.Column("received_at", sa.String(32), nullable=False),
    sa.Column("row_count", sa.Integer, nullable=False),
    sa.Column("rows", sa.LargeBinary, nullable=False),
    # The members (`user_id`, `tenant`) while they and their events wait to be written; null once
    # written (and in batches of stores from before uploads were journaled, written at once).
    sa.Column("members", sa.LargeBinary),
)

# What each warehouse sync last wrote, so the next sync writes only the difference.
sync_state = sa.Table(
    "sync_state",
    metadata,
    sa.Column("sync_name", sa.String(255), primary_key=True),
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column("tenant_key", sa.String(255), primary_key=True),
)

# Static audiences created through the API or uploads, beside those defined in files.
static_audiences = sa.Table(
    "static_audiences",
    metadata,
    sa.Column("audience_key", sa.String(255), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)

# The users as the API sees them: identify calls applied at once (read-your-writes), and the
# warehouse's users published after each load (`audiences.store.profiles`).
user_profiles = sa.Table(
    "user_profiles",
    metadata,
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column(
        "properties", sa.Text, nullable=False
    ),  # a JSON object: name, email, ..., custom properties
    sa.Column("updated_at", sa.String(32), nullable=False),
    sa.Column("deleted_at", sa.String(32)),
)

# Knock's tenants, set through the API (`PUT /v1/tenants/{id}`): one row per tenant, in Knock's
# shape (`name`, custom `properties`, `settings`), so a warehouse source can read them as they are.
tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("tenant_id", sa.String(255), primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("properties", sa.Text, nullable=False),  # a JSON object: the custom properties
    sa.Column("settings", sa.Text),  # a JSON object: branding, preference_set
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.String(32), nullable=False),
)

# Tenant writes waiting for the warehouse (`raw.tenants`), as `user_patches` are for users: each
# `PUT /v1/tenants/{id}` queues its patch (Knock's tenant object without `id`), a delete queues
# `null`; the `users` asset applies them in order after the tenants sources.
tenant_patches = sa.Table(
    "tenant_patches",
    metadata,
    sa.Column("patch_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(255), nullable=False),
    sa.Column("patch", sa.Text, nullable=False),
    sa.Column("received_at", sa.String(32), nullable=False),
    sa.Column("loaded", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Index("tenant_patches_waiting", "loaded", "patch_id"),
)

# Bulk identify and delete (`POST /v1/users/bulk/...`): each request is queued here with its
# items and processed by the API's worker (api/bulk.py), which reports progress and per-item
# errors in Knock's `BulkOperation` shape.
bulk_operations = sa.Table(
    "bulk_operations",
    metadata,
    sa.Column("operation_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),  # users.identify | users.delete
    sa.Column("status", sa.String(16), nullable=False),  # queued | processing | completed | failed
    sa.Column("items", sa.Text, nullable=False),  # a JSON array: the users, or their ids
    sa.Column("estimated_total_rows", sa.Integer, nullable=False),
    sa.Column("processed_rows", sa.Integer, nullable=False, default=0),
    sa.Column("success_count", sa.Integer, nullable=False, default=0),
    sa.Column("error_count", sa.Integer, nullable=False, default=0),
    sa.Column("error_items", sa.Text, nullable=False, default="[]"),  # [{"id", "message"}]
    sa.Column("claimed_by", sa.String(64)),
    sa.Column("claimed_until", sa.String(32)),
    sa.Column("inserted_at", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.String(32), nullable=False),
    sa.Column("started_at", sa.String(32)),
    sa.Column("completed_at", sa.String(32)),
    sa.Column("failed_at", sa.String(32)),
)
sa.Index("bulk_operations_by_status", bulk_operations.c.status, bulk_operations.c.inserted_at)

# Small named values the engine keeps between runs (e.g. how far warehouse users were published).
store_markers = sa.Table(
    "store_markers",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Secret keys of the HTTP API, one set per environment (each environment has its own store), kept
# as SHA-256 hashes: a key is shown once, when it is created.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("environment", sa.String(64), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("revoked_at", sa.String(32)),
)

# First answers to writes sent with an `Idempotency-Key`, replayed for 24 hours.
idempotent_requests = sa.Table(
    "idempotent_requests",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("idempotency_key", sa.String(255), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("status_code", sa.Integer),  # null while the first request is in progress
    sa.Column("body", sa.Text),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)

# When a workflow trigger was first seen: events before it never trigger it (no backfill).
workflow_triggers = sa.Table(
    "workflow_triggers",
    metadata,
    sa.Column("workflow_key", sa.String(255), primary_key=True),
    sa.Column("audience_key", sa.String(255), nullable=False),
    sa.Column("first_seen_at", sa.String(32), nullable=False),
    # Only events after this outbox sequence trigger the workflow.
    sa.Column("first_event_sequence", sa.BigInteger, nullable=False),
)

# Recipients a frequency-limited trigger has already fired for.
trigger_recipients = sa.Table(
    "trigger_recipients",
    metadata,
    sa.Column("workflow_key", sa.String(255), primary_key=True),
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column("tenant_key", sa.String(255), primary_key=True),
    sa.Column("delivery_id", sa.String(64), nullable=False),
)

# Membership events the API's real-time path recorded (`workflows/realtime.py`), with the identify
# patch they were decided on: the pipeline's diff imports into its history those whose patch it has
# loaded (`imported_at` set then), so its own evaluation neither repeats nor contradicts them.
realtime_events = sa.Table(
    "realtime_events",
    metadata,
    sa.Column("event_id", sa.String(64), primary_key=True),
    sa.Column("audience_key", sa.String(255), nullable=False),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("event_type", sa.String(16), nullable=False),
    sa.Column("entry_number", sa.Integer, nullable=False),
    sa.Column("occurred_at", sa.String(32), nullable=False),
    # The user's newest queued identify patch when the decision was made.
    sa.Column("patch_id", sa.Integer, nullable=False),
    sa.Column("imported_at", sa.String(32)),
    sa.Index("realtime_events_to_import", "imported_at", "patch_id"),
)

DEFAULT_URL = "sqlite:///data/store.sqlite"


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# The characters BLANK_TENANT allows: stripping them is the same test as the pattern, and several
# times faster on the API's path (a thousand members per request).
_BLANK_CHARACTERS = "".join(c for c in map(chr, range(128)) if re.fullmatch(BLANK_TENANT, c))


def normalize_tenant(tenant: str | None) -> str | None:
    """A member's tenant as stored: a blank or whitespace-only tenant is no tenant (None).

    Every write of a member goes through it (API, uploads, syncs, the CLI, through
    `store.members.prepare_change`); `compiler.normalized_tenant` is the same rule in SQL.
    Other tenants are kept as given."""
    if tenant is None or not tenant.strip(_BLANK_CHARACTERS):
        return None
    return tenant


def tenant_key(tenant: str | None) -> str:
    """The tenant as a key column: the normalized tenant, or '' for none (primary keys cannot hold
    null)."""
    return normalize_tenant(tenant) or ""


# -- waking the delivery workers ------------------------------------------------------------------
# Whatever queues deliveries (inserts pending rows, or makes rows pending) says so with
# `deliveries_queued(connection)` inside its transaction, and the delivery workers wake when it
# commits: on PostgreSQL by a NOTIFY on this channel (transactional, so sent at the commit, to every
# process LISTENing), on SQLite by calling the wakers registered in this process for the store's URL
# (other processes find the rows by a short poll, `delivery/worker.py`).
DELIVERIES_CHANNEL = "audiences_deliveries"
_QUEUED = "audiences.deliveries_queued"
_wakers: dict[str, list[Callable[[], None]]] = {}
_wakers_lock = threading.Lock()


def deliveries_queued(connection: sa.Connection) -> None:
    """Say that this transaction queued deliveries: the delivery workers wake when it commits."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_notify(DELIVERIES_CHANNEL, "")))
    else:
        connection.info[_QUEUED] = True


def on_deliveries_queued(url: str, wake: Callable[[], None]) -> Callable[[], None]:
    """Call `wake()` each time a transaction of this process that queued deliveries in the SQLite
    store at `url` commits. Returns the function that stops the calls."""
    with _wakers_lock:
        _wakers.setdefault(url, []).append(wake)

    def stop() -> None:
        with _wakers_lock:
            listeners = _wakers.get(url, [])
            if wake in listeners:
                listeners.remove(wake)

    return stop


def _committing_then_waking(url: str, do_commit: Callable) -> Callable:
    """The store engine's dialect `do_commit`, then the wake of this process's delivery workers
    when the transaction queued deliveries: after the commit, not at SQLAlchemy's `commit` event
    (which comes before it), so that a woken worker's first read, which takes no lock, sees the
    new rows. (A wake before the commit raced with that read: the worker found nothing and slept
    until its poll.)"""

    def commit(dbapi_connection) -> None:
        do_commit(dbapi_connection)
        _wake_workers(url, dbapi_connection)  # its `info` is the connection's

    return commit


def _wake_workers(url: str, connection) -> None:
    if connection.info.pop(_QUEUED, False):
        with _wakers_lock:
            listeners = list(_wakers.get(url, ()))
        for wake in listeners:
            wake()


# The PostgreSQL advisory lock `MembershipStore.create` holds while it creates and upgrades tables
# (a constant of the database: "audience" in ASCII).
_CREATE_LOCK = int.from_bytes(b"audience", "big")


class MembershipStore:
    """A connection to the operational store; `create()` makes its tables (idempotent)."""

    def __init__(self, url: str):
        self.url = url
        connect_args = {"timeout": SQLITE_WRITE_WAIT_SECONDS} if url.startswith("sqlite") else {}
        database = sa.engine.make_url(url).database
        writers = None
        if url.startswith("sqlite") and database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            writers = _WriterTurns(Path(database).expanduser())
        self.engine = sa.create_engine(url, connect_args=connect_args, future=True)
        # Reads go through their own pool, so that on SQLite they never wait for a writer.
        self.read_engine = sa.create_engine(url, connect_args=connect_args, future=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            sa.event.listen(self.read_engine, "connect", _sqlite_pragmas)
            # A write transaction takes SQLite's write lock when it begins ("begin immediate"), so
            # two processes writing at once wait for each other (busy timeout) instead of failing
            # with "database is locked" when a read transaction tries to become a write.
            sa.event.listen(self.engine, "connect", _sqlite_manual_transactions)
            if writers is not None:
                # SQLite's busy handler is not fair: a writer that has waited a while retries every
                # 100 ms, so writers that commit back to back (API clients) can starve it past its
                # timeout. Writers first take turns on a lock file, which a waiter polls every
                # millisecond or two, so it gets the lock in the first gap between other writers.
                sa.event.listen(self.engine, "begin", writers.begin)
                sa.event.listen(self.engine, "commit", writers.give_back)
                sa.event.listen(self.engine, "rollback", writers.give_back)
            else:
                sa.event.listen(self.engine, "begin", _begin_immediate)
            self.engine.dialect.do_commit = _committing_then_waking(
                url, self.engine.dialect.do_commit
            )
            sa.event.listen(self.engine, "rollback", lambda c: c.info.pop(_QUEUED, None))
        # An upload is answered once it is journaled (`upload_batches`); its members and events are
        # written before anything else reads or writes the store: every write transaction first
        # writes those that wait (after the listeners above, which take SQLite's write lock), and a
        # read connection that finds one waiting has a write transaction write it first.
        self._writers = writers
        self._journal_ready = False
        self._in_transaction = threading.local()  # this thread's open write transactions
        sa.event.listen(self.engine, "begin", self._settle_uploads_in)
        sa.event.listen(self.engine, "commit", self._transaction_ended)
        sa.event.listen(self.engine, "rollback", self._transaction_ended)
        sa.event.listen(self.read_engine, "checkout", self._settle_uploads_before_read)

    def _open_transactions(self) -> set[int]:
        if not hasattr(self._in_transaction, "ids"):
            self._in_transaction.ids = set()
        return self._in_transaction.ids

    def _transaction_ended(self, connection) -> None:
        self._open_transactions().discard(id(connection))

    def _uploads_waiting(self, cursor) -> bool:
        """Whether an answered upload's members wait to be written (`cursor`: a DBAPI cursor of
        either engine). A store whose `upload_batches` has no `members` column yet (not created by
        this version) has none."""
        if not self._journal_ready:
            cursor.execute(
                "select 1 from pragma_table_info('upload_batches') where name = 'members'"
                if self.engine.dialect.name == "sqlite"
                else "select 1 from information_schema.columns where table_schema = "
                "current_schema() and table_name = 'upload_batches' and column_name = 'members'"
            )
            self._journal_ready = cursor.fetchone() is not None
            if not self._journal_ready:
                return False
        cursor.execute("select 1 from upload_batches where members is not null limit 1")
        return cursor.fetchone() is not None

    def _settle_uploads_in(self, connection) -> None:
        """At the start of every write transaction: write the members and events of answered
        uploads that wait (`profiles.settle_uploads`), so that no write comes between an upload's
        answer and its members."""
        transactions = self._open_transactions()
        if transactions:  # a transaction of this thread already settled, or is settling
            transactions.add(id(connection))
            return
        transactions.add(id(connection))
        try:
            cursor = connection.connection.dbapi_connection.cursor()
            try:
                waiting = self._uploads_waiting(cursor)
            finally:
                cursor.close()
            if waiting:
                from audiences.store.profiles import settle_uploads  # it writes through this module

                settle_uploads(self, connection)
        except BaseException:
            # The transaction never began for SQLAlchemy: end it and give back the write turn.
            transactions.discard(id(connection))
            connection.connection.dbapi_connection.rollback()
            if self._writers is not None:
                self._writers.give_back(connection)
            raise

    def _settle_uploads_before_read(self, dbapi_connection, _record, _proxy) -> None:
        """Before every read connection is handed out: if an answered upload's members wait, a
        write transaction writes them first (`_settle_uploads_in`), so that every read sees an
        upload from its answer on. A thread inside a write transaction skips this: that
        transaction settled when it began, and its own lock would make the wait endless."""
        if self._open_transactions():
            return
        cursor = dbapi_connection.cursor()
        try:
            waiting = self._uploads_waiting(cursor)
        finally:
            cursor.close()
            if self.engine.dialect.name != "sqlite":
                dbapi_connection.rollback()
        if waiting:
            with self.engine.begin():
                pass  # its start writes them

    def create(self) -> MembershipStore:
        """Create missing tables, and add columns that newer versions of the engine introduced.

        One transaction, which processes starting at once on a new store (two delivery workers,
        the API and a run) take in turn: SQLite's write lock; on PostgreSQL an advisory lock, since
        two `create table`s of one name there fail on the catalog's keys rather than wait."""
        with self.engine.begin() as connection:
            if self.engine.dialect.name == "postgresql":
                connection.exec_driver_sql("select pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
            metadata.create_all(connection)
            self._drop_event_id_key(connection)
            inspector = sa.inspect(connection)
            for table in metadata.sorted_tables:
                present = {column["name"] for column in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name in present:
                        continue
                    kind = column.type.compile(dialect=self.engine.dialect)
                    default = (
                        f" default {column.server_default.arg.compile(dialect=self.engine.dialect)}"
                        if column.server_default is not None
                        and not isinstance(column.server_default.arg, str)
                        else (
                            f" default '{column.server_default.arg}'"
                            if column.server_default is not None
                            else ""
                        )
                    )
                    quote = self.engine.dialect.identifier_preparer.quote
                    connection.exec_driver_sql(
                        f"alter table {quote(table.name)} add column {quote(column.name)} {kind}{default}"
                    )
                # Indexes after columns: a new index may read a column added just above.
                indexes = self._index_names(connection, table.name)
                for name in indexes & set(OBSOLETE_INDEXES):
                    connection.exec_driver_sql(
                        f"drop index {self.engine.dialect.identifier_preparer.quote(name)}"
                    )
                for index in table.indexes:
                    if index.name not in indexes:
                        index.create(connection)
        return self

    def _drop_event_id_key(self, connection) -> None:
        """Stores made before events were identified by their natural key have `event_id` as the
        primary key of membership_events: an index on a random hash that every event write touches
        (it made publishing about twice as slow). Drop it; the natural-key index replaces it."""
        events = membership_events.name
        if self.engine.dialect.name != "sqlite":
            connection.exec_driver_sql(
                f"alter table {events} drop constraint if exists {events}_pkey"
            )
            return
        table_sql = (
            connection.exec_driver_sql(
                "select sql from sqlite_master where type = 'table' and name = ?", (events,)
            ).scalar()
            or ""
        )
        if "PRIMARY KEY (event_id)" not in table_sql:
            return
        # SQLite cannot drop a primary key: copy the rows into a table made without it (columns the
        # old table lacks take their defaults). Its indexes are created again by `create`, after this.
        rebuilt = membership_events.to_metadata(sa.MetaData(), name=f"{events}__rebuilt")
        for index in list(rebuilt.indexes):
            rebuilt.indexes.discard(index)
        rebuilt.create(connection)
        present = {row[1] for row in connection.exec_driver_sql(f"pragma table_info({events})")}
        columns = ", ".join(
            self.engine.dialect.identifier_preparer.quote(column.name)
            for column in membership_events.columns
            if column.name in present
        )
        connection.exec_driver_sql(
            f"insert into {rebuilt.name} ({columns}) select {columns} from {events}"
        )
        connection.exec_driver_sql(f"drop table {events}")
        connection.exec_driver_sql(f"alter table {rebuilt.name} rename to {events}")

    def _index_names(self, connection, table_name: str) -> set[str]:
        # Read from the catalog: SQLAlchemy's reflection skips expression indexes (with a warning).
        if self.engine.dialect.name == "sqlite":
            sql = "select name from sqlite_master where type = 'index' and tbl_name = ?"
        else:
            sql = "select indexname from pg_indexes where tablename = %s and schemaname = current_schema()"
        return {row[0] for row in connection.exec_driver_sql(sql, (table_name,))}

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()

    def insert_ignoring_duplicates(self, connection, table: sa.Table, rows: Sequence[dict]) -> int:
        """Insert rows, skipping those whose primary key exists; returns how many were new."""
        if not rows:
            return 0
        dialect = self.engine.dialect.name
        module = sqlite if dialect == "sqlite" else postgresql if dialect == "postgresql" else None
        if module is None:
            raise NotImplementedError(
                f"the membership store supports SQLite and PostgreSQL, not {dialect}"
            )
        if dialect == "sqlite":
            # Tuples through the driver (`insert_rows`): several times faster than SQLAlchemy's
            # per-row parameter handling, which matters when a first evaluation publishes millions.
            # "on conflict do nothing" skips only rows whose key exists ("insert or ignore" would
            # also swallow NOT NULL and CHECK violations).
            columns = list(rows[0])
            inserted = max(
                self.insert_rows(
                    connection,
                    table,
                    columns,
                    [tuple(row[column] for column in columns) for row in rows],
                ),
                0,
            )
            if inserted and table is deliveries:
                deliveries_queued(connection)
            return inserted
        # PostgreSQL drivers report no row count for executemany; RETURNING the key counts new rows.
        key = next(iter(table.primary_key.columns or table.columns))
        inserted = 0
        for start in range(0, len(rows), 5000):
            statement = module.insert(table).on_conflict_do_nothing().returning(key)
            inserted += len(connection.execute(statement, list(rows[start : start + 5000])).all())
        if inserted and table is deliveries:
            deliveries_queued(connection)
        return inserted

    @property
    def placeholder(self) -> str:
        """The driver's parameter marker, for the few statements written as plain SQL."""
        return "?" if self.engine.dialect.name == "sqlite" else "%s"

    def insert_rows(
        self, connection, table: sa.Table, columns: Sequence[str], rows: Sequence[tuple]
    ) -> int:
        """Insert tuples (in `columns` order) through the driver, skipping rows whose key exists;
        returns how many were new on SQLite (PostgreSQL's executemany reports no count: -1)."""
        if not rows:
            return 0
        quote = self.engine.dialect.identifier_preparer.quote
        marks = "(" + ", ".join([self.placeholder] * len(columns)) + ")"
        head = f"insert into {quote(table.name)} ({', '.join(quote(column) for column in columns)}) values "
        if self.engine.dialect.name != "sqlite":
            return connection.exec_driver_sql(
                f"{head}{marks} on conflict do nothing", list(rows)
            ).rowcount
        # On SQLite, multi-row statements: the driver steps once per statement rather than once per
        # row, and each step hands Python's lock to other threads and waits to get it back, which
        # under the API's load cost more than the inserts themselves.
        per_statement = max(1, 32_000 // len(columns))
        inserted = 0
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            sql = f"{head}{', '.join([marks] * len(chunk))} on conflict do nothing"
            inserted += connection.exec_driver_sql(sql, tuple(chain.from_iterable(chunk))).rowcount
        return inserted

    def scalar(self, statement) -> object:
        with self.read_engine.connect() as connection:
            return connection.execute(statement).scalar()

    def rows(self, statement) -> list[dict]:
        with self.read_engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(statement)]


# How long a write to a SQLite store waits for other writers before it fails with "database is
# locked". A first publication of millions of members holds the lock for a while; waiting is cheap.
SQLITE_WRITE_WAIT_SECONDS = 120


class StoreBusy(RuntimeError):
    """A write to a SQLite store waited `SQLITE_WRITE_WAIT_SECONDS` for other writers."""


class _WriterTurns:
    """Writers to one SQLite file take turns, across threads and processes, before SQLite's own
    write lock: a writer holds `<file>-write.lock` (an advisory `flock`) for its transaction, and to
    get it must first hold `<file>-write.queue`, which it keeps while it waits. So a writer that has
    just committed and writes again queues behind the one already waiting instead of barging in
    ahead of it, and no writer waits longer than the writers ahead of it take."""

    def __init__(self, database: Path):
        self.lock = database.with_name(database.name + "-write.lock")
        self.queue = database.with_name(database.name + "-write.queue")
        self.held: dict[int, int] = {}  # id(sqlalchemy connection) -> descriptor holding the lock
        self.guard = threading.Lock()

    def begin(self, connection) -> None:
        self.take(connection)
        try:
            _begin_immediate(connection)
        except BaseException:
            self.give_back(connection)
            raise

    def take(self, connection) -> None:
        self.give_back(connection)  # a turn that a failed transaction left behind
        deadline = time.monotonic() + SQLITE_WRITE_WAIT_SECONDS
        queue = self._hold(self.queue, deadline)
        try:
            lock = self._hold(self.lock, deadline)
        finally:
            os.close(queue)  # closing a descriptor releases its flock
        with self.guard:
            self.held[id(connection)] = lock

    def give_back(self, connection) -> None:
        with self.guard:
            descriptor = self.held.pop(id(connection), None)
        if descriptor is not None:
            os.close(descriptor)

    def _hold(self, path: Path, deadline: float) -> int:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        pause = 0.0002
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return descriptor
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(descriptor)
                    raise
            if time.monotonic() > deadline:
                os.close(descriptor)
                raise StoreBusy(
                    f"the store {path.name.rsplit('-write.', 1)[0]} is busy: other writers held it "
                    f"for {SQLITE_WRITE_WAIT_SECONDS} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.002)


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("begin immediate")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # 8 KB pages (set before a new store's first table; an existing store keeps its size): fewer
    # pages to write per commit when a thousand members are added at once.
    cursor.execute("pragma page_size = 8192")
    cursor.execute("pragma journal_mode = wal")
    cursor.execute("pragma synchronous = normal")
    cursor.execute(f"pragma busy_timeout = {SQLITE_WRITE_WAIT_SECONDS * 1000}")
    # Checkpoint every 50,000 pages (400 MB of WAL at most) rather than SQLite's 1,000: a page
    # changed by many commits is copied into the database once.
    cursor.execute("pragma wal_autocheckpoint = 50000")
    # A 256 MB page cache: publishing a first evaluation inserts millions of index entries.
    cursor.execute("pragma cache_size = -262144")
    cursor.close()


def _sqlite_manual_transactions(dbapi_connection, _record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own BEGIN is deferred).
    dbapi_connection.isolation_level = None


def apply_membership_changes(
    store: MembershipStore, connection, events: Iterable[MembershipEvent]
) -> None:
    """Make the current-membership table reflect entered / exited events (idempotent)."""
    events = list(events)
    store.insert_rows(
        connection,
        audience_members,
        ("audience_key", "user_id", "tenant_key", "tenant", "added_at"),
        [
            (e.audience_key, e.user_id, tenant_key(e.tenant), e.tenant, e.occurred_at)
            for e in events
            if e.event_type == "entered"
        ],
    )
    exited: dict[str, list[tuple[str, str]]] = {}
    for e in events:
        if e.event_type == "exited":
            exited.setdefault(e.audience_key, []).append((e.user_id, tenant_key(e.tenant)))
    for audience_key, members in exited.items():
        delete_members(store, connection, audience_key, members)


def delete_members(
    store: MembershipStore, connection, audience_key: str, members: Sequence[tuple[str, str]]
) -> None:
    """Remove (user_id, tenant_key) memberships of one audience, a few thousand per statement (see
    `insert_rows`). The `user_id in (...)` lets the database find them through the primary key; the
    pairs alone would make SQLite scan the table."""
    mark = store.placeholder
    for start in range(0, len(members), 3000):
        chunk = members[start : start + 3000]
        users = ", ".join([mark] * len(chunk))
        pairs = ", ".join([f"({mark}, {mark})"] * len(chunk))
        connection.exec_driver_sql(
            f"delete from audience_members where audience_key = {mark} and user_id in ({users}) "
            f"and (user_id, tenant_key) in (values {pairs})",
            (audience_key, *(user_id for user_id, _ in chunk), *chain.from_iterable(chunk)),
        )
