"""Each row of docs/credentials.md, end to end: a real `stagedoor run` process, real JWKS
endpoints on 127.0.0.1, tokens signed with keys generated here."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from stagedoor.devkeys import DevKey, mint_legacy_token, mint_plugin_token, mint_user_token

from .conftest import ROOT, RecordingServer, Sidecar, closed_port, start_sidecar, write_config
from .httpraw import request

pytestmark = pytest.mark.e2e

USER_JWKS = "/api/auth/.well-known/jwks.json"
CATALOG_JWKS = "/api/catalog/.backstage/auth/v1/jwks.json"
EXT_JWKS = "/ext/jwks.json"
EXT_ISSUER = "https://ext-idp.test"
STATIC_TOKEN = "static-token-0123456789abcdef"
LEGACY_SECRET = base64.b64encode(b"a-legacy-shared-secret-32-bytes!").decode()

POLICIES = {
    "svc.yaml": """\
pluginId: svc
routes:
  - path: /things/{id}
    auth: [user, service]
    params: {id: '^[a-z0-9-]+$'}
    upstream: ${insights.externalApiUrl}/things/{id}
""",
    "other.yaml": """\
pluginId: other
routes:
  - path: /things
    auth: [service]
    upstream: ${insights.externalApiUrl}/other
""",
}


class AuthEnv:
    def __init__(self, tmp: Path) -> None:
        self.idp = RecordingServer("json")          # the Backstage backend's key endpoints
        self.upstream = RecordingServer("json")
        self.ext = RecordingServer("json")          # an external OIDC-ish JWKS issuer
        self.user_key = DevKey.generate("ES256", kid="user-1")
        self.catalog_key = DevKey.generate("ES256", kid="catalog-1")
        self.ext_key = DevKey.generate("RS256", kid="ext-1")
        self.idp.jwks_by_path[USER_JWKS] = self.user_key.jwks()
        self.idp.jwks_by_path[CATALOG_JWKS] = self.catalog_key.jwks()
        self.ext.jwks_by_path[EXT_JWKS] = self.ext_key.jwks()
        self.issuer = f"{self.idp.url}/api/auth"
        policies = tmp / "policies"
        policies.mkdir()
        shutil.copy(ROOT / "policies" / "insights.yaml", policies / "insights.yaml")
        for name, text in POLICIES.items():
            (policies / name).write_text(text)
        self.policies = policies
        self.config = write_config(tmp / "app-config.yaml", f"""\
            backend:
              baseUrl: {self.idp.url}
              auth:
                externalAccess:
                  - type: static
                    options: {{token: {STATIC_TOKEN}, subject: ci-bot}}
                    accessRestrictions:
                      - plugin: svc
                  - type: legacy
                    options: {{secret: "{LEGACY_SECRET}", subject: legacy-caller}}
                  - type: jwks
                    options:
                      url: {self.ext.url}{EXT_JWKS}
                      issuer: {EXT_ISSUER}
                      algorithm: RS256
                      audience: stagedoor
                      subjectPrefix: ext
            insights:
              externalApiUrl: {self.upstream.url}
            stagedoor:
              auth:
                jwksRefetchIntervalSeconds: 1
            """)
        self.sidecar: Sidecar = start_sidecar([self.config], policies)

    def user_token(self, **kw) -> str:
        kw.setdefault("issuer", self.issuer)
        return mint_user_token(kw.pop("key", self.user_key), **kw)

    def call(self, target: str, token: str | None, headers: dict[str, str] | None = None):
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        return request(self.sidecar.port, "GET", target, all_headers)

    def stop(self) -> None:
        self.sidecar.stop()
        for server in (self.idp, self.upstream, self.ext):
            server.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthEnv]:
    e = AuthEnv(tmp_path_factory.mktemp("auth"))
    yield e
    e.stop()


def assert_401(resp, message: str) -> None:
    assert resp.status == 401, resp.body
    assert resp.json()["error"] == {"name": "AuthenticationError", "message": message}
    assert resp.header("www-authenticate") == "Bearer"


def seen_principal(env: AuthEnv) -> tuple[str, str]:
    headers = env.upstream.seen[-1].headers
    return headers["x-stagedoor-principal"][0], headers["x-stagedoor-principal-type"][0]


def sign(claims: dict, header: dict, key) -> str:
    return jwt.encode(claims, key, algorithm=header.get("alg", "ES256"), headers=header)


# -- user tokens -----------------------------------------------------------------------------------
def test_user_token_is_a_user_principal(env):
    resp = env.call("/api/insights/services/payments-api", env.user_token())
    assert resp.status == 200, resp.body
    assert seen_principal(env) == ("user:default/jane", "user")


def test_user_token_shaped_like_backstage_is_accepted(env):
    token = env.user_token(subject="user:default/guest", ownership=["user:default/guest",
                                                                    "group:default/team-a"])
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["typ"] == "vnd.backstage.user" and header["alg"] == "ES256" and header["kid"]
    assert claims["aud"] == "backstage" and "uip" in claims and "ent" in claims
    assert env.call("/api/insights/services/payments-api", token).status == 200


def test_expired_user_token_fails_verification(env):
    token = env.user_token(now=time.time() - 7200, ttl=60)
    assert_401(env.call("/api/insights/services/x", token), "Failed user token verification")


def test_forged_user_token_fails_verification(env):
    forger = DevKey.generate("ES256", kid="user-1")  # same kid, other key
    token = env.user_token(key=forger)
    assert_401(env.call("/api/insights/services/x", token), "Failed user token verification")


def test_tampered_user_token_fails_verification(env):
    head, payload, sig = env.user_token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "user:default/admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert_401(env.call("/api/insights/services/x", f"{head}.{forged}.{sig}"),
               "Failed user token verification")


def test_alg_none_user_token_is_refused(env):
    header = base64.urlsafe_b64encode(json.dumps(
        {"alg": "none", "typ": "vnd.backstage.user", "kid": "user-1"}).encode()).rstrip(b"=")
    claims = base64.urlsafe_b64encode(json.dumps(
        {"iss": env.issuer, "sub": "user:default/jane", "aud": "backstage",
         "exp": int(time.time()) + 600}).encode()).rstrip(b"=")
    token = f"{header.decode()}.{claims.decode()}."
    resp = env.call("/api/insights/services/x", token)
    assert resp.status == 401
    assert resp.json()["error"]["message"] in ("Failed user token verification", "Illegal token")


def test_user_token_from_another_issuer_fails(env):
    token = env.user_token(issuer="http://evil.test/api/auth")
    assert_401(env.call("/api/insights/services/x", token), "Failed user token verification")


def test_failure_reason_is_not_in_the_response(env):
    token = env.user_token(now=time.time() - 7200, ttl=60)
    body = env.call("/api/insights/services/x", token).body.lower()
    assert b"expired" not in body and b"signature" not in body


# -- plugin tokens ---------------------------------------------------------------------------------
def test_plugin_token_is_a_service_principal(env):
    token = mint_plugin_token(env.catalog_key, subject_plugin="catalog", target_plugin="svc")
    resp = env.call("/api/svc/things/a", token)
    assert resp.status == 200, resp.body
    assert seen_principal(env) == ("plugin:catalog", "service")


def test_plugin_token_for_another_audience_fails(env):
    token = mint_plugin_token(env.catalog_key, subject_plugin="catalog", target_plugin="other")
    assert_401(env.call("/api/svc/things/a", token), "Failed plugin token verification")


def test_plugin_token_on_a_user_only_route_is_403(env):
    token = mint_plugin_token(env.catalog_key, subject_plugin="catalog",
                              target_plugin="insights")
    resp = env.call("/api/insights/services/payments-api", token)
    assert resp.status == 403
    assert resp.json()["error"]["message"] == \
        "This endpoint does not allow 'service' credentials"


def test_user_token_on_a_service_only_route_is_403(env):
    resp = env.call("/api/other/things", env.user_token())
    assert resp.status == 403
    assert resp.json()["error"]["message"] == "This endpoint does not allow 'user' credentials"


# -- external access -------------------------------------------------------------------------------
def test_static_token_is_an_external_service_principal(env):
    assert env.call("/api/svc/things/a", STATIC_TOKEN).status == 200
    assert seen_principal(env) == ("external:ci-bot", "service")


def test_static_token_outside_its_access_restrictions_is_403(env):
    resp = env.call("/api/other/things", STATIC_TOKEN)
    assert resp.status == 403
    assert resp.json()["error"]["name"] == "NotAllowedError"


def test_legacy_token_is_a_service_principal(env):
    assert env.call("/api/other/things", mint_legacy_token(LEGACY_SECRET)).status == 200
    assert seen_principal(env)[1] == "service"


def test_expired_legacy_token_is_401_illegal_token_not_500(env):
    token = mint_legacy_token(LEGACY_SECRET, ttl=60, now=time.time() - 7200)
    resp = env.call("/api/other/things", token)
    assert_401(resp, "Illegal token")
    assert b"exp" not in resp.body and b"backstage-server" not in resp.body


def test_legacy_token_without_exp_is_rejected(env):
    assert_401(env.call("/api/other/things", mint_legacy_token(LEGACY_SECRET, ttl=None)),
               "Illegal token")


def test_external_jwks_token_is_a_service_principal(env):
    now = int(time.time())
    token = sign({"iss": EXT_ISSUER, "sub": "robot-7", "aud": "stagedoor", "iat": now,
                  "exp": now + 300}, {"alg": "RS256", "kid": "ext-1"}, env.ext_key.private_key)
    assert env.call("/api/other/things", token).status == 200
    assert seen_principal(env) == ("external:ext:robot-7", "service")


def test_jwt_nobody_recognises_is_illegal_token(env):
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    token = sign({"iss": "https://nobody.test", "sub": "x", "exp": now + 60}, {"alg": "ES256"},
                 key)
    assert_401(env.call("/api/svc/things/a", token), "Illegal token")


def test_not_a_jwt_is_illegal_token(env):
    assert_401(env.call("/api/svc/things/a", "definitely-not-a-jwt"), "Illegal token")


def test_missing_and_empty_bearer_are_missing_credentials(env):
    assert_401(env.call("/api/svc/things/a", None), "Missing credentials")
    assert_401(env.call("/api/svc/things/a", None, {"Authorization": "Bearer "}),
               "Missing credentials")
    assert_401(env.call("/api/svc/things/a", None, {"Authorization": "Basic Zm9vOmJhcg=="}),
               "Missing credentials")


def test_two_authorization_headers_are_refused(env):
    raw_headers = [("Authorization", f"Bearer {STATIC_TOKEN}"),
                   ("Authorization", "Bearer other")]
    resp = request(env.sidecar.port, "GET", "/api/svc/things/a", extra=raw_headers)
    assert resp.status == 401


# -- key sets --------------------------------------------------------------------------------------
def test_rotated_key_is_picked_up(env):
    new_key = DevKey.generate("ES256", kid="user-2")
    env.idp.jwks_by_path[USER_JWKS] = {"keys": [*env.user_key.jwks()["keys"],
                                                *new_key.jwks()["keys"]]}
    time.sleep(1.1)  # past the refetch interval configured for this test (1 s)
    resp = env.call("/api/insights/services/payments-api", env.user_token(key=new_key))
    assert resp.status == 200, resp.body


def test_random_kids_do_not_hammer_the_identity_provider(env):
    time.sleep(1.1)
    before = env.idp.hits.get(USER_JWKS, 0)
    started = time.monotonic()
    for _ in range(40):
        rogue = DevKey.generate("ES256", kid=secrets.token_hex(8))
        env.call("/api/insights/services/x", env.user_token(key=rogue))
    elapsed = time.monotonic() - started
    fetches = env.idp.hits.get(USER_JWKS, 0) - before
    # at most one fetch per refetch interval (1 s here), plus one
    assert fetches <= int(elapsed) + 2, (fetches, elapsed)


def test_tokens_never_reach_the_logs(env):
    token = env.user_token(subject="user:default/log-check")
    env.call("/api/insights/services/payments-api", token)
    env.call("/api/svc/things/a", STATIC_TOKEN)
    time.sleep(0.3)
    logs = "\n".join(env.sidecar.stderr_lines + env.sidecar.stdout_lines)
    assert token not in logs
    assert token.split(".")[2] not in logs
    assert STATIC_TOKEN not in logs


def test_authorization_never_reaches_the_upstream(env):
    env.call("/api/svc/things/a", STATIC_TOKEN)
    assert "authorization" not in env.upstream.seen[-1].headers


def test_jwks_down_after_first_fetch_still_verifies(tmp_path):
    idp = RecordingServer("json")
    upstream = RecordingServer("json")
    key = DevKey.generate("ES256", kid="k1")
    idp.jwks_by_path[USER_JWKS] = key.jwks()
    config = write_config(tmp_path / "c.yaml", f"""\
        backend: {{baseUrl: {idp.url}}}
        insights: {{externalApiUrl: {upstream.url}}}
        """)
    sidecar = start_sidecar([config], ROOT / "policies")
    try:
        issuer = f"{idp.url}/api/auth"
        first = mint_user_token(key, issuer=issuer)
        assert request(sidecar.port, "GET", "/api/insights/services/payments-api",
                       {"Authorization": f"Bearer {first}"}).status == 200
        idp.stop()
        # a different token, so the verified-token cache cannot answer for it
        second = mint_user_token(key, issuer=issuer, subject="user:default/other")
        resp = request(sidecar.port, "GET", "/api/insights/services/payments-api",
                       {"Authorization": f"Bearer {second}"})
        assert resp.status == 200, resp.body
    finally:
        sidecar.stop()
        upstream.stop()


def test_jwks_down_from_the_start_is_503_with_retry_after(tmp_path):
    upstream = RecordingServer("json")
    down = f"http://127.0.0.1:{closed_port()}"
    config = write_config(tmp_path / "c.yaml", f"""\
        backend: {{baseUrl: {down}}}
        insights: {{externalApiUrl: {upstream.url}}}
        """)
    sidecar = start_sidecar([config], ROOT / "policies")
    try:
        token = mint_user_token(DevKey.generate("ES256", kid="k"), issuer=f"{down}/api/auth")
        resp = request(sidecar.port, "GET", "/api/insights/services/payments-api",
                       {"Authorization": f"Bearer {token}"})
        assert resp.status == 503, resp.body
        assert resp.json()["error"]["name"] == "ServiceUnavailableError"
        assert resp.header("retry-after") and int(resp.header("retry-after")) > 0
        assert not upstream.seen
        assert request(sidecar.port, "GET", "/api/insights/health").status == 200
        time.sleep(0.3)
        assert any("/api/auth/.well-known/jwks.json" in line for line in sidecar.stderr_lines)
    finally:
        sidecar.stop()
        upstream.stop()
