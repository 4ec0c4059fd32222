"""Benchmark of real time (issue 19): identify through the API to the entered event at a webhook.

    .venv/bin/python bench/realtime.py --users 1000000 --seconds 60 --rate 100

On the synthetic users and the 50 benchmark audiences (`bench/synthetic.py`) plus one probe
audience (`recipient.rt_probe` equal to "in") with an entered trigger to a Standard Webhooks sink
served on 127.0.0.1, after a first evaluation (dbt build, diff, publish, the users published to
the store as the `users` asset does, the real-time plan published):

For each mode, real time on and off (`AUDIENCES_REALTIME`), in the same run: `audiences serve`
in a process of its own, with its worker process (real time and the always-on delivery worker, woken
when real time's transactions queue deliveries; the pipeline's found by its 0.2 s poll); 8 client
threads make `--rate` identify calls a second for `--seconds`, each moving a fresh user into the
probe audience or a user it moved in back out; with real time off, the pipeline (load the identify
queue, dbt re-evaluation, diff, publish, as the main job does) runs in a loop meanwhile, as the
sensor would start it. Measured: from the identify's response to the webhook receiving the
entered event, p50 and p99; identify latency p99; entered events lost; events delivered twice
under different keys; and, after one more pipeline run over the same patches, the extra events
it emitted for the probe users.

With real time on, the interval is also split per user by the store's timestamps
(`stage_breakdown`): waiting for the worker, evaluating and writing, and commit, the delivery
worker's pickup and the send; real time is warmed up first (`warm_up_realtime`).

Results go to `bench/realtime-results.md` and `.json`. Data lives in `bench/data/` (ignored).
`--mode on` (or `off`) runs one mode and prints its figures without writing the results;
`--keep` reuses the last run's data (same `--users`) instead of setting it up again.
"""

from __future__ import annotations

import argparse
import base64
import gc
import http.client
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import duckdb  # noqa: E402
import httpx  # noqa: E402
import synthetic  # noqa: E402
from api_server import free_port  # noqa: E402

from audiences.dbt.project import generate, prepare, run_dbt  # noqa: E402
from audiences.membership.changes import CircuitBreaker, record_changes  # noqa: E402
from audiences.settings import Settings  # noqa: E402
from audiences.store.database import MembershipStore  # noqa: E402
from audiences.store.profiles import load_identify_queue, publish_changed_users  # noqa: E402
from audiences.workflows.publish import publish_outbox  # noqa: E402
from audiences.workflows.realtime import (  # noqa: E402
    import_realtime_events,
    publish_plan,
    realtime_disagreements,
)
from audiences.workflows.triggers import load_triggers  # noqa: E402

DATA = ROOT / "bench" / "data" / "realtime"
PROBE_KEY = "rt-probe"
PROBE = {
    "name": "Real-time probe",
    "type": "dynamic",
    "description": "Users the real-time benchmark moved in.",
    "segments": [
        {
            "conditions": [
                {"property": "recipient.rt_probe", "operator": "equal_to", "argument": "in"}
            ]
        }
    ],
}
CLIENTS = 8
SECRET_ENV = "BENCH_REALTIME_WEBHOOK_SECRET"


def setup(folder: Path, users: int, sink_port: int) -> Settings:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    definitions = folder / "audiences"
    synthetic.write_definitions(definitions)
    (definitions / PROBE_KEY).mkdir()
    (definitions / PROBE_KEY / "audience.json").write_text(json.dumps(PROBE))
    project = folder / "dbt_project"
    shutil.copytree(
        ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", ".user.yml")
    )
    shutil.rmtree(project / "models" / "audiences" / "custom")
    workflows = folder / "workflows" / "probe-welcome"
    workflows.mkdir(parents=True)
    (workflows / "trigger.json").write_text(json.dumps({"audience": PROBE_KEY, "on": "entered"}))
    (folder / "sinks.yml").write_text(
        "default: webhook\nsinks:\n"
        f"  webhook: {{type: webhook, url: 'http://127.0.0.1:{sink_port}/hook', "
        f"secret_env: {SECRET_ENV}}}\n"
    )
    settings = Settings.from_env(
        {},
        duckdb_path=folder / "warehouse.duckdb",
        definitions_dir=definitions,
        dbt_project_dir=project,
        workflows_dir=folder / "workflows",
        sinks_file=folder / "sinks.yml",
    )
    with duckdb.connect(str(settings.duckdb_path)) as connection:
        synthetic.generate_users(connection, users)
    generate(settings)
    prepare(settings)
    return settings


def pipeline_pass(settings: Settings, store: MembershipStore, lean: bool = True) -> dict:
    """What the main job does, without Dagster: load the identify queue, the dbt re-evaluation,
    real time's events imported, the diff, the publish, the users and the plan published."""
    from audiences.warehouse.evaluation import set_evaluation_clock
    from pipelines.defs.audiences import UNCHANGED_WHEN_DEFINITIONS_ARE

    moment = datetime.now(UTC)
    started = time.perf_counter()
    with duckdb.connect(str(settings.duckdb_path)) as connection:
        connection.execute("set TimeZone = 'UTC'")
        load_identify_queue(connection, store, moment)
        set_evaluation_clock(connection, moment)
    arguments = (
        ["build", "--exclude", " ".join(UNCHANGED_WHEN_DEFINITIONS_ARE)] if lean else ["build"]
    )
    run_dbt(arguments, settings)
    triggers = load_triggers(settings.workflows_dir, {PROBE_KEY, *synthetic.audiences()})
    with duckdb.connect(str(settings.duckdb_path)) as connection:
        connection.execute("set TimeZone = 'UTC'")
        imported = import_realtime_events(connection, store, moment)
        # The bench moves thousands of users into the probe per pass on purpose: the circuit
        # breaker (which would hold them all, real time off, until `release`) is off here.
        summary = record_changes(connection, moment, CircuitBreaker(minimum=2**62))
        disagreements = realtime_disagreements(connection, moment)
        report = publish_outbox(connection, store, triggers, "webhook", moment)
        publish_changed_users(store, connection)
        publish_plan(store, connection)
        probe_events = connection.execute(
            "select count(*) from raw.membership_outbox where occurred_at = $t "
            "and audience_key = $a",
            {"t": moment, "a": PROBE_KEY},
        ).fetchall()[0][0]
    return {
        "seconds": time.perf_counter() - started,
        "imported": imported,
        "entered": summary.entered,
        "exited": summary.exited,
        "disagreements": len(disagreements),
        "deliveries": report.deliveries,
        "probe_events": probe_events,
    }


class Sink:
    """The webhook receiver: when each entered trigger arrived, under which webhook id."""

    def __init__(self, port: int, forward=None):
        received = self.received = []
        lock = self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                at = time.perf_counter()
                wall = time.time()
                message = json.loads(body)
                data = message.get("data", {})
                record = (
                    at,
                    self.headers.get("webhook-id"),
                    data.get("recipients", [None])[0],
                    data.get("data", {}).get("event_id"),
                    wall,
                )
                if forward is not None:
                    forward(record)
                else:
                    with lock:
                        received.append(record)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SinkProcess:
    """The webhook receiver in a process of its own (the default): its HTTP threads and its
    interpreter's pauses no longer share the clients' interpreter, which timed the identifies.
    Each record is sent back over a pipe and kept here as `Sink` keeps it (`time.perf_counter`
    is the machine's monotonic clock, the same in both processes)."""

    def __init__(self, port: int):
        import multiprocessing

        self.received = []
        self.lock = threading.Lock()
        context = multiprocessing.get_context("fork")  # before any thread of this process
        self._records, sending = context.Pipe(duplex=False)
        self._ready = context.Event()
        self.process = context.Process(
            target=self._serve, args=(port, sending, self._ready), daemon=True
        )
        self.process.start()
        sending.close()
        if not self._ready.wait(30):
            raise RuntimeError("the webhook receiver's process did not start")
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    @staticmethod
    def _serve(port: int, sending, ready) -> None:
        lock = threading.Lock()

        def forward(record):
            with lock:
                sending.send(record)

        Sink(port, forward)
        ready.set()
        threading.Event().wait()

    def _collect(self) -> None:
        while True:
            try:
                record = self._records.recv()
            except (EOFError, OSError):
                return
            with self.lock:
                self.received.append(record)

    def close(self):
        self.process.terminate()
        self.process.join(10)
        self._records.close()


# Where `audiences serve` is run from: its `audiences` package is this folder's (`--service-code`).
SERVICE_CODE = {"folder": ROOT}


def start(arguments: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "audiences.cli", *arguments],
        env=env,
        cwd=SERVICE_CODE["folder"],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_mode(
    settings: Settings,
    store: MembershipStore,
    sink: Sink | SinkProcess,
    realtime: bool,
    users: int,
    seconds: float,
    rate: float,
    offset: int,
    skip: frozenset[str] = frozenset(),
) -> dict:
    from audiences.api.keys import create_key

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        **settings.environment_variables(),
        "AUDIENCES_REALTIME": "true" if realtime else "false",
        "AUDIENCES_API_WRITE_RATE": str(max(rate * 4, 1000)),
        SECRET_ENV: os.environ[SECRET_ENV],
    }
    env.pop("AUDIENCES_EVALUATION_TIME", None)
    secret = create_key(store, "development", f"bench-{realtime}")[1]
    headers = {"Authorization": f"Bearer {secret}"}
    port = free_port()
    log = settings.duckdb_path.parent / f"processes-{'on' if realtime else 'off'}.log"
    server = start(["serve", "--port", str(port)], env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the service did not start; see {log}")
            time.sleep(0.2)
        with sink.lock:
            sink.received.clear()
        warm_up = warm_up_realtime(url, headers, sink) if realtime else None
        responses: dict[str, float] = {}  # user id -> when the identify that moved them in answered
        answered_wall: dict[str, float] = {}  # the same, in wall-clock time (for the breakdown)
        moved_out: set[str] = set()  # moved out again: with real time off, maybe never seen in
        latencies: list[float] = []
        lock = threading.Lock()
        stop_at = time.perf_counter() + seconds
        per_client = rate / CLIENTS
        batch_stop = threading.Event()
        passes: list[dict] = []

        def batch_loop():  # the sensor's main job, as often as it can run, with real time off
            while not batch_stop.is_set():
                passes.append(pipeline_pass(settings, store))

        def client(number: int):
            rng = random.Random(number)
            moved_in: list[str] = []
            sequence = 0
            with LightClient(port, headers) as http:
                next_call = time.perf_counter()
                while next_call < stop_at:
                    time.sleep(max(0.0, next_call - time.perf_counter()))
                    if moved_in and rng.random() < 0.3:
                        user, value = moved_in.pop(rng.randrange(len(moved_in))), "out"
                    else:
                        user = None
                        while user is None or user in skip:  # --keep: not those already in
                            sequence += 1
                            index = offset + (number * 1_000_003 + sequence * 7919) % (users // 2)
                            user = f"user_{index:09d}"
                        value = "in"
                    sent = time.perf_counter()
                    status, text = http.put(f"/v1/users/{user}", {"rt_probe": value})
                    answered = time.perf_counter()
                    answered_at = time.time()
                    assert status == 200, text
                    with lock:
                        latencies.append(answered - sent)
                        if value == "in" and user not in responses:
                            responses[user] = answered
                            answered_wall[user] = answered_at
                    if value == "in":
                        moved_in.append(user)
                    else:
                        with lock:
                            moved_out.add(user)
                    next_call += 1 / per_client

        batcher = threading.Thread(target=batch_loop, daemon=True) if not realtime else None
        if batcher:
            batcher.start()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        load = [os.getloadavg()[0]]  # the machine is shared: its load beside each result
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        load.append(os.getloadavg()[0])
        # Wait for the entered triggers of users still in (those moved out again may never enter).
        if batcher:
            batch_stop.set()
            batcher.join()
        final = pipeline_pass(settings, store)  # the same patches through the batch path
        time.sleep(3)  # the delivery worker's last polls
        drain_deadline = time.monotonic() + 30
        while time.monotonic() < drain_deadline:
            with sink.lock:
                got = {user for _, _, user, _, _ in sink.received}
            if set(responses) - moved_out <= got:
                break
            time.sleep(0.5)
    finally:
        for process in (server,):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
    with sink.lock:
        received = list(sink.received)
    first: dict[str, float] = {}
    first_wall: dict[str, float] = {}
    keys: dict[str, set[str]] = {}
    for at, webhook_id, user, event, wall in received:
        if user in responses:
            first.setdefault(user, at)
            first_wall.setdefault(user, wall)
        keys.setdefault(event, set()).add(webhook_id)
    breakdown = stage_breakdown(store, answered_wall, first_wall) if realtime else None
    to_sink = [first[user] - answered for user, answered in responses.items() if user in first]
    # An entered event that was never delivered: the user's entry is recorded, its trigger lost.
    lost = sum(1 for user in responses if user not in first and user not in moved_out)
    return {
        "realtime": realtime,
        "identify_calls": len(latencies),
        "users_moved_in": len(responses),
        "identify_p50_ms": 1000 * percentile(latencies, 0.5),
        "identify_p99_ms": 1000 * percentile(latencies, 0.99),
        "to_webhook_p50_ms": None if not to_sink else 1000 * percentile(to_sink, 0.5),
        "to_webhook_p99_ms": None if not to_sink else 1000 * percentile(to_sink, 0.99),
        "events_lost": lost,
        "delivered_twice_with_different_keys": sum(1 for ids in keys.values() if len(ids) > 1),
        "pipeline_passes_during": len(passes),
        "extra_events_after_pipeline_run": final["probe_events"] if realtime else None,
        "disagreements_after_pipeline_run": final["disagreements"],
        "final_pipeline_pass": final,
        "breakdown_ms": breakdown,
        "load_average": f"{load[0]:.1f} -> {load[1]:.1f}",
        "warm_up_seconds": warm_up,
    }


class LightClient:
    """One keep-alive HTTP/1.1 connection (the standard library's `http.client`): the bench's
    clients share a process and its interpreter with the webhook receiver, so each request costs
    that process as little as it can (httpx's client took several times the CPU per request)."""

    def __init__(self, port: int, headers: dict[str, str]):
        self.port = port
        self.headers = {**headers, "Content-Type": "application/json"}
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def put(self, path: str, body: dict) -> tuple[int, bytes]:
        payload = json.dumps(body).encode()
        for attempt in (1, 2):  # a keep-alive connection the server closed: once more, anew
            try:
                self.connection.request("PUT", path, body=payload, headers=self.headers)
                response = self.connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def __enter__(self) -> LightClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.connection.close()


def run_clients(
    port: int,
    headers: dict[str, str],
    seconds: float,
    rate: float,
    path: str = "/v1/users/floor_{number}_{sequence}",
) -> list[float]:
    """The identify clients' load (`CLIENTS` threads at `rate` calls a second in all), against any
    server: the answers' latencies, in seconds (the floor's measure, `run_floor`)."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    per_client = rate / CLIENTS

    def client(number: int) -> None:
        sequence = 0
        with LightClient(port, headers) as http:
            next_call = time.perf_counter()
            while next_call < stop_at:
                time.sleep(max(0.0, next_call - time.perf_counter()))
                sequence += 1
                sent = time.perf_counter()
                status, text = http.put(
                    path.format(number=number, sequence=sequence), {"rt_probe": "in"}
                )
                answered = time.perf_counter()
                assert status == 200, text
                with lock:
                    latencies.append(answered - sent)
                next_call += 1 / per_client

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


FLOOR_APP = """
import sys
import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()


@app.put("/v1/users/{user_id}")
async def identify(user_id: str, request: Request):
    return {"id": user_id, **(await request.json())}


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, http="httptools")
"""


def run_floor(seconds: float, rate: float, log: Path) -> dict:
    """The floor of an identify's latency on this machine at this moment: an empty FastAPI
    endpoint (one async route answering the body back, under uvicorn with httptools, as
    `audiences serve` runs), called by the same clients at the same rate for the same time. The
    gap between it and the identify's latency is ours; the floor is the machine's and the HTTP
    stack's."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", FLOOR_APP, str(port)],
        cwd=ROOT,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, server, log)
        load = [os.getloadavg()[0]]
        latencies = run_clients(port, {}, seconds, rate)
        load.append(os.getloadavg()[0])
    finally:
        server.terminate()
        server.wait(30)
    return {
        "calls": len(latencies),
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "load_average": f"{load[0]:.1f} -> {load[1]:.1f}",
    }


def wait_for_port(port: int, server: subprocess.Popen, log: Path, path: str = "/") -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"the server did not start; see {log}")
        time.sleep(0.2)


def warm_up_realtime(url: str, headers: dict, sink: Sink | SinkProcess) -> float:
    """Before the timed calls: a new user moved in (every audience evaluated: the whole plan
    compiled and prepared), then out and, once that is evaluated, in again (only the probe), each
    entry awaited at the webhook. Returns the seconds from the first call to its entry's webhook."""
    user = f"bench_warm_up_{int(time.time())}"
    started = time.perf_counter()
    first = None
    with httpx.Client(headers=headers, timeout=60) as http:
        for value, entries in (("in", 1), ("out", 0), ("in", 2)):
            response = http.put(f"{url}/v1/users/{user}", json={"rt_probe": value})
            assert response.status_code == 200, response.text
            if not entries:
                time.sleep(3)  # the exit evaluated before the next entry (else they coalesce)
            deadline = time.monotonic() + 60
            while entries and time.monotonic() < deadline:
                with sink.lock:
                    if sum(1 for entry in sink.received if entry[2] == user) >= entries:
                        break
                time.sleep(0.02)
            if first is None:
                first = time.perf_counter() - started
    return first


def _moment(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def stage_breakdown(
    store: MembershipStore, answered: dict[str, float], received: dict[str, float]
) -> dict:
    """Where the identify -> webhook interval went, per probe user moved in (wall clock, ms,
    p50 / p99): waiting for the real-time worker (identify answered -> the evaluation's time, the
    events' `occurred_at`), evaluating and writing (-> the delivery row's `created_at`, stamped
    inside the store write), committing and the delivery worker's pickup and send (-> the
    delivery's `delivered_at`), and the webhook's receipt (-> received, a few ms before
    `delivered_at` is stamped)."""
    import sqlalchemy as sa

    from audiences.store import database as tables

    events, deliveries = tables.membership_events, tables.deliveries
    rows = store.rows(
        sa.select(
            events.c.user_id,
            events.c.occurred_at,
            deliveries.c.created_at,
            deliveries.c.delivered_at,
        )
        .join(deliveries, deliveries.c.event_id == events.c.event_id)
        .where(
            events.c.audience_key == PROBE_KEY,
            events.c.event_type == "entered",
            events.c.user_id.in_(sorted(answered)),
        )
    )
    stages: dict[str, list[float]] = {
        "wait_for_evaluation": [],
        "evaluate_and_write": [],
        "commit_pickup_send": [],
        "total": [],
    }
    newest: dict[str, dict] = {}
    for row in rows:  # the newest entry of each user (--keep: older runs' are there too)
        if (
            row["user_id"] not in newest
            or row["occurred_at"] > newest[row["user_id"]]["occurred_at"]
        ):
            newest[row["user_id"]] = row
    for row in newest.values():
        user = row["user_id"]
        if user not in received:
            continue
        start, evaluated, queued = (
            answered[user],
            _moment(row["occurred_at"]),
            _moment(row["created_at"]),
        )
        stages["wait_for_evaluation"].append(evaluated - start)
        stages["evaluate_and_write"].append(queued - evaluated)
        stages["commit_pickup_send"].append(received[user] - queued)
        stages["total"].append(received[user] - start)
    return {
        name: {
            "p50": None if not values else round(1000 * percentile(values, 0.5), 1),
            "p99": None if not values else round(1000 * percentile(values, 0.99), 1),
        }
        for name, values in stages.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--rate", type=float, default=100, help="identify calls per second, all clients"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="reuse bench/data/realtime's warehouse and store (set up by an earlier run of the same "
        "--users); users already in the probe audience are not moved in again",
    )
    parser.add_argument(
        "--mode",
        choices=("both", "on", "off"),
        default="both",
        help="which modes to run; only `both` writes bench/realtime-results.*",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DATA,
        help="the folder of the warehouse and store (default bench/data/realtime): one per --users "
        "lets --keep runs of two sizes alternate",
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the floor (an empty FastAPI endpoint under the same clients, before each mode)",
    )
    parser.add_argument(
        "--service-code",
        type=Path,
        default=None,
        help="run `audiences serve` from this checkout's `audiences` package (an A/B of two "
        "versions in one session); the bench itself and the pipeline passes run this one's",
    )
    parser.add_argument(
        "--receiver-in-process",
        action="store_true",
        help="serve the webhook receiver in the clients' process (the layout before h19i) "
        "instead of a process of its own",
    )
    arguments = parser.parse_args()
    if arguments.service_code:
        SERVICE_CODE["folder"] = arguments.service_code.resolve()
    os.environ.setdefault(SECRET_ENV, "whsec_" + base64.b64encode(os.urandom(24)).decode())
    sink_port = free_port()
    sink = Sink(sink_port) if arguments.receiver_in_process else SinkProcess(sink_port)
    started = time.perf_counter()
    if arguments.keep:
        settings = reuse(arguments.data, sink_port)
        store = MembershipStore(settings.store_url).create()
        first = pipeline_pass(settings, store)
    else:
        settings = setup(arguments.data, arguments.users, sink_port)
        store = MembershipStore(settings.store_url).create()
        first = pipeline_pass(settings, store, lean=False)
    skip = frozenset(probe_members(store)) if arguments.keep else frozenset()
    setup_seconds = time.perf_counter() - started
    results = {
        "run_at": datetime.now(UTC).isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "users": arguments.users,
        "audiences": len(synthetic.audiences()) + 1,
        "seconds": arguments.seconds,
        "rate": arguments.rate,
        "clients": CLIENTS,
        "setup_seconds": setup_seconds,
        "first_evaluation": first,
        "delivery_worker": "`audiences serve`'s worker process (real time and delivery)",
        "receiver": "the clients' process"
        if arguments.receiver_in_process
        else "a process of its own",
        "modes": [],
    }
    half = arguments.users // 2
    for realtime, offset in ((True, 0), (False, half)):
        if arguments.mode != "both" and realtime != (arguments.mode == "on"):
            continue
        # The clients and the webhook receiver share this process with the pipeline passes' dbt
        # (run in process): a full collection walking what those left alive paused every client
        # for up to 0.7 s (measured at 100k), counted as the service's latency. Frozen before the
        # timed calls (the floor's and the mode's alike).
        gc.collect()
        gc.freeze()
        floor = (
            run_floor(
                arguments.seconds,
                arguments.rate,
                settings.duckdb_path.parent / "processes-floor.log",
            )
            if arguments.floor
            else None
        )
        results["modes"].append(
            run_mode(
                settings,
                store,
                sink,
                realtime,
                arguments.users,
                arguments.seconds,
                arguments.rate,
                offset,
                skip,
            )
            | {"floor": floor}
        )
    sink.close()
    store.dispose()
    if arguments.mode != "both":
        print(json.dumps(results, indent=2, default=str))
        return
    write_results(results, " ".join(sys.argv[1:]))


def reuse(folder: Path, sink_port: int) -> Settings:
    """The settings of an earlier run's folder, its webhook sink moved to `sink_port`."""
    if not (folder / "warehouse.duckdb").exists():
        raise SystemExit(f"--keep: no earlier run in {folder}")
    (folder / "sinks.yml").write_text(
        "default: webhook\nsinks:\n"
        f"  webhook: {{type: webhook, url: 'http://127.0.0.1:{sink_port}/hook', "
        f"secret_env: {SECRET_ENV}}}\n"
    )
    return Settings.from_env(
        {},
        duckdb_path=folder / "warehouse.duckdb",
        definitions_dir=folder / "audiences",
        dbt_project_dir=folder / "dbt_project",
        workflows_dir=folder / "workflows",
        sinks_file=folder / "sinks.yml",
    )


def probe_members(store: MembershipStore) -> list[str]:
    import sqlalchemy as sa

    from audiences.store import database as tables

    members = tables.audience_members
    return [
        row["user_id"]
        for row in store.rows(
            sa.select(members.c.user_id).where(members.c.audience_key == PROBE_KEY)
        )
    ]


def write_results(results: dict, arguments: str) -> None:
    (ROOT / "bench" / "realtime-results.json").write_text(
        json.dumps(results, indent=2, default=str)
    )
    rows = [
        "| figure | real time on | real time off (next run) |",
        "|---|---|---|",
    ]
    on, off = results["modes"]

    def value(mode, key):
        found = mode.get(key)
        return (
            "n/a"
            if found is None
            else (
                f"{found:,.1f}"
                if isinstance(found, float)
                else (found if isinstance(found, str) else f"{found:,}")
            )
        )

    for mode in (on, off):
        floor = mode.get("floor") or {}
        mode["floor_p50_ms"] = floor.get("p50_ms")
        mode["floor_p99_ms"] = floor.get("p99_ms")
        mode["floor_load_average"] = floor.get("load_average")
    for key in (
        "identify_calls",
        "users_moved_in",
        "identify_p50_ms",
        "identify_p99_ms",
        "floor_p50_ms",
        "floor_p99_ms",
        "floor_load_average",
        "to_webhook_p50_ms",
        "to_webhook_p99_ms",
        "events_lost",
        "delivered_twice_with_different_keys",
        "pipeline_passes_during",
        "extra_events_after_pipeline_run",
        "disagreements_after_pipeline_run",
        "load_average",
    ):
        rows.append(f"| {key} | {value(on, key)} | {value(off, key)} |")
    stages = [
        "| stage (real time on), ms | p50 | p99 |",
        "|---|---|---|",
        *(
            f"| {name} | {figures['p50']} | {figures['p99']} |"
            for name, figures in (on.get("breakdown_ms") or {}).items()
        ),
    ]
    text = f"""# Real-time benchmark

`.venv/bin/python bench/realtime.py {arguments}` at {results["run_at"]} on {results["machine"]}.

{results["users"]:,} users, {results["audiences"]} audiences (the 50 benchmark audiences and the
probe), {results["clients"]} clients at {results["rate"]} identify calls a second for
{results["seconds"]} s per mode; setup (users, first evaluation) {results["setup_seconds"]:.0f} s.
Delivery worker: {results["delivery_worker"]}. Webhook receiver: {results.get("receiver", "the clients' process")}.

{chr(10).join(rows)}

{chr(10).join(stages)}

"to webhook" is from the identify's response to the webhook receiving the entered trigger.
"events lost" counts users moved in whose entered trigger never reached the webhook (30 s grace
after the final pipeline pass). With real time off, entered events come from the pipeline passes
that ran meanwhile (load the identify queue, dbt re-evaluation, diff, publish).
"""
    (ROOT / "bench" / "realtime-results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
