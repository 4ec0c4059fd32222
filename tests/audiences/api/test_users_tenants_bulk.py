"""Knock's users list, merge, bulk operations and tenants, through Knock's own SDK (`knockapi`)
against the service on 127.0.0.1; and rate limits per environment and endpoint tier."""

from __future__ import annotations

import json
import time

import httpx
import knockapi
import pytest
import sqlalchemy as sa
from api_server import running_server

from audiences.api.app import asgi_app, close_app
from audiences.api.keys import create_key
from audiences.store import database as tables


def sdk(service, key: str | None = None, **options) -> knockapi.Knock:
    return knockapi.Knock(
        api_key=key or service.development_key, base_url=service.url, max_retries=0, **options
    )


@pytest.fixture(autouse=True)
def generous_rate_limits(service_settings, monkeypatch):
    # These tests make many calls of the slow tiers; rate limits have their own test below.
    # (After `service_settings`, which clears every AUDIENCES_ variable.)
    for name in ("WRITE", "READ", "DELETE", "BULK"):
        monkeypatch.setenv(f"AUDIENCES_API_{name}_RATE", "100000")


def events(service) -> list[tuple]:
    table = tables.membership_events
    return [
        (row["audience_key"], row["user_id"], row["tenant"], row["event_type"])
        for row in service.environment("development").store.rows(
            sa.select(table).order_by(table.c.published_at, table.c.event_type.desc())
        )
    ]


def test_users_list_walks_cursor_pages_in_both_orders(service):
    knock = sdk(service)
    for number in range(60):
        knock.users.update(f"user-{number:02}", name=f"User {number}")
    knock.users.delete("user-07")
    first = knock.users.list(page_size=25)
    assert [user.id for user in first.entries] == [f"user-{n:02}" for n in range(26) if n != 7]
    assert first.entries[0].name == "User 0"
    # The SDK follows `page_info.after` through every page.
    everyone = [user.id for user in knock.users.list(page_size=25)]
    assert everyone == [f"user-{n:02}" for n in range(60) if n != 7]
    newest_first = [user.id for user in knock.users.list(page_size=50, order="desc")]
    assert newest_first == list(reversed(everyone))
    second = first.next_page_info()
    page_two = knock.users.list(page_size=25, after=second.params["after"])
    back = knock.users.list(page_size=25, before=page_two.page_info.before)
    assert [user.id for user in back.entries] == [user.id for user in first.entries]
    with pytest.raises(knockapi.UnprocessableEntityError):
        knock.users.list(page_size=51)


def test_merge_moves_static_memberships_with_events_and_deletes_the_other_user(service):
    knock = sdk(service)
    knock.users.update("kept", name="Kept", extra_body={"plan": "pro", "profile": {"a": 1}})
    knock.users.update("gone", name="Gone", extra_body={"seats": 3, "profile": {"b": 2}})
    knock.audiences.add_members(
        "newsletter",
        members=[
            {"user": {"id": "gone"}, "tenant": "acme"},
            {"user": {"id": "gone"}},
            {"user": {"id": "kept"}},
        ],
    )
    merged = knock.users.merge("kept", from_user_id="gone")
    assert merged.id == "kept" and merged.name == "Kept" and merged.seats == 3
    assert merged.profile == {"a": 1, "b": 2} and merged.plan == "pro"
    assert knock.users.get("kept").seats == 3
    with pytest.raises(knockapi.NotFoundError):
        knock.users.get("gone")
    members = knock.audiences.list_members("newsletter").entries
    assert sorted((m.user_id, m.tenant or "") for m in members) == [("kept", ""), ("kept", "acme")]
    recorded = events(service)
    assert ("newsletter", "gone", "acme", "exited") in recorded
    assert ("newsletter", "gone", None, "exited") in recorded
    assert ("newsletter", "kept", "acme", "entered") in recorded
    # The kept user was already a member without tenant: no second entry.
    assert recorded.count(("newsletter", "kept", None, "entered")) == 1
    # Both changes reach the warehouse through the identify queue.
    patches = service.environment("development").store.rows(
        sa.select(tables.user_patches.c.user_id, tables.user_patches.c.patch).order_by(
            tables.user_patches.c.patch_id
        )
    )
    assert patches[-1] == {"user_id": "gone", "patch": "null"}
    assert json.loads(patches[-2]["patch"])["seats"] == 3
    with pytest.raises(knockapi.NotFoundError):
        knock.users.merge("kept", from_user_id="nobody")
    # Merging a user into itself changes nothing.
    assert knock.users.merge("kept", from_user_id="kept").seats == 3
    with pytest.raises(knockapi.NotFoundError):
        knock.users.merge("nobody", from_user_id="nobody")


def wait_for(knock, operation_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        operation = knock.bulk_operations.get(operation_id)
        if operation.status in ("completed", "failed") or time.monotonic() > deadline:
            return operation
        time.sleep(0.05)


def test_bulk_identify_and_delete_are_processed_by_the_worker_with_per_item_errors(service):
    knock = sdk(service)
    users = [{"id": f"bulk-{number:04}", "plan": "free"} for number in range(1000)]
    users[10] = {"id": "bulk-0010", "blob": "x" * 300_000}  # over Knock's 256 kB
    queued = knock.users.bulk.identify(users=users)
    assert queued.status in ("queued", "processing", "completed")
    assert queued.estimated_total_rows == 1000 and queued.name == "users.identify"
    done = wait_for(knock, queued.id)
    assert done.status == "completed" and done.completed_at is not None
    assert (done.processed_rows, done.success_count, done.error_count) == (1000, 999, 1)
    assert [item.id for item in done.error_items] == ["bulk-0010"]
    assert knock.users.get("bulk-0999").plan == "free"
    with pytest.raises(knockapi.NotFoundError):
        knock.users.get("bulk-0010")

    knock.audiences.add_members("newsletter", members=[{"user": {"id": "bulk-0001"}}])
    deleted = wait_for(
        knock, knock.users.bulk.delete(user_ids=["bulk-0001", "bulk-0002", "never-seen"]).id
    )
    assert deleted.status == "completed" and deleted.success_count == 3
    with pytest.raises(knockapi.NotFoundError):
        knock.users.get("bulk-0001")
    assert ("newsletter", "bulk-0001", None, "exited") in events(service)
    # Knock's limit: 1,000 users a request.
    with pytest.raises(knockapi.UnprocessableEntityError) as too_many:
        knock.users.bulk.identify(users=[{"id": f"u{n}"} for n in range(1001)])
    assert too_many.value.body["errors"][0]["field"] == "users"
    with pytest.raises(knockapi.NotFoundError):
        knock.bulk_operations.get("no-such-operation")


def test_a_bulk_operation_left_by_a_dead_worker_is_taken_over_when_its_lease_ends(service):
    from audiences.api import bulk

    environment = service.environment("development")
    environment.bulk_worker.close()  # no worker: the operation stays queued
    knock = sdk(service)
    queued = knock.users.bulk.identify(users=[{"id": f"late-{n}"} for n in range(250)])
    # A worker claims it and applies one chunk, then "dies" (its lease left in the store).
    dead = bulk.BulkWorker(environment)
    operation = dead._claim()
    dead._apply(operation, json.loads(operation["items"])[:100], 100)
    assert knock.bulk_operations.get(queued.id).processed_rows == 100
    table = tables.bulk_operations
    environment.write(
        lambda connection: connection.execute(
            table.update().values(claimed_until="2000-01-01T00:00:00.000000Z")
        )
    )
    environment.bulk_worker = bulk.BulkWorker(environment).start()
    done = wait_for(knock, queued.id)
    assert (done.status, done.processed_rows, done.success_count) == ("completed", 250, 250)
    assert len(knock.users.list(page_size=50).entries) == 50
    assert sum(1 for _ in knock.users.list(page_size=50)) == 250


def test_tenants_are_set_merged_listed_and_deleted_in_knocks_shape(service):
    knock = sdk(service)
    tenant = knock.tenants.set(
        "acme", name="Acme", settings={"branding": {"primary_color": "#ff0000"}}
    )
    assert tenant.id == "acme" and tenant.name == "Acme"
    assert tenant.settings.branding.primary_color == "#ff0000"
    knock.tenants.set("acme", extra_body={"region": "eu", "tier": {"level": 2}})
    knock.tenants.set("acme", extra_body={"tier": {"level": None, "seats": 9}})
    fetched = knock.tenants.get("acme")
    assert fetched.name == "Acme" and fetched.region == "eu" and fetched.tier == {"seats": 9}
    knock.tenants.set("globex", name="Globex")
    assert [t.id for t in knock.tenants.list()] == ["acme", "globex"]
    assert [t.id for t in knock.tenants.list(name="Globex")] == ["globex"]
    # Stored per environment, in the store's `tenants` table, in Knock's shape.
    rows = service.environment("development").store.rows(sa.select(tables.tenants))
    assert {row["tenant_id"]: row["name"] for row in rows} == {"acme": "Acme", "globex": "Globex"}
    production = sdk(service, key=service.production_key)
    with pytest.raises(knockapi.NotFoundError):
        production.tenants.get("acme")
    knock.tenants.delete("globex")
    with pytest.raises(knockapi.NotFoundError):
        knock.tenants.get("globex")
    with pytest.raises(knockapi.NotFoundError):
        knock.tenants.delete("globex")
    with pytest.raises(knockapi.UnprocessableEntityError):
        knock.tenants.set("team/a", name="slash")


def test_members_accept_an_inline_tenant_object_and_set_the_tenant(service):
    knock = sdk(service)
    knock.audiences.add_members(
        "newsletter",
        members=[{"user": {"id": "ada"}, "tenant": {"id": "initech", "name": "Initech"}}],
    )
    assert [(m.user_id, m.tenant) for m in knock.audiences.list_members("newsletter").entries] == [
        ("ada", "initech")
    ]
    assert knock.tenants.get("initech").name == "Initech"


def test_preferences_and_channel_data_are_not_user_properties(service):
    knock = sdk(service)
    user = knock.users.update(
        "ada",
        name="Ada",
        channel_data={"a1b2c3": {"tokens": ["t"]}},
        preferences={"default": {"channel_types": {"email": False}}},
    )
    assert user.name == "Ada"
    assert not hasattr(user, "preferences") and not hasattr(user, "channel_data")
    knock.audiences.add_members(
        "newsletter", members=[{"user": {"id": "bob", "preferences": {"default": {}}}}]
    )
    patches = service.environment("development").store.rows(sa.select(tables.user_patches))
    assert all(
        "preferences" not in patch["patch"] and "channel_data" not in patch["patch"]
        for patch in patches
    )
    assert [patch["user_id"] for patch in patches] == ["ada"]


def test_rate_limits_are_per_environment_and_tier_not_per_key(service, monkeypatch):
    # One request every 30 s: the second comes long before another is due, however slow the
    # machine (and a rate under one a second still lets its first request through).
    monkeypatch.setenv("AUDIENCES_API_WRITE_RATE", str(1 / 30))
    monkeypatch.setenv("AUDIENCES_API_DELETE_RATE", str(1 / 30))
    environment = service.environment("development")
    second_key = create_key(environment.store, "development", "second")[1]
    app = asgi_app(service.settings)
    try:
        with running_server(app) as url:

            def put(key: str, user_id: str) -> httpx.Response:
                return httpx.put(
                    f"{url}/v1/users/{user_id}",
                    json={"name": "x"},
                    headers={"Authorization": f"Bearer {key}"},
                )

            answers = [put(service.development_key, "a"), put(second_key, "b")]
            # Two keys share the environment's one write a second: the second key is refused.
            assert [answer.status_code for answer in answers] == [200, 429]
            assert int(answers[-1].headers["Retry-After"]) >= 1
            assert answers[-1].json()["code"] == "rate_limit_exceeded"
            # Production has its own bucket.
            assert put(service.production_key, "p").status_code == 200
            # Deletes are a slower tier, with a bucket of their own.
            delete = [
                httpx.delete(
                    f"{url}/v1/users/{user_id}",
                    headers={"Authorization": f"Bearer {service.development_key}"},
                ).status_code
                for user_id in ("a", "a")
            ]
            assert delete == [204, 429]
            # Reads are not limited by the writes and deletes.
            assert (
                httpx.get(
                    f"{url}/v1/users/p",
                    headers={"Authorization": f"Bearer {service.production_key}"},
                ).status_code
                == 200
            )
    finally:
        close_app(app.app)


def test_audiences_serve_with_two_workers_processes_bulk_operations_and_serves_tenants(tmp_path):
    """Through `audiences serve --workers 2`: whichever process answers a request, the bulk
    operation queued by one is applied by a worker and reported by the other, through the store."""
    import os
    import subprocess
    import sys

    from api_server import serve_process
    from condition_harness import ROOT

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        "AUDIENCES_DUCKDB": str(tmp_path / "warehouse.duckdb"),
        "AUDIENCES_DEFINITIONS": str(ROOT / "data" / "audiences"),
        "AUDIENCES_API_BULK_RATE": "100",
    }
    created = subprocess.run(
        [sys.executable, "-m", "audiences.cli", "keys", "create", "--name", "ci"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    with serve_process(env, ROOT, workers=2) as (url, _):
        knock = knockapi.Knock(api_key=secret, base_url=url, max_retries=0)
        operations = [
            knock.users.bulk.identify(
                users=[{"id": f"served-{batch}-{n:03}", "plan": "pro"} for n in range(500)]
            ).id
            for batch in range(4)
        ]
        for operation_id in operations:
            done = wait_for(knock, operation_id)
            assert (done.status, done.success_count) == ("completed", 500)
        assert sum(1 for _ in knock.users.list(page_size=50)) == 2000
        knock.tenants.set("acme", name="Acme")
        assert [tenant.name for tenant in knock.tenants.list()] == ["Acme"]


def test_a_bulk_operation_whose_chunk_keeps_failing_ends_failed_with_its_progress(
    service, monkeypatch
):
    from audiences.api import bulk

    real_identify = bulk.profiles.identify

    def identify_refusing_poison(store, connection, patches):
        patches = list(patches)
        if any(user_id == "poison" for user_id, _ in patches):
            raise RuntimeError("the store refused the chunk")
        return real_identify(store, connection, patches)

    monkeypatch.setattr(bulk.profiles, "identify", identify_refusing_poison)
    knock = sdk(service)
    users = [{"id": f"ok-{n:03}"} for n in range(150)] + [{"id": "poison"}]
    done = wait_for(knock, knock.users.bulk.identify(users=users).id)
    assert done.status == "failed" and done.failed_at is not None
    # The first chunk of 100 was applied; the failing chunk (50 and the poison) was not.
    assert (done.processed_rows, done.success_count) == (100, 100)
    assert knock.users.get("ok-099").id == "ok-099"
    with pytest.raises(knockapi.NotFoundError):
        knock.users.get("ok-100")
