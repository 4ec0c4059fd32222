"""Input built to break the parser or the store: deep nesting, and numbers JSON cannot carry.
Each is a 422 naming the field, and nothing is written."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import sqlalchemy as sa

DEEP = "[" * 1000 + "]" * 1000


@pytest.fixture
def http(service):
    with httpx.Client(base_url=service.url, headers=service.headers(), timeout=30) as client:
        yield client


def written(service) -> dict[str, int]:
    store = service.environment("development").store
    return {
        table: store.scalar(sa.text(f"select count(*) from {table}"))
        for table in (
            "user_profiles",
            "user_patches",
            "audience_members",
            "membership_events",
            "deliveries",
        )
    }


def assert_refused(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["status"] == 422 and body["errors"][0]["field"] == field, body
    assert field in body["message"]


def test_deep_nesting_is_refused_in_the_query_and_in_the_body(http, service):
    members = '[{"user": {"id": "u1", "deep": ' + DEEP + "}}]"
    assert_refused(
        http.delete("/v1/audiences/newsletter/members", params={"members": DEEP}), "members"
    )
    assert_refused(
        http.delete("/v1/audiences/newsletter/members", params={"members": members}), "members"
    )
    assert (
        http.post(
            "/v1/audiences/newsletter/members",
            content='{"members": ' + members + "}",
            headers={"content-type": "application/json"},
        ).status_code
        == 422
    )
    assert (
        http.put(
            "/v1/users/u1",
            content='{"deep": ' + DEEP + "}",
            headers={"content-type": "application/json"},
        ).status_code
        == 422
    )
    assert written(service) == dict.fromkeys(written(service), 0)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_numbers_json_cannot_carry_are_refused_before_anything_is_written(http, service, number):
    identify = '{"name": "Ada", "stats": {"score": ' + number + "}}"
    assert_refused(
        http.put("/v1/users/u1", content=identify, headers={"content-type": "application/json"}),
        "stats.score",
    )
    added = (
        '{"members": [{"user": {"id": "u0"}}, {"user": {"id": "u1", "ratio": [1, '
        + number
        + "]}}]}"
    )
    assert_refused(
        http.post(
            "/v1/audiences/newsletter/members",
            content=added,
            headers={"content-type": "application/json"},
        ),
        "members.1.user.ratio.1",
    )
    broadcast = '{"workflow": "welcome", "data": {"discount": ' + number + "}}"
    assert_refused(
        http.post(
            "/v1/audiences/newsletter/broadcasts",
            content=broadcast,
            headers={"content-type": "application/json"},
        ),
        "data.discount",
    )
    assert written(service) == dict.fromkeys(written(service), 0)
    assert http.get("/v1/users/u1").status_code == 404
    # A large number that JSON can carry is kept, exactly.
    kept = http.put(
        "/v1/users/u1", content='{"big": 1e308}', headers={"content-type": "application/json"}
    )
    assert kept.status_code == 200 and json.loads(kept.text)["big"] == 1e308


IDS = [" pad", "pad ", "tab\tx", "a\x01b", "a\x7fb", "\u00a0nbsp", "em\u2003", "ok-1", "ü ñ 😀"]


def test_the_api_accepts_exactly_the_user_ids_the_warehouse_loads(http, service):
    # An id with whitespace at an end or a control character was answered 200 by identify and
    # add, entered audiences in real time (triggers sent), and was then quarantined by every run:
    # the warehouse never held the user. The API now refuses what the loader would quarantine.
    import polars as pl

    from audiences.users.validation import check_users

    frame = pl.DataFrame({"id": IDS, "_row": range(1, len(IDS) + 1)})
    loadable = set(check_users(frame)[0]["id"])
    assert loadable == {"ok-1", "ü ñ 😀"}  # the loader's verdicts
    from urllib.parse import quote

    for user_id in IDS:
        identify = http.put(f"/v1/users/{quote(user_id, safe='')}", json={"plan": "pro"})
        added = http.post(
            "/v1/audiences/newsletter/members", json={"members": [{"user": {"id": user_id}}]}
        )
        if user_id in loadable:
            assert (identify.status_code, added.status_code) == (200, 204), user_id
        else:
            assert identify.status_code == 422, (user_id, identify.text)
            assert_refused(added, "members.0.user.id")
    store = service.environment("development").store
    profiles = store.rows(sa.text("select user_id from user_profiles"))
    assert {row["user_id"] for row in profiles} == loadable


BAD_TENANTS = ["a/b", "a#b", " acme", "acme ", "t\x01x"]


def test_a_tenant_given_as_a_string_is_checked_as_one_given_as_an_object(http, service):
    # `"tenant": "a/b"` or `" acme"` was added (204) while `{"id": "a/b"}` and `PUT /v1/tenants`
    # refused the same tenant: one rule for a tenant however it is given (blank is no tenant).
    for tenant in BAD_TENANTS:
        for given in (tenant, {"id": tenant}):
            for method in ("POST", "DELETE"):
                answer = http.request(
                    method,
                    "/v1/audiences/newsletter/members",
                    json={"members": [{"user": {"id": "t4"}, "tenant": given}]},
                )
                assert answer.status_code == 422, (method, given, answer.text)
                assert answer.json()["errors"][0]["field"].startswith("members.0.tenant"), given
        check = http.get("/v1/audiences/newsletter/members/t4", params={"tenant": tenant})
        assert_refused(check, "tenant")
        upload = http.post(
            "/v1/audiences/newsletter/members/upload",
            params={"tenant_column": "org"},
            content=f'id,org\nt5,"{tenant}"\nt6,acme\n'.encode(),
            headers={"content-type": "text/csv"},
        )
        assert upload.status_code == 200, upload.text
        rejected = upload.json()["rejected"]
        assert [(r["row"], r["id"]) for r in rejected] == [(1, "t5")], rejected
        assert rejected[0]["reason"].startswith("org: "), rejected
    for tenant in ("", "  ", "acme"):
        added = http.post(
            "/v1/audiences/newsletter/members",
            json={"members": [{"user": {"id": "t4"}, "tenant": tenant}]},
        )
        assert added.status_code == 204, (tenant, added.text)
    tenants = http.get("/v1/audiences/newsletter/members", params={"page_size": 50}).json()
    assert sorted((m["user_id"], m["tenant"] or "") for m in tenants["entries"]) == [
        ("t4", ""),
        ("t4", "acme"),
        ("t6", "acme"),
    ]


def test_one_broken_definition_leaves_the_other_audiences_served(http, service):
    """A definition with an error stops that audience, not the API (found by redteam4: every
    member listing answered 500 while one file of the folder had an error)."""
    broken = service.settings.definitions_dir / "broken"
    broken.mkdir()
    (broken / "audience.json").write_text(
        json.dumps(
            {
                "name": "Broken",
                "type": "dynamic",
                "segments": [
                    {
                        "conditions": [
                            {
                                "property": "recipient.seen_at",
                                "operator": "is_timestamp_before",
                                "argument": 253402300800,
                            }
                        ]
                    }
                ],
            }
        )
    )
    time.sleep(1.1)  # the service re-reads the definitions at most once a second
    assert http.get("/v1/audiences/newsletter/members").status_code == 200
    assert http.get("/v1/audiences/pro-plan/members").status_code == 200
    added = http.post(
        "/v1/audiences/newsletter/members", json={"members": [{"user": {"id": "u1"}}]}
    )
    assert added.status_code == 204, added.text
    # The skipped audience keeps its type (and its last members, none here).
    assert http.get("/v1/audiences/broken/members").status_code == 200
