"""The parts of stagedoor/auth/ on their own: the JWKS client (PyJWKClient-shaped), reading a
token before choosing a strategy, the strategies' use of jwt.decode, and the clock it reads.
(tests/test_tokens.py holds the verifier's behaviour as a whole.)"""

from __future__ import annotations

import asyncio

import httpx
import jwt
import pytest

from stagedoor import outbound
from stagedoor.auth import (
    CredentialError,
    JwksClient,
    KeysNeeded,
    KeySourceUnavailable,
    SigningKeyNotFound,
    parse_jwks,
)
from stagedoor.auth.strategies import ClaimRules, ClockedJWT, JwtStrategy, peek
from stagedoor.devkeys import DevKey, mint_user_token

from .test_tokens import AUTH_JWKS, Clock, JwksServer, sign


@pytest.fixture
def server():
    s = JwksServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key() -> DevKey:
    return DevKey.generate("ES256")


def client_for(server: JwksServer, clock: Clock, **kwargs) -> JwksClient:
    return JwksClient(f"{server.url}{AUTH_JWKS}", kind="user", name="auth", clock=clock,
                      **kwargs)


def run(coro):
    async def main():
        try:
            return await coro
        finally:
            await outbound.aclose()

    return asyncio.run(main())


# -- JwksClient ---------------------------------------------------------------------------------


def test_get_signing_key_async_fetches_once_then_answers_from_held_keys(server, key):
    server.serve(AUTH_JWKS, key)
    clock = Clock()
    client = client_for(server, clock)
    with pytest.raises(KeysNeeded):
        client.get_signing_key(key.kid)
    signing_key = run(client.get_signing_key_async(key.kid))
    assert signing_key.kid == key.kid and signing_key.algorithms == {"ES256"}
    assert client.get_signing_key(key.kid) is signing_key
    assert server.hits[AUTH_JWKS] == 1


def test_unknown_kid_within_the_cooldown_is_not_found_without_a_fetch(server, key):
    server.serve(AUTH_JWKS, key)
    clock = Clock()
    client = client_for(server, clock, cooldown=10)
    run(client.refresh())
    with pytest.raises(SigningKeyNotFound):
        client.get_signing_key("rotated")
    clock.advance(10)
    with pytest.raises(KeysNeeded):  # cooldown over: an unknown kid may fetch again
        client.get_signing_key("rotated")


def test_keys_past_their_lifespan_are_refetched_and_used_stale_while_down(server, key):
    server.serve(AUTH_JWKS, key)
    clock = Clock()
    client = client_for(server, clock, lifespan=60)
    run(client.refresh())
    clock.advance(61)
    with pytest.raises(KeysNeeded):
        client.get_signing_key(key.kid)
    server.stop()
    run(client.refresh())
    assert client.failure is not None
    assert client.get_signing_key(key.kid).kid == key.kid  # stale, still verifying


def test_a_source_down_from_the_start_is_unavailable_with_retry_after(server, key):
    clock = Clock()
    client = client_for(server, clock, cooldown=7)
    server.stop()
    run(client.refresh())
    with pytest.raises(KeySourceUnavailable) as info:
        client.get_signing_key(key.kid)
    assert info.value.retry_after == 7


def test_the_cooldown_runs_from_the_end_of_a_slow_failed_fetch():
    # A fetch that takes longer than the cooldown (the clock moves while it runs) and fails:
    # the request that waited for it gets its 503 at once instead of fetching again.
    clock = Clock()

    def slow_and_down(request):
        clock.advance(3)
        raise httpx.ConnectError("refused", request=request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(slow_and_down))
    client = JwksClient("http://127.0.0.1:9/jwks.json", kind="plugin", name="plugin:x",
                        cooldown=1, timeout=10, clock=clock, http_client=lambda: http)
    run(client.refresh())
    with pytest.raises(KeySourceUnavailable) as info:
        client.get_signing_key("k")
    assert info.value.retry_after == 1
    clock.advance(1)
    with pytest.raises(KeysNeeded):
        client.get_signing_key("k")


def test_short_rsa_keys_and_encryption_keys_are_not_verification_keys(key):
    from cryptography.hazmat.primitives.asymmetric import rsa

    from stagedoor.devkeys import public_jwk

    short = public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), kid="s")
    encryption = {**key.public_jwk(), "use": "enc"}
    assert [k.kid for k in parse_jwks({"keys": [short, encryption, key.public_jwk()]})] == \
        [key.kid]


def test_a_key_set_over_one_mebibyte_is_a_failed_fetch(server, key):
    server.documents[AUTH_JWKS] = {"keys": [key.public_jwk()], "padding": "x" * (1 << 20)}
    clock = Clock()
    client = client_for(server, clock)
    run(client.refresh())
    assert client.keys == () and "larger than" in str(client.failure)


def test_symmetric_keys_are_never_loaded_from_a_key_set():
    assert parse_jwks({"keys": []}) == ()
    with pytest.raises(ValueError, match="usable"):
        parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0", "kid": "h"}]})


# -- peek -----------------------------------------------------------------------------------------


def test_peek_reads_header_and_claims_of_a_compact_jws(key):
    token = mint_user_token(key, issuer="http://x/api/auth", now=1000)
    unverified = peek(token)
    assert unverified.header["typ"] == "vnd.backstage.user"
    assert unverified.claims["sub"] == "user:default/jane"


@pytest.mark.parametrize("mangle", [
    lambda t: t + "=",                        # padding
    lambda t: t.replace(".", "..", 1),        # four segments
    lambda t: t.replace(".", "+.", 1),        # a character outside base64url
    lambda t: t.rsplit(".", 1)[0],            # two segments
])
def test_peek_refuses_what_is_not_a_compact_jws_in_base64url(key, mangle):
    with pytest.raises(CredentialError) as info:
        peek(mangle(mint_user_token(key, issuer="http://x/api/auth", now=1000)))
    assert info.value.message == "Illegal token"


def test_peek_refuses_a_non_canonical_last_character(key):
    token = mint_user_token(key, issuer="http://x/api/auth", now=1000)
    header, payload, signature = token.split(".")
    assert len(signature) % 4 == 2  # 64 bytes of ES256: two spare bits in the last character
    odd = {"A": "B", "Q": "R", "g": "h", "w": "x"}[signature[-1]]
    with pytest.raises(CredentialError) as info:
        peek(f"{header}.{payload}.{signature[:-1]}{odd}")
    assert info.value.reason == "not a JWT and not a static token"


# -- jwt.decode through the strategies ------------------------------------------------------------


def strategy(clock: Clock) -> JwtStrategy:
    return JwtStrategy(ClockedJWT(clock), leeway=5)


@pytest.mark.parametrize("header", [{"crit": ["exp"]}, {"b64": True}, {"jku": "http://e"},
                                    {"x5u": "http://e"}, {"jwk": {"kty": "EC"}}])
def test_extension_and_key_location_headers_are_refused_before_any_key(key, header):
    clock = Clock()
    token = sign({"alg": "ES256", "kid": key.kid, **header},
                 {"sub": "x", "exp": int(clock.now) + 60}, key.private_key, "ES256")
    with pytest.raises(CredentialError) as info:
        strategy(clock).screen(peek(token), ClaimRules(("exp",)))
    assert info.value.reason == f"token carries a '{next(iter(header))}' header"


def test_jwt_decode_refuses_an_unknown_critical_extension_too(key):
    clock = Clock()
    token = sign({"alg": "ES256", "crit": ["exp"]}, {"exp": int(clock.now) + 60},
                 key.private_key, "ES256")
    with pytest.raises(jwt.InvalidTokenError, match="critical extension"):
        jwt.decode(token, key.private_key.public_key(), algorithms=["ES256"])


def test_peek_wants_json_objects_for_header_and_payload(key):
    token = mint_user_token(key, issuer="http://x/api/auth", now=1000)
    header, _, signature = token.split(".")
    with pytest.raises(CredentialError) as info:
        peek(f"{header}.WzEsMl0.{signature}")  # [1,2]
    assert info.value.reason == "not a JWT: header or payload is not a JSON object"


@pytest.mark.parametrize("kid", [["a"], {"a": 1}, 7, None])
def test_a_kid_that_is_not_a_string_is_refused_before_any_key_lookup(key, kid):
    clock = Clock()
    token = sign({"alg": "ES256", "kid": kid}, {"exp": int(clock.now) + 60}, key.private_key,
                 "ES256")
    source = JwksClient("http://127.0.0.1:9/jwks.json", kind="user", name="auth", clock=clock)
    with pytest.raises(CredentialError) as info:
        strategy(clock).signing_key(source, peek(token), ClaimRules(("exp",)), clock.now)
    assert info.value.reason == "kid header is not a string"


@pytest.mark.parametrize("value", ["9999999999", True, 10**400, [1]])
def test_time_claims_must_be_json_numbers(key, value):
    clock = Clock()
    token = sign({"alg": "ES256"}, {"exp": value}, key.private_key, "ES256")
    with pytest.raises(CredentialError) as info:
        strategy(clock).screen(peek(token), ClaimRules(("exp",)))
    assert info.value.reason == "exp claim is not a number"


def test_jwt_decode_reads_the_verifier_clock_not_the_system_clock(key):
    clock = Clock()
    token = sign({"alg": "ES256"}, {"exp": int(clock.now) + 60, "iat": int(clock.now)},
                 key.private_key, "ES256")
    public = key.private_key.public_key()
    rules = ClaimRules(("exp", "iat"))
    assert strategy(clock).decode(peek(token), public, {"ES256"}, rules)["exp"]
    clock.advance(3600)
    with pytest.raises(CredentialError) as info:
        strategy(clock).decode(peek(token), public, {"ES256"}, rules)
    assert info.value.reason == "token expired"
    clock.advance(-7200)
    with pytest.raises(CredentialError) as info:
        strategy(clock).decode(peek(token), public, {"ES256"}, rules)
    assert info.value.reason == "token issued in the future (iat)"


def test_the_algorithm_comes_from_the_key_not_the_token(key):
    clock = Clock()
    token = sign({"alg": "ES384"}, {"exp": int(clock.now) + 60}, key.private_key, "ES256")
    with pytest.raises(CredentialError) as info:
        strategy(clock).decode(peek(token), key.private_key.public_key(), {"ES256"},
                               ClaimRules(("exp",)))
    assert info.value.reason == "algorithm 'ES384' not allowed for key (allowed: ES256)"
