"""``resolve(request, state) -> Decision``: the pure decision plus the I/O it asks for.

:func:`~stagedoor.decide.decide` never touches the network; when it needs a key set
(``KeysNeeded``) or a permission backend answer (``DelegationNeeded``) it says so. This is the
one place that does that I/O and decides again (through the one fetch-and-ask-again loop,
:func:`stagedoor.auth.settle.fetch_until_settled`, with its bounds: each key source fetched at
most once per request, at most ``MAX_ROUNDS`` rounds); the gateway, ``stagedoor explain`` and
the tests all go through it. It reads only the request head (method, target, Authorization), so
it can run as soon as the head is in, before any body is read.
"""

from __future__ import annotations

from functools import partial

from .auth import MSG_SOURCE_UNAVAILABLE, KeysNeeded, extract_bearer
from .auth.settle import MAX_ROUNDS, Unsettled, fetch_until_settled
from .decide import Answer, Context, Decision, Deny, GatewayRequest, Verifier, decide, refuse
from .errors import ApiError
from .permissions import DelegationNeeded
from .policy import LocalResponse
from .runtime import State
from .signing import JWKS_CONTENT_TYPE, JWKS_PATH, jwks_plugin
from .userinfo import MembershipNeeded

RETRY_AFTER = 5


async def resolve(request: GatewayRequest, state: State, *, explain: bool = False,
                  verifier: Verifier | None = None) -> Decision:
    """The decision for ``request`` under ``state``, fetching what it needs on the way.

    ``explain``: record every step in the decision's trace. ``verifier``: stand in for the
    state's (``stagedoor explain --user``). Never raises for I/O: an unreachable key source is
    a 503, an unreachable permission backend a deny.
    """
    # The generated OpenAPI document (stagedoor.openapi.serve): local, no credentials.
    document = state.openapi.answer(request.method, request.target)
    if document is not None:
        return document
    if JWKS_PATH in request.target:
        keys = jwks_answer(request, state)
        if keys is not None:
            return keys
    use = verifier if verifier is not None else state.verifier
    try:  # the common case: nothing to fetch, decided at once
        return decide(request, state.policies, use, state.authorizer, explain=explain)
    except _NEEDS as needed:
        first = needed
    return await _fetch_and_decide(request, state, use, verifier is not None, explain, first)


_NEEDS = (KeysNeeded, DelegationNeeded, MembershipNeeded)


async def _fetch_and_decide(request: GatewayRequest, state: State, use: Verifier,
                            stand_in: bool, explain: bool, first: Exception) -> Decision:
    """What :func:`resolve` does once the decision asked for I/O: the one bounded loop."""
    authorizer = state.authorizer

    async def fetch_other(needed: Exception) -> None:
        if isinstance(needed, DelegationNeeded):
            # A stand-in verifier has no real token to show the permission backend.
            token = None if stand_in else extract_bearer(list(request.authorization))
            await authorizer.resolve(token, needed.permission, needed.plugin_id,
                                     needed.principal)
        else:
            assert isinstance(needed, MembershipNeeded) and authorizer.userinfo is not None
            await authorizer.userinfo.resolve(needed.token, needed.subject, needed.expires_at)

    try:
        return await fetch_until_settled(
            partial(decide, request, state.policies, use, authorizer, explain=explain),
            lambda source: state.verifier.refresh(source), rounds=MAX_ROUNDS, other=_NEEDS[1:],
            fetch_other=fetch_other, first=first)
    except Unsettled as exc:
        return _unavailable(request, f"credentials still unresolved: {exc.reason}")


def _unavailable(request: GatewayRequest, reason: str) -> Decision:
    return refuse(request.target, "barrier",
                  ApiError(503, MSG_SOURCE_UNAVAILABLE,
                           headers=(("Retry-After", str(RETRY_AFTER)),)), reason)


def jwks_answer(request: GatewayRequest, state: State) -> Decision | None:
    """``GET /api/<pluginId>/.backstage/auth/v1/jwks.json``: the public keys stagedoor signs
    the plugin's tokens with, without credentials, as a Backstage backend serves them."""
    plugin_id = jwks_plugin(request.target)
    if plugin_id is None or plugin_id not in state.policies.plugins:
        return None
    context = Context(JWKS_PATH, plugin_id)
    if request.method not in ("GET", "HEAD"):
        return Deny(context, ApiError(405, f"Method {request.method} is not allowed; allowed: "
                                           "GET, HEAD", headers=(("Allow", "GET, HEAD"),)),
                    "method")
    body = state.signer.ring(plugin_id).jwks_document()
    return Answer(context, LocalResponse(200, body, (("Content-Type", JWKS_CONTENT_TYPE),)))
