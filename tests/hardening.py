"""Shared parts of the adversarial suite (tests/test_hardening_*.py, tests/soak.py).

- :class:`FaultUpstream`: an upstream on 127.0.0.1 that parses HTTP/1.1 itself (Content-Length
  *and* chunked, keep-alive), records the raw request line of every request it sees, and
  misbehaves on demand by path (garbage, resets, slowness, huge bodies). Because it frames
  requests itself, a request smuggled inside another one's body shows up as an extra record.
- :class:`HardEnv`: one ``stagedoor run`` process with the ``fixture`` policy below, limits
  from config, real ES256 user tokens and a real JWKS endpoint.
- :func:`producible`: the path invariant. An upstream target is acceptable only if some route's
  upstream template produces it from parameter values that pass that route's checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import socketserver
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from stagedoor.config import Config
from stagedoor.devkeys import DevKey, mint_user_token
from stagedoor.policy import PolicySet, load_policies

from .conftest import ROOT, Sidecar, closed_port, start_sidecar, write_config
from .httpraw import RawResponse, request

JSON_TYPE = "application/json; charset=utf-8"
USER_JWKS = "/api/auth/.well-known/jwks.json"

# Limits the hardening sidecar runs with (small, so the tests stay fast).
MAX_HEADER_BYTES = 16384
MAX_HEADER_COUNT = 50
MAX_BODY_BYTES = 64 * 1024
STREAM_RESPONSE_BYTES = 256 * 1024
HEADER_TIMEOUT = 2.0
LEGACY_SECRET = "YS1sZWdhY3ktc2hhcmVkLXNlY3JldC0zMi1ieXRlcyE="
STATIC_TOKEN = "static-token-0123456789abcdef"
EXT_JWKS = "/ext/jwks.json"
EXT_ISSUER = "https://ext-idp.test"
HUGE_BODY_BYTES = 64 * 1024 * 1024  # what /fault/huge answers: far past every buffer

FIXTURE_POLICY = """\
pluginId: fixture
timeout: 5s
routes:
  - path: /items/{name}
    methods: [GET, POST, PUT, DELETE]
    auth: [user, service]
    params:
      name: {pattern: '^[a-z0-9-]{1,64}$', message: 'Invalid item: {value}'}
    upstream: ${hard.upstreamUrl}/v1/items/{name}
  - path: /loose/{value}
    methods: [GET, POST]
    auth: [user]
    params:
      value: {pattern: '^.+$', message: 'Invalid value: {value}'}
    upstream: ${hard.upstreamUrl}/v1/loose/{value}/end
  - path: /pair/{a}/and/{b}
    auth: [user]
    params:
      a: {pattern: '^[a-z]+$'}
      b: {pattern: '^[0-9]+$'}
    upstream: ${hard.upstreamUrl}/v1/pair/{b}/{a}
  - path: /open/{value}
    methods: [GET, POST]
    auth: unauthenticated
    params:
      value: {pattern: '^[A-Za-z0-9._~-]+$'}
    upstream: ${hard.upstreamUrl}/v1/open/{value}
  - path: /admin
    auth: [service]
    upstream: ${hard.upstreamUrl}/v1/admin
  - path: /fault/{kind}
    methods: [GET, POST]
    auth: unauthenticated
    timeout: 1s
    params:
      kind: {pattern: '^[a-z-]{1,20}$'}
    upstream: ${hard.upstreamUrl}/fault/{kind}
  - path: /refused
    auth: unauthenticated
    upstream: ${hard.refusedUrl}/refused
"""


# -- the upstream ------------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""  # the request line and header lines exactly as they arrived
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Handler(socketserver.BaseRequestHandler):
    server: FaultUpstream

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        reader = sock.makefile("rb")
        with contextlib.suppress(OSError, ValueError):
            while not self.server.stopping:
                line = reader.readline(65537)
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    continue
                parts = line.decode("latin-1").rstrip("\r\n").split(" ")
                headers: list[tuple[str, str]] = []
                raw = bytearray(line)
                while True:
                    h = reader.readline(65537)
                    raw += h
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    headers.append((name.strip(), value.strip()))
                seen = Seen(parts[0] if parts else "", parts[1] if len(parts) > 1 else "",
                            headers, b"", bytes(raw))
                lower = {k.lower(): v for k, v in headers}
                if "chunked" in lower.get("transfer-encoding", "").lower():
                    body = bytearray()
                    while True:
                        size = int(reader.readline(1024).split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while (t := reader.readline(1024)) not in (b"\r\n", b"\n", b""):
                                name, _, value = t.decode("latin-1").partition(":")
                                seen.trailers.append((name.strip(), value.strip()))
                            break
                        body += reader.read(size)
                        reader.readline(16)
                    seen.body = bytes(body)
                elif "content-length" in lower:
                    seen.body = reader.read(int(lower["content-length"]))
                with self.server.lock:
                    self.server.seen.append(seen)
                if not self._answer(sock, seen):
                    return

    def _send(self, sock: socket.socket, status: int, body: bytes,
              ctype: str = "application/json", extra: str = "") -> None:
        head = (f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nX-Upstream: yes\r\n{extra}\r\n")
        sock.sendall(head.encode("latin-1") + (b"" if self._head else body))

    def _answer(self, sock: socket.socket, seen: Seen) -> bool:
        """Answer one request; False closes the connection."""
        self._head = seen.method == "HEAD"
        kind = seen.target.partition("?")[0].removeprefix("/fault/")
        if seen.target.endswith("jwks.json"):
            doc = self.server.jwks_by_path.get(seen.target.partition("?")[0])
            if doc is None:
                self._send(sock, 404, b"{}")
            elif isinstance(doc, bytes):
                self._send(sock, 200, doc)
            elif doc == "slow":
                # Far slower than the sidecar's JWKS timeout (1 s in the fixture): an answer
                # well before this proves the timeout cut the fetch short.
                time.sleep(self.server.jwks_slow_seconds)
                return False
            elif doc == "reset":
                _reset(sock)
                return False
            else:
                self._send(sock, 200, json.dumps(doc).encode())
            return True
        if not seen.target.startswith("/fault/") or kind == "ok":
            body = json.dumps({"upstream": True, "method": seen.method,
                               "target": seen.target}).encode()
            self._send(sock, 200, body)
            return True
        if kind == "garbage":
            sock.sendall(b"\x00\x01SSH-2.0-OpenSSH_9.6 not http at all\r\n\r\n" * 4)
            return False
        if kind == "reset-head":
            _reset(sock)
            return False
        if kind == "reset-body":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n{\"partial\": ")
            time.sleep(0.05)
            _reset(sock)
            return False
        if kind == "close-early":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nshort")
            return False
        if kind == "slow-head":
            time.sleep(self.server.slow_seconds)
            return False
        if kind == "slow-body":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")
            deadline = time.monotonic() + self.server.slow_seconds
            while time.monotonic() < deadline and not self.server.stopping:
                time.sleep(0.2)
            return False
        if kind == "empty":
            return False  # close without a byte
        if kind == "early-hints":  # an interim 1xx answer before the final one
            sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 8\r\n\r\n{\"b\": 2}")
            return True
        if kind == "bad-header":  # control bytes and an obs-fold in answer header values
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"X-Cr: a\rSet-Cookie: injected=1\r\nX-Nul: a\x00b\r\n"
                         b"X-Fold: a\r\n Set-Cookie: folded=1\r\nContent-Length: 2\r\n\r\n{}")
            return True
        if kind == "no-date":  # (every answer of this upstream comes without Date)
            self._send(sock, 200, b"{}")
            return True
        if kind == "trailers":  # a chunked answer with a trailer section
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum, Set-Cookie\r\n"
                         b"\r\n7\r\n{\"a\":1}\r\n0\r\nX-Checksum: abc\r\n"
                         b"Set-Cookie: session=upstream-trailer\r\n\r\n")
            return True
        if kind in ("huge", "huge-chunked"):
            chunk = b"x" * 65536
            chunked = kind == "huge-chunked"
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    + (b"Transfer-Encoding: chunked\r\n" if chunked
                       else f"Content-Length: {HUGE_BODY_BYTES}\r\n".encode()) + b"\r\n")
            sock.sendall(head)
            sent = 0
            while sent < HUGE_BODY_BYTES and not self.server.stopping:
                data = chunk[: HUGE_BODY_BYTES - sent]
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
                with self.server.lock:
                    self.server.huge_sent = sent
                if self.server.pause_huge_at and sent == self.server.pause_huge_at:
                    self.server.release.wait(15)  # the test checks bytes arrive meanwhile
            if chunked:
                sock.sendall(b"0\r\n\r\n")
            return True
        self._send(sock, 500, b'{"unknown": true}')
        return True


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


class FaultUpstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.slow_seconds = 3.0
        self.jwks_slow_seconds = 30.0
        self.huge_sent = 0
        self.pause_huge_at = 0  # /fault/huge*: stop after this many bytes until ``release``
        self.release = threading.Event()
        self.jwks_by_path: dict[str, Any] = {}
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def requests(self) -> list[Seen]:
        """What reached the upstream, JWKS fetches left out."""
        with self.lock:
            return [s for s in self.seen if not s.target.endswith("jwks.json")]

    def stop(self) -> None:
        self.stopping = True
        self.shutdown()
        self.server_close()


# -- the path invariant ------------------------------------------------------------------------
def _template_regex(pieces: Iterable[tuple[bool, str]]) -> re.Pattern[str]:
    out = []
    for is_param, text in pieces:
        out.append(f"(?P<{text}>[^/?#]*)" if is_param else re.escape(text))
    return re.compile("".join(out))


def producible(policies: PolicySet, upstream_url: str, target: str) -> str | None:
    """None when ``target`` (as the upstream saw it) is what some route's upstream template
    makes from parameter values that pass that route's checks; else why not."""
    path = target.partition("?")[0]
    for plugin in policies.plugins.values():
        for route in plugin.routes:
            up = route.upstream
            if up is None or not upstream_url.endswith(f"{up.host}:{up.port}"):
                continue
            match = _template_regex(up.path_pieces).fullmatch(path)
            if match is None:
                continue
            ok = True
            for name, raw in match.groupdict().items():
                try:
                    value = unquote_to_bytes(raw).decode("utf-8")
                except UnicodeDecodeError:
                    ok = False
                    break
                if route.params[name].check(value) is not None or quote(value, safe="") != raw:
                    ok = False
                    break
            if ok:
                return None
    return f"no route template produces {path!r}"


# -- the environment ---------------------------------------------------------------------------
def hard_config(up: FaultUpstream, extra: str = "", access_log: bool = False) -> str:
    return f"""\
backend:
  baseUrl: {up.url}
  auth:
    externalAccess:
      - type: static
        options: {{token: {STATIC_TOKEN}, subject: ci-bot}}
        accessRestrictions:
          - plugin: insights
      - type: legacy
        options: {{secret: "{LEGACY_SECRET}", subject: legacy-caller}}
      - type: jwks
        options:
          url: {up.url}{EXT_JWKS}
          issuer: {EXT_ISSUER}
          algorithm: RS256
          audience: stagedoor
insights:
  externalApiUrl: {up.url}
hard:
  upstreamUrl: {up.url}
  refusedUrl: http://127.0.0.1:{closed_port()}
stagedoor:
  accessLog:
    enabled: {"true" if access_log else "false"}
  auth:
    jwksRefetchIntervalSeconds: 1
    jwksTimeoutSeconds: 1
  limits:
    maxHeaderBytes: {MAX_HEADER_BYTES}
    maxHeaderCount: {MAX_HEADER_COUNT}
    maxBodyBytes: {MAX_BODY_BYTES}
    streamResponseBytes: {STREAM_RESPONSE_BYTES}
    headerTimeoutSeconds: {HEADER_TIMEOUT}
{extra}"""


class HardEnv:
    """One sidecar in front of one :class:`FaultUpstream`, for a test module."""

    def __init__(self, tmp: Path, extra_config: str = "", access_log: bool = False) -> None:
        self.tmp = tmp
        self.up = FaultUpstream()
        self.user_key = DevKey.generate("ES256", kid="user-1")
        self.ext_key = DevKey.generate("RS256", kid="ext-1")
        self.up.jwks_by_path[USER_JWKS] = self.user_key.jwks()
        self.up.jwks_by_path[EXT_JWKS] = self.ext_key.jwks()
        self.issuer = f"{self.up.url}/api/auth"
        self.policy_dir = tmp / "policies"
        self.policy_dir.mkdir()
        shutil.copy(ROOT / "policies" / "insights.yaml", self.policy_dir / "insights.yaml")
        (self.policy_dir / "fixture.yaml").write_text(FIXTURE_POLICY)
        self.config_file = write_config(tmp / "app-config.yaml",
                                        hard_config(self.up, extra_config, access_log))
        self.policies = load_policies(self.policy_dir, Config(data={
            "hard": {"upstreamUrl": self.up.url, "refusedUrl": "http://127.0.0.1:1"},
            "insights": {"externalApiUrl": self.up.url}}))
        self.sidecar: Sidecar = start_sidecar([self.config_file], self.policy_dir)
        self.token = self.user_token()
        self._wait_for_user_keys()

    def _wait_for_user_keys(self, timeout: float = 30.0) -> None:
        """Until the sidecar holds the user keys: its start-up fetch has a 1 s timeout
        (jwksTimeoutSeconds), which a busy machine can miss; a test must not start then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.call("/api/fixture/items/abc", self.token).status != 503:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the sidecar never got the user keys:\n"
                           + "\n".join(self.sidecar.stderr_lines[-20:]))

    @property
    def port(self) -> int:
        return self.sidecar.port

    @property
    def pid(self) -> int:
        return self.sidecar.proc.pid

    def user_token(self, **kw: Any) -> str:
        kw.setdefault("issuer", self.issuer)
        return mint_user_token(kw.pop("key", self.user_key), **kw)

    def call(self, target: str, token: str | None = None, method: str = "GET",
             headers: dict[str, str] | None = None, **kw: Any) -> RawResponse:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        return request(self.port, method, target, all_headers, **kw)

    def healthy(self) -> bool:
        try:
            return request(self.port, "GET", "/api/insights/health", timeout=5).status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.sidecar.proc.poll() is None

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def crash_lines(self) -> list[str]:
        """stderr lines that mean something went wrong inside the proxy."""
        bad = ("Traceback", "internal error", "has crashed", "Unhandled", "Exception in")
        return [line for line in self.sidecar.stderr_lines if any(b in line for b in bad)]

    def stop(self) -> None:
        self.sidecar.stop()
        self.up.stop()


def is_json_error(resp: RawResponse, status: int | None = None) -> bool:
    """The error shape of docs/behaviour.md: exactly error{name,message}, request{method,url},
    response{statusCode}, as application/json; charset=utf-8."""
    if status is not None and resp.status != status:
        return False
    if resp.header("content-type") != JSON_TYPE:
        return False
    try:
        body = resp.json()
    except ValueError:
        return False
    return error_shape_problem(body, resp.status) is None


def error_shape_problem(body: Any, status: int) -> str | None:
    if not isinstance(body, dict) or set(body) != {"error", "request", "response"}:
        return f"top-level keys {sorted(body) if isinstance(body, dict) else type(body)}"
    err, req, res = body["error"], body["request"], body["response"]
    if not (isinstance(err, dict) and set(err) == {"name", "message"}
            and isinstance(err["name"], str) and isinstance(err["message"], str)
            and err["name"]):
        return f"bad error object {err!r}"
    if not (isinstance(req, dict) and set(req) == {"method", "url"}
            and isinstance(req["method"], str) and isinstance(req["url"], str)):
        return f"bad request object {req!r}"
    if res != {"statusCode": status}:
        return f"bad response object {res!r} for status {status}"
    if "stack" in json.dumps(body):
        return "a stack in the body"
    return None


@dataclass
class Tally:
    """Counts per category, for docs/security.md."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, category: str, n: int = 1) -> None:
        self.counts[category] = self.counts.get(category, 0) + n


# == the tables ===================================================================================
# Everything below is data; tests/test_hardening_*.py run it and docs/security.md counts it
# (``python -m tests.hardening`` prints the counts; ``--write`` updates the doc).

#: Raw path-segment payloads, as they go on the wire (a str is sent as latin-1 bytes, so
#: "\x00" is a raw NUL and "\xe9" a raw 0xE9 byte).
PATH_PAYLOADS: dict[str, list[str]] = {
    "dot segments": [".", "..", "...", "%2e", "%2E", "%2e%2e", "%2E%2e", ".%2e", "%2e.",
                     "..;", ".;", "%2e%2e;x"],
    "double encoding": ["%252e%252e", "%252e", "%252f", "%25252e", "%%32%65", "%%32%66",
                        "%2%65", "%u002e%u002e", "%c0%2e"],
    "slashes": ["%2f", "%2F", "a%2fb", "%2f%2f", "..%2f", "%2e%2e%2f", "%5c", "%5C", "\\",
                "..\\", "%5c..%5c", "a/b"],
    "overlong and invalid UTF-8": ["%c0%ae", "%c0%ae%c0%ae", "%e0%80%ae", "%f0%80%80%ae",
                                   "%c0%af", "%c1%9c", "%c1%1c", "%ed%a0%80", "%ff", "%fe%ff",
                                   "%e2%82", "%80", "\xe9", "\xc0\xae"],
    "NUL and control bytes": ["%00", "a%00b", "%0a", "%0d%0a", "%0d%0aX-Injected:%201", "%09",
                              "%7f", "%1b", "%08", "\x00", "\x01", "\x7f", "\x1b[31m"],
    "semicolon parameters": [";", "abc;x=1", "abc;", ";abc", "%3b", "abc%3Bjsessionid=1",
                             "abc;/..", "abc;%2f.."],
    "fragments and query marks": ["#", "abc#frag", "%23", "abc%23x", "%3f", "abc%3F..", "?",
                                  "abc?x=/..", "abc?#"],
    "unicode look-alikes": ["%ef%bc%8e%ef%bc%8e", "%e2%80%ae", "%e2%80%8b", "%c2%a0",
                            "%e2%81%84", "%ef%bc%8f", "%e2%88%95", "%cc%b8"],
    "whitespace": ["%20", "a%20b", "+", "%2b", "%09abc", "abc%20", "%e3%80%80"],
    "percent syntax": ["%", "%%", "%zz", "%2", "abc%", "%g0", "%-1"],
    "case and encoding of literals": ["ABC", "Abc", "%61bc", "%41BC", "a-b", "-", "0"],
}

#: Where a payload goes: (route label, template of the request target, upstream template).
#: ``{p}`` is the payload; ``{v}`` a valid value. Every route is in FIXTURE_POLICY.
PATH_POSITIONS: list[tuple[str, str]] = [
    ("strict value", "/api/fixture/items/{p}"),
    ("strict value suffix", "/api/fixture/items/abc{p}"),
    ("after strict value", "/api/fixture/items/abc/{p}"),
    ("loose value", "/api/fixture/loose/{p}"),
    ("loose value prefix", "/api/fixture/loose/{p}abc"),
    ("between literals", "/api/fixture/{p}/items/abc"),
    ("in a two-parameter route", "/api/fixture/pair/abc/and/{p}"),
    ("unauthenticated value", "/api/fixture/open/{p}"),
    ("plugin id", "/api/{p}/items/abc"),
]

#: Payloads per category that tests/test_hardening_paths.py sends through a real sidecar; the
#: whole table runs in process (tests/test_core_tables.py).
SMOKE_PAYLOADS = 3

#: Targets that must never reach an upstream, whatever else happens.
MUST_DENY_TARGETS: list[str] = [
    "/api/fixture/items/../admin",
    "/api/fixture/items/%2e%2e/admin",
    "/api/fixture/items/..%2fadmin",
    "/api/fixture/items/%2e%2e%2fadmin",
    "/api/fixture/items/abc/../../admin",
    "/api/fixture/./admin",
    "/api/fixture//admin",
    "/api/fixture/admin/",
    "/api/fixture/admin;",
    "/api/fixture/admin%00",
    "/api/fixture/%61dmin",
    "/api/fixture/ADMIN",
    "/api/fixture/loose/..",
    "/api/fixture/loose/%2e%2e",
    "/api/fixture/loose/a%2fb",
    "/api/fixture/loose/a%5cb",
    "/api/fixture/loose/%00",
    "/api/fixture/loose/" + "a" * 1025,
    "/api/fixture/pair/abc/AND/1",
    "/api/fixture/pair/ABC/and/1",
    "/api/fixture/pair/abc/and/1x",
    "/api/FIXTURE/items/abc",
    "/api/Fixture/items/abc",
    "/API/fixture/items/abc",
    "/api/fixture%2fitems/abc",
    "/api%2ffixture/items/abc",
    "//api/fixture/items/abc",
    "/api/fixture/items/abc#x",
    "/api/fixture/items/abc?x=1#frag",
    "/api/fixture/items/abc?x=\x00",
    "/api/fixture/items/abc?x=\x7f",
    "/api/fixture/items/abc?x=\xe9",
    "/v1/items/abc",
    "/v1/admin",
    "/fault/ok",
]
# /api/fixture/admin/ (trailing slash) and /api/fixture/%61dmin route to the admin route, which
# needs a service credential: with the user token these tests send, 403, never forwarded.

#: Long targets: (label, target, statuses that are acceptable).
def long_targets() -> list[tuple[str, str, frozenset[int]]]:
    ok_or_400 = frozenset({200, 400, 404})
    return [
        ("63 segments", "/api/fixture/items/abc" + "/x" * 60, frozenset({404})),
        ("64 segments", "/api/fixture/items/abc" + "/x" * 62, frozenset({404})),
        ("65 segments", "/api/fixture/items/abc" + "/x" * 63, frozenset({400, 404})),
        ("1000 segments", "/api/fixture/items" + "/x" * 1000, frozenset({400})),
        ("1000 empty segments", "/api/fixture/items" + "/" * 1000, frozenset({400})),
        ("1024-char value", "/api/fixture/loose/" + "a" * 1024, frozenset({200})),
        ("1025-char value", "/api/fixture/loose/" + "a" * 1025, frozenset({400})),
        ("8000-char value", "/api/fixture/loose/" + "b" * 8000, frozenset({400})),
        ("3000 %-escapes", "/api/fixture/loose/" + "%41" * 3000, frozenset({400})),
        ("8000-char query", "/api/fixture/items/abc?q=" + "c" * 8000, ok_or_400),
        ("request line over the head limit", "/api/fixture/loose/" + "d" * (MAX_HEADER_BYTES + 10),
         frozenset({414})),
        ("5000 dot segments", "/api/fixture/items" + "/.." * 5000, frozenset({400, 431})),
    ]


#: Non-origin-form request lines (absolute-form, authority-form, asterisk) must be refused;
#: odd but unambiguous request lines (after "# odd") may also be forwarded, to the template.
def target_forms(up_hostport: str) -> list[tuple[str, str, bool]]:
    """(label, request line, must be refused)."""
    rows = [
        ("absolute-form to the upstream", f"GET http://{up_hostport}/v1/items/abc HTTP/1.1"),
        ("absolute-form through the proxy",
         "GET http://127.0.0.1/api/fixture/items/abc HTTP/1.1"),
        ("absolute-form upper-case scheme", "GET HTTP://127.0.0.1/api/fixture/items/abc HTTP/1.1"),
        ("absolute-form https", f"GET https://{up_hostport}/v1/admin HTTP/1.1"),
        ("absolute-form with userinfo", f"GET http://a:b@{up_hostport}/v1/admin HTTP/1.1"),
        ("absolute-form other scheme", f"GET ftp://{up_hostport}/v1/admin HTTP/1.1"),
        ("absolute-form no path", f"GET http://{up_hostport} HTTP/1.1"),
        ("authority-form CONNECT", f"CONNECT {up_hostport} HTTP/1.1"),
        ("authority-form GET", f"GET {up_hostport} HTTP/1.1"),
        ("CONNECT to a plugin path", "CONNECT /api/fixture/items/abc HTTP/1.1"),
        ("asterisk-form OPTIONS", "OPTIONS * HTTP/1.1"),
        ("asterisk-form GET", "GET * HTTP/1.1"),
        ("scheme-relative", f"GET //{up_hostport}/v1/admin HTTP/1.1"),
        ("relative path", "GET api/fixture/items/abc HTTP/1.1"),
        ("empty target", "GET  HTTP/1.1"),
        ("HTTP/0.9 style", "GET /api/fixture/items/abc"),
        ("HTTP/2 preface", "PRI * HTTP/2.0"),
        ("space in target", "GET /api/fixture/items/a bc HTTP/1.1"),
    ]
    odd = [  # odd: mitmproxy reads these as the plain request, which is then judged as usual
        ("unknown version", "GET /api/fixture/items/abc HTTP/3.7"),
        ("HTTP/1.0", "GET /api/fixture/items/abc HTTP/1.0"),
        ("lower-case version", "GET /api/fixture/items/abc http/1.1"),
        ("tab separators", "GET\t/api/fixture/items/abc\tHTTP/1.1"),
        ("extra spaces", "GET  /api/fixture/items/abc  HTTP/1.1"),
    ]
    return [(label, line, True) for label, line in rows] + \
        [(label, line, False) for label, line in odd]


#: Host headers naming something else. The request is otherwise good, so the gateway either
#: refuses it outright or forwards it to exactly the route's upstream, with its own Host.
def host_cases(up_hostport: str, sidecar_hostport: str) -> list[tuple[str, list[str]]]:
    return [
        ("another service", ["internal-admin:8080"]),
        ("the upstream itself", [up_hostport]),
        ("the sidecar itself", [sidecar_hostport]),
        ("localhost", ["localhost"]),
        ("metadata address", ["169.254.169.254"]),
        ("IPv6 loopback", ["[::1]:80"]),
        ("with userinfo", [f"user@{up_hostport}"]),
        ("with a path", [f"{up_hostport}/v1/admin"]),
        ("empty", [""]),
        ("very long", ["h" * 2000]),
        ("upper-case", ["INTERNAL-ADMIN"]),
        ("two Host headers", ["a.example", "b.example"]),
        ("no Host header", []),
    ]


#: Methods, sent to a GET/POST/PUT/DELETE route with a good token.
METHOD_CASES = ["get", "Get", "GET ", "PATCH", "TRACE", "TRACK", "PROPFIND", "MKCOL", "FOO",
                "G", "M-SEARCH", "CONNECT", "OPTIONS", "HEAD", "X" * 300]


#: Request framing tricks (smuggling). ``{T}`` is replaced by the token. Each is one write;
#: whatever the proxy answers, the upstream must see no request except ones it may produce.
SMUGGLING_CASES: list[tuple[str, str]] = [
    ("CL.TE", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {T}\r\n"
              "Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
              "GET /v1/admin HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("TE.CL", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {T}\r\n"
              "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
              "2b\r\nGET /v1/admin HTTP/1.1\r\nHost: x\r\nX: GET /\r\n\r\n0\r\n\r\n"),
    ("two Content-Length", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
                           "Authorization: Bearer {T}\r\nContent-Length: 0\r\n"
                           "Content-Length: 30\r\n\r\nGET /v1/admin HTTP/1.1\r\nX: y\r\n\r\n"),
    ("Content-Length list", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
                            "Authorization: Bearer {T}\r\nContent-Length: 5, 5\r\n\r\nhello"),
    ("signed Content-Length", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
                              "Authorization: Bearer {T}\r\nContent-Length: +5\r\n\r\nhello"),
    ("hex Content-Length", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
                           "Authorization: Bearer {T}\r\nContent-Length: 0x5\r\n\r\nhello"),
    ("TE obfuscated: space before colon", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n"
     "0\r\n\r\n"),
    ("TE obfuscated: xchunked", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    ("TE obfuscated: chunked, identity", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    ("TE obfuscated: vertical tab", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n"),
    ("TE obfuscated: two headers", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity"
     "\r\n\r\n0\r\n\r\n"),
    ("chunk size overflow", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nTransfer-Encoding: chunked\r\n\r\n"
     "ffffffffffffffffff1\r\nx\r\n0\r\n\r\n"),
    ("chunk extension smuggling", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nTransfer-Encoding: chunked\r\n\r\n"
     "2;\nGET /v1/admin HTTP/1.1\r\nxx\r\n0\r\n\r\n"),
    ("bare LF line endings", "GET /api/fixture/items/abc HTTP/1.1\nHost: x\n"
     "Authorization: Bearer {T}\n\nGET /v1/admin HTTP/1.1\nHost: x\n\n"),
    ("obs-fold header", "GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nX-A: 1\r\n GET /v1/admin\r\n\r\n"),
    ("pipelined second request to the upstream path", "GET /api/fixture/items/abc HTTP/1.1\r\n"
     "Host: x\r\nAuthorization: Bearer {T}\r\n\r\nGET /v1/admin HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("pipelined second request with traversal", "GET /api/fixture/items/abc HTTP/1.1\r\n"
     "Host: x\r\nAuthorization: Bearer {T}\r\n\r\n"
     "GET /api/fixture/items/../admin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {T}\r\n\r\n"),
    ("GET with a body carrying a request", "GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nContent-Length: 36\r\n\r\n"
     "GET /v1/admin HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("Upgrade: h2c", "GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
     "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
    ("Upgrade: websocket", "GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
     "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"),
    ("Expect: 100-continue then a request", "POST /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"),
    ("NUL in a header value", "GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nX-A: a\x00b\r\n\r\n"),
    ("CR in a header value", "GET /api/fixture/items/abc HTTP/1.1\r\nHost: x\r\n"
     "Authorization: Bearer {T}\r\nX-A: a\rGET /v1/admin\r\n\r\n"),
]

#: Headers a client may set that must not reach the upstream (identity, overrides, hop-by-hop).
SPOOFED_HEADERS: list[tuple[str, str]] = [
    ("X-Stagedoor-Principal", "user:default/admin"),
    ("x-stagedoor-principal-type", "service"),
    ("X-Stagedoor-Anything", "x"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("X-Forwarded-Host", "admin.internal"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Prefix", "/v1/admin"),
    ("Forwarded", "for=10.0.0.1;host=admin.internal"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-Original-Method", "DELETE"),
    ("X-Original-URL", "/v1/admin"),
    ("X-Original-URI", "/v1/admin"),
    ("X-Rewrite-URL", "/v1/admin"),
    ("X-Override-URL", "/v1/admin"),
    ("X-Real-IP", "10.0.0.1"),
    ("True-Client-IP", "10.0.0.1"),
    ("X-Client-IP", "10.0.0.1"),
    ("X-Cluster-Client-IP", "10.0.0.1"),
    ("Client-IP", "10.0.0.1"),
    ("Proxy-Authorization", "Basic YTpi"),
    ("Keep-Alive", "timeout=600"),
    ("TE", "trailers"),
]

#: Upstream faults: (path under /api/fixture, status, error name). /fault/* routes time out
#: after 1 s; the fault upstream's slow answers take 3 s.
FAULT_CASES: list[tuple[str, int, str]] = [
    ("/refused", 502, "BadGatewayError"),
    ("/fault/garbage", 502, "BadGatewayError"),
    ("/fault/empty", 502, "BadGatewayError"),
    ("/fault/reset-head", 502, "BadGatewayError"),
    ("/fault/reset-body", 502, "BadGatewayError"),
    ("/fault/close-early", 502, "BadGatewayError"),
    ("/fault/slow-head", 504, "GatewayTimeoutError"),
    ("/fault/slow-body", 504, "GatewayTimeoutError"),
]

#: JWKS faults: (calling plugin id, what its JWKS endpoint does). Each plugin token is signed
#: by a key that the endpoint would serve if it worked; 401 or 503, never a forward.
def jwks_fault_cases() -> list[tuple[str, Any]]:
    return [
        ("jwks-missing", None),  # 404
        ("jwks-slow", "slow"),
        ("jwks-reset", "reset"),
        ("jwks-garbage", b"\x00\x01 not json at all"),
        ("jwks-html", b"<html><body>Sign in</body></html>"),
        ("jwks-wrong-shape", {"keys": "not a list"}),
        ("jwks-empty", {"keys": []}),
        ("jwks-huge", b'{"keys": [' + b'{"kty":"EC"},' * 120_000 + b'{"kty":"EC"}]}'),
        ("jwks-nested", b"[" * 100_000 + b"]" * 100_000),
        ("jwks-symmetric-only", {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}),
        ("jwks-rsa-1024", "rsa-1024"),
    ]

def _billion_laughs(levels: int, tail: str) -> bytes:
    """~400 bytes of YAML that would expand to 9**levels values."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return ("\n".join(lines) + f"\n{tail}*a{levels - 1}\n").encode()


#: Policy files written over a running sidecar's policy (hot reload must refuse them all).
POLICY_GARBAGE: list[tuple[str, bytes]] = [
    ("binary junk", bytes(range(256)) * 4),
    ("not YAML", b"pluginId: fixture\nroutes: [\n  - {path: /x\n"),
    ("empty file", b""),
    ("a YAML list", b"- 1\n- 2\n"),
    ("unknown keys", b"pluginId: fixture\nroutes: []\nbackdoor: true\n"),
    ("route without a regex", b"pluginId: fixture\nroutes:\n  - path: /a/{x}\n"
                              b"    upstream: http://127.0.0.1:9/{x}\n"),
    ("bad regex", b"pluginId: fixture\nroutes:\n  - path: /a/{x}\n    params: {x: '(['}\n"
                  b"    upstream: http://127.0.0.1:9/{x}\n"),
    ("another plugin id", b"pluginId: Fixture_2\nroutes: []\n"),
    ("billion laughs (9 levels of aliases)", _billion_laughs(9, "pluginId: fixture\nroutes: ")),
    ("python object tag", b"pluginId: !!python/object/apply:os.system ['true']\nroutes: []\n"),
]


#: Edge families (issue 13): raw requests, what the client must get, and whether a request may
#: reach the upstream. ``{T}`` is a valid user token. ``forward``: "never", or "clean" (it may be
#: forwarded, and what the upstream got must hold no client-set protected field in any spelling,
#: as Python's ``http.server`` and a WSGI environ read it).
@dataclass(frozen=True)
class EdgeCase:
    family: str
    label: str
    raw: bytes
    statuses: frozenset[int]
    forward: str = "never"
    body: bytes | None = None  # what the upstream must have received, when forwarded


def _raw(*fields: str, target: str = "/api/fixture/items/abc", method: str = "GET",
         version: str = "HTTP/1.1", host: bool = True, auth: bool = True,
         body: bytes = b"") -> bytes:
    lines = [f"{method} {target} {version}"]
    if host:
        lines.append("Host: 127.0.0.1")
    if auth:
        lines.append("Authorization: Bearer {T}")
    lines += ["Connection: close", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _chunked(*fields: str, chunks: bytes, target: str = "/api/fixture/items/abc",
             auth: bool = True) -> bytes:
    return _raw("Transfer-Encoding: chunked", *fields, method="POST", target=target,
                auth=auth, body=chunks)


_OK = frozenset({200})
_400 = frozenset({400})
ADMIN = "user:default/admin"

EDGE_CASES: list[EdgeCase] = [
    # 1. bare CR, NUL, obs-fold and other control bytes in field values (RFC 9112 §2.2, §5.2;
    #    RFC 9110 §5.5): refused, never forwarded byte for byte.
    EdgeCase("CR, NUL, obs-fold", "bare CR smuggles a principal",
             _raw(f"X-Note: a\rX-Stagedoor-Principal: {ADMIN}"), _400),
    EdgeCase("CR, NUL, obs-fold", "bare CR smuggles Authorization",
             _raw("X-Note: a\rAuthorization: Bearer forged", auth=False), _400),
    EdgeCase("CR, NUL, obs-fold", "bare CR smuggles X-Forwarded-For",
             _raw("X-Note: a\rX-Forwarded-For: 10.0.0.1"), _400),
    EdgeCase("CR, NUL, obs-fold", "bare CR in the Host value", _raw(host=False) .replace(
        b"Connection: close", b"Host: a\rb\r\nConnection: close"), _400),
    EdgeCase("CR, NUL, obs-fold", "bare CR in the Authorization value",
             _raw("Authorization: Bearer a\rb", auth=False), _400),
    EdgeCase("CR, NUL, obs-fold", "NUL in a value", _raw("X-Note: a\x00b"), _400),
    EdgeCase("CR, NUL, obs-fold", "NUL before a principal",
             _raw(f"X-Note: a\x00X-Stagedoor-Principal: {ADMIN}"), _400),
    EdgeCase("CR, NUL, obs-fold", "obs-fold continuation with SP",
             _raw("X-Note: a", f" X-Stagedoor-Principal: {ADMIN}"), _400),
    EdgeCase("CR, NUL, obs-fold", "obs-fold continuation with HTAB",
             _raw("X-Note: a", "\tX-Forwarded-For: 10.0.0.1"), _400),
    EdgeCase("CR, NUL, obs-fold", "obs-fold of Authorization",
             _raw("Authorization: Bearer", " {T}", auth=False), _400),
    EdgeCase("CR, NUL, obs-fold", "vertical tab in a value", _raw("X-Note: a\x0bb"), _400),
    EdgeCase("CR, NUL, obs-fold", "escape byte in a value", _raw("X-Note: \x1b[31mred"), _400),
    EdgeCase("CR, NUL, obs-fold", "DEL in a value", _raw("X-Note: a\x7fb"), _400),
    EdgeCase("CR, NUL, obs-fold", "space in a field name", _raw("X Note: a"), _400),
    EdgeCase("CR, NUL, obs-fold", "bare LF line ending splits off a protected field",
             _raw(f"X-Note: a\nX-Stagedoor-Principal: {ADMIN}"), _OK, "clean"),
    # 2. field names with underscores (default drop; CGI/WSGI read _ as -).
    EdgeCase("underscores", "X_Stagedoor_Principal", _raw(f"X_Stagedoor_Principal: {ADMIN}"),
             _OK, "clean"),
    EdgeCase("underscores", "x_stagedoor_principal_type",
             _raw("x_stagedoor_principal_type: service"), _OK, "clean"),
    EdgeCase("underscores", "X_Forwarded_For", _raw("X_Forwarded_For: 10.0.0.1"), _OK, "clean"),
    EdgeCase("underscores", "X_Forwarded_Host", _raw("X_Forwarded_Host: admin.internal"), _OK,
             "clean"),
    EdgeCase("underscores", "X_HTTP_Method_Override", _raw("X_HTTP_Method_Override: DELETE"),
             _OK, "clean"),
    EdgeCase("underscores", "X_Original_URL", _raw("X_Original_URL: /v1/admin"), _OK, "clean"),
    EdgeCase("underscores", "X_Real_IP", _raw("X_Real_IP: 10.0.0.1"), _OK, "clean"),
    EdgeCase("underscores", "X_Request_Id", _raw("X_Request_Id: forged-id"), _OK, "clean"),
    EdgeCase("underscores", "Authorization with an underscore twin",
             _raw("Author_ization: Bearer forged"), _OK, "clean"),
    EdgeCase("underscores", "an unprotected field with _ (dropped too)",
             _raw("X_Custom_Note: hello"), _OK, "clean"),
    # 3. chunked messages with a trailer section: no crash; trailers are never forwarded.
    EdgeCase("trailers", "request trailer naming a principal",
             _chunked(chunks=f"5\r\nhello\r\n0\r\nX-Stagedoor-Principal: {ADMIN}\r\n\r\n"
                      .encode()), _OK, "clean", b"hello"),
    EdgeCase("trailers", "request trailers, several",
             _chunked(chunks=b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\nX-Forwarded-For: 10.0.0.1"
                             b"\r\nX_Real_IP: 10.0.0.1\r\n\r\n"), _OK, "clean", b"abc"),
    EdgeCase("trailers", "request trailer with the only credential",
             _chunked(chunks=b"2\r\nhi\r\n0\r\nAuthorization: Bearer {T}\r\n\r\n", auth=False),
             frozenset({401})),
    EdgeCase("trailers", "request trailers on an open route",
             _chunked(chunks=b"2\r\nhi\r\n0\r\nX-A: 1\r\n\r\n", target="/api/fixture/open/abc",
                      auth=False), _OK, "clean", b"hi"),
    EdgeCase("trailers", "request trailer section over maxHeaderBytes",
             _chunked(chunks=b"2\r\nhi\r\n0\r\nX-Pad: " + b"p" * (MAX_HEADER_BYTES + 100)
                      + b"\r\n\r\n"), frozenset({431})),
    EdgeCase("trailers", "request trailer section that never ends",
             _chunked(chunks=b"2\r\nhi\r\n0\r\n" + b"X-Pad: p\r\n" * 4000),
             frozenset({431})),
    # 4. chunk-size lines and extensions: bounded (413 over maxChunkLineBytes, as Node).
    EdgeCase("chunk lines", "chunk extension of 8 KiB",
             _chunked(chunks=b"5;ext=" + b"e" * 8192 + b"\r\nhello\r\n0\r\n\r\n"),
             frozenset({413})),
    EdgeCase("chunk lines", "chunk extension of 1 MiB without an end",
             _chunked(chunks=b"5;" + b"e" * (1 << 20)), frozenset({413})),
    EdgeCase("chunk lines", "chunk-size of 5,000 zeros",
             _chunked(chunks=b"0" * 5000 + b"5\r\nhello\r\n0\r\n\r\n"), frozenset({413})),
    EdgeCase("chunk lines", "endless chunk extension without credentials",
             _chunked(chunks=b"5;" + b"x" * (1 << 20), auth=False), frozenset({401, 413})),
    EdgeCase("chunk lines", "chunk size that is not hex",
             _chunked(chunks=b"zz\r\nhello\r\n0\r\n\r\n"), _400),
    EdgeCase("chunk lines", "chunk data without its CRLF",
             _chunked(chunks=b"5\r\nhelloXX0\r\n\r\n"), _400),
    EdgeCase("chunk lines", "chunk size with a sign",
             _chunked(chunks=b"+5\r\nhello\r\n0\r\n\r\n"), _400),
    EdgeCase("chunk lines", "short chunk extension is fine",
             _chunked(chunks=b"5;name=value\r\nhello\r\n0\r\n\r\n"), _OK, "clean", b"hello"),
    EdgeCase("chunk lines", "many small chunks are fine",
             _chunked(chunks=b"1\r\nx\r\n" * 500 + b"0\r\n\r\n"), _OK, "clean", b"x" * 500),
    # 5. request-target forms, versions and Host (RFC 9112 §2.3, §3.2).
    EdgeCase("targets and Host", "absolute-form with HTTP/2.0",
             _raw(target="http://127.0.0.1/api/fixture/items/abc", version="HTTP/2.0"), _400),
    EdgeCase("targets and Host", "absolute-form with HTTP/1.1",
             _raw(target="http://127.0.0.1/api/fixture/items/abc"), _400),
    EdgeCase("targets and Host", "absolute-form with HTTP/1.0",
             _raw(target="http://127.0.0.1/api/fixture/items/abc", version="HTTP/1.0"), _400),
    EdgeCase("targets and Host", "absolute-form https with HTTP/2.0",
             _raw(target="https://admin.internal/v1/admin", version="HTTP/2.0"), _400),
    EdgeCase("targets and Host", "origin-form with HTTP/2.0", _raw(version="HTTP/2.0"), _400),
    EdgeCase("targets and Host", "origin-form with HTTP/3.0", _raw(version="HTTP/3.0"), _400),
    EdgeCase("targets and Host", "authority-form GET",
             _raw(target="127.0.0.1:80"), _400),
    EdgeCase("targets and Host", "request target over maxHeaderBytes",
             _raw(target="/api/fixture/loose/" + "t" * (MAX_HEADER_BYTES + 1)),
             frozenset({414})),
    EdgeCase("targets and Host", "two Host headers", _raw("Host: b.example"), _400),
    EdgeCase("targets and Host", "two identical Host headers", _raw("Host: 127.0.0.1"), _400),
    EdgeCase("targets and Host", "Host and host", _raw("host: 127.0.0.1"), _400),
    EdgeCase("targets and Host", "no Host in HTTP/1.1", _raw(host=False), _400),
    EdgeCase("targets and Host", "no Host in HTTP/1.0 is fine", _raw(host=False,
             version="HTTP/1.0"), _OK, "clean"),
    EdgeCase("targets and Host", "Host with userinfo",
             _raw(host=False).replace(b"Connection:", b"Host: user@127.0.0.1\r\nConnection:"),
             _400),
    EdgeCase("targets and Host", "Host with a path",
             _raw(host=False).replace(b"Connection:", b"Host: 127.0.0.1/v1/admin\r\nConnection:"),
             _400),
    # 6. framing and Expect (RFC 9112 §6; RFC 9110 §10.1.1).
    EdgeCase("framing and Expect", "Transfer-Encoding in HTTP/1.0",
             _raw("Transfer-Encoding: chunked", method="POST", version="HTTP/1.0",
                  body=b"0\r\n\r\n"), _400),
    EdgeCase("framing and Expect", "Content-Length and Transfer-Encoding",
             _raw("Content-Length: 5", "Transfer-Encoding: chunked", method="POST",
                  body=b"0\r\n\r\n"), _400),
    EdgeCase("framing and Expect", "Expect: something else",
             _raw("Expect: 200-ok", "Content-Length: 2", method="POST", body=b"hi"),
             frozenset({417})),
    EdgeCase("framing and Expect", "Expect: 100-continue without credentials",
             _raw("Expect: 100-continue", "Content-Length: 5", method="POST", auth=False),
             frozenset({401})),
    EdgeCase("framing and Expect", "a 1 MiB body without credentials",
             _raw("Content-Length: 1048576", method="POST", auth=False, body=b"b" * (1 << 20)),
             frozenset({401, 413})),
]


def edge_family_counts() -> dict[str, int]:
    """Raw-socket edge cases per family, in table order."""
    out: dict[str, int] = {}
    for case in EDGE_CASES:
        out[case.family] = out.get(case.family, 0) + 1
    return out


def replay_http_server(raw_head: bytes) -> Any:
    """What Python's ``http.server`` makes of a forwarded request head: its parsed headers
    (an ``email.message.Message``), or None if it refuses the head."""
    import http.server
    import io

    class _Replay(http.server.BaseHTTPRequestHandler):
        def __init__(self) -> None:  # no socket: parse the bytes as a server would
            self.rfile = io.BytesIO(raw_head)
            self.wfile = io.BytesIO()
            self.client_address = ("127.0.0.1", 0)
            self.server = None  # type: ignore[assignment]
            self.close_connection = True
            self.raw_requestline = self.rfile.readline(65537)
            self.ok = self.parse_request()

        def log_message(self, *args: Any) -> None:
            pass

    replay = _Replay()
    return replay.headers if replay.ok else None


def wsgi_environ_names(headers: Any) -> dict[str, list[str]]:
    """Header values by the CGI/WSGI variable a server maps them to (``HTTP_X_FORWARDED_FOR``)."""
    out: dict[str, list[str]] = {}
    for name, value in headers.items():
        out.setdefault("HTTP_" + name.upper().replace("-", "_"), []).append(value)
    return out


def path_cases() -> list[tuple[str, str, str, str]]:
    """(category, payload, position label, target) for every payload at every position."""
    return [(category, payload, label, template.replace("{p}", payload))
            for category, payloads in PATH_PAYLOADS.items() for payload in payloads
            for label, template in PATH_POSITIONS]


# == counts for docs/security.md ==================================================================
DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
BEGIN, END = "<!-- counts: begin (python -m tests.hardening --write) -->", "<!-- counts: end -->"


def _collected(module: str) -> int:
    """Test items a module yields: each test function times its parametrize rows."""
    import importlib
    import inspect

    mod = importlib.import_module(f"tests.{module}")
    total = 0
    for name, fn in inspect.getmembers(mod, inspect.isfunction):
        if not name.startswith("test_") or fn.__module__ != mod.__name__:
            continue
        rows = 1
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize":
                rows *= len(mark.args[1])
        total += rows
    return total


def counts() -> list[tuple[str, str, int, str]]:
    """(category, what, how many, where) rows, all computed from the tables and tests."""
    from . import soak, test_hardening_faults, test_hardening_soak, test_hardening_tokens
    from . import test_property_decide as prop

    hp = "127.0.0.1:1"
    rows: list[tuple[str, str, int, str]] = []
    for category, payloads in PATH_PAYLOADS.items():
        rows.append(("paths", f"payloads: {category} (x {len(PATH_POSITIONS)} positions)",
                     len(payloads) * len(PATH_POSITIONS),
                     f"test_core_tables.py (in process); the first {SMOKE_PAYLOADS} through "
                     "a sidecar: test_hardening_paths.py"))
    rows += [
        ("paths", "targets that must never reach an upstream", len(MUST_DENY_TARGETS),
         "test_hardening_paths.py"),
        ("paths", "very long paths, queries and heads", len(long_targets()),
         "test_hardening_paths.py"),
        ("paths", "absolute-form, authority-form, asterisk and odd request lines",
         len(target_forms(hp)), "test_hardening_paths.py"),
        ("paths", "Host headers naming something else", len(host_cases(hp, hp)),
         "test_hardening_paths.py"),
        ("paths", "methods (case, unknown, CONNECT, TRACE, over-long)", len(METHOD_CASES),
         "test_hardening_paths.py"),
        ("paths", "framing and smuggling (CL.TE, TE.CL, obs-fold, pipelining, upgrades)",
         len(SMUGGLING_CASES), "test_hardening_paths.py"),
        ("paths", "client-set identity, override and hop-by-hop headers",
         len(SPOOFED_HEADERS), "test_hardening_paths.py"),
        ("tokens", "hostile credentials through the proxy", len(test_hardening_tokens.
                                                                   TOKEN_CASES),
         "test_hardening_tokens.py"),
        ("tokens", "the same credentials in process (head check and resolve)",
         len(test_hardening_tokens.TOKEN_CASES) - 1, "test_core_tables.py"),
        ("tokens", "tokens in the query string (with and without a bad header)", 8,
         "test_hardening_tokens.py"),
        ("tokens", "JWKS endpoints down, slow, garbage or hostile",
         len(jwks_fault_cases()) + 1, "test_hardening_tokens.py"),
        ("tokens", "tokens naming random calling plugins (fetch flood)", 200,
         "test_hardening_tokens.py"),
        ("limits", "head size/count, body size, slow clients, config checks",
         _collected("test_hardening_limits"), "test_hardening_limits.py"),
        ("faults", "upstream refuses, resets, babbles, stalls",
         len(FAULT_CASES), "test_hardening_faults.py"),
        ("faults", "huge answers streamed (Content-Length and chunked)", 2,
         "test_hardening_faults.py"),
        ("faults", "policy files replaced by garbage at run time", len(POLICY_GARBAGE),
         "test_hardening_faults.py"),
        ("faults", "config files replaced by garbage at run time",
         len(test_hardening_faults.CONFIG_GARBAGE), "test_hardening_faults.py"),
        ("regressions", "what this suite found, each in isolation, plus internals tripwires",
         _collected("test_hardening_units"), "test_hardening_units.py"),
        *[("edge", f"raw-socket: {family}", n, "test_hardening_edge.py")
          for family, n in edge_family_counts().items()],
        ("edge", "raw-socket: Expect, upstream trailers and 1xx, answer headers, Date, HTTP/1.0 "
                 "framing, TLS on the plain listener, parser pages, idle and slow-body "
                 "timeouts, client abort (499), in-flight gauge",
         _collected("test_hardening_edge") - len(EDGE_CASES), "test_hardening_edge.py"),
        ("edge", "resources: 8 unauthenticated 10 MiB POSTs (RSS), per-client connection cap",
         _collected("test_hardening_resources"), "test_hardening_resources.py"),
        ("edge", "in-process: head-check tables (every byte, names, underscores, targets, "
                 "versions, Host, framing), edge settings, connection book, log throttle",
         _collected("test_head"), "test_head.py"),
        ("edge", "mitmproxy fence: raw-socket error pages and touch points, crash handling",
         _collected("test_mitm_internals"), "test_mitm_internals.py"),
        ("property", f"generated cases over decide(), render_error and the verifier "
                     f"({_collected('test_property_decide') - 1} properties x "
                     f"{prop.EXAMPLES} examples)",
         (_collected("test_property_decide") - 1) * prop.EXAMPLES, "test_property_decide.py"),
        ("soak", f"mixed requests in ./run.sh test ({len(soak.KINDS)} kinds)",
         test_hardening_soak.SMALL_SOAK_REQUESTS, "test_hardening_soak.py"),
        ("soak", "mixed requests in the separate soak (python -m tests.soak)", 100_000,
         "soak.py"),
    ]
    return rows


def render_counts() -> str:
    rows = counts()
    lines = [BEGIN, "", "| category | what is tried | count | file |", "| --- | --- | ---: | --- |"]
    lines += [f"| {c} | {w} | {n:,} | `tests/{f}` |" for c, w, n, f in rows]
    totals: dict[str, int] = {}
    for category, what, n, _ in rows:
        if "separate" not in what:
            totals[category] = totals.get(category, 0) + n
    lines += ["", "Per category (the separate soak left out): "
              + ", ".join(f"{c} {n:,}" for c, n in totals.items())
              + f"; in all {sum(totals.values()):,} adversarial inputs per `./run.sh test`.",
              "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    block = render_counts()
    if "--write" in args:
        text = DOC.read_text()
        start, end = text.index(BEGIN), text.index(END) + len(END)
        DOC.write_text(text[:start] + block + text[end:])
        print(f"updated {DOC}")
    else:
        print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
