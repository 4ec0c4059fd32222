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
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from audiences.conditions.definitions import load_definition_set
from audiences.dbt.models import CUSTOM_FOLDER, custom_audience_keys
from audiences.store.profiles import apply_journal
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


# The lanes: "fast" evaluates users whose identify named the properties it set (only the
# audiences reading them); "full" evaluates every audience, for a new or deleted user, a merge, a
# bulk identify or a restart. A full evaluation's query is the whole flattening of the properties,
# which DuckDB binds and plans at each execution (hundreds of milliseconds): in a lane of its own
# it never holds up the identifies behind it.
LANES = ("fast", "full")


class RealtimeWorker:
    """Evaluates identified users off the request path, in two lanes (`LANES`), each a thread
    with its own in-memory DuckDB; a user is evaluated by one lane at a time, in the order of
    their identifies."""

    def __init__(self, environment: Environment, settle_heap: bool = False):
        self.environment = environment
        # In `audiences serve`'s worker process: the heap is frozen again after a plan is compiled
        # (`workers.settle_heap`; the plan's objects live until the next one).
        self._settle_heap = settle_heap
        self.settings = environment.settings.for_environment(environment.name)
        # Each lane opens its evaluator in its own thread, off the service's start.
        self.evaluators: dict[str, UserEvaluator] = {}
        self._state = threading.Condition()
        # Waiting users: per lane, user id -> the top-level properties their identifies set
        # (None in the full lane); users being evaluated; whether to stop.
        self._waiting: dict[str, dict[str, frozenset[str] | None]] = {lane: {} for lane in LANES}
        self._busy: set[str] = set()
        self._stopping = False
        self._plan_lock = threading.Lock()
        # (looked at, fingerprint of the plan and files, plan, triggers, default sink)
        self._plan: tuple[float, object, Plan, dict, str] | None = None
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(lane,),
                name=f"realtime-{lane}-{environment.name}",
                daemon=True,
            )
            for lane in LANES
        ]

    def start(self) -> RealtimeWorker:
        for thread in self._threads:
            thread.start()
        # Identifies journaled by an API that died before applying them join the store's queue
        # first, and so the users waiting.
        try:
            apply_journal(self.environment.store)
        except Exception:
            log.exception("the identify journal could not be applied; the next run applies it")
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
        fast, full = self._waiting["fast"], self._waiting["full"]
        with self._state:
            for user_id in user_ids:
                if changed is None or user_id in full:
                    fast.pop(user_id, None)
                    full[user_id] = None
                else:  # identified again before evaluation: what either identify set
                    fast[user_id] = changed | fast.get(user_id, frozenset())
            self._state.notify_all()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted user was evaluated (for tests and benchmarks), with the
        identifies this process journaled applied and submitted first."""
        applier = self.environment.applier
        if applier is not None and not applier.wait_idle(timeout):
            return False
        with self._state:
            return self._state.wait_for(
                lambda: not self._busy and not any(self._waiting.values()), timeout
            )

    def close(self) -> None:
        with self._state:
            self._stopping = True
            self._state.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        for evaluator in list(self.evaluators.values()):
            evaluator.close()

    def _take(self, lane: str) -> dict[str, frozenset[str] | None] | None:
        """The lane's next users (none being evaluated by the other lane), marked busy; None to
        stop."""
        waiting = self._waiting[lane]
        with self._state:
            while True:
                if self._stopping:
                    return None
                ready = [user_id for user_id in waiting if user_id not in self._busy]
                if ready:
                    batch = {
                        user_id: waiting.pop(user_id) for user_id in ready[:MAX_USERS_PER_WRITE]
                    }
                    self._busy.update(batch)
                    return batch
                self._state.wait()

    def _run(self, lane: str) -> None:
        evaluator = self.evaluators[lane] = UserEvaluator()
        while True:
            batch = self._take(lane)
            if batch is None:
                return
            try:
                with self._plan_lock:
                    plan, triggers, default_sink = self._current()
                self._record(evaluator, batch, plan, triggers, default_sink)
            except Exception:
                # The pipeline's next run records what this missed, with the same ids.
                log.exception("real-time evaluation of %d users failed", len(batch))
            finally:
                with self._state:
                    self._busy.difference_update(batch)
                    self._state.notify_all()

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
        if self._settle_heap:
            from audiences.api.workers import settle_heap

            settle_heap()
        return plan, setup.triggers, setup.default_sink

    def _record(
        self,
        evaluator: UserEvaluator,
        users: dict[str, frozenset[str] | None],
        plan: Plan,
        triggers: dict,
        default_sink: str,
    ) -> None:
        """Evaluate outside the store's write lock, each group of users over the audiences their
        identifies may move them in or out of, and record each group's events in one write (while
        the evaluator holds that group's users, which trigger conditions read)."""
        store = self.environment.store
        groups: dict[frozenset[str], set[str]] = {}
        for user_id, changed in users.items():
            affected = plan.affected(changed)
            if affected:
                groups.setdefault(affected, set()).add(user_id)
        if not groups:
            return
        started, events, writing = time.perf_counter(), 0, 0.0
        with evaluator.lock:
            now = datetime.now(UTC)
            for affected, user_ids in groups.items():
                decisions = decide(
                    store,
                    user_ids,
                    evaluator.subset(plan, affected),
                    evaluator,
                    now,
                    triggers.values(),
                )
                if not decisions.events:
                    continue
                events += len(decisions.events)
                written = time.perf_counter()
                self.environment.write(
                    lambda connection, decisions=decisions: record(
                        store, connection, decisions, evaluator, triggers, default_sink
                    )
                )
                writing += time.perf_counter() - written
        log.debug(
            "real time: %d users in %d groups, %d events; evaluated in %.1f ms, written in %.1f ms",
            len(users),
            len(groups),
            events,
            1000 * (time.perf_counter() - started - writing),
            1000 * writing,
        )
