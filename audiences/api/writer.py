"""Group commit for the API's writes to a SQLite store.

SQLite has one writer, and at a thousand members a request most of a write's cost is the commit
(dirty index pages written to the WAL). So concurrent requests hand their write to one writer
thread, which runs every write waiting at that moment in one transaction, each inside its own
savepoint, and commits once: a write that fails rolls back alone and its request gets the error;
the others are acknowledged only after the shared commit. PostgreSQL needs none of this (each
request writes in its own transaction).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

MAX_GROUP = 32


class GroupCommitWriter:
    def __init__(self, engine, name: str = "store-writer", checkpoint_every: float = 1.0):
        self.engine = engine
        self._jobs: queue.SimpleQueue[tuple[Callable[[Any], Any], Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # WAL checkpoints off the request path: a passive checkpoint every second copies committed
        # pages into the database without blocking writers, so no commit pays for a large one.
        self._stopped = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint, args=(checkpoint_every,),
                                              name=f"{name}-checkpoint", daemon=True)
        self._checkpointer.start()

    def _checkpoint(self, every: float) -> None:
        with self.engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            while not self._stopped.wait(every):
                try:
                    raw.execute("pragma wal_checkpoint(passive)").fetchall()
                except Exception:  # noqa: BLE001  (a busy database: the next round checkpoints)
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
        outcomes: list[tuple[Future, bool, Any]] = []
        try:
            with self.engine.begin() as connection:
                for work, future in group:
                    savepoint = connection.begin_nested()
                    try:
                        result = work(connection)
                    except BaseException as error:  # this write alone fails
                        savepoint.rollback()
                        outcomes.append((future, False, error))
                    else:
                        savepoint.commit()
                        outcomes.append((future, True, result))
        except BaseException as error:  # the commit failed: no write of the group happened
            for _, future in group:
                future.set_exception(error)
            return
        for future, succeeded, value in outcomes:
            if succeeded:
                future.set_result(value)
            else:
                future.set_exception(value)
