"""The delivery loop: back-off, Retry-After, dead letters, replay, rate limits, holds."""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from http_recorder import (
    HttpRecorder,
    Reply,
    delivery_row,
    delivery_row_values,
    insert_deliveries,
    insert_delivery,
)

from audiences.delivery import Outcome
from audiences.delivery.loop import (
    TokenBucket,
    deliver_due,
    delivery_status,
    replay,
    run_delivery_loop,
)
from audiences.delivery.sinks import FileSink, KnockSink, WebhookSink
from audiences.store.database import MembershipStore

T0 = datetime(2026, 11, 27, 1, 2, 3, 123456, tzinfo=UTC)
SECRET = "whsec_" + base64.b64encode(b"loop tests secret").decode()


def text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class FakeClock:
    """A monotonic clock that moves only when the loop sleeps: rate limits measured, not waited."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def recorder():
    with HttpRecorder() as server:
        yield server


@pytest.fixture
def knock(recorder):
    sink = KnockSink("knock", recorder.url, "sk_test", timeout_seconds=0.5)
    yield sink
    sink.close()


@pytest.fixture
def webhook(recorder):
    sink = WebhookSink("webhook", f"{recorder.url}/hooks", SECRET, timeout_seconds=0.3)
    yield sink
    sink.close()


def pending(store, delivery_id, sink, **columns):
    return insert_delivery(store, delivery_id, sink=sink, next_attempt_at=text(T0), **columns)


# -- retries --------------------------------------------------------------------------------------


def test_server_error_then_success_delivers_on_retry_with_the_same_idempotency_key(
    store, knock, recorder
):
    pending(store, "dlv-1", "knock")
    recorder.script(500, 200)

    first = deliver_due(store, {"knock": knock}, now=T0)
    row = delivery_row(store, "dlv-1")
    assert (first.retried, row["status"], row["attempts"]) == (1, "pending", 1)
    assert "HTTP 500" in row["last_error"]
    assert text(T0) <= row["next_attempt_at"] <= text(at(1))  # full jitter up to base_delay

    second = deliver_due(store, {"knock": knock}, now=at(1))
    row = delivery_row(store, "dlv-1")
    assert (second.delivered, row["status"], row["attempts"], row["delivered_at"]) == (
        1,
        "delivered",
        2,
        text(at(1)),
    )
    assert [request.header("idempotency-key") for request in recorder.requests] == [
        "dlv-1",
        "dlv-1",
    ]


def test_a_pass_that_finds_nothing_due_takes_no_write_transaction(store, webhook, recorder):
    """The always-on worker runs a pass each time it is woken, and every pass ends with a claim
    that finds nothing: that claim reads, it takes no write turn from real time and the API. A
    pass that sends writes its claim and its outcome."""
    pending(store, "dlv-1", "webhook", status="delivered")
    pending(store, "dlv-2", "webhook")
    writes: list[int] = []
    listener = lambda connection: writes.append(1)  # noqa: E731
    sa.event.listen(store.engine, "begin", listener)
    try:
        report = deliver_due(store, {"webhook": webhook}, now=at(-1))  # dlv-2 not due yet
        assert (report.attempted, len(writes)) == (0, 0)
        report = deliver_due(store, {"webhook": webhook}, now=T0)
        assert report.delivered == 1
        assert len(writes) == 2  # the claim and the outcome; the pass's last claim only read
    finally:
        sa.event.remove(store.engine, "begin", listener)


def test_a_retry_is_not_sent_again_before_it_is_due(store, knock, recorder):
    pending(store, "dlv-1", "knock")
    recorder.script(Reply(503, headers={"Retry-After": "60"}))
    deliver_due(store, {"knock": knock}, now=T0)

    report = deliver_due(store, {"knock": knock}, now=at(59))

    assert report.attempted == 0
    assert len(recorder.requests) == 1


def test_retry_after_sets_the_next_attempt_exactly(store, knock, recorder):
    pending(store, "dlv-1", "knock")
    recorder.script(Reply(429, headers={"Retry-After": "2"}))

    deliver_due(store, {"knock": knock}, now=T0)

    row = delivery_row(store, "dlv-1")
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("pending", 1, text(at(2)))
    assert "HTTP 429" in row["last_error"]


def test_hanging_past_the_timeout_is_retried(store, webhook, recorder):
    pending(store, "dlv-1", "webhook")
    recorder.script(Reply.hang(5))

    report = deliver_due(store, {"webhook": webhook}, now=T0)

    row = delivery_row(store, "dlv-1")
    assert (report.retried, row["status"], row["attempts"]) == (1, "pending", 1)
    assert "timed out" in row["last_error"]


def test_a_connection_reset_is_retried(store, webhook, recorder):
    pending(store, "dlv-1", "webhook")
    recorder.script(Reply.connection_reset())
    assert deliver_due(store, {"webhook": webhook}, now=T0).retried == 1


def test_a_bad_request_is_dead_at_once(store, knock, recorder):
    pending(store, "dlv-1", "knock")
    recorder.script(Reply(400, body=b'{"message": "recipients is required"}'))

    report = deliver_due(store, {"knock": knock}, now=T0)

    row = delivery_row(store, "dlv-1")
    assert (report.dead, row["status"], row["attempts"]) == (1, "dead", 1)
    assert "HTTP 400" in row["last_error"] and "recipients is required" in row["last_error"]
    assert deliver_due(store, {"knock": knock}, now=at(3600)).attempted == 0


def test_retries_stop_at_max_attempts_and_the_delivery_is_dead(store, knock, recorder):
    pending(store, "dlv-1", "knock")
    recorder.respond_with(lambda request: 500)

    outcomes = [
        deliver_due(store, {"knock": knock}, now=at(1000 * attempt), max_attempts=3)
        for attempt in range(3)
    ]

    assert [(report.retried, report.dead) for report in outcomes] == [(1, 0), (1, 0), (0, 1)]
    row = delivery_row(store, "dlv-1")
    assert (row["status"], row["attempts"]) == ("dead", 3)
    assert "gave up after 3 attempts" in row["last_error"]
    assert len(recorder.requests) == 3


def test_backoff_doubles_per_attempt_with_full_jitter_and_a_ceiling(store, knock, recorder):
    recorder.respond_with(lambda request: 500)
    for attempts in (0, 3, 20):
        pending(store, f"dlv-{attempts}", "knock", attempts=attempts)
    random_source = random.Random(7)
    # One draw per send, as each starts, in queue order (dlv-0, dlv-20, dlv-3: by id): the Knock
    # sink sends one delivery per request, several in flight at once.
    draws = random.Random(7)
    jitters = {attempts: draws.random() for attempts in (0, 20, 3)}

    deliver_due(
        store,
        {"knock": knock},
        now=T0,
        max_attempts=99,
        base_delay=1.0,
        max_delay=300.0,
        rng=random_source,
    )

    delays = {
        attempts: (
            datetime.strptime(
                delivery_row(store, f"dlv-{attempts}")["next_attempt_at"], "%Y-%m-%dT%H:%M:%S.%fZ"
            ).replace(tzinfo=UTC)
            - T0
        ).total_seconds()
        for attempts in (0, 3, 20)
    }
    assert all(0 < jitter < 1 for jitter in jitters.values())
    assert delays[0] == pytest.approx(jitters[0] * 1, abs=1e-6)
    assert delays[3] == pytest.approx(jitters[3] * 8, abs=1e-6)
    assert delays[20] == pytest.approx(jitters[20] * 300, abs=1e-6)


# -- dead letters ---------------------------------------------------------------------------------


def test_replay_of_dead_letters_delivers_them(store, knock, recorder):
    pending(store, "dlv-1", "knock")
    pending(store, "dlv-2", "knock")
    recorder.script(400, 400)
    assert deliver_due(store, {"knock": knock}, now=T0).dead == 2

    assert replay(store, delivery_ids=["dlv-1", "not-a-delivery"], now=at(10)) == 1
    row = delivery_row(store, "dlv-1")
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("pending", 0, text(at(10)))
    assert delivery_row(store, "dlv-2")["status"] == "dead"

    assert replay(store, all_dead=True, now=at(10)) == 1
    report = deliver_due(store, {"knock": knock}, now=at(10))

    assert report.delivered == 2
    assert {delivery_row(store, name)["status"] for name in ("dlv-1", "dlv-2")} == {"delivered"}


def test_replay_leaves_deliveries_that_are_not_dead_alone(store):
    pending(store, "dlv-1", "file")
    insert_delivery(store, "dlv-2", status="delivered")
    assert replay(store, delivery_ids=["dlv-1", "dlv-2"]) == 0
    assert replay(store, all_dead=True) == 0
    with pytest.raises(ValueError):
        replay(store)


def test_an_unreadable_payload_is_dead_without_being_sent(store, tmp_path):
    insert_delivery(store, "dlv-1", next_attempt_at=text(T0), payload="{not json")
    insert_delivery(store, "dlv-2", next_attempt_at=text(T0), payload="[1, 2]")
    path = tmp_path / "out.jsonl"

    report = deliver_due(store, {"file": FileSink("file", path)}, now=T0)

    assert report.dead == 2
    assert "not valid JSON" in delivery_row(store, "dlv-1")["last_error"]
    assert "JSON object" in delivery_row(store, "dlv-2")["last_error"]
    assert not path.exists()


# -- rate limits ----------------------------------------------------------------------------------


def test_rate_limit_is_respected_per_delivery(store, recorder):
    clock = FakeClock()
    sent_at: list[float] = []
    recorder.respond_with(lambda request: sent_at.append(clock.now) or 200)
    insert_deliveries(
        store,
        [
            delivery_row_values(f"dlv-{number:02}", sink="webhook", next_attempt_at=text(T0))
            for number in range(20)
        ],
    )
    # One send at a time: the fake clock moves when the loop sleeps for tokens, so requests in
    # flight together would read it at arbitrary moments (concurrent sends under a rate limit:
    # test_sink_concurrency.py, on the wall clock).
    sink = WebhookSink(
        "webhook", recorder.url, SECRET, rate_limit_per_second=5, timeout_seconds=1, concurrency=1
    )
    try:
        report = deliver_due(store, {"webhook": sink}, now=T0, clock=clock, sleep=clock.sleep)
    finally:
        sink.close()

    assert report.delivered == 20
    # A burst of one second's worth (5), then one every 0.2 s: 20 deliveries take 3 s.
    assert sent_at == pytest.approx([0.0] * 5 + [0.2 * step for step in range(1, 16)])
    for first in range(len(sent_at)):
        for last in range(first, len(sent_at)):
            assert last - first + 1 <= 5 + 5 * (sent_at[last] - sent_at[first]) + 1e-9


def test_rate_limit_counts_deliveries_not_requests_for_batching_sinks(store, recorder):
    clock = FakeClock()
    sent_at: list[float] = []
    recorder.respond_with(lambda request: sent_at.append(clock.now) or 200)
    insert_deliveries(
        store,
        [
            delivery_row_values(f"dlv-{number:02}", sink="webhook", next_attempt_at=text(T0))
            for number in range(40)
        ],
    )
    sink = WebhookSink(
        "webhook", recorder.url, SECRET, rate_limit_per_second=10, batch_size=10, timeout_seconds=1
    )
    try:
        deliver_due(store, {"webhook": sink}, now=T0, clock=clock, sleep=clock.sleep)
    finally:
        sink.close()

    assert [len(request.json()["data"]) for request in recorder.requests] == [10, 10, 10, 10]
    assert sent_at == pytest.approx([0.0, 1.0, 2.0, 3.0])


def test_rate_limit_carries_over_between_passes_of_the_watch_loop(store, tmp_path):
    clock = FakeClock()
    sink = FileSink("file", tmp_path / "out.jsonl", batch_size=1)
    sink.rate_limit_per_second = 2
    long_ago = "2000-01-01T00:00:00.000000Z"  # the watch loop uses the real clock for `now`
    insert_deliveries(
        store, [delivery_row_values(f"dlv-{n}", next_attempt_at=long_ago) for n in range(6)]
    )
    insert_delivery(store, "dlv-elsewhere", sink="webhook", next_attempt_at=long_ago)
    passes = []

    def stop() -> bool:
        passes.append(clock.now)
        return len(passes) > 3

    totals = run_delivery_loop(
        store,
        {"file": sink},
        poll_seconds=5,
        stop=stop,
        limit=3,
        clock=clock,
        sleep=clock.sleep,
    )

    assert (totals.delivered, totals.skipped_unknown_sink) == (6, 1)  # waiting, not summed
    assert totals.per_sink == {"file": {"delivered": 6}, "webhook": {"skipped_unknown_sink": 1}}
    # Pass 1 spends the burst of 2 and waits 0.5 s for the third; pass 2 keeps the empty bucket
    # and waits for every delivery; pass 3 finds nothing and sleeps the poll interval.
    assert passes == pytest.approx([0.0, 0.5, 2.0, 7.0])


def test_token_bucket_lets_a_batch_larger_than_a_second_go_into_debt():
    clock = FakeClock()
    bucket = TokenBucket(5, clock=clock, sleep=clock.sleep)
    bucket.acquire(12)  # the full bucket of 5 is enough to start; 7 tokens of debt remain
    bucket.acquire(1)
    assert clock.now == pytest.approx(1.6)


# -- what is never sent, and what cannot be -------------------------------------------------------


def test_held_and_discarded_deliveries_are_never_sent(store, knock, recorder):
    for status in ("held", "discarded", "delivered", "dead"):
        insert_delivery(
            store, f"dlv-{status}", sink="knock", status=status, next_attempt_at=text(T0)
        )
    pending(store, "dlv-pending", "knock")

    report = deliver_due(store, {"knock": knock}, now=at(3600))

    assert report.delivered == 1
    assert [request.header("idempotency-key") for request in recorder.requests] == ["dlv-pending"]
    assert delivery_row(store, "dlv-held")["status"] == "held"
    assert delivery_row(store, "dlv-discarded")["status"] == "discarded"


def test_a_missing_sink_leaves_its_deliveries_pending(store, tmp_path):
    pending(store, "dlv-1", "webhook")
    pending(store, "dlv-2", "webhook")
    pending(store, "dlv-3", "file")

    report = deliver_due(store, {"file": FileSink("file", tmp_path / "out.jsonl")}, now=T0)

    assert (report.delivered, report.skipped_unknown_sink) == (1, 2)
    assert report.per_sink == {"file": {"delivered": 1}, "webhook": {"skipped_unknown_sink": 2}}
    for name in ("dlv-1", "dlv-2"):
        row = delivery_row(store, name)
        assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("pending", 0, text(T0))


def test_deliveries_not_yet_due_wait(store, tmp_path):
    insert_delivery(store, "dlv-later", next_attempt_at=text(at(60)))
    report = deliver_due(store, {"file": FileSink("file", tmp_path / "out.jsonl")}, now=T0)
    assert report.attempted == 0
    assert delivery_row(store, "dlv-later")["status"] == "pending"


# -- order, batches, limits and status ------------------------------------------------------------


def test_due_deliveries_go_out_in_order_of_next_attempt_then_creation(store, tmp_path):
    rows = [
        delivery_row_values("c", next_attempt_at=text(at(2)), created_at=text(at(-10))),
        delivery_row_values("a", next_attempt_at=text(at(1)), created_at=text(at(-1))),
        delivery_row_values("b", next_attempt_at=text(at(1)), created_at=text(at(-2))),
    ]
    insert_deliveries(store, rows)
    path = tmp_path / "out.jsonl"

    deliver_due(store, {"file": FileSink("file", path)}, now=at(5))

    assert [json.loads(line)["delivery_id"] for line in path.read_text().splitlines()] == [
        "b",
        "a",
        "c",
    ]


def test_many_deliveries_go_through_in_batches_across_pages(store, tmp_path):
    insert_deliveries(
        store,
        [
            delivery_row_values(f"dlv-{number:05}", next_attempt_at=text(T0))
            for number in range(2500)
        ],
    )
    path = tmp_path / "out.jsonl"

    report = deliver_due(store, {"file": FileSink("file", path, batch_size=300)}, now=T0)

    assert report.delivered == 2500
    lines = path.read_text().splitlines()
    assert [json.loads(line)["delivery_id"] for line in lines] == [
        f"dlv-{number:05}" for number in range(2500)
    ]
    assert delivery_status(store)["totals"] == {"delivered": 2500}


def test_limit_caps_how_many_deliveries_one_pass_sends(store, tmp_path):
    insert_deliveries(
        store, [delivery_row_values(f"dlv-{n}", next_attempt_at=text(T0)) for n in range(5)]
    )
    sinks = {"file": FileSink("file", tmp_path / "out.jsonl")}
    assert deliver_due(store, sinks, now=T0, limit=3).delivered == 3
    assert deliver_due(store, sinks, now=T0, limit=3).delivered == 2


def test_a_webhook_batch_shares_one_request_and_one_outcome(store, recorder):
    for number in range(3):
        pending(store, f"dlv-{number}", "webhook")
    recorder.script(503, 200)
    sink = WebhookSink("webhook", recorder.url, SECRET, batch_size=3, timeout_seconds=1)
    try:
        first = deliver_due(store, {"webhook": sink}, now=T0)
        second = deliver_due(store, {"webhook": sink}, now=at(5))
    finally:
        sink.close()

    assert (first.retried, second.delivered) == (3, 3)
    assert (
        len({delivery_row(store, f"dlv-{number}")["next_attempt_at"] for number in range(3)}) == 1
    )
    assert [len(request.json()["data"]) for request in recorder.requests] == [3, 3]
    assert recorder.requests[0].header("webhook-id") == recorder.requests[1].header("webhook-id")


def test_delivery_status_counts_per_sink_and_the_oldest_pending(store):
    insert_delivery(store, "a", sink="file", next_attempt_at=text(at(5)))
    insert_delivery(store, "b", sink="file", next_attempt_at=text(at(1)))
    insert_delivery(store, "c", sink="file", status="dead")
    insert_delivery(store, "d", sink="knock", status="delivered")

    status = delivery_status(store)

    assert status == {
        "sinks": {"file": {"dead": 1, "pending": 2}, "knock": {"delivered": 1}},
        "totals": {"dead": 1, "delivered": 1, "pending": 2},
        "oldest_pending_next_attempt_at": text(at(1)),
    }
    other = MembershipStore(store.url)  # any connection sees the same rows
    try:
        assert delivery_status(other)["totals"] == status["totals"]
    finally:
        other.dispose()


# -- a batch keeps its id for life ----------------------------------------------------------------


def test_a_retried_batch_keeps_its_members_and_its_webhook_id_as_the_queue_changes(store, recorder):
    # A receiver that deduplicates on webhook-id, as Standard Webhooks asks, and answers 500 the
    # first time it sees an id (it processed the batch, then failed to say so).
    processed: list[str] = []
    seen: set[str] = set()

    def receive(request):
        webhook_id = request.header("webhook-id")
        if webhook_id in seen:
            return 200
        seen.add(webhook_id)
        processed.extend(item["delivery_id"] for item in request.json()["data"])
        return 500

    recorder.respond_with(receive)
    insert_deliveries(
        store,
        [
            delivery_row_values(f"dlv-{n}", sink="webhook", next_attempt_at=text(T0))
            for n in range(5)
        ],
    )
    sink = WebhookSink("webhook", recorder.url, SECRET, batch_size=3, timeout_seconds=1)
    try:
        assert deliver_due(store, {"webhook": sink}, now=T0).retried == 5
        # New deliveries, due before the retries: the pending set is not the one the batches
        # were cut from.
        insert_deliveries(
            store,
            [
                delivery_row_values(f"new-{n}", sink="webhook", next_attempt_at=text(at(-60)))
                for n in range(2)
            ],
        )
        deliver_due(store, {"webhook": sink}, now=at(5))
        deliver_due(store, {"webhook": sink}, now=at(10))
    finally:
        sink.close()

    everything = [f"dlv-{n}" for n in range(5)] + ["new-0", "new-1"]
    assert sorted(processed) == sorted(everything)  # each delivery processed once
    ids_of: dict[str, set[str]] = {}
    for request in recorder.requests:
        for item in request.json()["data"]:
            ids_of.setdefault(item["delivery_id"], set()).add(request.header("webhook-id"))
    assert {delivery_id: len(ids) for delivery_id, ids in ids_of.items()} == dict.fromkeys(
        everything, 1
    )
    assert {delivery_row(store, name)["status"] for name in everything} == {"delivered"}


# -- receivers that misbehave ---------------------------------------------------------------------


def test_a_retry_after_past_any_date_waits_the_longest_delay_and_counts_towards_dead_letters(
    store, recorder
):
    replies = {
        "/huge": Reply(429, headers={"Retry-After": "1e12"}),
        "/far": Reply(503, headers={"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}),
        "/fine": Reply(200),
    }
    recorder.respond_with(lambda request: replies[request.path])
    sinks = {
        name: WebhookSink(name, f"{recorder.url}/{name}", SECRET, timeout_seconds=1)
        for name in ("huge", "far", "fine")
    }
    for name in sinks:
        for number in range(3):
            pending(store, f"{name}-{number}", name)
    try:
        first = deliver_due(store, sinks, now=T0, max_delay=300, max_attempts=3)
        rows = {
            f"{name}-{n}": delivery_row(store, f"{name}-{n}") for name in sinks for n in range(3)
        }
        later = [
            deliver_due(store, sinks, now=at(300 * step), max_delay=300, max_attempts=3)
            for step in (1, 2)
        ]
    finally:
        for sink in sinks.values():
            sink.close()

    assert first.per_sink == {
        "fine": {"delivered": 3},
        "huge": {"retried": 3},
        "far": {"retried": 3},
    }
    for name in ("huge", "far"):
        for number in range(3):
            row = rows[f"{name}-{number}"]
            assert (row["status"], row["attempts"], row["next_attempt_at"]) == (
                "pending",
                1,
                text(at(300)),
            )
    assert [report.per_sink for report in later] == [
        {"huge": {"retried": 3}, "far": {"retried": 3}},
        {"huge": {"dead": 3}, "far": {"dead": 3}},
    ]
    dead = delivery_row(store, "far-0")
    assert dead["status"] == "dead" and "gave up after 3 attempts" in dead["last_error"]
    assert sum(request.path == "/fine" for request in recorder.requests) == 3


class MalformedRetrySink:
    """A sink that breaks its contract for one delivery: a retry_after that is not a number."""

    name, rate_limit_per_second, batch_size = "odd", None, 10

    def send(self, batch):
        return [
            Outcome("retry", "slow down", "soon")
            if delivery.delivery_id == "dlv-bad"
            else Outcome.delivered()
            for delivery in batch
        ]


def test_an_outcome_that_cannot_be_recorded_does_not_cost_the_others_their_record(store):
    for name in ("dlv-1", "dlv-bad", "dlv-2"):
        pending(store, name, "odd")

    report = deliver_due(store, {"odd": MalformedRetrySink()}, now=T0)

    assert (report.delivered, report.retried) == (2, 1)
    assert {delivery_row(store, name)["status"] for name in ("dlv-1", "dlv-2")} == {"delivered"}
    bad = delivery_row(store, "dlv-bad")
    assert (bad["status"], bad["attempts"], bad["claimed_by"]) == ("pending", 1, None)
    assert "could not record" in bad["last_error"]


# -- a slow sink holds up only itself -------------------------------------------------------------


@pytest.fixture
def two_receivers():
    with HttpRecorder() as hanging, HttpRecorder() as healthy:
        hanging.respond_with(lambda request: Reply.hang(10))
        yield hanging, healthy


def slow_and_fast(store, hanging, healthy):
    sinks = {
        "a-hangs": WebhookSink("a-hangs", hanging.url, SECRET, timeout_seconds=0.5),
        "b-fast": WebhookSink("b-fast", healthy.url, SECRET, timeout_seconds=0.5),
    }
    for name in sinks:
        for number in range(6):
            pending(store, f"{name}-{number}", name)
    return sinks


def test_a_hanging_sink_does_not_hold_up_the_other_sinks(store, two_receivers):
    hanging, healthy = two_receivers
    sinks = slow_and_fast(store, hanging, healthy)
    started = time.monotonic()
    try:
        report = deliver_due(store, sinks, now=T0)
    finally:
        for sink in sinks.values():
            sink.close()

    assert report.per_sink == {"a-hangs": {"retried": 6}, "b-fast": {"delivered": 6}}
    # The hanging receiver takes 6 x 0.5 s; the healthy one is served meanwhile, not after.
    assert max(request.received_at for request in healthy.requests) - started < 1.5


def test_a_pass_spends_at_most_its_time_on_a_sink_and_gives_back_what_it_did_not_send(
    store, two_receivers
):
    hanging, healthy = two_receivers
    sinks = slow_and_fast(store, hanging, healthy)
    # One send at a time, so that the budget, not the sends in flight, decides how many go out.
    sinks["a-hangs"] = WebhookSink(
        "a-hangs", hanging.url, SECRET, timeout_seconds=0.5, concurrency=1
    )
    started = time.monotonic()
    try:
        report = deliver_due(store, sinks, now=T0, seconds_per_sink=1.2)
    finally:
        for sink in sinks.values():
            sink.close()

    assert time.monotonic() - started < 1.2 + 0.5 + 1.0  # the budget, one send in flight, slack
    assert report.per_sink["b-fast"] == {"delivered": 6}
    assert 2 <= report.per_sink["a-hangs"]["retried"] <= 4
    waiting = [delivery_row(store, f"a-hangs-{n}") for n in range(6)]
    untried = [row for row in waiting if row["attempts"] == 0]
    assert len(untried) == 6 - report.per_sink["a-hangs"]["retried"]
    # Not sent, and not held either: the next pass, or another worker, takes them at once.
    assert {(row["status"], row["claimed_by"], row["claimed_until"]) for row in waiting} == {
        ("pending", None, None)
    }


# -- stores made before claims --------------------------------------------------------------------


def test_a_store_made_before_claims_gains_them_and_delivers(tmp_path):
    url = f"sqlite:///{tmp_path}/old.sqlite"
    old = sa.create_engine(url)
    with old.begin() as connection:
        connection.exec_driver_sql(
            "create table deliveries (delivery_id varchar(64) primary key, event_id varchar(64), "
            "broadcast_id varchar(64), workflow_key varchar(255) not null, sink varchar(255) not null, "
            "audience_key varchar(255) not null, user_id varchar(255) not null, tenant varchar(255), "
            "payload text not null, status varchar(16) not null, attempts integer default 0 not null, "
            "next_attempt_at varchar(32) not null, last_error text, batch_id varchar(64), "
            "created_at varchar(32) not null, delivered_at varchar(32))"
        )
        row = delivery_row_values("dlv-1", next_attempt_at=text(T0))
        for column in ("message_id", "claimed_by", "claimed_until"):
            row.pop(column, None)
        connection.execute(
            sa.text(
                f"insert into deliveries ({', '.join(row)}) values ({', '.join(':' + c for c in row)})"
            ),
            row,
        )
    old.dispose()

    store = MembershipStore(url).create()
    try:
        columns = {column["name"] for column in sa.inspect(store.engine).get_columns("deliveries")}
        assert {"message_id", "claimed_by", "claimed_until"} <= columns
        sink = FileSink("file", tmp_path / "out.jsonl")
        sink.rate_limit_per_second = 100
        assert deliver_due(store, {"file": sink}, now=T0).delivered == 1
        assert delivery_row(store, "dlv-1")["status"] == "delivered"
    finally:
        store.dispose()


def test_a_batch_partly_claimed_by_a_live_worker_is_left_whole_to_it(store, recorder):
    # Batch m-1 (two rows, already sent once) where another worker's live claim holds one row:
    # this pass must send neither row, and leave the free one unclaimed.
    later = text(datetime.now(UTC) + timedelta(minutes=5))
    insert_deliveries(
        store,
        [
            delivery_row_values(name, sink="webhook", attempts=1, next_attempt_at=text(T0))
            for name in ("dlv-a", "dlv-b", "dlv-c")
        ],
    )
    with store.engine.begin() as connection:
        connection.execute(
            sa.text(
                "update deliveries set message_id = 'm-1' where delivery_id in ('dlv-a', 'dlv-b')"
            )
        )
        connection.execute(
            sa.text(
                "update deliveries set claimed_by = 'other', claimed_until = :until "
                "where delivery_id = 'dlv-b'"
            ),
            {"until": later},
        )
    sink = WebhookSink("webhook", recorder.url, SECRET, batch_size=2, timeout_seconds=1)
    try:
        report = deliver_due(store, {"webhook": sink}, now=T0)
    finally:
        sink.close()

    assert report.delivered == 1
    assert [
        item["delivery_id"] for request in recorder.requests for item in request.json()["data"]
    ] == ["dlv-c"]
    assert recorder.requests[0].header("webhook-id") == "dlv-c"  # sent before without a batch
    a, b = delivery_row(store, "dlv-a"), delivery_row(store, "dlv-b")
    assert (a["status"], a["claimed_by"], a["attempts"]) == ("pending", None, 1)
    assert (b["claimed_by"], b["claimed_until"]) == ("other", later)


def test_a_worker_slowed_by_the_rate_limit_renews_its_lease_so_no_other_takes_its_rows(
    store, recorder
):
    # Leases of 0.6 s (three sends of 0.2 s) and 15 deliveries at 5 a second (after a burst of 5):
    # each worker's claim of ten rows outlasts its lease, and the other looks every 50 ms.
    recorder.respond_with(lambda request: 200)
    insert_deliveries(
        store,
        [
            delivery_row_values(f"dlv-{n}", sink="webhook", next_attempt_at=text(T0))
            for n in range(15)
        ],
    )

    def webhook():
        return WebhookSink(
            "webhook", recorder.url, SECRET, timeout_seconds=0.2, rate_limit_per_second=5
        )

    first_sink, second_sink = webhook(), webhook()
    started = threading.Event()
    done = threading.Event()

    def second_worker():
        started.wait()
        run_delivery_loop(
            store,
            {"webhook": second_sink},
            poll_seconds=0.05,
            stop=done.is_set,
            lease_seconds=0.3,
        )

    thread = threading.Thread(target=second_worker)
    thread.start()
    try:
        started.set()
        report = deliver_due(store, {"webhook": first_sink}, now=T0, lease_seconds=0.3)
    finally:
        done.set()
        thread.join(10)
        first_sink.close()
        second_sink.close()

    assert report.delivered > 0
    ids = [request.header("webhook-id") for request in recorder.requests]
    assert sorted(ids) == sorted(f"dlv-{n}" for n in range(15))  # each once: the leases held
    assert recorder.requests[-1].received_at - recorder.requests[0].received_at > 1.5


def test_a_receiver_down_for_ten_minutes_loses_no_delivery_to_the_dead_letters(
    store, knock, recorder
):
    """With the default attempts, a delivery outlives an outage of minutes: before, 8 attempts of
    the back-off spanned about a minute, and a receiver answering 500 (or 429) that long sent its
    deliveries to the dead-letter list."""
    pending(store, "dlv-1", "knock")
    moment = {"now": T0}
    recorder.respond_with(lambda request: 500 if moment["now"] < at(600) else 200)
    rng = random.Random(11)
    sent = 0
    while sent < 100:
        report = deliver_due(store, {"knock": knock}, now=moment["now"], rng=rng)
        sent += report.attempted
        row = delivery_row(store, "dlv-1")
        if row["status"] != "pending":
            break
        moment["now"] = datetime.strptime(row["next_attempt_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=UTC
        )
    assert row["status"] == "delivered", row["last_error"]
    assert moment["now"] >= at(600) and 1 < row["attempts"] <= 20
