"""A tiny, fast HTTP/1.1 upstream for when nginx is not installed.

``python -m bench.fastserver --port P --jwks FILE --body FILE`` answers
``GET .../jwks.json`` with the JWKS and every other request with the same small JSON body,
keeping connections alive. One asyncio protocol, no parsing beyond what keep-alive needs.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from .http1 import split_message


def _response(body: bytes) -> bytes:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head + body


class _Http(asyncio.Protocol):
    def __init__(self, answer: bytes, jwks: bytes) -> None:
        self.answer = answer
        self.jwks = jwks
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        out = []
        while (message := split_message(self.buffer)) is not None:
            head, self.buffer = message
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            out.append(self.jwks if target.endswith(b"jwks.json") else self.answer)
        if out:
            self.transport.write(b"".join(out))


async def _serve(port: int, answer: bytes, jwks: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Http(answer, jwks), "127.0.0.1", port,
                                      backlog=1024)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fastserver")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--jwks", type=Path, required=True)
    parser.add_argument("--body", type=Path, required=True)
    args = parser.parse_args(argv)
    answer = _response(args.body.read_bytes())
    jwks = _response(args.jwks.read_bytes())
    asyncio.run(_serve(args.port, answer, jwks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
