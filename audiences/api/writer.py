"""Group commit for the API's writes to a SQLite store.

SQLite has one writer, and a commit writes every dirty page to the WAL. So concurrent requests
hand their write to one writer thread, which runs every write waiting at that moment in one
transaction and commits once; each request is answered only after that commit. If one write of a
group fails, the group is rolled back and each write runs again alone, so that only the failing one
fails (see `_commit`). Worker processes take turns through a file lock. PostgreSQL needs none of
this: each request writes in its own transaction.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from audiences.settings import FAULT_PAUSE_SECONDS  # the identify's answer goes out first
from audiences.store.journal import FAULT_BEFORE_APPLIED

MAX_GROUP = 32
log = logging.getLogger("audiences.api")


class GroupCommitWriter:
    def __init__(self, engine, name: str = "store-writer", checkpoint_every: float = 1.0):
        self.engine = engine
        database = engine.url.database
        # Held (and locked) for the writer's life and closed by `close()`, not a `with` block.
        self._lock_file = (
            open(f"{database}-writer.lock", "a+b")  # noqa: SIM115
            if database and database != ":memory:"
            else None
        )
        self._jobs: queue.SimpleQueue[tuple[Callable[[Any], Any], Future] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # WAL checkpoints off the request path: a passive checkpoint every second copies committed
        # pages into the database without blocking writers, so no commit pays for a large one.
        self._stopped = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint,
            args=(checkpoint_every,),
            name=f"{name}-checkpoint",
            daemon=True,
        )
        self._checkpointer.start()

    @contextmanager
    def _across_processes(self):
        """Writer threads of several worker processes take turns through a file lock: a blocked
        writer wakes as soon as the lock is free, where SQLite's busy handler would poll."""
        if self._lock_file is None:
            yield
            return
        fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)

    def _checkpoint(self, every: float) -> None:
        with self.engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            while not self._stopped.wait(every):
                try:
                    raw.execute("pragma wal_checkpoint(passive)").fetchall()
                except Exception:
                    continue

    def write(self, work: Callable[[Any], Any]) -> Any:
        """Run `work(connection)` in the next group's transaction; returns its result once committed."""
        future: Future = Future()
        self._jobs.put((work, future))
        return future.result()

    def close(self) -> None:
        self._stopped.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self._checkpointer.join(timeout=30)
        if self._lock_file is not None:
            self._lock_file.close()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            group = [job]
            while len(group) < MAX_GROUP:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)  # finish this group, then stop
                    break
                group.append(job)
            self._commit(group)

    def _commit(self, group: list[tuple[Callable[[Any], Any], Future]]) -> None:
        """The group in one transaction. Writes were validated before they got here, so one that
        fails is rare: then the group is rolled back and each write runs again in its own
        transaction, so that the failing one fails alone. (No savepoints: in SQLite each one keeps
        a copy of every page it changes, which doubled the cost of a write.)"""
        try:
            with self._across_processes(), self.engine.begin() as connection:
                results = [work(connection) for work, _ in group]
        except BaseException as error:
            if len(group) == 1:
                group[0][1].set_exception(error)
                return
            for job in group:
                self._commit([job])
            return
        for (_, future), result in zip(group, results, strict=True):
            future.set_result(result)


# The applier deletes the journal's applied entries at most this often (a write of the journal,
# which identifies would otherwise wait for after every pass).
FORGET_EVERY_SECONDS = 1.0
RETRY_SECONDS = 0.5  # after a failed pass (the store busy past its wait): the entries wait
# How long the applier remembers an entry it applied before it was told of it (a pass applies
# every entry waiting in the journal, also those whose news is still on its way): the news that
# comes later hands nothing to real time again. News lost for longer is forgotten with it.
EARLY_SECONDS = 60.0


class JournalApplier:
    """Applies the identifies journaled (`store/journal.py`) by this process, or by the API's
    processes for `audiences serve`'s worker process (`api/workers.py`), to the store, right
    after their answers, each pass every entry waiting at that moment in one write of the
    store's group commit; then hands the users of every entry the pass applied to real time
    (also those journaled but not yet told of: under load, most of them): with the properties
    each set when its user existed before it (only the audiences reading them are evaluated),
    else every audience (a new user). An entry another writer of profiles applied first (a
    delete, an upload, the pipeline's load) has its user evaluated for every audience."""

    def __init__(self, environment):
        self.environment = environment
        self._waiting: list[tuple[int, str, frozenset[str]]] = []
        self._state = threading.Condition()
        self._stopping = False
        self._busy = False
        self._forgotten = 0.0
        # Entries a pass applied before the applier was told of them: number -> when.
        self._early: dict[int, float] = {}
        self._thread = threading.Thread(
            target=self._run, name=f"journal-applier-{environment.name}", daemon=True
        )
        self._thread.start()

    def journaled(self, seq: int, user_id: str, properties) -> None:
        """Entry `seq` (user_id's identify, which set `properties`) is committed to the journal."""
        with self._state:
            self._waiting.append((seq, user_id, frozenset(properties)))
            self._state.notify()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every entry journaled so far was applied and handed to real time."""
        with self._state:
            return self._state.wait_for(lambda: not self._waiting and not self._busy, timeout)

    def close(self) -> None:
        """Apply what waits, then stop."""
        with self._state:
            self._stopping = True
            self._state.notify()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._state:
                while not self._waiting and not self._stopping:
                    self._state.wait()
                if not self._waiting:
                    return
                taken, self._waiting, self._busy = self._waiting, [], True
            try:
                self._apply(taken)
            finally:
                with self._state:
                    self._busy = False
                    self._state.notify_all()

    def _apply(self, taken: list[tuple[int, str, frozenset[str]]]) -> None:
        from audiences.store.profiles import apply_journal_in
        from audiences.workflows.realtime import FAULT_ALSO_KILLS, FAULT_POINT

        environment = self.environment
        store, journal = environment.store, environment.journal
        if os.environ.get(FAULT_POINT) == FAULT_BEFORE_APPLIED:
            time.sleep(FAULT_PAUSE_SECONDS)
            # The whole service: in `audiences serve`'s worker process, the API's process too.
            if os.environ.get(FAULT_ALSO_KILLS):
                os.kill(int(os.environ[FAULT_ALSO_KILLS]), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            try:
                applied = environment.write(lambda connection: apply_journal_in(store, connection))
                break
            except Exception:
                if self._stopping:  # the entries stay journaled: the next start applies them
                    log.exception("the identify journal could not be applied to the store")
                    return
                log.exception("the identify journal could not be applied to the store; retrying")
                time.sleep(RETRY_SECONDS)
        now = time.monotonic()
        for seq in sorted(applied):
            entry = applied[seq]
            environment.identified([entry.user_id], entry.properties if entry.existed else None)
        told = {seq for seq, _, _ in taken}
        self._early.update((seq, now) for seq in applied if seq not in told)
        for seq, user_id, _ in taken:
            if seq not in applied and self._early.pop(seq, None) is None:
                # Applied by another writer of profiles: whether the user existed is not known.
                environment.identified([user_id], None)
        for seq in [seq for seq, at in self._early.items() if now - at > EARLY_SECONDS]:
            del self._early[seq]
        if now - self._forgotten > FORGET_EVERY_SECONDS:
            self._forgotten = now
            try:
                journal.forget_applied(store)
            except Exception:
                log.exception("the identify journal's applied entries could not be deleted")
