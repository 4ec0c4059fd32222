"""CSV uploads through the HTTP API (`POST /v1/audiences/{key}/members/upload`), against a real
`audiences serve` process: what the answer promises survives a SIGKILL right after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import sqlalchemy as sa
from api_server import serve_process
from condition_harness import ROOT

from audiences.store.database import MembershipStore

USERS = 5_000
BAD = range(0, USERS, 500)  # every 500th id is padded: rejected with its row number


def upload_file() -> bytes:
    lines = ["id,name,plan,address.city"]
    for number in range(USERS):
        user_id = f" u{number}" if number in BAD else f"u{number}"
        lines.append(f"{user_id},User {number},{('free', 'pro')[number % 2]},Lima")
    return ("\n".join(lines) + "\n").encode()


def counts(url: str) -> dict[str, int]:
    store = MembershipStore(url)
    try:
        return {
            table: store.scalar(sa.text(f"select count(*) from {table}"))
            for table in ("audience_members", "membership_events", "upload_batches", "user_patches")
        }
    finally:
        store.dispose()


def _service_with_a_key(tmp_path) -> tuple[str, dict[str, str], dict[str, str]]:
    """A service's store, its environment (no real time) and the headers of a key made in it by
    `audiences keys create`, for an `audiences serve` process over the sample definitions."""
    store_url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        "AUDIENCES_DUCKDB": str(tmp_path / "warehouse.duckdb"),
        "AUDIENCES_DEFINITIONS": str(ROOT / "data" / "audiences"),
        "AUDIENCES_STORE_URL": store_url,
        "AUDIENCES_REALTIME": "false",
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
    headers = {
        "Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}",
        "Content-Type": "text/csv",
    }
    return store_url, env, headers


@pytest.mark.slow  # two `audiences serve` processes: 15-60 s
def test_an_upload_answered_then_killed_loses_nothing_and_doubles_nothing(tmp_path):
    store_url, env, headers = _service_with_a_key(tmp_path)
    kept = USERS - len(BAD)
    with serve_process(env, ROOT) as (url, process):
        answer = httpx.post(
            f"{url}/v1/audiences/imported/members/upload",
            params={"create_audience": "true"},
            content=upload_file(),
            headers=headers,
            timeout=120,
        )
        process.kill()  # SIGKILL, right after the answer: its patches are still being applied
        process.wait(timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["rows"], body["members_added"], body["users_identified"]) == (USERS, kept, kept)
    assert [(r["row"], r["id"]) for r in body["rejected"]] == [
        (number + 1, f" u{number}") for number in BAD
    ]
    assert {r["reason"] for r in body["rejected"]} == {"id has leading or trailing whitespace"}
    # What the answer promised is committed: the members, their events, the queued batch.
    died = counts(store_url)
    assert (died["audience_members"], died["membership_events"]) == (kept, kept)
    assert died["upload_batches"] == 1 and died["user_patches"] == 0, died

    # Restarted, the service applies the queued patches once, before it answers.
    with serve_process(env, ROOT) as (url, process):
        user = httpx.get(f"{url}/v1/users/u7", headers=headers, timeout=30)
        member = httpx.get(f"{url}/v1/audiences/imported/members/u7", headers=headers, timeout=30)
    assert user.status_code == 200, user.text
    assert {name: user.json()[name] for name in ("name", "plan", "address")} == {
        "name": "User 7",
        "plan": "pro",
        "address": {"city": "Lima"},
    }
    assert member.json()["member"] is True
    after = counts(store_url)
    assert after == {
        "audience_members": kept,
        "membership_events": kept,
        "upload_batches": 0,
        "user_patches": kept,
    }
    store = MembershipStore(store_url)
    try:
        per_user = store.rows(
            sa.text(
                "select user_id, count(*) as events, min(entry_number) as entry, "
                "min(event_type) as kind from membership_events group by user_id"
            )
        )
        patches = store.rows(sa.text("select user_id, patch from user_patches"))
        profiles = store.scalar(sa.text("select count(*) from user_profiles"))
    finally:
        store.dispose()
    assert {(row["events"], row["entry"], row["kind"]) for row in per_user} == {(1, 1, "entered")}
    assert len({row["user_id"] for row in patches}) == kept and profiles == kept
    assert json.loads(next(p["patch"] for p in patches if p["user_id"] == "u8")) == {
        "name": "User 8",
        "plan": "free",
        "address": {"city": "Lima"},
    }


@pytest.mark.slow  # an `audiences serve` process: 10-30 s
def test_an_upload_whose_service_dies_right_after_answering_is_seen_whole_and_once(tmp_path):
    """The service kills itself (SIGKILL) right after answering an upload, before it writes what
    follows the answer (its members and events, then its patches): the store, read by another
    process, holds every member and its event exactly once, and the answer named the rejected
    rows by number."""
    from audiences.settings import FAULT_POINT
    from audiences.static.uploads import FAULT_AFTER_ANSWER
    from audiences.store.members import is_member

    store_url, env, headers = _service_with_a_key(tmp_path)
    with serve_process({**env, FAULT_POINT: FAULT_AFTER_ANSWER}, ROOT) as (url, process):
        answer = httpx.post(
            f"{url}/v1/audiences/imported/members/upload",
            params={"create_audience": "true"},
            content=upload_file(),
            headers=headers,
            timeout=120,
        )
        assert process.wait(timeout=60) == -9  # it killed itself after answering
    assert answer.status_code == 200, answer.text
    kept = USERS - len(BAD)
    assert answer.json()["members_added"] == kept
    assert [(r["row"], r["id"]) for r in answer.json()["rejected"]] == [
        (number + 1, f" u{number}") for number in BAD
    ]
    store = MembershipStore(store_url)
    try:
        assert is_member(store, "imported", "u7") and not is_member(store, "imported", " u500")
        per_user = store.rows(
            sa.text(
                "select user_id, count(*) as events, min(entry_number) as entry, "
                "min(event_type) as kind from membership_events group by user_id"
            )
        )
        members = store.scalar(sa.text("select count(*) from audience_members"))
    finally:
        store.dispose()
    assert members == kept
    assert len(per_user) == kept
    assert {(row["events"], row["entry"], row["kind"]) for row in per_user} == {(1, 1, "entered")}
    assert counts(store_url)["membership_events"] == kept


def test_uploads_refuse_what_the_cli_refuses_and_tenants_stay_strict(service):
    """Through the API, an upload keeps `audiences upload`'s rules: a dynamic audience is refused,
    an unknown one is missing, a file with no id column is refused on `body`; a tenant column gives
    each membership its tenant, checked tenant-strictly; the patches follow the answer."""
    url, headers = service.url, {**service.headers(), "Content-Type": "text/csv"}
    endpoint = f"{url}/v1/audiences/{{}}/members/upload"
    csv = b"id,plan,tenant_id\nu1,pro,acme\nu1,pro,globex\nu2,,\n"
    dynamic = httpx.post(endpoint.format("pro-plan"), content=csv, headers=headers)
    assert (dynamic.status_code, dynamic.json()["code"]) == (422, "audience_not_static")
    assert httpx.post(endpoint.format("nope"), content=csv, headers=headers).status_code == 404
    no_id = httpx.post(endpoint.format("newsletter"), content=b"name\nAnn\n", headers=headers)
    assert no_id.status_code == 422 and no_id.json()["errors"][0]["field"] == "body", no_id.text
    answer = httpx.post(
        endpoint.format("newsletter"),
        params={"tenant_column": "tenant_id", "map": "plan=billing.plan"},
        content=csv,
        headers=headers,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "rows": 3,
        "blank_lines": 0,
        "members_added": 3,
        "members_unchanged": 0,
        "users_identified": 1,
        "rejected": [],
    }

    def member(user_id, tenant=None):
        return httpx.get(
            f"{url}/v1/audiences/newsletter/members/{user_id}",
            params={"tenant": tenant} if tenant else {},
            headers=headers,
        ).json()["member"]

    assert (member("u1", "acme"), member("u1", "globex"), member("u1"), member("u2")) == (
        True,
        True,
        False,
        True,
    )
    deadline = time.monotonic() + 20  # applied right after the answer, by a background task
    while (user := httpx.get(f"{url}/v1/users/u1", headers=headers)).status_code == 404:
        assert time.monotonic() < deadline, "the upload's patches were not applied"
        time.sleep(0.05)
    assert user.json()["billing"] == {"plan": "pro"}, user.text
