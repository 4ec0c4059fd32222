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
materialization, are remembered once found (a table is added by a migration, never removed). The
run storage's one file gets one engine with SQLAlchemy's default pool for a file (a connection
per concurrent user, handed between threads).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

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
    dispose = SqliteEventLogStorage.dispose

    @contextmanager
    def _connect(self: SqliteEventLogStorage, shard: str) -> Iterator[Connection]:
        with self._db_lock:
            engine = _engine(self, shard)
            with engine.connect() as connection, connection.begin():
                yield connection

    def has_table_remembered(self: SqliteEventLogStorage, table_name: str) -> bool:
        found = self.__dict__.setdefault("_audiences_tables", set())
        if table_name not in found and has_table(self, table_name):
            found.add(table_name)
        return table_name in found

    def wipe_closing(self: SqliteEventLogStorage) -> None:
        # Dagster removes the files: nothing may keep them open.
        with self._db_lock:
            _close_all(self)
        wipe(self)

    def dispose_closing(self: SqliteEventLogStorage) -> None:
        with self._db_lock:
            _close_all(self)
        dispose(self)

    SqliteEventLogStorage._connect = _connect
    SqliteEventLogStorage.has_table = has_table_remembered
    SqliteEventLogStorage.wipe = wipe_closing
    SqliteEventLogStorage.dispose = dispose_closing
    SqliteEventLogStorage._audiences_reuses_connections = True


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
