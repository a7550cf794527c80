"""Property-based tests (hypothesis) of the pure core: ``decide()``, ``render_error`` and the
token verifier, over generated paths, methods, Authorization headers and tokens.

Properties:

1. A denied decision never carries an upstream or a local answer, and its error renders to the
   error shape of docs/behaviour.md with its own status.
2. An allowed forward's upstream path is exactly the route's upstream template filled with the
   re-encoded parameter values, each of which passes its regex, and each value is the request's
   own path segment decoded once; the upstream query is exactly what the route's query rules
   make of the client's (declared parameters only, re-encoded), never the raw query.
3. Without a credential, a path that is not ``unauthenticated`` is 401 whatever route or method
   it names (no enumeration), and ``decide`` is deterministic.
4. ``render_error`` gives the docs/behaviour.md shape for any status, name, message, method and url.
5. A validly signed token changed in any one character never verifies.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagedoor.auth import (
    AuthSettings,
    CredentialError,
    KeysNeeded,
    KeySourceUnavailable,
    Principal,
    TokenVerifier,
    parse_jwks,
)
from stagedoor.config import Config
from stagedoor.decide import Answer, Deny, Forward, GatewayRequest, decide
from stagedoor.devkeys import DevKey, mint_user_token
from stagedoor.errors import (
    ERROR_NAMES,
    JSON_CONTENT_TYPE,
    ApiError,
    render_error,
    utf8_safe,
)
from stagedoor.policy import load_policies
from stagedoor.query import shape_query

from .conftest import ROOT
from .hardening import FIXTURE_POLICY, PATH_PAYLOADS, error_shape_problem, producible

UPSTREAM = "http://127.0.0.1:9000"
EXAMPLES = 400
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])

_dir = Path(tempfile.mkdtemp(prefix="stagedoor-property-"))
(_dir / "fixture.yaml").write_text(FIXTURE_POLICY)
(_dir / "insights.yaml").write_text((ROOT / "policies" / "insights.yaml").read_text())
POLICIES = load_policies(_dir, Config(data={
    "hard": {"upstreamUrl": UPSTREAM, "refusedUrl": UPSTREAM},
    "insights": {"externalApiUrl": UPSTREAM}}))

PRINCIPALS = {
    "user": Principal("user", "user:default/jane", source="user"),
    "svc": Principal("service", "plugin:catalog", source="plugin"),
    "ext": Principal("service", "external:ci", source="static",
                     access_plugins=frozenset({"insights"})),
}


class FakeVerifier:
    def verify(self, token: str, plugin_id: str) -> Principal:
        if token == "down":
            raise KeySourceUnavailable("http://idp/jwks.json", 5)
        if token in PRINCIPALS:
            return PRINCIPALS[token]
        raise CredentialError("Illegal token", "property test: unknown token")


VERIFIER = FakeVerifier()

# -- strategies --------------------------------------------------------------------------------
LITERALS = ["items", "loose", "pair", "and", "open", "admin", "fault", "refused", "health",
            "services", "ok", "abc", "payments-api", "1", "Items", ".stagedoor"]
PAYLOADS = [p for group in PATH_PAYLOADS.values() for p in group]
CHARS = st.sampled_from([*"abcXYZ019-_.~%2eEfF5cC/;:@!$&'()*+,=#?\\ ",
                         "\x00", "\x1f", "\x7f", "\u00e9", "\udce9", "%00", "%2f", "%2e",
                         "%25", "%c0%ae", "%ff", "\u2024"])
segments = st.one_of(st.sampled_from(LITERALS), st.sampled_from(PAYLOADS),
                     st.lists(CHARS, max_size=8).map("".join))
prefixes = st.sampled_from(["/api/fixture", "/api/insights", "/api/FIXTURE", "/api/nope",
                            "/api", "", "/v1", "/api/fixture/", "//api/fixture"])
queries = st.one_of(st.just(""), st.lists(CHARS, max_size=10).map(lambda c: "?" + "".join(c)),
                    st.sampled_from(["?x=1", "?token=user", "?a=%2e%2e/x", "?#", "?\x00"]))


@st.composite
def targets(draw: st.DrawFn) -> str:
    parts = draw(st.lists(segments, max_size=6))
    slash = draw(st.sampled_from(["", "/"]))
    return draw(prefixes) + "".join("/" + p for p in parts) + slash + draw(queries)


methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                           "TRACE", "CONNECT", "FOO"])
authorizations = st.lists(st.sampled_from([
    "Bearer user", "Bearer svc", "Bearer ext", "Bearer down", "Bearer junk", "bearer user",
    "BEARER svc", "Bearer  user", "Basic dXNlcg==", "", "Bearer ", "Bearer user extra",
    "user"]), max_size=3).map(tuple)


def _decoded(raw: str) -> str | None:
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- properties of decide() --------------------------------------------------------------------
@PROPERTY_SETTINGS
@given(method=methods, target=targets(), authorization=authorizations)
def test_decide_invariants(method: str, target: str, authorization: tuple[str, ...]) -> None:
    request = GatewayRequest(method, target, authorization)
    d = decide(request, POLICIES, VERIFIER)
    again = decide(request, POLICIES, VERIFIER)
    assert again == d  # pure: the same request, the same decision (trace off on both)
    assert d.trace == ()
    assert isinstance(d, Deny | Answer | Forward)
    assert d.allowed is not isinstance(d, Deny)

    if isinstance(d, Deny):
        assert d.error.status in (400, 401, 403, 404, 405, 503), d.error
        status, body, headers = render_error(d.error, method, d.url)
        import json

        assert status == d.error.status
        assert dict(headers)["Content-Type"] == JSON_CONTENT_TYPE
        assert error_shape_problem(json.loads(body), status) is None
        if status == 401:
            assert ("WWW-Authenticate", "Bearer") in headers
        if status == 405:
            assert any(k == "Allow" for k, _ in headers)
        return

    route = d.route
    assert route is not None and d.check == "allow"
    path, _, query = target.partition("?")
    assert "#" not in target
    if not route.unauthenticated:
        assert d.principal is not None and d.principal.kind in route.auth
    if isinstance(d, Answer):
        assert route.respond is d.local and route.upstream is None
        return
    assert isinstance(d, Forward) and route.upstream is not None
    assert d.timeout == route.timeout
    # the template, filled with re-encoded values that pass their regexes
    for name, value in d.params.items():
        assert route.params[name].check(value) is None, (name, value)
    expected = route.upstream.path_for(d.params) + shape_query(query, route.query).text
    assert d.upstream.path == expected
    assert producible(POLICIES, UPSTREAM, d.upstream.path) is None
    assert (d.upstream.scheme, d.upstream.host, d.upstream.port) == \
        (route.upstream.scheme, route.upstream.host, route.upstream.port)
    assert all(0x21 <= ord(c) <= 0x7E for c in query)
    # each value is the request's own segment, decoded once
    rest = path[len("/api/") + len(route.plugin_id):].strip("/").split("/")
    for name, position in zip(route.template.param_names, route.template.param_positions,
                              strict=True):
        raw = rest[position]
        assert _decoded(raw) == d.params[name]
        assert quote(d.params[name], safe="") in d.upstream.path


@PROPERTY_SETTINGS
@given(method=methods, target=targets())
def test_no_credentials_is_401_before_routing(method: str, target: str) -> None:
    d = decide(GatewayRequest(method, target, ()), POLICIES, VERIFIER)
    if d.check in ("plugin", "path"):
        return  # decided before the barrier (unknown plugin, ambiguous path)
    if d.check == "barrier":
        assert isinstance(d, Deny) and d.error.status == 401
        assert d.error.message == "Missing credentials"
        return
    # got past the barrier without a credential: only an unauthenticated path may do that
    plugin = POLICIES.plugins[d.plugin_id or ""]
    assert any(r.unauthenticated for r in plugin.routes), target
    assert d.principal is None
    if d.allowed:
        assert d.route is not None and d.route.unauthenticated


@PROPERTY_SETTINGS
@given(status=st.sampled_from(sorted(ERROR_NAMES)), message=st.text(max_size=200),
       method=st.text(max_size=20), url=st.text(max_size=200), name=st.text(max_size=30),
       extra=st.lists(st.tuples(st.sampled_from(["Allow", "Retry-After", "X-A"]),
                                st.text(alphabet="abc 123,", max_size=10)), max_size=2))
def test_render_error_shape(status: int, message: str, method: str, url: str, name: str,
                            extra: list[tuple[str, str]]) -> None:
    import json

    error = ApiError(status, message, name=name, headers=tuple(extra))
    out_status, body, headers = render_error(error, method, url)  # never raises
    doc = json.loads(body.decode("utf-8"))  # strict UTF-8, whatever went in
    assert out_status == status
    assert error_shape_problem(doc, status) is None
    # Text survives as is; lone surrogates (bytes that were not UTF-8) become \xNN / \udNNN.
    assert doc["error"]["message"] == utf8_safe(message)
    assert doc["request"] == {"method": utf8_safe(method), "url": utf8_safe(url)}
    assert doc["error"]["name"] == utf8_safe(name or ERROR_NAMES[status])
    assert headers[0] == ("Content-Type", JSON_CONTENT_TYPE)


# -- tokens: one changed character never verifies ----------------------------------------------
_KEY = DevKey.generate("ES256", kid="prop-1")
_ISSUER = "http://idp.test/api/auth"


def _verifier() -> TokenVerifier:
    settings_ = AuthSettings(base_url="http://idp.test")
    verifier = TokenVerifier(settings_)
    assert verifier.user_source is not None
    now = time.time()
    verifier.user_source.set_keys(parse_jwks(_KEY.jwks()), now)
    verifier.user_source.attempted_at = now  # no refetch: unknown kids are just unknown
    return verifier


_VERIFIER = _verifier()
_TOKEN = mint_user_token(_KEY, issuer=_ISSUER, ttl=24 * 3600)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_the_unchanged_token_verifies() -> None:
    assert _VERIFIER.verify(_TOKEN, "fixture").subject == "user:default/jane"


@PROPERTY_SETTINGS
@given(position=st.integers(min_value=0, max_value=len(_TOKEN) - 1),
       char=st.sampled_from(list(B64URL + ".=+/ ")), mode=st.sampled_from(
           ["replace", "insert", "delete"]))
def test_a_changed_token_never_verifies(position: int, char: str, mode: str) -> None:
    if mode == "replace":
        mutated = _TOKEN[:position] + char + _TOKEN[position + 1:]
    elif mode == "insert":
        mutated = _TOKEN[:position] + char + _TOKEN[position:]
    else:
        mutated = _TOKEN[:position] + _TOKEN[position + 1:]
    if mutated == _TOKEN:
        return
    _VERIFIER.clear_cache()
    try:
        principal = _VERIFIER.verify(mutated, "fixture")
    except (CredentialError, KeysNeeded, KeySourceUnavailable):
        return
    raise AssertionError(f"a changed token verified as {principal}: {mode} {char!r} at "
                         f"{position}")


@PROPERTY_SETTINGS
@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "jku", "crit", "x5u"]),
                              st.one_of(st.text(max_size=12), st.integers(), st.none(),
                                        st.lists(st.text(max_size=4), max_size=2))),
       claims=st.dictionaries(st.sampled_from(["iss", "aud", "sub", "exp", "iat", "nbf"]),
                              st.one_of(st.text(max_size=12), st.integers(), st.floats(),
                                        st.none(), st.booleans())),
       signature=st.binary(max_size=80))
def test_forged_tokens_never_verify(header: dict, claims: dict, signature: bytes) -> None:
    """Arbitrary headers and claims with an arbitrary signature: never a principal, and the
    only exceptions are the three the protocol names."""
    import base64
    import json

    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    token = (f"{enc(json.dumps(header).encode())}.{enc(json.dumps(claims).encode())}."
             f"{enc(signature)}")
    _VERIFIER.clear_cache()
    try:
        principal = _VERIFIER.verify(token, "fixture")
    except (CredentialError, KeysNeeded, KeySourceUnavailable):
        return
    raise AssertionError(f"a forged token verified as {principal}")
