"""The service over plain HTTP: pages, tenants, checks, idempotency, limits, keys, guides,
broadcasts and Census's custom-destination protocol."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import sqlalchemy as sa

from audiences.api.app import close_app
from audiences.store import database as tables


@pytest.fixture
def http(service):
    with httpx.Client(base_url=service.url, headers=service.headers(), timeout=30) as client:
        yield client


def add(http, key: str, members: list, **params) -> httpx.Response:
    return http.post(f"/v1/audiences/{key}/members", json={"members": members}, params=params)


def test_list_members_walks_pages_forwards_and_backwards_and_filters_by_tenant(http):
    members = [
        {"user": {"id": f"user-{number:03}"}, "tenant": tenant}
        for number in range(60)
        for tenant in (None, "acme")
    ]
    assert add(http, "newsletter", members).status_code == 204
    seen, after = [], None
    while True:
        page = http.get(
            "/v1/audiences/newsletter/members",
            params={"page_size": 50, **({"after": after} if after else {})},
        ).json()
        seen += [(entry["user_id"], entry["tenant"]) for entry in page["entries"]]
        after = page["page_info"]["after"]
        if after is None:
            break
    assert seen == sorted(
        ((f"user-{n:03}", t) for n in range(60) for t in (None, "acme")),
        key=lambda pair: (pair[0], pair[1] or ""),
    )
    # From the page after the 100th member, `before` leads back to members 81 to 100.
    later = http.get(
        "/v1/audiences/newsletter/members", params={"page_size": 20, "after": _cursor(http, 100)}
    ).json()
    assert [(e["user_id"], e["tenant"]) for e in later["entries"]] == seen[100:120]
    back = http.get(
        "/v1/audiences/newsletter/members",
        params={"page_size": 20, "before": later["page_info"]["before"]},
    ).json()
    assert [(e["user_id"], e["tenant"]) for e in back["entries"]] == seen[80:100]
    assert back["page_info"]["before"] is not None and back["page_info"]["after"] is not None
    acme = http.get(
        "/v1/audiences/newsletter/members", params={"tenant": "acme", "page_size": 50}
    ).json()
    assert {entry["tenant"] for entry in acme["entries"]} == {"acme"} and len(acme["entries"]) == 50
    none = http.get(
        "/v1/audiences/newsletter/members", params={"tenant": "", "page_size": 50}
    ).json()
    assert {entry["tenant"] for entry in none["entries"]} == {None}


def _forged(text: str) -> str:
    """A cursor in this API's encoding (base64 of UTF-8 text) that it never returns."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _cursor(http, position: int) -> str:
    page = http.get("/v1/audiences/newsletter/members", params={"page_size": 50}).json()
    cursor = page["page_info"]["after"]
    for _ in range(position // 50 - 1):
        cursor = http.get(
            "/v1/audiences/newsletter/members", params={"page_size": 50, "after": cursor}
        ).json()["page_info"]["after"]
    return cursor


def test_membership_check_is_tenant_strict(http):
    add(http, "newsletter", [{"user": {"id": "ada"}, "tenant": "acme"}, {"user": {"id": "bob"}}])

    def check(user, **params):
        return http.get(f"/v1/audiences/newsletter/members/{user}", params=params).json()["member"]

    assert check("ada", tenant="acme") is True
    assert check("ada", tenant="globex") is False
    assert check("ada") is False  # no tenant: only a membership without tenant counts
    assert check("bob") is True and check("bob", tenant="acme") is False
    assert http.get("/v1/audiences/nope/members/ada").status_code == 404


def test_a_blank_tenant_is_no_tenant(http):
    """Issue 20, defect 1: "" then null is one member without tenant; "  " is not a tenant."""
    for tenant in ("", None, "  "):
        assert (
            add(http, "newsletter", [{"user": {"id": "b1"}, "tenant": tenant}]).status_code == 204
        )
    page = http.get("/v1/audiences/newsletter/members").json()
    assert [(entry["user"]["id"], entry["tenant"]) for entry in page["entries"]] == [("b1", None)]
    for params in ({}, {"tenant": ""}, {"tenant": " "}):
        assert http.get("/v1/audiences/newsletter/members/b1", params=params).json()["member"]
    only = http.get("/v1/audiences/newsletter/members", params={"tenant": "  "}).json()
    assert [entry["user"]["id"] for entry in only["entries"]] == ["b1"]
    removed = http.request(
        "DELETE",
        "/v1/audiences/newsletter/members",
        json={"members": [{"user": {"id": "b1"}, "tenant": " "}]},
    )
    assert removed.status_code == 204
    assert http.get("/v1/audiences/newsletter/members").json()["entries"] == []


def test_idempotency_key_replays_the_first_answer_and_refuses_other_parameters(http, service):
    headers = {"Idempotency-Key": "sync-42"}
    first = http.put("/v1/users/eve", json={"name": "Eve"}, headers=headers)
    again = http.put("/v1/users/eve", json={"name": "Eve"}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["original-x-request-id"] == first.headers["x-request-id"]
    other = http.put("/v1/users/eve", json={"name": "Evelyn"}, headers=headers)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    patches = service.environment("development").store.rows(sa.select(tables.user_patches.c.patch))
    assert [json.loads(row["patch"]) for row in patches] == [{"name": "Eve"}]  # applied once
    # A failed request is not kept: the same key can be used again once the input is fixed.
    assert add(http, "nope", [{"user": {"id": "x"}}]).status_code == 404
    assert (
        http.post(
            "/v1/audiences/nope/members", json={"members": []}, headers={"Idempotency-Key": "k2"}
        ).status_code
        == 404
    )
    assert (
        http.post(
            "/v1/audiences/newsletter/members",
            json={"members": []},
            headers={"Idempotency-Key": "k2"},
        ).status_code
        == 204
    )


def test_bad_input_gets_knock_shaped_errors_never_a_500(http):
    cases = [
        (
            http.post(
                "/v1/audiences/newsletter/members",
                content=b'{"members": [',
                headers={"content-type": "application/json"},
            ),
            422,
            "body",
        ),
        (add(http, "newsletter", [{"user": {"id": "   "}}]), 422, "members.0.user.id"),
        (add(http, "newsletter", [{"user": {"id": "a\u0000b"}}]), 422, "members.0.user.id"),
        (
            http.post(
                "/v1/audiences/newsletter/members",
                content=b'{"members": [{"user": {"id": "\\ud800"}}]}',
                headers={"content-type": "application/json"},
            ),
            422,
            None,
        ),
        (add(http, "newsletter", [{"user": {"id": "x", "name": 5}}]), 422, "members.0.user.name"),
        (
            add(http, "newsletter", [{"user": {"id": "x", "bio": "b" * 300_000}}]),
            422,
            "members.0.user",
        ),
        (add(http, "newsletter", [{"user": {"id": "x" * 256}}]), 422, "members.0.user.id"),
        (http.put("/v1/users/x", json={"id": "y"}), 422, "id"),
        (http.get("/v1/audiences/newsletter/members", params={"page_size": 51}), 422, "page_size"),
        (http.get("/v1/audiences/newsletter/members", params={"after": "garbage"}), 422, "after"),
        # Cursors that decode to text no store can compare (a lone surrogate: SQLite's driver
        # cannot encode it; a NUL: PostgreSQL refuses it), which this API never returns.
        *[
            (http.get(path, params={direction: _forged(text)}), 422, direction)
            for path, texts in [
                ("/v1/audiences/newsletter/members", ['["\\ud800", ""]', '["u1", "a\\u0000"]']),
                ("/v1/users", ["a\u0000"]),
                ("/v1/tenants", ["a\u0000"]),
            ]
            for text in texts
            for direction in ["after", "before"]
        ],
    ]
    for response, status, field in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) >= {"code", "message", "status", "type"} and body["status"] == status
        if field:
            assert body["errors"][0]["field"] == field, body
    assert http.get("/v1/audiences/newsletter/members").json()["entries"] == []


def test_bodies_over_the_limit_get_413(service, monkeypatch):
    from api_server import running_server

    from audiences.api.app import asgi_app

    monkeypatch.setenv("AUDIENCES_API_MAX_BODY_BYTES", "2000")
    app = asgi_app(service.settings)
    with (
        running_server(app) as url,
        httpx.Client(base_url=url, headers=service.headers()) as client,
    ):
        big = {"members": [{"user": {"id": f"user-{n}"}} for n in range(200)]}
        response = client.post("/v1/audiences/newsletter/members", json=big)
        assert response.status_code == 413 and response.json()["code"] == "request_too_large"
        chunked = client.post(
            "/v1/audiences/newsletter/members",
            content=iter([json.dumps(big).encode()]),
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413
        assert (
            client.post(
                "/v1/audiences/newsletter/members", json={"members": [{"user": {"id": "ok"}}]}
            ).status_code
            == 204
        )
    close_app(app.app)


def test_a_key_sees_only_its_environment_and_revoked_keys_stop_working(http, service):
    from audiences.api.keys import list_keys, revoke_key

    add(http, "newsletter", [{"user": {"id": "dev-only"}}])
    identify = http.put("/v1/users/dev-only", json={"name": "Dev"})
    assert identify.status_code == 200
    production = service.headers(service.production_key)
    assert http.get("/v1/audiences/newsletter/members", headers=production).json()["entries"] == []
    assert http.get("/v1/users/dev-only", headers=production).status_code == 404
    assert (
        http.get("/v1/audiences/newsletter/members/dev-only", headers=production).json()["member"]
        is False
    )
    store = service.environment("production").store
    assert revoke_key(store, list_keys(store)[0]["key_id"])
    response = http.get("/v1/audiences/newsletter/members", headers=production)
    assert response.status_code == 401 and response.json()["type"] == "authentication_error"
    assert httpx.get(f"{service.url}/v1/audiences/newsletter/members").status_code == 401
    stored = service.environment("development").store.rows(sa.select(tables.api_keys.c.key_hash))
    assert service.development_key not in json.dumps(stored)  # only hashes are kept


def test_guide_eligibility_uses_membership_tenancy_and_properties(http):
    add(http, "newsletter", [{"user": {"id": "gia", "plan": "free"}, "tenant": "acme"}])

    def eligible(**params):
        return http.get("/v1/guides/upgrade-banner/eligibility/gia", params=params).json()

    assert eligible(tenant="acme")["eligible"] is True
    assert eligible(tenant="globex")["eligible"] is False  # tenancy strict mode
    http.put("/v1/users/gia", json={"plan": "pro"})
    assert eligible(tenant="acme") == {
        "guide_key": "upgrade-banner",
        "user_id": "gia",
        "tenant": "acme",
        "eligible": False,
        "reason": "the target property conditions do not hold",
    }
    assert http.get("/v1/guides/no-such-guide/eligibility/gia").status_code == 404


def test_broadcast_queues_one_delivery_per_member_once(http, service):
    add(
        http,
        "newsletter",
        [{"user": {"id": "a"}}, {"user": {"id": "a"}, "tenant": "acme"}, {"user": {"id": "b"}}],
    )
    first = http.post(
        "/v1/audiences/newsletter/broadcasts", json={"workflow": "launch", "data": {"v": 1}}
    )
    assert (
        first.status_code == 202
        and first.json()["recipients"] == 3
        and first.json()["new_deliveries"] == 3
    )
    again = http.post(
        "/v1/audiences/newsletter/broadcasts", json={"workflow": "launch", "data": {"v": 1}}
    )
    assert again.json()["new_deliveries"] == 0
    assert (
        http.post(
            "/v1/audiences/newsletter/broadcasts", json={"workflow": "launch", "sink": "nope"}
        ).status_code
        == 422
    )


def rpc(http, method: str, params: dict | None = None, request_id: int = 1) -> dict:
    response = http.post(
        "/v1/integrations/census/custom-destination",
        json={"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == request_id
    return body


def test_census_custom_destination_inserts_and_mirrors(http):
    assert rpc(http, "test_connection")["result"] == {"success": True}
    objects = rpc(http, "list_objects")["result"]["objects"]
    assert {"object_api_name": "newsletter", "label": "newsletter"} in objects
    assert all(
        entry["object_api_name"] != "pro-plan" for entry in objects
    )  # dynamic audiences are not targets
    audience = {"object_api_name": "newsletter", "label": "newsletter"}
    fields = rpc(http, "list_fields", {"object": audience})["result"]["fields"]
    assert [field["field_api_name"] for field in fields if field["identifier"]] == ["user_id"]
    assert (
        "mirror" in rpc(http, "supported_operations", {"object": audience})["result"]["operations"]
    )
    assert rpc(http, "get_sync_speed")["result"]["maximum_batch_size"] == 1000
    plan = {
        "object": audience,
        "operation": "upsert",
        "schema": {"user_id": {"active_identifier": True, "field": fields[0]}},
    }
    result = rpc(
        http,
        "sync_batch",
        {
            "sync_plan": plan,
            "records": [
                {"user_id": "c1"},
                {"user_id": "c2", "tenant": "acme"},
                {"user_id": ""},
                {"user_id": 7},
            ],
        },
    )["result"]
    assert result["record_results"] == [
        {"identifier": "c1", "success": True, "error_message": None},
        {"identifier": "c2", "success": True, "error_message": None},
        {"identifier": "", "success": False, "error_message": "user_id is missing or blank"},
        {"identifier": "7", "success": True, "error_message": None},
    ]
    rpc(
        http,
        "sync_batch",
        {"sync_plan": {**plan, "operation": "delete"}, "records": [{"user_id": "c1"}]},
    )
    members = http.get("/v1/audiences/newsletter/members").json()["entries"]
    assert [(m["user_id"], m["tenant"]) for m in members] == [("7", None), ("c2", "acme")]
    assert (
        rpc(
            http,
            "sync_batch",
            {"sync_plan": {**plan, "object": {"object_api_name": "pro-plan"}}, "records": []},
        )["error"]["code"]
        == -32602
    )
    assert rpc(http, "no_such_method")["error"]["code"] == -32601


def test_members_can_be_removed_through_the_query_as_censuss_http_destination_sends_them(http):
    add(http, "newsletter", [{"user": {"id": "q1"}, "tenant": "acme"}, {"user": {"id": "q2"}}])
    removed = http.delete(
        "/v1/audiences/newsletter/members",
        params={"members": json.dumps([{"user": {"id": "q1"}, "tenant": "acme"}])},
    )
    assert removed.status_code == 204
    assert [
        e["user_id"] for e in http.get("/v1/audiences/newsletter/members").json()["entries"]
    ] == ["q2"]
    bad = http.delete("/v1/audiences/newsletter/members", params={"members": "[{"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "members"
    assert (
        http.delete("/v1/audiences/newsletter/members").status_code == 422
    )  # neither body nor query


def test_a_dynamic_audience_lists_the_members_of_its_last_published_evaluation(http, service):
    from audiences.membership.events import MembershipEvent
    from audiences.store.database import apply_membership_changes

    store = service.environment("development").store
    published = [
        MembershipEvent(
            event_id=f"e-{user}",
            audience_key="pro-plan",
            user_id=user,
            tenant=None,
            event_type="entered",
            occurred_at="2026-11-27T00:00:00.000000Z",
            entry_number=1,
        )
        for user in ("p1", "p2")
    ]
    with (
        store.engine.begin() as connection
    ):  # what publishing an evaluation does to current members
        apply_membership_changes(store, connection, published)
    listed = http.get("/v1/audiences/pro-plan/members").json()["entries"]
    assert [(entry["user_id"], entry["added_at"]) for entry in listed] == [
        ("p1", "2026-11-27T00:00:00.000000Z"),
        ("p2", "2026-11-27T00:00:00.000000Z"),
    ]
    assert http.get("/v1/audiences/pro-plan/members/p1").json()["member"] is True
    refused = http.request(
        "DELETE", "/v1/audiences/pro-plan/members", json={"members": [{"user": {"id": "p1"}}]}
    )
    assert refused.status_code == 422 and refused.json()["code"] == "audience_not_static"
