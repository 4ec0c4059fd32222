"""The identify journal: where an identify through the API is made durable before it is answered.

On a SQLite store, every writer shares the store file's one write lock: the real-time worker
recording events and deliveries, the delivery worker claiming and marking sends, publishing,
uploads. An identify that waited for them to answer took hundreds of milliseconds at the 99th
percentile. So an identify (`PUT /v1/users/{id}` without an `Idempotency-Key`) is committed to a
SQLite file of its own beside the store, `<store>-identifies` (WAL, `synchronous = normal`: a
committed transaction survives the process's death, SIGKILL included; only a crash of the
machine's OS can lose the last ones, as for the store itself), by a group commit of its own
(`api/writer.py`), and answered then. Only identifies write this file, so an identify waits only
for other identifies.

Its entries reach the store in order, exactly once (`profiles.apply_journal_in`): merged into
the users' profiles and queued for the warehouse, as an identify in the store does, and the
store's marker `identify_journal_applied` (this journal's token and the last entry applied)
moves in the same transaction. The API applies them right after answering (then real time
evaluates the users), and so does every other writer of profiles before it writes
(`lock_profiles`: a delete, a merge, an upload, the warehouse's users published back), the
service's start, the worker process's start and the pipeline's load of the identify queue, so
nothing acknowledged waits for a process that died. Entries applied are deleted from the journal
later (`forget_applied`). A reader of one user (`get_profile`, the identify's own answer) reads
the journal's entries of that user first, then the store, and applies on top of the store's
profile those the store's marker has not passed: each entry counts once, whichever moment the
apply and the deletion happen in between.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from audiences.store import database as tables
from audiences.store.database import SQLITE_WRITE_WAIT_SECONDS, MembershipStore

# A test's fault (`settings.FAULT_POINT`): the service is killed (SIGKILL) after an identify is
# journaled and answered, before the store applies it (`api/writer.py` kills; meanwhile nothing
# applies the journal: `profiles.apply_journal_in`).
FAULT_BEFORE_APPLIED = "identify-before-applied"

SUFFIX = "-identifies"  # the journal's file is the store's file name with this after it
MARKER = "identify_journal_applied"  # in `store_markers`: {"journal": token, "applied": seq}

_SCHEMA = (
    "create table if not exists entries (seq integer primary key autoincrement, "
    "user_id text not null, patch text not null, received_at text not null)",
    "create index if not exists entries_by_user on entries (user_id, seq)",
    "create table if not exists journal (token text not null)",
)


@dataclass(frozen=True)
class Entry:
    """One identify: its place in the journal, the user, the patch (JSON object text) and when
    it was received (the profile's `updated_at` if it changes the user)."""

    seq: int
    user_id: str
    patch: str
    received_at: str


def _pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("pragma journal_mode = wal")
    cursor.execute("pragma synchronous = normal")
    cursor.execute(f"pragma busy_timeout = {SQLITE_WRITE_WAIT_SECONDS * 1000}")
    cursor.close()
    dbapi_connection.isolation_level = None  # transactions begin as the "begin" event says


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("begin immediate")


class IdentifyJournal:
    """The journal file of one SQLite store (see the module's docstring)."""

    def __init__(self, path: Path):
        self.path = path
        url = f"sqlite:///{path}"
        arguments = {"timeout": SQLITE_WRITE_WAIT_SECONDS}
        self.engine = sa.create_engine(url, connect_args=arguments)
        self.read_engine = sa.create_engine(url, connect_args=arguments)
        for engine in (self.engine, self.read_engine):
            sa.event.listen(engine, "connect", _pragmas)
        sa.event.listen(self.engine, "begin", _begin_immediate)
        with self.engine.begin() as connection:
            for statement in _SCHEMA:
                connection.exec_driver_sql(statement)
            token = connection.exec_driver_sql("select token from journal").scalar()
            if token is None:
                token = secrets.token_hex(8)
                connection.exec_driver_sql("insert into journal (token) values (?)", (token,))
        # A journal made again (its file deleted) numbers from 1 again: the store's marker names
        # the journal it counts in, so a marker of another one counts as nothing applied.
        self.token = token

    def append(self, connection, entries: list[tuple[str, str, str]]) -> list[int]:
        """Add (user_id, patch text, received_at) entries inside the caller's transaction on
        `self.engine`; returns their numbers, in order."""
        numbers = []
        for entry in entries:
            cursor = connection.exec_driver_sql(
                "insert into entries (user_id, patch, received_at) values (?, ?, ?)", entry
            )
            numbers.append(cursor.lastrowid)
        return numbers

    def entries_after(self, applied: int, user_id: str | None = None) -> list[Entry]:
        """The entries past `applied`, in order (of one user, with `user_id`)."""
        query = "select seq, user_id, patch, received_at from entries where seq > ?"
        parameters: tuple = (applied,)
        if user_id is not None:
            query += " and user_id = ?"
            parameters += (user_id,)
        with self.read_engine.connect() as connection:
            rows = connection.exec_driver_sql(query + " order by seq", parameters).all()
        return [Entry(*row) for row in rows]

    def applied(self, connection) -> int:
        """The last entry the store has applied, read through `connection` (the store's)."""
        markers = tables.store_markers
        return self.applied_in(
            connection.execute(sa.select(markers.c.value).where(markers.c.name == MARKER)).scalar()
        )

    def applied_in(self, value: str | None) -> int:
        """The last entry applied, from the store's marker's value (0 for another journal's)."""
        if not value:
            return 0
        marker = json.loads(value)
        return int(marker["applied"]) if marker.get("journal") == self.token else 0

    def set_applied(self, connection, applied: int) -> None:
        """Move the store's marker, inside the store transaction that applied the entries."""
        markers = tables.store_markers
        value = json.dumps({"journal": self.token, "applied": applied})
        connection.execute(markers.delete().where(markers.c.name == MARKER))
        connection.execute(markers.insert().values(name=MARKER, value=value))

    def forget_applied(self, store: MembershipStore) -> int:
        """Delete the entries the store has applied; returns how many."""
        with store.read_engine.connect() as connection:
            applied = self.applied(connection)
        if not applied:
            return 0
        with self.engine.begin() as connection:
            return connection.exec_driver_sql(
                "delete from entries where seq <= ?", (applied,)
            ).rowcount

    def waiting(self, store: MembershipStore) -> int:
        """How many entries the store has not applied yet."""
        with store.read_engine.connect() as connection:
            applied = self.applied(connection)
        with self.read_engine.connect() as connection:
            return connection.exec_driver_sql(
                "select count(*) from entries where seq > ?", (applied,)
            ).scalar()

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()


_journals: dict[str, IdentifyJournal] = {}
_journals_lock = threading.Lock()


def journal_path(store: MembershipStore) -> Path | None:
    """Where the journal of this store is: beside a SQLite store's file; None for PostgreSQL (an
    identify there is one transaction of its own, waiting for no other writer's lock) or an
    in-memory store."""
    url = sa.engine.make_url(store.url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    database = Path(url.database).expanduser()
    return database.with_name(database.name + SUFFIX)


def journal_of(store: MembershipStore, create: bool = False) -> IdentifyJournal | None:
    """The store's journal, opened once per process; None when it has none (or, unless `create`,
    when its file does not exist yet: nothing was ever journaled)."""
    path = journal_path(store)
    if path is None:
        return None
    key = str(path)
    with _journals_lock:
        journal = _journals.get(key)
        if journal is None:
            if not create and not path.exists():
                return None
            journal = _journals[key] = IdentifyJournal(path)
        return journal
