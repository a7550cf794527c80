"""The big hostile tables in process, against the core: every path payload at every position
and every hostile credential, through the same steps the gateway runs on a request head
(:func:`stagedoor.head.check_head`, then :func:`stagedoor.resolve.resolve`) with a real
:class:`~stagedoor.runtime.State` loaded from the hardening fixture's files, real signed tokens
and real key sets served on 127.0.0.1. No proxy: the tables run in seconds and can grow.

tests/test_hardening_paths.py and tests/test_hardening_tokens.py keep end-to-end sets through a
real sidecar (the wire: the HTTP parser, the head limits, what the upstream receives).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import pytest

from stagedoor.decide import Answer, Decision, Deny, Forward, GatewayRequest
from stagedoor.devkeys import DevKey, mint_user_token
from stagedoor.errors import render_error
from stagedoor.head import HeadRefusal, check_head
from stagedoor.resolve import resolve
from stagedoor.runtime import State, load_state

from .hardening import (
    EXT_JWKS,
    FIXTURE_POLICY,
    MUST_DENY_TARGETS,
    PATH_PAYLOADS,
    PATH_POSITIONS,
    ROOT,
    USER_JWKS,
    FaultUpstream,
    error_shape_problem,
    hard_config,
    producible,
)
from .test_hardening_tokens import EXPECTED, TOKEN_CASES, Forge

REFUSALS = frozenset({400, 401, 403, 404, 405})
#: Rows whose refusal comes from the proxy's head limits (the wire), not the core.
WIRE_ONLY = {"token over the header limit (431)"}


class CoreEnv:
    """The hardening fixture's files and key servers, loaded into a State (no sidecar)."""

    def __init__(self, tmp: Path) -> None:
        self.up = FaultUpstream()
        self.user_key = DevKey.generate("ES256", kid="user-1")
        self.ext_key = DevKey.generate("RS256", kid="ext-1")
        self.up.jwks_by_path[USER_JWKS] = self.user_key.jwks()
        self.up.jwks_by_path[EXT_JWKS] = self.ext_key.jwks()
        self.issuer = f"{self.up.url}/api/auth"
        policies = tmp / "policies"
        policies.mkdir()
        shutil.copy(ROOT / "policies" / "insights.yaml", policies / "insights.yaml")
        (policies / "fixture.yaml").write_text(FIXTURE_POLICY)
        config = tmp / "app-config.yaml"
        config.write_text(hard_config(self.up))
        self.state: State = load_state([str(config)], str(policies))
        self.loop = asyncio.new_event_loop()
        self._prefetch_user_keys()
        self.token = mint_user_token(self.user_key, issuer=self.issuer)

    def _prefetch_user_keys(self, attempts: int = 20) -> None:
        """Until the verifier holds the fixture's key sets: a fetch has a 1 s timeout
        (jwksTimeoutSeconds), which a busy machine can miss; the tables must not start then
        (they would read a 503 for every row until the next fetch)."""
        wanted = [s for s in self.state.verifier.sources
                  if s.url.endswith((USER_JWKS, EXT_JWKS))]
        assert len(wanted) == 2, wanted
        for _ in range(attempts):
            self.loop.run_until_complete(self.state.verifier.prefetch())
            if all(s.keys for s in wanted):
                return
            time.sleep(max(s.cooldown for s in wanted))  # then the next fetch may start
        raise AssertionError(f"key sets still missing after {attempts} fetches: "
                             f"{[s.failure for s in wanted]}")

    def decide(self, target: str, authorization: list[str] | None = None,
               method: str = "GET") -> tuple[Decision | None, HeadRefusal | None]:
        """What the gateway decides on this head: (decision, None) or (None, head refusal)."""
        fields = [(b"Host", b"127.0.0.1")]
        fields += [(b"Authorization", v.encode("utf-8", "surrogateescape"))
                   for v in authorization or []]
        verdict = check_head(method, "", target, "HTTP/1.1", fields,
                             self.state.settings.edge.head_rules)
        if isinstance(verdict, HeadRefusal):
            return None, verdict
        request = GatewayRequest(method, target, tuple(authorization or ()))
        return self.loop.run_until_complete(resolve(request, self.state)), None

    def stop(self) -> None:
        self.loop.close()
        self.up.stop()


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreEnv]:
    env = CoreEnv(tmp_path_factory.mktemp("core-tables"))
    yield env
    env.stop()


def problems_with(env: CoreEnv, target: str, decision: Decision | None,
                  refused: HeadRefusal | None, forward_ok: bool = True) -> list[str]:
    """What is wrong with one outcome (empty when it upheld every invariant)."""
    if refused is not None:
        return [] if refused.status in REFUSALS else [f"{target!r}: head refusal "
                                                      f"{refused.status}"]
    match decision:
        case Deny(error=error):
            if error.status not in REFUSALS:
                return [f"{target!r}: {error.status} {error.message}"]
            status, body, _ = render_error(error, "GET", decision.url)
            problem = error_shape_problem(json.loads(body), status)
            return [f"{target!r}: {problem}"] if problem else []
        case Forward(upstream=upstream):
            if not forward_ok:
                return [f"{target!r}: forwarded as {upstream.path!r}, must be refused"]
            why = producible(env.state.policies, env.up.url, upstream.path)
            return [f"{target!r}: forwarded as {upstream.path!r}: {why}"] if why else []
        case Answer():
            return [] if forward_ok else [f"{target!r}: answered locally, must be refused"]
    return [f"{target!r}: no decision"]


def _strict_decode(raw: str) -> str | None:
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- paths -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("category", list(PATH_PAYLOADS))
def test_every_payload_at_every_position(core, category):
    problems: list[str] = []
    decided = 0
    for payload in PATH_PAYLOADS[category]:
        for label, template in PATH_POSITIONS:
            target = template.replace("{p}", payload)
            open_route = label == "unauthenticated value"
            decision, refused = core.decide(target,
                                            None if open_route else [f"Bearer {core.token}"])
            decided += decision is not None
            problems += problems_with(core, target, decision, refused)
            # A forwarded value is the request's own segment, decoded once, re-encoded.
            if isinstance(decision, Forward) and label in (
                    "strict value", "loose value", "unauthenticated value"):
                value = _strict_decode(payload.partition("?")[0])
                up_value = decision.upstream.path.partition("?")[0].split("/")[3]
                if value is None or quote(value, safe="") != up_value:
                    problems.append(f"{label} {payload!r}: forwarded as "
                                    f"{decision.upstream.path!r}")
    assert decided, "every row was refused by the head check: the table tested nothing"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", MUST_DENY_TARGETS)
def test_must_deny_targets_are_never_forwarded(core, target):
    decision, refused = core.decide(target, [f"Bearer {core.token}"])
    assert not problems_with(core, target, decision, refused, forward_ok=False)


def test_the_control_request_is_forwarded(core):
    """The honest request goes through, so the refusals above mean something."""
    decision, refused = core.decide("/api/fixture/items/abc", [f"Bearer {core.token}"])
    assert refused is None and isinstance(decision, Forward)
    assert decision.upstream.path == "/v1/items/abc"


# -- credentials -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forge(core: CoreEnv) -> Forge:
    return Forge(core.issuer, core.user_key, core.ext_key, DevKey.generate("ES256", kid="evil-1"),
                 DevKey.generate("PS256", kid="evil-rsa"))


@pytest.mark.parametrize(("label", "build"), [c for c in TOKEN_CASES if c[0] not in WIRE_ONLY],
                         ids=[c[0] for c in TOKEN_CASES if c[0] not in WIRE_ONLY])
def test_hostile_credential_in_process(core, forge, label, build):
    values = build(forge)
    decision, refused = core.decide("/api/fixture/items/abc", values)
    allowed = EXPECTED.get(label, frozenset({401, 403}))
    if refused is not None:  # e.g. a header value the head check refuses (400)
        assert refused.status in allowed | {400}, (label, refused)
        return
    assert isinstance(decision, Deny), (label, decision)
    assert decision.error.status in allowed, (label, decision.error)
    status, body, headers = render_error(decision.error, "GET", decision.url)
    assert error_shape_problem(json.loads(body), status) is None
    if status == 401:
        assert ("WWW-Authenticate", "Bearer") in headers
        assert decision.error.message in (
            "Missing credentials", "Illegal token", "Failed user token verification",
            "Failed plugin token verification")
    text = body.decode("latin-1")
    for value in values:
        token = value.partition(" ")[2] or value
        if len(token) > 16:
            assert token not in text


def test_the_honest_token_is_accepted_in_process(core, forge):
    decision, refused = core.decide("/api/fixture/items/abc", [f"Bearer {forge.user_token()}"])
    assert refused is None and isinstance(decision, Forward)
