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
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
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
    """The open transactions (one per file) of the thread writing kept events."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.open: dict[str, tuple[Connection, Any]] = {}

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
            store_event(storage, event)
        for _, transaction in writing.open.values():
            transaction.commit()
    finally:
        storage.__dict__["_audiences_writing"] = None
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
