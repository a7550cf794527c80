"""The pure decision pipeline: order of checks, outcomes, upstream targets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stagedoor.auth import CredentialError, KeySourceUnavailable, Principal
from stagedoor.config import Config
from stagedoor.decide import (
    Answer,
    Context,
    Deny,
    Forward,
    GatewayRequest,
    Upstream,
    decide,
)
from stagedoor.policy import load_policies

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Config(data={"insights": {"externalApiUrl": "http://127.0.0.1:9000"}})
POLICIES = load_policies(ROOT / "policies", CONFIG)

JANE = Principal("user", "user:default/jane", source="user")
CATALOG = Principal("service", "plugin:catalog", source="plugin")
RESTRICTED = Principal("service", "external:ci", source="static",
                       access_plugins=frozenset({"catalog"}))


class FakeVerifier:
    """Maps token text to a principal; anything else is an illegal token."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.calls = 0

    def verify(self, token: str, plugin_id: str) -> Principal:
        self.calls += 1
        if self.down:
            raise KeySourceUnavailable("http://idp/jwks.json", 5)
        known = {"jane": JANE, "catalog": CATALOG, "ci": RESTRICTED}
        if token in known:
            return known[token]
        raise CredentialError("Illegal token", "test: unknown token")


def run(target: str, token: str | None = None, method: str = "GET", verifier=None,
        explain: bool = False):
    auth = (f"Bearer {token}",) if token else ()
    return decide(GatewayRequest(method, target, auth), POLICIES, verifier or FakeVerifier(),
                  explain=explain)


def test_allowed_request_carries_the_upstream_url():
    d = run("/api/insights/services/payments-api?x=1", "jane")
    assert isinstance(d, Forward) and d.allowed and d.check == "allow"
    # the client's query is not forwarded: the route declares no query parameters
    assert d.upstream.url == "http://127.0.0.1:9000/v1/services/payments-api"
    assert d.principal == JANE


def test_unauthenticated_route_never_calls_the_verifier():
    verifier = FakeVerifier()
    d = run("/api/insights/health", "garbage", verifier=verifier)
    assert isinstance(d, Answer) and d.local.status == 200 and verifier.calls == 0


def test_unknown_plugin_is_decided_before_credentials():
    d = run("/api/nope/x")
    assert (d.check, d.error.status) == ("plugin", 404)


def test_barrier_precedes_routing():
    d = run("/api/insights/does-not-exist")
    assert (d.check, d.error.status, d.error.message) == ("barrier", 401, "Missing credentials")


def test_credential_error_message_is_passed_reason_kept_for_the_log():
    d = run("/api/insights/services/x", "forged")
    assert d.error.message == "Illegal token" and d.reason == "test: unknown token"


def test_key_source_down_is_503_with_retry_after():
    d = run("/api/insights/services/x", "jane", verifier=FakeVerifier(down=True))
    assert d.error.status == 503
    assert ("Retry-After", "5") in d.error.headers


def test_wrong_principal_kind_is_403():
    d = run("/api/insights/services/x", "catalog")
    assert d.error.status == 403
    assert d.error.message == "This endpoint does not allow 'service' credentials"


def test_route_is_checked_before_principal_kind():
    assert run("/api/insights/nope", "catalog").error.status == 404


def test_principal_kind_is_checked_before_parameters():
    assert run("/api/insights/services/BAD", "catalog").error.status == 403


def test_denied_decision_never_carries_an_upstream():
    for target in ("/api/insights/services/BAD", "/api/insights/services/x/..",
                   "/api/insights/x"):
        d = run(target, "jane")
        assert isinstance(d, Deny) and not d.allowed
        assert not hasattr(d, "upstream") and not hasattr(d, "local")


def test_relative_url_of_the_plugin_root():
    assert run("/api/insights?x=1").url == "/?x=1"
    assert run("/api/insights").url == "/"


def test_trace_names_every_step_for_explain():
    d = run("/api/insights/services/payments-api", "jane", explain=True)
    assert [step for step, _ in d.trace] == ["plugin", "barrier", "route", "principal",
                                             "params", "permission", "action"]


def test_trace_is_not_built_unless_asked():
    assert run("/api/insights/services/payments-api", "jane").trace == ()
    assert run("/api/insights/services/BAD", "jane").trace == ()


def test_a_denial_is_traced_with_its_step_when_asked():
    d = run("/api/insights/services/x", "forged", explain=True)
    assert d.trace[-1][0] == "barrier" and "401" in d.trace[-1][1]


def test_decisions_are_frozen():
    d = run("/api/insights/services/payments-api", "jane")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.upstream = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.context.principal = None  # type: ignore[misc]


def test_a_forward_without_a_route_cannot_be_built():
    with pytest.raises(ValueError, match="route"):
        Forward(Context("/x"), Upstream("http", "127.0.0.1", 80, "/x"), 1.0)


def test_every_decision_shares_the_context_fields():
    allowed = run("/api/insights/services/payments-api", "jane")
    denied = run("/api/insights/services/BAD", "jane")
    for d in (allowed, denied):
        assert d.plugin_id == "insights" and d.principal == JANE
        assert d.route_path == "/services/{id}"


@pytest.mark.parametrize("token", ["jane", None])
def test_fragment_is_refused(token):
    assert run("/api/insights/health#x", token).error.status == 400
