"""The /v1/userinfo client (cache, single flight, fail closed) and the identity mutators, against
a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import jwt
import pytest

from stagedoor.auth import Principal
from stagedoor.identity import (
    BackstagePluginToken,
    Caller,
    IdentityError,
    NoIdentity,
    PlainHeaders,
    SignedAssertion,
    build,
)
from stagedoor.permissions import Authorizer
from stagedoor.signing import Signer
from stagedoor.userinfo import (
    MembershipNeeded,
    MembershipUnavailable,
    UserInfoClient,
    parse_userinfo,
)

from .conftest import LoopbackServer, closed_port

JANE = "user:default/jane"


class AuthBackend(LoopbackServer):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.status = 200
        self.delay = 0.0
        self.body: dict[str, Any] = {"claims": {"sub": JANE,
                                                "ent": [JANE, "group:default/team-a"]}}
        self.release = threading.Event()
        self.release.set()
        super().__init__(_Handler)


class _Handler(BaseHTTPRequestHandler):
    server: AuthBackend
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.calls.append(self.headers.get("authorization", ""))
        self.server.release.wait(5)
        time.sleep(self.server.delay)
        data = json.dumps(self.server.body).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def auth() -> Any:
    server = AuthBackend()
    yield server
    server.stop()


def _lookup(client: UserInfoClient, token: str, expires: float | None = None) -> Any:
    try:
        return client.cached(token, JANE, expires)
    except MembershipNeeded:
        pass
    asyncio.run(client.resolve(token, JANE, expires))
    return client.cached(token, JANE, expires)


def test_lookup_then_cached_until_the_token_expires(auth: AuthBackend) -> None:
    now = [1000.0]
    client = UserInfoClient(f"{auth.url}/api/auth", clock=lambda: now[0])
    with pytest.raises(MembershipNeeded):
        client.cached("tok", JANE, 1060.0)
    assert _lookup(client, "tok", 1060.0) == {JANE, "group:default/team-a"}
    assert auth.calls == ["Bearer tok"]
    now[0] = 1059.0
    assert "group:default/team-a" in client.cached("tok", JANE, 1060.0)
    now[0] = 1060.0  # the token's exp: asked again
    with pytest.raises(MembershipNeeded):
        client.cached("tok", JANE, 1060.0)
    assert client.stats == {"lookups": 1, "cache_hits": 2, "failures": 0}


def test_concurrent_lookups_for_one_token_share_one_request(auth: AuthBackend) -> None:
    client = UserInfoClient(auth.url)
    auth.release.clear()

    async def many() -> None:
        tasks = [asyncio.create_task(client.resolve("tok", JANE, None)) for _ in range(5)]
        await asyncio.sleep(0.2)
        auth.release.set()
        await asyncio.gather(*tasks)

    asyncio.run(many())
    assert len(auth.calls) == 1
    assert JANE in client.cached("tok", JANE, None)


def test_cache_is_bounded(auth: AuthBackend) -> None:
    client = UserInfoClient(auth.url, cache_size=2)
    for token in ("a", "b", "c"):
        _lookup(client, token)
    with pytest.raises(MembershipNeeded):
        client.cached("a", JANE, None)  # the oldest went
    assert len(auth.calls) == 3


@pytest.mark.parametrize("problem", ["status", "garbage", "other-user", "down", "slow"])
def test_any_failure_is_unavailable_and_remembered_briefly(auth: AuthBackend,
                                                           problem: str) -> None:
    url = auth.url
    if problem == "status":
        auth.status = 401
    elif problem == "garbage":
        auth.body = {"claims": {"sub": JANE, "ent": "group:default/team-a"}}
    elif problem == "other-user":
        auth.body = {"claims": {"sub": "user:default/eve", "ent": []}}
    elif problem == "down":
        url = f"http://127.0.0.1:{closed_port()}"
    else:
        auth.delay = 1.0
    now = [1000.0]
    client = UserInfoClient(url, timeout=0.3, retry_after=2.0, clock=lambda: now[0])
    with pytest.raises(MembershipUnavailable) as failed:
        _lookup(client, "tok")
    assert failed.value.retry_after == 2
    assert client.stats["failures"] == 1
    now[0] += 2.0  # then it may be asked again
    with pytest.raises(MembershipNeeded):
        client.cached("tok", JANE, None)


def test_parse_userinfo_adds_the_subject_and_caps_refs() -> None:
    body = json.dumps({"claims": {"sub": JANE, "ent": ["group:default/a"]}}).encode()
    assert parse_userinfo(body, JANE) == {JANE, "group:default/a"}
    many = json.dumps({"claims": {"sub": JANE, "ent": [f"group:x/{i}" for i in range(1001)]}})
    with pytest.raises(ValueError):
        parse_userinfo(many.encode(), JANE)


def test_membership_order_map_then_token_then_userinfo(auth: AuthBackend) -> None:
    userinfo = UserInfoClient(auth.url)
    authorizer = Authorizer(None, membership={JANE: frozenset({JANE, "group:default/mapped"})},
                            userinfo=userinfo)
    jane = Principal("user", JANE, ownership=(JANE, "group:default/in-token"))
    assert authorizer.membership_of(jane, "tok") == \
        (frozenset({JANE, "group:default/mapped"}), "map")
    bob = Principal("user", "user:default/bob", ownership=("group:default/in-token",))
    assert authorizer.membership_of(bob, "tok")[1] == "token"
    carol = Principal("user", "user:default/carol")
    with pytest.raises(MembershipNeeded):
        authorizer.membership_of(carol, "tok")
    service = Principal("service", "plugin:catalog")
    assert authorizer.membership_of(service, "tok") == (frozenset({"plugin:catalog"}),
                                                        "subject")
    stand_in = Principal("user", "user:default/carol", source="explain --user")
    assert authorizer.membership_of(stand_in, "x")[1] == "subject"


# -- identity mutators -----------------------------------------------------------------------------
USER = Principal("user", JANE)


def _caller(principal: Principal | None = USER, token: str | None = None) -> Caller:
    return Caller(principal, token, "req-1", "insights")


def test_plain_headers_and_none() -> None:
    plain = PlainHeaders()
    assert plain.fields(_caller()) == ((b"x-stagedoor-principal", JANE.encode()),
                                       (b"x-stagedoor-principal-type", b"user"))
    assert plain.fields(_caller(None)) == ()
    assert NoIdentity().fields(_caller()) == () and NoIdentity().names == frozenset()


def test_signed_assertion_mutator() -> None:
    signer = Signer()
    mutator = build({"type": "jwt", "audience": "insights-api"}, signer, PlainHeaders())
    assert isinstance(mutator, SignedAssertion)
    assert mutator.names == {b"x-stagedoor-identity"}
    ((name, value),) = mutator.fields(_caller())
    assert name == b"X-Stagedoor-Identity"
    claims = jwt.decode(value, options={"verify_signature": False})
    assert claims["sub"] == JANE and claims["request_id"] == "req-1"


def test_backstage_mutator_needs_a_delegable_user_token() -> None:
    mutator = build({"type": "backstage", "plugin": "catalog"}, Signer(), PlainHeaders())
    assert isinstance(mutator, BackstagePluginToken)
    with pytest.raises(IdentityError):
        mutator.fields(_caller(USER, "not-a-jwt"))
    service = mutator.fields(_caller(Principal("service", "external:ci"), "static"))
    token = service[0][1].removeprefix(b"Bearer ").decode()
    assert "obo" not in jwt.decode(token, options={"verify_signature": False})


@pytest.mark.parametrize("spec", [{"type": "jwt"}, {"type": "backstage"}, {"type": "mtls"}])
def test_bad_identity_specs(spec: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        build(spec, Signer(), PlainHeaders())


def test_policy_identity_problems_are_reported_with_their_line(tmp_path: Any) -> None:
    from stagedoor.config import Config
    from stagedoor.policy import PolicyLoadError, load_policies

    (tmp_path / "p.yaml").write_text(
        "pluginId: p\n"
        "routes:\n"
        "  - path: /a\n"
        "    upstream:\n"
        "      url: http://127.0.0.1:9/a\n"
        "      identity: {type: jwt}\n"
        "  - path: /b\n"
        "    upstream:\n"
        "      url: http://127.0.0.1:9/b\n"
        "      headers: {Authorization: Bearer x}\n"
        "      identity: {type: backstage}\n"
        "  - path: /c\n"
        "    upstream:\n"
        "      url: http://127.0.0.1:9/c\n"
        "      identity: {type: jwt, audience: api, ttl: 600}\n")
    with pytest.raises(PolicyLoadError) as failed:
        load_policies(tmp_path, Config({}))
    text = str(failed.value)
    assert "p.yaml:6" in text and "needs 'audience'" in text
    assert "needs 'plugin'" in text and "cannot set it too" in text
    assert "p.yaml:15" in text  # ttl over 60: the schema says so
    (tmp_path / "p.yaml").write_text(
        "pluginId: p\nroutes:\n  - path: /a\n    upstream:\n      url: http://127.0.0.1:9/a\n"
        "      identity: {type: jwt, audience: api, ttl: 5}\n")
    route = load_policies(tmp_path, Config({})).plugins["p"].routes[0]
    assert route.upstream is not None and route.upstream.identity is not None
    mutator = build(route.upstream.identity, Signer(), PlainHeaders())
    assert isinstance(mutator, SignedAssertion) and mutator.ttl == 5
