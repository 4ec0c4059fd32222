"""The delivery loop: send due deliveries to their sinks, at least once, and record what happened.

Deliveries wait in the store's `deliveries` table. A pass (`deliver_due`) works on every sink at
once, each in its own thread, so a hanging or slow receiver holds up only its own deliveries (and
`seconds_per_sink` bounds how long a pass spends on one sink). For each sink it *claims* a few due
pending rows, sends them in the sink's batch size within its rate limit, and records every outcome:
delivered, retried later with exponential back-off and full jitter (or when the receiver's
`Retry-After` says, never later than `max_delay`), or dead after a permanent refusal or too many
attempts. Dead deliveries are the dead-letter list: `replay` puts them back in the queue once the
cause is fixed.

Several workers may deliver from one store at once: a pipeline run's delivery step, the schedule,
`audiences deliver --watch`. A claim is one atomic statement that writes the worker's claim and a
lease (`claimed_by`, `claimed_until`) on rows that are unclaimed or whose lease has ended
(`FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite the UPDATE runs under the write lock), and it is
committed before anything is sent, so each delivery is sent by one worker. A worker renews its lease
while it still needs the rows; one that dies (kill -9) leaves them to another once the lease ends.
A sink's rate limit is one token bucket in the store (`sink_rate_limits`), shared by all workers.

A worker can die between a send and its record, so a delivery may still be sent twice, always under
the same id: sinks carry the delivery id as idempotency key, and a batching webhook sink a batch id
that is written to the batch's rows when the batch is formed (`message_id`), before it is first
sent, so the batch is retried whole under that id. Receivers that honour the id run it once.

Everything goes through SQLAlchemy Core on `store.engine`, in transactions and in bulk, so the same
code runs on SQLite and PostgreSQL and keeps up with thousands of deliveries a second.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_all
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from audiences.delivery import Delivery, Outcome
from audiences.delivery.sinks import Sink, batch_message_id
from audiences.store.database import (
    MembershipStore,
    deliveries,
    deliveries_queued,
    sink_rate_limits,
)

# The most rows one claim takes; a claim covers this many sends of a sink, or two per send it may
# have in flight (fewer rows per claim share a queue better between workers, more cost fewer claim
# transactions).
PAGE_SIZE = 1000
CLAIM_SENDS = 10
# The most outcomes (or seconds) held in memory before they are written.
FLUSH_OUTCOMES = 500
FLUSH_SECONDS = 1.0
# Dead-letter ids replayed per statement (an IN list), well under every database's parameter limit.
REPLAY_CHUNK = 500
# How long a claim holds deliveries before another worker may take them: at least three sends of
# the sink, and renewed while the worker still needs the rows, so only a dead worker loses them.
LEASE_SECONDS = 60.0
# How long one send may take, for a sink that declares no `timeout_seconds` (the file sink).
SEND_SECONDS = 10.0
# The most time one pass of `--watch` spends on one sink before it looks again at every sink.
WATCH_SECONDS_PER_SINK = 10.0
# A shared rate-limit state dated further ahead than this was written by a skewed clock: reset it.
CLOCK_SKEW_SECONDS = 86_400.0

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_MICROSECOND = timedelta(microseconds=1)

# Attempts before a retried delivery is dead-lettered (`audiences deliver --max-attempts` says
# so). With the back-off's defaults (full jitter, doubling from 1 s up to 300 s) 20 attempts span
# about half an hour on average: a receiver down for minutes, or answering 429 for a while, loses
# nothing to the dead-letter list (8 attempts spanned about a minute). A refusal (a 4xx other
# than 408 and 429) is dead at once.
MAX_ATTEMPTS = 20


@dataclass
class DeliveryReport:
    """What one pass (or a run of passes) did: counts overall and per sink.

    `per_sink[sink]` counts "delivered", "retried", "dead" and "skipped_unknown_sink" (due
    deliveries left pending because their sink is not configured).
    """

    delivered: int = 0
    retried: int = 0
    dead: int = 0
    skipped_unknown_sink: int = 0
    per_sink: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def attempted(self) -> int:
        """Deliveries sent (or found unsendable) in this pass, whatever their outcome."""
        return self.delivered + self.retried + self.dead

    def add(self, sink: str, kind: str, count: int = 1) -> None:
        """Count `count` deliveries of `sink` as `kind` (one of the four counters above)."""
        if count <= 0:
            return
        setattr(self, kind, getattr(self, kind) + count)
        counts = self.per_sink.setdefault(sink, {})
        counts[kind] = counts.get(kind, 0) + count

    def __str__(self) -> str:
        """The report as `audiences deliver` prints it: totals, then one line per sink."""
        lines = [
            f"deliveries: {self.delivered:,} delivered, {self.retried:,} to retry, "
            f"{self.dead:,} dead-lettered (`audiences deliveries`)"
            + (
                f", {self.skipped_unknown_sink:,} waiting for a sink that is not configured"
                if self.skipped_unknown_sink
                else ""
            )
        ]
        for sink, counts in sorted(self.per_sink.items()):
            lines.append(
                f"  {sink}: "
                + ", ".join(f"{count:,} {kind.replace('_', ' ')}" for kind, count in counts.items())
            )
        return "\n".join(lines)

    def merge(self, other: DeliveryReport) -> None:
        """Add a later pass's counts to these totals.

        Delivered, retried and dead add up; skipped deliveries are the same ones waiting pass after
        pass, so the totals keep the later pass's number instead of a sum.
        """
        for sink, counts in other.per_sink.items():
            for kind, count in counts.items():
                if kind != "skipped_unknown_sink":
                    self.add(sink, kind, count)
        self.skipped_unknown_sink = other.skipped_unknown_sink
        for counts in self.per_sink.values():
            counts.pop("skipped_unknown_sink", None)
        for sink, counts in other.per_sink.items():
            if "skipped_unknown_sink" in counts:
                waiting = counts["skipped_unknown_sink"]
                self.per_sink.setdefault(sink, {})["skipped_unknown_sink"] = waiting


class TokenBucket:
    """A token bucket of deliveries per second: bursts up to `capacity`, `rate` on average.

    `acquire(n)` waits (through the injected `sleep`) until the bucket holds `min(n, capacity)`
    tokens, then takes `n`; a batch larger than the capacity leaves the bucket in debt, so the next
    batch waits longer and the average still holds. Given a `store` and a sink `name`, the bucket
    lives in the store's `sink_rate_limits` table and every worker delivering from that store takes
    from it: `acquire` reserves its tokens in one transaction and sleeps after the commit, so the
    limit holds across workers. `clock` is then read by all of them: the wall clock (the default).
    """

    def __init__(
        self,
        rate: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        store: MembershipStore | None = None,
        name: str | None = None,
    ):
        if not rate > 0:
            raise ValueError(f"a rate limit must be positive, not {rate!r}")
        if (store is None) != (name is None):
            raise ValueError("a shared rate limit needs both the store and the sink's name")
        self.rate = float(rate)
        self.capacity = max(1.0, float(capacity if capacity is not None else rate))
        self.tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._store = store
        self._name = name

    def acquire(self, count: int) -> None:
        """Take `count` tokens, sleeping first for as long as the bucket needs to hold them."""
        if self._store is None:
            wait, self.tokens, self._updated = _reserve(
                self.tokens, self._updated, self._clock(), count, self.rate, self.capacity
            )
        else:
            wait = self._reserve_shared(count)
        if wait > 0:
            self._sleep(wait)

    def _reserve_shared(self, count: int) -> float:
        table = sink_rate_limits
        this_sink = table.c.sink == self._name
        with self._store.engine.begin() as connection:
            moment = self._clock()
            fresh = {
                "sink": self._name,
                "rate": self.rate,
                "tokens": self.capacity,
                "updated_at": moment,
            }
            self._store.insert_ignoring_duplicates(connection, table, [fresh])
            row = connection.execute(
                sa.select(table.c.rate, table.c.tokens, table.c.updated_at)
                .where(this_sink)
                .with_for_update()
            ).one()
            tokens, updated = float(row.tokens), float(row.updated_at)
            if (
                float(row.rate) != self.rate
                or not (math.isfinite(tokens) and math.isfinite(updated))
                or updated - moment > CLOCK_SKEW_SECONDS
            ):
                tokens, updated = self.capacity, moment  # a new limit, or a clock that jumped
            wait, tokens, updated = _reserve(
                tokens, updated, moment, count, self.rate, self.capacity
            )
            connection.execute(
                table.update()
                .where(this_sink)
                .values(rate=self.rate, tokens=tokens, updated_at=updated)
            )
        self.tokens = tokens
        return wait


def _reserve(
    tokens: float, updated: float, moment: float, count: int, rate: float, capacity: float
) -> tuple[float, float, float]:
    """The bucket's arithmetic: refill from `updated` to `moment`, reserve `count` tokens.

    Returns (seconds to wait, tokens left, the time they are counted at). The wait ends when the
    bucket holds `min(count, capacity)`; the tokens are taken as of then, so a reservation made by
    another worker for a later moment is honoured by everyone who reads the bucket before it.
    """
    held = min(capacity, tokens + (moment - updated) * rate)
    needed = min(float(count), capacity)
    wait = max(0.0, (needed - held) / rate)
    return wait, held + wait * rate - count, moment + wait


def deliver_due(
    store: MembershipStore,
    sinks: Mapping[str, Sink],
    *,
    now: datetime | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    limit: int | None = None,
    base_delay: float = 1.0,
    max_delay: float = 300.0,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    rate_limiters: dict[str, TokenBucket] | None = None,
    rng: random.Random | None = None,
    lease_seconds: float = LEASE_SECONDS,
    seconds_per_sink: float | None = None,
    worker_id: str | None = None,
    stop: threading.Event | None = None,
    report_unknown_sinks: bool = True,
    wake: threading.Event | None = None,
) -> DeliveryReport:
    """Send every due pending delivery (at most `limit`) to its sink and record each outcome.

    Due means status 'pending' and `next_attempt_at` <= `now` (default: the current UTC time), in
    order of `next_attempt_at`, then `created_at`. The sinks are served at the same time, one
    thread each; with `seconds_per_sink`, a sink that has used that much time (by `clock`) gets no
    new sends in this pass. Deliveries are claimed before they are sent (`worker_id` names this
    worker in the claims, and a lease of `lease_seconds`, longer for a slow sink, lets another
    worker take them if this one dies), so workers running at once never send the same delivery.
    A delivery is claimed only when no earlier delivery of its recipient (audience, user, tenant)
    to its sink is pending (`first_of_its_recipient`): one recipient's deliveries go out one at a
    time, in queue order, and a sink may send a claim's deliveries concurrently.

    Each sink gets its deliveries in batches of its `batch_size`, with up to its `concurrency`
    (when it has one) sends in flight at once, each paced by its `rate_limit_per_second` in a
    token bucket kept in the store and shared by every worker (`clock` and `sleep` drive it;
    `rate_limiters` keeps the bucket objects across passes). A sink with `keeps_batches` (a batching webhook) gets each batch formed once and
    written with its id before it is first sent, then always sent whole under that id.

    Outcomes are written in bulk as the pass goes: delivered sets status 'delivered' and
    `delivered_at`; retry adds an attempt, keeps the error and sets `next_attempt_at` to the sink's
    `retry_after` when given, else to a random delay up to `base_delay * 2**attempts` (full jitter,
    one draw per send), never later than `max_delay` and never within this pass; a failed outcome,
    an unreadable payload, or a retry that reaches `max_attempts` sets status 'dead'. A batch's
    deliveries share their outcome, their next attempt and their attempt count. Deliveries whose
    sink is not in `sinks` stay pending and are counted as skipped; 'held' and 'discarded' ones
    are never touched (`report_unknown_sinks=False` skips counting them). Claims this worker could
    not use are given back when the pass ends, even when it ends with an error. Setting `stop` ends
    the pass early: each sink finishes and records the send in flight and gives back its claims.

    With `wake` (the always-on worker's event, set when deliveries are queued), a sink claims again
    while its sends are in flight, each time one of them ends or `wake` is set, instead of waiting
    for all of them: a delivery queued behind a slow send goes out at once. Its recipient's order
    still holds: a delivery in flight is pending until its outcome is written, so no later one of
    its recipient is claimed before that.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    for name, value in (("base_delay", base_delay), ("max_delay", max_delay)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
    if not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be positive, not {lease_seconds!r}")
    pass_now = _as_utc(now) if now is not None else datetime.now(UTC)
    work = _Pass(
        store=store,
        due_at=pass_now,
        due_text=_text(pass_now),
        moment=(lambda: pass_now) if now is not None else _utc_now,
        max_attempts=max_attempts,
        base_delay=float(base_delay),
        max_delay=float(max_delay),
        clock=clock,
        sleep=sleep,
        buckets=rate_limiters if rate_limiters is not None else {},
        rng=rng or random.Random(),
        lease_seconds=float(lease_seconds),
        seconds_per_sink=seconds_per_sink,
        worker_id=worker_id or new_worker_id(),
        remaining=limit,
        stop=stop if stop is not None else threading.Event(),
        wake=wake,
    )
    names = sorted(sinks)
    reports = _each_sink(work, {name: sinks[name] for name in names})
    report = DeliveryReport()
    for name in names:
        report.merge(reports[name])
    for sink_name, count in (
        _unknown_sink_counts(store, work.due_text, names) if report_unknown_sinks else ()
    ):
        report.add(sink_name, "skipped_unknown_sink", count)
    return report


def run_delivery_loop(
    store: MembershipStore,
    sinks: Mapping[str, Sink],
    *,
    poll_seconds: float = 1.0,
    stop: Callable[[], bool] | None = None,
    **kwargs,
) -> DeliveryReport:
    """Deliver due deliveries pass after pass until `stop()` is true (or forever), for `--watch`.

    Each pass is a `deliver_due` with the remaining keyword arguments (the current time as `now`
    unless one is given; at most `WATCH_SECONDS_PER_SINK` per sink unless `seconds_per_sink` says
    otherwise, so a sink that hangs delays the others' next pass by that much at most); when a pass
    sends nothing, the loop sleeps `poll_seconds` (through the `sleep` argument when given) before
    looking again. The worker keeps one id and its rate-limit buckets across passes. Returns the
    totals of all passes.
    """
    sleep = kwargs.get("sleep", time.sleep)
    kwargs.setdefault("rate_limiters", {})
    kwargs.setdefault("seconds_per_sink", WATCH_SECONDS_PER_SINK)
    kwargs.setdefault("worker_id", new_worker_id())
    totals = DeliveryReport()
    while not (stop and stop()):
        report = deliver_due(store, sinks, **kwargs)
        totals.merge(report)
        if report.attempted == 0:
            sleep(poll_seconds)
    return totals


def new_worker_id() -> str:
    """A name for this worker in its claims: host, process and a random part (unique per call)."""
    return f"{socket.gethostname()[:24]}:{os.getpid()}:{secrets.token_hex(4)}"


def release_claims_of(store: MembershipStore, worker_id: str) -> int:
    """Give back the pending deliveries that a worker known to be dead (killed, say) still holds
    a claim on, so that they are due now rather than when their lease ends; their sends, if they
    happened, go again under the same idempotency keys. Returns how many were given back."""
    columns = deliveries.c
    with store.engine.begin() as connection:
        return connection.execute(
            deliveries.update()
            .where(
                columns.status == "pending",
                columns.claimed_by.startswith(f"{worker_id}/", autoescape=True),
            )
            .values(claimed_by=None, claimed_until=None)
        ).rowcount


def replay(
    store: MembershipStore,
    *,
    delivery_ids: list[str] | None = None,
    all_dead: bool = False,
    now: datetime | None = None,
) -> int:
    """Move dead deliveries back to pending, with no attempts and due at `now`; returns how many.

    Either name the deliveries (`delivery_ids`; ids that are not dead are left alone) or replay the
    whole dead-letter list (`all_dead=True`). The last error is kept until the next attempt
    replaces it, so the reason a delivery died stays visible.
    """
    if not all_dead and delivery_ids is None:
        raise ValueError("name the deliveries to replay, or pass all_dead=True")
    values = {
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": _text(_as_utc(now) if now else _utc_now()),
    }
    is_dead = deliveries.c.status == "dead"
    with store.engine.begin() as connection:
        deliveries_queued(connection)
        if all_dead:
            return _count(connection.execute(deliveries.update().where(is_dead).values(**values)))
        replayed = 0
        ids = list(dict.fromkeys(delivery_ids or []))
        for start in range(0, len(ids), REPLAY_CHUNK):
            chunk = ids[start : start + REPLAY_CHUNK]
            statement = (
                deliveries.update()
                .where(is_dead, deliveries.c.delivery_id.in_(chunk))
                .values(**values)
            )
            replayed += _count(connection.execute(statement))
        return replayed


def delivery_status(store: MembershipStore) -> dict:
    """Counts of deliveries per sink per status, totals per status, and the oldest pending time.

    Returns `{"sinks": {sink: {status: count}}, "totals": {status: count},
    "oldest_pending_next_attempt_at": text or None}`: what `audiences deliver --status` shows, and
    the number to alert on when a sink falls behind.
    """
    count = sa.func.count().label("deliveries")
    grouped = sa.select(deliveries.c.sink, deliveries.c.status, count).group_by(
        deliveries.c.sink, deliveries.c.status
    )
    oldest = sa.select(sa.func.min(deliveries.c.next_attempt_at)).where(
        deliveries.c.status == "pending"
    )
    per_sink: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    with store.read_engine.connect() as connection:
        for sink, status, number in connection.execute(
            grouped.order_by(deliveries.c.sink, deliveries.c.status)
        ):
            per_sink.setdefault(sink, {})[status] = number
            totals[status] = totals.get(status, 0) + number
        oldest_pending = connection.execute(oldest).scalar()
    return {"sinks": per_sink, "totals": totals, "oldest_pending_next_attempt_at": oldest_pending}


# -- one pass, in pieces --------------------------------------------------------------------------


@dataclass
class _Pass:
    """What every sink's thread of one pass shares: the settings, the limit, the stop signal."""

    store: MembershipStore
    due_at: datetime
    due_text: str
    moment: Callable[[], datetime]
    max_attempts: int
    base_delay: float
    max_delay: float
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    buckets: dict[str, TokenBucket]
    rng: random.Random
    lease_seconds: float
    seconds_per_sink: float | None
    worker_id: str
    remaining: int | None
    stop: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _claims: itertools.count = field(default_factory=itertools.count)

    def reserve(self, wanted: int) -> int:
        """How many of `wanted` rows the next claim may take under the pass's `limit`."""
        with self._lock:
            if self.remaining is None:
                return wanted
            granted = max(0, min(wanted, self.remaining))
            self.remaining -= granted
            return granted

    def settle(self, reserved: int, claimed: int) -> None:
        """Count the rows a claim really took (a batch's other rows may exceed the reservation)."""
        with self._lock:
            if self.remaining is not None:
                self.remaining += reserved - claimed

    def due_now(self) -> None:
        """Move the pass's due time to now (a pass with `wake`: it claims what is queued as it
        goes; a retry is still due no earlier than its back-off)."""
        with self._lock:
            self.due_at = _utc_now()
            self.due_text = _text(self.due_at)

    def jitter(self) -> float:
        with self._lock:
            return self.rng.random()

    def claim_token(self) -> str:
        return f"{self.worker_id}/{next(self._claims)}"

    def bucket(self, name: str, sink: Sink) -> TokenBucket | None:
        rate = sink.rate_limit_per_second
        if rate is None:
            return None
        with self._lock:
            bucket = self.buckets.get(name)
            if bucket is None or bucket.rate != float(rate):
                bucket = self.buckets[name] = TokenBucket(
                    rate, clock=self.clock, sleep=self.sleep, store=self.store, name=name
                )
            return bucket

    def spent(self, started: float) -> bool:
        """Whether a sink that started at `started` has used its time in this pass."""
        return self.seconds_per_sink is not None and self.clock() - started >= self.seconds_per_sink


def _each_sink(work: _Pass, sinks: dict[str, Sink]) -> dict[str, DeliveryReport]:
    """Deliver for every sink at once, one thread each; errors are raised once all have stopped."""
    if len(sinks) <= 1:
        return {name: _deliver_to_sink(work, name, sink) for name, sink in sinks.items()}
    with ThreadPoolExecutor(max_workers=len(sinks), thread_name_prefix="deliver") as pool:
        futures = {
            name: pool.submit(_deliver_to_sink, work, name, sink) for name, sink in sinks.items()
        }
        try:
            wait_for_all(futures.values())
        except BaseException:
            # Ctrl-C: every sink finishes the send in flight, records it and gives back its claims
            # (leaving the pool waits for them).
            work.stop.set()
            raise
    for future in futures.values():
        if future.exception() is not None:
            raise future.exception()
    return {name: future.result() for name, future in futures.items()}


def _deliver_to_sink(work: _Pass, sink_name: str, sink: Sink) -> DeliveryReport:
    """One sink's share of a pass: claim, send, record, until nothing is due or time is up.

    Up to the sink's `concurrency` sends are in flight at once (`_Sends`); each waits for its rate
    limit's tokens before it starts, and its outcomes are recorded in this thread as it finishes.
    A claim holds at most one delivery per recipient (`first_of_its_recipient`), so sends in
    flight together never carry two triggers of one recipient; the next claim comes after every
    send of this one is recorded, or, with the pass's `wake`, as soon as one send ends or more
    deliveries are queued (the sends still in flight keep their rows pending and claimed: neither
    they nor a later delivery of their recipients can be claimed meanwhile).
    """
    report = DeliveryReport()
    recorder = _OutcomeRecorder(work, report)
    send_seconds = _send_seconds(sink)
    lease = max(work.lease_seconds, 3 * send_seconds)
    claim_size = min(PAGE_SIZE, _chunk_size(sink) * max(CLAIM_SENDS, 2 * _concurrency(sink)))
    started = work.clock()
    skipped: set[str] = set()
    claim: _Claim | None = None
    sends = _Sends(_concurrency(sink), f"deliver-{sink_name}")
    try:
        while not work.stop.is_set() and not work.spent(started):
            reserved = work.reserve(claim_size)
            if reserved <= 0:
                break
            # What was sent is recorded before the next claim: a recipient's next delivery can be
            # claimed only once the one before it is no longer pending.
            if work.wake is None:
                sends.finish()
            else:
                work.wake.clear()  # before the claim: what is queued after it wakes the next one
                work.due_now()  # what was queued since the pass began is due too
                sends.collect()
            recorder.flush()
            claim = _claim(work, sink_name, sink, work.claim_token(), lease, reserved, skipped)
            work.settle(reserved, len(claim.rows))
            if claim.found == 0:
                if work.wake is None or not sends.in_flight:
                    break
                # Claim again when a send ends (its recipient's next delivery may be due) or more
                # deliveries are queued; the sends set `wake` as they end.
                work.wake.wait(send_seconds)
                continue
            for unit, together in _units(claim.rows, _chunk_size(sink)):
                if work.stop.is_set() or work.spent(started):
                    break
                _send_unit(
                    work, sink_name, sink, unit, together, claim, recorder, send_seconds, sends
                )
    finally:
        try:
            sends.finish()  # every send in flight ends (each within the sink's timeout) and is recorded
            recorder.flush()
        finally:
            sends.close()
            if claim is not None:
                # Rows of the last claim with no outcome recorded: not sent (time was up), or sent
                # when an error struck. Whoever claims next sends them (under the same ids).
                _release(work.store, claim.token, claim.rows)
    return report


class _Sends:
    """A sink's sends in flight: at most `concurrency` at once, on threads of their own (none
    when it is 1: each send runs in the caller's thread). `start` hands a send over, first
    waiting for a free slot; each send's `done(outcomes)` runs in the caller's thread, in
    `start` or `finish`, so the outcome recorder is never shared between threads."""

    def __init__(self, concurrency: int, name: str):
        self.concurrency = max(1, concurrency)
        self._pool = (
            ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=name)
            if self.concurrency > 1
            else None
        )
        self._in_flight: dict = {}  # future -> done

    def free_slot(self) -> None:
        """Wait until fewer than `concurrency` sends are in flight (before taking rate-limit
        tokens, so that a send starts when its tokens are taken)."""
        while len(self._in_flight) >= self.concurrency:
            self._collect(FIRST_COMPLETED)

    def start(
        self,
        send: Callable[[], list],
        done: Callable[[list], None],
        ended: threading.Event | None = None,
    ) -> None:
        """Start a send (`ended`, when given, is set as it ends, in its own thread)."""
        if self._pool is None:
            done(send())
            return
        self.free_slot()
        future = self._pool.submit(send)
        self._in_flight[future] = done
        if ended is not None:
            future.add_done_callback(lambda _future: ended.set())

    @property
    def in_flight(self) -> bool:
        return bool(self._in_flight)

    def collect(self) -> None:
        """Record the sends that have ended, waiting for none."""
        for future in [future for future in self._in_flight if future.done()]:
            self._in_flight.pop(future)(future.result())

    def finish(self) -> None:
        """Wait for every send in flight and record it."""
        while self._in_flight:
            self._collect(ALL_COMPLETED)

    def _collect(self, when: str) -> None:
        finished, _ = wait_for_all(list(self._in_flight), return_when=when)
        for future in finished:
            self._in_flight.pop(future)(future.result())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


@dataclass
class _Claim:
    """Rows claimed under one token, and when their lease ends."""

    token: str
    rows: list[dict]
    until: datetime
    lease: float
    found: int

    def hold(
        self, store: MembershipStore, delivery_ids: list[str], send_seconds: float
    ) -> set[str]:
        """Which of these rows are still this claim's, with time left to send them.

        The lease is renewed when less than two sends' worth of it is left; rows whose lease ended
        and that another worker claimed meanwhile are no longer this claim's.
        """
        wall = _utc_now()
        if (self.until - wall).total_seconds() >= 2 * send_seconds:
            return set(delivery_ids)
        until = wall + timedelta(seconds=self.lease)
        columns = deliveries.c
        ids = [row["delivery_id"] for row in self.rows]
        held: set[str] = set()
        with store.engine.begin() as connection:
            for start in range(0, len(ids), REPLAY_CHUNK):
                held.update(
                    row[0]
                    for row in connection.execute(
                        deliveries.update()
                        .where(
                            columns.delivery_id.in_(ids[start : start + REPLAY_CHUNK]),
                            columns.claimed_by == self.token,
                            columns.status == "pending",
                        )
                        .values(claimed_until=_text(until))
                        .returning(columns.delivery_id)
                    )
                )
        self.until = until
        return held & set(delivery_ids)


_CLAIMED_COLUMNS = (
    deliveries.c.delivery_id,
    deliveries.c.workflow_key,
    deliveries.c.sink,
    deliveries.c.payload,
    deliveries.c.attempts,
    deliveries.c.next_attempt_at,
    deliveries.c.created_at,
    deliveries.c.message_id,
)


def _order(row: dict) -> tuple[str, str, str]:
    return (row["next_attempt_at"], row["created_at"], row["delivery_id"])


def first_of_its_recipient() -> sa.ColumnElement[bool]:
    """No delivery of the same recipient to the same sink waits before this one.

    A recipient is an (audience, user, tenant); "before" is queue order (`created_at`, then the
    delivery id). A claim takes only such deliveries, so one recipient's deliveries to a sink go
    out one at a time in the order they were queued, across retries and across workers: an
    `exited` waits for the `entered` before it to be delivered (or dead, or held), whatever that
    one's back-off. It also keeps two deliveries of one recipient out of one claim, so a sink may
    send a claim's deliveries concurrently.
    """
    this, earlier = deliveries.c, _EARLIER.c
    return ~sa.exists().where(
        earlier.user_id == this.user_id,
        earlier.audience_key == this.audience_key,
        earlier.sink == this.sink,
        earlier.status == "pending",
        earlier.tenant.is_not_distinct_from(this.tenant),
        sa.or_(
            earlier.created_at < this.created_at,
            sa.and_(
                earlier.created_at == this.created_at,
                earlier.delivery_id < this.delivery_id,
            ),
        ),
    )


_EARLIER = deliveries.alias("earlier")


def _claim(
    work: _Pass, sink_name: str, sink: Sink, token: str, lease: float, size: int, skipped: set[str]
) -> _Claim:
    """Claim up to `size` due rows of one sink (and the rest of their batches) in one transaction.

    A row can be claimed when it is pending and unclaimed or its lease has ended. The rows are read
    and locked, then written with the claim, in one transaction: on SQLite it holds the write lock
    from its start, so no other worker reads them in between; on PostgreSQL rows that another
    transaction is claiming are skipped (`FOR UPDATE SKIP LOCKED`). A batch is claimed whole: when
    another worker holds part of it (possible only in that race on PostgreSQL), this claim leaves
    it and skips it for the rest of the pass. New batches of a `keeps_batches` sink are formed
    here, their ids written with the claim, before anything is sent.
    """
    columns = deliveries.c
    wall = _utc_now()
    until = wall + timedelta(seconds=lease)
    free = sa.or_(columns.claimed_until.is_(None), columns.claimed_until < _text(wall))
    conditions = [
        columns.status == "pending",
        columns.sink == sink_name,
        columns.next_attempt_at <= work.due_text,
        free,
    ]
    if skipped:
        conditions.append(columns.delivery_id.not_in(sorted(skipped)))
    conditions.append(first_of_its_recipient())
    # A read first (on SQLite in WAL mode it waits for no writer): a claim that finds nothing
    # takes no write turn. Every pass ends with such a claim, and the always-on worker runs one
    # each time it is woken, while real time's and the API's writes wait for the same lock.
    with work.store.read_engine.connect() as connection:
        if (
            connection.execute(sa.select(columns.delivery_id).where(*conditions).limit(1)).first()
            is None
        ):
            return _Claim(token, [], until, lease, 0)
    due = (
        sa.select(*_CLAIMED_COLUMNS)
        .where(*conditions)
        .order_by(columns.next_attempt_at, columns.created_at, columns.delivery_id)
        .limit(size)
        .with_for_update(skip_locked=True)
    )
    with work.store.engine.begin() as connection:
        rows = [dict(row._mapping) for row in connection.execute(due)]
        found = len(rows)
        messages = sorted({row["message_id"] for row in rows if row["message_id"]})
        if messages:
            rows = _whole_batches(connection, rows, messages, free, skipped)
        if getattr(sink, "keeps_batches", False):
            _form_batches(rows, int(sink.batch_size))
        _write_claim(connection, rows, token, until)
    rows.sort(key=_order)
    return _Claim(token, rows, until, lease, found)


def _write_claim(connection, rows: list[dict], token: str, until: datetime) -> None:
    """Write the claim (and batch ids) on the rows: one statement per batch, or per chunk of rows."""
    groups: dict[str | None, list[str]] = {}
    for row in rows:
        groups.setdefault(row["message_id"], []).append(row["delivery_id"])
    claim = {"claimed_by": token, "claimed_until": _text(until)}
    for message_id, ids in groups.items():
        for start in range(0, len(ids), REPLAY_CHUNK):
            connection.execute(
                deliveries.update()
                .where(deliveries.c.delivery_id.in_(ids[start : start + REPLAY_CHUNK]))
                .values(**claim, **({"message_id": message_id} if message_id else {}))
            )


def _whole_batches(connection, rows: list[dict], messages: list[str], free, skipped: set[str]):
    """Add the other pending rows of the claimed rows' batches; leave batches held elsewhere."""
    columns = deliveries.c
    pending_members = sa.and_(columns.message_id.in_(messages), columns.status == "pending")
    taken = {row["delivery_id"] for row in rows}
    for row in connection.execute(
        sa.select(*_CLAIMED_COLUMNS).where(pending_members, free).with_for_update(skip_locked=True)
    ):
        if row.delivery_id not in taken:
            taken.add(row.delivery_id)
            rows.append(dict(row._mapping))
    partial = {
        message_id
        for message_id, delivery_id in connection.execute(
            sa.select(columns.message_id, columns.delivery_id).where(pending_members)
        )
        if delivery_id not in taken
    }
    if partial:
        skipped.update(row["delivery_id"] for row in rows if row["message_id"] in partial)
        rows = [row for row in rows if row["message_id"] not in partial]
    return rows


def _form_batches(rows: list[dict], batch_size: int) -> None:
    """Give claimed rows that are in no batch yet a batch and its id (written with the claim).

    New rows form batches of `batch_size` in queue order. A row already attempted without a batch
    (sent before batches were kept) becomes a batch of its own under its delivery id, so it keeps
    the one id a receiver may have seen.
    """
    forming: list[dict] = []

    def close(batch: list[dict], message_id: str) -> None:
        for row in batch:
            row["message_id"] = message_id

    for row in sorted((row for row in rows if not row["message_id"]), key=_order):
        if int(row["attempts"] or 0) > 0:
            close([row], row["delivery_id"])
            continue
        forming.append(row)
        if len(forming) == batch_size:
            close(forming, batch_message_id([member["delivery_id"] for member in forming]))
            forming = []
    if forming:
        close(forming, batch_message_id([member["delivery_id"] for member in forming]))


def _units(rows: list[dict], chunk_size: int) -> list[tuple[list[dict], bool]]:
    """What one send carries, in queue order: a whole batch (True), or up to `chunk_size` rows."""
    members: dict[str, list[dict]] = {}
    for row in rows:
        if row["message_id"]:
            members.setdefault(row["message_id"], []).append(row)
    units: list[tuple[list[dict], bool]] = []
    loose: list[dict] = []
    for row in rows:
        message_id = row["message_id"]
        if message_id:
            if message_id in members:
                units.append((members.pop(message_id), True))
            continue
        loose.append(row)
        if len(loose) == chunk_size:
            units.append((loose, False))
            loose = []
    if loose:
        units.append((loose, False))
    return units


def _release(store: MembershipStore, token: str, rows: list[dict]) -> None:
    """Give back those of these rows that are still claimed under `token` (found by key)."""
    ids = [row["delivery_id"] for row in rows]
    if not ids:
        return
    with store.engine.begin() as connection:
        for start in range(0, len(ids), REPLAY_CHUNK):
            connection.execute(
                deliveries.update()
                .where(
                    deliveries.c.delivery_id.in_(ids[start : start + REPLAY_CHUNK]),
                    deliveries.c.claimed_by == token,
                )
                .values(claimed_by=None, claimed_until=None)
            )


def _send_unit(
    work: _Pass,
    sink_name: str,
    sink: Sink,
    rows: list[dict],
    together: bool,
    claim: _Claim,
    recorder: _OutcomeRecorder,
    send_seconds: float,
    sends: _Sends,
) -> None:
    sendable: list[tuple[dict, Delivery]] = []
    for row in rows:
        delivery, error = _delivery(row)
        if delivery is None:
            recorder.unreadable(sink_name, row, error, claim.token)
        else:
            sendable.append((row, delivery))
    if not sendable:
        return
    sends.free_slot()
    bucket = work.bucket(sink_name, sink)
    if bucket is not None:
        bucket.acquire(len(sendable))
    held = claim.hold(work.store, [row["delivery_id"] for row, _ in sendable], send_seconds)
    if len(held) < len(sendable):
        if together:
            # Part of the batch went to another worker (this worker's lease had ended): never send
            # a batch in part; give back the rest, so that worker can take the batch whole.
            _release(work.store, claim.token, rows)
            return
        sendable = [(row, delivery) for row, delivery in sendable if row["delivery_id"] in held]
        if not sendable:
            return
    batch = [delivery for _, delivery in sendable]
    sent_rows = [row for row, _ in sendable]

    def send() -> list[Outcome]:
        try:
            outcomes = list(sink.send(batch))
        except Exception as error:  # a sink should not raise; if one does, the batch is retried
            return [
                Outcome.retry(f"sink {sink_name!r} raised {type(error).__name__}: {error}")
            ] * len(batch)
        if len(outcomes) != len(batch):
            message = (
                f"sink {sink_name!r} answered {len(outcomes)} outcomes for {len(batch)} deliveries"
            )
            return [Outcome.retry(message)] * len(batch)
        return outcomes

    # One jitter draw per send, drawn as it starts (in queue order, whatever order sends in flight
    # end in): deliveries that went out in one request and are retried come back due together.
    jitter = work.jitter()

    def done(outcomes: list[Outcome]) -> None:
        recorder.record_send(
            sink_name, sent_rows, outcomes, work.moment(), jitter, claim.token, together
        )

    sends.start(send, done, work.wake)


class _OutcomeRecorder:
    """Turns outcomes into row updates and writes them in bulk: by count, by time, at the end.

    Every update gives the row's claim back; a retry or a dead letter is written only while the
    row is still this worker's (a delivery another worker took over keeps that worker's outcome),
    a delivery whatever happened meanwhile, because it was in fact sent.
    """

    def __init__(self, work: _Pass, report: DeliveryReport):
        self.work = work
        self.report = report
        self._delivered: list[dict] = []
        self._retried: list[dict] = []
        self._dead: list[dict] = []
        self._last_flush = work.clock()

    def record_send(
        self,
        sink_name: str,
        rows: list[dict],
        outcomes: list[Outcome],
        moment: datetime,
        jitter: float,
        token: str,
        together: bool,
    ) -> None:
        """Record the outcomes of one send; a batch's rows share one attempt count."""
        shared = max(int(row["attempts"] or 0) for row in rows) + 1 if together else None
        for row, outcome in zip(rows, outcomes, strict=True):
            attempts = shared if shared is not None else int(row["attempts"] or 0) + 1
            try:
                self._record(sink_name, row, outcome, attempts, moment, jitter, token)
            # One outcome that cannot be recorded (a sink's bad answer) costs no other its record.
            except Exception as error:
                fallback = Outcome.retry(
                    f"could not record {outcome!r}: {type(error).__name__}: {error}"
                )
                self._record(sink_name, row, fallback, attempts, moment, jitter, token)
        pending = len(self._delivered) + len(self._retried) + len(self._dead)
        if pending >= FLUSH_OUTCOMES or self.work.clock() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def _record(
        self,
        sink_name: str,
        row: dict,
        outcome: Outcome,
        attempts: int,
        moment: datetime,
        jitter: float,
        token: str,
    ) -> None:
        work = self.work
        delivery_id = row["delivery_id"]
        if outcome.status == "delivered":
            self._delivered.append(
                {"b_id": delivery_id, "b_attempts": attempts, "b_at": _text(moment)}
            )
            self.report.add(sink_name, "delivered")
        elif outcome.status == "retry" and attempts < work.max_attempts:
            delay = (
                outcome.retry_after
                if outcome.retry_after is not None
                else self._backoff(attempts - 1, jitter)
            )
            # A receiver's Retry-After is honoured up to the longest back-off, so a receiver that
            # asks for years (or for more than a date can hold) still has its deliveries retried,
            # and their attempts counted towards the dead-letter list.
            delay = work.max_delay if math.isnan(delay) else min(max(0.0, delay), work.max_delay)
            next_attempt = max(moment + timedelta(seconds=delay), work.due_at + _MICROSECOND)
            self._retried.append(
                {
                    "b_id": delivery_id,
                    "b_attempts": attempts,
                    "b_error": outcome.error or "retry",
                    "b_next": _text(next_attempt),
                    "b_token": token,
                }
            )
            self.report.add(sink_name, "retried")
        else:
            if outcome.status == "retry":
                error = f"{outcome.error or 'retry'} (gave up after {attempts} attempts)"
            elif outcome.status == "failed":
                error = outcome.error or "failed"
            else:
                error = f"sink answered an unknown outcome {outcome.status!r}: {outcome.error}"
            self._dead.append(
                {"b_id": delivery_id, "b_attempts": attempts, "b_error": error, "b_token": token}
            )
            self.report.add(sink_name, "dead")

    def unreadable(self, sink_name: str, row: dict, error: str, token: str) -> None:
        """A row that cannot become a `Delivery` (payload not a JSON object): dead at once."""
        attempts = int(row["attempts"] or 0)
        self._dead.append(
            {"b_id": row["delivery_id"], "b_attempts": attempts, "b_error": error, "b_token": token}
        )
        self.report.add(sink_name, "dead")

    def flush(self) -> None:
        if self._delivered or self._retried or self._dead:
            with self.work.store.engine.begin() as connection:
                if self._delivered:
                    connection.execute(_MARK_DELIVERED, self._delivered)
                if self._retried:
                    connection.execute(_MARK_RETRY, self._retried)
                if self._dead:
                    connection.execute(_MARK_DEAD, self._dead)
            self._delivered, self._retried, self._dead = [], [], []
        self._last_flush = self.work.clock()

    def _backoff(self, previous_attempts: int, jitter: float) -> float:
        work = self.work
        return jitter * min(work.max_delay, work.base_delay * 2 ** min(previous_attempts, 64))


def _delivery(row: dict) -> tuple[Delivery | None, str | None]:
    try:
        payload = json.loads(row["payload"])
    except (TypeError, ValueError) as error:
        return None, f"payload is not valid JSON: {error}"
    if not isinstance(payload, dict):
        return None, f"payload must be a JSON object, not {type(payload).__name__}"
    delivery = Delivery(
        row["delivery_id"],
        row["workflow_key"],
        payload,
        int(row["attempts"] or 0),
        message_id=row.get("message_id"),
    )
    return delivery, None


def _unknown_sink_counts(
    store: MembershipStore, due_text: str, known: list[str]
) -> list[tuple[str, int]]:
    columns = deliveries.c
    statement = (
        sa.select(columns.sink, sa.func.count())
        .where(
            columns.status == "pending",
            columns.next_attempt_at <= due_text,
            columns.sink.not_in(known),
        )
        .group_by(columns.sink)
        .order_by(columns.sink)
    )
    with store.read_engine.connect() as connection:
        return [(sink, count) for sink, count in connection.execute(statement)]


def _chunk_size(sink: Sink) -> int:
    """How many loose deliveries one send carries: the sink's `batch_size`."""
    return max(1, int(sink.batch_size))


def _concurrency(sink: Sink) -> int:
    """How many sends of the sink may be in flight at once: its `concurrency`, else 1."""
    return max(1, int(getattr(sink, "concurrency", 1) or 1))


def _send_seconds(sink: Sink) -> float:
    timeout = getattr(sink, "timeout_seconds", None)
    if isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0:
        return float(timeout)
    return SEND_SECONDS


def _count(result) -> int:
    return max(result.rowcount or 0, 0)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


# Bulk updates, run with one parameter set per delivery (executemany). Each gives the claim back.
# Retries and dead letters only touch rows still pending and still claimed by the worker that sent
# them, so a delivery held, discarded or taken over meanwhile keeps that decision; a delivered one
# is recorded whatever happened meanwhile, because it was in fact sent.
_UNCLAIMED = {"claimed_by": None, "claimed_until": None}
_MARK_DELIVERED = (
    deliveries.update()
    .where(deliveries.c.delivery_id == sa.bindparam("b_id"))
    .values(
        status="delivered",
        attempts=sa.bindparam("b_attempts"),
        delivered_at=sa.bindparam("b_at"),
        **_UNCLAIMED,
    )
)
_MARK_RETRY = (
    deliveries.update()
    .where(
        deliveries.c.delivery_id == sa.bindparam("b_id"),
        deliveries.c.status == "pending",
        deliveries.c.claimed_by == sa.bindparam("b_token"),
    )
    .values(
        attempts=sa.bindparam("b_attempts"),
        last_error=sa.bindparam("b_error"),
        next_attempt_at=sa.bindparam("b_next"),
        **_UNCLAIMED,
    )
)
_MARK_DEAD = (
    deliveries.update()
    .where(
        deliveries.c.delivery_id == sa.bindparam("b_id"),
        deliveries.c.status == "pending",
        deliveries.c.claimed_by == sa.bindparam("b_token"),
    )
    .values(
        status="dead",
        attempts=sa.bindparam("b_attempts"),
        last_error=sa.bindparam("b_error"),
        **_UNCLAIMED,
    )
)
