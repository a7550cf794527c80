"""Tripwires for the fence (addons/mitm_internals.py): behaviour, never mitmproxy's source text.

A real sidecar over a raw socket, bytes in and bytes out, for each private touch point: the JSON
error pages (1) for 400/413/431/502/504 and their shape (no HTML, no ``Server: mitmproxy``), the
head limits (2), request bodies (3), answers from the head (4), chunked bodies and trailers (5,
6), closing connections from outside (7: upstream timeout, idle timeout). (8) is exercised in
process: a crash record finds its connection and the edge answers it. If a mitmproxy upgrade
moves any of this, :func:`check_internals` refuses to start and these fail with the bytes seen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from mitmproxy.test import tflow

from stagedoor.runtime import Runtime
from stagedoor_addons import edge as edge_addon
from stagedoor_addons import mitm_internals
from stagedoor_addons.record import record_of

from .conftest import ROOT, write_config
from .hardening import HEADER_TIMEOUT, MAX_BODY_BYTES, MAX_HEADER_BYTES, HardEnv
from .test_hardening_edge import exchange, parse_responses


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardEnv]:
    e = HardEnv(tmp_path_factory.mktemp("fence"), extra_config="    idleTimeoutSeconds: 1\n")
    yield e
    e.stop()


def _one(env: HardEnv, raw: bytes, method: str = "GET") -> tuple[int, dict, bytes, bytes]:  # type: ignore[type-arg]
    answer = exchange(env.port, raw.replace(b"{T}", env.token.encode()))
    responses = parse_responses(answer, method)
    assert responses, answer[:200]
    resp = responses[-1]
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.body, answer  # type: ignore[attr-defined]


def _assert_json_page(status: int, headers: dict, body: bytes, raw: bytes, want: int) -> None:  # type: ignore[type-arg]
    assert status == want, raw[:300]
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert "server" not in headers and b"mitmproxy" not in raw.lower()
    assert b"<html" not in raw.lower()
    doc = json.loads(body)
    assert set(doc) == {"error", "request", "response"} and doc["response"]["statusCode"] == want
    assert headers.get("x-frame-options") == "SAMEORIGIN"  # the security headers too


def test_check_internals_passes_on_this_mitmproxy():
    mitm_internals.check_internals()


AUTH = b"Authorization: Bearer {T}\r\n"


@pytest.mark.parametrize(("raw", "method", "status"), [
    pytest.param(b"NOT HTTP\r\n\r\n", "GET", 400, id="(1) malformed request line: 400"),
    pytest.param(b"GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n" + AUTH
                 + b"X-Pad: " + b"p" * MAX_HEADER_BYTES + b"\r\n\r\n", "GET", 431,
                 id="(2) head over maxHeaderBytes: 431"),
    pytest.param(b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n" + AUTH
                 + b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1), "POST", 413,
                 id="(3) declared body over maxBodyBytes: 413"),
    pytest.param(b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n" + AUTH
                 + b"Transfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n" % (MAX_BODY_BYTES + 10) + b"b" * (MAX_BODY_BYTES + 10)
                 + b"\r\n0\r\n\r\n", "POST", 413, id="(3) chunked body over maxBodyBytes: 413"),
    pytest.param(b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                 b"Expect: 100-continue\r\n\r\n", "POST", 401,
                 id="(4) refusal from the head, no 100 Continue: 401"),
    pytest.param(b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n" + AUTH
                 + b"Transfer-Encoding: chunked\r\n\r\n5;" + b"e" * 10_000 + b"\r\n", "POST",
                 413, id="(5)(6) chunk line over maxChunkLineBytes: 413"),
    pytest.param(b"GET /api/fixture/refused HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                 "GET", 502, id="(1) upstream refused: 502"),
    pytest.param(b"GET /api/fixture/fault/reset-body HTTP/1.1\r\nHost: x\r\n"
                 b"Connection: close\r\n\r\n", "GET", 502, id="(1) upstream reset mid-body: 502"),
    pytest.param(b"GET /api/fixture/fault/slow-head HTTP/1.1\r\nHost: x\r\n"
                 b"Connection: close\r\n\r\n", "GET", 504, id="(1)(7) upstream timeout: 504"),
])
def test_error_pages_are_json_for_every_status(env, raw, method, status):
    got, headers, body, answer = _one(env, raw, method)
    _assert_json_page(got, headers, body, answer, status)
    assert b"100 Continue" not in answer


def test_trailers_in_both_directions_do_not_crash_the_connection(env):
    got, _, body, answer = _one(env, b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n" + AUTH
                                + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"2\r\nhi\r\n0\r\nX-T: 1\r\n\r\n", "POST")
    assert got == 200, answer[:300]
    got, _, body, answer = _one(env, b"GET /api/fixture/fault/trailers HTTP/1.1\r\nHost: x\r\n"
                                     b"Connection: close\r\n\r\n")
    assert got == 200 and body == b'{"a":1}' and b"X-Checksum" not in answer
    assert not env.crash_lines(), env.crash_lines()


def test_a_connection_is_closed_from_outside_when_idle(env):
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=HEADER_TIMEOUT + 8)
    try:
        sock.sendall(b"GET /api/fixture/open/abc HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        while sock.recv(65536):
            pass  # b"" once the proxy closed it
    finally:
        sock.close()


# -- (8) crashes, in process ---------------------------------------------------------------------
def test_a_crash_record_reaches_the_listener_with_its_connection(monkeypatch):
    handler = SimpleNamespace(client=SimpleNamespace(peername=("127.0.0.1", 5555), id="c1"))
    other = SimpleNamespace(client=SimpleNamespace(peername=("127.0.0.1", 6666), id="c2"))
    seen: list[tuple[object, object]] = []
    monkeypatch.setattr(mitm_internals, "_handlers", lambda: [other, handler])
    monkeypatch.setattr(mitm_internals, "_crash_listener", lambda h, e: seen.append((h, e)))
    try:
        raise NotImplementedError("HTTP trailers are not implemented yet.")
    except NotImplementedError as exc:
        error = exc
    record = logging.LogRecord("mitmproxy.proxy.server", logging.ERROR, __file__, 1,
                               mitm_internals.CRASH_MESSAGE, None,
                               (type(error), error, error.__traceback__))
    record.client = ("127.0.0.1", 5555)
    assert mitm_internals.CrashWatch().filter(record) is True
    assert seen == [(handler, error)]


def test_the_edge_answers_a_crashed_connection_with_json_500_and_closes_it(monkeypatch, tmp_path):
    closed: list[tuple[str, str, bytes]] = []
    monkeypatch.setattr(mitm_internals, "close_client",
                        lambda cid, reason, answer=b"": closed.append((cid, reason, answer)))

    async def go() -> None:
        config = write_config(tmp_path / "c.yaml", """\
            backend: {baseUrl: 'http://127.0.0.1:1'}
            insights: {externalApiUrl: 'http://127.0.0.1:1'}
            """)
        edge = edge_addon.Edge(Runtime.load([str(config)], str(ROOT / "policies")))
        flow = tflow.tflow()
        flow.request.headers["X-Request-Id"] = "crash-1"
        edge.conns[flow.client_conn.id] = edge_addon._Conn("127.0.0.1", [flow])
        handler = SimpleNamespace(client=flow.client_conn)
        edge._crashed(handler, NotImplementedError("boom"))
        await asyncio.sleep(0)  # the close is scheduled on the loop
        assert edge.events == {"crash": 1}
        edge.error(flow)  # what client_disconnected fires for a flow left without an answer
        record = record_of(flow.metadata)
        assert record is not None
        assert (record.status, record.check, record.outcome) == (500, "internal", "error")

    asyncio.run(go())
    ((_, reason, answer),) = closed
    assert reason == "crashed" and answer.startswith(b"HTTP/1.1 500 ")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"X-Request-Id: crash-1" in head and b"Server:" not in head
    assert json.loads(body)["response"] == {"statusCode": 500}


@pytest.mark.parametrize(("data", "want"), [
    (b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\nHTTP/1.1 200 OK\r\n", 103),
    (b"HTTP/1.1 100 Continue\r\n\r\n", 100),
    (b"HTTP/1.1 102 Processing\r\n\r\n", 102),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", None),
    (b"HTTP/1.1 200 OK\r\n\r\n", None),
    (b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n", None),  # not complete yet
    (b"HTTP/1.1 1033 x\r\n\r\n", None),
    (b"garbage", None),
])
def test_interim_heads_are_recognised(data, want):
    found = mitm_internals.interim_head(data)
    assert (found[0] if found else None) == want


def test_interim_heads_lose_hop_by_hop_and_malformed_fields():
    head = (b"HTTP/1.0 103 \r\nLink: </a.css>\r\nConnection: x\r\nKeep-Alive: 1\r\n"
            b"Transfer-Encoding: chunked\r\nBad Name: x\r\nnocolon\r\n\r\n")
    assert mitm_internals.forwardable_interim(head) == (
        b"HTTP/1.1 103 Informational\r\nLink: </a.css>\r\n\r\n")
