"""`Idempotency-Key` against a real `audiences serve`, killed with SIGKILL in the middle of a write:
the work is done exactly once, and the key never stays "in progress"."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import sqlalchemy as sa
from api_server import serve_process
from condition_harness import ROOT

MEMBERS = [
    {"user": {"id": f"u{index:04d}", "plan": "pro", "notes": "x" * 200}} for index in range(1000)
]


def environment(tmp_path) -> tuple[dict, str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        "AUDIENCES_DUCKDB": str(tmp_path / "warehouse.duckdb"),
        "AUDIENCES_DEFINITIONS": str(tmp_path / "audiences"),
    }
    created = subprocess.run(
        [sys.executable, "-m", "audiences.cli", "keys", "create", "--name", "test"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    return env, created.stdout.strip().splitlines()[-1]


@contextmanager
def writes_held(tmp_path):
    """Hold the lock that the server's writer takes before each transaction (writer.py): a write
    that reaches the writer waits there, in the middle of its request."""
    with open(tmp_path / "store.sqlite-writer.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def count(tmp_path, sql: str) -> int:
    with sqlite3.connect(tmp_path / "store.sqlite") as connection:
        return connection.execute(sql).fetchone()[0]


def add(url: str, secret: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/audiences/vips/members?create_audience=true",
        json={"members": MEMBERS},
        headers={"Authorization": f"Bearer {secret}", "Idempotency-Key": key},
        timeout=60,
    )


def test_a_write_killed_mid_request_is_done_once_when_retried_with_its_key(tmp_path):
    env, secret = environment(tmp_path)
    answers: list = []
    with serve_process(env, ROOT) as (url, server), writes_held(tmp_path):
        request = threading.Thread(target=lambda: answers.append(_attempt(url, secret)))
        request.start()
        time.sleep(2)  # the add is parsed, validated and waiting for its turn to write
        server.kill()  # SIGKILL
        request.join(timeout=30)
    assert answers and isinstance(answers[0], httpx.HTTPError)  # the client saw the connection drop
    assert count(tmp_path, "select count(*) from audience_members") == 0
    with serve_process(env, ROOT) as (url, server):
        retried = add(url, secret, "batch-1")
        assert retried.status_code == 204, retried.text  # not 409 for a day
        assert "idempotent-replayed" not in retried.headers
        server.kill()  # SIGKILL right after the answer
    with serve_process(env, ROOT) as (url, _server):
        again = add(url, secret, "batch-1")
        assert again.status_code == 204 and again.headers["idempotent-replayed"] == "true"
        assert again.headers["original-x-request-id"] == retried.headers["x-request-id"]
    assert count(tmp_path, "select count(*) from audience_members") == 1000
    assert (
        count(tmp_path, "select count(*) from membership_events where event_type = 'entered'")
        == 1000
    )
    assert count(tmp_path, "select count(*) from user_patches") == 1000  # each user identified once


def _attempt(url: str, secret: str):
    try:
        return add(url, secret, "batch-1")
    except httpx.HTTPError as error:
        return error


def test_concurrent_requests_with_one_key_do_the_work_once_and_both_get_its_answer(tmp_path):
    env, secret = environment(tmp_path)
    headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "identify-1"}
    answers: list[httpx.Response] = []

    def identify():
        answers.append(
            httpx.put(
                f"{url}/v1/users/ada",
                json={"name": "Ada", "plan": "pro"},
                headers=headers,
                timeout=60,
            )
        )

    with serve_process(env, ROOT, workers=2) as (url, _server):
        with writes_held(tmp_path):
            requests = [threading.Thread(target=identify) for _ in range(4)]
            for request in requests:
                request.start()
            time.sleep(2)  # all four are waiting for their turn to write, in both worker processes
        for request in requests:
            request.join(timeout=60)
    assert sorted(answer.status_code for answer in answers) == [200] * 4
    first = [answer for answer in answers if "idempotent-replayed" not in answer.headers]
    assert len(first) == 1
    for answer in answers:
        assert answer.json() == first[0].json()
    assert count(tmp_path, "select count(*) from user_patches where user_id = 'ada'") == 1


def test_a_claim_left_without_an_answer_by_the_older_engine_does_not_block_its_key(service):
    # Before, a claim was committed before the work; a crash left it answering 409 for a day.
    from audiences.store import database as tables
    from audiences.store.database import now_text

    store = service.environment("development").store
    with store.engine.begin() as connection:
        key_id = connection.execute(sa.select(tables.api_keys.c.key_id)).scalar()
        connection.execute(
            tables.idempotent_requests.insert().values(
                key_id=key_id,
                idempotency_key="stuck",
                request_hash="old",
                status_code=None,
                body=None,
                request_id="old-request",
                created_at=now_text(),
            )
        )
    headers = {**service.headers(), "Idempotency-Key": "stuck"}
    first = httpx.post(
        f"{service.url}/v1/audiences/newsletter/members",
        json={"members": [{"user": {"id": "u1"}}]},
        headers=headers,
        timeout=30,
    )
    assert first.status_code == 204 and "idempotent-replayed" not in first.headers
    again = httpx.post(
        f"{service.url}/v1/audiences/newsletter/members",
        json={"members": [{"user": {"id": "u1"}}]},
        headers=headers,
        timeout=30,
    )
    assert again.status_code == 204 and again.headers["idempotent-replayed"] == "true"


def test_a_key_compares_the_parsed_request_not_its_bytes(service):
    # The same JSON with other whitespace or key order was refused as "different parameters":
    # Knock refuses mismatched parameters, and these are the same parameters.
    url = f"{service.url}/v1/audiences/newsletter/members"
    headers = {**service.headers(), "Idempotency-Key": "k1", "content-type": "application/json"}
    bodies = [
        '{"members": [{"user": {"id": "u1", "plan": "pro"}, "tenant": "acme"}]}',
        '{ "members":[ {"tenant":"acme","user":{"plan":"pro","id":"u1"}} ] }\n',
    ]
    answers = [httpx.post(url, content=body, headers=headers, timeout=30) for body in bodies]
    assert [a.status_code for a in answers] == [204, 204], answers[1].text
    assert answers[1].headers["idempotent-replayed"] == "true"
    other = httpx.post(url, content=bodies[0].replace("pro", "free"), headers=headers, timeout=30)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"


def test_an_upload_with_a_key_is_answered_and_its_retry_replays_the_answer(service):
    # The upload's work returned a ChangeResult, which the key's record could not hold as JSON:
    # every upload with an Idempotency-Key failed with a 500 and wrote nothing.
    url = f"{service.url}/v1/audiences/newsletter/members/upload"
    headers = {**service.headers(), "Idempotency-Key": "up-1", "content-type": "text/csv"}
    body = b"id,plan\nu1,pro\n u2,free\nu3,free\n"
    first, again = (httpx.post(url, content=body, headers=headers, timeout=30) for _ in range(2))
    assert first.status_code == 200, first.text
    assert (first.json()["members_added"], len(first.json()["rejected"])) == (2, 1)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
