"""uvicorn's HTTP protocol, answering requests it cannot read in Knock's error shape.

A request line or headers too long for the parser (a query of more than about 64 kB), or bytes
that are not HTTP, never reach the application: uvicorn answers them itself with a plain-text
400. Clients branch on the JSON body's `code`, so `audiences serve` runs this subclass, whose only
change is that answer's body: `{"code": "invalid_request", "status": 400, ...}`. It extends
httptools' protocol (uvicorn's default where httptools is installed), else h11's.
"""

from __future__ import annotations

import json

from audiences.api.errors import error_body

# Passed to uvicorn by name, so that `--workers N` processes load it too.
PROTOCOL = "audiences.api.protocol:KnockHttpProtocol"


def unreadable_request_body() -> bytes:
    return json.dumps(
        error_body(
            400,
            "invalid_request",
            "the request could not be read: its request line or headers are too long "
            "(over about 64 kB) or malformed",
        )
    ).encode()


try:
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    class KnockHttpProtocol(HttpToolsProtocol):
        """httptools' protocol with a JSON 400."""

        def send_400_response(self, msg: str) -> None:
            payload = unreadable_request_body()
            content = [STATUS_LINE[400]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend(
                [
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(payload)).encode("ascii") + b"\r\n",
                    b"connection: close\r\n",
                    b"\r\n",
                    payload,
                ]
            )
            self.transport.write(b"".join(content))
            self.transport.close()

except ImportError:  # no httptools: uvicorn uses h11
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class KnockHttpProtocol(H11Protocol):  # type: ignore[no-redef]
        """h11's protocol with a JSON 400."""

        def send_400_response(self, msg: str) -> None:
            payload = unreadable_request_body()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode("ascii")),
                (b"connection", b"close"),
            ]
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=payload),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self.transport.close()
