"""The always-on delivery worker: queued deliveries go out within milliseconds of being queued.

`audiences serve` runs one per environment it serves, and `audiences deliver --watch` runs one on
its own (several may run at once, beside `serve` or not). Each sink has a thread of its own that
delivers pass after pass (`loop.deliver_due`, so the claims and leases, retries with back-off,
idempotency keys, rate limits and dead letters are those of every other delivery), and sleeps only
when nothing of its sink is due. A sink whose receiver hangs holds up its own thread only, each
send for at most the sink's `timeout_seconds`; the other sinks' deliveries never wait for it.
Within a sink, a webhook or Knock sink has up to its `concurrency` requests in flight, one per
recipient at a time (`loop.first_of_its_recipient`).

A sleeping thread wakes:
- at once when a transaction of this process that queued deliveries commits
  (`store.database.deliveries_queued`: the API, broadcasts, publishing, releases and replays call
  it; on SQLite the store's commit calls this worker's `wake`);
- at once on PostgreSQL when any process queues deliveries: a thread LISTENs on the store's
  channel, and the queueing transaction's NOTIFY arrives when it commits;
- when its sink's next retry falls due (the earliest `next_attempt_at`), or after `poll_seconds`:
  a short poll (a read of the due index, which on SQLite in WAL mode never waits for a writer)
  finds deliveries that another process queued in a SQLite store, and those whose lease a dead
  worker left to expire.

`stop()` (SIGTERM or Ctrl-C in the commands) lets every sink finish and record the send in flight,
gives back the claims it could not use, and returns the totals.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime

import sqlalchemy as sa

from audiences.delivery.loop import (
    DeliveryReport,
    deliver_due,
    first_of_its_recipient,
    new_worker_id,
)
from audiences.delivery.sinks import Sink
from audiences.store.database import (
    DELIVERIES_CHANNEL,
    MembershipStore,
    deliveries,
    now_text,
    on_deliveries_queued,
)

log = logging.getLogger("audiences.delivery")

# The longest a sleeping sink thread goes without looking at the store: short on SQLite, where it
# is how deliveries queued by other processes are found; longer on PostgreSQL, where NOTIFY wakes
# it and the poll only finds leases that a dead worker let expire.
POLL_SECONDS = {"sqlite": 0.2, "postgresql": 2.0}
# How long the LISTEN thread waits for a notification before it checks whether to stop.
LISTEN_SECONDS = 0.5
# How long a thread waits after an error (the store unreachable) before it tries again.
ERROR_PAUSE_SECONDS = 1.0


class DeliveryWorker:
    """Delivers a store's deliveries to `sinks` from `start()` to `stop()`, woken as they are queued.

    `options` are `deliver_due`'s keyword arguments (max_attempts, lease_seconds, base_delay, ...),
    kept for the worker's life with one worker id and one set of rate-limit buckets. `poll_seconds`
    defaults to `POLL_SECONDS` of the store's database.
    """

    def __init__(
        self,
        store: MembershipStore,
        sinks: Mapping[str, Sink],
        *,
        poll_seconds: float | None = None,
        **options,
    ):
        dialect = store.engine.dialect.name
        self.store = store
        self.sinks = dict(sinks)
        self.poll_seconds = float(
            poll_seconds if poll_seconds is not None else POLL_SECONDS.get(dialect, 1.0)
        )
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds must be positive, not {poll_seconds!r}")
        options.setdefault("rate_limiters", {})
        options.setdefault("worker_id", new_worker_id())
        self.options = options
        self.report = DeliveryReport()
        self._stop = threading.Event()
        self._wakes = {name: threading.Event() for name in self.sinks}
        self._report_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._unsubscribe = None

    @property
    def worker_id(self) -> str:
        """This worker's name in its claims."""
        return self.options["worker_id"]

    def start(self) -> DeliveryWorker:
        """Start a thread per sink (and the LISTEN thread on PostgreSQL); returns the worker."""
        self._unsubscribe = on_deliveries_queued(self.store.url, self.wake)
        for name, sink in self.sinks.items():
            self._thread(self._serve_sink, f"deliver-{name}", name, sink)
        if self.store.engine.dialect.name == "postgresql":
            self._thread(self._listen, "deliver-listen")
        return self

    def wake(self) -> None:
        """Have every sleeping sink thread look for due deliveries now."""
        for event in self._wakes.values():
            event.set()

    def stop(self, timeout: float | None = None) -> DeliveryReport:
        """Stop after the sends in flight (each bounded by its sink's timeout); returns the totals."""
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        return self.report

    @property
    def running(self) -> bool:
        """Whether any of the worker's threads still runs."""
        return any(thread.is_alive() for thread in self._threads)

    # -- the threads -------------------------------------------------------------------------------

    def _thread(self, target, name: str, *arguments) -> None:
        thread = threading.Thread(target=target, args=arguments, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _serve_sink(self, name: str, sink: Sink) -> None:
        wake = self._wakes[name]
        while not self._stop.is_set():
            wake.clear()  # before the pass: a wake during the pass means another pass
            try:
                report = deliver_due(
                    self.store,
                    {name: sink},
                    stop=self._stop,
                    report_unknown_sinks=False,
                    wake=wake,
                    **self.options,
                )
            except Exception as error:  # the store unreachable, say: report it, try again
                log.warning("delivery to sink %r failed, trying again: %s", name, error)
                self._stop.wait(ERROR_PAUSE_SECONDS)
                continue
            with self._report_lock:
                self.report.merge(report)
            if report.attempted == 0:
                self._sleep(name, wake)

    def _sleep(self, name: str, wake: threading.Event) -> None:
        """Wait until woken, or until a delivery of the sink is due (looked up every poll)."""
        while not self._stop.is_set():
            try:
                due_in = self._due_in(name)
            except Exception as error:
                log.warning("could not look for due deliveries of sink %r: %s", name, error)
                due_in = None
            if due_in is not None and due_in <= 0:
                return
            if wake.wait(self.poll_seconds if due_in is None else min(self.poll_seconds, due_in)):
                return

    def _due_in(self, name: str) -> float | None:
        """Seconds until the sink's next pending delivery that no live claim holds is due (0 or
        less: due now), or None when there is none."""
        columns = deliveries.c
        now = now_text()
        statement = (
            sa.select(columns.next_attempt_at)
            .where(
                columns.status == "pending",
                columns.sink == name,
                sa.or_(columns.claimed_until.is_(None), columns.claimed_until < now),
                first_of_its_recipient(),  # one waiting for an earlier delivery is not due
            )
            .order_by(columns.next_attempt_at)
            .limit(1)
        )
        with self.store.read_engine.connect() as connection:
            due = connection.execute(statement).scalar()
        if due is None:
            return None
        if due <= now:
            return 0.0
        try:
            moment = datetime.fromisoformat(due)
        except ValueError:
            return None  # not a time this engine wrote: the poll looks again
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return (moment - datetime.now(UTC)).total_seconds()

    def _listen(self) -> None:
        """PostgreSQL: LISTEN on the deliveries channel and wake the sink threads on each NOTIFY."""
        while not self._stop.is_set():
            connection = None
            try:
                raw = self.store.engine.raw_connection()
                connection = raw.driver_connection  # psycopg's own connection
                raw.detach()  # the listener's own from now on, never back in the pool
                connection.rollback()
                connection.autocommit = True
                connection.execute(f"listen {DELIVERIES_CHANNEL}")
                self.wake()  # whatever was queued before the listener was there
                while not self._stop.is_set():
                    for _notification in connection.notifies(timeout=LISTEN_SECONDS):
                        self.wake()
            except Exception as error:
                log.warning("listening for queued deliveries failed, trying again: %s", error)
                self._stop.wait(ERROR_PAUSE_SECONDS)
            finally:
                if connection is not None:
                    connection.close()
