"""Publishing the outbox into the store: idempotence and the workflow trigger rules."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from condition_harness import evaluation_warehouse, set_evaluation

from audiences.membership.changes import CircuitBreaker, record_changes
from audiences.workflows.broadcasts import broadcast
from audiences.workflows.publish import discard_batch, publish_outbox, release_batch
from audiences.workflows.triggers import WorkflowTrigger, condition_segments

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def warehouse():
    connection = evaluation_warehouse(
        [{"id": f"u{i}", "locale": "fr" if i % 2 else "en"} for i in range(1, 21)]
    )
    yield connection
    connection.close()


class Pipeline:
    """One evaluation after another: members in, diff, publish (what the Dagster assets do)."""

    def __init__(self, warehouse, store, triggers, breaker=CircuitBreaker(0.2, 1000)):
        self.warehouse, self.store, self.triggers, self.breaker = (
            warehouse,
            store,
            triggers,
            breaker,
        )
        self.moment = T0

    def evaluate(self, members: dict[str, list]):
        set_evaluation(self.warehouse, members)
        summary = record_changes(self.warehouse, self.moment, self.breaker)
        report = publish_outbox(self.warehouse, self.store, self.triggers, "file", self.moment)
        self.moment += timedelta(hours=1)
        return summary, report

    def deliveries(self, status: str | None = None) -> list[dict]:
        query = "select workflow_key, user_id, tenant, status, payload from deliveries"
        rows = self.store.rows(
            sa.text(
                query + (" where status = :s" if status else "") + " order by created_at, user_id"
            ).bindparams(**({"s": status} if status else {}))
        )
        return rows


def trigger(**fields) -> dict[str, WorkflowTrigger]:
    value = WorkflowTrigger(**{"workflow_key": "welcome", "audience_key": "pro", **fields})
    return {value.workflow_key: value}


def test_no_backfill_then_one_trigger_per_entry_with_knock_payload(warehouse, store):
    pipeline = Pipeline(warehouse, store, trigger())
    pipeline.evaluate({"pro": [1, 2]})
    assert pipeline.deliveries() == []
    pipeline.evaluate({"pro": [1, 2, 3]})
    [delivery] = pipeline.deliveries()
    payload = json.loads(delivery["payload"])
    assert payload["recipients"] == ["u3"] and "tenant" not in payload
    assert set(payload["data"]) == {"audience_key", "event", "event_id", "occurred_at"}
    assert (
        payload["data"]["event"] == "entered"
        and payload["data"]["occurred_at"] == "2026-11-01T01:00:00.000000Z"
    )


def test_publishing_twice_changes_nothing(warehouse, store):
    pipeline = Pipeline(warehouse, store, trigger())
    pipeline.evaluate({"pro": [1]})
    pipeline.evaluate({"pro": [1, 2, 3]})
    counts = store.rows(
        sa.text(
            "select (select count(*) from membership_events) e, (select count(*) from deliveries) d, "
            "(select count(*) from audience_members) m"
        )
    )
    warehouse.execute(
        "delete from raw.outbox_published"
    )  # as if the run died before recording the watermark
    report = publish_outbox(warehouse, store, pipeline.triggers, "file", pipeline.moment)
    assert report.events == 3 and report.deliveries == 0
    assert (
        store.rows(
            sa.text(
                "select (select count(*) from membership_events) e, (select count(*) from deliveries) d, "
                "(select count(*) from audience_members) m"
            )
        )
        == counts
    )


def test_exit_triggers_only_where_asked(warehouse, store):
    pipeline = Pipeline(
        warehouse, store, {**trigger(), **trigger(workflow_key="goodbye", on="exited")}
    )
    pipeline.evaluate({"pro": [1, 2]})
    pipeline.evaluate({"pro": [1]})
    assert [(d["workflow_key"], d["user_id"]) for d in pipeline.deliveries()] == [("goodbye", "u2")]


def test_once_per_recipient_fires_once_across_reentries_and_tenants(warehouse, store):
    pipeline = Pipeline(warehouse, store, trigger(trigger_frequency="once_per_recipient"))
    pipeline.evaluate({"pro": []})
    pipeline.evaluate({"pro": [(1, "acme")]})
    pipeline.evaluate({"pro": []})
    pipeline.evaluate({"pro": [(1, "acme"), (1, "globex")]})
    assert [(d["user_id"], d["tenant"]) for d in pipeline.deliveries()] == [("u1", "acme")]


def test_once_per_recipient_per_tenant_fires_once_per_tenant(warehouse, store):
    pipeline = Pipeline(
        warehouse, store, trigger(trigger_frequency="once_per_recipient_per_tenant")
    )
    pipeline.evaluate({"pro": []})
    pipeline.evaluate({"pro": [(1, "acme"), (1, "globex"), (1, None)]})
    pipeline.evaluate({"pro": []})
    pipeline.evaluate({"pro": [(1, "acme")]})
    rows = sorted((d["user_id"], d["tenant"] or "") for d in pipeline.deliveries())
    assert rows == [("u1", ""), ("u1", "acme"), ("u1", "globex")]
    tenants = {json.loads(d["payload"]).get("tenant") for d in pipeline.deliveries()}
    assert tenants == {"acme", "globex", None}


def test_every_trigger_fires_for_each_tenant_and_each_reentry(warehouse, store):
    pipeline = Pipeline(warehouse, store, trigger())
    pipeline.evaluate({"pro": []})
    pipeline.evaluate({"pro": [(1, "acme"), (1, "globex")]})
    pipeline.evaluate({"pro": []})
    pipeline.evaluate({"pro": [(1, "acme")]})
    assert len(pipeline.deliveries()) == 3


def test_a_trigger_added_later_does_not_fire_for_earlier_events(warehouse, store):
    pipeline = Pipeline(warehouse, store, {})
    pipeline.evaluate({"pro": []})
    pipeline.evaluate({"pro": [1, 2]})  # no trigger yet
    pipeline.triggers = trigger()
    pipeline.evaluate({"pro": [1, 2, 3]})
    assert [d["user_id"] for d in pipeline.deliveries()] == ["u3"]


def test_trigger_conditions_are_evaluated_against_the_recipient(warehouse, store):
    segments = condition_segments(
        {"all": [{"variable": "recipient.locale", "operator": "equal_to", "argument": "en"}]}, "$"
    )
    pipeline = Pipeline(warehouse, store, trigger(segments=segments))
    pipeline.evaluate({"pro": []})
    _, report = pipeline.evaluate({"pro": [1, 2, 3, 4]})
    assert sorted(d["user_id"] for d in pipeline.deliveries()) == ["u2", "u4"]
    assert report.skipped_by_conditions == 2


def test_held_batch_sends_nothing_until_released_or_discarded(warehouse, store):
    pipeline = Pipeline(
        warehouse,
        store,
        {**trigger(), **trigger(workflow_key="goodbye", on="exited")},
        breaker=CircuitBreaker(share=0.2, minimum=5),
    )
    pipeline.evaluate({"pro": list(range(1, 21))})
    _, report = pipeline.evaluate({"pro": [1]})  # a truncated source: 19 of 20 leave
    [batch] = report.held_batches
    assert {d["status"] for d in pipeline.deliveries()} == {"held"} and len(
        pipeline.deliveries()
    ) == 19
    assert release_batch(store, batch) == 19
    assert {d["status"] for d in pipeline.deliveries()} == {"pending"}
    with pytest.raises(ValueError, match="already released"):
        discard_batch(store, batch)
    pipeline.evaluate({"pro": list(range(1, 21))})  # they come back: 19 enter, held again
    held = store.rows(sa.text("select batch_id from held_batches where status = 'held'"))
    assert len(held) == 1 and discard_batch(store, held[0]["batch_id"]) == 19
    assert len(pipeline.deliveries("discarded")) == 19


def test_a_discarded_entry_leaves_a_once_per_recipient_trigger_unfired(warehouse, store):
    pipeline = Pipeline(
        warehouse,
        store,
        trigger(trigger_frequency="once_per_recipient"),
        breaker=CircuitBreaker(share=0.2, minimum=5),
    )
    pipeline.evaluate({"pro": []})
    _, report = pipeline.evaluate({"pro": list(range(1, 11))})  # a mistake: everyone enters
    [batch] = report.held_batches
    assert discard_batch(store, batch) == 10
    pipeline.evaluate({"pro": []})  # held as well, and no trigger for exits
    pipeline.evaluate({"pro": [3]})  # u3 enters for real: the workflow never ran for them
    pending = [d["user_id"] for d in pipeline.deliveries("pending")]
    assert pending == ["u3"]


def test_store_membership_follows_the_events(warehouse, store):
    pipeline = Pipeline(warehouse, store, {})
    pipeline.evaluate({"pro": [1, 2, (3, "acme")]})
    pipeline.evaluate({"pro": [2, (3, "acme"), 4]})
    rows = store.rows(sa.text("select user_id, tenant from audience_members order by user_id"))
    assert rows == [
        {"user_id": "u2", "tenant": None},
        {"user_id": "u3", "tenant": "acme"},
        {"user_id": "u4", "tenant": None},
    ]


def test_broadcast_sends_one_per_member_and_tenant_and_never_twice(warehouse, store):
    pipeline = Pipeline(warehouse, store, {})
    pipeline.evaluate({"pro": [1, (1, "acme"), 2]})
    first = broadcast(store, "pro", "newsletter", "file", {"issue": 7})
    again = broadcast(store, "pro", "newsletter", "file", {"issue": 7})
    assert (first.recipients, first.new_deliveries, again.new_deliveries) == (3, 3, 0)
    only_acme = broadcast(store, "pro", "newsletter", "file", {"issue": 8}, tenant="acme")
    assert only_acme.recipients == 1


def test_a_store_made_before_natural_key_events_loses_its_event_id_key(tmp_path):
    """Stores made by older versions have `event_id` as membership_events' primary key, an index
    on a random hash that every event write touches. `create` rebuilds the table without it, and
    keeps the rows; the natural-key index still makes publishing idempotent."""
    import sqlite3

    from audiences.store.database import MembershipStore, membership_events

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE membership_events (event_id VARCHAR(64) NOT NULL, sequence BIGINT, "
            "audience_key VARCHAR(255) NOT NULL, user_id VARCHAR(255) NOT NULL, tenant VARCHAR(255), "
            "event_type VARCHAR(16) NOT NULL, occurred_at VARCHAR(32) NOT NULL, audience_version VARCHAR(64), "
            "entry_number INTEGER NOT NULL, is_backfill BOOLEAN NOT NULL, batch_id VARCHAR(64), "
            "published_at VARCHAR(32) NOT NULL, PRIMARY KEY (event_id))"
        )
        old.execute(
            "insert into membership_events values ('e1', 1, 'pro', 'u1', null, 'entered', "
            "'2026-11-01T00:00:00Z', 'v1', 1, 0, null, '2026-11-01T00:00:00Z')"
        )
    store = MembershipStore(f"sqlite:///{path}").create()
    try:
        with store.engine.begin() as connection:
            table_sql = connection.exec_driver_sql(
                "select sql from sqlite_master where name = 'membership_events'"
            ).scalar()
            indexes = {
                row[0]
                for row in connection.exec_driver_sql(
                    "select name from sqlite_master where type = 'index' and tbl_name = 'membership_events'"
                )
            }
            again = {
                "event_id": "e1-again",
                "sequence": 1,
                "audience_key": "pro",
                "user_id": "u1",
                "tenant": None,
                "event_type": "entered",
                "occurred_at": "2026-11-01T00:00:00Z",
                "audience_version": "v1",
                "entry_number": 1,
                "is_backfill": False,
                "batch_id": None,
                "published_at": "2026-11-01T00:00:00Z",
            }
            added = store.insert_ignoring_duplicates(connection, membership_events, [again])
            rows = connection.execute(
                sa.select(membership_events.c.event_id, membership_events.c.source)
            ).all()
        assert "PRIMARY KEY (event_id)" not in table_sql
        assert "membership_events_identity" in indexes and not any(
            name.startswith("sqlite_autoindex") for name in indexes
        )
        assert added == 0 and rows == [("e1", "evaluation")]
        store.create()  # a second create finds nothing to do
    finally:
        store.dispose()
