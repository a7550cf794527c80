"""The core gateway end to end: a real `stagedoor run` process in front of real upstreams on
127.0.0.1, with real ES256 user tokens verified against a real JWKS endpoint."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stagedoor.devkeys import generate_dev_keys, mint_user_token
from stagedoor.errors import SECURITY_HEADERS

from .conftest import (
    ROOT,
    RecordingServer,
    Sidecar,
    SilentServer,
    closed_port,
    start_sidecar,
    write_config,
)
from .httpraw import request, send_raw

pytestmark = pytest.mark.e2e

FIXTURE_POLICY = """\
pluginId: fixture
routes:
  - path: /text
    auth: unauthenticated
    upstream: ${fixture.textUrl}/text
  - path: /down
    auth: unauthenticated
    upstream: ${fixture.downUrl}/down
  - path: /slow
    auth: unauthenticated
    timeout: 1s
    upstream: ${fixture.silentUrl}/slow
  - path: /hop
    auth: unauthenticated
    upstream: ${insights.externalApiUrl}/v1/hop
  - path: /status/{code}
    auth: unauthenticated
    params: {code: '^[1-5][0-9][0-9]$'}
    upstream: ${insights.externalApiUrl}/v1/status/{code}
  - path: /items/{name}
    methods: [GET, POST, DELETE]
    auth: [user, service]
    params:
      name: {pattern: '^.+$', message: 'Invalid item: {value}'}
    upstream: ${insights.externalApiUrl}/v1/items/{name}
"""


class Env:
    """Everything one sidecar run needs, shared by the tests of this module."""

    def __init__(self, tmp: Path) -> None:
        self.json = RecordingServer("json")
        self.text = RecordingServer("text")
        self.silent = SilentServer()
        self.keys = generate_dev_keys(tmp / "keys")
        self.json.jwks = self.keys.user_jwks()
        self.issuer = f"{self.json.url}/api/auth"
        policies = tmp / "policies"
        policies.mkdir()
        shutil.copy(ROOT / "policies" / "insights.yaml", policies / "insights.yaml")
        (policies / "fixture.yaml").write_text(FIXTURE_POLICY)
        config = write_config(tmp / "app-config.yaml", f"""\
            backend:
              baseUrl: {self.json.url}
            insights:
              externalApiUrl: ${{INSIGHTS_API_URL}}
            fixture:
              textUrl: {self.text.url}
              downUrl: http://127.0.0.1:{closed_port()}
              silentUrl: {self.silent.url}
            """)
        self.sidecar: Sidecar = start_sidecar([config], policies,
                                              env={"INSIGHTS_API_URL": self.json.url})
        self.token = mint_user_token(self.keys.user, issuer=self.issuer)

    @property
    def port(self) -> int:
        return self.sidecar.port

    def get(self, target: str, token: str | None = None, method: str = "GET",
            headers: dict[str, str] | None = None, **kw: Any):
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        return request(self.port, method, target, all_headers, **kw)

    def stop(self) -> None:
        self.sidecar.stop()
        self.json.stop()
        self.text.stop()
        self.silent.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("gateway"))
    yield e
    e.stop()


def assert_error(resp, status: int, name: str, message: str, method: str, url: str) -> None:
    assert resp.status == status, resp.body
    assert resp.header("content-type") == "application/json; charset=utf-8"
    assert resp.json() == {
        "error": {"name": name, "message": message},
        "request": {"method": method, "url": url},
        "response": {"statusCode": status},
    }


# -- local answers and the check order ------------------------------------------------------------
def test_health_is_answered_locally_without_credentials(env):
    resp = env.get("/api/insights/health")
    assert resp.status == 200
    assert resp.json() == {"status": "ok"}
    assert resp.header("content-type") == "application/json; charset=utf-8"


def test_health_ignores_a_garbage_token(env):
    assert env.get("/api/insights/health", token="garbage").status == 200


def test_every_response_carries_the_security_headers(env):
    for resp in (env.get("/api/insights/health"), env.get("/api/nope"),
                 env.get("/api/insights/services/x", token=env.token)):
        for name, value in SECURITY_HEADERS.items():
            assert resp.header(name) == value, (name, resp.status)


def test_unknown_plugin_is_404_json(env):
    assert_error(env.get("/api/nope/services/x"), 404, "NotFoundError",
                 "No plugin found with id 'nope'", "GET", "/api/nope/services/x")


def test_path_outside_api_is_404_json(env):
    assert_error(env.get("/favicon.ico"), 404, "NotFoundError", "Not Found", "GET",
                 "/favicon.ico")


def test_missing_credentials_is_401_with_www_authenticate(env):
    resp = env.get("/api/insights/services/payments-api")
    assert_error(resp, 401, "AuthenticationError", "Missing credentials", "GET",
                 "/services/payments-api")
    assert resp.header("www-authenticate") == "Bearer"


def test_unknown_route_without_token_is_401_not_404(env):
    assert_error(env.get("/api/insights/secret-admin"), 401, "AuthenticationError",
                 "Missing credentials", "GET", "/secret-admin")


def test_wrong_method_without_token_is_401(env):
    assert env.get("/api/insights/services/x", method="DELETE").status == 401


def test_unknown_route_with_token_is_404(env):
    assert_error(env.get("/api/insights/secret-admin", token=env.token), 404, "NotFoundError",
                 "No route for GET /secret-admin", "GET", "/secret-admin")


def test_wrong_method_is_405_with_allow(env):
    resp = env.get("/api/insights/services/x", token=env.token, method="DELETE")
    assert_error(resp, 405, "MethodNotAllowedError",
                 "Method DELETE is not allowed; allowed: GET, HEAD", "DELETE", "/services/x")
    assert resp.header("allow") == "GET, HEAD"


def test_non_bearer_scheme_is_missing_credentials(env):
    resp = env.get("/api/insights/services/x", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert resp.json()["error"]["message"] == "Missing credentials"


def test_not_a_jwt_is_illegal_token(env):
    assert_error(env.get("/api/insights/services/x", token="not-a-jwt"), 401,
                 "AuthenticationError", "Illegal token", "GET", "/services/x")


def test_bad_parameter_is_400_with_policy_message(env):
    assert_error(env.get("/api/insights/services/Bad_Id", token=env.token), 400, "InputError",
                 "Invalid service id: Bad_Id", "GET", "/services/Bad_Id")


def test_parameter_is_percent_decoded_before_the_regex(env):
    assert_error(env.get("/api/insights/services/pay%2Fments", token=env.token), 400,
                 "InputError", "Invalid service id: pay/ments", "GET", "/services/pay%2Fments")


def test_regex_is_case_sensitive(env):
    assert env.get("/api/insights/services/PAYMENTS", token=env.token).status == 400


def test_request_url_keeps_the_raw_query(env):
    resp = env.get("/api/insights/services/Bad_Id?x=%20y&z", token=env.token)
    assert resp.json()["request"]["url"] == "/services/Bad_Id?x=%20y&z"


def test_bearer_scheme_is_case_insensitive(env):
    resp = env.get("/api/insights/services/payments-api",
                   headers={"Authorization": f"bEaReR {env.token}"})
    assert resp.status == 200


# -- forwarding ------------------------------------------------------------------------------------
def last_seen(server: RecordingServer):
    assert server.seen, "the upstream saw nothing"
    return server.seen[-1]


def test_allowed_request_is_rewritten_to_the_upstream_template(env):
    resp = env.get("/api/insights/services/payments-api?verbose=1", token=env.token)
    assert resp.status == 200
    # undeclared query parameters are dropped, as a Backstage plugin builds its own URL
    assert resp.json()["path"] == "/v1/services/payments-api"
    assert resp.header("x-upstream") == "yes"


def test_trailing_slash_matches_the_same_route(env):
    resp = env.get("/api/insights/services/payments-api/", token=env.token)
    assert resp.status == 200
    assert resp.json()["path"] == "/v1/services/payments-api"


def test_head_is_served_where_get_is(env):
    resp = env.get("/api/insights/services/payments-api", token=env.token, method="HEAD")
    assert resp.status == 200
    assert last_seen(env.json).method == "HEAD"


def test_authorization_is_never_forwarded(env):
    env.get("/api/insights/services/payments-api", token=env.token)
    seen = last_seen(env.json)
    assert "authorization" not in seen.headers
    assert env.token not in repr(seen.headers)


def test_identity_headers_come_only_from_the_verified_principal(env):
    env.get("/api/insights/services/payments-api", token=env.token,
            extra=[("X-Stagedoor-Principal", "user:default/admin"),
                   ("x-stagedoor-principal-type", "service"),
                   ("X-Stagedoor-Anything", "spoof")])
    seen = last_seen(env.json)
    assert seen.headers["x-stagedoor-principal"] == ["user:default/jane"]
    assert seen.headers["x-stagedoor-principal-type"] == ["user"]
    assert "x-stagedoor-anything" not in seen.headers


def test_forwarded_headers_are_set_not_trusted(env):
    env.get("/api/insights/services/payments-api", token=env.token,
            headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example"})
    seen = last_seen(env.json)
    assert seen.headers["x-forwarded-for"] == ["127.0.0.1"]
    assert seen.headers["x-forwarded-proto"] == ["http"]
    assert seen.headers["x-forwarded-host"] == ["127.0.0.1"]
    assert seen.headers["host"] == [env.json.url.removeprefix("http://")]


def test_well_formed_request_id_is_kept(env):
    env.get("/api/insights/services/payments-api", token=env.token,
            headers={"X-Request-Id": "abc-123"})
    assert last_seen(env.json).headers["x-request-id"] == ["abc-123"]


def test_malformed_request_id_is_replaced(env):
    env.get("/api/insights/services/payments-api", token=env.token,
            headers={"X-Request-Id": "<script>"})
    rid = last_seen(env.json).headers["x-request-id"][0]
    assert rid != "<script>" and len(rid) == 32


def test_upstream_status_and_body_pass_through(env):
    resp = env.get("/api/fixture/status/418")
    assert resp.status == 418
    assert resp.json() == {"upstream": "said so"}


def test_hop_by_hop_headers_are_not_passed_either_way(env):
    resp = env.get("/api/fixture/items/x", token=env.token,
                   extra=[("X-Client-Hop", "1"), ("Connection", "X-Client-Hop")])
    assert resp.status == 200
    assert "x-client-hop" not in last_seen(env.json).headers
    resp = env.get("/api/fixture/hop")
    assert resp.status == 200
    assert resp.header("x-hop") is None and resp.header("keep-alive") is None
    assert resp.header("x-upstream") == "yes"


def test_non_json_upstream_body_passes_through(env):
    resp = env.get("/api/fixture/text")
    assert resp.status == 200
    assert resp.body == b"plain words, not JSON"
    assert resp.header("content-type") == "text/plain"


def test_parameter_values_are_reencoded_upstream(env):
    resp = env.get("/api/fixture/items/a%20b%3Fc", token=env.token)
    assert resp.status == 200
    assert resp.json()["path"] == "/v1/items/a%20b%3Fc"


def test_request_body_is_forwarded(env):
    resp = env.get("/api/fixture/items/x", token=env.token, method="POST", body=b'{"a":1}')
    assert resp.status == 200
    assert last_seen(env.json).body == b'{"a":1}'


# -- upstream faults -------------------------------------------------------------------------------
def test_refused_upstream_is_502_json(env):
    resp = env.get("/api/fixture/down")
    assert_error(resp, 502, "BadGatewayError", "The upstream could not be reached", "GET",
                 "/down")
    assert resp.header("x-frame-options") == "SAMEORIGIN"


def test_silent_upstream_is_504_after_the_route_timeout(env):
    started = time.monotonic()
    resp = env.get("/api/fixture/slow", timeout=15)
    elapsed = time.monotonic() - started
    assert_error(resp, 504, "GatewayTimeoutError", "The upstream did not answer in time", "GET",
                 "/slow")
    assert 0.9 <= elapsed < 5, elapsed


def test_head_on_a_refused_upstream_gets_no_body(env):
    import socket

    with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
        sock.sendall(b"HEAD /api/fixture/down HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502")
    assert rest == b""  # bytes after a HEAD answer would be read as the next response


def test_proxy_keeps_serving_after_faults(env):
    env.get("/api/fixture/down")
    assert env.get("/api/insights/health").status == 200


def test_malformed_request_line_gets_json_not_html(env):
    resp = send_raw(env.port, b"GARBAGE\r\n\r\n")
    assert resp.status == 400
    assert resp.header("content-type") == "application/json; charset=utf-8"
    assert resp.json()["error"]["name"] == "InputError"
    assert b"<html" not in resp.body.lower()


def test_local_answer_works_while_the_upstream_is_down(tmp_path):
    down = f"http://127.0.0.1:{closed_port()}"
    config = write_config(tmp_path / "c.yaml", f"""\
        backend:
          baseUrl: {down}
        insights:
          externalApiUrl: {down}
        """)
    sidecar = start_sidecar([config], ROOT / "policies")
    try:
        resp = request(sidecar.port, "GET", "/api/insights/health")
        assert resp.status == 200 and resp.json() == {"status": "ok"}
    finally:
        sidecar.stop()


# -- hostile request targets: never forwarded ------------------------------------------------------
HOSTILE_TARGETS = [
    "/api/insights/services/../health",
    "/api/insights/services/%2e%2e/health",
    "/api/insights/services/%2E%2E",
    "/api/insights/services/.",
    "/api/insights/services/%2e",
    "/api/insights/./services/payments-api",
    "/api/insights/services/payments-api/..",
    "/api/insights//services/payments-api",
    "/api/insights/services//payments-api",
    "/api//insights/services/payments-api",
    "/api/insights/services/pay%2fments",
    "/api/insights/services/..%2fhealth",
    "/api/insights/services/%2e%2e%2fhealth",
    "/api/insights/services/%252e%252e",
    "/api/insights/services/payments%5c..%5chealth",
    "/api/insights/services/payments\\..\\health",
    "/api/insights/services/payments-api;x=1",
    "/api/insights/services;/payments-api",
    "/api/insights/services/payments-api%00",
    "/api/insights/services/payments-api%0d%0aX-Injected:%201",
    "/api/insights/services/%c0%ae%c0%ae",
    "/api/insights/services/%e0%80%ae",
    "/api/insights/services/%ff",
    "/api/insights/services/%",
    "/api/insights/services/%zz",
    "/api/insights/services/payments-api#frag",
    "/api/insights/services/payments-api/extra",
    "/api/INSIGHTS/services/payments-api",
    "/api/Insights/services/payments-api",
    "/API/insights/services/payments-api",
    "/api/insights/SERVICES/payments-api",
    "/api/insights/services/" + "a" * 5000,
    "/api/insights/services/pay ments",
    "/api/%69nsights/services/payments-api",
    "/api/insights/services/payments-api%23frag",
    "/api/insights/services/payments-api%3F",
]


@pytest.mark.parametrize("target", HOSTILE_TARGETS)
def test_hostile_target_is_never_forwarded(env, target):
    def forwarded() -> list[Any]:  # (a key fetch for the token may land meanwhile: not a forward)
        return [s for s in env.json.seen if not s.path.endswith("jwks.json")]

    before = len(forwarded())
    try:
        resp = env.get(target, token=env.token)
    except Exception:  # the proxy may refuse to parse it at all; that is fine too
        resp = None
    if resp is not None:
        assert resp.status in (400, 404, 405), (target, resp.status, resp.body[:200])
        assert resp.header("content-type") == "application/json; charset=utf-8"
    assert len(forwarded()) == before, forwarded()[before:]
    assert env.get("/api/insights/health").status == 200


def _mitmproxy_ca_serial() -> int:
    from cryptography import x509

    ca = Path.home() / ".mitmproxy" / "mitmproxy-ca-cert.pem"
    if not ca.exists():
        pytest.skip("no mitmproxy CA in ~/.mitmproxy yet")
    return x509.load_pem_x509_certificate(ca.read_bytes()).serial_number


def test_crl_path_is_not_answered_by_mitmproxy(env):
    """mitmproxy's TLS addon answers /mitmproxy-<CA serial>.crl itself; ours must not."""
    serial = _mitmproxy_ca_serial()
    for target in (f"/mitmproxy-{serial}.crl", f"/api/insights/mitmproxy-{serial}.crl"):
        resp = env.get(target)
        assert resp.status in (401, 404), (target, resp.status)
        assert resp.header("content-type") == "application/json; charset=utf-8"


def test_absolute_form_target_is_refused(env):
    before = len(env.json.seen)
    raw = (f"GET {env.json.url}/v1/services/payments-api HTTP/1.1\r\nHost: x\r\n"
           f"Authorization: Bearer {env.token}\r\nConnection: close\r\n\r\n").encode()
    resp = send_raw(env.port, raw)
    assert resp.status == 400
    assert len(env.json.seen) == before


def test_connect_is_refused(env):
    resp = send_raw(env.port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n")
    assert resp.status in (400, 405)
    assert b"<html" not in resp.body.lower()


def test_host_header_naming_another_service_changes_nothing(env):
    resp = env.get("/api/insights/services/payments-api", token=env.token,
                   headers={"Host": "internal-admin:8080"})
    assert resp.status == 200
    assert resp.json()["path"] == "/v1/services/payments-api"
