"""Per-key rate limits (token buckets) and the request body limit."""

from __future__ import annotations

import json
import math
import threading
import time

from audiences.api.errors import error_body


class RateLimiter:
    """A token bucket per (key, kind): `rate` requests a second, bursts up to one second's worth.

    Limits are per process; the service runs as one process (uvicorn, one worker) per host.
    """

    def __init__(self, rates: dict[str, float]):
        self.rates = rates
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key_id: str, kind: str) -> float | None:
        """Take one token; None when allowed, else the seconds to wait before retrying."""
        rate = self.rates[kind]
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get((key_id, kind), (rate, now))
            tokens = min(rate, tokens + (now - stamp) * rate)
            if tokens >= 1:
                self._buckets[(key_id, kind)] = (tokens - 1, now)
                return None
            self._buckets[(key_id, kind)] = (tokens, now)
            return (1 - tokens) / rate


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
        payload = json.dumps(error_body(413, "request_too_large",
                                        f"the request body is over the limit of {self.max_bytes:,} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
