"""Several delivery workers on one store: real `audiences deliver --watch` processes, a real receiver.

Each worker claims the deliveries it sends (a lease in the store), so two workers never send the
same delivery; a worker killed with SIGKILL mid-batch leaves its claim to expire, and then another
sends the batch under the same webhook id; and a sink's rate limit holds across the workers. The
receiver is a real HTTP server on 127.0.0.1; the store is a SQLite file, and a PostgreSQL database
when a server can be had (see `postgres_server.py`).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from http_recorder import HttpRecorder, Reply, delivery_row_values, insert_deliveries

from audiences.delivery.loop import delivery_status
from audiences.store.database import MembershipStore, deliveries

SECRET = "whsec_" + base64.b64encode(b"workers tests secret").decode()
LONG_AGO = "2000-01-01T00:00:00.000000Z"


@pytest.fixture
def recorder():
    with HttpRecorder() as server:
        yield server


# `audiences deliver --watch`, with each grant of a rate limit's bucket (the moment its tokens
# are taken, and how many) written to the file named first: what the limit decided, which the
# receiver's clock cannot tell under load (a send delayed after its grant, then one on time,
# arrive closer together than they were granted).
RECORDING_GRANTS = """
import json, sys
from audiences.cli import main
from audiences.delivery import loop
reserve = loop._reserve
def recording(tokens, updated, moment, count, *rest):
    reserved = reserve(tokens, updated, moment, count, *rest)
    with open(sys.argv[1], "a") as grants:
        grants.write(json.dumps([reserved[2], count]) + "\\n")
    return reserved
loop._reserve = recording
sys.exit(main(sys.argv[2:]))
"""


class Workers:
    """`audiences deliver --watch` processes, each with its own sinks file (same sinks, but a
    `X-Worker` header naming the worker, and its own file for the warm-up file sink), recording
    their rate limits' grants (`grants`)."""

    def __init__(self, folder: Path, store_url: str):
        self.folder = folder
        self.store_url = store_url
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, sinks: dict, *arguments: str) -> subprocess.Popen:
        settings = {
            "default": "warmup",
            "sinks": {
                "warmup": {"type": "file", "path": f"warmup-{name}.jsonl", "batch_size": 1},
                **{
                    sink: {**options, "headers": {"X-Worker": name}}
                    for sink, options in sinks.items()
                },
            },
        }
        sinks_file = self.folder / f"sinks-{name}.yml"
        sinks_file.write_text(json.dumps(settings))  # JSON is YAML
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith("AUDIENCES_")
        }
        environment.update(
            AUDIENCES_STORE_URL=self.store_url, AUDIENCES_SINKS=str(sinks_file), HOOK_SECRET=SECRET
        )
        log = (self.folder / f"worker-{name}.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RECORDING_GRANTS,
                str(self.folder / f"grants-{name}.jsonl"),
                "deliver",
                "--watch",
                *arguments,
            ],
            cwd=self.folder,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes[name] = process
        return process

    def wait_ready(self, store: MembershipStore, names: list[str], timeout: float = 60) -> None:
        """Queue warm-up deliveries for the file sink until every worker has delivered one: each
        is then polling the store."""
        deadline = time.monotonic() + timeout
        for number in itertools.count():
            if all((self.folder / f"warmup-{name}.jsonl").exists() for name in names):
                return
            self.check_alive()
            assert time.monotonic() < deadline, "the workers did not start"
            insert_deliveries(
                store,
                [delivery_row_values(f"warmup-{number}", sink="warmup", next_attempt_at=LONG_AGO)],
            )
            time.sleep(0.3)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = (self.folder / f"worker-{name}.log").read_text()
                raise AssertionError(f"worker {name} exited with {process.returncode}:\n{log}")

    def grants(self) -> list[float]:
        """When every worker's buckets let a delivery go (time.time), in order."""
        found = []
        for path in self.folder.glob("grants-*.jsonl"):
            for line in path.read_text().splitlines():
                moment, count = json.loads(line)
                found += [moment] * count
        return sorted(found)

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.processes.clear()


@pytest.fixture
def workers(tmp_path, store_url):
    started = Workers(tmp_path, store_url)
    yield started
    started.stop_all()


def webhook(url: str, **options) -> dict:
    return {
        "type": "webhook",
        "url": url,
        "secret_env": "HOOK_SECRET",
        "timeout_seconds": 2,
        **options,
    }


def queue(store, sink: str, count: int, prefix: str) -> set[str]:
    rows = [
        delivery_row_values(
            f"{prefix}-{number:04}", sink=sink, next_attempt_at=LONG_AGO, created_at=LONG_AGO
        )
        for number in range(count)
    ]
    insert_deliveries(store, rows)
    return {row["delivery_id"] for row in rows}


def wait_delivered(
    store, workers: Workers, sinks: list[str], expected: int, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        workers.check_alive()
        status = delivery_status(store)["sinks"]
        delivered = sum(status.get(sink, {}).get("delivered", 0) for sink in sinks)
        if delivered >= expected:
            return
        assert time.monotonic() < deadline, (
            f"only {delivered} of {expected} delivered in {timeout} s"
        )
        time.sleep(0.2)


def items(request) -> list[str]:
    """The delivery ids one webhook request carried (a single trigger or a batch)."""
    data = request.json()["data"]
    return [item["delivery_id"] for item in (data if isinstance(data, list) else [data])]


def test_two_workers_send_every_delivery_exactly_once(store, recorder, workers):
    recorder.respond_with(
        lambda request: time.sleep(0.003) or 200
    )  # a receiver that takes a moment
    sinks = {
        "single": webhook(f"{recorder.url}/single"),
        "batched": webhook(f"{recorder.url}/batched", batch_size=5),
    }
    workers.start("a", sinks)
    workers.start("b", sinks)
    workers.wait_ready(store, ["a", "b"])
    expected = queue(store, "single", 300, "single") | queue(store, "batched", 300, "batched")

    wait_delivered(store, workers, ["single", "batched"], len(expected))
    workers.stop_all()

    hooks = [request for request in recorder.requests if request.path in ("/single", "/batched")]
    by_id = Counter(request.header("webhook-id") for request in hooks)
    assert [webhook_id for webhook_id, sends in by_id.items() if sends > 1] == []
    sent = Counter(delivery_id for request in hooks for delivery_id in items(request))
    assert set(sent) == expected
    assert [delivery_id for delivery_id, sends in sent.items() if sends > 1] == []
    # Both workers did send: the queue was shared, not taken by one of them.
    assert {request.header("X-Worker") for request in hooks} == {"a", "b"}


def test_a_killed_workers_batch_is_sent_by_another_after_the_lease_under_the_same_id(
    store, recorder, workers
):
    hung = threading.Event()
    hung_at: list[float] = []

    def answer(request):
        if not hung.is_set():  # the first request: answer nothing, while its worker is killed
            hung_at.append(time.monotonic())
            hung.set()
            return Reply.hang(30)
        return 200

    recorder.respond_with(answer)
    sinks = {"batched": webhook(f"{recorder.url}/batched", batch_size=4, timeout_seconds=1)}
    lease = 5.0
    workers.start("a", sinks, "--lease-seconds", str(lease))
    workers.wait_ready(store, ["a"])
    expected = queue(store, "batched", 40, "dlv")
    assert hung.wait(60), "worker a sent nothing"
    workers.kill("a")  # mid-batch: one request in flight, more of its claim not sent yet
    claimed = store.scalar(sa.select(sa.func.count()).where(deliveries.c.claimed_by.is_not(None)))
    assert claimed >= 4  # the killed worker's claim stays in the store ...

    workers.start("b", sinks, "--lease-seconds", str(lease))
    wait_delivered(store, workers, ["batched"], len(expected))
    workers.stop_all()

    hooks = [request for request in recorder.requests if request.path == "/batched"]
    first, later = hooks[0], hooks[1:]
    assert first.header("X-Worker") == "a" and {r.header("X-Worker") for r in later} == {"b"}
    # ... so worker b took none of it before the lease ended (it started well before that) ...
    assert min(request.received_at for request in later) >= hung_at[0] + lease - 1.0
    # ... and then sent the killed worker's batch again, whole and under the same webhook id.
    again = [
        request for request in later if request.header("webhook-id") == first.header("webhook-id")
    ]
    assert len(again) == 1 and items(again[0]) == items(first)
    assert sorted(delivery_id for request in later for delivery_id in items(request)) == sorted(
        expected
    )
    assert Counter(request.header("webhook-id") for request in later).most_common(1)[0][1] == 1


def test_a_sinks_rate_limit_holds_across_two_workers(store, recorder, workers):
    rate = 20
    recorder.respond_with(lambda request: 200)
    sinks = {"limited": webhook(f"{recorder.url}/limited", rate_limit_per_second=rate)}
    workers.start("a", sinks)
    workers.start("b", sinks)
    workers.wait_ready(store, ["a", "b"])
    wall = time.time() - time.monotonic()  # the receiver stamps time.monotonic()
    expected = queue(store, "limited", 80, "dlv")

    wait_delivered(store, workers, ["limited"], len(expected))
    workers.stop_all()

    hooks = [request for request in recorder.requests if request.path == "/limited"]
    assert sorted(delivery_id for request in hooks for delivery_id in items(request)) == sorted(
        expected
    )
    assert {request.header("X-Worker") for request in hooks} == {"a", "b"}
    # The shared bucket's grants, whichever worker took them: a burst of one second's worth, then
    # `rate` a second (1e-4 s: time.time's float at today's dates) ...
    grants = workers.grants()
    assert len(grants) == len(expected)
    worst = max(
        last - first + 1 - rate * (grants[last] - grants[first])
        for first in range(len(grants))
        for last in range(first, len(grants))
    )
    assert worst <= rate + 1e-4
    assert grants[-1] - grants[0] >= (len(grants) - rate) / rate - 1e-4
    # ... and the n-th request arrived no earlier than the n-th grant (1 ms for the clocks).
    stamps = sorted(wall + request.received_at for request in hooks)
    assert all(stamp >= grant - 0.001 for stamp, grant in zip(stamps, grants, strict=True))
