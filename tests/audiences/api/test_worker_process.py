"""`audiences serve` runs real time and delivery in a worker process of its own, beside the API:
started with the service, started again when it is killed (SIGKILL) in the middle of a stream of
identifies, stopped with the service; every user moved in is entered once and delivered, never
under two idempotency keys."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from api_server import alive, free_port, processes_started_by, serve_process
from condition_harness import ROOT

from audiences.api.keys import create_key
from audiences.conditions.definitions import load_definitions
from audiences.store import database as tables
from audiences.store.database import MembershipStore
from audiences.workflows.realtime import PLAN_MARKER, event_id

SECRET_ENV = "TEST_WORKER_PROCESS_WEBHOOK_SECRET"


class Receiver:
    """A webhook receiver on 127.0.0.1: (webhook id, recipient, event id) of each request."""

    def __init__(self):
        received = self.received = []
        lock = self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                data = body.get("data", {})
                with lock:
                    received.append(
                        (
                            self.headers.get("webhook-id"),
                            data.get("recipients", [None])[0],
                            data.get("data", {}).get("event_id"),
                        )
                    )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def recipients(self) -> set[str]:
        with self.lock:
            return {recipient for _, recipient, _ in self.received}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def project(folder: Path, receiver: Receiver) -> dict:
    """One dynamic audience (plan is pro), an entered trigger to the webhook, and the variables
    that point `audiences serve` at them."""
    definitions = folder / "audiences" / "pro-plan"
    definitions.mkdir(parents=True)
    condition = {"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}
    (definitions / "audience.json").write_text(
        json.dumps({"name": "Pro", "type": "dynamic", "segments": [{"conditions": [condition]}]})
    )
    trigger = folder / "workflows" / "pro-welcome"
    trigger.mkdir(parents=True)
    (trigger / "trigger.json").write_text(json.dumps({"audience": "pro-plan", "on": "entered"}))
    (folder / "sinks.yml").write_text(
        "default: webhook\nsinks:\n"
        f"  webhook: {{type: webhook, url: 'http://127.0.0.1:{receiver.port}/hook', "
        f"secret_env: {SECRET_ENV}}}\n"
    )
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        "AUDIENCES_DUCKDB": str(folder / "warehouse.duckdb"),
        "AUDIENCES_DEFINITIONS": str(folder / "audiences"),
        "AUDIENCES_WORKFLOWS": str(folder / "workflows"),
        "AUDIENCES_SINKS": str(folder / "sinks.yml"),
        "AUDIENCES_STORE_URL": f"sqlite:///{folder / 'store.sqlite'}",
        "AUDIENCES_API_ENVIRONMENTS": "development",
        "AUDIENCES_API_WRITE_RATE": "1000",
        SECRET_ENV: "whsec_" + "dGVzdC1zZWNyZXQtZm9yLXdvcmtlcnM=",
    }


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


@pytest.mark.slow  # two starts of the worker process, the service's own start
def test_a_worker_process_killed_mid_stream_is_restarted_and_nothing_is_lost_or_doubled(tmp_path):
    receiver = Receiver()
    env = project(tmp_path, receiver)
    store = MembershipStore(env["AUDIENCES_STORE_URL"]).create()
    version = load_definitions(tmp_path / "audiences")["pro-plan"].version
    with store.engine.begin() as connection:  # as if the pipeline had evaluated this version
        connection.execute(
            tables.store_markers.insert().values(
                name=PLAN_MARKER, value=json.dumps({"pro-plan": version})
            )
        )
    headers = {"Authorization": f"Bearer {create_key(store, 'development', 'tests')[1]}"}
    users = [f"user-{number:03d}" for number in range(60)]
    try:
        with serve_process(env, ROOT) as (url, service):
            first = wait_for(lambda: processes_started_by(service.pid), 30, "a worker process")[0]
            with httpx.Client(headers=headers, timeout=10) as http:
                for number, user in enumerate(users):
                    answer = http.put(f"{url}/v1/users/{user}", json={"plan": "pro"})
                    assert answer.status_code == 200, answer.text
                    if number == 20:  # in the middle of evaluating and delivering the first ones
                        os.kill(first, signal.SIGKILL)
                    time.sleep(0.02)
            second = wait_for(
                lambda: [child for child in processes_started_by(service.pid) if child != first],
                30,
                "the worker process started again",
            )[0]
            wait_for(lambda: receiver.recipients() >= set(users), 60, "every entry delivered")
            time.sleep(1)  # a send that would come twice would come now
            # Stopped with the service.
            service.terminate()
            assert service.wait(60) == 0
            wait_for(lambda: not alive(second), 10, "the worker process stopped")
        assert not alive(first)

        columns = tables.membership_events.c
        events = store.rows(
            sa.select(columns.user_id, columns.event_type, columns.event_id).where(
                columns.audience_key == "pro-plan"
            )
        )
        assert sorted((row["user_id"], row["event_type"], row["event_id"]) for row in events) == [
            (user, "entered", event_id("pro-plan", user, None, "entered", 1)) for user in users
        ]
        keys: dict[str, set[str]] = {}
        for webhook_id, _, event in receiver.received:
            keys.setdefault(event, set()).add(webhook_id)
        assert set(keys) == {row["event_id"] for row in events}
        assert all(len(ids) == 1 for ids in keys.values()), keys
        delivered = tables.deliveries.c
        assert store.rows(
            sa.select(delivered.status, sa.func.count().label("count")).group_by(delivered.status)
        ) == [{"status": "delivered", "count": len(users)}]
    finally:
        receiver.close()
        store.dispose()


@pytest.mark.slow  # two starts of the service
def test_an_identify_journaled_and_answered_is_applied_once_after_the_service_is_killed(tmp_path):
    """The service is killed (SIGKILL) after an identify was committed to the identify journal
    and answered, before the store applied it: nothing of it is in the store, yet it is not lost.
    The restarted service applies it once (profile, queued patch), real time enters the user
    and the webhook gets it once; the pipeline's load of the identify queue would apply it too."""
    from audiences.store.journal import FAULT_BEFORE_APPLIED, journal_of
    from audiences.workflows.realtime import FAULT_POINT

    receiver = Receiver()
    env = project(tmp_path, receiver)
    store = MembershipStore(env["AUDIENCES_STORE_URL"]).create()
    version = load_definitions(tmp_path / "audiences")["pro-plan"].version
    with store.engine.begin() as connection:
        connection.execute(
            tables.store_markers.insert().values(
                name=PLAN_MARKER, value=json.dumps({"pro-plan": version})
            )
        )
    headers = {"Authorization": f"Bearer {create_key(store, 'development', 'tests')[1]}"}
    patches, profiles = tables.user_patches.c, tables.user_profiles.c
    try:
        with serve_process({**env, FAULT_POINT: FAULT_BEFORE_APPLIED}, ROOT) as (url, service):
            answer = httpx.put(
                f"{url}/v1/users/kim", json={"plan": "pro"}, headers=headers, timeout=10
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["plan"] == "pro"
            assert service.wait(timeout=30) == -signal.SIGKILL
        # Acknowledged, and only in the journal.
        assert store.rows(sa.select(patches.patch).where(patches.user_id == "kim")) == []
        assert store.rows(sa.select(profiles.user_id).where(profiles.user_id == "kim")) == []
        assert [entry.user_id for entry in journal_of(store).entries_after(0)] == ["kim"]

        with serve_process(env, ROOT) as (url, service):
            wait_for(lambda: "kim" in receiver.recipients(), 60, "kim's entry delivered")
            user = httpx.get(f"{url}/v1/users/kim", headers=headers, timeout=10).json()
            assert user["plan"] == "pro"
            time.sleep(1)  # a second delivery would come now
            service.terminate()
            assert service.wait(60) == 0
        assert store.rows(sa.select(patches.patch).where(patches.user_id == "kim")) == [
            {"patch": '{"plan":"pro"}'}
        ]
        columns = tables.membership_events.c
        assert store.rows(
            sa.select(columns.event_type, columns.event_id).where(columns.user_id == "kim")
        ) == [
            {"event_type": "entered", "event_id": event_id("pro-plan", "kim", None, "entered", 1)}
        ]
        assert [recipient for _, recipient, _ in receiver.received] == ["kim"]
        assert journal_of(store).entries_after(0) == []  # applied, then deleted
    finally:
        receiver.close()
        store.dispose()


def test_with_the_worker_process_the_api_only_journals_an_identify(tmp_path, monkeypatch):
    """With `audiences serve`'s worker process (here a socket the test reads in its place), the
    API's process commits an identify to the identify journal, answers and sends the worker the
    entry; it does not apply it to the store itself (its interpreter stays on requests). The
    worker's applier then applies it once and the user is in the store."""
    from api_server import running_server

    from audiences.api.app import close_app, create_app
    from audiences.api.service import Environment
    from audiences.api.workers import new_address, socket_address
    from audiences.settings import Settings
    from audiences.store.journal import journal_of

    receiver = Receiver()
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    for name, value in project(tmp_path, receiver).items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert settings.realtime
    store = MembershipStore(settings.store_url).create()
    headers = {"Authorization": f"Bearer {create_key(store, 'development', 'tests')[1]}"}
    address = new_address()
    worker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    worker.bind(socket_address(address))
    worker.settimeout(10)
    profiles = tables.user_profiles.c
    try:
        app = create_app(settings, worker_address=address)
        with running_server(app) as url:
            answer = httpx.put(
                f"{url}/v1/users/kim", json={"plan": "pro"}, headers=headers, timeout=10
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["plan"] == "pro"
            message = json.loads(worker.recv(1 << 20))
            assert message["environment"] == "development"
            [entry] = journal_of(store).entries_after(0)
            assert message["journaled"] == [[entry.seq, "kim", ["plan"]]]
            assert message["submit"] == []
            time.sleep(0.5)  # the API's own applier took milliseconds to apply it
            assert store.rows(sa.select(profiles.user_id).where(profiles.user_id == "kim")) == []
            assert httpx.get(f"{url}/v1/users/kim", headers=headers).json()["plan"] == "pro"
        close_app(app)
        assert store.rows(sa.select(profiles.user_id).where(profiles.user_id == "kim")) == []

        # The worker process's side: its environment's applier applies the entry, once.
        environment = Environment.open(settings, "development")
        try:
            environment.journal_applier().journaled(*message["journaled"][0])
            assert environment.applier.wait_idle(10)
        finally:
            environment.close()
        assert store.rows(sa.select(profiles.properties).where(profiles.user_id == "kim")) == [
            {"properties": '{"plan":"pro"}'}
        ]
        patches = tables.user_patches.c
        assert store.rows(sa.select(patches.patch).where(patches.user_id == "kim")) == [
            {"patch": '{"plan":"pro"}'}
        ]
    finally:
        worker.close()
        receiver.close()
        store.dispose()


def test_the_api_reaches_a_worker_started_again_at_its_address():
    """The API's client keeps its socket connected to the worker's (a send to a full queue then
    sleeps until there is room, where an unconnected one spun); when that worker is gone and a
    new one listens at the same address, the next message reaches the new one."""
    from types import SimpleNamespace

    from audiences.api.workers import WorkerClient, new_address, socket_address

    address = new_address()
    environment = SimpleNamespace(name="development", store=SimpleNamespace(url="sqlite://"))

    def listening() -> socket.socket:
        worker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        worker.bind(socket_address(address))
        worker.settimeout(10)
        return worker

    first = listening()
    client = WorkerClient(address, environment)
    try:
        client.journaled(1, "ada", ["plan"])
        assert json.loads(first.recv(1 << 16))["journaled"] == [[1, "ada", ["plan"]]]
        first.close()  # the worker process died; its next one binds the same address
        second = listening()
        client.journaled(2, "bea", ["plan"])
        assert json.loads(second.recv(1 << 16))["journaled"] == [[2, "bea", ["plan"]]]
        second.close()
    finally:
        client.close()
