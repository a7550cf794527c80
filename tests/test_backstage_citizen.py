"""stagedoor as a citizen of a real Backstage installation (issue 15), end to end.

The session's real Backstage backend (tests/backstage.py) discovers the plugin ``insights`` at
a stagedoor sidecar (``discovery.endpoints``); the sidecar serves ``insights`` with its own
signing keys, asks Backstage's permission backend with its own plugin token, reads users'
group membership from Backstage's auth backend, and sends identities upstream.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.backstage import GUEST_USER, SessionBackstage

from . import forkserver
from .conftest import LoopbackServer, RecordingServer, Sidecar, start_sidecar, write_config
from .httpraw import RawResponse, request

pytestmark = [pytest.mark.backstage, pytest.mark.e2e]

STATIC_TOKEN = "citizen-static-token-0123456789abcdef"  # external access *to stagedoor*
JWKS = "/api/insights/.backstage/auth/v1/jwks.json"


# -- parts -----------------------------------------------------------------------------------------
class AuthRelay(LoopbackServer):
    """Stands in front of Backstage's auth backend, so a test can take it away (``stop``)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.paths: list[str] = []
        self.down = False  # True: every connection is dropped without an answer
        super().__init__(_RelayHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # dropped connections are the point, not news


class _RelayHandler(BaseHTTPRequestHandler):
    server: AuthRelay
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.server.down:
            self.close_connection = True
            self.connection.close()
            return
        self.server.paths.append(self.path)
        headers = {k: v for k, v in self.headers.items() if k.lower() == "authorization"}
        answer = httpx.get(self.server.target + self.path, headers=headers, timeout=10)
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("content-type", "text/plain"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)


def write_key_pair(directory: Path, name: str) -> dict[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"keyId": name, "publicKeyFile": str(public), "privateKeyFile": str(private)}


POLICY = """\
pluginId: insights
routes:
  - path: /team
    auth: [user]
    permission: insights.team.read
    upstream: ${insights.externalApiUrl}/team
  - path: /other-team
    auth: [user]
    permission: insights.other.read
    upstream: ${insights.externalApiUrl}/other-team
  - path: /delegated/allow
    auth: [user, service]
    permission: test.allow.read
    upstream: ${insights.externalApiUrl}/delegated/allow
  - path: /delegated/deny
    auth: [user]
    permission: test.deny.read
    upstream: ${insights.externalApiUrl}/delegated/deny
  - path: /delegated/mine
    auth: [user]
    permission: test.user.user:development/guest
    upstream: ${insights.externalApiUrl}/delegated/mine
  - path: /whoami
    auth: [user, service]
    upstream:
      url: ${backend.baseUrl}/api/whoami/whoami
      identity: {type: backstage, plugin: whoami}
  - path: /capture
    auth: [user, service]
    upstream:
      url: ${insights.externalApiUrl}/capture
      identity: {type: backstage, plugin: whoami}
  - path: /signed
    auth: [user, service]
    upstream:
      url: ${insights.verifierUrl}/signed
      identity: {type: jwt, header: X-Stagedoor-Identity, audience: insights-api}
  - path: /signed-briefly
    auth: [user]
    upstream:
      url: ${insights.verifierUrl}/signed
      identity: {type: jwt, header: X-Stagedoor-Identity, audience: insights-api, ttl: 1}
  - path: /anonymous
    auth: [user]
    upstream:
      url: ${insights.externalApiUrl}/anonymous
      identity: {type: none}
permissions:
  - permission: insights.team.read
    effect: allow
    when: {memberOf: group:default/insights-team}
  - permission: insights.other.read
    effect: allow
    when: {memberOf: group:default/other-team}
  - permission: test.*
    effect: delegate
"""


def config_text(backstage: SessionBackstage, relay: AuthRelay, upstream: RecordingServer,
                verifier: IdentityVerifier, keys: list[dict[str, str]]) -> str:
    return textwrap.dedent(f"""\
        backend:
          baseUrl: {backstage.base_url}
          auth:
            externalAccess:
              - type: static
                options: {{token: {STATIC_TOKEN}, subject: citizen-ci}}
            pluginKeyStore:
              type: static
              static:
                keys: {json.dumps(keys)}
        discovery:
          endpoints:
            - target: {{internal: {relay.url}/api/auth, external: {backstage.base_url}/api/auth}}
              plugins: [auth]
        insights:
          externalApiUrl: {upstream.url}
          verifierUrl: {verifier.url}
        stagedoor:
          permissions:
            cacheSeconds: 0.01
        """)


class IdentityVerifier(LoopbackServer):
    """An upstream that trusts nothing but stagedoor's signed identity, checked the way
    docs/backstage.md tells upstreams to: PyJWT's PyJWKClient on the published JWKS, audience,
    issuer, expiry, and every jti once."""

    def __init__(self, jwks_url: str) -> None:
        self.jwks = jwt.PyJWKClient(jwks_url, cache_keys=False, lifespan=1)
        self.seen_jti: set[str] = set()
        self.headers_seen: list[dict[str, str]] = []
        super().__init__(_VerifierHandler)

    def check(self, token: str | None) -> tuple[int, dict[str, Any]]:
        if not token:
            return 401, {"refused": "no identity"}
        try:
            key = self.jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="insights-api",
                                issuer="plugin:insights",
                                options={"require": ["exp", "iat", "jti", "sub"]})
        except jwt.ExpiredSignatureError:
            return 401, {"refused": "expired"}
        except jwt.PyJWTError as exc:
            return 401, {"refused": f"invalid: {type(exc).__name__}"}
        if claims["jti"] in self.seen_jti:
            return 401, {"refused": "replayed"}
        self.seen_jti.add(claims["jti"])
        return 200, {"claims": claims}


class _VerifierHandler(BaseHTTPRequestHandler):
    server: IdentityVerifier
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        status, body = self.server.check(self.headers.get("X-Stagedoor-Identity"))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@dataclass
class Env:
    backstage: SessionBackstage
    sidecar: Sidecar
    upstream: RecordingServer
    relay: AuthRelay
    verifier: IdentityVerifier
    config: Path
    keys: dict[str, dict[str, str]]

    def get(self, path: str, token: str | None) -> RawResponse:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return request(self.sidecar.port, "GET", path, headers, timeout=30)

    def write_keys(self, *names: str) -> None:
        self.config.write_text(config_text(self.backstage, self.relay, self.upstream,
                                           self.verifier, [self.keys[n] for n in names]))

    def published_kids(self) -> list[str]:
        return [k["kid"] for k in json.loads(self.get(JWKS, None).body)["keys"]]

    def wait_for_kids(self, *kids: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.published_kids() == list(kids):
                return
            time.sleep(0.1)
        raise AssertionError(f"the sidecar did not reload to keys {kids}: "
                             f"{self.published_kids()}\n" + "\n".join(self.sidecar.stderr_lines))


@pytest.fixture(scope="module")
def env(backstage: SessionBackstage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("citizen")
    keys = {name: write_key_pair(tmp, name) for name in ("k1", "k2", "k3")}
    upstream = RecordingServer("json")
    relay = AuthRelay(backstage.base_url)
    verifier = IdentityVerifier(f"http://127.0.0.1:{backstage.sidecar_port}{JWKS}")
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "insights.yaml").write_text(POLICY)
    config = write_config(tmp / "app-config.yaml",
                          config_text(backstage, relay, upstream, verifier, [keys["k1"]]))
    sidecar = start_sidecar([config], policies,
                            extra_args=["--listen", f"127.0.0.1:{backstage.sidecar_port}"])
    try:
        yield Env(backstage, sidecar, upstream, relay, verifier, config, keys)
    finally:
        sidecar.stop()
        upstream.stop()
        relay.stop()
        verifier.stop()


# -- JWKS ------------------------------------------------------------------------------------------
_JWKS_SHAPE = re.compile(rb'\{"keys":\[(\{"kty":"EC","x":"[A-Za-z0-9_-]{43}","y":"[A-Za-z0-9_-]'
                         rb'{43}","crv":"P-256","kid":"[^"]+","alg":"ES256"\},?)+\]\}')


def test_jwks_is_served_without_credentials_as_backstage_serves_it(env: Env) -> None:
    ours = env.get(JWKS, None)
    httpx.get(f"{env.backstage.base_url}/api/devtokens/plugin-token",  # makes its first key
              params={"target": "whoami"}, timeout=30).raise_for_status()
    theirs = httpx.get(f"{env.backstage.base_url}/api/devtokens/.backstage/auth/v1/jwks.json",
                       timeout=30)
    assert ours.status == 200 and theirs.status_code == 200
    assert ours.header("content-type") == theirs.headers["content-type"]
    assert _JWKS_SHAPE.fullmatch(theirs.content), theirs.content
    assert _JWKS_SHAPE.fullmatch(ours.body), ours.body
    # member for member, in the same order, the same kinds of values
    mine, real = json.loads(ours.body)["keys"][0], json.loads(theirs.content)["keys"][0]
    assert list(mine) == list(real)
    assert {k: v for k, v in mine.items() if k not in ("x", "y", "kid")} == \
        {k: v for k, v in real.items() if k not in ("x", "y", "kid")}
    assert env.published_kids() == ["k1"]
    # and what Backstage's discovery finds for 'insights' is exactly this document
    assert httpx.get(f"http://127.0.0.1:{env.backstage.sidecar_port}{JWKS}",
                     timeout=30).content == ours.body


# -- permission delegation -------------------------------------------------------------------------
def _policy_lines(env: Env, permission: str) -> list[dict[str, Any]]:
    out = []
    for line in env.backstage.log_lines():
        if "permission-policy:" not in line:
            continue
        message = json.loads(line).get("message", "")
        record = json.loads(message.split("permission-policy: ", 1)[1])
        if record["permission"] == permission:
            out.append(record)
    return out


def _wait_policy_line(env: Env, permission: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = _policy_lines(env, permission)
        if lines:
            return lines[-1]
        time.sleep(0.1)
    raise AssertionError(f"the permission backend logged no decision for {permission}")


def test_delegation_allow_and_deny_from_the_real_permission_backend(env: Env) -> None:
    token = env.backstage.guest_token()
    allowed = env.get("/api/insights/delegated/allow", token)
    assert allowed.status == 200, allowed.body
    denied = env.get("/api/insights/delegated/deny", token)
    assert denied.status == 403
    assert denied.json()["error"] == {"name": "NotAllowedError",
                                      "message": "Permission 'test.deny.read' denied"}
    # The permission backend saw stagedoor's plugin acting for the guest (obo), not the
    # guest's own token: its policy got the user and the actor.
    seen = _wait_policy_line(env, "test.allow.read")
    assert seen["user"] == GUEST_USER and seen["actor"] == "plugin:insights"
    assert _wait_policy_line(env, "test.deny.read")["result"] == "DENY"


def test_delegation_is_decided_for_the_calling_user(env: Env) -> None:
    # ALLOW only when the permission backend's user is the guest: proves the obo chain
    mine = env.get("/api/insights/delegated/mine", env.backstage.guest_token())
    assert mine.status == 200, mine.body
    assert _wait_policy_line(env, f"test.user.{GUEST_USER}")["result"] == "ALLOW"


# -- membership from /v1/userinfo ------------------------------------------------------------------
def test_member_of_is_matched_through_userinfo(env: Env) -> None:
    token = env.backstage.guest_token()
    assert "ent" not in jwt.decode(token, options={"verify_signature": False})
    before = len([p for p in env.relay.paths if p == "/api/auth/v1/userinfo"])
    team = env.get("/api/insights/team", token)
    assert team.status == 200, team.body
    assert env.get("/api/insights/other-team", token).status == 403
    asked = len([p for p in env.relay.paths if p == "/api/auth/v1/userinfo"])
    assert asked == before + 1  # one lookup, then the cache for this token


def test_member_of_is_503_when_the_auth_backend_is_down(env: Env) -> None:
    first = env.backstage.guest_token()
    assert env.get("/api/insights/team", first).status == 200  # key set fetched and cached
    forwarded = len(env.upstream.seen)
    env.relay.down = True
    try:
        fresh = env.backstage.guest_token()  # not looked up yet
        down = env.get("/api/insights/team", fresh)
        assert down.status == 503, down.body
        assert down.json()["error"]["name"] == "ServiceUnavailableError"
        assert int(down.header("retry-after") or 0) >= 1
        assert len(env.upstream.seen) == forwarded  # nothing forwarded
        assert env.get("/api/insights/team", first).status == 200  # looked up before: cached
    finally:
        env.relay.down = False
    from .test_live_e2e import sample, scrape

    metrics = scrape(env.sidecar)
    name = "stagedoor_userinfo_lookups_total"
    assert sample(metrics, name, outcome="lookup") >= 2
    assert sample(metrics, name, outcome="cache_hit") >= 1
    assert sample(metrics, name, outcome="failure") >= 1


# -- plugin tokens out -----------------------------------------------------------------------------
def test_backstage_accepts_the_sidecars_plugin_token_for_a_user_with_obo(env: Env) -> None:
    answer = env.get("/api/insights/whoami", env.backstage.guest_token())
    assert answer.status == 200, answer.body
    assert answer.json()["principal"] == {
        "type": "user", "userEntityRef": GUEST_USER,
        "actor": {"type": "service", "subject": "plugin:insights"}}


def test_backstage_accepts_the_sidecars_plugin_token_for_a_service(env: Env) -> None:
    answer = env.get("/api/insights/whoami", STATIC_TOKEN)
    assert answer.status == 200, answer.body
    assert answer.json()["principal"] == {"type": "service", "subject": "plugin:insights"}


def _captured(env: Env, token: str) -> str:
    before = len(env.upstream.seen)
    assert env.get("/api/insights/capture", token).status == 200
    seen = env.upstream.seen[before:]
    assert len(seen) == 1
    authorization = seen[0].headers["authorization"]
    assert len(authorization) == 1 and authorization[0].startswith("Bearer ")
    minted = authorization[0].removeprefix("Bearer ")
    assert minted != token  # the caller's token never goes upstream
    header = jwt.get_unverified_header(minted)
    assert header["typ"] == "vnd.backstage.plugin"
    claims = jwt.decode(minted, options={"verify_signature": False})
    assert claims["sub"] == "insights" and claims["aud"] == "whoami"
    return minted


# -- signed identity to any upstream ---------------------------------------------------------------
def test_upstream_verifies_the_signed_identity_with_the_published_jwks(env: Env) -> None:
    answer = request(env.sidecar.port, "GET", "/api/insights/signed",
                     {"Authorization": f"Bearer {env.backstage.guest_token()}",
                      "X-Request-Id": "citizen-req-1",
                      "X-Stagedoor-Identity": "forged-by-the-client"}, timeout=30)
    assert answer.status == 200, answer.body
    claims = answer.json()["claims"]
    assert claims["sub"] == GUEST_USER and claims["principal_type"] == "user"
    assert claims["aud"] == "insights-api" and claims["request_id"] == "citizen-req-1"
    assert 0 < claims["exp"] - claims["iat"] <= 60
    seen = env.verifier.headers_seen[-1]
    assert "x-stagedoor-principal" not in seen  # the plain headers are off on this route
    # a service caller is named too
    service = env.get("/api/insights/signed", STATIC_TOKEN)
    assert service.json()["claims"]["sub"] == "external:citizen-ci"
    assert service.json()["claims"]["principal_type"] == "service"


def test_upstream_refuses_a_replayed_or_expired_assertion(env: Env) -> None:
    assert env.get("/api/insights/signed-briefly", env.backstage.guest_token()).status == 200
    assertion = env.verifier.headers_seen[-1]["x-stagedoor-identity"]
    assert env.verifier.check(assertion) == (401, {"refused": "replayed"})
    expires = jwt.decode(assertion, options={"verify_signature": False})["exp"]
    deadline = time.monotonic() + 10
    while time.time() <= expires + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    env.verifier.seen_jti.clear()  # not a replay any more: only its age refuses it now
    assert env.verifier.check(assertion) == (401, {"refused": "expired"})
    forged = jwt.encode({"sub": GUEST_USER}, ec.generate_private_key(ec.SECP256R1()),
                        algorithm="ES256",
                        headers={"kid": jwt.get_unverified_header(assertion)["kid"]})
    assert env.verifier.check(forged)[0] == 401


def test_identity_none_sends_nothing_about_the_caller(env: Env) -> None:
    before = len(env.upstream.seen)
    assert env.get("/api/insights/anonymous", env.backstage.guest_token()).status == 200
    headers = env.upstream.seen[before].headers
    assert not any(name.startswith("x-stagedoor-") for name in headers)
    assert "authorization" not in headers


def test_explain_names_the_membership_source_and_the_upstream_identity(env: Env) -> None:
    import sys


    def explain(path: str) -> str:
        done = forkserver.run(
            [sys.executable, "-m", "stagedoor.cli", "explain", "--config", str(env.config),
             "--policies", str(env.config.parent / "policies"), "GET", path,
             "--token", env.backstage.guest_token()], text=True)
        return done.stdout + done.stderr

    team = explain("/api/insights/team")
    assert "from the auth backend's /v1/userinfo" in team, team
    assert "plain headers x-stagedoor-principal" in team, team
    signed = explain("/api/insights/signed")
    assert "signed JWT in X-Stagedoor-Identity (aud insights-api" in signed, signed
    whoami = explain("/api/insights/whoami")
    assert "Backstage plugin token to plugin 'whoami'" in whoami, whoami


# -- key rotation (last: it changes the sidecar's keys) --------------------------------------------
def test_a_token_whose_key_was_rotated_out_is_refused_by_backstage(env: Env) -> None:
    guest = env.backstage.guest_token()
    first = _captured(env, guest)
    assert jwt.get_unverified_header(first)["kid"] == "k1"
    assert env.backstage.whoami(first).status_code == 200

    env.write_keys("k2", "k1")  # rotate: k2 signs, k1 still published while its tokens live
    env.wait_for_kids("k2", "k1")
    second = _captured(env, guest)
    assert jwt.get_unverified_header(second)["kid"] == "k2"
    assert env.backstage.whoami(second).status_code == 200
    assert env.backstage.whoami(first).status_code == 200

    env.write_keys("k3")  # k1 and k2 rotated out (revoked)
    env.wait_for_kids("k3")
    third = _captured(env, guest)
    accepted = env.backstage.whoami(third)  # a new kid: Backstage fetches the JWKS again
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["principal"]["actor"] == {"type": "service",
                                                     "subject": "plugin:insights"}
    refused = env.backstage.whoami(first)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["name"] == "AuthenticationError"
    assert env.backstage.whoami(second).status_code == 401
