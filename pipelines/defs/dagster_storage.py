"""Dagster's SQLite storage, with its connections kept open between uses (issue 17, item 4).

Dagster 1.x's default storage (`SqliteEventLogStorage`, one SQLite file per run plus an index
file) opens every connection anew: for each event it creates a SQLAlchemy engine, connects,
commits, closes (which checkpoints and removes the write-ahead log) and disposes of the engine,
once for the run's file and once more for the index when the event is a materialization. A run
of the main job stores a few hundred events, so that was seconds of a warm run's fixed cost. The
run storage (`SqliteRunStorage`, one file) did the same for each status change and lookup.

Here each file gets one engine, kept while the storage is used, with one connection per thread
(SQLite connections are bound to their thread). What Dagster guards stays guarded: every use
still holds the storage's lock and runs in its own transaction, and the files stay in WAL mode,
so the web server and other processes read and write them as before. A long-lived process (the
web server, the daemon) touches many runs' files: only the most recently used ones stay open.
The index's tables, which Dagster looks up again with a connection of its own for every
materialization, and the asset table's columns, which it lists for every asset event and read, are
remembered once found (a migration adds them, none removes them). The
run storage's one file gets one engine with SQLAlchemy's default pool for a file (a connection
per concurrent user, handed between threads).

Events can also be stored together (issue 25): Dagster stores each event in transactions of its
own, a materialization in three (the run's file, then the index: the event, its tags and the
asset's row), and its SQL storage's `store_event_batch` is the same loop. At 2,000 audiences a run
stores about 4,000 events for the dbt assets' outputs and 2,000 planned ones when it is created.
While `stored_together` is open on an instance, the events its SQLite storage is given are kept
in memory, in order, and written by Dagster's own `store_event`, one after another, in one
transaction per file: when the block ends, every `EVENTS_PER_TRANSACTION` events, and before any
other use of the storage (a read, from any thread, sees every event stored before it). Only what
is written changes, not what: the same rows, in the same order. A process killed in a block loses
the events not written yet (at most one batch) and leaves none half written: each file's
transaction commits whole or not at all (as before, the run's file commits before the index).
The dbt assets store their outputs' events this way (`build_audiences`), and so does the creation
of a run, its planned materializations (`RunDomain._log_asset_planned_events`), in whichever
process stores them: `audiences run`, the fork server's runs, the daemon and the web server.

Where the patches apply: they change Dagster's classes in the process that applies them, which
loading the code location does (`audiences run`, the fork server and its runs, a code server).
The daemon (schedules, sensors) and the web server (the UI's launches) create runs, and store
their planned materializations, without loading the code location: there the instance applies
them as it is built, the project's `dagster_home/dagster.yaml` naming `AudiencesInstance` as its
`instance_class` (Dagster's instance and default storages; `audiences init` copies the file). An
instance whose event log is not Dagster's SQLite one (PostgreSQL) patches nothing, and a
`dagster.yaml` without the class behaves as Dagster's. It is an instance class rather than an
`event_log_storage` class because the default's `base_dir` is the instance's folder, which a
`dagster.yaml` cannot name (it is copied to every project, `DAGSTER_HOME` may be unset when the
CLI opens `./dagster_home`), while an instance class keeps Dagster's defaults for that folder.

Two costs per materialization go too (issue 25, seventh pass). Dagster serialized each
materialization twice, once as the event's row and again inside the asset's row (its latest
record, `EventLogRecord(storage_id, event)`): the record's text is now made from the event's,
which is what Dagster's serializer gives for it (a test compares them). And for each asset a step
materializes, Dagster records its parents' data versions (provenance) by reading each parent's
latest materialization from the index, deserializing the whole record: `audience_members` reads
2,000 parents that the same step has just materialized. A parent's materialization written from
this storage's kept events is remembered (its index id, data version, run and time, once its
transaction committed), and the step's lookup of a parent this run materialized, unpartitioned,
takes it from there instead of reading it back: the same values the read gives (tested against
Dagster's own lookup). A wipe of an asset, or of the history, forgets it.

Kept events are written as rows (issue 25, eighth pass). Dagster's `store_event` builds a
SQLAlchemy statement for each row it writes (the event in the run's file, the same event in the
index, its indexed tags, the asset's row: five statements for a materialization), and building
and executing them was most of what storing an output cost. `_store_rows` writes the same rows
with the DB-API cursor of the batch's transaction in each file: the values are Dagster's own
(`_event_to_row`, `_tags_for_asset_event`, `_get_asset_entry_values`), converted for SQLite by
the columns' own SQLAlchemy bind processors, in Dagster's order (the asset's row is updated, or
inserted when it has none: what Dagster's insert-then-update leaves). Events it does not know
(run status, asset checks, an asset's failure or freshness) go through Dagster's `store_event`
in their turn, in the same transactions. A test stores the events of real runs both ways on two
instances and compares every table's rows and Dagster's reads. And a run's creation serialized
its execution plan's snapshot three times and each job snapshot it stores twice (2,000 assets
each at 2,000 audiences): while a run is created, each is serialized once
(`_serialize_each_snapshot_once`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from dagster._core.definitions.data_version import extract_data_version_from_entry
from dagster._core.errors import DagsterInvariantViolationError
from dagster._core.event_api import EventLogRecord
from dagster._core.events import (
    ASSET_CHECK_EVENTS,
    ASSET_EVENTS,
    EVENT_TYPE_TO_PIPELINE_RUN_STATUS,
    DagsterEventType,
)
from dagster._core.events.log import EventLogEntry
from dagster._core.instance import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.event_log import sql_event_log
from dagster._core.storage.event_log.schema import (
    AssetEventTagsTable,
    AssetKeyTable,
    SqlEventLogStorageTable,
)
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import SingletonThreadPool

# Files with an open engine per storage: the index and the runs being written or read.
OPEN_FILES = 8
# Events kept by `stored_together` before they are written (one transaction per file): bounds the
# memory they take and what a killed process loses.
EVENTS_PER_TRANSACTION = 1000


def _engines(storage: SqliteEventLogStorage) -> OrderedDict[str, Engine]:
    engines = storage.__dict__.get("_audiences_engines")
    if engines is None:
        engines = storage.__dict__["_audiences_engines"] = OrderedDict()
    return engines


def _engine(storage: SqliteEventLogStorage, shard: str) -> Engine:
    engines = _engines(storage)
    engine = engines.get(shard)
    if engine is not None:
        engines.move_to_end(shard)
        return engine
    engine = create_engine(
        storage.conn_string_for_shard(shard),
        poolclass=SingletonThreadPool,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
    )
    if shard not in storage._initialized_dbs:  # Dagster's own bookkeeping
        storage._initdb(engine)
        storage._initialized_dbs.add(shard)
    engines[shard] = engine
    while len(engines) > OPEN_FILES:
        _, oldest = engines.popitem(last=False)
        oldest.dispose()
    return engine


def _close_all(storage: SqliteEventLogStorage) -> None:
    engines = _engines(storage)
    while engines:
        engines.popitem()[1].dispose()


def reuse_sqlite_connections() -> None:
    """Keep `SqliteEventLogStorage`'s and `SqliteRunStorage`'s engines and connections open per
    file (see the module's text). Idempotent; called when the code location is loaded."""
    if getattr(SqliteEventLogStorage, "_audiences_reuses_connections", False):
        return
    _reuse_run_storage_engine()
    wipe = SqliteEventLogStorage.wipe
    has_table = SqliteEventLogStorage.has_table
    has_asset_key_column = SqliteEventLogStorage._has_asset_key_col_on_connection
    dispose = SqliteEventLogStorage.dispose

    store_event = SqliteEventLogStorage.store_event

    @contextmanager
    def _connect(self: SqliteEventLogStorage, shard: str) -> Iterator[Connection]:
        writing = self.__dict__.get("_audiences_writing")
        if writing is not None and writing.thread == threading.get_ident():
            # Kept events being written: every use joins its file's one transaction.
            yield writing.connection(self, shard)
            return
        with self._db_lock:
            _write_kept(self, store_event)  # what this use reads or writes comes after them
            engine = _engine(self, shard)
            with engine.connect() as connection, connection.begin():
                yield connection

    def store_event_kept(self: SqliteEventLogStorage, event) -> None:
        if not self.__dict__.get("_audiences_batches"):
            store_event(self, event)
            return
        with self._db_lock:
            kept = self.__dict__.setdefault("_audiences_kept", [])
            kept.append(event)
            if len(kept) >= EVENTS_PER_TRANSACTION:
                _write_kept(self, store_event)

    def has_table_remembered(self: SqliteEventLogStorage, table_name: str) -> bool:
        found = self.__dict__.setdefault("_audiences_tables", set())
        if table_name not in found and has_table(self, table_name):
            found.add(table_name)
        return table_name in found

    def has_asset_key_column_remembered(self: SqliteEventLogStorage, connection, column) -> bool:
        # Dagster lists the asset table's columns (SQLAlchemy's inspector) for every asset event it
        # stores and every asset read; a column is added by a migration, never removed.
        found = self.__dict__.setdefault("_audiences_asset_key_columns", set())
        if column not in found and has_asset_key_column(self, connection, column):
            found.add(column)
        return column in found

    def wipe_closing(self: SqliteEventLogStorage) -> None:
        # Dagster removes the files: nothing may keep them open (events kept are written first).
        with self._db_lock:
            _write_kept(self, store_event)
            _close_all(self)
        wipe(self)

    def dispose_closing(self: SqliteEventLogStorage) -> None:
        with self._db_lock:
            _write_kept(self, store_event)
            _close_all(self)
        dispose(self)

    def store_event_batch_together(self: SqliteEventLogStorage, events) -> None:
        with _stored_together(self):
            for event in events:
                self.store_event(event)

    SqliteEventLogStorage._connect = _connect
    SqliteEventLogStorage.store_event = store_event_kept
    SqliteEventLogStorage.store_event_batch = store_event_batch_together
    SqliteEventLogStorage._audiences_store_event = store_event
    SqliteEventLogStorage.has_table = has_table_remembered
    SqliteEventLogStorage._has_asset_key_col_on_connection = has_asset_key_column_remembered
    SqliteEventLogStorage.wipe = wipe_closing
    SqliteEventLogStorage.dispose = dispose_closing
    SqliteEventLogStorage._audiences_reuses_connections = True
    _store_planned_events_together()
    _remember_materializations()
    _serialize_each_event_once()
    _serialize_each_snapshot_once()


class AudiencesInstance(DagsterInstance):
    """Dagster's instance, with its SQLite storage's patches (`reuse_sqlite_connections`) applied
    as it is built: in every process that loads an instance from `dagster_home/dagster.yaml`
    (`instance_class`), the daemon's and the web server's too, which create the runs of the
    schedules, sensors and the UI's launches without loading the code location. Only when its
    event log is Dagster's SQLite one: on any other storage (PostgreSQL) nothing is patched. Its
    storages are Dagster's defaults for the instance's folder, or what `dagster.yaml` names."""

    def __init__(self, *arguments, **keywords) -> None:
        if isinstance(keywords.get("event_storage"), SqliteEventLogStorage):
            reuse_sqlite_connections()
        super().__init__(*arguments, **keywords)

    @classmethod
    def config_schema(cls) -> dict:
        return {}  # no settings of its own

    @staticmethod
    def config_defaults(base_dir: str):
        return InstanceRef.config_defaults(base_dir)


def _reuse_run_storage_engine() -> None:
    @contextmanager
    def connect(self: SqliteRunStorage) -> Iterator[Connection]:
        engine = self.__dict__.get("_audiences_engine")
        if engine is None:
            engine = self.__dict__["_audiences_engine"] = create_engine(self._conn_string)
        with engine.connect() as connection, connection.begin():
            yield connection

    dispose = SqliteRunStorage.dispose

    def dispose_closing(self: SqliteRunStorage) -> None:
        engine = self.__dict__.pop("_audiences_engine", None)
        if engine is not None:
            engine.dispose()
        dispose(self)

    SqliteRunStorage.connect = connect
    SqliteRunStorage.dispose = dispose_closing


class _Writing:
    """The open transactions (one per file) of the thread writing kept events, and the
    materializations they hold (remembered once committed)."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.open: dict[str, tuple[Connection, Any]] = {}
        self.materialized: dict[Any, Materialized] = {}
        self.cursors: dict[str, Any] = {}

    def cursor(self, storage: SqliteEventLogStorage, shard: str):
        """A cursor of the DB-API connection under `shard`'s open transaction (the same
        transaction Dagster's statements of this batch join)."""
        cursor = self.cursors.get(shard)
        if cursor is None:
            connection = self.connection(storage, shard)
            cursor = self.cursors[shard] = connection.connection.dbapi_connection.cursor()
        return cursor

    def connection(self, storage: SqliteEventLogStorage, shard: str) -> Connection:
        if shard not in self.open:
            connection = _engine(storage, shard).connect()
            self.open[shard] = (connection, connection.begin())
        return self.open[shard][0]


def _write_kept(storage: SqliteEventLogStorage, store_event) -> None:
    """Write the events kept so far with Dagster's `store_event`, in order, in one transaction
    per file (files committed in the order first written: the run's, then the index). The
    caller holds the storage's lock."""
    kept = storage.__dict__.get("_audiences_kept")
    if not kept:
        return
    storage.__dict__["_audiences_kept"] = []
    writing = storage.__dict__["_audiences_writing"] = _Writing()
    try:
        for event in kept:
            if _writes_rows(event):
                _store_rows(storage, writing, event)
            else:
                store_event(storage, event)
        for _, transaction in writing.open.values():
            transaction.commit()
        storage.__dict__.setdefault("_audiences_materialized", {}).update(writing.materialized)
    finally:
        storage.__dict__["_audiences_writing"] = None
        for cursor in writing.cursors.values():
            cursor.close()
        for connection, transaction in writing.open.values():
            if transaction.is_active:
                transaction.rollback()
            connection.close()


@contextmanager
def _stored_together(storage: SqliteEventLogStorage) -> Iterator[None]:
    with storage._db_lock:
        storage.__dict__["_audiences_batches"] = storage.__dict__.get("_audiences_batches", 0) + 1
    try:
        yield
    finally:
        with storage._db_lock:
            storage.__dict__["_audiences_batches"] -= 1
            if not storage.__dict__["_audiences_batches"]:
                _write_kept(storage, type(storage)._audiences_store_event)


@contextmanager
def stored_together(instance) -> Iterator[None]:
    """While open, the events `instance` stores into its SQLite event log (`SqliteEventLogStorage`,
    Dagster's default for an instance folder) are written together, one transaction per file (see
    the module's text); any other storage stores them as it always does."""
    storage = getattr(instance, "event_log_storage", None)
    if not (
        isinstance(storage, SqliteEventLogStorage)
        and getattr(SqliteEventLogStorage, "_audiences_reuses_connections", False)
    ):
        yield
        return
    with _stored_together(storage):
        yield


def _store_planned_events_together() -> None:
    """A run's creation stores one planned materialization per asset it selects (2,000 at 2,000
    audiences), each on its own unless `DAGSTER_EVENT_BATCH_SIZE` is set: stored together."""
    from dagster._core.instance.runs.run_domain import RunDomain

    current = RunDomain._log_asset_planned_events
    if getattr(current, "stores_together", False):
        return

    def _log_asset_planned_events(self, *arguments, **keywords):
        with stored_together(self._instance):
            return current(self, *arguments, **keywords)

    _log_asset_planned_events.stores_together = True
    _log_asset_planned_events.__doc__ = current.__doc__
    RunDomain._log_asset_planned_events = _log_asset_planned_events


class Materialized(NamedTuple):
    """An asset's latest materialization as this process stored it: what a step's provenance
    reads of it (Dagster's `InputAssetVersionInfo`)."""

    storage_id: int
    data_version: Any  # DataVersion | None
    run_id: str
    timestamp: float


def _remember_materializations() -> None:
    """Remember each unpartitioned materialization written from kept events (its index id comes
    from the same transaction), and let a step's provenance take the parents its run materialized
    from there (see the module's text)."""
    from dagster._core.execution.context.data_version_cache import (
        DataVersionCache,
        InputAssetVersionInfo,
    )

    store_asset_event = SqliteEventLogStorage._store_asset_event

    def _store_asset_event(self: SqliteEventLogStorage, conn, event, event_id) -> None:
        store_asset_event(self, conn, event, event_id)
        writing = self.__dict__.get("_audiences_writing")
        dagster_event = event.dagster_event
        if (
            writing is not None
            and dagster_event is not None
            and dagster_event.event_type == DagsterEventType.ASSET_MATERIALIZATION
            and dagster_event.partition is None
        ):
            writing.materialized[dagster_event.asset_key] = Materialized(
                event_id, extract_data_version_from_entry(event), event.run_id, event.timestamp
            )

    def forgetting(method):
        def forget(self: SqliteEventLogStorage, *arguments, **keywords):
            with self._db_lock:
                _write_kept(self, type(self)._audiences_store_event)
                self.__dict__.pop("_audiences_materialized", None)
            return method(self, *arguments, **keywords)

        forget.__doc__ = method.__doc__
        return forget

    SqliteEventLogStorage._store_asset_event = _store_asset_event
    SqliteEventLogStorage.wipe_asset = forgetting(SqliteEventLogStorage.wipe_asset)
    SqliteEventLogStorage.wipe_asset_partitions = forgetting(
        SqliteEventLogStorage.wipe_asset_partitions
    )
    SqliteEventLogStorage.wipe = forgetting(SqliteEventLogStorage.wipe)

    fetch = DataVersionCache._fetch_input_asset_version_info

    def _fetch_input_asset_version_info(self: DataVersionCache, asset_keys) -> None:
        context = self._context
        storage = context.instance.event_log_storage
        if isinstance(storage, SqliteEventLogStorage) and storage.__dict__.get("_audiences_kept"):
            with storage._db_lock:  # a parent's event may still be kept: written (and remembered)
                _write_kept(storage, type(storage)._audiences_store_event)
        remembered = storage.__dict__.get("_audiences_materialized") or {}
        unknown = []
        for key in asset_keys:
            found = remembered.get(key)
            input_name = (
                context.job_def.asset_layer.get_node_input_name(context.node_handle, key)
                if found is not None
                else None
            )
            if (
                found is None
                or found.run_id != context.run_id
                or (input_name and context.has_asset_partitions_for_input(input_name))
            ):
                unknown.append(key)
                continue
            self.input_asset_version_info[key] = InputAssetVersionInfo(
                found.storage_id,
                DagsterEventType.ASSET_MATERIALIZATION,
                found.data_version,
                found.run_id,
                found.timestamp,
            )
        if unknown:
            fetch(self, unknown)

    _fetch_input_asset_version_info.remembers = True
    DataVersionCache._fetch_input_asset_version_info = _fetch_input_asset_version_info


# What Dagster's serializer writes around an event for the asset's latest record,
# `EventLogRecord(storage_id, event_log_entry)` (`test_dagster_storage.py` compares them).
RECORD_START = '{"__class__": "EventLogRecord", "event_log_entry": '
RECORD_STORAGE_ID = ', "storage_id": '


def _serialize_each_event_once() -> None:
    """The event log serializes a materialization for its row, then the same event again inside
    the asset's latest record: the record's text is made from the event's, in the same thread."""
    serialize = sql_event_log.serialize_value
    if getattr(serialize, "reuses_events", False):
        return
    last = threading.local()

    def serialize_value(value, *arguments, **keywords):
        if arguments or keywords:
            return serialize(value, *arguments, **keywords)
        if type(value) is EventLogEntry:
            text = serialize(value)
            last.entry = (value, text)
            return text
        if type(value) is EventLogRecord and type(value.storage_id) is int:
            entry, text = getattr(last, "entry", (None, None))
            if entry is value.event_log_entry:
                return f"{RECORD_START}{text}{RECORD_STORAGE_ID}{value.storage_id}}}"
        return serialize(value)

    serialize_value.reuses_events = True
    sql_event_log.serialize_value = serialize_value


# Events whose rows `_store_rows` writes; any other (run status, asset checks, an asset's
# failure or freshness) goes through Dagster's `store_event`, in the same transactions, in turn.
_ROWS_ASSET_EVENTS = frozenset(
    {
        DagsterEventType.ASSET_MATERIALIZATION,
        DagsterEventType.ASSET_OBSERVATION,
        DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
    }
)
_NOT_ROWS = (
    frozenset(ASSET_EVENTS - _ROWS_ASSET_EVENTS)
    | ASSET_CHECK_EVENTS
    | frozenset(EVENT_TYPE_TO_PIPELINE_RUN_STATUS)
)


def _writes_rows(event: EventLogEntry) -> bool:
    dagster_event = event.dagster_event
    if dagster_event is None:
        return True
    if dagster_event.event_type in _NOT_ROWS:
        return False
    return dagster_event.event_type not in ASSET_EVENTS or dagster_event.asset_key is not None


class _Statement(NamedTuple):
    sql: str
    processors: tuple  # each column's SQLAlchemy bind processor for SQLite, or None


_STATEMENTS: dict[tuple, _Statement] = {}


def _statement(dialect, kind: str, table, columns: tuple[str, ...]) -> _Statement:
    """The SQL text SQLAlchemy would execute for an insert of `columns` into `table` (or an update
    of them by asset key), with each column's bind processor (SQLite's text for a timestamp)."""
    found = _STATEMENTS.get((kind, table.name, columns))
    if found is not None:
        return found
    quote = dialect.identifier_preparer.quote
    if kind == "insert":
        sql = (
            f"INSERT INTO {quote(table.name)} ({', '.join(map(quote, columns))}) "
            f"VALUES ({', '.join('?' for _ in columns)})"
        )
    else:  # update of the columns but the last, by the last (the asset key)
        sets = ", ".join(f"{quote(column)}=?" for column in columns[:-1])
        sql = f"UPDATE {quote(table.name)} SET {sets} WHERE {quote(table.name)}.{quote(columns[-1])} = ?"
    processors = tuple(
        table.c[column].type.dialect_impl(dialect).bind_processor(dialect) for column in columns
    )
    found = _STATEMENTS[(kind, table.name, columns)] = _Statement(sql, processors)
    return found


def _execute(cursor, dialect, kind: str, table, values: dict[str, Any]):
    columns = tuple(values)
    statement = _statement(dialect, kind, table, columns)
    cursor.execute(
        statement.sql,
        [
            value if processor is None or value is None else processor(value)
            for processor, value in zip(statement.processors, values.values(), strict=True)
        ],
    )
    return cursor


def _store_rows(storage: SqliteEventLogStorage, writing: _Writing, event: EventLogEntry) -> None:
    """What Dagster's `SqliteEventLogStorage.store_event` writes for `event`, row for row, with
    the DB-API cursors of the batch's transactions instead of a SQLAlchemy statement per row: the
    event's row in the run's file; for an asset event the same row in the index, its indexed tags
    and the asset's row (updated, or inserted when the asset has none). The values are Dagster's
    own (`_event_to_row`, `_tags_for_asset_event`, `_get_asset_entry_values`), and so is each
    column's conversion to SQLite (SQLAlchemy's bind processors)."""
    row = storage._event_to_row(event)
    run = writing.connection(storage, event.run_id)
    dialect = run.dialect
    _execute(writing.cursor(storage, event.run_id), dialect, "insert", SqlEventLogStorageTable, row)
    dagster_event = event.dagster_event
    if dagster_event is None or dagster_event.event_type not in ASSET_EVENTS:
        return
    index = writing.connection(storage, INDEX_SHARD_NAME)
    cursor = writing.cursor(storage, INDEX_SHARD_NAME)
    event_id = _execute(cursor, dialect, "insert", SqlEventLogStorageTable, row).lastrowid
    if event_id is None:
        raise DagsterInvariantViolationError("Cannot store asset event tags for null event id.")
    asset_key = dagster_event.asset_key.to_string()
    tags = storage._tags_for_asset_event(event)
    if tags and storage.has_table(AssetEventTagsTable.name):
        timestamp = storage._event_insert_timestamp(event)
        for key, value in tags.items():
            _execute(
                cursor,
                dialect,
                "insert",
                AssetEventTagsTable,
                {
                    "event_id": event_id,
                    "asset_key": asset_key,
                    "key": key,
                    "value": value,
                    "event_timestamp": timestamp,
                },
            )
    values = storage._get_asset_entry_values(
        event, event_id, storage._has_asset_key_index_cols_on_connection(index)
    )
    if values:
        # Dagster inserts the asset's row, and updates it when the insert fails on the unique
        # asset key: the same row either way.
        updated = _execute(
            cursor, dialect, "update", AssetKeyTable, {**values, "asset_key": asset_key}
        )
        if updated.rowcount == 0:
            _execute(cursor, dialect, "insert", AssetKeyTable, {"asset_key": asset_key, **values})
    if (
        dagster_event.event_type == DagsterEventType.ASSET_MATERIALIZATION
        and dagster_event.partition is None
    ):
        writing.materialized[dagster_event.asset_key] = Materialized(
            event_id, extract_data_version_from_entry(event), event.run_id, event.timestamp
        )


def _serialize_each_snapshot_once() -> None:
    """A run's creation serializes its execution plan's snapshot three times (its id in
    `RunDomain`, its id again in the run storage's `add_execution_plan_snapshot`, its stored body)
    and each job snapshot twice (its id, its body): at 2,000 audiences the job of a subset and its
    parent hold 2,000 assets each. While a run is created (`RunDomain.create_run` and
    `create_run_for_job`, in the thread creating it), a snapshot serialized again gives the text
    it gave the first time (the same object: snapshots are immutable records); the texts are let
    go when the run is created."""
    from dagster._core.instance.runs.run_domain import RunDomain
    from dagster._core.snap.execution_plan_snapshot import ExecutionPlanSnapshot
    from dagster._core.snap.job_snapshot import JobSnap
    from dagster._core.storage.runs import sql_run_storage
    from dagster_shared.serdes import utils as serdes_utils

    if getattr(RunDomain.create_run, "serializes_snapshots_once", False):
        return
    snapshots = (JobSnap, ExecutionPlanSnapshot)
    creating = threading.local()

    def remembering(serialize):
        def serialize_value(value, *arguments, **keywords):
            kept = getattr(creating, "texts", None)
            if kept is None or arguments or keywords or type(value) not in snapshots:
                return serialize(value, *arguments, **keywords)
            for snapshot, text in kept:
                if snapshot is value:
                    return text
            text = serialize(value)
            kept.append((value, text))
            return text

        return serialize_value

    serdes_utils.serialize_value = remembering(serdes_utils.serialize_value)
    sql_run_storage.serialize_value = remembering(sql_run_storage.serialize_value)

    def while_creating(method):
        def create(self, *arguments, **keywords):
            outermost = getattr(creating, "texts", None) is None
            if outermost:
                creating.texts = []
            try:
                return method(self, *arguments, **keywords)
            finally:
                if outermost:
                    creating.texts = None

        create.serializes_snapshots_once = True
        create.__doc__ = method.__doc__
        return create

    RunDomain.create_run = while_creating(RunDomain.create_run)
    RunDomain.create_run_for_job = while_creating(RunDomain.create_run_for_job)
