"""Adversarial request targets, Host headers, methods, framing and spoofed headers, through a
real sidecar; every assertion about what got through is made on the upstream side.

Invariant: no request reaches an upstream URL that the matched route's template would not
produce from parameter values that pass their regexes (:func:`tests.hardening.producible`),
no 5xx, every refusal is a JSON error of docs/behaviour.md, and the proxy keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote, unquote_to_bytes

import pytest

from .hardening import (
    MUST_DENY_TARGETS,
    PATH_PAYLOADS,
    PATH_POSITIONS,
    SMOKE_PAYLOADS,
    SMUGGLING_CASES,
    SPOOFED_HEADERS,
    HardEnv,
    host_cases,
    is_json_error,
    long_targets,
    producible,
    target_forms,
)
from .httpraw import RawResponse, send_raw

pytestmark = pytest.mark.e2e

# What a well-formed but refused request may get; 431 only for the over-long rows.
REFUSALS = frozenset({400, 401, 403, 404, 405})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardEnv]:
    e = HardEnv(tmp_path_factory.mktemp("hard-paths"))
    yield e
    e.stop()


def send(env: HardEnv, target: str, method: str = "GET",
         headers: list[tuple[str, str]] | None = None, host: list[str] | None = None,
         token: bool = True) -> RawResponse | None:
    """One request, target byte for byte; None if the proxy closed without an answer."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"Host: {h}" for h in (["127.0.0.1"] if host is None else host)]
    if token:
        lines.append(f"Authorization: Bearer {env.token}")
    lines += [f"{k}: {v}" for k, v in headers or []]
    lines.append("Connection: close")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    try:
        return send_raw(env.port, raw)
    except (OSError, ValueError):  # closed without an answer, or not HTTP (both refusals)
        return None


def check(env: HardEnv, before: int, resp: RawResponse | None, what: str,
          allowed: frozenset[int] = REFUSALS, forward_ok: bool = True) -> list[str]:
    """Problems with one exchange (empty when it upheld every invariant)."""
    problems = []
    seen = env.up.requests()[before:]
    if resp is not None:
        if resp.status >= 500:
            problems.append(f"{what}: {resp.status} {resp.body[:200]!r}")
        elif resp.status == 200 and resp.header("x-upstream") == "yes":
            if not forward_ok:
                problems.append(f"{what}: forwarded, must be refused")
        elif resp.status not in allowed:
            problems.append(f"{what}: unexpected status {resp.status}")
        elif not is_json_error(resp):
            problems.append(f"{what}: not a Backstage-shaped JSON error: {resp.body[:200]!r}")
    if len(seen) > 1:
        problems.append(f"{what}: one request became {len(seen)} upstream: "
                        f"{[s.target for s in seen]}")
    for s in seen:
        if not forward_ok:
            problems.append(f"{what}: reached the upstream as {s.target!r}")
        why = producible(env.policies, env.up.url, s.target)
        if why:
            problems.append(f"{what}: upstream saw {s.target!r}: {why}")
    if seen and (resp is None or resp.status != 200):
        problems.append(f"{what}: reached the upstream but the client got "
                        f"{resp.status if resp else 'nothing'}")
    return problems


# -- the generated table: every payload at every position --------------------------------------
def _strict_decode(raw: str) -> str | None:
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.mark.parametrize("category", list(PATH_PAYLOADS))
def test_payload_table(env, category):
    """A smoke set through the wire; tests/test_core_tables.py runs every payload in process."""
    problems: list[str] = []
    for payload in PATH_PAYLOADS[category][:SMOKE_PAYLOADS]:
        for label, template in PATH_POSITIONS:
            target = template.replace("{p}", payload)
            before = len(env.up.requests())
            open_route = label == "unauthenticated value"
            resp = send(env, target, token=not open_route)
            what = f"{label} {payload!r}"
            problems += check(env, before, resp, what)
            seen = env.up.requests()[before:]
            # A forwarded value is the request's own segment, decoded once, re-encoded.
            if seen and label in ("strict value", "loose value", "unauthenticated value"):
                value = _strict_decode(payload.partition("?")[0])
                up_value = seen[0].target.partition("?")[0].split("/")[3]
                if value is None or quote(value, safe="") != up_value:
                    problems.append(f"{what}: forwarded as {seen[0].target!r}")
    assert env.healthy()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", MUST_DENY_TARGETS)
def test_must_deny_targets(env, target):
    before = len(env.up.requests())
    resp = send(env, target)
    assert not check(env, before, resp, target, forward_ok=False)


@pytest.mark.parametrize(("label", "target", "statuses"), long_targets(),
                         ids=[row[0] for row in long_targets()])
def test_long_targets(env, label, target, statuses):
    before = len(env.up.requests())
    resp = send(env, target)
    assert resp is not None and resp.status in statuses, (resp and resp.status)
    assert not check(env, before, resp, label, allowed=statuses | REFUSALS)
    assert env.healthy()


def test_forms_and_hosts_table(env):
    """Non-origin-form targets are refused; Host naming anything forwards (if at all) to
    exactly the route's upstream with the upstream's own Host."""
    up_hostport = env.up.url.removeprefix("http://")
    problems: list[str] = []
    for label, line, must_refuse in target_forms(up_hostport):
        before = len(env.up.requests())
        raw = (f"{line}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {env.token}\r\n"
               "Connection: close\r\n\r\n").encode("latin-1")
        try:
            resp: RawResponse | None = send_raw(env.port, raw)
        except (OSError, ValueError):
            resp = None
        problems += check(env, before, resp, label, forward_ok=not must_refuse)
        problems += [f"{label}: upstream saw {s.target!r}" for s in env.up.requests()[before:]
                     if s.target != "/v1/items/abc"]
        if resp is not None and b"<html" in resp.body.lower():
            problems.append(f"{label}: HTML error page")
    for label, hosts in host_cases(up_hostport, f"127.0.0.1:{env.port}"):
        before = len(env.up.requests())
        resp = send(env, "/api/fixture/items/abc", host=hosts)
        problems += check(env, before, resp, f"Host {label}")
        for s in env.up.requests()[before:]:
            if s.target != "/v1/items/abc" or s.header("host") != [up_hostport]:
                problems.append(f"Host {label}: upstream saw {s.target!r} Host "
                                f"{s.header('host')}")
    assert env.healthy()
    assert not problems, "\n".join(problems)


def test_methods_table(env):
    from .hardening import METHOD_CASES

    problems: list[str] = []
    for method in METHOD_CASES:
        before = len(env.up.requests())
        resp = send(env, "/api/fixture/items/abc", method=method)
        problems += check(env, before, resp, f"method {method[:20]!r}")
        for s in env.up.requests()[before:]:
            if s.method not in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS") \
                    or s.method == "OPTIONS":
                problems.append(f"method {method[:20]!r} reached the upstream as {s.method}")
    assert env.healthy()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("label", "raw"), SMUGGLING_CASES,
                         ids=[row[0] for row in SMUGGLING_CASES])
def test_smuggling_table(env, label, raw):
    before = len(env.up.requests())
    data = raw.replace("{T}", env.token).encode("latin-1")
    import socket

    sock = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    answers = b""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answers += chunk
    except OSError:
        pass
    finally:
        sock.close()
    seen = env.up.requests()[before:]
    targets = [s.target for s in seen]
    assert all(t == "/v1/items/abc" for t in targets), (label, targets)
    assert b" 500 " not in answers and b"<html" not in answers.lower(), answers[:300]
    for s in seen:
        assert s.header("authorization") == []
        assert not s.header("upgrade"), (label, s.headers)
    assert env.healthy()
    assert not env.crash_lines()


def test_spoofed_headers_never_reach_the_upstream(env):
    before = len(env.up.requests())
    resp = send(env, "/api/fixture/items/abc", headers=SPOOFED_HEADERS)
    assert resp is not None and resp.status == 200
    (seen,) = env.up.requests()[before:]
    assert seen.method == "GET" and seen.target == "/v1/items/abc"
    names = {k.lower() for k, _ in seen.headers}
    leaked = [(k, v) for k, v in SPOOFED_HEADERS
              if k.lower() in names and v in seen.header(k)]
    assert not leaked, leaked
    assert seen.header("x-stagedoor-principal") == ["user:default/jane"]
    assert seen.header("x-forwarded-for") == ["127.0.0.1"]


def test_token_in_the_query_is_not_a_credential(env):
    before = len(env.up.requests())
    for key in ("token", "access_token", "jwt", "authorization", "bearer"):
        resp = send(env, f"/api/fixture/items/abc?{key}={env.token}", token=False)
        assert resp is not None and is_json_error(resp, 401), key
        assert resp.json()["error"]["message"] == "Missing credentials"
        assert env.token not in resp.body.decode("latin-1")
    assert len(env.up.requests()) == before


def test_proxy_is_still_clean(env):
    assert env.alive() and env.healthy()
    assert not env.crash_lines(), env.crash_lines()
