"""The OpenAPI generator, without a proxy: regex translation, the document, the local answer."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stagedoor import cli
from stagedoor.config import Config, load_config
from stagedoor.decide import Answer, Deny
from stagedoor.openapi import (
    SELF_PATH,
    PatternNotTranslatable,
    ServedDocuments,
    build_document,
    ecma_pattern,
)
from stagedoor.policy import PolicySet, load_policies

ROOT = Path(__file__).resolve().parent.parent

POLICY = """\
pluginId: shop
routes:
  - path: /health
    auth: unauthenticated
    respond: {status: 200, json: {status: ok}}
  - path: /gone
    auth: unauthenticated
    respond: {status: 404, json: {gone: true}, headers: {X-Why: retired}}
  - path: /items/{name}
    methods: [GET, DELETE]
    auth: [user]
    params: {name: '[a-z]+'}
    upstream: ${shop.url}/v1/items/{name}
  - path: /items/{id}
    methods: [POST]
    auth: [service]
    params: {id: '^[0-9]+$'}
    upstream: ${shop.url}/v1/items/{id}
  - path: /flags/{f}
    auth: unauthenticated
    params: {f: '(?i)on|off'}
    upstream: ${shop.url}/v1/flags/{f}
"""


def policy_set(tmp_path: Path, text: str = POLICY,
               config_text: str = "shop: {url: 'http://10.1.2.3:8080'}\n") -> PolicySet:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "shop.yaml").write_text(text)
    (tmp_path / "app-config.yaml").write_text(config_text)
    return load_policies(policies, load_config([tmp_path / "app-config.yaml"]))


# -- regex translation -----------------------------------------------------------------------------
PATTERNS = [
    r"^[a-z0-9-]+$", r"[a-z0-9-]+", r"^a|b$", r"ab|cd", r"\Aab\Z", r"^.+$", r"a{,3}", r"a{2,}",
    r"[]a]+", r"[^]a]", r"x]", r"a{b", r"\-x", r"(?P<n>ab)(?P=n)", r"(?P<n>a)(?P=n)1",
    r"\d{1,3}(\.\d+)?",
    r"[\w.-]+@[a-z]+", r"(?:v[0-9]+)?", r"\x41\u00e9", r"^$", r"[a-c\]]*", r"(a)\1",
    r"(?!admin$)[a-z]+", r"[$^]+", r"^\^\$$", r"a.c", r"\N{DIGIT ONE}",
]
SAMPLES = ["", "a", "b", "ab", "abab", "cd", "abc", "a-1", "Ab", "aaa", "aaaa", "]", "]]a", "x]",
           "a{b", "-x", "12", "12.5", "1234", "a.b@c", "v1", "Aé", "$^", "^$", "a\u2028c", "a\rc",
           "admin", "admins", "aa", "1", "axc", "aa1"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_translated_pattern_searched_accepts_exactly_what_fullmatch_accepts(pattern):
    translated = re.compile(ecma_pattern(pattern))
    original = re.compile(pattern)
    for sample in SAMPLES:
        assert bool(translated.search(sample)) == bool(original.fullmatch(sample)), sample


def test_translated_patterns_mean_the_same_in_ecma_262():
    """Checked in a real ECMA-262 engine (node, `u` flag as JSON Schema validators use)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: no ECMA-262 engine to compare with")
    script = ("const [ps, ss] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "console.log(JSON.stringify(ps.map(p => ss.map(s => new RegExp(p, 'u').test(s)))))")
    translated = [ecma_pattern(p) for p in PATTERNS]
    out = subprocess.run([node, "-e", script], input=json.dumps([translated, SAMPLES]),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    for pattern, results in zip(PATTERNS, json.loads(out), strict=True):
        expected = [bool(re.fullmatch(pattern, s)) for s in SAMPLES]
        assert results == expected, pattern


def test_an_anchored_pattern_is_kept_as_written():
    assert ecma_pattern(r"^[a-z0-9-]+$") == r"^[a-z0-9-]+$"


def test_an_unanchored_pattern_is_anchored():
    assert ecma_pattern(r"[a-z]+") == r"^(?:[a-z]+)$"


def test_alternation_is_anchored_as_a_whole():
    assert ecma_pattern(r"^a|b$") == r"^(?:^a|b$)$"


@pytest.mark.parametrize("pattern", [r"(?i)abc", r"a*+", r"(?>a)", r"(a)?(?(1)b|c)"])
def test_python_only_syntax_is_not_translatable(pattern):
    with pytest.raises(PatternNotTranslatable):
        ecma_pattern(pattern)


# -- the document ----------------------------------------------------------------------------------
@pytest.fixture
def document(tmp_path):
    warnings: list[str] = []
    doc = build_document(policy_set(tmp_path), warnings=warnings)
    doc["_warnings"] = warnings
    return doc


def test_document_is_valid_openapi_3_1(document):
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator

    document.pop("_warnings")
    validate(document, cls=OpenAPIV31SpecValidator)


def test_paths_sit_under_the_plugin_mount_with_head_wherever_get(document):
    paths = document["paths"]
    assert sorted(paths) == ["/api/shop/flags/{f}", "/api/shop/gone", "/api/shop/health",
                             "/api/shop/items/{name}"]
    assert sorted(paths["/api/shop/items/{name}"]) == ["delete", "get", "head", "post"]


def test_a_route_declaring_head_itself_wins_over_the_implicit_head(tmp_path):
    policies = policy_set(tmp_path, """\
pluginId: shop
routes:
  - path: /a/{x}
    params: {x: '^[a-z]+$'}
    respond: {status: 200, json: {get: true}}
  - path: /a/{y}
    methods: [HEAD]
    auth: unauthenticated
    params: {y: '^[0-9]+$'}
    respond: {status: 204, body: ''}
""")
    item = build_document(policies)["paths"]["/api/shop/a/{x}"]
    assert list(item) == ["get", "head"]
    assert item["head"]["security"] == [] and "204" in item["head"]["responses"]
    assert item["head"]["parameters"][0]["schema"]["pattern"] == "^[0-9]+$"


def test_routes_of_one_shape_share_a_path_and_its_parameter_names(document):
    post = document["paths"]["/api/shop/items/{name}"]["post"]
    assert [p["name"] for p in post["parameters"]] == ["name"]
    assert post["parameters"][0]["schema"]["pattern"] == "^[0-9]+$"  # the POST route's regex


def test_parameter_schema_is_the_anchored_regex_plus_what_the_gateway_always_refuses(document):
    param = document["paths"]["/api/shop/items/{name}"]["get"]["parameters"][0]
    assert param["in"] == "path" and param["required"] is True
    assert param["x-stagedoor-pattern"] == "[a-z]+"
    schema = param["schema"]
    assert schema["pattern"] == "^(?:[a-z]+)$"
    assert schema["minLength"] == 1 and schema["maxLength"] == 1024
    refused = schema["not"]["anyOf"]
    assert refused[0] == {"enum": [".", ".."]}
    assert all(re.search(refused[1]["pattern"], c) for c in ("/", "\\", "\x00", "\n", "\x7f"))


def test_credentialed_routes_use_the_bearer_scheme(document):
    get = document["paths"]["/api/shop/items/{name}"]["get"]
    assert get["security"] == [{"backstage": []}]
    assert get["x-stagedoor-auth"] == ["user"]
    scheme = document["components"]["securitySchemes"]["backstage"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"


def test_unauthenticated_routes_need_no_security(document):
    assert document["paths"]["/api/shop/health"]["get"]["security"] == []


def test_error_statuses_follow_what_the_route_can_produce(document):
    paths = document["paths"]
    forwarded = paths["/api/shop/items/{name}"]["get"]["responses"]
    assert set(forwarded) == {"400", "401", "403", "404", "405", "431", "502", "503", "504",
                              "default"}
    local = paths["/api/shop/health"]["get"]["responses"]
    assert set(local) == {"200", "400", "404", "405", "431"}  # no credentials, no upstream
    open_forward = paths["/api/shop/flags/{f}"]["get"]["responses"]
    assert set(open_forward) == {"400", "404", "405", "431", "502", "504", "default"}
    with_body = paths["/api/shop/items/{name}"]["post"]["responses"]
    assert "413" in with_body and "413" not in forwarded


def test_error_bodies_have_the_backstage_shape_and_nothing_else(document):
    schema = document["components"]["schemas"]["ErrorBody"]
    assert schema["required"] == ["error", "request", "response"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["error"]["additionalProperties"] is False  # no stack, ever
    input_error = document["components"]["responses"]["InputError"]
    parts = input_error["content"]["application/json"]["schema"]["allOf"]
    assert parts[1]["properties"]["error"]["properties"]["name"] == {"const": "InputError"}
    assert parts[1]["properties"]["response"]["properties"]["statusCode"] == {"const": 400}


def test_errors_carry_their_required_headers(document):
    responses = document["components"]["responses"]
    assert responses["AuthenticationError"]["headers"]["WWW-Authenticate"]["required"] is True
    assert responses["MethodNotAllowedError"]["headers"]["Allow"]["required"] is True
    assert responses["ServiceUnavailableError"]["headers"]["Retry-After"]["required"] is True


def test_head_operations_describe_no_body(document):
    head = document["paths"]["/api/shop/items/{name}"]["head"]["responses"]
    assert head["400"] == {"$ref": "#/components/responses/InputErrorNoBody"}
    assert "content" not in document["components"]["responses"]["InputErrorNoBody"]
    assert "content" not in document["paths"]["/api/shop/health"]["head"]["responses"]["200"]


def test_a_local_answer_is_described_by_its_value(document):
    ok = document["paths"]["/api/shop/health"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"const": {"status": "ok"}}


def test_a_local_answer_with_an_error_status_may_also_be_stagedoors_error(document):
    gone = document["paths"]["/api/shop/gone"]["get"]["responses"]["404"]
    either = gone["content"]["application/json"]["schema"]["anyOf"]
    assert either[0] == {"const": {"gone": True}}
    assert either[1]["allOf"][0] == {"$ref": "#/components/schemas/ErrorBody"}
    assert gone["headers"]["X-Why"]["required"] is False


def test_untranslatable_regex_is_left_out_with_a_warning_naming_file_and_line(document):
    schema = document["paths"]["/api/shop/flags/{f}"]["get"]["parameters"][0]["schema"]
    assert "pattern" not in schema
    [warning] = document["_warnings"]
    assert "shop.yaml:" in warning and "(?i)on|off" in warning


def test_nothing_internal_leaks_into_the_document(document):
    document.pop("_warnings")
    text = json.dumps(document)
    assert "10.1.2.3" not in text and "/v1/items" not in text and "shop.yaml" not in text


def test_operation_ids_are_unique(document):
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_one_plugin_only_and_unknown_plugins_are_refused(tmp_path):
    policies = policy_set(tmp_path)
    assert build_document(policies, plugin_ids=["shop"])["info"]["title"] == "stagedoor: /api/shop"
    with pytest.raises(KeyError, match="nope"):
        build_document(policies, plugin_ids=["nope"])


def test_served_document_path_is_described_when_served(tmp_path):
    doc = build_document(policy_set(tmp_path), serve_self=True)
    item = doc["paths"]["/api/shop" + SELF_PATH]
    assert sorted(item) == ["get", "head"] and item["get"]["security"] == []


# -- the local answer ------------------------------------------------------------------------------
def serving(enabled: bool) -> Config:
    return Config(data={"stagedoor": {"openapi": {"serve": enabled}}})


def served(policies: PolicySet, config: Config) -> ServedDocuments:
    return ServedDocuments.build(policies, config)


def test_endpoint_is_off_by_default(tmp_path):
    docs = served(policy_set(tmp_path), Config())
    assert docs.answer("GET", "/api/shop" + SELF_PATH) is None


def test_endpoint_answers_get_locally_with_the_plugins_document(tmp_path):
    policies = policy_set(tmp_path)
    decision = served(policies, serving(True)).answer("GET", f"/api/shop{SELF_PATH}?x=1")
    assert isinstance(decision, Answer)
    assert decision.principal is None  # no credentials were looked at
    assert decision.url == f"{SELF_PATH}?x=1"
    assert json.loads(decision.local.body) == build_document(policies, plugin_ids=["shop"],
                                                             serve_self=True)


def test_endpoint_refuses_other_methods_with_405(tmp_path):
    decision = served(policy_set(tmp_path), serving(True)).answer("POST", "/api/shop" + SELF_PATH)
    assert isinstance(decision, Deny) and decision.check == "method"
    assert decision.error.status == 405
    assert ("Allow", "GET, HEAD") in decision.error.headers


@pytest.mark.parametrize("target", ["/api/nope" + SELF_PATH, "/api/shop/x" + SELF_PATH,
                                    "/api/shop/health", "/api/shop/.stagedoor/openapi.json/x"])
def test_endpoint_leaves_every_other_request_to_the_pipeline(tmp_path, target):
    assert served(policy_set(tmp_path), serving(True)).answer("GET", target) is None


def test_documents_are_rendered_once_per_load(tmp_path):
    docs = served(policy_set(tmp_path), serving(True))
    first = docs.answer("GET", "/api/shop" + SELF_PATH)
    second = docs.answer("GET", "/api/shop" + SELF_PATH)
    assert isinstance(first, Answer) and isinstance(second, Answer)
    assert first.local is second.local  # the same rendered bytes, not rebuilt per request
    reloaded = served(policy_set(tmp_path, POLICY.replace("/gone", "/retired")), serving(True))
    third = reloaded.answer("GET", "/api/shop" + SELF_PATH)
    assert isinstance(third, Answer) and b"/retired" in third.local.body


# -- the command -----------------------------------------------------------------------------------
def test_cli_prints_the_document_without_upstream_config_values(monkeypatch, capsys):
    """`${insights.externalApiUrl}` has no value without INSIGHTS_API_URL: not needed here."""
    monkeypatch.delenv("INSIGHTS_API_URL", raising=False)
    monkeypatch.chdir(ROOT)
    assert cli.main(["openapi", "--policies", "policies"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "/api/insights/services/{id}" in doc["paths"]


def test_cli_writes_yaml_to_a_file(tmp_path, monkeypatch):
    import yaml

    policy_set(tmp_path)
    out = tmp_path / "openapi.yaml"
    assert cli.main(["openapi", "--policies", str(tmp_path / "policies"), "--config",
                     str(tmp_path / "app-config.yaml"), "--format", "yaml", "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["openapi"] == "3.1.0"


def test_cli_reports_a_broken_policy_with_file_and_line(tmp_path, capsys):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "bad.yaml").write_text("pluginId: bad\nroutes:\n  - path: /x/{id}\n"
                                       "    respond: {status: 200}\n")
    assert cli.main(["openapi", "--policies", str(policies)]) == 1
    assert "bad.yaml:3:" in capsys.readouterr().err
