"""Request limits from config (``stagedoor.limits``) and slow clients, through a real sidecar.

- A head over ``maxHeaderBytes`` or with more than ``maxHeaderCount`` fields: 431
  ``RequestHeaderFieldsTooLargeError``; a body over ``maxBodyBytes`` (declared or chunked): 413
  ``PayloadTooLargeError``; both JSON errors, nothing forwarded, the connection closed.
- A head that never ends is not buffered past the limit.
- Slow clients (slowloris) do not hold up anyone else, and are disconnected once
  ``headerTimeoutSeconds`` passes without a complete head.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from stagedoor.config import Config, ConfigError
from stagedoor.runtime import Limits

from .hardening import (
    HEADER_TIMEOUT,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    HardEnv,
    is_json_error,
)
from .httpraw import RawResponse, send_raw

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardEnv]:
    e = HardEnv(tmp_path_factory.mktemp("hard-limits"))
    yield e
    e.stop()


def head(env: HardEnv, target: str = "/api/fixture/items/abc", method: str = "GET",
         extra: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1",
             f"Authorization: Bearer {env.token}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def exchange(env: HardEnv, data: bytes) -> RawResponse:
    return send_raw(env.port, data)


def assert_refused(resp: RawResponse, status: int, name: str) -> None:
    assert is_json_error(resp, status), (resp.status, resp.body[:300])
    assert resp.json()["error"]["name"] == name
    assert resp.header("x-frame-options") == "SAMEORIGIN"  # the security headers too


# -- head size and count -----------------------------------------------------------------------
def _fill(env: HardEnv, size: int) -> list[tuple[str, str]]:
    """An X-Pad header that brings the head to exactly ``size`` bytes."""
    base = len(head(env, extra=[("X-Pad", "")])) - 4  # without the final CRLFCRLF
    return [("X-Pad", "p" * (size - base))]


def test_head_just_under_the_limit_passes(env):
    resp = exchange(env, head(env, extra=_fill(env, MAX_HEADER_BYTES)))
    assert resp.status == 200, resp.body


@pytest.mark.parametrize("extra", [
    pytest.param("pad", id="head over maxHeaderBytes by one header"),
    pytest.param("one", id="one header over maxHeaderBytes"),
])
def test_head_over_the_limit_is_431(env, extra):
    before = len(env.up.requests())
    if extra == "pad":
        data = head(env, extra=[*_fill(env, MAX_HEADER_BYTES - 20), ("X-More", "m" * 40)])
    else:
        data = head(env, extra=[("X-Big", "b" * (MAX_HEADER_BYTES + 1))])
    resp = exchange(env, data)
    assert_refused(resp, 431, "RequestHeaderFieldsTooLargeError")
    assert resp.header("connection") == "close"
    assert env.up.requests()[before:] == []


def test_request_line_over_the_limit_is_414(env):
    """RFC 9112 §3: a request-target longer than the server parses MUST get 414."""
    before = len(env.up.requests())
    resp = exchange(env, head(env, target="/api/fixture/loose/" + "l" * MAX_HEADER_BYTES))
    assert is_json_error(resp, 414), (resp.status, resp.body[:200])
    assert resp.header("connection") == "close"
    assert env.up.requests()[before:] == []


def test_header_count_limit(env):
    base = 3  # Host, Authorization, Connection
    ok = [(f"X-H{i}", "v") for i in range(MAX_HEADER_COUNT - base)]
    assert exchange(env, head(env, extra=ok)).status == 200
    before = len(env.up.requests())
    resp = exchange(env, head(env, extra=[*ok, ("X-One-Too-Many", "v")]))
    assert_refused(resp, 431, "RequestHeaderFieldsTooLargeError")
    assert resp.json()["error"]["message"] == "Too many request header fields"
    assert resp.json()["request"] == {"method": "GET", "url": "/items/abc"}
    resp = exchange(env, head(env, extra=[("X", "")] * 10_000))
    assert resp.status == 431
    assert env.up.requests()[before:] == []


def test_a_head_that_never_ends_is_cut_off(env):
    """Header bytes without the blank line: refused once past the limit, not buffered on."""
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    sent = 0
    answer = b""
    try:
        sock.sendall(b"GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n")
        chunk = b"X-Endless: " + b"e" * 1000 + b"\r\n"
        while sent < MAX_HEADER_BYTES * 20:
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        sock.settimeout(5)
        try:  # (read the one answer; the proxy closes once the client stops sending)
            while b"}}" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert env.healthy()


# -- body size ---------------------------------------------------------------------------------
def test_body_at_the_limit_is_forwarded_whole(env):
    body = bytes(range(256)) * (MAX_BODY_BYTES // 256)
    assert len(body) == MAX_BODY_BYTES
    before = len(env.up.requests())
    data = head(env, method="POST", extra=[("Content-Length", str(len(body)))]) + body
    assert exchange(env, data).status == 200
    (seen,) = env.up.requests()[before:]
    assert seen.body == body


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 10**12],
                         ids=["declared body over maxBodyBytes", "declared body of 1 TB"])
def test_declared_body_over_the_limit_is_413_before_it_is_read(env, size):
    before = len(env.up.requests())
    # Only the head is sent: the answer must come without the proxy waiting for the body.
    resp = exchange(env, head(env, method="POST", extra=[("Content-Length", str(size))]))
    assert_refused(resp, 413, "PayloadTooLargeError")
    assert resp.json()["request"] == {"method": "POST", "url": "/items/abc"}
    assert env.up.requests()[before:] == []


def _chunked(env: HardEnv, total: int, target: str = "/api/fixture/items/abc") -> bytes:
    data = head(env, method="POST", target=target,
                extra=[("Transfer-Encoding", "chunked")])
    piece = 4096
    out = bytearray(data)
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        out += b"%x\r\n" % n + b"c" * n + b"\r\n"
        sent += n
    return bytes(out + b"0\r\n\r\n")


def test_chunked_body_at_the_limit_is_forwarded(env):
    before = len(env.up.requests())
    assert exchange(env, _chunked(env, MAX_BODY_BYTES)).status == 200
    (seen,) = env.up.requests()[before:]
    assert len(seen.body) == MAX_BODY_BYTES


def test_chunked_body_over_the_limit_is_413(env):
    before = len(env.up.requests())
    try:
        resp = exchange(env, _chunked(env, MAX_BODY_BYTES * 4))
    except ConnectionResetError:  # the proxy may close while we still write; never forwards
        resp = None
    if resp is not None:
        assert_refused(resp, 413, "PayloadTooLargeError")
    assert env.up.requests()[before:] == []
    assert env.healthy()


@pytest.mark.parametrize(("target", "token"), [
    ("/api/fixture/open/abc", True), ("/api/fixture/items/abc", False)],
    ids=["body over the limit to an unauthenticated route",
         "body over the limit without credentials"])
def test_body_limit_applies_before_anything_else(env, target, token):
    lines = [f"POST {target} HTTP/1.1", "Host: x", "Connection: close",
             f"Content-Length: {MAX_BODY_BYTES + 1}"]
    if token:
        lines.append(f"Authorization: Bearer {env.token}")
    resp = exchange(env, ("\r\n".join(lines) + "\r\n\r\n").encode())
    assert_refused(resp, 413, "PayloadTooLargeError")


# -- slow clients ------------------------------------------------------------------------------
def test_slowloris_does_not_block_others_and_is_cut_off(env):
    """40 connections trickle a head one byte at a time; meanwhile 100 normal requests are
    answered promptly; after headerTimeoutSeconds the slow ones are closed."""
    stop = threading.Event()
    slow: list[socket.socket] = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
        s.sendall(b"GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    closed_at: dict[int, float] = {}
    started = time.monotonic()

    def trickle() -> None:
        while not stop.is_set():
            for i, s in enumerate(slow):
                if i in closed_at:
                    continue
                try:
                    s.sendall(b"X")
                except OSError:
                    closed_at[i] = time.monotonic() - started
            time.sleep(0.1)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        def one(_: int) -> tuple[int, float]:
            t0 = time.monotonic()
            resp = send_raw(env.port, head(env), timeout=5)
            return resp.status, time.monotonic() - t0

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(100)))
        assert all(status == 200 for status, _ in results), results
        assert max(latency for _, latency in results) < 2.0, results
        deadline = time.monotonic() + HEADER_TIMEOUT + 5
        while len(closed_at) < len(slow) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(closed_at) == len(slow), f"{len(closed_at)} of {len(slow)} closed"
        assert max(closed_at.values()) < HEADER_TIMEOUT + 3, closed_at
    finally:
        stop.set()
        t.join(2)
        for s in slow:
            s.close()
    assert env.healthy()


def test_an_idle_partial_head_is_closed_too(env):
    s = socket.create_connection(("127.0.0.1", env.port), timeout=HEADER_TIMEOUT + 5)
    try:
        s.sendall(b"GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        started = time.monotonic()
        try:
            data = s.recv(1024)
        except OSError:
            data = b""
        assert data == b""
        assert time.monotonic() - started < HEADER_TIMEOUT + 3
    finally:
        s.close()


def test_slow_body_upload_does_not_block_others(env):
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    try:
        s.sendall(head(env, method="POST", extra=[("Content-Length", "1000")]) + b"x")
        for _ in range(20):
            t0 = time.monotonic()
            assert send_raw(env.port, head(env)).status == 200
            assert time.monotonic() - t0 < 1.0
    finally:
        s.close()


# -- config ------------------------------------------------------------------------------------
def test_limits_are_read_from_config_and_checked():
    limits = Limits.from_config(Config(data={"stagedoor": {"limits": {
        "maxHeaderBytes": 1000, "maxHeaderCount": 5, "maxBodyBytes": 10,
        "headerTimeoutSeconds": 1.5, "streamResponseBytes": 0}}}))
    assert limits == Limits(1000, 5, 10, 1.5, 0)
    assert Limits.from_config(Config(data={})) == Limits()
    for bad in (-1, "many", float("nan"), 1 << 50):
        with pytest.raises(ConfigError, match=r"stagedoor\.limits\.maxBodyBytes"):
            Limits.from_config(Config(data={"stagedoor": {"limits": {"maxBodyBytes": bad}}}))


def test_sidecar_survived_the_limits(env):
    assert env.alive() and env.healthy()
    assert not env.crash_lines(), env.crash_lines()
