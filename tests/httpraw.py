"""Send byte-exact HTTP/1.1 requests (no client-side normalisation) and parse the answer."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def send_raw(port: int, request: bytes, timeout: float = 10.0) -> RawResponse:
    """Write ``request`` as is to 127.0.0.1:port and read one response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(request)
        resp = http.client.HTTPResponse(sock, method=request.split(b" ", 1)[0].decode())
        resp.begin()
        body = resp.read()
        return RawResponse(resp.status, resp.headers, body)
    finally:
        sock.close()


def request(port: int, method: str, target: str, headers: dict[str, str] | None = None,
            body: bytes = b"", extra: list[tuple[str, str]] | None = None,
            timeout: float = 10.0) -> RawResponse:
    """A request whose target goes on the wire exactly as given."""
    lines = [f"{method} {target} HTTP/1.1", "Connection: close"]
    if not any(k.lower() == "host" for k in (headers or {})):
        lines.append("Host: 127.0.0.1")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    for key, value in extra or []:
        lines.append(f"{key}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return send_raw(port, raw, timeout)
