"""Real time over the API without a pipeline run: once the pipeline's plan names an audience at its
version, identify, bulk identify and delete move the user at once; an audience the plan does not
name (never evaluated, or evaluated at another version) waits for the next run."""

from __future__ import annotations

import json
import time

import httpx
import sqlalchemy as sa

from audiences.api.realtime import PLAN_REFRESH_SECONDS
from audiences.conditions.definitions import load_definitions
from audiences.store import database as tables
from audiences.workflows.realtime import PLAN_MARKER, event_id


def set_plan(service, versions: dict[str, str]) -> None:
    store = service.environment("development").store
    markers = tables.store_markers
    with store.engine.begin() as connection:
        connection.execute(markers.delete().where(markers.c.name == PLAN_MARKER))
        connection.execute(markers.insert().values(name=PLAN_MARKER, value=json.dumps(versions)))


def settle(service) -> None:
    """Every submitted user evaluated."""
    assert service.environment("development").realtime.wait_idle(30)


def recorded(service, user_id: str) -> list[tuple]:
    store = service.environment("development").store
    columns = tables.membership_events.c
    return [
        (row["audience_key"], row["event_type"], row["entry_number"], row["event_id"])
        for row in store.rows(
            sa.select(
                columns.audience_key, columns.event_type, columns.entry_number, columns.event_id
            )
            .where(columns.user_id == user_id, columns.source == "realtime")
            .order_by(columns.entry_number, columns.event_type)
        )
    ]


def put(service, user_id: str, properties: dict) -> None:
    response = httpx.put(
        f"{service.url}/v1/users/{user_id}", json=properties, headers=service.headers(), timeout=10
    )
    assert response.status_code == 200, response.text


def test_identify_bulk_identify_and_delete_move_the_user_at_once(service):
    version = load_definitions(service.settings.definitions_dir)["pro-plan"].version
    # Not in the plan yet (the pipeline never evaluated it): nothing happens at once.
    put(service, "ana", {"plan": "pro"})
    settle(service)
    assert recorded(service, "ana") == []

    set_plan(service, {"pro-plan": version})
    time.sleep(PLAN_REFRESH_SECONDS + 0.1)  # the worker re-reads the plan that often
    put(service, "ana", {"plan": "pro", "seen": 1})  # a change, so the identify is queued
    settle(service)
    assert recorded(service, "ana") == [
        ("pro-plan", "entered", 1, event_id("pro-plan", "ana", None, "entered", 1))
    ]
    put(service, "ana", {"plan": "free"})
    put(service, "ana", {"plan": "pro"})
    settle(service)
    assert [row[1:3] for row in recorded(service, "ana")] == [
        ("entered", 1),
        ("exited", 1),
        ("entered", 2),
    ]

    queued = httpx.post(
        f"{service.url}/v1/users/bulk/identify",
        json={"users": [{"id": "bo", "plan": "pro"}, {"id": "cy", "plan": "free"}]},
        headers=service.headers(),
        timeout=10,
    )
    assert queued.status_code == 200, queued.text
    deadline = time.monotonic() + 30
    while not recorded(service, "bo") and time.monotonic() < deadline:
        time.sleep(0.05)
    settle(service)
    assert [row[:3] for row in recorded(service, "bo")] == [("pro-plan", "entered", 1)]
    assert recorded(service, "cy") == []

    deleted = httpx.delete(f"{service.url}/v1/users/ana", headers=service.headers(), timeout=10)
    assert deleted.status_code == 204
    settle(service)
    assert recorded(service, "ana")[-1][1:3] == ("exited", 2)

    # A definition changed since the pipeline's evaluation (another version): the next run.
    set_plan(service, {"pro-plan": "0000000000"})
    time.sleep(PLAN_REFRESH_SECONDS + 0.1)
    put(service, "dee", {"plan": "pro"})
    settle(service)
    assert recorded(service, "dee") == []
