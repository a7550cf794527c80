"""Permission rules: evaluation order, conditions, dry-run, delegation, explain, end to end."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jwt
import pytest

from stagedoor.auth import Principal
from stagedoor.config import Config
from stagedoor.decide import GatewayRequest, decide
from stagedoor.devkeys import generate_dev_keys, mint_user_token
from stagedoor.minting import limited_user_token
from stagedoor.permissions import (
    Authorizer,
    DelegationNeeded,
    evaluate,
    parse_rules,
)
from stagedoor.policy import PolicyLoadError, load_policies

from . import forkserver
from .conftest import ROOT, LoopbackServer, RecordingServer, start_sidecar, write_config
from .httpraw import request

JANE = Principal("user", "user:default/jane", ownership=("user:default/jane",
                                                         "group:default/payments"))
BOB = Principal("user", "user:default/bob", ownership=("user:default/bob",))
CATALOG = Principal("service", "plugin:catalog")


def rules(*items: dict[str, Any]):
    problems: list[tuple[int, str]] = []
    parsed = parse_rules(list(items), "test.yaml", list(range(1, len(items) + 1)), problems)
    assert not problems, problems
    return parsed


def verdict(rule_list, principal, permission="insights.service.read", resource=None,
            delegated=None):
    groups = frozenset(principal.ownership) if principal else frozenset()
    return evaluate(rule_list, permission, principal, groups, resource, delegated)


# -- evaluation --------------------------------------------------------------------------------
def test_nothing_matching_is_default_deny():
    outcome = verdict(rules({"permission": "other.read", "effect": "allow"}), JANE)
    assert not outcome.allowed and outcome.rule is None


def test_first_matching_rule_wins():
    r = rules({"permission": "insights.*", "effect": "deny"},
              {"permission": "insights.service.read", "effect": "allow"})
    assert not verdict(r, JANE).allowed
    assert verdict(r, JANE).rule.line == 1


def test_permission_glob_matches():
    assert verdict(rules({"permission": "insights.*", "effect": "allow"}), JANE).allowed


def test_user_glob_condition():
    r = rules({"permission": "*", "effect": "allow", "when": {"user": "user:default/j*"}})
    assert verdict(r, JANE).allowed and not verdict(r, BOB).allowed
    assert not verdict(r, CATALOG).allowed


def test_member_of_uses_ownership_refs():
    r = rules({"permission": "*", "effect": "allow",
               "when": {"memberOf": "group:default/payments"}})
    assert verdict(r, JANE).allowed and not verdict(r, BOB).allowed


def test_service_subject_condition():
    r = rules({"permission": "*", "effect": "allow", "when": {"service": "plugin:catalog"}})
    assert verdict(r, CATALOG).allowed and not verdict(r, JANE).allowed


def test_principal_kind_condition():
    r = rules({"permission": "*", "effect": "allow", "when": {"principal": "service"}})
    assert verdict(r, CATALOG).allowed and not verdict(r, JANE).allowed


def test_resource_condition():
    r = rules({"permission": "*", "effect": "allow", "when": {"resource": "payments-*"}})
    assert verdict(r, JANE, resource="payments-api").allowed
    assert not verdict(r, JANE, resource="search").allowed
    assert not verdict(r, JANE, resource=None).allowed


def test_dry_run_rule_is_recorded_then_skipped():
    r = rules({"permission": "*", "effect": "deny", "enforce": False},
              {"permission": "*", "effect": "allow"})
    outcome = verdict(r, JANE)
    assert outcome.allowed and outcome.rule.line == 2
    assert [(rule.line, effect) for rule, effect in outcome.shadow] == [(1, "deny")]


def test_delegation_without_an_answer_asks():
    r = rules({"permission": "*", "effect": "delegate"})
    with pytest.raises(DelegationNeeded):
        verdict(r, JANE, delegated=lambda: None)
    assert verdict(r, JANE, delegated=lambda: True).allowed
    assert not verdict(r, JANE, delegated=lambda: False).allowed


@pytest.mark.parametrize(("rule", "fragment"), [  # the schema's words, as the loader says them
    ({"permission": "x"}, "missing 'effect' in permission rule"),
    ({"effect": "allow"}, "missing 'permission' in permission rule"),
    ({"permission": "x", "effect": "allow", "when": {"colour": "red"}}, "unknown key 'colour'"),
    ({"permission": "x", "effect": "allow", "when": {"principal": "robot"}},
     "'principal' must be one of user, service, got 'robot'"),
    ({"permission": "x", "effect": "allow", "enforce": "no"}, "'enforce' must be true or false"),
])
def test_bad_rules_are_reported(rule, fragment):
    problems: list[tuple[int, str]] = []
    parse_rules([rule], "f.yaml", [7], problems)
    assert problems and problems[0][0] == 7 and fragment in problems[0][1]


# -- policies --------------------------------------------------------------------------------------
CONFIG = Config(data={"insights": {"externalApiUrl": "http://127.0.0.1:9000"}})

GATED = """\
pluginId: gated
routes:
  - path: /things/{id}
    auth: [user, service]
    params: {id: '^[a-z0-9-]+$'}
    permission: gated.thing.read
    resource: id
    upstream: ${insights.externalApiUrl}/things/{id}
  - path: /shadow
    auth: [user]
    permission: gated.shadow
    enforce: false
    upstream: ${insights.externalApiUrl}/shadow
  - path: /delegated
    auth: [user]
    permission: gated.delegated
    upstream: ${insights.externalApiUrl}/delegated
permissions:
  - permission: gated.thing.read
    effect: deny
    when: {resource: 'secret-*'}
  - permission: gated.thing.read
    effect: allow
    when: {memberOf: group:default/payments}
  - permission: gated.delegated
    effect: delegate
"""

SHARED = """\
permissions:
  - permission: gated.thing.read
    effect: allow
    when: {service: plugin:catalog}
"""


def gated_policies(tmp_path: Path):
    (tmp_path / "gated.yaml").write_text(GATED)
    (tmp_path / "permissions.yaml").write_text(SHARED)
    return load_policies(tmp_path, CONFIG)


class Fixed:
    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    def verify(self, token: str, plugin_id: str) -> Principal:
        return self.principal


def run(policies, principal, target, authorizer=None):
    return decide(GatewayRequest("GET", target, ("Bearer t",)), policies, Fixed(principal),
                  authorizer)


def test_plugin_rules_then_shared_rules(tmp_path):
    policies = gated_policies(tmp_path)
    assert run(policies, JANE, "/api/gated/things/a").allowed
    assert run(policies, CATALOG, "/api/gated/things/a").allowed       # shared rule
    denied = run(policies, BOB, "/api/gated/things/a")
    assert (denied.check, denied.error.status) == ("permission", 403)
    assert denied.error.message == "Permission 'gated.thing.read' denied"


def test_resource_rule_denies_before_group_rule(tmp_path):
    assert run(gated_policies(tmp_path), JANE, "/api/gated/things/secret-x").error.status == 403


def test_route_enforce_false_allows_and_records(tmp_path):
    d = run(gated_policies(tmp_path), JANE, "/api/gated/shadow")
    assert d.allowed and d.upstream is not None
    assert d.dry_run and "would deny" in d.dry_run[0]


def test_access_restricted_permissions(tmp_path):
    restricted = Principal("service", "external:ci", access_permissions=frozenset({"other"}))
    d = run(gated_policies(tmp_path), restricted, "/api/gated/things/a")
    assert d.error.status == 403 and "restricted" in d.error.message


def test_membership_map_from_config_gives_groups():
    authorizer = Authorizer.from_config(
        Config(data={"stagedoor": {"permissions": {"membership": {
            "user:default/bob": ["group:default/payments"]}}}}), None)
    assert "group:default/payments" in authorizer.groups_for(
        Principal("user", "user:default/bob"))


def test_unauthenticated_route_cannot_name_a_permission(tmp_path):
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        pluginId: p
        routes:
          - path: /x
            auth: unauthenticated
            permission: p.x
            respond: {status: 200}
        """))
    with pytest.raises(PolicyLoadError, match="cannot check a permission"):
        load_policies(tmp_path, CONFIG)


# -- delegation to a real permission backend ---------------------------------------------------
class PermissionBackend(LoopbackServer):
    def __init__(self) -> None:
        self.answer = "ALLOW"
        self.delay = 0.0
        self.calls: list[dict[str, Any]] = []
        super().__init__(_PermissionHandler)


class _PermissionHandler(BaseHTTPRequestHandler):
    server: PermissionBackend
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.calls.append({"path": self.path, "body": body,
                                  "authorization": self.headers.get("authorization")})
        time.sleep(self.server.delay)
        items = [{"id": item["id"], "result": self.server.answer} for item in body["items"]]
        payload = json.dumps({"items": items}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def backend():
    server = PermissionBackend()
    yield server
    server.shutdown()
    server.server_close()


async def ask(authorizer: Authorizer, token: str = "tok") -> bool:
    return await authorizer.resolve(token, "gated.delegated")


def test_delegation_allow_sends_the_backstage_body(backend):
    import asyncio

    authorizer = Authorizer(backend.url)
    assert asyncio.run(ask(authorizer)) is True
    call = backend.calls[0]
    assert call["path"] == "/authorize"
    assert call["authorization"] == "Bearer tok"
    item = call["body"]["items"][0]
    assert item["permission"] == {"type": "basic", "name": "gated.delegated", "attributes": {}}
    assert authorizer.cached("tok", "gated.delegated") is True


def test_delegation_deny(backend):
    import asyncio

    backend.answer = "DENY"
    assert asyncio.run(ask(Authorizer(backend.url))) is False


def test_delegation_backend_down_is_deny():
    import asyncio

    from .conftest import closed_port

    authorizer = Authorizer(f"http://127.0.0.1:{closed_port()}")
    assert asyncio.run(ask(authorizer)) is False
    assert authorizer.stats["unreachable"] == 1


def test_delegation_backend_slow_is_deny_after_timeout(backend):
    import asyncio

    backend.delay = 1.5
    authorizer = Authorizer(backend.url, timeout=0.3)
    started = time.monotonic()
    assert asyncio.run(ask(authorizer)) is False
    assert time.monotonic() - started < 1.4


def test_delegation_answers_are_cached(backend):
    import asyncio

    authorizer = Authorizer(backend.url)
    asyncio.run(ask(authorizer))
    assert authorizer.cached("tok", "gated.delegated") is True
    assert len(backend.calls) == 1


# -- end to end through the proxy, and explain ---------------------------------------------------
@pytest.fixture(scope="module")
def gated_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("perm")
    upstream = RecordingServer("json")
    permission_backend = PermissionBackend()
    keys = generate_dev_keys(tmp / "keys")
    upstream.jwks = keys.user_jwks()
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "gated.yaml").write_text(GATED)
    (policies / "permissions.yaml").write_text(SHARED)
    shutil.copy(ROOT / "policies" / "insights.yaml", policies / "insights.yaml")
    config = write_config(tmp / "app-config.yaml", f"""\
        backend:
          baseUrl: {upstream.url}
        discovery:
          endpoints:
            - target: {permission_backend.url}
              plugins: [permission]
        insights:
          externalApiUrl: {upstream.url}
        """)
    sidecar = start_sidecar([config], policies)
    issuer = f"{upstream.url}/api/auth"
    tokens = {
        "jane": mint_user_token(keys.user, issuer=issuer, subject="user:default/jane",
                                ownership=["user:default/jane", "group:default/payments"]),
        "bob": mint_user_token(keys.user, issuer=issuer, subject="user:default/bob"),
    }
    yield sidecar, upstream, permission_backend, tokens, config, policies
    sidecar.stop()
    upstream.stop()
    permission_backend.shutdown()
    permission_backend.server_close()


def get(sidecar, target, token):
    return request(sidecar.port, "GET", target, {"Authorization": f"Bearer {token}"})


def test_e2e_permission_allows_group_member(gated_env):
    sidecar, *_, tokens, _, _ = gated_env
    resp = get(sidecar, "/api/gated/things/abc", tokens["jane"])
    assert resp.status == 200 and resp.json()["path"] == "/things/abc"


def test_e2e_permission_denies_with_403_json(gated_env):
    sidecar, upstream, _, tokens, _, _ = gated_env
    def forwarded() -> int:  # (a key fetch for the token may land meanwhile: not a forward)
        return len([s for s in upstream.seen if not s.path.endswith("jwks.json")])

    before = forwarded()
    resp = get(sidecar, "/api/gated/things/abc", tokens["bob"])
    assert resp.status == 403
    assert resp.json() == {"error": {"name": "NotAllowedError",
                                     "message": "Permission 'gated.thing.read' denied"},
                           "request": {"method": "GET", "url": "/things/abc"},
                           "response": {"statusCode": 403}}
    assert forwarded() == before


def test_e2e_dry_run_lets_through_and_logs(gated_env):
    sidecar, *_, tokens, _, _ = gated_env
    resp = get(sidecar, "/api/gated/shadow", tokens["bob"])
    assert resp.status == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any("dry-run" in line and "would deny" in line for line in sidecar.stderr_lines):
            break
        time.sleep(0.05)
    assert any("dry-run" in line and "would deny" in line for line in sidecar.stderr_lines)


def test_e2e_delegation_allow_then_deny(gated_env):
    sidecar, _, permission_backend, tokens, _, _ = gated_env
    permission_backend.answer = "ALLOW"
    assert get(sidecar, "/api/gated/delegated", tokens["jane"]).status == 200
    permission_backend.answer = "DENY"
    # bob's token is a different cache key: the backend is asked again
    assert get(sidecar, "/api/gated/delegated", tokens["bob"]).status == 403
    # asked as a Backstage plugin asks: its own plugin token, on behalf of bob (never bob's
    # token itself), signed with a key the sidecar publishes
    sent = permission_backend.calls[-1]["authorization"].removeprefix("Bearer ")
    assert sent != tokens["bob"]
    jwks = json.loads(get(sidecar, "/api/gated/.backstage/auth/v1/jwks.json", None).body)
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(sent)["kid"]]
    claims = jwt.decode(sent, key.key, algorithms=["ES256"], audience="permission")
    assert jwt.get_unverified_header(sent)["typ"] == "vnd.backstage.plugin"
    assert claims["sub"] == "gated"
    assert claims["obo"] == limited_user_token(tokens["bob"]).token


def test_e2e_delegations_are_counted_in_metrics(gated_env):
    from .test_live_e2e import sample, scrape

    sidecar, _, permission_backend, tokens, _, _ = gated_env
    name = "stagedoor_permission_delegations_total"
    cached_before = sample(scrape(sidecar), name, outcome="cached")
    permission_backend.answer = "ALLOW"
    for _ in range(2):  # the second answer comes from the decision cache
        assert get(sidecar, "/api/gated/delegated", tokens["jane"]).status == 200
    after = scrape(sidecar)
    assert sample(after, name, outcome="cached") >= cached_before + 1
    assert sample(after, name, outcome="asked") >= 1


def explain_cli(config, policies, *args):
    return forkserver.run([sys.executable, "-m", "stagedoor.cli", "explain", "--config",
                           str(config), "--policies", str(policies), *args], text=True)


def test_explain_allowed_request_exits_0_and_shows_every_step(gated_env):
    *_, config, policies = gated_env
    result = explain_cli(config, policies, "GET", "http://127.0.0.1:7007/api/gated/things/abc",
                         "--user", "user:default/jane")
    # --user has no 'ent' claim: the membership falls back to the user itself -> default deny
    assert result.returncode == 1, result.stdout + result.stderr
    result = explain_cli(config, policies, "GET", "/api/gated/things/abc",
                         "--service", "plugin:catalog")
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("plugin", "barrier", "route", "principal", "params", "permission", "action"):
        assert f"  {step}" in result.stdout
    assert "=> allow: forward to" in result.stdout and "/things/abc" in result.stdout


def test_explain_with_a_real_token(gated_env):
    *_, tokens, config, policies = gated_env
    result = explain_cli(config, policies, "GET", "/api/gated/things/abc", "--token",
                         tokens["jane"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "user user:default/jane" in result.stdout


def test_explain_denied_request_exits_1_and_names_the_rule(gated_env):
    *_, config, policies = gated_env
    result = explain_cli(config, policies, "GET", "/api/gated/things/secret-1",
                         "--service", "plugin:catalog")
    assert result.returncode == 1
    assert "deny by rule" in result.stdout and "gated.yaml:19" in result.stdout
    assert "=> 403 NotAllowedError: Permission 'gated.thing.read' denied" in result.stdout


def test_explain_anonymous_caller_is_401(gated_env):
    *_, config, policies = gated_env
    result = explain_cli(config, policies, "GET", "/api/gated/things/abc")
    assert result.returncode == 1
    assert "401 AuthenticationError: Missing credentials" in result.stdout
