"""The worker process of `audiences serve`: real time and delivery beside the API, not inside it.

`audiences serve` answers HTTP in its own process and runs the real-time worker (`api/realtime.py`)
and the always-on delivery worker (`delivery/worker.py`) of every environment it serves in a second
process, which it starts with itself, starts again when it dies (SIGKILL included) and stops with
itself. The two share no interpreter lock: evaluating users, writing their events and sending
webhooks never hold up an identify's answer.

An identify is answered once its patch is durable: committed to the identify journal on SQLite
(`store/journal.py`), to the store on PostgreSQL. Then the API sends the worker process one
datagram on a local socket (Linux's
abstract namespace, named after the supervising process: no file, gone when its owner dies) naming
the users and what their identifies set (on SQLite, the journal entries: the worker's journal
applier puts them in the store, then evaluates their users, so the API's process only journals and
answers), and another when one of its own transactions queued deliveries; the worker hands them to
its real-time lanes and wakes its delivery threads. An entry whose datagram is lost stays in the
journal: the next worker's start (or any writer of profiles, or the pipeline's load) applies it. A
datagram that finds no worker (it is starting again) is dropped, and nothing is lost with it: a
worker binds its socket first, then evaluates again every user whose patches the pipeline has not
loaded (`waiting_users`), so every identify committed before it listened is evaluated then, and
every one after reaches it. Its events carry the ids the pipeline's diff would give them, so an
evaluation repeated after a kill records nothing twice; a killed worker's delivery claims are given
back by the next one at its start (they would otherwise wait for their lease to end), and the
sends it had in flight go again under the same idempotency keys.

The worker process stops when its supervisor stops it (SIGTERM: the sends in flight finish and
are recorded), and on its own when the supervisor is gone.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import logging
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audiences.api.service import Environment

log = logging.getLogger("audiences.workers")

# Set by `audiences serve` for uvicorn's own worker processes: the worker process's socket.
ADDRESS_VARIABLE = "_AUDIENCES_WORKER_ADDRESS"
# Users named in one datagram, about (a bulk identify is sent in several).
USERS_PER_MESSAGE = 200
# How long the API's sending thread waits for room in the worker's receive queue before it drops
# a message (the worker is stuck: its restart, or the next pipeline run, evaluates those users).
SEND_TIMEOUT_SECONDS = 5.0
WAKE = "wake"  # the client's queue item that says deliveries were queued
JOURNALED = "journaled"  # the client's queue item for an identify journal entry to apply
# The supervisor starts a dead worker again after this pause, doubled while it keeps dying within
# `STABLE_SECONDS` of its start, up to `MAX_RESTART_PAUSE_SECONDS`.
RESTART_PAUSE_SECONDS = 0.2
MAX_RESTART_PAUSE_SECONDS = 10.0
STABLE_SECONDS = 30.0
# How often a worker looks whether its supervisor is still there.
PARENT_CHECK_SECONDS = 0.5
STOP_TIMEOUT_SECONDS = 30.0


def new_address() -> str:
    """A socket address of the abstract namespace, unique to this supervisor, written as `@name`
    (an argument or environment variable holds no NUL; `socket_address` gives the real one)."""
    return f"@audiences-serve-{os.getpid()}-{secrets.token_hex(6)}"


def socket_address(address: str) -> str:
    """The address to bind or send to: `@name` is `name` in Linux's abstract namespace."""
    return "\0" + address[1:] if address.startswith("@") else address


class WorkerClient:
    """The API's side, in place of an in-process `RealtimeWorker` (`Environment.realtime`): sends
    the users whose identifies committed, and the news that deliveries were queued, to the worker
    process. A thread of its own sends them, everything waiting at that moment in one datagram, so
    a request never waits for the worker's receive queue (ten datagrams on Linux). A message the
    worker cannot take is dropped (see the module's docstring)."""

    def __init__(self, address: str, environment: Environment):
        from audiences.store.database import on_deliveries_queued

        self.address = socket_address(address)
        self.environment = environment.name
        self._socket: socket.socket | None = None  # connected to the worker's (`_send`)
        self._queue: queue.SimpleQueue[tuple[list[str], list[str] | None] | str | None] = (
            queue.SimpleQueue()
        )
        self._warned = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"worker-client-{environment.name}", daemon=True
        )
        self._thread.start()
        # Deliveries this process queues (broadcasts, static members) wake the worker's threads.
        self._unsubscribe = on_deliveries_queued(environment.store.url, self.wake_delivery)

    def submit(self, user_ids: Iterable[str], changed: Iterable[str] | None = None) -> None:
        """Have the worker process evaluate these users (their identify committed); `changed`
        as `RealtimeWorker.submit`."""
        user_ids = list(user_ids)
        if user_ids:
            self._queue.put((user_ids, None if changed is None else sorted(changed)))

    def journaled(self, seq: int, user_id: str, changed: Iterable[str]) -> None:
        """Have the worker process apply identify journal entry `seq` (user_id's identify, which
        set `changed`) to the store, then evaluate the user (`JournalApplier.journaled`)."""
        from audiences.settings import FAULT_PAUSE_SECONDS
        from audiences.store.journal import FAULT_BEFORE_APPLIED
        from audiences.workflows.realtime import FAULT_POINT

        if os.environ.get(FAULT_POINT) == FAULT_BEFORE_APPLIED:
            # A test's fault: the service dies after the answer (the pause), before the worker
            # hears of the entry; the worker process stops on its own once its supervisor is gone.
            def die():
                time.sleep(FAULT_PAUSE_SECONDS)
                os.kill(os.getpid(), signal.SIGKILL)

            threading.Thread(target=die, daemon=True).start()
            return
        self._queue.put((JOURNALED, [seq, user_id, sorted(changed)]))

    def wake_delivery(self) -> None:
        """A transaction of this process queued deliveries: have the worker look now."""
        self._queue.put(WAKE)

    def close(self) -> None:
        """Send what waits, then stop (idempotent)."""
        self._unsubscribe()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(STOP_TIMEOUT_SECONDS)
        if self._socket is not None:
            self._socket.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in items:
                stopping = True
            wake, submitted, journaled, users = False, [], [], 0
            for item in items:
                if item is None:
                    continue
                if item == WAKE:
                    wake = True
                    continue
                if item[0] == JOURNALED:
                    journaled.append(item[1])
                    users += 1
                else:
                    submitted.append(item)
                    users += len(item[0])
                if users >= USERS_PER_MESSAGE:
                    self._send(
                        {
                            "environment": self.environment,
                            "submit": submitted,
                            "journaled": journaled,
                        }
                    )
                    submitted, journaled, users = [], [], 0
            if submitted or journaled or wake:
                self._send(
                    {
                        "environment": self.environment,
                        "submit": submitted,
                        "journaled": journaled,
                        "wake": wake,
                    }
                )

    def _connected(self) -> socket.socket:
        """The socket, connected to the worker's. Connected, a send to a worker whose receive
        queue is full sleeps until it has room (the kernel wakes it); unconnected, `sendto` found
        the socket writable and the queue full, again and again, and so spun for as long as the
        queue stayed full, taking the API's interpreter lock back at every turn."""
        if self._socket is None:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            connection.settimeout(SEND_TIMEOUT_SECONDS)
            try:
                connection.connect(self.address)
            except OSError:
                connection.close()
                raise
            self._socket = connection
        return self._socket

    def _send(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        try:
            try:
                self._connected().send(data)
            except (ConnectionRefusedError, FileNotFoundError):
                # The worker it was connected to is gone; a new one may listen at the address.
                self._disconnect()
                self._connected().send(data)
        except OSError as error:
            self._disconnect()
            # No worker listening (it is starting again) or its queue full for too long: its
            # start (or the next pipeline run) evaluates these users; say so at most once a minute.
            now = time.monotonic()
            if error.errno not in (errno.ECONNREFUSED, errno.ENOENT) and now - self._warned > 60:
                self._warned = now
                log.warning("the worker process took no message (%s); it catches up", error)

    def _disconnect(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class WorkerSupervisor:
    """Runs the worker process from `start()` to `stop()`, starting it again whenever it dies."""

    def __init__(self, settings, *, deliver: bool, poll_seconds: float | None = None):
        self.settings = settings
        self.deliver = deliver
        self.poll_seconds = poll_seconds
        self.address = new_address()
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> WorkerSupervisor:
        self._thread.start()
        return self

    def _command(self, worker_id: str, dead: str | None) -> list[str]:
        command = [sys.executable, "-m", "audiences.api.workers", "--address", self.address]
        command += ["--supervisor", str(os.getpid()), "--worker-id", worker_id]
        if dead:
            command += ["--release-claims-of", dead]
        if self.deliver:
            command.append("--deliver")
        if self.poll_seconds is not None:
            command += ["--poll-seconds", str(self.poll_seconds)]
        return command

    def _run(self) -> None:
        from audiences.delivery.loop import new_worker_id

        environment = {**os.environ, **self.settings.environment_variables()}
        pause, dead = RESTART_PAUSE_SECONDS, None
        while not self._stopping.is_set():
            worker_id = new_worker_id()
            with self._lock:
                if self._stopping.is_set():
                    return
                # A session of its own: a terminal's Ctrl-C reaches the service, which stops it.
                self.process = subprocess.Popen(
                    self._command(worker_id, dead), env=environment, start_new_session=True
                )
            log.info("worker process %d started", self.process.pid)
            started = time.monotonic()
            status = self.process.wait()
            if self._stopping.is_set():
                return
            self.restarts += 1
            log.warning(
                "the worker process %d ended (%s); starting it again", self.process.pid, status
            )
            dead = worker_id
            pause = (
                RESTART_PAUSE_SECONDS
                if time.monotonic() - started > STABLE_SECONDS
                else min(pause * 2, MAX_RESTART_PAUSE_SECONDS)
            )
            self._stopping.wait(pause)

    def stop(self) -> None:
        """Stop the worker process (SIGTERM: it finishes its sends in flight), then this thread."""
        with self._lock:
            self._stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(STOP_TIMEOUT_SECONDS)


def settle_heap() -> None:
    """Collect once, then move every object alive now out of the collector's reach
    (`gc.freeze`), as `asgi_app` does for the API's process: what a long-lived process built at
    its start (modules, stores, sinks, compiled plans) is never garbage, and each full collection
    that the per-identify garbage sets off walked it again, pausing every thread of the process
    (real time's lanes, the applier, the delivery threads) for tens of milliseconds at 1M users."""
    gc.collect()
    gc.freeze()


def run_worker(arguments) -> int:
    """The worker process: bind the socket, start each served environment's real-time worker
    (which first evaluates the waiting users) and delivery worker, then hand them what the API
    sends until SIGTERM or the supervisor's end."""
    from audiences.api.realtime import RealtimeWorker
    from audiences.api.service import Environment
    from audiences.cli.delivery import start_delivery_workers, stop_delivery_workers
    from audiences.delivery.loop import release_claims_of
    from audiences.settings import Settings
    from audiences.workflows.realtime import FAULT_ALSO_KILLS

    settings = Settings.from_env()
    os.environ[FAULT_ALSO_KILLS] = str(arguments.supervisor)  # a test's fault kills the service
    stopping = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stopping.set())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(
        socket_address(arguments.address)
    )  # first: whatever commits from now on reaches this worker
    listener.settimeout(PARENT_CHECK_SECONDS)
    environments: dict[str, Environment] = {}
    deliverers: dict[str, object] = {}
    try:
        for name in settings.api_environments:
            environment = environments[name] = Environment.open(settings, name)
            if arguments.release_claims_of:
                released = release_claims_of(environment.store, arguments.release_claims_of)
                if released:
                    log.info("%s: %d deliveries of the dead worker given back", name, released)
        if arguments.deliver:
            started = start_delivery_workers(
                settings,
                list(environments),
                arguments.poll_seconds,
                worker_id=arguments.worker_id,
            )
            deliverers = dict(zip(environments, started, strict=True))
        if settings.realtime:
            for environment in environments.values():
                environment.realtime = RealtimeWorker(environment, settle_heap=True).start()
        settle_heap()
        while not stopping.is_set() and os.getppid() == arguments.supervisor:
            try:
                data = listener.recv(1 << 20)
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            try:
                message = json.loads(data)
                environment = environments[message["environment"]]
            except (ValueError, KeyError, TypeError):
                log.warning("the worker process ignored a message it cannot read")
                continue
            if message.get("wake") and environment.name in deliverers:
                deliverers[environment.name].wake()
            if environment.realtime is not None:
                for user_ids, changed in message.get("submit", ()):
                    environment.realtime.submit(user_ids, changed)
                for seq, user_id, changed in message.get("journaled", ()):
                    environment.journal_applier().journaled(seq, user_id, changed)
    finally:
        listener.close()
        if deliverers:
            stop_delivery_workers(list(deliverers.values()))
        for environment in environments.values():
            environment.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m audiences.api.workers`: started by `audiences serve`, not by hand."""
    parser = argparse.ArgumentParser(prog="audiences-worker", description=main.__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--supervisor", type=int, required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--release-claims-of", default=None)
    parser.add_argument("--deliver", action="store_true")
    parser.add_argument("--poll-seconds", type=float, default=None)
    arguments = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s"
    )
    return run_worker(arguments)


if __name__ == "__main__":
    sys.exit(main())
