"""The shared control-plane client (stagedoor/outbound.py): one pooled httpx client per event
loop, used by permission delegation and key-set fetches, against a real loopback server that
records which TCP connection each request came on."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from stagedoor import outbound
from stagedoor.permissions import Authorizer

from .conftest import LoopbackServer


class ConnectionCountingServer(LoopbackServer):
    """Keep-alive HTTP/1.1; ``connections`` holds one client address per TCP connection."""

    def __init__(self) -> None:
        self.connections: set[tuple[str, int]] = set()
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.body = b'{"keys": []}'
        super().__init__(_Handler)


class _Handler(BaseHTTPRequestHandler):
    server: ConnectionCountingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, body: bytes) -> None:
        with self.server.lock:
            self.server.connections.add(self.client_address)
            self.server.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(self.server.body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        item = request["items"][0]
        self._answer(json.dumps({"items": [{"id": item["id"], "result": "ALLOW"}]}).encode())


@pytest.fixture
def server():
    s = ConnectionCountingServer()
    yield s
    s.stop()


def test_one_client_per_loop_reused_until_closed():
    async def main() -> tuple[httpx.AsyncClient, httpx.AsyncClient, bool]:
        first, again = outbound.client(), outbound.client()
        await outbound.aclose()
        return first, again, first.is_closed

    first, again, closed = asyncio.run(main())
    assert first is again and closed
    second, _, _ = asyncio.run(main())
    assert second is not first  # another loop (or after aclose): a fresh client


def test_the_client_bounds_its_timeouts_and_pool_and_never_follows_redirects():
    async def main() -> httpx.AsyncClient:
        try:
            return outbound.client()
        finally:
            await outbound.aclose()

    client = asyncio.run(main())
    assert client.timeout.connect == outbound.CONNECT_TIMEOUT
    assert client.timeout.read == outbound.DEFAULT_TIMEOUT
    assert not client.follow_redirects
    assert outbound.timeout(0.5).connect == 0.5 and outbound.timeout(30).connect == 2.0


def test_permission_delegations_share_one_pooled_connection(server):
    authorizer = Authorizer(f"{server.url}/api/permission", cache_ttl=0)

    async def main() -> list[bool]:
        try:
            return [await authorizer.resolve(f"token-{i}", "insights.read") for i in range(5)]
        finally:
            await outbound.aclose()

    assert asyncio.run(main()) == [True] * 5
    assert server.paths == ["/api/permission/authorize"] * 5
    assert len(server.connections) == 1  # one client per delegation would be five


def test_read_capped_refuses_a_body_over_the_limit(server):
    server.body = b"x" * 5000

    async def main(limit: int) -> bytes:
        try:
            async with outbound.client().stream("GET", server.url) as response:
                return await outbound.read_capped(response, limit)
        finally:
            await outbound.aclose()

    assert asyncio.run(main(5000)) == server.body
    with pytest.raises(outbound.ResponseTooLarge):
        asyncio.run(main(4999))


def test_key_set_fetches_share_the_pooled_connection(server):
    from stagedoor.auth import AuthSettings, TokenVerifier
    from stagedoor.config import Config

    endpoints = [{"target": f"{server.url}/api/{{{{pluginId}}}}", "plugins": ["catalog", "search"]}]
    settings = AuthSettings.from_config(Config(data={
        "backend": {"baseUrl": server.url}, "discovery": {"endpoints": endpoints}}))
    verifier = TokenVerifier(settings)

    async def main() -> None:
        try:
            for source in verifier.sources:  # one after the other: each reuses the connection
                await verifier.refresh(source)
        finally:
            await outbound.aclose()

    asyncio.run(main())
    assert sorted(server.paths) == ["/api/auth/.well-known/jwks.json",
                                    "/api/catalog/.backstage/auth/v1/jwks.json",
                                    "/api/search/.backstage/auth/v1/jwks.json"]
    assert len(server.connections) == 1
