"""Faults end to end: runs killed at the worst moments and a flaky sink standing in for Knock.

After recovery every event has reached the sink, none was lost, and any repeat carried the same
idempotency key. The sink is a real HTTP server on 127.0.0.1 speaking Knock's trigger API.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from condition_harness import evaluation_warehouse, set_evaluation
from http_recorder import HttpRecorder, Reply

from audiences.delivery.loop import deliver_due
from audiences.delivery.sinks import KnockSink
from audiences.membership.changes import record_changes
from audiences.workflows.publish import publish_outbox
from audiences.workflows.triggers import WorkflowTrigger

T0 = datetime(2026, 11, 1, tzinfo=UTC)
TRIGGERS = {
    "welcome": WorkflowTrigger("welcome", "pro"),
    "goodbye": WorkflowTrigger("goodbye", "pro", on="exited"),
}


@pytest.fixture
def warehouse():
    connection = evaluation_warehouse([{"id": f"u{i}"} for i in range(1, 31)])
    yield connection
    connection.close()


def evaluate(connection, moment, user_keys):
    set_evaluation(connection, {"pro": list(user_keys)})
    record_changes(connection, moment)


class CrashAfterSending:
    """A sink wrapper that sends for real, then dies before the outcome can be recorded (once)."""

    def __init__(self, sink):
        self.sink, self.crashed = sink, False
        self.name, self.rate_limit_per_second, self.batch_size = (
            sink.name,
            sink.rate_limit_per_second,
            sink.batch_size,
        )

    def send(self, deliveries):
        outcomes = self.sink.send(deliveries)
        if not self.crashed:
            self.crashed = True
            raise SystemExit("killed between sending and recording")
        return outcomes


def test_every_event_reaches_the_sink_once_in_effect_despite_crashes_and_a_flaky_sink(
    warehouse, store
):
    evaluate(warehouse, T0, range(1, 11))  # first evaluation: backfill, nothing to send
    publish_outbox(warehouse, store, TRIGGERS, "knock", T0)
    evaluate(warehouse, T0 + timedelta(hours=1), range(6, 21))  # 10 enter, 5 exit ...
    # ... and the run dies between the diff and publishing: the events wait in the outbox.
    evaluate(warehouse, T0 + timedelta(hours=2), range(6, 26))  # 5 more enter
    publish_outbox(warehouse, store, TRIGGERS, "knock", T0 + timedelta(hours=2))
    expected = {
        row["event_id"]
        for row in store.rows(
            sa.text("select event_id from membership_events where not is_backfill")
        )
    }
    assert len(expected) == 20

    with HttpRecorder() as knock:
        knock.script(
            500, Reply(429, {"Retry-After": "1"}), Reply.hang(1.5), Reply.connection_reset()
        )
        sink = KnockSink(
            "knock", knock.url, "sk_test_secret", timeout_seconds=0.5, rate_limit_per_second=None
        )
        flaky = CrashAfterSending(sink)
        moment = datetime.now(UTC)
        with pytest.raises(SystemExit, match="killed between sending and recording"):
            deliver_due(store, {"knock": flaky}, now=moment)
        for _ in range(20):
            moment += timedelta(minutes=10)  # past every back-off
            report = deliver_due(store, {"knock": flaky}, now=moment)
            if report.attempted == 0:
                break
        sink.close()

    statuses = store.rows(sa.text("select status, count(*) as n from deliveries group by status"))
    assert statuses == [{"status": "delivered", "n": 20}]
    received = [request for request in knock.requests if request.path.startswith("/v1/workflows/")]
    delivered_events = {request.json()["data"]["event_id"] for request in received}
    assert delivered_events == expected  # none lost
    by_key: dict[str, set[bytes]] = {}
    for request in received:
        assert request.header("Authorization") == "Bearer sk_test_secret"
        by_key.setdefault(request.header("Idempotency-Key"), set()).add(request.body)
    assert len(by_key) == 20  # repeats happened (500, 429, hang, reset, crash) ...
    assert len(received) > 20
    assert all(len(bodies) == 1 for bodies in by_key.values())  # ... and each repeat was identical
