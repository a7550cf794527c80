"""Edge hygiene through a real sidecar, over raw sockets (issue 13; docs/security.md).

Each case in ``EDGE_CASES`` (tests/hardening.py) goes on the wire byte for byte; the test asserts
the status the client got and what the recording upstream received. A forwarded request head is
replayed into Python's ``http.server`` parser and read as a WSGI environ would: no client-set
protected field may arrive in any spelling. Around the table: ``Expect: 100-continue``,
upstream trailers, a TLS handshake on the plain listener, the parser's error page, idle and
slow-body timeouts, client aborts (499), and the in-flight gauge back to zero without a crash.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from .hardening import (
    EDGE_CASES,
    MAX_BODY_BYTES,
    EdgeCase,
    HardEnv,
    error_shape_problem,
    replay_http_server,
    wsgi_environ_names,
)

pytestmark = pytest.mark.e2e

IDLE_TIMEOUT = 1.5
BODY_TIMEOUT = 2.0
PRINCIPAL = "user:default/jane"
_ADMIN_LINE = re.compile(r"admin listening on (http://[0-9.]+:\d+)")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardEnv]:
    e = HardEnv(tmp_path_factory.mktemp("hard-edge"),
                extra_config=f"    idleTimeoutSeconds: {IDLE_TIMEOUT}\n"
                             f"    bodyTimeoutSeconds: {BODY_TIMEOUT}\n", access_log=True)
    yield e
    e.stop()


# -- helpers -----------------------------------------------------------------------------------
class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, *args: object, **kw: object) -> io.BytesIO:
        return io.BytesIO(self.data)


def parse_responses(data: bytes, method: str = "GET") -> list[http.client.HTTPResponse]:
    """Every response in ``data`` (1xx interim ones included), in order."""
    out = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        rest = stream.read()
        resp = http.client.HTTPResponse(_Bytes(rest), method=method)  # type: ignore[arg-type]
        try:
            resp.begin()
        except (http.client.HTTPException, ValueError):
            break
        if 100 <= resp.status < 200:
            out.append(resp)
            consumed = rest.index(b"\r\n\r\n") + 4
            stream = io.BytesIO(rest[consumed:])
            data = rest[consumed:]
            continue
        resp.body = resp.read()  # type: ignore[attr-defined]
        out.append(resp)
        break
    return out


#: How long to keep reading for the close after a whole final answer that said
#: ``Connection: close`` (nothing may follow it on that connection). A refusal of a request whose
#: body is still coming (a 413 from the head, a 401 before the body) says so but leaves the
#: connection open; the read used to wait out the whole ``timeout`` (10 s) for it. Anything the
#: proxy still sends within this grace is read and checked, and the callers check the upstream
#: for a forward afterwards, as before.
AFTER_CLOSE_ANSWER_GRACE = 1.0
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection: *close\r\n", re.IGNORECASE)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)\r\n", re.IGNORECASE)


def _closing_answer_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole final (non-1xx) response with a Content-Length and
    ``Connection: close`` (after any interim and keep-alive responses before it)."""
    rest = data
    while True:
        head, sep, body = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        head += b"\r\n"
        status = head.split(b" ", 2)[1:2]
        if status and status[0].startswith(b"1"):  # an interim answer: the final one follows
            rest = body
            continue
        length = _CONTENT_LENGTH.search(head)
        if length is None or len(body) < int(length.group(1)):
            return False
        if _CONNECTION_CLOSE.search(head):
            return True
        rest = body[int(length.group(1)):]  # a keep-alive answer: a pipelined one may follow


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send ``raw`` (from another thread, so an early answer is read while the rest is still
    going out) and read until the proxy closes (or for ``AFTER_CLOSE_ANSWER_GRACE`` after a
    whole answer that said ``Connection: close``); everything it sent. No half-close: mitmproxy
    takes a FIN from the client as "not interested in an answer"."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(raw)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    deadline = time.monotonic() + timeout
    answered = False
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            if not answered and _closing_answer_complete(bytes(received)):
                answered = True
                deadline = min(deadline, time.monotonic() + AFTER_CLOSE_ANSWER_GRACE)
                sock.settimeout(AFTER_CLOSE_ANSWER_GRACE)
    except OSError:
        pass
    finally:
        if answered:  # a sender still blocked on a proxy that stopped reading gets an error
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout)
        sock.close()
    return bytes(received)


def admin_url(env: HardEnv) -> str:
    for line in env.sidecar.stderr_lines:
        match = _ADMIN_LINE.search(line)
        if match:
            return match.group(1)
    raise AssertionError("no admin listener line in stderr")


def metric(env: HardEnv, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    with urllib.request.urlopen(admin_url(env) + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def wait_for(predicate, timeout: float = 8.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def assert_clean_forward(case: EdgeCase, env: HardEnv, seen: list) -> None:  # type: ignore[type-arg]
    """What reached the upstream, as ``http.server`` and WSGI read it, holds nothing a client
    set in a protected field."""
    assert len(seen) == 1, (case.label, [s.target for s in seen])
    (s,) = seen
    assert s.target.startswith("/v1/"), s.target
    headers = replay_http_server(s.raw_head)
    assert headers is not None, f"http.server refused the forwarded head {s.raw_head[:300]!r}"
    environ = wsgi_environ_names(headers)
    assert not [k for k in headers if "_" in k], headers.items()
    assert environ.get("HTTP_X_STAGEDOOR_PRINCIPAL", [PRINCIPAL])[0] == PRINCIPAL
    assert len(environ.get("HTTP_X_STAGEDOOR_PRINCIPAL", [])) <= 1
    assert environ.get("HTTP_X_STAGEDOOR_PRINCIPAL_TYPE", ["user"]) == ["user"]
    assert environ.get("HTTP_X_FORWARDED_FOR") == ["127.0.0.1"], environ
    assert len(environ.get("HTTP_X_FORWARDED_HOST", [])) <= 1
    assert environ.get("HTTP_X_FORWARDED_HOST", ["127.0.0.1"]) != ["admin.internal"]
    assert environ.get("HTTP_X_FORWARDED_PROTO") == ["http"]
    assert environ.get("HTTP_VIA") == ["1.1 stagedoor"], environ.get("HTTP_VIA")
    for forbidden in ("HTTP_AUTHORIZATION", "HTTP_AUTHOR_IZATION", "HTTP_X_REAL_IP",
                      "HTTP_X_HTTP_METHOD_OVERRIDE", "HTTP_X_ORIGINAL_URL", "HTTP_X_CUSTOM_NOTE"):
        assert forbidden not in environ, (forbidden, environ)
    assert environ.get("HTTP_X_REQUEST_ID", ["x"]) != ["forged-id"]
    assert b"user:default/admin" not in s.raw_head
    assert b"10.0.0.1" not in s.raw_head and b"\r" not in s.raw_head.replace(b"\r\n", b"")
    assert s.trailers == [], s.trailers
    if case.body is not None:
        assert s.body == case.body


# -- the table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", EDGE_CASES, ids=[f"{c.family}: {c.label}" for c in EDGE_CASES])
def test_edge_table(env, case: EdgeCase):
    before = len(env.up.requests())
    answer = exchange(env.port, case.raw.replace(b"{T}", env.token.encode()))
    responses = parse_responses(answer, case.raw.split(b" ", 1)[0].decode())
    assert responses, f"{case.label}: no answer at all ({answer[:200]!r})"
    final = responses[-1]
    assert all(r.status != 100 for r in responses) or final.status < 400, case.label
    assert final.status in case.statuses, (case.label, final.status, final.body[:300])
    assert final.getheader("server") is None, final.getheader("server")
    seen = env.up.requests()[before:]
    if final.status >= 400:
        import json

        assert final.getheader("content-type") == "application/json; charset=utf-8"
        assert error_shape_problem(json.loads(final.body), final.status) is None, final.body
        assert seen == [], (case.label, [s.target for s in seen])
    elif case.forward == "clean":
        assert_clean_forward(case, env, seen)
    else:
        pytest.fail(f"{case.label}: answered {final.status}, expected a refusal")


# -- around the table --------------------------------------------------------------------------
def test_expect_continue_without_credentials_gets_the_refusal_not_100(env):
    before = len(env.up.requests())
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    try:
        sock.sendall(b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 60000\r\n\r\n")
        first = sock.recv(65536)  # no body is sent: the answer must come from the head alone
    finally:
        sock.close()
    assert first.startswith(b"HTTP/1.1 401 "), first[:200]
    assert b"Connection: close" in first
    assert env.up.requests()[before:] == []


def test_expect_continue_with_credentials_gets_100_then_the_answer(env):
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    try:
        sock.sendall(b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + env.token.encode() + b"\r\nExpect: 100-continue\r\nContent-Length: 5\r\n"
                     b"Connection: close\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 100 "), first[:200]
        sock.sendall(b"hello")
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    finally:
        sock.close()
    (resp,) = parse_responses(rest, "POST")
    assert resp.status == 200


def test_upstream_trailers_are_dropped_and_the_answer_arrives(env):
    answer = exchange(env.port, b"GET /api/fixture/fault/trailers HTTP/1.1\r\nHost: x\r\n"
                                b"Connection: close\r\n\r\n")
    (resp,) = parse_responses(answer)
    assert resp.status == 200, resp.body  # type: ignore[attr-defined]
    assert resp.body == b'{"a":1}'  # type: ignore[attr-defined]
    assert b"X-Checksum" not in answer and b"upstream-trailer" not in answer
    assert not env.crash_lines()


def test_tls_handshake_on_the_plain_listener_is_refused(env):
    before = len(env.up.requests())
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    with pytest.raises((ssl.SSLError, OSError)), \
            context.wrap_socket(raw, server_hostname="admin.internal") as tls:
        tls.sendall(b"GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n\r\n")
        tls.recv(100)
    raw.close()
    assert env.up.requests()[before:] == []
    assert metric(env, "stagedoor_edge_events_total", cause="tls_refused") >= 1


@pytest.mark.parametrize("raw", [
    pytest.param(b"GARBAGE\r\n\r\n", id="not a request line"),
    pytest.param(b"GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                 id="negative Content-Length"),
    pytest.param(b"GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n: empty name\r\n\r\n",
                 id="empty field name"),
])
def test_parser_error_pages_are_json_without_a_server_header(env, raw):
    answer = exchange(env.port, raw)
    (resp,) = parse_responses(answer)
    assert resp.status == 400
    assert resp.getheader("content-type") == "application/json; charset=utf-8"
    assert resp.getheader("server") is None
    assert b"mitmproxy" not in answer.lower()


def test_idle_keep_alive_connection_is_closed(env):
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    try:
        sock.sendall(b"GET /api/fixture/open/abc HTTP/1.1\r\nHost: x\r\n\r\n")
        data = sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        rest = b""
        while chunk := sock.recv(65536):  # the proxy closes it: recv returns b""
            rest += chunk
        assert time.monotonic() - started < 9
    finally:
        sock.close()
    assert metric(env, "stagedoor_edge_events_total", cause="idle_timeout") >= 1


def test_slow_body_gets_408_and_the_connection_closes(env):
    before = len(env.up.requests())
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    try:
        sock.sendall(b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + env.token.encode() + b"\r\nContent-Length: 100\r\n\r\nonly ten b")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    (resp,) = parse_responses(data, "POST")
    assert resp.status == 408, data[:300]
    assert env.up.requests()[before:] == []
    assert wait_for(lambda: any(r.get("status") == 408 and r.get("check") == "client"
                                for r in env.sidecar.access_log()))


def test_client_abort_is_499_not_an_upstream_502(env):
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    sock.sendall(b"GET /api/fixture/fault/slow-head HTTP/1.1\r\nHost: x\r\n"
                 b"X-Request-Id: abort-me-1\r\n\r\n")
    assert wait_for(lambda: any(s.target == "/fault/slow-head" for s in env.up.requests()))
    sock.close()  # with the request in flight upstream

    def logged() -> list[dict]:  # type: ignore[type-arg]
        return [r for r in env.sidecar.access_log() if r.get("request_id") == "abort-me-1"]

    assert wait_for(lambda: bool(logged()))
    (record,) = logged()
    assert (record["status"], record["check"]) == (499, "client"), record
    assert record["reason"] == "client_abort", record  # what an operator greps for
    assert metric(env, "stagedoor_requests_total", status="499", check="client") >= 1
    assert metric(env, "stagedoor_requests_total", status="502", check="upstream") == 0


# -- on the way out: Date, HTTP/1.0 framing, interim answers (RFC 9110 §6.6.1, §15.2; 9112 §6.1) --
@pytest.mark.parametrize("raw", [
    pytest.param(b"GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                 id="a local 401"),
    pytest.param(b"GET /api/fixture/fault/no-date HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"\r\n", id="a forwarded answer that had no Date"),
    pytest.param(b"BROKEN\r\n\r\n", id="the parser's 400"),
])
def test_every_answer_carries_a_date(env, raw):
    (resp,) = parse_responses(exchange(env.port, raw))
    date = resp.getheader("date")
    assert date is not None and date.endswith(" GMT"), resp.getheaders()
    import email.utils

    assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 60


def test_an_http10_client_never_gets_a_chunked_answer(env):
    answer = exchange(env.port, b"GET /api/fixture/fault/trailers HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower(), head
    assert b"\r\nContent-Length: 7" in head and body == b'{"a":1}'


def test_an_http10_connection_is_never_kept_alive(env):
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    try:
        sock.sendall(b"GET /api/fixture/open/abc HTTP/1.0\r\nHost: x\r\n"
                     b"Connection: keep-alive\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):  # b"" once the proxy closed it, long before idle
            data += chunk
    finally:
        sock.close()
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert data.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head
    assert b"keep-alive" not in head


def test_interim_answers_reach_http11_clients_and_never_desync_a_connection(env):
    answer = exchange(env.port, b"GET /api/fixture/fault/early-hints HTTP/1.1\r\nHost: x\r\n\r\n"
                                b"GET /api/fixture/fault/ok HTTP/1.1\r\nHost: x\r\n"
                                b"Connection: close\r\n\r\n")
    responses = parse_responses(answer)
    assert [r.status for r in responses] == [103, 200], answer[:500]
    assert responses[0].getheader("link") == "</a.css>; rel=preload"
    assert responses[1].body == b'{"b": 2}'  # type: ignore[attr-defined]
    # the second request's answer comes after, whole: nothing shifted by one
    assert answer.count(b"HTTP/1.1 200 ") == 2 and answer.endswith(b'"target": "/fault/ok"}')


def test_interim_answers_are_never_sent_to_http10_clients(env):
    answer = exchange(env.port, b"GET /api/fixture/fault/early-hints HTTP/1.0\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b" 103 " not in answer and answer.endswith(b'{"b": 2}')


def test_expect_in_http10_is_ignored_no_100_is_sent(env):
    answer = exchange(env.port, b"POST /api/fixture/items/abc HTTP/1.0\r\nHost: x\r\n"
                                b"Authorization: Bearer " + env.token.encode()
                      + b"\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b" 100 " not in answer


def test_control_bytes_in_upstream_answer_headers_never_reach_the_client(env):
    answer = exchange(env.port, b"GET /api/fixture/fault/bad-header HTTP/1.1\r\nHost: x\r\n"
                                b"Connection: close\r\n\r\n")
    head = answer.partition(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 200 ")
    assert not any(b"\r" in line or b"\n" in line or b"\x00" in line for line in lines)
    assert not any(line.lower().startswith(b"set-cookie") for line in lines), lines
    (resp,) = parse_responses(answer)
    assert resp.getheader("x-cr") == "a Set-Cookie: injected=1"


def test_in_flight_returns_to_zero_and_nothing_crashed(env):
    assert wait_for(lambda: metric(env, "stagedoor_requests_in_flight") == 0)
    assert env.alive() and env.healthy()
    assert not env.crash_lines(), env.crash_lines()
    assert metric(env, "stagedoor_edge_events_total", cause="trailers_dropped_request") >= 1
    assert metric(env, "stagedoor_edge_events_total", cause="trailers_dropped_response") >= 1
    assert metric(env, "stagedoor_edge_events_total", cause="chunk_line_too_long") >= 1
    assert metric(env, "stagedoor_edge_events_total", cause="underscore_field_dropped") >= 1


# -- a refusal sent before the body: the connection does not outstay it -------------------------
@pytest.fixture(scope="module")
def patient_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardEnv]:
    """The default idle and body timeouts (60 s): only the linger rule can close in seconds."""
    e = HardEnv(tmp_path_factory.mktemp("hard-edge-patient"), access_log=True)
    yield e
    e.stop()


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """Everything the proxy sends, and whether it closed the connection within ``seconds``."""
    received = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return received, False
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


@pytest.mark.parametrize("sent", [
    pytest.param(1_000, id="the client stops half-way"),
    pytest.param(MAX_BODY_BYTES // 2, id="the client sends the whole body"),
])
def test_a_refusal_before_the_body_closes_the_connection_without_waiting_for_the_idle_timeout(
        patient_env, sent):
    """401 from the head, Connection: close; the body is dropped as it comes and the connection
    closed once it stops (edge.LINGER_SECONDS, 5 s), not held for the 60 s idle timeout."""
    before = len(patient_env.up.requests())
    sock = socket.create_connection(("127.0.0.1", patient_env.port), timeout=10)
    try:
        sock.sendall(b"POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES // 2))
        sock.sendall(b"x" * sent)
        received, closed = _closed_within(sock, 30)
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 401 "), received[:200]
    assert b"Connection: close" in received
    assert closed, "the connection was still open 30 s after the refusal (idle timeout 60 s)"
    assert patient_env.up.requests()[before:] == []
