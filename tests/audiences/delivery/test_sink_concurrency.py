"""Concurrent delivery within one sink, against a real webhook receiver on 127.0.0.1.

A webhook sink sends several deliveries at once (`concurrency`), so one slow request no longer
holds up every delivery queued behind it. What must not change: retries under the same idempotency
key (`webhook-id`), nothing sent twice once it was answered 2xx, and the order of one recipient's
deliveries: those of the same (audience, user, tenant) and sink go out one after another, in the
order they were queued, even when the first is refused and retried (an `exited` never reaches the
receiver before the `entered` it closes).

The receiver sleeps a little per request, so that requests sent together are seen in flight
together; the tests count overlapping requests rather than timing anything.
"""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from http_recorder import HttpRecorder, RecordedRequest, Reply

from audiences.delivery.sinks import WebhookSink
from audiences.delivery.worker import DeliveryWorker
from audiences.store.database import MembershipStore, deliveries, new_delivery, now_text

SECRET = "whsec_" + base64.b64encode(b"concurrency tests secret").decode()
HANDLING_SECONDS = 0.05  # how long the receiver takes per request


class Receiver:
    """Answers each request after `HANDLING_SECONDS`, by a rule per request, and counts how many
    requests were in flight at once and which ones it answered 2xx."""

    def __init__(self, recorder: HttpRecorder, answer=lambda request, attempt: 200):
        self.recorder = recorder
        self._answer = answer
        self._lock = threading.Lock()
        self._in_flight = 0
        self.most_in_flight = 0
        self.attempts: dict[str, int] = {}
        self.accepted: list[str] = []  # webhook ids answered 2xx, in the order they were answered
        recorder.respond_with(self._respond)

    def _respond(self, request: RecordedRequest) -> Reply | int:
        message_id = request.header("webhook-id")
        with self._lock:
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
            attempt = self.attempts[message_id] = self.attempts.get(message_id, 0) + 1
        try:
            time.sleep(HANDLING_SECONDS)
            reply = self._answer(request, attempt)
            status = reply if isinstance(reply, int) else reply.status
            with self._lock:
                if 200 <= status < 300:
                    self.accepted.append(message_id)
            return reply
        finally:
            with self._lock:
                self._in_flight -= 1


def enqueue(store: MembershipStore, delivery_id: str, user_id: str, event: str) -> None:
    """Queue one trigger delivery of `user_id`'s `event` in the `vip` audience, in a transaction
    of its own (as an identify's real-time events, or a run's publish, queue them)."""
    row = new_delivery(
        delivery_id,
        workflow_key="welcome",
        sink="hooks",
        audience_key="vip",
        user_id=user_id,
        tenant=None,
        payload=json.dumps({"recipients": [user_id], "data": {"event": event}}),
        stamp=now_text(),
    )
    with store.engine.begin() as connection:
        assert store.insert_ignoring_duplicates(connection, deliveries, [row]) == 1


def statuses(store: MembershipStore) -> dict[str, str]:
    return {row["delivery_id"]: row["status"] for row in store.rows(deliveries.select())}


def deliver_everything(store: MembershipStore, sink: WebhookSink, expected: int) -> None:
    """Run the always-on worker until `expected` deliveries are delivered (or 30 s pass)."""
    worker = DeliveryWorker(store, {"hooks": sink}, poll_seconds=0.2, base_delay=0.05).start()
    try:
        deadline = time.monotonic() + 30
        while list(statuses(store).values()).count("delivered") < expected:
            assert time.monotonic() < deadline, f"not all delivered: {statuses(store)}"
            time.sleep(0.05)
    finally:
        worker.stop(timeout=15)
    assert not worker.running


def hook(recorder: HttpRecorder) -> WebhookSink:
    # The sink's defaults, as `sinks.yml` gives them when it names only url and secret.
    return WebhookSink("hooks", f"{recorder.url}/hooks", SECRET, timeout_seconds=5)


def test_one_sink_sends_several_deliveries_at_once(store):
    with HttpRecorder() as recorder:
        receiver = Receiver(recorder)
        for number in range(16):
            enqueue(store, f"d-{number}", f"user-{number}", "entered")
        deliver_everything(store, hook(recorder), expected=16)
    assert receiver.most_in_flight > 1, "the sink sent one request at a time"
    assert sorted(receiver.accepted) == sorted(f"d-{number}" for number in range(16))


def test_a_recipients_exit_never_overtakes_its_entry_even_when_the_entry_is_retried(store):
    def refuse_each_entry_once(request: RecordedRequest, attempt: int) -> int:
        event = request.json()["data"]["data"]["event"]  # the trigger body, in the webhook document
        return 500 if event == "entered" and attempt == 1 else 200

    with HttpRecorder() as recorder:
        receiver = Receiver(recorder, refuse_each_entry_once)
        for number in range(12):
            enqueue(store, f"in-{number}", f"user-{number}", "entered")
        for number in range(12):
            enqueue(store, f"out-{number}", f"user-{number}", "exited")
        deliver_everything(store, hook(recorder), expected=24)
        received = [request.header("webhook-id") for request in recorder.requests]
    for number in range(12):
        entered_accepted = receiver.accepted.index(f"in-{number}")
        assert f"out-{number}" not in receiver.accepted[:entered_accepted], (
            f"user-{number}'s exit reached the receiver before its entry was accepted"
        )
        # The exit was not even sent (and refused) before the entry was accepted.
        first_exit = received.index(f"out-{number}")
        assert received[:first_exit].count(f"in-{number}") == 2
    assert receiver.most_in_flight > 1


def test_throttled_and_failing_receivers_get_retries_under_the_same_key_and_no_doubles(store):
    def throttle_then_fail_then_accept(request: RecordedRequest, attempt: int) -> Reply | int:
        if attempt == 1:
            return Reply(429, headers={"Retry-After": "0"})
        return 503 if attempt == 2 else 200

    with HttpRecorder() as recorder:
        receiver = Receiver(recorder, throttle_then_fail_then_accept)
        for number in range(10):
            enqueue(store, f"r-{number}", f"user-{number}", "entered")
        deliver_everything(store, hook(recorder), expected=10)
    ids = [f"r-{number}" for number in range(10)]
    assert receiver.attempts == dict.fromkeys(ids, 3)  # each retried twice, under its own key
    assert sorted(receiver.accepted) == ids  # accepted once each: no doubles
    assert receiver.most_in_flight > 1
    rows = {row["delivery_id"]: row for row in store.rows(deliveries.select())}
    assert {rows[i]["attempts"] for i in ids} == {3}


def test_concurrent_sends_keep_the_sinks_rate_limit(store, monkeypatch):
    """The bucket's grants keep the limit exactly, and no request reaches the receiver before
    its grant. (The receiver's clock alone cannot say it under load: a send delayed after its
    grant, then one on time, arrive closer together than they were granted.)"""
    from audiences.delivery import loop

    rate = 10  # deliveries a second, bursts of 10: at most 10 + 10 * t sends in any t seconds
    grants: list[float] = []  # when the bucket let each delivery go (time.time: 1e-4 s of float)
    reserve = loop._reserve

    def recording(tokens, updated, moment, count, *arguments):
        reserved = reserve(tokens, updated, moment, count, *arguments)
        grants.extend([reserved[2]] * count)  # the moment the tokens are taken
        return reserved

    monkeypatch.setattr(loop, "_reserve", recording)
    wall = time.time() - time.monotonic()  # the receiver stamps time.monotonic()
    with HttpRecorder() as recorder:
        receiver = Receiver(recorder)
        for number in range(30):
            enqueue(store, f"p-{number}", f"user-{number}", "entered")
        sink = WebhookSink(
            "hooks", f"{recorder.url}/hooks", SECRET, timeout_seconds=5, rate_limit_per_second=rate
        )
        deliver_everything(store, sink, expected=30)
        times = sorted(wall + request.received_at for request in recorder.requests)
    grants.sort()
    assert len(times) == 30 and len(grants) == 30
    assert receiver.most_in_flight > 1
    for first in range(len(grants)):
        for last in range(first, len(grants)):
            assert last - first + 1 <= rate + rate * (grants[last] - grants[first]) + 1e-4, (
                f"{last - first + 1} sends granted within {grants[last] - grants[first]:.3f} s"
            )
    assert grants[-1] - grants[0] >= (30 - rate) / rate - 1e-4  # paced, not one burst
    # The n-th request arrived no earlier than the n-th grant (1 ms for the clocks' conversion).
    assert all(time >= grant - 0.001 for time, grant in zip(times, grants, strict=True))


def test_a_webhooks_concurrency_is_read_from_its_settings_and_checked(tmp_path):
    from audiences.delivery.sinks import SinkConfigError, sinks_from_config

    def build(**settings):
        document = {"sinks": {"hooks": {"type": "webhook", "url": "http://127.0.0.1:9/h"}}}
        document["sinks"]["hooks"].update(secret_env="HOOK_SECRET", **settings)
        return sinks_from_config(document, tmp_path, {"HOOK_SECRET": SECRET})["hooks"]

    assert build().concurrency == 8
    assert build(batch_size=50).concurrency == 1  # a batching webhook: one batch at a time
    assert build(concurrency=3).concurrency == 3
    assert build(concurrency=20, rate_limit_per_second=5).concurrency == 5
    for bad in (0, 65, "many"):
        with pytest.raises(SinkConfigError, match="sink 'hooks': `concurrency` must be"):
            build(concurrency=bad)
