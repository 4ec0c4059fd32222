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


def test_an_identify_evaluates_the_audiences_reading_what_it_set(tmp_path):
    """An existing user's identify can move them only in audiences whose conditions read a
    property it set, or that refer to such an audience; the subset's compiled queries give the
    same verdicts as the whole plan's."""
    from datetime import UTC, datetime

    from audiences.workflows.realtime import UserEvaluator, compile_plan

    folder = tmp_path / "audiences"

    def audience(key, *conditions):
        (folder / key).mkdir(parents=True)
        (folder / key / "audience.json").write_text(
            json.dumps(
                {"name": key, "type": "dynamic", "segments": [{"conditions": list(conditions)}]}
            )
        )

    audience("pro", {"property": "recipient.plan", "operator": "equal_to", "argument": "pro"})
    audience(
        "pro-admins",
        {"property": "recipient", "operator": "is_audience_member", "argument": "pro"},
        {"property": "recipient.tags", "operator": "contains", "argument": "admin"},
    )
    audience(
        "adults", {"property": "recipient.person.age", "operator": "greater_than", "argument": 17}
    )
    definitions = load_definitions(folder)
    plan = compile_plan(definitions, {key: d.version for key, d in definitions.items()})
    assert plan.affected({"plan"}) == {"pro", "pro-admins"}
    assert plan.affected({"tags", "nickname"}) == {"pro-admins"}
    assert plan.affected({"person"}) == {"adults"}
    assert plan.affected({"nickname"}) == set()
    assert plan.affected(None) == {"pro", "pro-admins", "adults"}

    users = {
        "u1": {"plan": "pro", "tags": ["admin"], "person": {"age": 40}},
        "u2": {"plan": "free", "tags": ["admin"]},
        "u3": {"plan": "pro", "person": {"age": "12"}},
    }
    evaluator = UserEvaluator()
    try:
        # A few users per statement: one DuckDB thread (its pool cost more than it saved).
        assert evaluator.connection.execute("select current_setting('threads')").fetchone() == (1,)
        now = datetime.now(UTC)
        evaluator.load([(u, properties, []) for u, properties in users.items()], now)
        whole = evaluator.evaluate(plan)
        for changed in ({"plan"}, {"tags"}, {"person"}):
            subset = evaluator.subset(plan, plan.affected(changed))
            assert subset.keys == plan.affected(changed)
            # The other audiences are read as the memberships the store holds.
            memberships = {
                u: [(key, None) for key in whole.get(u, set()) - subset.keys] for u in users
            }
            evaluator.load([(u, p, memberships[u]) for u, p in users.items()], now)
            verdicts = evaluator.evaluate(subset)
            for user_id in users:
                assert verdicts.get(user_id, set()) == whole.get(user_id, set()) & subset.keys
    finally:
        evaluator.close()
    assert whole == {"u1": {"pro", "pro-admins", "adults"}, "u2": set(), "u3": {"pro"}}


def test_a_full_evaluation_holds_up_no_identify_and_no_user_is_evaluated_twice_at_once(service):
    """A new user's identify evaluates every audience, in a lane of its own: while it runs (held
    here), an existing user's identify is evaluated and recorded; an identify of the user being
    evaluated waits for that evaluation to end."""
    version = load_definitions(service.settings.definitions_dir)["pro-plan"].version
    set_plan(service, {"pro-plan": version})  # read by the worker's first evaluation
    worker = service.environment("development").realtime
    put(service, "ana", {"plan": "free"})  # a new user: the full lane
    settle(service)
    assert recorded(service, "ana") == []

    full = worker.evaluators["full"]
    full.lock.acquire()
    try:
        put(service, "bo", {"plan": "pro"})  # new: the full lane, which waits for the lock
        deadline = time.monotonic() + 10
        while "bo" not in worker._busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "bo" in worker._busy
        put(service, "ana", {"plan": "pro"})  # existing: the fast lane, at once
        deadline = time.monotonic() + 10
        while not recorded(service, "ana") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [row[:3] for row in recorded(service, "ana")] == [("pro-plan", "entered", 1)]
        put(service, "bo", {"plan": "pro", "seen": 1})  # waits: bo is being evaluated
        time.sleep(0.3)
        assert recorded(service, "bo") == []
        assert "bo" in worker._waiting["fast"]
    finally:
        full.lock.release()
    settle(service)
    assert [row[:3] for row in recorded(service, "bo")] == [("pro-plan", "entered", 1)]


def test_users_of_one_batch_with_different_changes_all_get_their_triggers(service):
    """Users evaluated together over different sets of audiences (their identifies set different
    properties) each get the deliveries of their events, trigger conditions read for each."""
    folder = service.settings.definitions_dir
    (folder / "locale-en").mkdir()
    (folder / "locale-en" / "audience.json").write_text(
        json.dumps(
            {
                "name": "English",
                "type": "dynamic",
                "segments": [
                    {
                        "conditions": [
                            {
                                "property": "recipient.locale",
                                "operator": "equal_to",
                                "argument": "en",
                            }
                        ]
                    }
                ],
            }
        )
    )
    workflows = service.settings.workflows_dir / "pro-welcome"
    workflows.mkdir(parents=True)
    (workflows / "trigger.json").write_text(
        json.dumps(
            {
                "audience": "pro-plan",
                "on": "entered",
                "conditions": {
                    "all": [
                        {"variable": "recipient.locale", "operator": "equal_to", "argument": "en"}
                    ]
                },
            }
        )
    )
    definitions = load_definitions(folder)
    set_plan(service, {key: definitions[key].version for key in ("pro-plan", "locale-en")})
    worker = service.environment("development").realtime
    for user in ("ana", "bo", "cy"):  # new users: the full lane
        put(service, user, {"plan": "free", "locale": "en" if user != "cy" else "fr"})
    settle(service)

    fast = worker.evaluators["fast"]
    fast.lock.acquire()
    try:
        put(service, "cy", {"locale": "de"})  # taken by the fast lane, which waits for the lock
        deadline = time.monotonic() + 10
        while "cy" not in worker._busy and time.monotonic() < deadline:
            time.sleep(0.01)
        put(service, "ana", {"plan": "pro"})  # pro-plan only
        put(service, "bo", {"plan": "pro", "locale": "en"})  # pro-plan and locale-en
    finally:
        fast.lock.release()
    settle(service)
    store = service.environment("development").store
    deliveries = tables.deliveries.c
    assert sorted(
        row["user_id"]
        for row in store.rows(
            sa.select(deliveries.user_id).where(deliveries.workflow_key == "pro-welcome")
        )
    ) == ["ana", "bo"]


def test_the_evaluator_holds_only_the_memberships_the_plan_and_triggers_read(tmp_path):
    """A user is in dozens of audiences; an evaluation loads only the memberships its conditions
    (and its triggers' conditions) refer to, and decides the same."""
    from datetime import UTC, datetime

    from audiences.store.database import MembershipStore
    from audiences.workflows.realtime import UserEvaluator, compile_plan, decide
    from audiences.workflows.triggers import WorkflowTrigger, condition_segments

    folder = tmp_path / "audiences"

    def audience(key: str, *conditions: dict) -> None:
        (folder / key).mkdir(parents=True)
        document = {
            "key": key,
            "name": key,
            "type": "dynamic",
            "segments": [{"conditions": conditions}],
        }
        (folder / key / "audience.json").write_text(json.dumps(document))

    for key in ("beta", "vip"):
        (folder / key).mkdir(parents=True)
        (folder / key / "audience.json").write_text(json.dumps({"name": key, "type": "static"}))
    audience("pro", {"property": "recipient.plan", "operator": "equal_to", "argument": "pro"})
    audience(
        "pro-beta",
        {"property": "recipient.plan", "operator": "equal_to", "argument": "pro"},
        {"property": "recipient", "operator": "is_audience_member", "argument": "beta"},
    )
    definitions = load_definitions(folder)
    plan = compile_plan(definitions, {key: d.version for key, d in definitions.items()})
    vip = {"property": "recipient", "operator": "is_not_audience_member", "argument": "vip"}
    segments = condition_segments([vip], "$.conditions")
    triggers = [WorkflowTrigger("welcome", "pro", "entered", segments=segments)]
    assert plan.memberships_read() == {"beta"}
    assert plan.memberships_read(triggers) == {"beta", "vip"}

    store = MembershipStore(f"sqlite:///{tmp_path}/store.sqlite").create()
    others = [f"other-{n}" for n in range(30)]
    with store.engine.begin() as connection:
        connection.execute(
            tables.user_profiles.insert(),
            [{"user_id": "u1", "properties": json.dumps({"plan": "pro"}), "updated_at": "x"}],
        )
        connection.execute(
            tables.user_patches.insert(),
            [{"user_id": "u1", "patch": json.dumps({"plan": "pro"}), "received_at": "x"}],
        )
        connection.execute(
            tables.audience_members.insert(),
            [
                {"audience_key": key, "user_id": "u1", "tenant_key": "", "added_at": "x"}
                for key in ["beta", "vip", *others]
            ],
        )
    evaluator = UserEvaluator()
    try:
        with evaluator.lock:
            now = datetime.now(UTC)
            held = decide(store, ["u1"], plan, evaluator, now, triggers)
            kept = evaluator.connection.execute(
                "select audience_key from main.audience_members order by 1"
            ).fetchall()
            everything = decide(store, ["u1"], plan, evaluator, now)
    finally:
        evaluator.close()
        store.dispose()
    assert kept == [("beta",), ("vip",)]
    decided = [(e.audience_key, e.event_type, e.event_id) for e in held.events]
    assert decided == [(e.audience_key, e.event_type, e.event_id) for e in everything.events]
    assert sorted(key for key, _, _ in decided) == ["pro", "pro-beta"]


def test_the_worker_processs_real_time_freezes_the_heap_after_compiling_a_plan(service):
    """In `audiences serve`'s worker process (`settle_heap=True`), a plan just compiled is moved
    out of the collector's reach with everything else alive (`workers.settle_heap`): full
    collections stop walking it. The API's in-process real time (tests, embedding) does not."""
    import gc

    from audiences.api.realtime import RealtimeWorker

    environment = service.environment("development")
    for settle_heap, grows in ((False, False), (True, True)):
        worker = RealtimeWorker(environment, settle_heap=settle_heap)
        gc.collect()
        before = gc.get_freeze_count()
        worker._current()
        assert (gc.get_freeze_count() > before) == grows
    gc.unfreeze()
