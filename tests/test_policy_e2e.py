"""Policy language v2 end to end (issue 12): a real `stagedoor run` in front of recording
upstreams on 127.0.0.1 (plain http, https with a private CA, https demanding a client
certificate, https with a certificate from a CA nobody trusts), with real ES256 user tokens.

Query parameters (declared, undeclared, repeated, missing; drop / reject / forward), bodies
(valid, malformed, oversized, wrong type, schema violations), upstream credentials from
app-config (arriving while the client's copy does not, absent from the access log, explain,
an inspect --save file and the OpenAPI document), upstream TLS and the response filter.
"""

from __future__ import annotations

import datetime
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stagedoor.devkeys import generate_dev_keys, mint_user_token
from stagedoor.errors import SECURITY_HEADERS

from . import forkserver
from .conftest import (
    LoopbackServer,
    Sidecar,
    read_request,
    start_sidecar,
    write_config,
)
from .httpraw import request

pytestmark = pytest.mark.e2e

API_TOKEN = "upstream-api-token-7f3a9c1d"  # read from a $file by app-config
API_KEY = "upstream-key-b81e44a0"  # read from ${NOTES_API_KEY}


# -- a private PKI, made by the test ---------------------------------------------------------------
@dataclass
class Pki:
    """A CA, and certificates it signs, written as PEM files."""

    directory: Path
    name: str
    key: ec.EllipticCurvePrivateKey = field(init=False)
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{self.name} test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(True, False, False, False, False, True, True,
                                                  False, False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_file(self) -> Path:
        return self.directory / f"{self.name}-ca.pem"

    def issue(self, common_name: str, *, server: bool) -> tuple[Path, Path]:
        """A leaf certificate (127.0.0.1 for servers) -> (cert file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False))
        if server:
            import ipaddress

            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file = self.directory / f"{self.name}-{common_name}.pem"
        key_file = self.directory / f"{self.name}-{common_name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file


# -- the recording upstream ------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, list[str]]
    body: bytes
    client_cert: str | None


class Upstream(LoopbackServer):
    """Records every request; answers JSON (or HTML under /v1/html) with headers the response
    filter has to deal with."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[Seen] = []
        super().__init__(_Handler, tls)


class _Handler(BaseHTTPRequestHandler):
    server: Upstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        headers, body = read_request(self)
        peer = None
        if isinstance(self.connection, ssl.SSLSocket):
            cert = self.connection.getpeercert()
            if cert:
                peer = dict(x[0] for x in cert["subject"])["commonName"]
        parts = urlsplit(self.path)
        self.server.seen.append(Seen(self.command, parts.path,
                                     parse_qsl(parts.query, keep_blank_values=True), headers,
                                     body, peer))
        if parts.path.startswith("/v1/html"):
            payload, ctype = b"<html><body>upstream error page</body></html>", "text/html"
        else:
            payload = json.dumps({"upstream": True, "path": self.path}).encode()
            ctype = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Set-Cookie", "upstream_session=abc; HttpOnly")
        self.send_header("X-Powered-By", "Express")
        self.send_header("X-Internal-Trace", "trace-123")
        self.send_header("X-Frame-Options", "ALLOWALL")
        self.send_header("X-Kept", "yes")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = _handle


# -- the policy ------------------------------------------------------------------------------------
POLICY = """\
# yaml-language-server: $schema=../stagedoor/schemas/policy.schema.json
pluginId: notes
routes:
  - path: /search
    auth: [user]
    query:
      q: {pattern: "^[a-z ]{1,20}$", required: true, message: "q must be lower-case words"}
      tag: {pattern: "^[a-z]{1,10}$", repeated: true}
      page: {pattern: "^[0-9]{1,4}$", message: "page must be a number"}
    upstream:
      url: ${notes.url}/v1/search
      query: {source: stagedoor}
  - path: /strict
    auth: [user]
    query: {page: {pattern: "^[0-9]{1,4}$"}}
    unknownQuery: reject
    upstream: ${notes.url}/v1/strict
  - path: /loose
    auth: [user]
    query: {page: {pattern: "^[0-9]{1,4}$"}}
    unknownQuery: forward
    upstream: ${notes.url}/v1/loose
  - path: /services/{id}/notes
    methods: [POST]
    auth: [user]
    params: {id: "^[a-z0-9-]+$"}
    body:
      contentType: application/json
      maxBytes: 256
      schema:
        type: object
        required: [text]
        properties:
          text: {type: string, maxLength: 20}
          pinned: {type: boolean}
        additionalProperties: false
    upstream:
      url: ${notes.url}/v1/services/{id}/notes
      headers:
        Authorization: Bearer ${notes.apiToken}
        X-Api-Key: ${notes.apiKey}
      query: {key: "${notes.apiKey}"}
  - path: /plain
    auth: [user]
    upstream: ${notes.url}/v1/plain
  - path: /cookies
    auth: [user]
    upstream: ${notes.url}/v1/cookies
    response:
      headers: {allow: [Set-Cookie], remove: [X-Internal-Trace]}
  - path: /html
    auth: [user]
    upstream: ${notes.url}/v1/html
    response: {expect: json}
  - path: /json
    auth: [user]
    upstream: ${notes.url}/v1/json
    response: {expect: json}
  - path: /tls/private-ca
    auth: [user]
    upstream:
      url: ${notes.tlsUrl}/v1/tls
      tls: {caFile: "${notes.caFile}"}
  - path: /tls/client-cert
    auth: [user]
    upstream:
      url: ${notes.mtlsUrl}/v1/mtls
      tls:
        caFile: ${notes.caFile}
        certFile: ${notes.clientCert}
        keyFile: ${notes.clientKey}
  - path: /tls/unknown-ca
    auth: [user]
    upstream: ${notes.untrustedUrl}/v1/untrusted
"""


class Env:
    def __init__(self, tmp: Path) -> None:
        pki = Pki(tmp, "private")
        stranger = Pki(tmp, "stranger")
        server_cert, server_key = pki.issue("upstream", server=True)
        client_cert, client_key = pki.issue("stagedoor-client", server=False)
        stranger_cert, stranger_key = stranger.issue("impostor", server=True)

        def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            if client_ca is not None:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(client_ca)
            return context

        self.plain = Upstream()
        self.tls = Upstream(server_context(server_cert, server_key, None))
        self.mtls = Upstream(server_context(server_cert, server_key, pki.ca_file))
        self.untrusted = Upstream(server_context(stranger_cert, stranger_key, None))
        self.keys = generate_dev_keys(tmp / "keys")
        self.jwks = Upstream()  # serves nothing but is where the JWKS is fetched from
        self.policies = tmp / "policies"
        self.policies.mkdir()
        (self.policies / "notes.yaml").write_text(POLICY)
        (tmp / "api-token").write_text(API_TOKEN + "\n")
        self.env = {"NOTES_API_KEY": API_KEY}
        self.config = write_config(tmp / "app-config.yaml", f"""\
            backend:
              baseUrl: {self.keys_url}
            notes:
              url: {self.plain.url}
              apiToken: {{$file: api-token}}
              apiKey: ${{NOTES_API_KEY}}
              tlsUrl: {self.tls.url}
              mtlsUrl: {self.mtls.url}
              untrustedUrl: {self.untrusted.url}
              caFile: {pki.ca_file}
              clientCert: {client_cert}
              clientKey: {client_key}
            stagedoor:
              openapi: {{serve: true}}
            """)
        self.sidecar: Sidecar = start_sidecar([self.config], self.policies, env=self.env)
        self.token = mint_user_token(self.keys.user, issuer=f"{self.keys_url}/api/auth")

    @property
    def keys_url(self) -> str:
        return _JwksServer.url_for(self)

    def send(self, method: str, target: str, body: bytes = b"",
             headers: dict[str, str] | None = None, token: bool = True):
        all_headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        all_headers.update(headers or {})
        return request(self.sidecar.port, method, target, all_headers, body=body)

    def get(self, target: str, **kw: Any):
        return self.send("GET", target, **kw)

    def stop(self) -> None:
        self.sidecar.stop()
        for server in (self.plain, self.tls, self.mtls, self.untrusted):
            server.stop()
        _JwksServer.stop_for(self)


class _JwksServer:
    """The user-token JWKS endpoint, one per Env."""

    _servers: dict[int, Any] = {}

    @classmethod
    def url_for(cls, env: Env) -> str:
        from .conftest import RecordingServer

        server = cls._servers.get(id(env))
        if server is None:
            server = RecordingServer("json")
            server.jwks = env.keys.user_jwks()
            cls._servers[id(env)] = server
        return server.url

    @classmethod
    def stop_for(cls, env: Env) -> None:
        server = cls._servers.pop(id(env), None)
        if server is not None:
            server.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("policy-v2"))
    yield e
    e.stop()


def last(server: Upstream) -> Seen:
    assert server.seen, "the upstream saw nothing"
    return server.seen[-1]


def error_of(resp: Any) -> tuple[int, str, str]:
    body = resp.json()
    assert body["response"]["statusCode"] == resp.status
    return resp.status, body["error"]["name"], body["error"]["message"]


# -- query -----------------------------------------------------------------------------------------
def test_declared_query_parameters_are_reencoded_and_undeclared_dropped(env: Env):
    resp = env.get("/api/notes/search?q=two+words&tag=a&tag=b&token=abc&x=%2F..%2Fadmin")
    assert resp.status == 200, resp.body
    seen = last(env.plain)
    assert seen.path == "/v1/search"
    assert seen.query == [("q", "two words"), ("tag", "a"), ("tag", "b"), ("source", "stagedoor")]
    assert "token" not in json.loads(resp.body)["path"]


def test_the_client_query_string_never_reaches_the_upstream_raw(env: Env):
    resp = env.get("/api/notes/plain?a=1?b=/../../v1/admin&id=other")
    assert resp.status == 200
    seen = last(env.plain)
    assert seen.path == "/v1/plain" and seen.query == []


@pytest.mark.parametrize(("target", "message"), [
    ("/api/notes/search?tag=a", "Missing required query parameter 'q'"),
    ("/api/notes/search?q=%3Cscript%3E", "q must be lower-case words"),
    ("/api/notes/search?q=ok&q=2", "Query parameter 'q' must not be repeated"),
    ("/api/notes/search?q=ok&page=x", "page must be a number"),
    ("/api/notes/strict?page=1&debug=1", "Unknown query parameter 'debug'"),
])
def test_bad_query_strings_are_400_and_never_forwarded(env: Env, target: str, message: str):
    before = len(env.plain.seen)
    resp = env.get(target)
    assert error_of(resp) == (400, "InputError", message)
    assert len(env.plain.seen) == before


def test_unknown_query_reject_accepts_declared_parameters(env: Env):
    assert env.get("/api/notes/strict?page=12").status == 200
    assert last(env.plain).query == [("page", "12")]


def test_unknown_query_forward_passes_others_reencoded(env: Env):
    assert env.get("/api/notes/loose?page=3&extra=a%20b&raw=%3C").status == 200
    assert last(env.plain).query == [("page", "3"), ("extra", "a b"), ("raw", "<")]


# -- bodies ----------------------------------------------------------------------------------------
NOTES = "/api/notes/services/payments-api/notes"
JSON = {"Content-Type": "application/json"}


def test_a_valid_body_is_forwarded_unchanged(env: Env):
    body = b'{"text": "hello", "pinned": true}'
    resp = env.send("POST", NOTES, body, JSON)
    assert resp.status == 200, resp.body
    seen = last(env.plain)
    assert seen.method == "POST" and seen.body == body


@pytest.mark.parametrize(("body", "headers", "expected"), [
    (b'{"text": "unterminated', JSON,
     (400, "InputError", "Invalid request body: Unterminated string starting at (line 1, "
                         "column 10)")),
    (b'{"text": "' + b"x" * 300 + b'"}', JSON,
     (413, "PayloadTooLargeError", "request entity too large (at most 256 bytes)")),
    (b"text=hello", {"Content-Type": "application/x-www-form-urlencoded"},
     (415, "UnsupportedMediaTypeError", "Unsupported Media Type: this endpoint accepts "
                                        "application/json")),
    (b'{"text": "far too long for this note"}', JSON,
     (400, "InputError", "Invalid request body: /text: 'f...' is too long (maxLength 20)")),
    (b'{"text": "ok", "pinned": "yes"}', JSON,
     (400, "InputError", "Invalid request body: /pinned: 'y...' is not of type 'boolean'")),
    (b'{"pinned": true}', JSON,
     (400, "InputError", "Invalid request body: /: 'text' is a required property")),
    (b'["text"]', JSON,
     (400, "InputError", "Invalid request body: /: an array is not of type 'object'")),
])
def test_bad_bodies_are_refused_and_never_forwarded(env: Env, body: bytes,
                                                    headers: dict[str, str],
                                                    expected: tuple[int, str, str]):
    before = len(env.plain.seen)
    resp = env.send("POST", NOTES, body, headers)
    assert error_of(resp) == expected
    assert len(env.plain.seen) == before
    assert b"unterminated" not in resp.body and b"far too long" not in resp.body


def test_credentials_are_checked_before_the_body(env: Env):
    resp = env.send("POST", NOTES, b"{bad", JSON, token=False)
    assert error_of(resp) == (401, "AuthenticationError", "Missing credentials")


# -- upstream credentials and secrets --------------------------------------------------------------
def test_the_upstream_credential_arrives_and_the_clients_copy_does_not(env: Env):
    resp = env.send("POST", NOTES, b'{"text": "hi"}',
                    {**JSON, "X-Api-Key": "client-supplied", "x-api-key": "again"})
    assert resp.status == 200
    seen = last(env.plain)
    assert seen.headers["authorization"] == [f"Bearer {API_TOKEN}"]
    assert seen.headers["x-api-key"] == [API_KEY]
    assert ("key", API_KEY) in seen.query


def test_no_secret_in_the_access_log_or_the_console(env: Env):
    env.send("POST", NOTES, b'{"text": "hi"}', JSON)
    deadline = time.monotonic() + 10  # the access log is written in batches
    while time.monotonic() < deadline and not any(
            r.get("route") == "/services/{id}/notes" for r in env.sidecar.access_log()):
        time.sleep(0.05)
    assert any(r.get("route") == "/services/{id}/notes" for r in env.sidecar.access_log())
    output = "\n".join(env.sidecar.stdout_lines + env.sidecar.stderr_lines)
    assert API_TOKEN not in output and API_KEY not in output


def test_no_secret_in_the_openapi_document(env: Env):
    resp = env.get("/api/notes/.stagedoor/openapi.json", token=False)
    assert resp.status == 200
    assert API_TOKEN.encode() not in resp.body and API_KEY.encode() not in resp.body
    result = forkserver.run([sys.executable, "-m", "stagedoor.cli", "openapi", "--policies",
                             str(env.policies), "--config", str(env.config)], text=True,
                            env={**_clean_env(), **env.env})
    assert result.returncode == 0, result.stderr
    assert API_TOKEN not in result.stdout and API_KEY not in result.stdout


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("INSIGHTS_", "BACKSTAGE_"))}


def _explain(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return forkserver.run([sys.executable, "-m", "stagedoor.cli", "explain", "--policies",
                           str(env.policies), "--config", str(env.config), *args], text=True,
                          env={**_clean_env(), **env.env})


def test_explain_shows_the_query_body_and_header_steps_without_secrets(env: Env, tmp_path):
    body = tmp_path / "note.json"
    body.write_text('{"text": "hi"}')
    result = _explain(env, "POST", f"{NOTES}?debug=1", "--user", "user:default/jane",
                      "--body", str(body))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "query" in out and "dropped (undeclared) debug" in out
    assert "Authorization: ***" in out and "X-Api-Key: ***" in out
    assert "14 bytes of application/json: JSON Schema satisfied" in out
    assert "key=***" in out
    assert API_TOKEN not in out + result.stderr and API_KEY not in out + result.stderr


def test_explain_names_a_bad_body(env: Env, tmp_path):
    body = tmp_path / "note.json"
    body.write_text('{"text": 5}')
    result = _explain(env, "POST", NOTES, "--user", "user:default/jane", "--body", str(body))
    assert result.returncode == 1
    assert "400 InputError: Invalid request body: /text: a number is not of type 'string' " \
           "(denied at 'body')" in result.stdout


def test_no_secret_in_an_inspect_save_file(env: Env, tmp_path):
    from .test_inspect_e2e import start_inspect

    save = tmp_path / "flows.mitm"
    config = write_config(tmp_path / "inspect-config.yaml", env.config.read_text().replace(
        "apiToken: {$file: api-token}", f"apiToken: {{$file: {env.config.parent}/api-token}}")
        .replace("${NOTES_API_KEY}", API_KEY))
    inspect = start_inspect(config, env.policies, save)
    try:
        resp = request(inspect.sidecar.port, "POST", NOTES,
                       {"Authorization": f"Bearer {env.token}", **JSON}, body=b'{"text": "hi"}')
        assert resp.status == 200, resp.body
        assert last(env.plain).headers["x-api-key"] == [API_KEY]  # the upstream still got it
    finally:
        assert inspect.sidecar.stop() == 0
    data = save.read_bytes()
    assert b"/v1/services/payments-api/notes" in data  # the flow is there
    assert API_TOKEN.encode() not in data and API_KEY.encode() not in data
    console = "\n".join(inspect.sidecar.stderr_lines + inspect.sidecar.stdout_lines)
    assert API_TOKEN not in console and API_KEY not in console


# -- upstream TLS ----------------------------------------------------------------------------------
def test_an_https_upstream_with_a_private_ca_is_verified_and_used(env: Env):
    resp = env.get("/api/notes/tls/private-ca")
    assert resp.status == 200, resp.body
    assert last(env.tls).path == "/v1/tls"


def test_an_https_upstream_gets_the_client_certificate(env: Env):
    resp = env.get("/api/notes/tls/client-cert")
    assert resp.status == 200, resp.body
    assert last(env.mtls).client_cert == "stagedoor-client"


def test_an_upstream_certificate_from_an_unknown_ca_is_a_502_with_the_reason_logged(env: Env):
    before = len(env.untrusted.seen)
    resp = env.get("/api/notes/tls/unknown-ca")
    assert error_of(resp) == (502, "BadGatewayError", "The upstream could not be reached")
    assert len(env.untrusted.seen) == before
    deadline = time.monotonic() + 10  # the log line may still be in the pipe
    while time.monotonic() < deadline:
        lines = [line for line in env.sidecar.stderr_lines if "/tls/unknown-ca" in line]
        if lines:
            break
        time.sleep(0.05)
    assert any("certificate verify failed" in line.lower() for line in lines), \
        env.sidecar.stderr_lines


# -- response filter -------------------------------------------------------------------------------
def test_the_default_response_filter(env: Env):
    resp = env.get("/api/notes/plain")
    assert resp.status == 200
    assert resp.header("set-cookie") is None and resp.header("x-powered-by") is None
    assert resp.header("server") is None
    assert resp.header("x-kept") == "yes" and resp.header("x-internal-trace") == "trace-123"
    assert resp.header("x-frame-options") == SECURITY_HEADERS["X-Frame-Options"]
    assert resp.headers.get_all("x-frame-options") == [SECURITY_HEADERS["X-Frame-Options"]]


def test_a_route_allows_set_cookie_and_removes_a_header(env: Env):
    resp = env.get("/api/notes/cookies")
    assert resp.header("set-cookie") == "upstream_session=abc; HttpOnly"
    assert resp.header("x-internal-trace") is None and resp.header("x-powered-by") is None


def test_expect_json_turns_an_html_answer_into_a_502(env: Env):
    resp = env.get("/api/notes/html")
    assert error_of(resp) == (502, "BadGatewayError",
                              "The upstream answered with something other than JSON")
    assert b"upstream error page" not in resp.body
    assert resp.header("x-frame-options") == SECURITY_HEADERS["X-Frame-Options"]
    assert resp.header("set-cookie") is None
    assert env.get("/api/notes/json").status == 200
