"""Per-key rate limits (token buckets) and the request body limit."""

from __future__ import annotations

import fcntl
import json
import math
import mmap
import os
import struct
import threading
import time
import zlib
from pathlib import Path

from audiences.api.errors import error_body


class RateLimiter:
    """A token bucket per (environment, tier): `rate` requests a second, bursts up to one
    second's worth (one request at least).

    The buckets live in a small memory-mapped file shared by every worker process of the service
    (`audiences serve --workers N`), guarded by a file lock, so a key's limit holds across them.
    Slots are found by open addressing on the key; a full table (more than 4,096 live key and
    kind pairs) lets requests through rather than refusing them.
    """

    SLOTS = 4096
    SLOT = struct.Struct(
        "<32sdd"
    )  # key and kind, tokens, last refill (CLOCK_MONOTONIC, system-wide)

    def __init__(self, rates: dict[str, float], path: Path):
        self.rates = rates
        path.parent.mkdir(parents=True, exist_ok=True)
        # Mapped for the limiter's life and closed by `close()`, not a `with` block.
        self._file = open(path, "a+b")  # noqa: SIM115
        size = self.SLOTS * self.SLOT.size
        if os.fstat(self._file.fileno()).st_size < size:
            self._file.truncate(size)
        self._map = mmap.mmap(self._file.fileno(), size)
        self._lock = threading.Lock()  # threads of this process; the file lock covers processes

    def close(self) -> None:
        self._map.close()
        self._file.close()

    def acquire(self, key_id: str, kind: str) -> float | None:
        """Take one token; None when allowed, else the seconds to wait before retrying."""
        rate = self.rates[kind]
        # A burst of one second's worth, and of one request at least: a rate under one a second
        # (one every few seconds) lets its request through, then waits.
        burst = max(1.0, rate)
        name = f"{key_id}:{kind}".encode()[:32].ljust(32, b"\0")
        start = zlib.crc32(name) % self.SLOTS
        with self._lock:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            try:
                now = time.monotonic()
                for probe in range(self.SLOTS):
                    offset = ((start + probe) % self.SLOTS) * self.SLOT.size
                    slot, tokens, stamp = self.SLOT.unpack_from(self._map, offset)
                    if slot == name:
                        tokens = min(burst, tokens + (now - stamp) * rate)
                        break
                    if slot.strip(b"\0") == b"":
                        tokens = burst
                        break
                else:
                    return None
                if tokens >= 1:
                    self.SLOT.pack_into(self._map, offset, name, tokens - 1, now)
                    return None
                self.SLOT.pack_into(self._map, offset, name, tokens, now)
                return (1 - tokens) / rate
            finally:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 before any handler reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send):
        payload = json.dumps(
            error_body(
                413,
                "request_too_large",
                f"the request body is over the limit of {self.max_bytes:,} bytes",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
