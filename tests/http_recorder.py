"""Test support for delivery: a real HTTP server on 127.0.0.1 that records and scripts requests.

Sinks are tested against a real socket rather than a mocked `requests`, so timeouts, connection
resets, `Retry-After` headers and connection pooling behave as they do in production. The server
records every request (method, path, headers, body) and answers from a script, one reply per
request in arrival order (then a responder function, or 200): a status with headers, a hang
longer than the client's timeout, or a reset connection. `insert_delivery` builds rows of the
store's `deliveries` table directly, so delivery tests need no pipeline run.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from audiences.store.database import MembershipStore, deliveries


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a status with headers and body, or `hang_seconds`, or `reset`."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang_seconds: float | None = None
    reset: bool = False
    trickle_seconds: float | None = None
    trickle_headers: bool = False

    @classmethod
    def hang(cls, seconds: float) -> Reply:
        """Answer nothing for `seconds` (longer than the client's timeout), then close."""
        return cls(hang_seconds=seconds)

    @classmethod
    def trickle(cls, seconds: float, *, headers: bool = False) -> Reply:
        """Answer 200 a byte of the body every 0.1 s for `seconds` (or, with `headers`, a header
        line every 0.1 s): each read is quick, the whole answer never ends in time."""
        return cls(trickle_seconds=seconds, trickle_headers=headers)

    @classmethod
    def connection_reset(cls) -> Reply:
        """Drop the connection without an answer (a TCP reset)."""
        return cls(reset=True)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float = 0.0  # time.monotonic() when the request had been read

    def header(self, name: str) -> str | None:
        """A header by name, case-insensitively."""
        wanted = name.lower()
        return next((value for key, value in self.headers.items() if key.lower() == wanted), None)

    def json(self):
        return json.loads(self.body)


class HttpRecorder:
    """A threaded HTTP server on 127.0.0.1 (a free port) that records requests and replays a script.

    Use it as a context manager; `url` is its base URL, `requests` what it received, `script(...)`
    queues replies. `close()` releases hanging handlers, so tests end promptly and cleanly.
    """

    def __init__(self):
        self.requests: list[RecordedRequest] = []
        self._replies: deque[Reply] = deque()
        self._responder: Callable[[RecordedRequest], Reply | int] | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: (
            None
        )  # clients that hung up are expected
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HttpRecorder:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> HttpRecorder:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def script(self, *replies: Reply | int) -> None:
        """Queue replies (a bare int is that status) for the next requests, in order."""
        with self._lock:
            self._replies.extend(
                Reply(reply) if isinstance(reply, int) else reply for reply in replies
            )

    def respond_with(self, responder: Callable[[RecordedRequest], Reply | int]) -> None:
        """Answer requests the script does not cover by calling `responder` with each one."""
        self._responder = responder

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self._replies:
                return self._replies.popleft()
        reply = self._responder(request) if self._responder else Reply()
        return Reply(reply) if isinstance(reply, int) else reply


def _handler_for(recorder: HttpRecorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so sinks' connection pooling is exercised

        def do_POST(self) -> None:
            self._answer()

        def do_GET(self) -> None:
            self._answer()

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = RecordedRequest(
                self.command, self.path, dict(self.headers.items()), body, time.monotonic()
            )
            reply = recorder._next_reply(request)
            if reply.reset:
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return
            if reply.hang_seconds is not None:
                recorder._closing.wait(reply.hang_seconds)
                self.close_connection = True
                return
            if reply.trickle_seconds is not None:
                self.close_connection = True
                head = b"HTTP/1.1 200 OK\r\n"
                if not reply.trickle_headers:
                    head += b"Content-Length: 1000000\r\n\r\n"
                piece = b"X-Slow: 1\r\n" if reply.trickle_headers else b" "
                ends = time.monotonic() + reply.trickle_seconds
                try:
                    self.wfile.write(head)
                    while time.monotonic() < ends and not recorder._closing.wait(0.1):
                        self.wfile.write(piece)
                        self.wfile.flush()
                except OSError:
                    pass  # the client hung up
                return
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, format, *args) -> None:  # keep test output quiet
            pass

    return Handler


def insert_delivery(store: MembershipStore, delivery_id: str, **columns) -> dict:
    """Insert one row of the `deliveries` table (see `delivery_row_values`) and return it."""
    row = delivery_row_values(delivery_id, **columns)
    insert_deliveries(store, [row])
    return row


def insert_deliveries(store: MembershipStore, rows: list[dict]) -> None:
    """Insert many rows of the `deliveries` table in one transaction."""
    with store.engine.begin() as connection:
        connection.execute(deliveries.insert(), rows)


def delivery_row_values(
    delivery_id: str,
    *,
    sink: str = "file",
    workflow_key: str = "welcome",
    status: str = "pending",
    attempts: int = 0,
    next_attempt_at: str = "2026-01-01T00:00:00.000000Z",
    created_at: str | None = None,
    user_id: str | None = None,
    payload: dict | str | None = None,
    audience_key: str = "vip",
) -> dict:
    """The columns of one `deliveries` row; the payload defaults to a Knock trigger body."""
    user_id = user_id or f"user-{delivery_id}"
    if payload is None:
        payload = {
            "recipients": [user_id],
            "data": {"audience_key": audience_key, "event": "entered"},
        }
    row = {
        "delivery_id": delivery_id,
        "event_id": f"event-{delivery_id}",
        "broadcast_id": None,
        "workflow_key": workflow_key,
        "sink": sink,
        "audience_key": audience_key,
        "user_id": user_id,
        "tenant": None,
        "payload": payload if isinstance(payload, str) else json.dumps(payload),
        "status": status,
        "attempts": attempts,
        "next_attempt_at": next_attempt_at,
        "last_error": None,
        "batch_id": None,
        "created_at": created_at or next_attempt_at,
        "delivered_at": None,
    }
    return row


def delivery_row(store: MembershipStore, delivery_id: str) -> dict:
    """The current row of one delivery."""
    return store.rows(deliveries.select().where(deliveries.c.delivery_id == delivery_id))[0]
