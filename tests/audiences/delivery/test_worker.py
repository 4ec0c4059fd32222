"""The always-on delivery worker: queued deliveries reach a real webhook receiver at once.

A worker in this process is woken directly when a transaction queues deliveries (its poll is set to
30 s, so only the wake can explain a delivery within 2 s); a worker in another process
(`audiences deliver --watch`) finds them by its short poll on SQLite and by LISTEN/NOTIFY on
PostgreSQL (its poll set to 30 s there too). Retries, the idempotency key, a hanging receiver and
SIGTERM are tested against a real HTTP server on 127.0.0.1. Latencies are asserted loosely: these
are not timing benchmarks.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from http_recorder import HttpRecorder, Reply

from audiences.delivery.sinks import WebhookSink
from audiences.delivery.worker import DeliveryWorker
from audiences.store.database import MembershipStore, deliveries, new_delivery, now_text

SECRET = "whsec_" + base64.b64encode(b"worker tests secret").decode()
PROMPT = 2.0  # "at once", loosely: well under a poll of 30 s, well over a loaded machine's jitter


@pytest.fixture
def recorder():
    with HttpRecorder() as server:
        yield server


def enqueue(
    store: MembershipStore, delivery_id: str, sink: str = "hooks", user_id: str | None = None
) -> None:
    """Queue one delivery (for `user_id`, else a user of its own) the way every enqueue path does
    (`insert_ignoring_duplicates`)."""
    user_id = user_id or f"user-{delivery_id}"
    row = new_delivery(
        delivery_id,
        workflow_key="welcome",
        sink=sink,
        audience_key="vip",
        user_id=user_id,
        tenant=None,
        payload=json.dumps({"recipients": [user_id], "data": {"id": delivery_id}}),
        stamp=now_text(),
    )
    with store.engine.begin() as connection:
        assert store.insert_ignoring_duplicates(connection, deliveries, [row]) == 1


def received(recorder: HttpRecorder, delivery_id: str, timeout: float) -> list:
    """The requests that carried `delivery_id` (a webhook's id when it sends one at a time), waiting up to `timeout` for a first one."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in list(recorder.requests) if r.header("webhook-id") == delivery_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def row(store: MembershipStore, delivery_id: str) -> dict:
    return store.rows(deliveries.select().where(deliveries.c.delivery_id == delivery_id))[0]


def wait_for(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def hook(recorder: HttpRecorder, name: str = "hooks", timeout: float = 3) -> WebhookSink:
    return WebhookSink(name, f"{recorder.url}/{name}", SECRET, timeout_seconds=timeout)


def test_a_delivery_queued_in_this_process_is_sent_at_once(store, recorder):
    worker = DeliveryWorker(store, {"hooks": hook(recorder)}, poll_seconds=30).start()
    try:
        time.sleep(0.5)  # the worker has looked, found nothing, and sleeps for its 30 s poll
        for number in range(3):
            queued_at = time.monotonic()
            enqueue(store, f"now-{number}")
            sent = received(recorder, f"now-{number}", timeout=10)
            assert sent, f"delivery {number} was not sent"
            assert sent[0].received_at - queued_at < PROMPT
    finally:
        report = worker.stop(timeout=15)
    assert not worker.running
    assert report.delivered == 3
    assert {row(store, f"now-{n}")["status"] for n in range(3)} == {"delivered"}


def test_a_receiver_answering_500_then_200_gets_it_again_under_the_same_key(store, recorder):
    recorder.script(500)  # then 200
    worker = DeliveryWorker(store, {"hooks": hook(recorder)}, poll_seconds=30).start()
    try:
        enqueue(store, "flaky")
        # The retry is due within base_delay (1 s, full jitter): the worker sleeps until then.
        wait_for(lambda: len(received(recorder, "flaky", 0)) == 2, 10, "no retry within 10 s")
    finally:
        worker.stop(timeout=15)
    first, second = received(recorder, "flaky", 0)
    assert first.header("webhook-id") == second.header("webhook-id") == "flaky"
    assert second.received_at - first.received_at < 1.0 + PROMPT
    delivered = row(store, "flaky")
    assert (delivered["status"], delivered["attempts"]) == ("delivered", 2)
    assert "500" in delivered["last_error"]


def test_a_hanging_receiver_holds_up_no_other_delivery_past_its_timeout(store, recorder):
    timeout = 3.0
    recorder.respond_with(
        lambda request: Reply.hang(60) if request.header("webhook-id") == "stuck" else 200
    )
    sinks = {"hooks": hook(recorder, timeout=timeout), "other": hook(recorder, "other")}
    worker = DeliveryWorker(store, sinks, poll_seconds=30).start()
    try:
        enqueue(store, "stuck")
        assert received(recorder, "stuck", timeout=10), "the stuck delivery was not sent"
        hung_at = time.monotonic()
        enqueue(store, "behind-it")  # the same sink: waits for the hanging send's timeout only
        enqueue(store, "elsewhere", sink="other")  # another sink: never waits for it
        elsewhere = received(recorder, "elsewhere", timeout=10)
        behind = received(recorder, "behind-it", timeout=timeout + 10)
    finally:
        worker.stop(timeout=30)
    assert elsewhere and elsewhere[0].received_at - hung_at < PROMPT < timeout
    assert behind and behind[0].received_at - hung_at < timeout + PROMPT
    stuck = row(store, "stuck")
    assert stuck["status"] == "pending" and stuck["attempts"] >= 1
    assert "timed out" in stuck["last_error"].lower() or "timeout" in stuck["last_error"].lower()
    assert stuck["claimed_by"] is None  # given back when the worker stopped


def test_a_delivery_queued_behind_a_slow_send_goes_out_at_once_but_never_before_its_recipients(
    store, recorder
):
    """The always-on worker claims again while a send is in flight: a delivery queued behind a
    slow (not hanging) receiver's answer is sent at once, while a later delivery of the slow
    send's own recipient still waits for that send's outcome."""
    slow = 5.0

    def answer(request):
        if request.header("webhook-id") == "slow":
            time.sleep(slow)  # then 200: slow, not failing
        return 200

    recorder.respond_with(answer)
    worker = DeliveryWorker(store, {"hooks": hook(recorder, timeout=30)}, poll_seconds=30).start()

    try:
        enqueue(store, "slow", user_id="ana")
        assert received(recorder, "slow", timeout=10), "the slow delivery was not sent"
        queued_at = time.monotonic()
        enqueue(store, "ana-next", user_id="ana")  # the slow send's recipient: after its outcome
        enqueue(store, "bob-first", user_id="bob")  # another recipient: at once
        behind = received(recorder, "bob-first", timeout=slow + 10)
        after = received(recorder, "ana-next", timeout=slow + 10)
    finally:
        worker.stop(timeout=30)
    assert behind and behind[0].received_at - queued_at < PROMPT < slow
    assert after and after[0].received_at - queued_at > slow - PROMPT
    assert {row(store, d)["status"] for d in ("slow", "ana-next", "bob-first")} == {"delivered"}


def watch(folder: Path, store_url: str, recorder: HttpRecorder, *arguments: str):
    """`audiences deliver --watch` in a process of its own, delivering to the recorder."""
    sinks = {"sinks": {"hooks": {"type": "webhook", "url": f"{recorder.url}/hooks"}}}
    sinks["sinks"]["hooks"].update(secret_env="HOOK_SECRET", timeout_seconds=5)
    sinks_file = folder / "sinks.yml"
    sinks_file.write_text(json.dumps(sinks))  # JSON is YAML
    environment = {key: value for key, value in os.environ.items() if "AUDIENCES_" not in key}
    environment.update(
        AUDIENCES_STORE_URL=store_url, AUDIENCES_SINKS=str(sinks_file), HOOK_SECRET=SECRET
    )
    return subprocess.Popen(
        [sys.executable, "-m", "audiences.cli", "deliver", "--watch", *arguments],
        cwd=folder,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_delivery_queued_by_another_process_is_sent_at_once(store, store_url, recorder, tmp_path):
    # On PostgreSQL the worker's poll is 30 s: NOTIFY wakes it. On SQLite its short poll finds it.
    postgres = store_url.startswith("postgresql")
    process = watch(tmp_path, store_url, recorder, *(["--poll-seconds", "30"] if postgres else []))
    try:
        enqueue(store, "warm-up")  # sent once the worker runs (its first look, or the wake)
        assert received(recorder, "warm-up", timeout=60), "the worker did not start"
        for number in range(3):
            time.sleep(0.3)
            queued_at = time.monotonic()
            enqueue(store, f"across-{number}")
            sent = received(recorder, f"across-{number}", timeout=35)
            assert sent and sent[0].received_at - queued_at < PROMPT
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def test_sigterm_lets_the_send_in_flight_finish_and_be_recorded(store, recorder, tmp_path):
    answering = threading.Event()
    recorder.respond_with(lambda request: answering.set() or time.sleep(1.5) or 200)
    process = watch(tmp_path, store.url, recorder)
    try:
        enqueue(store, "in-flight")
        assert answering.wait(60), "the worker sent nothing"
        process.send_signal(signal.SIGTERM)  # while the receiver takes its 1.5 s
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, output
    assert len(received(recorder, "in-flight", 0)) == 1
    finished = row(store, "in-flight")
    assert (finished["status"], finished["claimed_by"]) == ("delivered", None)
    left = store.scalar(sa.select(sa.func.count()).where(deliveries.c.claimed_by.is_not(None)))
    assert left == 0


def test_serve_delivers_what_its_api_queues_at_once_beside_another_worker(tmp_path, recorder):
    from api_server import free_port
    from condition_harness import ROOT

    sinks_file = tmp_path / "sinks.yml"
    hooks = {"type": "webhook", "url": f"{recorder.url}/hooks", "secret_env": "HOOK_SECRET"}
    sinks_file.write_text(json.dumps({"sinks": {"hooks": hooks}}))
    env = {key: value for key, value in os.environ.items() if "AUDIENCES_" not in key}
    env.update(
        AUDIENCES_DUCKDB=str(tmp_path / "warehouse.duckdb"),
        AUDIENCES_DEFINITIONS=str(ROOT / "data" / "audiences"),
        AUDIENCES_SINKS=str(sinks_file),
        HOOK_SECRET=SECRET,
    )

    def audiences(*arguments: str, **options) -> subprocess.Popen:
        command = [sys.executable, "-m", "audiences.cli", *arguments]
        return subprocess.Popen(command, env=env, cwd=tmp_path, text=True, **options)

    created = audiences("keys", "create", stdout=subprocess.PIPE)
    secret = created.communicate(timeout=120)[0].strip().splitlines()[-1]
    port = free_port()
    # The API's worker polls every 30 s: only the direct wake explains a delivery within 2 s.
    serve = audiences("serve", "--port", str(port), "--poll-seconds", "30", stderr=subprocess.PIPE)
    beside = audiences("deliver", "--watch", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    import httpx

    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {secret}"}
    )
    try:
        wait_for(lambda: _answers(http), 60, "the service did not start")
        members = [{"user": {"id": f"member-{n:02}"}} for n in range(40)]
        added = http.post("/v1/audiences/vip-customers/members", json={"members": members})
        assert added.status_code < 300, added.text

        def broadcast(workflow: str) -> float:
            answer = http.post(
                "/v1/audiences/vip-customers/broadcasts", json={"workflow": workflow}
            )
            assert answer.status_code == 202, answer.text
            return time.monotonic()

        time.sleep(0.5)  # both workers sleep: the API's until woken, the other one polls
        sent_at = broadcast("first")
        wait_for(lambda: len(recorder.requests) >= 40, 20, "the broadcast was not delivered")
        first_at = min(request.received_at for request in recorder.requests)
        assert first_at - sent_at < PROMPT
        broadcast("second")  # 40 more, for two workers at once
        wait_for(lambda: len(recorder.requests) >= 80, 20, "the second was not delivered")
        time.sleep(1.0)  # anything sent twice has arrived too
    finally:
        http.close()
        for process in (serve, beside):
            process.send_signal(signal.SIGTERM)
        serve_output = serve.communicate(timeout=30)[1]
        beside_output = beside.communicate(timeout=30)[0]
    assert serve.returncode == 0, serve_output
    assert beside.returncode == 0, beside_output
    ids = [request.header("webhook-id") for request in recorder.requests]
    assert len(ids) == len(set(ids)) == 80  # every delivery sent, none twice
    bodies = [request.json()["data"] for request in recorder.requests]
    assert {body["recipients"][0] for body in bodies} == {m["user"]["id"] for m in members}


def _answers(http) -> bool:
    import httpx

    try:
        return http.get("/v1/audiences/vip-customers/members").status_code == 200
    except httpx.HTTPError:
        return False


def test_a_woken_worker_reads_the_deliveries_that_woke_it(store):
    """The wake comes after the commit: a woken worker's first read (which takes no lock) finds
    the deliveries that woke it. Woken at SQLAlchemy's `commit` event, before the commit, that
    read raced with it, and the worker slept until its poll with a delivery due."""
    from audiences.store.database import on_deliveries_queued

    seen: list[list[str]] = []

    def wake() -> None:
        with store.read_engine.connect() as connection:
            seen.append(list(connection.execute(sa.select(deliveries.c.delivery_id)).scalars()))

    stop = on_deliveries_queued(store.url, wake)
    try:
        enqueue(store, "woke-it")
    finally:
        stop()
    # (PostgreSQL wakes the workers by a NOTIFY, which it sends at the commit: no call here.)
    assert seen == ([["woke-it"]] if store.engine.dialect.name == "sqlite" else [])
