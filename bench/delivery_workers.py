"""Experiment: several delivery workers on one store, against a receiver that misbehaves.

    .venv/bin/python bench/delivery_workers.py --deliveries 2000 --workers 2
    .venv/bin/python bench/delivery_workers.py --deliveries 2000 --workers 2 --kill-after 3

Real `audiences deliver --watch` processes share one membership store (a SQLite file, or
`--store-url`) and two webhook sinks (one trigger per request, and batches of 10) served by one
HTTP server on 127.0.0.1. The server answers 10% of requests 500, 10% 429 (`Retry-After: 1`), hangs
on 5% past the sink's timeout and drops 5% (a TCP reset); it deduplicates on `webhook-id`, as
Standard Webhooks asks, so a repeat of an id it has accepted is not processed again. With
`--kill-after S`, one worker is killed with SIGKILL S seconds after the first request arrived, and
a new one started.

It reports: deliveries queued; lost (never processed by the receiver and not dead-lettered);
deliveries sent under more than one webhook id; deliveries processed twice; webhook ids accepted
(2xx) more than once (a killed worker's sends whose outcome it had not written yet are sent again
under the same id); requests for an id sent while its sender still waited for an earlier one (two
workers at once); and the most requests the rate-limited sink received in any one second. Results go to
`bench/delivery-workers-results.md` (appended, one section per run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from audiences.delivery.loop import delivery_status  # noqa: E402 (after the path above)
from audiences.store.database import MembershipStore, deliveries  # noqa: E402

SECRET = "whsec_" + "YmVuY2htYXJrLXNlY3JldC1rZXktMzItYnl0ZXMhIQ=="
LONG_AGO = "2000-01-01T00:00:00.000000Z"
FAULTS = (("500", 0.10), ("429", 0.10), ("hang", 0.05), ("drop", 0.05))
TIMEOUT_SECONDS = 1.0
RATE_LIMIT = 200


class Receiver:
    """What the faulty, deduplicating receiver saw."""

    def __init__(self, seed: int):
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.accepted_ids: set[str] = set()
        self.processed: Counter[str] = Counter()
        self.ids_of: dict[str, set[str]] = defaultdict(set)
        self.accepts: Counter[str] = Counter()
        self.in_flight: dict[str, list[float]] = defaultdict(list)
        self.overlapping = 0
        self.faults: Counter[str] = Counter()
        self.arrivals: dict[str, list[float]] = defaultdict(list)

    def fault(self) -> str:
        draw = self.rng.random()
        for name, share in FAULTS:
            if draw < share:
                return name
            draw -= share
        return "ok"


def handler_for(receiver: Receiver):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            webhook_id = self.headers["webhook-id"]
            data = json.loads(body)["data"]
            items = [item["delivery_id"] for item in (data if isinstance(data, list) else [data])]
            with receiver.lock:
                arrived = time.monotonic()
                receiver.arrivals[self.path].append(arrived)
                # Another request for this id that its sender is still waiting for (younger than
                # the sink's timeout): two workers sending one message at once.
                if any(
                    arrived - start < TIMEOUT_SECONDS for start in receiver.in_flight[webhook_id]
                ):
                    receiver.overlapping += 1
                receiver.in_flight[webhook_id].append(arrived)
                for item in items:
                    receiver.ids_of[item].add(webhook_id)
                fault = receiver.fault()
                receiver.faults[fault] += 1
            try:
                self.answer(fault, webhook_id, items)
            finally:
                with receiver.lock:
                    receiver.in_flight[webhook_id].remove(arrived)

        def answer(self, fault: str, webhook_id: str, items: list[str]) -> None:
            if fault == "hang":
                time.sleep(TIMEOUT_SECONDS * 1.5)
                self.close_connection = True
                return
            if fault == "drop":
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return
            if fault in ("500", "429"):
                self.reply(int(fault), {"Retry-After": "1"} if fault == "429" else {})
                return
            with receiver.lock:
                receiver.accepts[webhook_id] += 1
                if webhook_id not in receiver.accepted_ids:
                    receiver.accepted_ids.add(webhook_id)
                    for item in items:
                        receiver.processed[item] += 1
            self.reply(200, {})

        def reply(self, status: int, headers: dict) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return Handler


def start_worker(folder: Path, store_url: str, name: str, lease: float) -> subprocess.Popen:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("AUDIENCES_")
    }
    environment.update(
        AUDIENCES_STORE_URL=store_url,
        AUDIENCES_SINKS=str(folder / "sinks.yml"),
        HOOK_SECRET=SECRET,
        PYTHONPATH=str(ROOT),
    )
    log = (folder / f"worker-{name}.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "audiences.cli",
            "deliver",
            "--watch",
            "--max-attempts",
            "30",
            "--lease-seconds",
            str(lease),
        ],
        cwd=folder,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return process


def most_in_one_second(stamps: list[float]) -> int:
    stamps = sorted(stamps)
    best, start = 0, 0
    for end, stamp in enumerate(stamps):
        while stamp - stamps[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def run(arguments) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="delivery-workers-"))
    store_url = arguments.store_url or f"sqlite:///{folder}/store.sqlite"
    store = MembershipStore(store_url).create()
    receiver = Receiver(arguments.seed)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(receiver))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    sinks = {
        "sinks": {
            "single": {
                "type": "webhook",
                "url": f"{url}/single",
                "secret_env": "HOOK_SECRET",
                "timeout_seconds": TIMEOUT_SECONDS,
                "rate_limit_per_second": RATE_LIMIT,
            },
            "batched": {
                "type": "webhook",
                "url": f"{url}/batched",
                "secret_env": "HOOK_SECRET",
                "timeout_seconds": TIMEOUT_SECONDS,
                "batch_size": 10,
            },
        },
        "default": "single",
    }
    (folder / "sinks.yml").write_text(json.dumps(sinks))
    half = arguments.deliveries // 2
    rows = [
        {
            "delivery_id": f"d{number:07d}",
            "event_id": None,
            "broadcast_id": None,
            "workflow_key": "welcome",
            "sink": "single" if number < half else "batched",
            "audience_key": "vip",
            "user_id": f"u{number}",
            "tenant": None,
            "payload": json.dumps({"recipients": [f"u{number}"], "data": {"n": number}}),
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": LONG_AGO,
            "last_error": None,
            "batch_id": None,
            "created_at": LONG_AGO,
            "delivered_at": None,
        }
        for number in range(arguments.deliveries)
    ]
    with store.engine.begin() as connection:
        store.insert_ignoring_duplicates(connection, deliveries, rows)
    expected = {row["delivery_id"] for row in rows}

    started = time.monotonic()
    workers = [
        start_worker(folder, store_url, str(number), arguments.lease_seconds)
        for number in range(arguments.workers)
    ]
    killed = False
    try:
        while time.monotonic() - started < arguments.timeout:
            first = min(
                (stamps[0] for stamps in receiver.arrivals.values() if stamps), default=None
            )
            if (
                arguments.kill_after
                and not killed
                and first
                and time.monotonic() - first >= arguments.kill_after
            ):
                workers[0].send_signal(signal.SIGKILL)
                workers[0].wait()
                workers.append(
                    start_worker(folder, store_url, "replacement", arguments.lease_seconds)
                )
                killed = True
            totals = delivery_status(store)["totals"]
            if totals.get("pending", 0) == 0:
                break
            time.sleep(0.5)
        seconds = time.monotonic() - started
    finally:
        for process in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in workers:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        server.shutdown()
    totals = delivery_status(store)["totals"]
    dead = {
        row["delivery_id"]
        for row in store.rows(
            deliveries.select()
            .with_only_columns(deliveries.c.delivery_id)
            .where(deliveries.c.status == "dead")
        )
    }
    store.dispose()
    result = {
        "deliveries": len(expected),
        "workers": arguments.workers,
        "killed_one_seconds_after_the_first_request": arguments.kill_after,
        "seconds": round(seconds, 1),
        "store_totals": totals,
        "requests": sum(receiver.faults.values()),
        "faults": dict(receiver.faults),
        "lost": len(expected - set(receiver.processed) - dead),
        "dead_lettered": len(dead),
        "sent_under_two_ids": sum(len(ids) > 1 for ids in receiver.ids_of.values()),
        "processed_twice": sum(count > 1 for count in receiver.processed.values()),
        "ids_accepted_twice": sum(count > 1 for count in receiver.accepts.values()),
        "sent_while_in_flight": receiver.overlapping,
        "most_requests_in_one_second_at_the_rate_limited_sink": most_in_one_second(
            receiver.arrivals["/single"]
        ),
        "rate_limit_per_second": RATE_LIMIT,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--kill-after",
        type=float,
        default=None,
        help="kill one worker with SIGKILL this many seconds after the first request, and start another",
    )
    parser.add_argument("--lease-seconds", type=float, default=5.0)
    parser.add_argument("--store-url", default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=600.0)
    arguments = parser.parse_args()
    result = run(arguments)
    print(json.dumps(result, indent=2))
    command = "bench/delivery_workers.py " + " ".join(sys.argv[1:])
    with (ROOT / "bench" / "delivery-workers-results.md").open("a") as handle:
        handle.write(f"\n## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: `{command.strip()}`\n\n")
        handle.write("\n".join(f"- {key}: {value}" for key, value in result.items()) + "\n")


if __name__ == "__main__":
    main()
