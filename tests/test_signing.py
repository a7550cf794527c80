"""Plugin signing keys, the JWKS document and the tokens stagedoor mints (pure modules)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stagedoor.config import Config, ConfigError
from stagedoor.minting import (
    IDENTITY_TOKEN_TYPE,
    PLUGIN_TOKEN_TYPE,
    MintError,
    identity_assertion,
    limited_user_token,
    plugin_token,
)
from stagedoor.signing import KeyRing, Seed, Signer, SigningSettings, jwks_plugin


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _jwks(ring: KeyRing) -> jwt.PyJWKSet:
    return jwt.PyJWKSet.from_json(ring.jwks_document().decode())


def _verify(token: str, ring: KeyRing, audience: str, now: float) -> dict:
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in _jwks(ring).keys if k.key_id == kid)
    return jwt.decode(token, key.key, algorithms=["ES256"], audience=audience,
                      options={"verify_exp": False, "verify_iat": False}) | {"_now": now}


def test_jwks_document_has_backstage_member_order_and_compact_json() -> None:
    ring = KeyRing("insights", SigningSettings())
    doc = ring.jwks_document()
    keys = json.loads(doc)["keys"]
    assert len(keys) == 1
    assert list(keys[0]) == ["kty", "x", "y", "crv", "kid", "alg"]
    assert keys[0]["kty"] == "EC" and keys[0]["crv"] == "P-256" and keys[0]["alg"] == "ES256"
    assert len(keys[0]["x"]) == 43 and "=" not in keys[0]["x"]
    assert b" " not in doc and doc.startswith(b'{"keys":[{"kty":"EC","x":"')


def test_generated_key_rotates_and_old_key_stays_published_while_its_tokens_live() -> None:
    clock = Clock(1_800_000_000.0)  # a multiple of 600: an epoch starts here
    ring = KeyRing("insights", SigningSettings(key_duration=600), clock)
    first = ring.current().kid
    token = plugin_token(ring, "catalog")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600
    assert [k.kid for k in ring.published()] == [first]  # nothing before the seed was made
    clock.now += 599
    assert ring.current().kid == first
    clock.now += 1  # the first key's signing time is over
    second = ring.current().kid
    assert second != first and ring.rotations == 1
    assert [k.kid for k in ring.published()] == [second, first]
    assert _verify(token, ring, "catalog", clock.now)["sub"] == "insights"
    clock.now += 599  # the last token the first key signed expires at t0 + 2 x 600
    assert [k.kid for k in ring.published()] == [second, first]
    clock.now += 1
    assert first not in [k.kid for k in ring.published()]
    assert first not in ring.jwks_document().decode()


def test_workers_sharing_a_seed_sign_and_publish_the_same_keys() -> None:
    clock = Clock()
    seed = Seed.new(clock.now)
    one = Signer(SigningSettings(key_duration=600), clock, Seed.decode(seed.encode()))
    two = Signer(SigningSettings(key_duration=600), clock, seed)
    assert one.ring("insights").jwks_document() == two.ring("insights").jwks_document()
    token = plugin_token(one.ring("insights"), "catalog")
    assert _verify(token, two.ring("insights"), "catalog", clock.now)["sub"] == "insights"
    clock.now += 600
    assert one.ring("insights").current().kid == two.ring("insights").current().kid
    # other plugins, other keys; another seed, other keys
    assert one.ring("other").current().kid != one.ring("insights").current().kid
    assert Signer(SigningSettings(), clock).ring("insights").current().kid != \
        one.ring("insights").current().kid


def test_plugin_token_matches_backstage_layout() -> None:
    ring = KeyRing("insights", SigningSettings())
    token = plugin_token(ring, "permission")
    header_b64, payload_b64, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    header = json.loads(base64.urlsafe_b64decode(pad(header_b64)))
    payload = json.loads(base64.urlsafe_b64decode(pad(payload_b64)))
    assert list(header) == ["typ", "alg", "kid"]
    assert header["typ"] == PLUGIN_TOKEN_TYPE and header["kid"] == ring.current().kid
    assert list(payload) == ["sub", "aud", "iat", "exp"]
    assert payload["sub"] == "insights" and payload["aud"] == "permission"
    assert _verify(token, ring, "permission", 0)["aud"] == "permission"


def _user_token(uip: str | None = "c2lnbmF0dXJl", exp: int = 1_800_003_600,
                typ: str = "vnd.backstage.user") -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    claims = {"iss": "http://b/api/auth", "sub": "user:default/jané", "ent": ["x"],
              "aud": "backstage", "iat": 1_800_000_000, "exp": exp}
    if uip:
        claims["uip"] = uip
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": typ, "kid": "k1"},
                      sort_headers=False)


def test_limited_user_token_is_rebuilt_like_backstage() -> None:
    obo = limited_user_token(_user_token())
    header, payload, signature = obo.token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    assert base64.urlsafe_b64decode(pad(header)) == \
        b'{"typ":"vnd.backstage.limited-user","alg":"ES256","kid":"k1"}'
    assert base64.urlsafe_b64decode(pad(payload)) == \
        '{"sub":"user:default/jané","iat":1800000000,"exp":1800003600}'.encode()
    assert signature == "c2lnbmF0dXJl"
    assert obo.expires_at == 1_800_003_600


def test_limited_user_token_refusals() -> None:
    with pytest.raises(MintError, match="missing user identity proof"):
        limited_user_token(_user_token(uip=None))
    with pytest.raises(MintError, match="invalid token type"):
        limited_user_token(_user_token(typ="vnd.backstage.plugin"))
    with pytest.raises(MintError):
        limited_user_token("not-a-jwt")
    limited = limited_user_token(_user_token()).token
    assert limited_user_token(limited).token == limited  # already limited: as is


def test_plugin_token_obo_caps_exp_at_the_user_token() -> None:
    clock = Clock()
    ring = KeyRing("insights", SigningSettings(), clock)
    obo = limited_user_token(_user_token(exp=int(clock.now) + 100))
    claims = jwt.decode(plugin_token(ring, "whoami", obo), options={"verify_signature": False})
    assert claims["exp"] == int(clock.now) + 100
    assert claims["obo"] == obo.token
    assert list(claims) == ["sub", "aud", "iat", "exp", "obo"]


def test_identity_assertion_claims() -> None:
    clock = Clock()
    ring = KeyRing("insights", SigningSettings(), clock)
    token = identity_assertion(ring, subject="user:default/jane", principal_type="user",
                               audience="insights-api", request_id="req-1", ttl=600)
    assert jwt.get_unverified_header(token)["typ"] == IDENTITY_TOKEN_TYPE
    claims = _verify(token, ring, "insights-api", clock.now)
    assert claims["exp"] - claims["iat"] == 60  # capped
    assert claims["sub"] == "user:default/jane" and claims["principal_type"] == "user"
    assert claims["request_id"] == "req-1" and claims["iss"] == "plugin:insights"
    other = identity_assertion(ring, subject="s", principal_type="service", audience="a",
                               request_id="r")
    assert jwt.decode(other, options={"verify_signature": False})["jti"] != claims["jti"]


def _write_pair(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_static_key_store_signs_with_the_first_key_and_publishes_all(tmp_path: Path) -> None:
    p1, k1 = _write_pair(tmp_path, "one")
    _, k2 = _write_pair(tmp_path, "two")
    config = Config({"backend": {"auth": {"pluginKeyStore": {"type": "static", "static": {
        "keys": [{"keyId": "one", "publicKeyFile": str(k1), "privateKeyFile": str(p1)},
                 {"keyId": "two", "publicKeyFile": str(k2)}]}}}}})
    settings = SigningSettings.from_config(config)
    signer = Signer(settings)
    ring = signer.ring("insights")
    assert ring.current().kid == "one"
    assert [k["kid"] for k in json.loads(ring.jwks_document())["keys"]] == ["one", "two"]
    assert _verify(plugin_token(ring, "catalog"), ring, "catalog", 0)["sub"] == "insights"
    # the same files make the same keys in every replica
    assert Signer(settings).ring("insights").jwks_document() == ring.jwks_document()


def test_static_key_store_problems_name_the_key(tmp_path: Path) -> None:
    _, k1 = _write_pair(tmp_path, "one")
    no_private = Config({"backend": {"auth": {"pluginKeyStore": {"type": "static", "static": {
        "keys": [{"keyId": "one", "publicKeyFile": str(k1)}]}}}}})
    with pytest.raises(ConfigError, match="Private key for signing"):
        SigningSettings.from_config(no_private)
    missing = Config({"backend": {"auth": {"pluginKeyStore": {"type": "static", "static": {
        "keys": [{"keyId": "one", "publicKeyFile": str(tmp_path / "nope.pem")}]}}}}})
    with pytest.raises(ConfigError, match=r"static\.keys\[0\]"):
        SigningSettings.from_config(missing)
    with pytest.raises(ConfigError, match="expected one of"):
        SigningSettings.from_config(Config({"backend": {"auth": {"pluginKeyStore": {
            "type": "vault"}}}}))
    assert SigningSettings.from_config(Config({"stagedoor": {"signing": {
        "keyDuration": "15m"}}})).key_duration == 900


def test_jwks_plugin_path() -> None:
    assert jwks_plugin("/api/insights/.backstage/auth/v1/jwks.json") == "insights"
    assert jwks_plugin("/api/a/b/.backstage/auth/v1/jwks.json") is None
    assert jwks_plugin("/api//.backstage/auth/v1/jwks.json") is None
    assert jwks_plugin("/api/insights/health") is None


@pytest.mark.e2e
def test_workers_publish_one_key_set(tmp_path: Path) -> None:
    """``run --workers 2``: whichever worker a connection reaches serves the same JWKS (the
    supervisor's seed), so a token one worker signed verifies with the other's keys."""
    import http.client

    from .conftest import ROOT, RecordingServer, start_sidecar, write_config

    upstream = RecordingServer("json")
    config = write_config(tmp_path / "app-config.yaml", f"""\
        backend:
          baseUrl: {upstream.url}
        insights:
          externalApiUrl: {upstream.url}
        """)
    sidecar = start_sidecar([config], ROOT / "policies",
                            extra_args=["--workers", "2", "--admin", "127.0.0.1:0"])
    try:
        bodies = set()
        for _ in range(30):  # a new connection each time: the kernel spreads them
            conn = http.client.HTTPConnection(sidecar.host, sidecar.port, timeout=10)
            try:
                conn.request("GET", "/api/insights/.backstage/auth/v1/jwks.json")
                response = conn.getresponse()
                assert response.status == 200
                bodies.add(response.read())
            finally:
                conn.close()
        assert len(bodies) == 1, bodies
        assert json.loads(bodies.pop())["keys"][0]["alg"] == "ES256"
    finally:
        sidecar.stop()
        upstream.stop()
