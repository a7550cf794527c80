"""resolve(): the pure decision plus the I/O it asks for, in one loop (no proxy, no network)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from stagedoor.auth import KeysNeeded, Principal
from stagedoor.decide import Answer, Deny, Forward, GatewayRequest
from stagedoor.resolve import MAX_ROUNDS, resolve
from stagedoor.runtime import State, load_state

ROOT = Path(__file__).resolve().parent.parent
JANE = Principal("user", "user:default/jane", source="user")


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> State:
    config = tmp_path_factory.mktemp("resolve") / "app-config.yaml"
    config.write_text("backend: {baseUrl: 'http://127.0.0.1:1'}\n"
                      "insights: {externalApiUrl: 'http://127.0.0.1:9000'}\n"
                      "stagedoor: {openapi: {serve: true}}\n")
    return load_state([str(config)], str(ROOT / "policies"))


class KeysLater:
    """Needs a key fetch before the first ``verify`` succeeds (or forever, with ``never``)."""

    def __init__(self, never: bool = False) -> None:
        self.source = SimpleNamespace(url="http://127.0.0.1:1/jwks")
        self.fetched = 0
        self.never = never

    def verify(self, token: str, plugin_id: str) -> Principal:
        if self.never or not self.fetched:
            raise KeysNeeded(self.source)  # type: ignore[arg-type]
        return JANE

    async def refresh(self, source: object) -> None:
        assert source is self.source
        self.fetched += 1


def run(state: State, target: str, token: str | None = "t", **kw: object):
    request = GatewayRequest("GET", target, (f"Bearer {token}",) if token else ())
    return asyncio.run(resolve(request, state, **kw))  # type: ignore[arg-type]


def test_keys_are_fetched_then_the_request_is_decided_again(state):
    keys = KeysLater()
    d = run(dataclasses.replace(state, verifier=keys), "/api/insights/services/payments-api")
    assert isinstance(d, Forward) and d.principal == JANE and keys.fetched == 1


def test_keys_that_never_arrive_are_a_503_after_one_fetch(state):
    """A key source is fetched once per request: a second fetch of a source that was just
    down or slow would only make the caller wait another timeout."""
    keys = KeysLater(never=True)
    d = run(dataclasses.replace(state, verifier=keys), "/api/insights/services/payments-api")
    assert isinstance(d, Deny) and d.error.status == 503 and d.check == "barrier"
    assert ("Retry-After", "5") in d.error.headers
    # Each key source is fetched at most once per request: a slow source costs one timeout,
    # never MAX_ROUNDS of them.
    assert keys.fetched == 1 < MAX_ROUNDS


def test_rounds_are_bounded_even_when_each_asks_for_a_new_source(state):
    class NewSourceEachTime(KeysLater):
        held: list[object] = []  # (a verifier holds its sources)

        def verify(self, token: str, plugin_id: str) -> Principal:
            self.source = SimpleNamespace(url=f"http://127.0.0.1:1/jwks/{self.fetched}")
            self.held.append(self.source)
            raise KeysNeeded(self.source)  # type: ignore[arg-type]

        async def refresh(self, source: object) -> None:
            self.fetched += 1

    keys = NewSourceEachTime()
    d = run(dataclasses.replace(state, verifier=keys), "/api/insights/services/payments-api")
    assert isinstance(d, Deny) and d.error.status == 503
    assert keys.fetched == MAX_ROUNDS


DELEGATING = """\
pluginId: gated
routes:
  - path: /things/{id}
    auth: [user]
    params: {id: '^[a-z]+$'}
    permission: gated.thing.read
    upstream: http://127.0.0.1:9000/things/{id}
permissions:
  - permission: gated.thing.read
    effect: delegate
"""


def test_a_delegated_permission_is_asked_then_decided_with_the_callers_token(tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "gated.yaml").write_text(DELEGATING)
    config = tmp_path / "app-config.yaml"
    config.write_text("backend: {baseUrl: 'http://127.0.0.1:1'}\n")
    loaded = load_state([str(config)], str(tmp_path / "policies"))

    class Ask:
        def __init__(self) -> None:
            self.asked: list[tuple[str | None, str]] = []

        def groups_for(self, principal: object) -> frozenset[str]:
            return frozenset()

        def cached(self, token: str | None, permission: str) -> bool | None:
            return None if not self.asked else False

        async def resolve(self, token: str | None, permission: str,
                          *context: object) -> bool:  # plugin id, principal
            self.asked.append((token, permission))
            return False

    class Fixed:
        def verify(self, token: str, plugin_id: str) -> Principal:
            return JANE

    ask = Ask()
    gated = dataclasses.replace(loaded, verifier=Fixed(), authorizer=ask)
    d = run(gated, "/api/gated/things/a", token="tok")
    assert ask.asked == [("tok", "gated.thing.read")]
    assert isinstance(d, Deny) and d.check == "permission" and d.error.status == 403
    # explain --user: a stand-in principal has no real token to show the backend
    ask.asked.clear()
    run(dataclasses.replace(loaded, authorizer=ask), "/api/gated/things/a", verifier=Fixed())
    assert ask.asked == [(None, "gated.thing.read")]


def test_the_openapi_document_is_answered_without_credentials(state):
    d = run(state, "/api/insights/.stagedoor/openapi.json", token=None)
    assert isinstance(d, Answer) and d.principal is None


def test_a_stand_in_verifier_replaces_the_states_one(state):
    class Fixed:
        def verify(self, token: str, plugin_id: str) -> Principal:
            return JANE

    d = run(state, "/api/insights/services/payments-api", verifier=Fixed(), explain=True)
    assert isinstance(d, Forward) and d.principal == JANE
    assert d.trace[0][0] == "plugin"


def test_the_trace_is_only_built_when_asked(state):
    class Fixed:
        def verify(self, token: str, plugin_id: str) -> Principal:
            return JANE

    d = run(state, "/api/insights/services/payments-api", verifier=Fixed())
    assert d.trace == ()
