"""The API's real-time worker: users identified through the API are evaluated off the request path.

An identify answers once its patch is committed; its user id goes to this worker, which takes every
user waiting at that moment, evaluates them together (`workflows.realtime.decide`) and records
their events and deliveries in one store write (the group commit on SQLite). The plan (which
audiences, compiled once) is re-read at most every `PLAN_REFRESH_SECONDS`: the pipeline's published plan, the
definitions and the workflow triggers. At its start, the worker evaluates again the users whose
patches the pipeline has not loaded yet, so a process that died between an identify's commit and
its events' commit loses no event. Off (`AUDIENCES_REALTIME=false`), nothing runs here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from audiences.conditions.definitions import load_definition_set
from audiences.dbt.models import custom_audience_keys
from audiences.workflows.realtime import (
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
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        self._plan: tuple[float, object, Plan, dict, str] | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"realtime-{environment.name}", daemon=True
        )

    def start(self) -> RealtimeWorker:
        self._thread.start()
        self.submit(waiting_users(self.environment.store))
        return self

    def submit(self, user_ids) -> None:
        """Evaluate these users soon (after their identify committed)."""
        user_ids = list(user_ids)
        if not user_ids:
            return
        with self._idle:
            self._pending += len(user_ids)
        for user_id in user_ids:
            self._queue.put(user_id)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted user was evaluated (for tests and benchmarks)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self.evaluator.close()

    def _current(self) -> tuple[Plan, dict, str]:
        """The plan, triggers and default sink, re-read at most every `PLAN_REFRESH_SECONDS`."""
        now = time.monotonic()
        if self._plan is not None and now - self._plan[0] < PLAN_REFRESH_SECONDS:
            return self._plan[2], self._plan[3], self._plan[4]
        from audiences.delivery.setup import load_workflow_setup

        settings = self.settings
        definitions = (
            load_definition_set(settings.definitions_dir).definitions
            if settings.definitions_dir.exists()
            else {}
        )
        custom = set(custom_audience_keys(settings.dbt_project_dir))
        versions = read_plan(self.environment.store)
        fingerprint = (
            tuple(sorted(versions.items())),
            tuple(sorted((key, d.version) for key, d in definitions.items())),
            tuple(sorted(custom)),
        )
        if self._plan is not None and self._plan[1] == fingerprint:
            plan = self._plan[2]
        else:
            plan = compile_plan(definitions, versions, custom)
        setup = load_workflow_setup(settings)
        from audiences.delivery.sinks import close_sinks

        close_sinks(setup.sinks)
        self._plan = (now, fingerprint, plan, setup.triggers, setup.default_sink)
        return plan, setup.triggers, setup.default_sink

    def _record(self, user_ids: set[str], plan: Plan, triggers: dict, default_sink: str) -> None:
        """Evaluate outside the store's write lock, then record the events in one write."""
        store, evaluator = self.environment.store, self.evaluator
        with evaluator.lock:
            decisions = decide(store, user_ids, plan, evaluator)
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
            batch, taken, stop = {first}, 1, False
            while len(batch) < MAX_USERS_PER_WRITE:
                try:
                    user_id = self._queue.get_nowait()
                except queue.Empty:
                    break
                if user_id is None:
                    stop = True
                    break
                batch.add(user_id)
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
