"""Where the service departed from Knock's API (issue 20's defects), held with Knock's own SDK
(`knockapi`) and plain HTTP against the service on 127.0.0.1, and against `audiences serve`."""

from __future__ import annotations

import json
import os
from http.client import HTTPConnection

import httpx
import knockapi
import pytest
from api_server import serve_process
from condition_harness import ROOT

from audiences.store import database as tables


@pytest.fixture
def http(service):
    with httpx.Client(base_url=service.url, headers=service.headers(), timeout=30) as client:
        yield client


def sdk(service, **options) -> knockapi.Knock:
    return knockapi.Knock(
        api_key=service.development_key, base_url=service.url, max_retries=0, **options
    )


# -- created_at is a date-time (Knock's schema) ------------------------------------------------


def test_created_at_must_be_a_date_time_on_identify_and_inline_identify(service, http):
    knock = sdk(service)
    with pytest.raises(knockapi.UnprocessableEntityError) as refused:
        knock.users.update("ada", extra_body={"created_at": "not a date"})
    assert refused.value.body["errors"][0]["field"] == "created_at"
    assert "date-time" in refused.value.body["message"]
    answer = http.post(
        "/v1/audiences/newsletter/members",
        json={"members": [{"user": {"id": "bob", "created_at": "yesterday"}}]},
    )
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["field"] == "members.0.user.created_at"
    # Nothing of either call was stored.
    assert http.get("/v1/users/ada").status_code == 404
    assert http.get("/v1/users/bob").status_code == 404
    # A real date-time is stored as sent; null removes it.
    user = knock.users.update("ada", extra_body={"created_at": "2024-05-01T10:00:00Z"})
    assert http.get("/v1/users/ada").json()["created_at"] == "2024-05-01T10:00:00Z"
    assert user.created_at is not None
    assert "created_at" not in http.put("/v1/users/ada", json={"created_at": None}).json()


# -- ids with '/' or '#' are refused, as Knock does ------------------------------------------


def test_a_user_id_with_a_slash_is_refused_when_added_and_when_read(service, http):
    knock = sdk(service)
    for user_id in ("team/ada", "team#ada"):
        with pytest.raises(knockapi.UnprocessableEntityError) as refused:
            knock.audiences.add_members("newsletter", members=[{"user": {"id": user_id}}])
        assert refused.value.body["errors"][0]["field"] == "members.0.user.id"
        assert user_id in refused.value.body["message"]
        # The SDK sends the id percent-encoded in the path: a 422 naming the id, not a 404 from
        # the router, on every route that takes a user id.
        with pytest.raises(knockapi.UnprocessableEntityError) as identify:
            knock.users.update(user_id, name="Ada")
        assert identify.value.body["errors"][0]["field"] == "user_id"
        for answer in (
            http.get(f"/v1/users/{user_id.replace('/', '%2F').replace('#', '%23')}"),
            http.delete(f"/v1/users/{user_id.replace('/', '%2F').replace('#', '%23')}"),
            http.get(
                f"/v1/audiences/newsletter/members/{user_id.replace('/', '%2F').replace('#', '%23')}"
            ),
        ):
            assert answer.status_code == 422, answer.text
            assert answer.json()["errors"][0]["field"] == "user_id"
    assert knock.audiences.list_members("newsletter").entries == []
    assert service.environment("development").store.rows(tables.user_profiles.select()) == []


# -- 401 codes ------------------------------------------------------------------------------


def test_a_missing_key_and_an_unknown_key_answer_knocks_codes(service):
    missing = httpx.get(f"{service.url}/v1/users/ada")
    assert missing.status_code == 401 and missing.json()["code"] == "api_key_missing"
    unknown = httpx.get(
        f"{service.url}/v1/users/ada", headers={"Authorization": "Bearer sk_development_nope"}
    )
    assert unknown.status_code == 401 and unknown.json()["code"] == "authentication_required"
    census = httpx.post(
        f"{service.url}/v1/integrations/census/custom-destination",
        json={"jsonrpc": "2.0", "id": 1, "method": "list_objects", "params": {}},
    )
    assert census.status_code == 401 and census.json()["code"] == "api_key_missing"
    # Authentication comes before the body is read: no key and a bad body is still a 401.
    assert (
        httpx.post(f"{service.url}/v1/integrations/census/custom-destination", content=b"[").json()[
            "code"
        ]
        == "api_key_missing"
    )


# -- errors in Knock's shape everywhere -----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/users/ada"),
        ("POST", "/v1/audiences/newsletter/members"),
        ("DELETE", "/v1/audiences/newsletter/members"),
        ("POST", "/v1/audiences/newsletter/broadcasts"),
        ("POST", "/v1/integrations/census/custom-destination"),
    ],
)
@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{bad", "application/json"),
        (b"", "application/json"),
        (b"garbage", "multipart/form-data; boundary=zz"),
        (b"a=b", "application/x-www-form-urlencoded"),
    ],
)
def test_every_unreadable_body_is_a_422_invalid_json(http, method, path, content, content_type):
    answer = http.request(method, path, content=content, headers={"content-type": content_type})
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["code"] == "invalid_json", body
    assert body["errors"][0]["field"] == "body"
    assert "EOF" not in body["message"]


def test_request_bodies_accept_unknown_keys_as_knocks_schemas_do(http):
    answer = http.post(
        "/v1/audiences/newsletter/members",
        json={"members": [{"user": {"id": "ada"}, "tenant": None, "note": "x"}], "extra": 1},
    )
    assert answer.status_code == 204, answer.text
    broadcast = http.post(
        "/v1/audiences/newsletter/broadcasts", json={"workflow": "welcome", "unknown": True}
    )
    assert broadcast.status_code == 202, broadcast.text


def test_options_and_405_list_every_method_of_the_path(http):
    options = http.options("/v1/users/ada")
    assert options.status_code == 204
    assert set(options.headers["allow"].split(", ")) == {"GET", "PUT", "DELETE", "OPTIONS"}
    refused = http.post("/v1/users/ada", json={})
    assert refused.status_code == 405 and refused.json()["code"] == "method_not_allowed"
    assert set(refused.headers["allow"].split(", ")) == {"GET", "PUT", "DELETE", "OPTIONS"}
    members = http.options("/v1/audiences/newsletter/members")
    assert set(members.headers["allow"].split(", ")) == {"GET", "POST", "DELETE", "OPTIONS"}


def test_the_openapi_document_names_every_status_the_service_answers(http):
    document = http.get("/openapi.json").json()
    census = document["paths"]["/v1/integrations/census/custom-destination"]["post"]
    assert {"401", "422", "429"} <= set(census["responses"])
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert {"400", "401", "429"} <= set(operation["responses"]), (method, path)
            if method in ("put", "post", "delete"):
                assert "422" in operation["responses"], (method, path)


def test_a_too_long_query_gets_a_400_in_knocks_shape_from_audiences_serve(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        "AUDIENCES_DUCKDB": str(tmp_path / "warehouse.duckdb"),
        "AUDIENCES_DEFINITIONS": str(ROOT / "data" / "audiences"),
    }
    with serve_process(env, ROOT) as (url, _):
        # httpx refuses such a URL itself; http.client sends it.
        connection = HTTPConnection(url.removeprefix("http://"), timeout=30)
        connection.request("GET", "/v1/users/ada?x=" + "a" * 100_000)
        answer = connection.getresponse()
        status, content_type, body = answer.status, answer.getheader("content-type"), answer.read()
        connection.close()
    assert status == 400
    assert content_type == "application/json"
    body = json.loads(body)
    assert body["code"] == "invalid_request" and body["status"] == 400
    assert body["type"] == "invalid_request_error"
