"""The API's real-time worker: users identified through the API are evaluated off the request path.

An identify answers once its patch is committed; its user id goes to this worker, with the top-level
properties it set (unknown for a new user, a deletion, a merge or a bulk identify). The worker takes
every user waiting at that moment and evaluates, per group of users with the same affected
audiences, only the audiences that read a property their identifies set (`Plan.affected`, with
the audiences that refer to those), by the same compiled conditions, prepared once per set of
audiences (`workflows.realtime.decide`); it records their events and deliveries in one store write
(the group commit on SQLite). An audience that reads none of the changed properties cannot move
the user; the next pipeline run re-evaluates everything anyway (the batch wins). The plan (which
audiences, compiled once) is looked at every `PLAN_REFRESH_SECONDS`: the pipeline's published plan,
and the definitions, workflow triggers and sinks, read again only when one of their files changed.
At its start, the worker evaluates again, every audience, the users whose patches the pipeline has
not loaded yet, so a process that died between an identify's commit and its events' commit loses
no event. Off (`AUDIENCES_REALTIME=false`), nothing runs here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from audiences.conditions.definitions import load_definition_set
from audiences.dbt.models import CUSTOM_FOLDER, custom_audience_keys
from audiences.workflows.realtime import (
    Decisions,
    Plan,
    UserEvaluator,
    compile_plan,
    decide,
    read_plan,
    record,
    waiting_users,
)

if TYPE_CHECKING:
    from audiences.api.service import Environment

log = logging.getLogger("audiences.realtime")
MAX_USERS_PER_WRITE = 256  # users evaluated in one store transaction
# The plan, definitions and triggers are re-read at most this often: reading and checking them
# costs more than evaluating a batch of users. A definition changed since is evaluated by the
# next run (the batch wins).
PLAN_REFRESH_SECONDS = 5.0


class RealtimeWorker:
    def __init__(self, environment: Environment):
        self.environment = environment
        self.settings = environment.settings.for_environment(environment.name)
        self.evaluator = UserEvaluator()
        # (user id, the top-level properties their identify set or None when unknown), or None to stop
        self._queue: queue.SimpleQueue[tuple[str, frozenset[str] | None] | None] = (
            queue.SimpleQueue()
        )
        self._idle = threading.Condition()
        self._pending = 0
        # (looked at, fingerprint of the plan and files, plan, triggers, default sink)
        self._plan: tuple[float, object, Plan, dict, str] | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"realtime-{environment.name}", daemon=True
        )

    def start(self) -> RealtimeWorker:
        self._thread.start()
        self.submit(waiting_users(self.environment.store))
        return self

    def submit(self, user_ids: Iterable[str], changed: Iterable[str] | None = None) -> None:
        """Evaluate these users soon (after their identify committed). `changed`: the top-level
        properties the identify set, when each user existed before it (only the audiences that
        read them are evaluated); None evaluates every real-time audience."""
        user_ids = list(user_ids)
        if not user_ids:
            return
        changed = None if changed is None else frozenset(changed)
        with self._idle:
            self._pending += len(user_ids)
        for user_id in user_ids:
            self._queue.put((user_id, changed))

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted user was evaluated (for tests and benchmarks)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self.evaluator.close()

    def _files(self) -> tuple:
        """What the definitions, custom SQL audiences, triggers and sinks are read from: each
        file's path, modification time and size."""
        settings = self.settings
        found = []
        for folder in (
            settings.definitions_dir,
            Path(settings.dbt_project_dir) / CUSTOM_FOLDER,
            settings.workflows_dir,
        ):
            if Path(folder).is_dir():
                found += [path for path in Path(folder).rglob("*") if path.is_file()]
        if Path(settings.sinks_file).is_file():
            found.append(Path(settings.sinks_file))
        stamps = []
        for path in sorted(found):
            try:
                status = path.stat()
            except OSError:
                continue
            stamps.append((str(path), status.st_mtime_ns, status.st_size))
        return tuple(stamps)

    def _current(self) -> tuple[Plan, dict, str]:
        """The plan, triggers and default sink, looked at every `PLAN_REFRESH_SECONDS` and read
        again when the pipeline's plan or a file they come from changed (reading and compiling
        them costs seconds)."""
        now = time.monotonic()
        if self._plan is not None and now - self._plan[0] < PLAN_REFRESH_SECONDS:
            return self._plan[2], self._plan[3], self._plan[4]
        versions = read_plan(self.environment.store)
        fingerprint = (tuple(sorted(versions.items())), self._files())
        if self._plan is not None and self._plan[1] == fingerprint:
            self._plan = (now, *self._plan[1:])
            return self._plan[2], self._plan[3], self._plan[4]
        from audiences.delivery.setup import load_workflow_setup
        from audiences.delivery.sinks import close_sinks

        settings = self.settings
        definitions = (
            load_definition_set(settings.definitions_dir).definitions
            if settings.definitions_dir.exists()
            else {}
        )
        custom = set(custom_audience_keys(settings.dbt_project_dir))
        plan = compile_plan(definitions, versions, custom)
        setup = load_workflow_setup(settings)
        close_sinks(setup.sinks)
        self._plan = (now, fingerprint, plan, setup.triggers, setup.default_sink)
        return plan, setup.triggers, setup.default_sink

    def _record(
        self, users: dict[str, frozenset[str] | None], plan: Plan, triggers: dict, default_sink: str
    ) -> None:
        """Evaluate outside the store's write lock, each group of users over the audiences their
        identifies may move them in or out of, then record the events in one write."""
        store, evaluator = self.environment.store, self.evaluator
        groups: dict[frozenset[str], set[str]] = {}
        for user_id, changed in users.items():
            affected = plan.affected(changed)
            if affected:
                groups.setdefault(affected, set()).add(user_id)
        if not groups:
            return
        with evaluator.lock:
            decisions = Decisions(now=datetime.now(UTC))
            for affected, user_ids in groups.items():
                found = decide(
                    store, user_ids, evaluator.subset(plan, affected), evaluator, decisions.now
                )
                decisions.events += found.events
                decisions.event_rows += found.event_rows
                decisions.realtime_rows += found.realtime_rows
            if decisions.events:
                self.environment.write(
                    lambda connection: record(
                        store, connection, decisions, evaluator, triggers, default_sink
                    )
                )

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch: dict[str, frozenset[str] | None] = {first[0]: first[1]}
            taken, stop = 1, False
            while len(batch) < MAX_USERS_PER_WRITE:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                user_id, changed = item
                if user_id in batch:  # identified again meanwhile: what either identify set
                    known = batch[user_id]
                    changed = None if known is None or changed is None else known | changed
                batch[user_id] = changed
                taken += 1
            try:
                plan, triggers, default_sink = self._current()
                self._record(batch, plan, triggers, default_sink)
            except Exception:
                # The pipeline's next run records what this missed, with the same ids.
                log.exception("real-time evaluation of %d users failed", len(batch))
            finally:
                with self._idle:
                    self._pending -= taken
                    self._idle.notify_all()
            if stop:
                return
