"""Credential verification (stagedoor/auth/) against real keys and a real JWKS server.

Keys are generated here (ES256, ES384, RS256, EdDSA, HS256 secrets); JWK sets are served by a
small threaded HTTP server on 127.0.0.1 that can rotate keys, go down, be slow, answer garbage
and counts its hits. The clock is fake, so nothing sleeps except the timeout tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from stagedoor.auth import (
    AuthSettings,
    CredentialError,
    KeysNeeded,
    KeySourceUnavailable,
    Principal,
    TokenVerifier,
    extract_bearer,
)
from stagedoor.auth import verifier as verifier_module
from stagedoor.config import Config, ConfigError, MissingConfigError, load_config
from stagedoor.devkeys import (
    DevKey,
    generate_dev_keys,
    mint_legacy_token,
    mint_plugin_token,
    mint_user_token,
    public_jwk,
)

AUTH_JWKS = "/api/auth/.well-known/jwks.json"
IDP_JWKS = "/idp/jwks.json"
LEGACY_SECRET = base64.b64encode(b"legacy-secret-of-32-bytes-length").decode()
STATIC_TOKEN = "static-token-0123456789"


def plugin_jwks_path(plugin_id: str) -> str:
    return f"/api/{plugin_id}/.backstage/auth/v1/jwks.json"


# -- a JWKS server ---------------------------------------------------------------------------


class JwksServer:
    """Serves JSON documents by path; ``mode``: ok | garbage | error | reset; ``delay`` s."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        self.mode = "ok"
        self.delay = 0.0
        self.port = 0
        self._lock = threading.Lock()
        self._start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with owner._lock:
                    owner.hits[path] += 1
                if owner.delay:
                    time.sleep(owner.delay)
                if owner.mode == "reset":
                    self.close_connection = True
                    return
                if owner.mode == "error":
                    self._send(500, b'{"error":"boom"}')
                elif owner.mode == "garbage":
                    self._send(200, b"<html>this is not a JWK set</html>")
                elif path not in owner.documents:
                    self._send(404, b'{"error":"not found"}')
                else:
                    document = owner.documents[path]
                    raw = isinstance(document, bytes)
                    self._send(200, document if raw else json.dumps(document).encode())

            def _send(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout tests)
                    self.close_connection = True

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def serve(self, path: str, *keys: DevKey | dict[str, Any]) -> None:
        self.documents[path] = {"keys": [k.public_jwk() if isinstance(k, DevKey) else k
                                         for k in keys]}


@pytest.fixture
def server():
    jwks_server = JwksServer()
    yield jwks_server
    jwks_server.stop()


@pytest.fixture(scope="module")
def keys() -> dict[str, DevKey]:
    return {
        "user": DevKey.generate("ES256"),
        "plugin": DevKey.generate("ES256"),
        "other": DevKey.generate("ES256"),
        "es384": DevKey.generate("ES384"),
        "rsa": DevKey.generate("RS256"),
        "ed": DevKey.generate("EdDSA"),
        "idp": DevKey.generate("RS256"),
    }


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def config_for(server: JwksServer, *, external: list[dict[str, Any]] | None = None,
               endpoints: list[dict[str, Any]] | None = None, **auth: Any) -> Config:
    data: dict[str, Any] = {
        "backend": {"baseUrl": server.url, "auth": {"externalAccess": external or []}},
        "stagedoor": {"auth": auth},
    }
    if endpoints is not None:
        data["discovery"] = {"endpoints": endpoints}
    return Config(data=data)


@pytest.fixture
def make_verifier(server: JwksServer, clock: Clock, keys: dict[str, DevKey]):
    """A TokenVerifier for ``server``; by default it serves the user and catalog keys."""
    server.serve(AUTH_JWKS, keys["user"])
    server.serve(plugin_jwks_path("catalog"), keys["plugin"])
    server.serve(IDP_JWKS, keys["idp"])

    def make(**kwargs: Any) -> TokenVerifier:
        return TokenVerifier(AuthSettings.from_config(config_for(server, **kwargs)), clock=clock)

    return make


def issuer(server: JwksServer) -> str:
    return f"{server.url}/api/auth"


def authenticate(verifier: TokenVerifier, token: str, plugin_id: str = "insights") -> Principal:
    """What the gateway does: verify, fetching the key sets it asks for (the one loop)."""
    return asyncio.run(verifier.authenticate(token, plugin_id))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: dict[str, Any], claims: dict[str, Any], key: Any, alg: str) -> str:
    """A compact JWS with exactly this header, whatever it says (for forged tokens)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if alg == "none":
        signature = b""
    elif alg.startswith("HS"):
        signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    else:
        import jwt

        signature = jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key)
    return f"{signing_input}.{b64url(signature)}"


def user_claims(server: JwksServer, clock: Clock, **overrides: Any) -> dict[str, Any]:
    claims = {"iss": issuer(server), "sub": "user:default/jane", "ent": ["user:default/jane"],
              "aud": "backstage", "iat": int(clock.now), "exp": int(clock.now) + 3600,
              "uip": "proof"}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def user_header(key: DevKey, **overrides: Any) -> dict[str, Any]:
    header = {"alg": key.algorithm, "kid": key.kid, "typ": "vnd.backstage.user"}
    header.update(overrides)
    return header


def expect_failure(verifier: TokenVerifier, token: str, message: str,
                   plugin_id: str = "insights") -> CredentialError:
    with pytest.raises(CredentialError) as info:
        authenticate(verifier, token, plugin_id)
    assert info.value.message == message
    assert str(info.value) == message
    return info.value


# -- Authorization header --------------------------------------------------------------------


def test_no_authorization_header_is_missing_credentials():
    assert extract_bearer([]) is None


def test_non_bearer_scheme_is_missing_credentials():
    assert extract_bearer(["Basic dXNlcjpwYXNz"]) is None


@pytest.mark.parametrize("value", ["Bearer", "Bearer ", "Bearer    ", "bearer\t"])
def test_bearer_with_nothing_is_missing_credentials(value):
    assert extract_bearer([value]) is None


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(scheme):
    assert extract_bearer([f"{scheme} abc.def.ghi"]) == "abc.def.ghi"


def test_two_authorization_headers_are_illegal_token():
    with pytest.raises(CredentialError) as info:
        extract_bearer(["Bearer a.b.c", "Bearer d.e.f"])
    assert info.value.message == "Illegal token"
    assert info.value.reason == "multiple Authorization headers"


# -- unrecognised tokens ---------------------------------------------------------------------


def test_token_that_is_not_a_jwt_is_illegal_token(make_verifier):
    error = expect_failure(make_verifier(), "definitely-not-a-jwt", "Illegal token")
    assert "not a JWT" in error.reason


def test_jwt_that_no_source_recognises_is_illegal_token(make_verifier, server, clock, keys):
    token = sign({"alg": "ES256", "typ": "JWT", "kid": keys["user"].kid},
                 {"iss": "https://somewhere.else", "sub": "x", "exp": int(clock.now) + 60},
                 keys["user"].private_key, "ES256")
    expect_failure(make_verifier(), token, "Illegal token")
    assert server.hits[AUTH_JWKS] == 0


def test_oversized_token_is_illegal_token_without_parsing(make_verifier, monkeypatch):
    verifier = make_verifier(maxTokenBytes=1024)

    def no_parsing(token: str) -> None:
        raise AssertionError("an oversized token must not be parsed")

    monkeypatch.setattr(verifier_module, "peek", no_parsing)
    error = expect_failure(verifier, "a" * 600 + "." + "b" * 600 + ".c", "Illegal token")
    assert "longer than 1024 bytes" in error.reason


def test_limited_user_token_is_not_a_bearer_credential(make_verifier, server, clock, keys):
    token = sign({"typ": "vnd.backstage.limited-user", "alg": "ES256", "kid": keys["user"].kid},
                 {"sub": "user:default/jane", "iat": int(clock.now), "exp": int(clock.now) + 60},
                 keys["user"].private_key, "ES256")
    expect_failure(make_verifier(), token, "Illegal token")


def test_malformed_tokens_only_ever_raise_credential_errors(make_verifier, server, clock, keys):
    verifier = make_verifier(external=[static_entry(), legacy_entry(), jwks_entry(server)])
    good = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    header = good.split(".")[0]
    nasty = ["", ".", "..", "...", "a.b.c", f"{header}.\u00f6\u00e4.x", f"{header}..",
             f"{header}.e30.", f"{header}.{b64url(b'[1,2]')}.sig", f"{header}.{b64url(b'1e999')}.",
             f"{header}.{b64url(json.dumps(user_claims(server, clock, exp=10**400)).encode())}.A",
             f"{header}.{b64url(json.dumps(user_claims(server, clock, iat=10**400)).encode())}.A",
             f"{header}.{b64url(b'{' * 5000)}.AAAA", "\udcff.\udcff.\udcff", "Bearer x",
             b64url(json.dumps({"alg": "ES256", "typ": ["vnd.backstage.user"]}).encode()) + ".e30."]
    rng = random.Random(1234)
    for _ in range(300):
        chars = list(good)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = rng.choice("Aa0_-.=+/ \u00e9")
        nasty.append("".join(chars))
    for token in nasty:
        try:
            authenticate(verifier, token)
        except CredentialError as error:
            assert error.message in ("Illegal token", "Failed user token verification")
        except KeySourceUnavailable:
            pass


# -- user tokens -----------------------------------------------------------------------------


def test_user_token_gives_user_principal(make_verifier, server, clock, keys):
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now,
                            ownership=["user:default/jane", "group:default/team-a"])
    principal = authenticate(make_verifier(), token)
    assert principal == Principal(kind="user", subject="user:default/jane",
                                  ownership=("user:default/jane", "group:default/team-a"),
                                  source="user", expires_at=clock.now + 3600)
    assert server.hits[AUTH_JWKS] == 1


@pytest.mark.parametrize("name", ["es384", "rsa", "ed"])
def test_user_token_verifies_with_each_supported_key_type(make_verifier, server, clock, keys,
                                                         name):
    server.serve(AUTH_JWKS, keys[name])
    token = mint_user_token(keys[name], issuer=issuer(server), now=clock.now)
    assert authenticate(make_verifier(), token).subject == "user:default/jane"


def test_user_token_with_ps256_verifies_against_rsa_key_without_alg(make_verifier, server,
                                                                   clock, keys):
    jwk = keys["rsa"].public_jwk()
    del jwk["alg"]
    server.serve(AUTH_JWKS, jwk)
    token = sign(user_header(keys["rsa"], alg="PS256"), user_claims(server, clock),
                 keys["rsa"].private_key, "PS256")
    assert authenticate(make_verifier(), token).kind == "user"


def test_user_token_alg_must_match_the_alg_the_key_declares(make_verifier, server, clock, keys):
    server.serve(AUTH_JWKS, keys["rsa"])  # the JWK says alg: RS256
    token = sign(user_header(keys["rsa"], alg="PS256"), user_claims(server, clock),
                 keys["rsa"].private_key, "PS256")
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert "'PS256' not allowed" in error.reason


def test_expired_user_token_fails_user_verification(make_verifier, server, clock, keys):
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now - 7200)
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert error.reason == "token expired"


def test_user_token_expired_within_leeway_is_accepted(make_verifier, server, clock, keys):
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now - 63, ttl=60)
    assert authenticate(make_verifier(leewaySeconds=5), token).kind == "user"


def test_user_token_without_exp_fails(make_verifier, server, clock, keys):
    token = sign(user_header(keys["user"]), user_claims(server, clock, exp=None),
                 keys["user"].private_key, "ES256")
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert error.reason == "missing exp claim"


def test_user_token_nbf_in_future_fails(make_verifier, server, clock, keys):
    token = sign(user_header(keys["user"]), user_claims(server, clock, nbf=int(clock.now) + 60),
                 keys["user"].private_key, "ES256")
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert "nbf" in error.reason


def test_user_token_iat_in_future_fails(make_verifier, server, clock, keys):
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now + 60)
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert "iat" in error.reason


def test_forged_user_token_fails(make_verifier, server, clock, keys):
    forged = mint_user_token(keys["other"], issuer=issuer(server), now=clock.now,
                             kid=keys["user"].kid)
    error = expect_failure(make_verifier(), forged, "Failed user token verification")
    assert error.reason == "invalid signature"


def test_tampered_user_token_payload_fails(make_verifier, server, clock, keys):
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    header, _, signature = token.split(".")
    evil = b64url(json.dumps(user_claims(server, clock, sub="user:default/admin")).encode())
    error = expect_failure(make_verifier(), f"{header}.{evil}.{signature}",
                           "Failed user token verification")
    assert error.reason == "invalid signature"


def test_truncated_user_token_fails(make_verifier, server, clock, keys):
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    expect_failure(make_verifier(), token[:-10], "Failed user token verification")


def test_user_token_with_alg_none_fails(make_verifier, server, clock, keys):
    token = sign(user_header(keys["user"], alg="none"), user_claims(server, clock), None, "none")
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert "'none' not allowed" in error.reason


def test_user_token_hs256_signed_with_the_jwks_public_key_fails(make_verifier, server, clock,
                                                                keys):
    server.serve(AUTH_JWKS, keys["rsa"])
    verifier = make_verifier()
    public_pem = keys["rsa"].private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk_json = json.dumps(keys["rsa"].public_jwk()).encode()
    for secret in (public_pem, jwk_json):
        token = sign(user_header(keys["rsa"], alg="HS256"), user_claims(server, clock), secret,
                     "HS256")
        error = expect_failure(verifier, token, "Failed user token verification")
        assert "'HS256' not allowed" in error.reason


@pytest.mark.parametrize("name", ["jku", "x5u", "jwk"])
def test_user_token_with_key_location_header_is_refused(make_verifier, server, clock, keys,
                                                        name):
    value = (keys["other"].public_jwk() if name == "jwk" else f"{server.url}/evil/jwks.json")
    server.serve("/evil/jwks.json", keys["other"])
    token = sign(user_header(keys["other"], **{name: value}), user_claims(server, clock),
                 keys["other"].private_key, "ES256")
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert error.reason == f"token carries a '{name}' header"
    assert server.hits["/evil/jwks.json"] == 0


def test_user_token_x5c_header_is_ignored(make_verifier, server, clock, keys):
    token = sign(user_header(keys["user"], x5c=["bm90IGEgY2VydA=="]), user_claims(server, clock),
                 keys["user"].private_key, "ES256")
    assert authenticate(make_verifier(), token).kind == "user"


def test_user_token_with_wrong_issuer_fails(make_verifier, server, clock, keys):
    token = mint_user_token(keys["user"], issuer="https://evil.example/api/auth", now=clock.now)
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert "iss" in error.reason
    assert server.hits[AUTH_JWKS] == 0


def test_user_token_issuer_may_be_the_external_auth_url(make_verifier, server, clock, keys):
    endpoints = [{"target": {"internal": f"{server.url}/api/{{{{pluginId}}}}",
                             "external": "https://backstage.example.com/api/{{ pluginId }}"},
                  "plugins": ["auth"]}]
    token = mint_user_token(keys["user"], issuer="https://backstage.example.com/api/auth",
                            now=clock.now)
    assert authenticate(make_verifier(endpoints=endpoints), token).kind == "user"


def test_user_token_with_wrong_audience_fails(make_verifier, server, clock, keys):
    token = sign(user_header(keys["user"]), user_claims(server, clock, aud="catalog"),
                 keys["user"].private_key, "ES256")
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert "aud" in error.reason


def test_user_token_with_wrong_typ_is_illegal_token(make_verifier, server, clock, keys):
    token = sign(user_header(keys["user"], typ="JWT"), user_claims(server, clock),
                 keys["user"].private_key, "ES256")
    expect_failure(make_verifier(), token, "Illegal token")


def test_user_token_whose_sub_is_not_a_user_ref_fails(make_verifier, server, clock, keys):
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now,
                            subject="group:default/admins")
    error = expect_failure(make_verifier(), token, "Failed user token verification")
    assert "sub" in error.reason


# -- plugin tokens ---------------------------------------------------------------------------


def test_plugin_token_gives_service_principal(make_verifier, server, clock, keys):
    token = mint_plugin_token(keys["plugin"], subject_plugin="catalog", target_plugin="insights",
                              now=clock.now)
    principal = authenticate(make_verifier(), token)
    assert principal == Principal(kind="service", subject="plugin:catalog", source="plugin",
                                  expires_at=clock.now + 3600)
    assert server.hits[plugin_jwks_path("catalog")] == 1


def test_plugin_token_for_another_audience_fails(make_verifier, server, clock, keys):
    token = mint_plugin_token(keys["plugin"], subject_plugin="catalog", target_plugin="search",
                              now=clock.now)
    error = expect_failure(make_verifier(), token, "Failed plugin token verification")
    assert "aud" in error.reason


def test_plugin_token_signed_by_another_plugin_key_fails(make_verifier, server, clock, keys):
    token = mint_plugin_token(keys["other"], subject_plugin="catalog", target_plugin="insights",
                              now=clock.now, kid=keys["plugin"].kid)
    expect_failure(make_verifier(), token, "Failed plugin token verification")


def test_expired_plugin_token_fails(make_verifier, server, clock, keys):
    token = mint_plugin_token(keys["plugin"], subject_plugin="catalog", target_plugin="insights",
                              now=clock.now - 7200)
    error = expect_failure(make_verifier(), token, "Failed plugin token verification")
    assert error.reason == "token expired"


@pytest.mark.parametrize("subject", ["../../evil", "Catalog", "cat/alog", "cat@evil.example",
                                     "catalog\n", ""])
def test_plugin_token_with_invalid_subject_fails_before_any_fetch(make_verifier, server, clock,
                                                                  keys, subject):
    token = sign({"typ": "vnd.backstage.plugin", "alg": "ES256", "kid": keys["plugin"].kid},
                 {"sub": subject, "aud": "insights", "iat": int(clock.now),
                  "exp": int(clock.now) + 60}, keys["plugin"].private_key, "ES256")
    error = expect_failure(make_verifier(), token, "Failed plugin token verification")
    assert "not a plugin id" in error.reason
    assert sum(server.hits.values()) == 0


def test_plugin_keys_are_fetched_from_the_discovery_endpoint(make_verifier, server, clock, keys):
    server.serve("/custom/catalog/.backstage/auth/v1/jwks.json", keys["plugin"])
    endpoints = [{"target": f"{server.url}/custom/{{{{ pluginId }}}}/", "plugins": ["catalog"]}]
    token = mint_plugin_token(keys["plugin"], subject_plugin="catalog", target_plugin="insights",
                              now=clock.now)
    assert authenticate(make_verifier(endpoints=endpoints), token).subject == "plugin:catalog"
    assert server.hits["/custom/catalog/.backstage/auth/v1/jwks.json"] == 1
    assert server.hits[plugin_jwks_path("catalog")] == 0


def test_plugin_token_from_plugin_without_jwks_fails_verification(make_verifier, server, clock,
                                                                   keys):
    token = mint_plugin_token(keys["plugin"], subject_plugin="nokeys", target_plugin="insights",
                              now=clock.now)
    error = expect_failure(make_verifier(), token, "Failed plugin token verification")
    assert "no key" in error.reason


def test_plugin_key_sources_held_are_bounded(make_verifier, server, clock, keys):
    verifier = make_verifier(maxPluginKeySources=3)
    for i in range(6):
        plugin = f"caller-{i}"
        server.serve(plugin_jwks_path(plugin), keys["plugin"])
        token = mint_plugin_token(keys["plugin"], subject_plugin=plugin,
                                  target_plugin="insights", now=clock.now)
        assert authenticate(verifier, token).subject == f"plugin:{plugin}"
    assert len([s for s in verifier.sources if s.kind == "plugin"]) == 3


def test_flood_of_random_plugin_subjects_is_rate_limited(make_verifier, server, clock, keys):
    verifier = make_verifier()
    outcomes: Counter[str] = Counter()
    for i in range(100):
        token = mint_plugin_token(keys["plugin"], subject_plugin=f"random-{i}",
                                  target_plugin="insights", now=clock.now)
        try:
            authenticate(verifier, token)
        except CredentialError:
            outcomes["401"] += 1
        except KeySourceUnavailable:
            outcomes["503"] += 1
    assert sum(server.hits.values()) <= 32
    assert outcomes == {"401": 32, "503": 68}


# -- static, legacy and jwks external access -------------------------------------------------


def static_entry(token: str = STATIC_TOKEN, subject: str = "ci-bot",
                 **extra: Any) -> dict[str, Any]:
    return {"type": "static", "options": {"token": token, "subject": subject}, **extra}


def legacy_entry(secret: str = LEGACY_SECRET, subject: str = "old-service") -> dict[str, Any]:
    return {"type": "legacy", "options": {"secret": secret, "subject": subject}}


def jwks_entry(server: JwksServer, **options: Any) -> dict[str, Any]:
    return {"type": "jwks", "options": {"url": f"{server.url}{IDP_JWKS}",
                                        "issuer": "https://idp.example", "algorithm": "RS256",
                                        **options}}


def idp_token(keys: dict[str, DevKey], clock: Clock, **claims: Any) -> str:
    body = {"iss": "https://idp.example", "sub": "svc-123", "aud": "backstage-api",
            "iat": int(clock.now), "exp": int(clock.now) + 300, **claims}
    return sign({"alg": "RS256", "kid": keys["idp"].kid, "typ": "JWT"}, body,
                keys["idp"].private_key, "RS256")


def test_static_token_gives_external_subject(make_verifier):
    principal = authenticate(make_verifier(external=[static_entry()]), STATIC_TOKEN)
    assert principal == Principal(kind="service", subject="external:ci-bot", source="static")


def test_wrong_static_token_is_illegal_token(make_verifier):
    expect_failure(make_verifier(external=[static_entry()]), STATIC_TOKEN + "x", "Illegal token")


def test_static_token_is_compared_in_constant_time(make_verifier, monkeypatch):
    verifier = make_verifier(external=[static_entry()])
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    authenticate(verifier, STATIC_TOKEN)
    digest = hashlib.sha256(STATIC_TOKEN.encode()).digest()
    assert calls == [(digest, digest)]
    assert all(STATIC_TOKEN.encode() not in (a, b) for a, b in calls)


@pytest.mark.parametrize(("token", "problem"), [("short", "at least 8 characters"),
                                                ("has white space", "non-space")])
def test_bad_static_token_in_config_is_a_config_error_naming_the_key(server, token, problem):
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_config(config_for(server, external=[static_entry(token)]))
    assert "'backend.auth.externalAccess[0].options.token'" in str(info.value)
    assert problem in str(info.value)


def test_static_entry_without_subject_is_missing_config(server, tmp_path):
    path = tmp_path / "app-config.yaml"
    path.write_text(f"backend:\n  baseUrl: {server.url}\n  auth:\n    externalAccess:\n"
                    f"      - type: static\n        options:\n          token: {STATIC_TOKEN}\n")
    with pytest.raises(MissingConfigError) as info:
        AuthSettings.from_config(load_config([path], env={}))
    assert str(info.value) == ("Missing required config value at "
                               f"'backend.auth.externalAccess[0].options.subject' in '{path}'")


def test_legacy_token_gives_service_principal(make_verifier, clock):
    token = mint_legacy_token(LEGACY_SECRET, now=clock.now)
    principal = authenticate(make_verifier(external=[legacy_entry()]), token)
    assert principal == Principal(kind="service", subject="external:old-service",
                                  source="legacy", expires_at=clock.now + 3600)


def test_expired_legacy_token_is_illegal_token(make_verifier, clock):
    token = mint_legacy_token(LEGACY_SECRET, now=clock.now - 7200)
    error = expect_failure(make_verifier(external=[legacy_entry()]), token, "Illegal token")
    assert "expired" in error.reason


def test_legacy_token_without_exp_is_rejected(make_verifier, clock):
    token = mint_legacy_token(LEGACY_SECRET, ttl=None, now=clock.now)
    error = expect_failure(make_verifier(external=[legacy_entry()]), token, "Illegal token")
    assert "missing exp" in error.reason


def test_legacy_token_with_another_secret_is_illegal_token(make_verifier, clock):
    other = base64.b64encode(b"another-secret-of-32-bytes-long!").decode()
    token = mint_legacy_token(other, now=clock.now)
    error = expect_failure(make_verifier(external=[legacy_entry()]), token, "Illegal token")
    assert "no configured secret" in error.reason


def test_jwks_external_token_gives_prefixed_external_subject(make_verifier, server, clock, keys):
    verifier = make_verifier(external=[jwks_entry(server, subjectPrefix="idp",
                                                  audience="backstage-api")])
    principal = authenticate(verifier, idp_token(keys, clock))
    assert principal == Principal(kind="service", subject="external:idp:svc-123",
                                  source=f"jwks:{server.url}{IDP_JWKS}",
                                  expires_at=clock.now + 300)


def test_jwks_external_token_without_prefix(make_verifier, server, clock, keys):
    principal = authenticate(make_verifier(external=[jwks_entry(server)]),
                             idp_token(keys, clock))
    assert principal.subject == "external:svc-123"


def test_jwks_external_token_for_other_audience_is_illegal_token(make_verifier, server, clock,
                                                                 keys):
    verifier = make_verifier(external=[jwks_entry(server, audience="backstage-api")])
    error = expect_failure(verifier, idp_token(keys, clock, aud="elsewhere"), "Illegal token")
    assert "aud" in error.reason


def test_jwks_external_token_with_unconfigured_algorithm_is_illegal_token(make_verifier, server,
                                                                          clock, keys):
    verifier = make_verifier(external=[jwks_entry(server, algorithm="ES256")])
    error = expect_failure(verifier, idp_token(keys, clock), "Illegal token")
    assert "not configured" in error.reason


def test_jwks_external_token_from_other_issuer_is_illegal_token(make_verifier, server, clock,
                                                                keys):
    verifier = make_verifier(external=[jwks_entry(server)])
    expect_failure(verifier, idp_token(keys, clock, iss="https://other.example"),
                   "Illegal token")
    assert server.hits[IDP_JWKS] == 0


def test_jwks_external_token_without_exp_is_illegal_token(make_verifier, server, clock, keys):
    verifier = make_verifier(external=[jwks_entry(server)])
    error = expect_failure(verifier, idp_token(keys, clock, exp=None), "Illegal token")
    assert "exp" in error.reason


@pytest.mark.parametrize("algorithm", ["HS256", "none"])
def test_jwks_entry_with_symmetric_or_none_algorithm_is_a_config_error(server, algorithm):
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_config(config_for(server, external=[jwks_entry(server,
                                                                         algorithm=algorithm)]))
    assert "'backend.auth.externalAccess[0].options.algorithm'" in str(info.value)


def test_access_restrictions_are_carried_on_the_principal(make_verifier):
    entry = static_entry(accessRestrictions=[
        {"plugin": "insights", "permission": "insights.read, insights.list"},
        {"plugin": "catalog", "permissionAttribute": {"action": ["read"]}},
    ])
    principal = authenticate(make_verifier(external=[entry]), STATIC_TOKEN, "insights")
    assert principal.access_plugins == frozenset({"insights", "catalog"})
    assert principal.access_permissions == frozenset({"insights.read", "insights.list"})
    assert principal.access_actions is None


def test_access_restrictions_for_another_plugin_allow_nothing_here(make_verifier, clock):
    entry = legacy_entry() | {"accessRestrictions": [{"plugin": "catalog"}]}
    token = mint_legacy_token(LEGACY_SECRET, now=clock.now)
    principal = authenticate(make_verifier(external=[entry]), token, "insights")
    assert principal.access_plugins == frozenset({"catalog"})
    assert principal.access_permissions == frozenset()


def test_unrestricted_external_access_has_no_restrictions(make_verifier):
    principal = authenticate(make_verifier(external=[static_entry()]), STATIC_TOKEN)
    assert principal.access_plugins is None
    assert principal.access_permissions is None


# -- key sources: rotation, outages, rate limits ---------------------------------------------


def test_key_rotation_new_kid_is_fetched(make_verifier, server, clock, keys):
    verifier = make_verifier()
    authenticate(verifier, mint_user_token(keys["user"], issuer=issuer(server), now=clock.now))
    server.serve(AUTH_JWKS, keys["user"], keys["es384"])  # the auth backend rotates
    clock.advance(6)
    rotated = mint_user_token(keys["es384"], issuer=issuer(server), now=clock.now)
    assert authenticate(verifier, rotated).subject == "user:default/jane"
    assert server.hits[AUTH_JWKS] == 2


def test_unknown_kid_after_a_fetch_fails_without_asking_for_keys_again(make_verifier, server,
                                                                       clock, keys):
    verifier = make_verifier()
    unknown = mint_user_token(keys["other"], issuer=issuer(server), now=clock.now)
    with pytest.raises(KeysNeeded):
        verifier.verify(unknown, "insights")
    asyncio.run(verifier.refresh(verifier.user_source))
    with pytest.raises(CredentialError) as info:
        verifier.verify(unknown, "insights")
    assert info.value.message == "Failed user token verification"
    assert "no key for kid" in info.value.reason


def test_burst_of_random_kids_fetches_the_jwks_at_most_once(make_verifier, server, clock, keys):
    verifier = make_verifier()
    for _ in range(200):
        forged = mint_user_token(keys["other"], issuer=issuer(server), now=clock.now,
                                 kid=secrets.token_urlsafe(12))
        expect_failure(verifier, forged, "Failed user token verification")
    assert server.hits[AUTH_JWKS] == 1


def test_jwks_is_refetched_only_after_the_refetch_interval(make_verifier, server, clock, keys):
    verifier = make_verifier(jwksRefetchIntervalSeconds=10)
    forged = mint_user_token(keys["other"], issuer=issuer(server), now=clock.now)
    expect_failure(verifier, forged, "Failed user token verification")
    clock.advance(9)
    expect_failure(verifier, forged, "Failed user token verification")
    assert server.hits[AUTH_JWKS] == 1
    clock.advance(1)
    expect_failure(verifier, forged, "Failed user token verification")
    assert server.hits[AUTH_JWKS] == 2


def test_concurrent_requests_share_one_fetch_and_all_see_its_keys(make_verifier, server, clock,
                                                                   keys):
    verifier = make_verifier()
    server.delay = 0.2
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)

    async def many() -> list[Principal]:
        return await asyncio.gather(*(verifier.authenticate(token, "insights")
                                      for _ in range(20)))

    assert {p.subject for p in asyncio.run(many())} == {"user:default/jane"}
    assert server.hits[AUTH_JWKS] == 1
    assert verifier.stats["jwks_fetch_ok"] == 1


class RunawayClock(Clock):
    """Every reading is a minute later: the refetch cooldown is always over."""

    def __call__(self) -> float:
        self.now += 60
        return self.now


def test_a_key_source_is_fetched_at_most_once_per_request(server, keys):
    """However soon the source may be asked again, one request fetches it once: a source that
    lacks the key after its fetch is a 503, not a loop of fetches (stagedoor.auth.settle)."""
    clock = RunawayClock()
    server.serve(AUTH_JWKS, keys["user"])
    verifier = TokenVerifier(AuthSettings.from_config(config_for(server)), clock=clock)
    unknown = mint_user_token(keys["other"], issuer=issuer(server), now=clock.now)
    with pytest.raises(KeySourceUnavailable) as info:
        authenticate(verifier, unknown)
    assert info.value.retry_after == 5 and info.value.source_url == f"{server.url}{AUTH_JWKS}"
    assert server.hits[AUTH_JWKS] == 1
    with pytest.raises(KeySourceUnavailable):  # the next request may fetch it again, once
        authenticate(verifier, unknown)
    assert server.hits[AUTH_JWKS] == 2


def test_every_candidate_key_set_is_fetched_once_in_one_round(make_verifier, server, clock,
                                                              keys):
    """Two external key sets trust the same issuer; the token's key is in the second one."""
    server.serve("/idp-old/jwks.json", keys["other"])
    verifier = make_verifier(external=[jwks_entry(server, url=f"{server.url}/idp-old/jwks.json"),
                                       jwks_entry(server)])
    principal = authenticate(verifier, idp_token(keys, clock))
    assert principal.source == f"jwks:{server.url}{IDP_JWKS}"
    assert server.hits == Counter({"/idp-old/jwks.json": 1, IDP_JWKS: 1})


def test_jwks_down_after_first_fetch_still_verifies_from_cached_keys(make_verifier, server,
                                                                     clock, keys):
    verifier = make_verifier()
    authenticate(verifier, mint_user_token(keys["user"], issuer=issuer(server), now=clock.now))
    server.stop()
    clock.advance(3600)  # past jwksMaxAgeSeconds: a refresh is tried, fails, stale keys serve
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    assert authenticate(verifier, token).subject == "user:default/jane"
    assert verifier.stats["jwks_fetch_failed"] == 1


def test_jwks_down_from_start_is_key_source_unavailable(make_verifier, server, clock, keys):
    verifier = make_verifier()
    server.stop()
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    with pytest.raises(KeySourceUnavailable) as info:
        authenticate(verifier, token)
    assert info.value.message == "Unable to verify credentials: a key source is unavailable"
    assert info.value.source_url == f"{server.url}{AUTH_JWKS}"
    assert 1 <= info.value.retry_after <= 5
    assert server.url not in str(info.value)


def test_unknown_kid_while_jwks_is_down_is_key_source_unavailable(make_verifier, server, clock,
                                                                  keys):
    verifier = make_verifier()
    authenticate(verifier, mint_user_token(keys["user"], issuer=issuer(server), now=clock.now))
    server.stop()
    clock.advance(6)
    rotated = mint_user_token(keys["es384"], issuer=issuer(server), now=clock.now)
    with pytest.raises(KeySourceUnavailable):
        authenticate(verifier, rotated)


@pytest.mark.parametrize("mode", ["garbage", "error", "reset"])
def test_broken_jwks_response_is_key_source_unavailable(make_verifier, server, clock, keys,
                                                        mode):
    verifier = make_verifier()
    server.mode = mode
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    with pytest.raises(KeySourceUnavailable):
        authenticate(verifier, token)
    assert verifier.stats["jwks_fetch_failed"] == 1


def test_jwks_without_usable_keys_is_a_failed_fetch(make_verifier, server, clock, keys):
    verifier = make_verifier()
    server.documents[AUTH_JWKS] = {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"},
                                            {"kty": "EC", "crv": "P-256", "x": "bad", "y": "bad"}]}
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    with pytest.raises(KeySourceUnavailable) as info:
        authenticate(verifier, token)
    assert "usable" in info.value.reason


def test_garbage_jwks_keeps_previously_fetched_keys(make_verifier, server, clock, keys):
    verifier = make_verifier()
    authenticate(verifier, mint_user_token(keys["user"], issuer=issuer(server), now=clock.now))
    server.documents[AUTH_JWKS] = b"{not json"
    clock.advance(3600)
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    assert authenticate(verifier, token).kind == "user"
    assert server.hits[AUTH_JWKS] == 2


def test_slow_jwks_times_out_as_key_source_unavailable(make_verifier, server, clock, keys):
    verifier = make_verifier(jwksTimeoutSeconds=0.2)
    server.delay = 1.0
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    started = time.monotonic()
    with pytest.raises(KeySourceUnavailable) as info:
        authenticate(verifier, token)
    assert time.monotonic() - started < 0.9
    assert "timed out" in info.value.reason


def test_jwks_key_without_kid_is_used_when_it_is_the_only_key(make_verifier, server, clock,
                                                              keys):
    jwk = keys["user"].public_jwk()
    del jwk["kid"]
    server.serve(AUTH_JWKS, jwk)
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    assert authenticate(make_verifier(), token).kind == "user"


def test_prefetch_fetches_every_known_source_and_never_raises(make_verifier, server, clock,
                                                             keys):
    endpoints = [{"target": f"{server.url}/api/{{{{pluginId}}}}", "plugins": ["catalog"]}]
    verifier = make_verifier(endpoints=endpoints, external=[jwks_entry(server)])
    asyncio.run(verifier.prefetch())
    assert server.hits == Counter({AUTH_JWKS: 1, plugin_jwks_path("catalog"): 1, IDP_JWKS: 1})
    server.stop()
    clock.advance(6)
    asyncio.run(verifier.prefetch())  # everything down: logged, not raised
    assert verifier.stats["jwks_fetch_failed"] == 3


def test_prefetched_keys_verify_without_asking_for_keys(make_verifier, server, clock, keys):
    verifier = make_verifier()
    asyncio.run(verifier.prefetch())
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    assert verifier.verify(token, "insights").kind == "user"


def test_injected_http_client_factory_is_used_for_fetches(server, clock, keys):
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requested.append(str(request.url))
        return httpx.Response(200, json=keys["user"].jwks())

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    verifier = TokenVerifier(AuthSettings.from_config(config_for(server)), clock=clock,
                             http_client_factory=lambda: client)
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    assert authenticate(verifier, token).kind == "user"
    assert not client.is_closed  # the verifier uses the client it is given, never closes it
    assert requested == [f"{server.url}{AUTH_JWKS}"]
    assert sum(server.hits.values()) == 0


# -- verified-token cache --------------------------------------------------------------------


def test_verified_token_cache_hit_is_counted(make_verifier, server, clock, keys):
    verifier = make_verifier()
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    first = authenticate(verifier, token)
    assert authenticate(verifier, token) == first
    assert verifier.stats["verified_cached"] == 1
    assert verifier.stats["verified_ok"] == 1


def test_cached_token_still_expires(make_verifier, server, clock, keys):
    verifier = make_verifier()
    token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now, ttl=60)
    authenticate(verifier, token)
    clock.advance(120)
    expect_failure(verifier, token, "Failed user token verification")


def test_cached_plugin_token_is_not_valid_for_another_plugin(make_verifier, server, clock, keys):
    verifier = make_verifier()
    token = mint_plugin_token(keys["plugin"], subject_plugin="catalog", target_plugin="insights",
                              now=clock.now)
    authenticate(verifier, token, "insights")
    expect_failure(verifier, token, "Failed plugin token verification", plugin_id="search")


def test_cache_is_bounded(make_verifier, server, clock, keys):
    verifier = make_verifier(tokenCacheSize=5)
    for i in range(8):
        token = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now,
                                subject=f"user:default/u{i}")
        authenticate(verifier, token)
    assert len(verifier._cache) == 5


# -- config, logging, dev keys ---------------------------------------------------------------


def test_missing_base_url_is_missing_config_error(tmp_path):
    path = tmp_path / "app-config.yaml"
    path.write_text("backend:\n  baseUrl: ${BACKEND_URL}\n")
    with pytest.raises(MissingConfigError) as info:
        AuthSettings.from_config(load_config([path], env={}))
    assert str(info.value) == f"Missing required config value at 'backend.baseUrl' in '{path}'"


def test_unknown_external_access_type_is_a_config_error(server):
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_config(config_for(server, external=[{"type": "magic", "options": {}}]))
    assert "'backend.auth.externalAccess[0].type'" in str(info.value)


def test_discovery_base_urls_follow_backstage_rules(server):
    settings = AuthSettings.from_config(config_for(server, endpoints=[
        {"target": "http://internal:8080/api/{{ pluginId }}/", "plugins": ["catalog", "search"]},
    ]))
    assert settings.base_url_for("catalog") == "http://internal:8080/api/catalog"
    assert settings.base_url_for("search") == "http://internal:8080/api/search"
    assert settings.base_url_for("insights") == f"{server.url}/api/insights"
    assert settings.user_jwks_url == f"{server.url}{AUTH_JWKS}"


def test_logs_never_contain_tokens_or_signatures(make_verifier, server, clock, keys, caplog):
    caplog.set_level(logging.DEBUG, logger="stagedoor.auth")
    verifier = make_verifier(external=[static_entry(), legacy_entry()])
    good = mint_user_token(keys["user"], issuer=issuer(server), now=clock.now)
    presented = [
        good,
        good[:-4] + "AAAA",
        mint_user_token(keys["user"], issuer=issuer(server), now=clock.now - 7200),
        mint_legacy_token(LEGACY_SECRET, ttl=None, now=clock.now),
        STATIC_TOKEN,
        STATIC_TOKEN + "-wrong",
    ]
    for token in presented:
        with contextlib.suppress(CredentialError):
            authenticate(verifier, token)
    server.stop()
    clock.advance(3600)
    with pytest.raises(KeySourceUnavailable):
        authenticate(verifier, mint_user_token(keys["es384"], issuer=issuer(server),
                                               now=clock.now))
    text = caplog.text
    assert "Rejected credential" in text and "Failed to fetch JWKS" in text
    for token in presented:
        assert token not in text
        assert token.rsplit(".", 1)[-1] not in text


def test_dev_keys_are_created_private_and_reloaded(tmp_path):
    first = generate_dev_keys(tmp_path / "keys")
    second = generate_dev_keys(tmp_path / "keys")
    assert first.user.kid == second.user.kid and first.plugin.kid == second.plugin.kid
    assert first.user.kid != first.plugin.kid
    for path in (first.user.path, first.plugin.path):
        assert path is not None and os.stat(path).st_mode & 0o777 == 0o600
    [jwk] = first.user_jwks()["keys"]
    assert jwk == public_jwk(first.user.private_key, kid=first.user.kid)
    assert jwk["alg"] == "ES256" and jwk["use"] == "sig" and "d" not in jwk


def test_minted_user_token_is_shaped_like_backstage(keys):
    token = mint_user_token(keys["user"], issuer="http://localhost:7007/api/auth", now=1000)
    header, claims, _ = (json.loads(base64.urlsafe_b64decode(part + "==")) if i < 2 else None
                         for i, part in enumerate(token.split(".")))
    assert header == {"alg": "ES256", "kid": keys["user"].kid, "typ": "vnd.backstage.user"}
    assert list(claims) == ["iss", "sub", "ent", "aud", "iat", "exp", "uip"]
    assert claims["aud"] == "backstage" and claims["exp"] == 4600


def test_dev_keys_verify_end_to_end(server, clock, tmp_path):
    dev = generate_dev_keys(tmp_path / "keys")
    server.documents[AUTH_JWKS] = dev.user_jwks()
    server.documents[plugin_jwks_path("catalog")] = dev.plugin_jwks()
    verifier = TokenVerifier(AuthSettings.from_config(config_for(server)), clock=clock)
    user = mint_user_token(dev.user, issuer=issuer(server), now=clock.now)
    plugin = mint_plugin_token(dev.plugin, subject_plugin="catalog", target_plugin="insights",
                               now=clock.now)
    assert authenticate(verifier, user).subject == "user:default/jane"
    assert authenticate(verifier, plugin).subject == "plugin:catalog"
