"""Knock's own Python SDK (`knockapi`) against the service on 127.0.0.1."""

from __future__ import annotations

import knockapi
import pytest
import sqlalchemy as sa

from audiences.api.app import close_app
from audiences.store import database as tables


def client(service, key: str | None = None, **options) -> knockapi.Knock:
    return knockapi.Knock(api_key=key or service.development_key, base_url=service.url, **options)


def test_add_list_and_remove_members_with_the_sdk(service):
    knock = client(service)
    knock.audiences.add_members(
        "newsletter",
        members=[
            {"user": {"id": "ada", "name": "Ada", "email": "ada@example.com", "plan": "pro"}},
            {"user": {"id": "bob"}, "tenant": "acme"},
            {"user": {"id": "bob"}, "tenant": "globex"},
        ],
    )
    page = knock.audiences.list_members("newsletter")
    assert [(entry.user_id, entry.tenant) for entry in page.entries] == [
        ("ada", None),
        ("bob", "acme"),
        ("bob", "globex"),
    ]
    assert page.entries[0].user.name == "Ada" and page.entries[0].user.email == "ada@example.com"
    assert page.page_info.page_size == 50 and page.page_info.after is None

    knock.audiences.remove_members(
        "newsletter", members=[{"user": {"id": "bob"}, "tenant": "acme"}]
    )
    page = knock.audiences.list_members("newsletter")
    assert [(entry.user_id, entry.tenant) for entry in page.entries] == [
        ("ada", None),
        ("bob", "globex"),
    ]
    events = service.environment("development").store.rows(
        sa.select(
            tables.membership_events.c.user_id,
            tables.membership_events.c.tenant,
            tables.membership_events.c.event_type,
        ).order_by(tables.membership_events.c.published_at, tables.membership_events.c.user_id)
    )
    assert sorted((e["user_id"], e["tenant"], e["event_type"]) for e in events) == [
        ("ada", None, "entered"),
        ("bob", "acme", "entered"),
        ("bob", "acme", "exited"),
        ("bob", "globex", "entered"),
    ]


def test_identify_get_and_delete_users_with_the_sdk(service):
    knock = client(service)
    user = knock.users.update(
        "carla", name="Carla", email="carla@example.com", extra_body={"plan": "free"}
    )
    assert user.id == "carla" and user.name == "Carla" and user.plan == "free"
    knock.users.update("carla", extra_body={"plan": None, "seats": 3})
    fetched = knock.users.get("carla")
    assert (
        fetched.email == "carla@example.com" and fetched.seats == 3 and not hasattr(fetched, "plan")
    )

    knock.audiences.add_members("newsletter", members=[{"user": {"id": "carla"}}])
    knock.users.delete("carla")
    with pytest.raises(knockapi.NotFoundError):
        knock.users.get("carla")
    assert knock.audiences.list_members("newsletter").entries == []


def test_the_sdk_raises_its_error_types_for_bad_calls(service):
    knock = client(service, max_retries=0)
    with pytest.raises(knockapi.UnprocessableEntityError) as too_many:
        knock.audiences.add_members(
            "newsletter", members=[{"user": {"id": f"u{i}"}} for i in range(1001)]
        )
    assert (
        too_many.value.status_code == 422 and too_many.value.body["errors"][0]["field"] == "members"
    )
    with pytest.raises(knockapi.UnprocessableEntityError) as missing_id:
        knock.audiences.add_members("newsletter", members=[{"user": {"name": "no id"}}])
    assert missing_id.value.body["errors"][0]["field"] == "members.0.user.id"
    with pytest.raises(knockapi.NotFoundError) as unknown:
        knock.audiences.add_members("no-such-audience", members=[{"user": {"id": "a"}}])
    assert unknown.value.body["code"] == "resource_missing"
    with pytest.raises(knockapi.UnprocessableEntityError) as dynamic:
        knock.audiences.add_members("pro-plan", members=[{"user": {"id": "a"}}])
    assert dynamic.value.body["code"] == "audience_not_static"
    with pytest.raises(knockapi.AuthenticationError):
        client(service, key="sk_development_not-a-key", max_retries=0).audiences.list_members(
            "newsletter"
        )
    # Nothing of the refused calls went in.
    assert knock.audiences.list_members("newsletter").entries == []


def test_create_audience_creates_a_missing_static_audience(service):
    knock = client(service)
    knock.audiences.add_members(
        "beta-list", members=[{"user": {"id": "dan"}}], create_audience=True
    )
    assert [entry.user_id for entry in knock.audiences.list_members("beta-list").entries] == ["dan"]


def test_rate_limit_answers_429_with_retry_after(service, monkeypatch):
    from api_server import running_server

    from audiences.api.app import asgi_app

    monkeypatch.setenv("AUDIENCES_API_WRITE_RATE", "2")
    app = asgi_app(service.settings)
    with running_server(app) as url:
        knock = knockapi.Knock(api_key=service.development_key, base_url=url, max_retries=0)
        statuses = []
        for number in range(5):
            try:
                knock.audiences.add_members("newsletter", members=[{"user": {"id": f"r{number}"}}])
                statuses.append(204)
            except knockapi.RateLimitError as error:
                statuses.append(429)
                assert int(error.response.headers["retry-after"]) >= 1
        assert statuses[:2] == [204, 204] and 429 in statuses[2:]
        # The SDK's own retries honour Retry-After, so a patient client gets through.
        patient = knockapi.Knock(api_key=service.development_key, base_url=url, max_retries=3)
        patient.audiences.add_members("newsletter", members=[{"user": {"id": "patient"}}])
    close_app(app.app)
