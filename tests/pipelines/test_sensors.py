"""The source-change sensor: a run when a source changes, none when nothing did."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import UTC

import dagster as dg

from pipelines.defs.sensors import user_sources_changed


def evaluate(cursor: str | None):
    context = dg.build_sensor_context(cursor=cursor)
    return user_sources_changed(context)


def test_sensor_requests_a_run_when_a_file_source_changes(tmp_path, monkeypatch):
    source = tmp_path / "users.csv"
    source.write_text("id,plan\nu1,pro\n")
    monkeypatch.setenv("AUDIENCES_USERS_SOURCE", str(source))
    first = evaluate(None)
    assert len(first.run_requests) == 1 and first.cursor
    quiet = evaluate(first.cursor)
    assert quiet.run_requests in (None, []) and quiet.cursor == first.cursor
    source.write_text("id,plan\nu1,pro\nu2,free\n")
    os.utime(source, ns=(1, 2))
    changed = evaluate(quiet.cursor)
    [request] = changed.run_requests
    assert request.tags["audiences/changed_sources"] == "users"
    assert request.run_key == changed.cursor != quiet.cursor


def test_sensor_watches_a_table_watermark(tmp_path, monkeypatch):
    database = tmp_path / "app.db"
    with sqlite3.connect(database) as connection:
        connection.execute("create table users (id text, updated_at text)")
        connection.execute("insert into users values ('u1', '2026-11-01T00:00:00Z')")
    (tmp_path / "sources.yml").write_text(
        f"sources:\n  - name: app\n    path: {database}\n    table: users\n    watermark_column: updated_at\n    mode: stream\n"
    )
    monkeypatch.delenv("AUDIENCES_USERS_SOURCE", raising=False)
    monkeypatch.setenv("AUDIENCES_SOURCES", str(tmp_path / "sources.yml"))
    first = evaluate(None)
    assert json.loads(first.cursor) == {"app": "2026-11-01T00:00:00Z"}
    assert evaluate(first.cursor).run_requests in (None, [])
    with sqlite3.connect(database) as connection:
        connection.execute("update users set updated_at = '2026-11-02T00:00:00Z'")
    assert len(evaluate(first.cursor).run_requests) == 1


def _identify(store, *patches) -> None:
    from audiences.store.profiles import identify

    with store.engine.begin() as connection:
        identify(store, connection, list(patches))


def test_identify_calls_waiting_in_the_store_request_a_run_once(tmp_path, monkeypatch):
    """Issue 23: identify calls (`PUT /v1/users/{id}`) queue in the store; with no one typing
    `audiences run`, the sensor must start the main job, and only once per batch of calls."""
    from datetime import datetime

    import duckdb

    from audiences.store.database import MembershipStore
    from audiences.store.profiles import load_identify_queue
    from audiences.warehouse.schema import ensure_user_tables

    source = tmp_path / "users.csv"
    source.write_text("id,plan\nu1,pro\n")
    monkeypatch.setenv("AUDIENCES_USERS_SOURCE", str(source))
    monkeypatch.setenv("AUDIENCES_STORE_URL", f"sqlite:///{tmp_path / 'store.sqlite'}")
    first = evaluate(None)  # no store yet: the sensor does not create one
    assert not (tmp_path / "store.sqlite").exists()
    quiet = evaluate(first.cursor)
    assert quiet.run_requests in (None, [])
    store = MembershipStore(f"sqlite:///{tmp_path / 'store.sqlite'}").create()
    assert evaluate(quiet.cursor).run_requests in (None, [])  # an empty queue
    _identify(store, ("u1", {"plan": "enterprise"}), ("u2", {"plan": "free"}))
    requested = evaluate(quiet.cursor)
    [request] = requested.run_requests
    assert request.tags["audiences/changed_sources"] == "identify_queue"
    assert request.tags["audiences/identify_calls_waiting"] == "2"
    # The same calls, still waiting while the run starts: not requested twice.
    assert evaluate(requested.cursor).run_requests in (None, [])
    # The run loads them; nothing waits, nothing is requested.
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as warehouse:
        ensure_user_tables(warehouse)
        load_identify_queue(warehouse, store, datetime.now(UTC))
    loaded = evaluate(requested.cursor)
    assert loaded.run_requests in (None, []) and loaded.cursor == requested.cursor
    _identify(store, ("u1", {"plan": "pro"}))
    [again] = evaluate(loaded.cursor).run_requests
    assert (
        again.tags["audiences/identify_calls_waiting"] == "1" and again.run_key != request.run_key
    )
    store.dispose()


def test_the_identify_sensor_ticks_at_least_every_30_seconds():
    assert user_sources_changed.minimum_interval_seconds <= 30


def test_deliveries_due_start_a_delivery_run_and_nothing_else_does(tmp_path, monkeypatch):
    """The every-minute delivery schedule flooded the runs list: a run only when deliveries are
    due, none while one runs, and none again for deliveries the last run could not send."""
    from audiences.store.database import MembershipStore, deliveries
    from pipelines.defs.schedules import DELIVERY_JOB
    from pipelines.defs.sensors import deliveries_due

    monkeypatch.setenv("AUDIENCES_STORE_URL", f"sqlite:///{tmp_path / 'store.sqlite'}")
    store = MembershipStore(f"sqlite:///{tmp_path / 'store.sqlite'}").create()

    def add(delivery_id: str, next_attempt_at: str, sink: str = "file") -> None:
        with store.engine.begin() as connection:
            connection.execute(
                deliveries.insert().values(
                    delivery_id=delivery_id,
                    workflow_key="welcome",
                    sink=sink,
                    audience_key="a",
                    user_id="u1",
                    payload="{}",
                    status="pending",
                    attempts=0,
                    next_attempt_at=next_attempt_at,
                    created_at="2026-01-01T00:00:00.000000Z",
                )
            )

    with dg.instance_for_test() as instance:

        def tick(cursor):
            return deliveries_due(dg.build_sensor_context(instance=instance, cursor=cursor))

        nothing = tick(None)
        assert nothing.run_requests in (None, [])
        add("later", "2999-01-01T00:00:00.000000Z")  # a retry not due yet
        assert tick(nothing.cursor).run_requests in (None, [])
        add(
            "sending", "2026-01-01T00:00:00.000000Z"
        )  # claimed by a live worker (`deliver --watch`)
        with store.engine.begin() as connection:
            connection.execute(
                deliveries.update()
                .where(deliveries.c.delivery_id == "sending")
                .values(claimed_by="watch/1", claimed_until="2999-01-01T00:00:00.000000Z")
            )
        assert tick(nothing.cursor).run_requests in (None, [])
        add("due", "2026-01-01T00:00:00.000000Z", sink="nowhere")
        due = tick(nothing.cursor)
        [request] = due.run_requests
        assert request.tags["audiences/deliveries_due"] == "1"
        # While a delivery run is queued or going on, no second one.
        run = instance.create_run_for_job(
            job_def=dg.Definitions(jobs=[dg.define_asset_job(DELIVERY_JOB)]).resolve_job_def(
                DELIVERY_JOB
            ),
            status=dg.DagsterRunStatus.STARTED,
        )
        add("due-2", "2026-01-01T00:00:01.000000Z", sink="nowhere")
        busy = tick(due.cursor)
        assert busy.run_requests in (None, []) and run.run_id in busy.skip_reason.skip_message
        instance.report_run_failed(run)
        after = tick(due.cursor)
        assert len(after.run_requests) == 1
        # The run could not send them (no such sink): the same deliveries do not start another.
        assert tick(after.cursor).run_requests in (None, [])
    store.dispose()


def test_sensor_requests_a_run_when_an_event_source_gains_a_file(tmp_path, monkeypatch):
    (tmp_path / "users.csv").write_text("id,plan\nu1,pro\n")
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "a.jsonl").write_text(
        '{"userId": "u1", "event": "Signed Up", "timestamp": "2026-10-01T00:00:00Z", "messageId": "m1"}\n'
    )
    (tmp_path / "sources.yml").write_text(
        "sources:\n  - {name: crm, path: users.csv}\nevents:\n  - {name: tracks, path: events}\n"
    )
    monkeypatch.delenv("AUDIENCES_USERS_SOURCE", raising=False)
    monkeypatch.setenv("AUDIENCES_SOURCES", str(tmp_path / "sources.yml"))
    first = evaluate(None)
    quiet = evaluate(first.cursor)
    assert quiet.run_requests in (None, [])
    (tmp_path / "events" / "b.jsonl").write_text(
        '{"userId": "u1", "event": "Order Completed", "timestamp": "2026-10-02T00:00:00Z", "messageId": "m2"}\n'
    )
    [request] = evaluate(quiet.cursor).run_requests
    assert request.tags["audiences/changed_sources"] == "events/tracks"


def test_a_tenant_source_or_a_tenant_write_requests_a_run(tmp_path, monkeypatch):
    """Per-tenant audiences read tenants and memberships: a change to their sources, or a tenant
    written through the API (queued in the store), starts the main job like a user change."""
    from audiences.store.database import MembershipStore
    from audiences.store.tenants import set_tenants

    for name, text in (
        ("users.csv", "id,plan\nu1,pro\n"),
        ("tenants.csv", "id,plan\nacme,trial\n"),
        ("seats.csv", "user_id,tenant_id,role\nu1,acme,admin\n"),
    ):
        (tmp_path / name).write_text(text)
    (tmp_path / "sources.yml").write_text(
        "sources:\n  - {name: crm, path: users.csv}\n"
        "tenants:\n  - {name: workspaces, path: tenants.csv}\n"
        "tenant_memberships:\n  - {name: seats, path: seats.csv}\n"
    )
    monkeypatch.delenv("AUDIENCES_USERS_SOURCE", raising=False)
    monkeypatch.setenv("AUDIENCES_SOURCES", str(tmp_path / "sources.yml"))
    monkeypatch.setenv("AUDIENCES_STORE_URL", f"sqlite:///{tmp_path / 'store.sqlite'}")
    first = evaluate(None)
    assert set(json.loads(first.cursor)) == {"crm", "workspaces", "seats"}
    assert evaluate(first.cursor).run_requests in (None, [])
    (tmp_path / "seats.csv").write_text("user_id,tenant_id,role\nu1,acme,viewer\n")
    os.utime(tmp_path / "seats.csv", ns=(1, 2))
    changed = evaluate(first.cursor)
    [request] = changed.run_requests
    assert request.tags["audiences/changed_sources"] == "seats"
    store = MembershipStore(f"sqlite:///{tmp_path / 'store.sqlite'}").create()
    with store.engine.begin() as connection:
        set_tenants(store, connection, [("acme", {"plan": "pro"})])
    [written] = evaluate(changed.cursor).run_requests
    assert written.tags["audiences/changed_sources"] == "tenant_queue"
    store.dispose()
