"""The generated OpenAPI document against the real thing: `stagedoor openapi` writes it, the
sidecar serves it, and schemathesis drives a real `stagedoor run` process in front of a real
upstream on 127.0.0.1 with it, checking that every response conforms."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagedoor.devkeys import generate_dev_keys, mint_plugin_token, mint_user_token

from . import forkserver
from .conftest import ROOT, RecordingServer, Sidecar, start_sidecar, write_config
from .httpraw import request

pytestmark = pytest.mark.e2e

# Every kind of route the document has to describe: local answers (JSON, text, a status that
# collides with stagedoor's own 404), forwarding with one and two parameters, several methods on
# one shape with different parameter names, user-only and service-only routes, unanchored and
# alternating regexes, a plugin id with a dash.
SHOP_POLICY = """\
pluginId: shop-api
routes:
  - path: /
    auth: unauthenticated
    respond: {status: 200, json: {plugin: shop-api}}
  - path: /ping
    auth: unauthenticated
    respond: {status: 200, body: pong, contentType: text/plain; charset=utf-8}
  - path: /gone
    auth: unauthenticated
    respond: {status: 404, json: {gone: true}}
  - path: /items/{kind}/{name}
    methods: [GET, DELETE]
    params:
      kind: {pattern: '^(book|game)$', message: 'Unknown kind: {value}'}
      name: {pattern: '[a-z][a-z0-9._-]{0,30}', message: 'Invalid name: {value}'}
    upstream: ${shop.url}/v1/items/{kind}/{name}
  - path: /items/{k}/{n}
    methods: [PUT]
    auth: [user]
    params:
      k: '^book$|^game$'
      n: '^[a-z]+$'
    upstream: ${shop.url}/v1/items/{k}/{n}
  - path: /orders/{id}
    methods: [POST]
    auth: [service]
    params:
      id: '\\d{1,6}'
    upstream: ${shop.url}/v1/orders/{id}
  - path: /search/{term}
    params:
      term: {pattern: '^.{1,40}$'}
    upstream: ${shop.url}/v1/search/{term}
  - path: /catalog
    auth: [user]
    query:
      q: {pattern: '^[a-z]{1,10}$', required: true, message: 'q must be a word'}
      tag: {pattern: '^[a-z]{1,5}$', repeated: true}
      page: {pattern: '^[1-9][0-9]{0,2}$'}
    unknownQuery: reject
    upstream: ${shop.url}/v1/catalog
  - path: /reviews/{id}
    methods: [POST]
    auth: [user]
    params: {id: '^[a-z]{1,10}$'}
    body:
      contentType: application/json
      maxBytes: 1KiB
      schema:
        type: object
        required: [stars]
        properties:
          stars: {type: integer, minimum: 1, maximum: 5}
          text: {type: string, maxLength: 50}
        additionalProperties: false
    upstream: ${shop.url}/v1/reviews/{id}
"""


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.upstream = RecordingServer("json")
        self.keys = generate_dev_keys(tmp / "keys")
        # One JWKS for both: the user-token and the plugin-token key endpoints are this server.
        self.upstream.jwks = {"keys": [*self.keys.user_jwks()["keys"],
                                       *self.keys.plugin_jwks()["keys"]]}
        self.policies = tmp / "policies"
        self.policies.mkdir()
        shutil.copy(ROOT / "policies" / "insights.yaml", self.policies / "insights.yaml")
        (self.policies / "shop.yaml").write_text(SHOP_POLICY)
        self.config = write_config(tmp / "app-config.yaml", f"""\
            backend:
              baseUrl: {self.upstream.url}
            insights:
              externalApiUrl: {self.upstream.url}
            shop:
              url: {self.upstream.url}
            stagedoor:
              openapi:
                serve: true
              accessLog:
                enabled: false
            """)
        self.sidecar: Sidecar = start_sidecar([self.config], self.policies)
        self.token = mint_user_token(self.keys.user, issuer=f"{self.upstream.url}/api/auth")

    def openapi_cli(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return forkserver.run(
            [sys.executable, "-m", "stagedoor.cli", "openapi", "--policies", str(self.policies),
             "--config", str(self.config), *extra], text=True, timeout=30)

    def stop(self) -> None:
        self.sidecar.stop()
        self.upstream.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("openapi"))
    yield e
    e.stop()


@pytest.fixture(scope="module")
def document_file(env: Env) -> Path:
    path = env.tmp / "openapi.json"
    result = env.openapi_cli("--output", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no regex had to be left out
    return path


def test_generated_document_is_valid_openapi_3_1(document_file):
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator

    document = json.loads(document_file.read_text())
    assert document["openapi"] == "3.1.0"
    validate(document, cls=OpenAPIV31SpecValidator)


def test_document_covers_every_plugin_route_and_head(document_file):
    paths = json.loads(document_file.read_text())["paths"]
    assert sorted(paths["/api/shop-api/items/{kind}/{name}"]) == ["delete", "get", "head", "put"]
    assert sorted(paths["/api/insights/services/{id}"]) == ["get", "head"]
    assert "/api/shop-api" in paths
    assert "/api/insights/.stagedoor/openapi.json" in paths  # served: described too


def test_served_document_is_the_cli_document_for_that_plugin(env):
    resp = request(env.sidecar.port, "GET", "/api/shop-api/.stagedoor/openapi.json")
    assert resp.status == 200
    assert resp.header("content-type") == "application/json; charset=utf-8"
    cli = env.openapi_cli("--plugin", "shop-api")
    assert cli.returncode == 0, cli.stderr
    assert resp.json() == json.loads(cli.stdout)


def test_served_document_needs_no_credentials_even_with_a_garbage_token(env):
    resp = request(env.sidecar.port, "GET", "/api/insights/.stagedoor/openapi.json",
                   {"Authorization": "Bearer garbage"})
    assert resp.status == 200
    assert set(resp.json()["paths"]) >= {"/api/insights/services/{id}"}


def test_served_document_refuses_other_methods_with_405(env):
    resp = request(env.sidecar.port, "POST", "/api/insights/.stagedoor/openapi.json")
    assert resp.status == 405
    assert resp.header("allow") == "GET, HEAD"
    assert resp.json()["request"]["url"] == "/.stagedoor/openapi.json"


# 413, 414 and 431 refuse a request for its total size (stagedoor.limits), which no per-parameter
# schema can bound: several long values, each within its `maxLength`, can add up to a request
# head over maxHeaderBytes. 413 and 431 are documented on every operation they can answer; 414
# (a request line over the head limit, e.g. a long query string) is the edge's own answer.
SCHEMATHESIS_TOML = """\
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422",
                     "428", "429", "431", "5xx"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "414", "429", "431", "5xx"]
"""


def run_schemathesis(env: Env, document: Path, token: str, *extra: str) -> None:
    """Every check schemathesis has, a bounded number of cases per operation, 127.0.0.1 only."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    config = env.tmp / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_TOML)
    result = subprocess.run(
        [st, "--config-file", str(config), "run", str(document), "--url", env.sidecar.url,
         "--header", f"Authorization: Bearer {token}",
         "--checks", "all", "--phases", "examples,coverage,fuzzing",
         "--max-examples", "25", "--seed", "20240601", "--workers", "2",
         "--request-timeout", "10", "--no-color", *extra],
        cwd=env.tmp, capture_output=True, text=True, timeout=240)
    failures = result.stdout.partition("FAILURES")[2].partition("=== WARNINGS")[0]
    assert result.returncode == 0, (failures[:8000] or result.stdout[:8000]) + \
        result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_schemathesis_finds_no_nonconforming_response(env, document_file):
    before = len(env.upstream.seen)
    run_schemathesis(env, document_file, env.token)
    forwarded = [s.path for s in env.upstream.seen[before:]]
    assert any(p.startswith("/v1/items/") for p in forwarded)  # valid cases got through
    assert any(p.startswith("/v1/services/") for p in forwarded)
    # query parameters and request bodies: valid ones got through, nothing undeclared did
    catalog = [p for p in forwarded if p.startswith("/v1/catalog")]
    assert catalog and all(_declared_only(p, {"q", "tag", "page"}) for p in catalog)
    reviews = [s for s in env.upstream.seen[before:] if s.path.startswith("/v1/reviews/")]
    assert reviews and all(json.loads(s.body)["stars"] in range(1, 6) for s in reviews)


def _declared_only(path: str, names: set[str]) -> bool:
    from urllib.parse import parse_qsl, urlsplit

    return all(name in names for name, _ in parse_qsl(urlsplit(path).query))


def test_schemathesis_with_service_credentials_on_a_service_only_route(env, document_file):
    token = mint_plugin_token(env.keys.plugin, subject_plugin="catalog",
                              target_plugin="shop-api")
    before = len(env.upstream.seen)
    run_schemathesis(env, document_file, token, "--include-path-regex", "^/api/shop-api/")
    assert any(s.path.startswith("/v1/orders/") for s in env.upstream.seen[before:])
