"""The delivery loop: send due deliveries to their sinks, at least once, and record what happened.

Deliveries wait in the store's `deliveries` table. A pass (`deliver_due`) picks the pending ones
whose `next_attempt_at` has come, sends them per sink in the sink's batch size and within its rate
limit, and records every outcome in the same pass: delivered, retried later with exponential
back-off and full jitter (or exactly when the receiver's `Retry-After` says), or dead after a
permanent refusal or too many attempts. Dead deliveries are the dead-letter list: `replay` puts them
back in the queue once the cause is fixed. Because a crash can happen between a send and its record,
a delivery may be sent twice; sinks carry the delivery id as idempotency key so receivers (Knock
among them) run it once.

Everything goes through SQLAlchemy Core on `store.engine`, in transactions and in bulk, so the same
code runs on SQLite and PostgreSQL and keeps up with thousands of deliveries a second.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from audiences.delivery import Delivery, Outcome
from audiences.delivery.sinks import Sink
from audiences.membership.store import MembershipStore, deliveries

# Rows read per query, and the most outcomes (or seconds) held in memory before they are written.
PAGE_SIZE = 1000
FLUSH_OUTCOMES = 500
FLUSH_SECONDS = 1.0
# Dead-letter ids replayed per statement (an IN list), well under every database's parameter limit.
REPLAY_CHUNK = 500

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


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
    batch waits longer and the average still holds.
    """

    def __init__(
        self,
        rate: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not rate > 0:
            raise ValueError(f"a rate limit must be positive, not {rate!r}")
        self.rate = float(rate)
        self.capacity = max(1.0, float(capacity if capacity is not None else rate))
        self.tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()

    def acquire(self, count: int) -> None:
        """Take `count` tokens, sleeping first for as long as the bucket needs to hold them."""
        self._refill()
        needed = min(float(count), self.capacity)
        if self.tokens < needed:
            self._sleep((needed - self.tokens) / self.rate)
            self._refill()
        self.tokens -= count

    def _refill(self) -> None:
        moment = self._clock()
        self.tokens = min(self.capacity, self.tokens + (moment - self._updated) * self.rate)
        self._updated = moment


def deliver_due(
    store: MembershipStore,
    sinks: Mapping[str, Sink],
    *,
    now: datetime | None = None,
    max_attempts: int = 8,
    limit: int | None = None,
    base_delay: float = 1.0,
    max_delay: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rate_limiters: dict[str, TokenBucket] | None = None,
    rng: random.Random | None = None,
) -> DeliveryReport:
    """Send every due pending delivery (at most `limit`) to its sink and record each outcome.

    Due means status 'pending' and `next_attempt_at` <= `now` (default: the current UTC time), in
    order of `next_attempt_at`, then `created_at`. Each sink gets its deliveries in batches of its
    `batch_size` (times its `concurrency`, when it has one), paced by a token bucket at its
    `rate_limit_per_second` (`clock` and `sleep` drive it; pass `rate_limiters` to keep buckets
    across passes). Outcomes are written in bulk as the pass goes: delivered sets status
    'delivered' and `delivered_at`; retry adds an attempt, keeps the error and sets
    `next_attempt_at` to the sink's `retry_after` exactly when given, else to a random delay up to
    `min(max_delay, base_delay * 2**attempts)` (full jitter, one draw per send); a failed outcome,
    an unreadable payload, or a retry that reaches `max_attempts` sets status 'dead'. Deliveries
    whose sink is not in `sinks` stay pending and are counted as skipped; 'held' and 'discarded'
    ones are never touched.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    rng = rng or random.Random()
    pass_now = _as_utc(now) if now is not None else datetime.now(timezone.utc)
    due_text = _text(pass_now)
    buckets = rate_limiters if rate_limiters is not None else {}
    report = DeliveryReport()
    recorder = _OutcomeRecorder(
        store,
        report,
        due_text=due_text,
        max_attempts=max_attempts,
        base_delay=base_delay,
        max_delay=max_delay,
        rng=rng,
        clock=clock,
        moment=(lambda: pass_now) if now is not None else _utc_now,
    )
    chunk_sizes = {name: _chunk_size(sink) for name, sink in sinks.items()}
    page_size = max([PAGE_SIZE, *chunk_sizes.values()])
    known = sorted(sinks)

    cursor: tuple[str, str, str] | None = None
    remaining = limit
    while known and (remaining is None or remaining > 0):
        size = page_size if remaining is None else min(page_size, remaining)
        rows = store.rows(_due_page(due_text, known, cursor, size))
        if not rows:
            break
        fetched = len(rows)
        last = rows[-1]
        cursor = (last["next_attempt_at"], last["created_at"], last["delivery_id"])
        # A retry whose delay came out as zero is due again at once and sorts after the cursor;
        # it waits for the next pass rather than being sent twice in this one.
        rows = [row for row in rows if row["delivery_id"] not in recorder.requeued_now]
        for sink_name, group in _by_sink(rows).items():
            sink = sinks[sink_name]
            bucket = _bucket(buckets, sink_name, sink, clock, sleep)
            step = chunk_sizes[sink_name]
            for start in range(0, len(group), step):
                _send_chunk(sink_name, sink, group[start : start + step], bucket, recorder)
        if remaining is not None:
            remaining -= len(rows)
        if fetched < size:
            break
    recorder.flush()

    for sink_name, count in _unknown_sink_counts(store, due_text, known):
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
    unless one is given); when a pass sends nothing, the loop sleeps `poll_seconds` (through the
    `sleep` argument when given) before looking again. Rate-limit buckets live across passes, so a
    busy queue stays within each sink's limit. Returns the totals of all passes.
    """
    sleep = kwargs.get("sleep", time.sleep)
    kwargs.setdefault("rate_limiters", {})
    totals = DeliveryReport()
    while not (stop and stop()):
        report = deliver_due(store, sinks, **kwargs)
        totals.merge(report)
        if report.attempted == 0:
            sleep(poll_seconds)
    return totals


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


class _OutcomeRecorder:
    """Turns outcomes into row updates and writes them in bulk: by count, by time, at the end."""

    def __init__(
        self, store, report, *, due_text, max_attempts, base_delay, max_delay, rng, clock, moment
    ):
        self.store = store
        self.due_text = due_text
        self.report = report
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.rng = rng
        self.clock = clock
        self.moment = moment
        self.requeued_now: set[str] = set()
        self._delivered: list[dict] = []
        self._retried: list[dict] = []
        self._dead: list[dict] = []
        self._last_flush = clock()

    def record(
        self, sink_name: str, row: dict, outcome: Outcome, moment: datetime, jitter: float
    ) -> None:
        attempts = int(row["attempts"] or 0) + 1
        delivery_id = row["delivery_id"]
        if outcome.status == "delivered":
            self._delivered.append(
                {"b_id": delivery_id, "b_attempts": attempts, "b_at": _text(moment)}
            )
            self.report.add(sink_name, "delivered")
        elif outcome.status == "retry" and attempts < self.max_attempts:
            delay = (
                outcome.retry_after
                if outcome.retry_after is not None
                else self._backoff(attempts - 1, jitter)
            )
            next_attempt = _text(moment + timedelta(seconds=max(0.0, delay)))
            if next_attempt <= self.due_text:
                self.requeued_now.add(delivery_id)
            self._retried.append(
                {
                    "b_id": delivery_id,
                    "b_attempts": attempts,
                    "b_error": outcome.error or "retry",
                    "b_next": next_attempt,
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
            self._dead.append({"b_id": delivery_id, "b_attempts": attempts, "b_error": error})
            self.report.add(sink_name, "dead")
        pending = len(self._delivered) + len(self._retried) + len(self._dead)
        if pending >= FLUSH_OUTCOMES or self.clock() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def unreadable(self, sink_name: str, row: dict, error: str) -> None:
        """A row that cannot become a `Delivery` (payload not a JSON object): dead at once."""
        attempts = int(row["attempts"] or 0)
        self._dead.append({"b_id": row["delivery_id"], "b_attempts": attempts, "b_error": error})
        self.report.add(sink_name, "dead")

    def flush(self) -> None:
        if self._delivered or self._retried or self._dead:
            with self.store.engine.begin() as connection:
                if self._delivered:
                    connection.execute(_MARK_DELIVERED, self._delivered)
                if self._retried:
                    connection.execute(_MARK_RETRY, self._retried)
                if self._dead:
                    connection.execute(_MARK_DEAD, self._dead)
            self._delivered, self._retried, self._dead = [], [], []
        self._last_flush = self.clock()

    def _backoff(self, previous_attempts: int, jitter: float) -> float:
        return jitter * min(self.max_delay, self.base_delay * 2 ** min(previous_attempts, 64))


def _send_chunk(
    sink_name: str, sink: Sink, rows: list[dict], bucket: TokenBucket | None, recorder
) -> None:
    sendable: list[tuple[dict, Delivery]] = []
    for row in rows:
        delivery, error = _delivery(row)
        if delivery is None:
            recorder.unreadable(sink_name, row, error)
        else:
            sendable.append((row, delivery))
    if not sendable:
        return
    if bucket is not None:
        bucket.acquire(len(sendable))
    batch = [delivery for _, delivery in sendable]
    try:
        outcomes = list(sink.send(batch))
    except Exception as error:  # a sink should not raise; if one does, the batch is retried
        outcomes = [
            Outcome.retry(f"sink {sink_name!r} raised {type(error).__name__}: {error}")
        ] * len(batch)
    if len(outcomes) != len(batch):
        message = (
            f"sink {sink_name!r} answered {len(outcomes)} outcomes for {len(batch)} deliveries"
        )
        outcomes = [Outcome.retry(message)] * len(batch)
    moment = recorder.moment()
    # One jitter draw per send: deliveries that went out together and are retried come back due
    # together, so a batching sink sends the same batch again (with the same webhook id).
    jitter = recorder.rng.random()
    for (row, _), outcome in zip(sendable, outcomes):
        recorder.record(sink_name, row, outcome, moment, jitter)


def _delivery(row: dict) -> tuple[Delivery | None, str | None]:
    try:
        payload = json.loads(row["payload"])
    except (TypeError, ValueError) as error:
        return None, f"payload is not valid JSON: {error}"
    if not isinstance(payload, dict):
        return None, f"payload must be a JSON object, not {type(payload).__name__}"
    return Delivery(
        row["delivery_id"], row["workflow_key"], payload, int(row["attempts"] or 0)
    ), None


def _due_page(due_text: str, sinks: list[str], cursor: tuple[str, str, str] | None, size: int):
    columns = deliveries.c
    conditions = [
        columns.status == "pending",
        columns.next_attempt_at <= due_text,
        columns.sink.in_(sinks),
    ]
    if cursor is not None:
        # Keyset pagination on (next_attempt_at, created_at, delivery_id), spelled out for
        # databases without row-value comparison.
        at, created, delivery_id = cursor
        conditions.append(
            sa.or_(
                columns.next_attempt_at > at,
                sa.and_(columns.next_attempt_at == at, columns.created_at > created),
                sa.and_(
                    columns.next_attempt_at == at,
                    columns.created_at == created,
                    columns.delivery_id > delivery_id,
                ),
            )
        )
    return (
        sa.select(
            columns.delivery_id,
            columns.workflow_key,
            columns.sink,
            columns.payload,
            columns.attempts,
            columns.next_attempt_at,
            columns.created_at,
        )
        .where(*conditions)
        .order_by(columns.next_attempt_at, columns.created_at, columns.delivery_id)
        .limit(size)
    )


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


def _by_sink(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["sink"], []).append(row)
    return groups


def _chunk_size(sink: Sink) -> int:
    return max(1, int(sink.batch_size)) * max(1, int(getattr(sink, "concurrency", 1) or 1))


def _bucket(
    buckets: dict[str, TokenBucket], name: str, sink: Sink, clock, sleep
) -> TokenBucket | None:
    rate = sink.rate_limit_per_second
    if rate is None:
        return None
    bucket = buckets.get(name)
    if bucket is None or bucket.rate != float(rate):
        bucket = buckets[name] = TokenBucket(rate, clock=clock, sleep=sleep)
    return bucket


def _count(result) -> int:
    return max(result.rowcount or 0, 0)


def _as_utc(moment: datetime) -> datetime:
    return (
        moment.replace(tzinfo=timezone.utc)
        if moment.tzinfo is None
        else moment.astimezone(timezone.utc)
    )


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _text(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime(_TIME_FORMAT)


# Bulk updates, run with one parameter set per delivery (executemany). Retries and dead letters only
# touch rows still pending, so a delivery held or discarded meanwhile keeps that decision; a
# delivered one is recorded whatever happened meanwhile, because it was in fact sent.
_MARK_DELIVERED = (
    deliveries.update()
    .where(deliveries.c.delivery_id == sa.bindparam("b_id"))
    .values(
        status="delivered", attempts=sa.bindparam("b_attempts"), delivered_at=sa.bindparam("b_at")
    )
)
_MARK_RETRY = (
    deliveries.update()
    .where(deliveries.c.delivery_id == sa.bindparam("b_id"), deliveries.c.status == "pending")
    .values(
        attempts=sa.bindparam("b_attempts"),
        last_error=sa.bindparam("b_error"),
        next_attempt_at=sa.bindparam("b_next"),
    )
)
_MARK_DEAD = (
    deliveries.update()
    .where(deliveries.c.delivery_id == sa.bindparam("b_id"), deliveries.c.status == "pending")
    .values(status="dead", attempts=sa.bindparam("b_attempts"), last_error=sa.bindparam("b_error"))
)
