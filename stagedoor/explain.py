"""``stagedoor explain``: run the proxy's own decision code on one request and show every step.

Nothing is sent upstream. With ``--token`` the token is verified for real (key sets are
fetched, group membership looked up, as the proxy would); ``--user``/``--service`` stand in
for a verified principal (with no real token, membership comes only from the static map).
The trace names the membership source that answered and what identity the upstream would get.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from urllib.parse import urlsplit

from .auth import Principal
from .body import check_body, media_type
from .decide import Answer, Decision, Deny, Forward, GatewayRequest, TraceStep
from .ratelimit import LimitOutcome, describe_backstage_limit
from .resolve import resolve
from .runtime import State

_STAND_IN_TOKEN = "stagedoor-explain-stand-in"


@dataclass
class _StandInVerifier:
    """Answers every token with the principal given on the command line."""

    principal: Principal

    def verify(self, token: str, plugin_id: str) -> Principal:
        return self.principal


def request_target(url: str) -> str:
    """``http://host/api/x?q`` or ``/api/x?q`` -> the raw request target ``/api/x?q``."""
    if url.startswith(("http://", "https://")):
        parts = urlsplit(url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return url


def explain(state: State, method: str, url: str, *, token: str | None = None,
            user: str | None = None, service: str | None = None,
            groups: tuple[str, ...] = (), body: bytes | None = None,
            content_type: str | None = None) -> Decision:
    """The decision the proxy would take, with its trace (key fetches and delegations done).

    ``groups``: the ``--user``'s ownership refs (else the configured membership applies).
    ``body``: also check this request body against the route's ``body:`` rules, as the proxy
    does once the body is in (the body itself is never shown)."""
    header: tuple[str, ...] = ()
    stand_in: _StandInVerifier | None = None
    if token is not None:
        header = (f"Bearer {token}",)
    elif user is not None or service is not None:
        kind, subject = ("user", user) if user is not None else ("service", service)
        assert subject is not None
        ownership = groups if kind == "user" else ()
        principal = Principal(kind, subject, ownership,  # type: ignore[arg-type]
                              source=f"explain --{kind}")
        stand_in = _StandInVerifier(principal)
        header = (f"Bearer {_STAND_IN_TOKEN}",)
    request = GatewayRequest(method.upper(), request_target(url), header)
    return asyncio.run(_explain(request, state, stand_in, body, content_type))


async def _explain(request: GatewayRequest, state: State, stand_in: _StandInVerifier | None,
                   body: bytes | None = None, content_type: str | None = None) -> Decision:
    decision = await resolve(request, state, explain=True, verifier=stand_in)
    if body is not None:
        decision = with_body(decision, body, content_type)
    steps = await limit_trace(state, decision)
    if isinstance(decision, Forward):  # what the upstream would learn of the caller
        steps.append(("identity", state.identity_for(decision.route).describe()))
    return dataclasses.replace(decision, context=dataclasses.replace(
        decision.context, trace=decision.trace + tuple(steps)))


async def limit_trace(state: State, decision: Decision) -> list[TraceStep]:
    """Which rate limits apply to the request, and whether the next one would pass, without
    counting anything (the store is only read). Closes the state's store afterwards."""
    settings = state.ratelimit
    steps: list[TraceStep] = []
    if settings.global_limit is not None:
        steps.append(("ratelimit", describe_backstage_limit(settings.global_limit)))
    plugin_limit = settings.plugin_limits.get(decision.plugin_id or "")
    if plugin_limit is not None and decision.plugin_id in state.policies.plugins:
        steps.append(("ratelimit", describe_backstage_limit(plugin_limit)))
    policy = state.policies.plugins.get(decision.plugin_id or "")
    route = decision.route
    try:
        if policy is not None and route is not None and decision.check in (
                "allow", "params", "permission"):
            outcome = LimitOutcome()
            principal = decision.principal.subject if decision.principal else None
            await state.limiter.check_policy(settings, policy.rate_limits_for(route), principal,
                                             "(client IP)", {}, outcome, peek=True)
            steps += [("ratelimit", note) for note in outcome.notes]
    finally:
        await state.limiter.close()
    return steps


def with_body(decision: Decision, body: bytes, content_type: str | None) -> Decision:
    """The decision once ``body`` is in: the route's ``body:`` rules, as the proxy checks them
    (the body itself is never shown)."""
    if not isinstance(decision, Forward) or decision.route is None \
            or decision.route.body is None:
        return decision
    rule = decision.route.body
    problem = check_body(rule, content_type, None, body)
    trace = [step for step in decision.trace if step[0] != "action"]
    action = [step for step in decision.trace if step[0] == "action"]
    if problem is not None:
        trace.append(("body", f"deny {problem.status} {problem.error_name}: {problem.message}"))
        return Deny(dataclasses.replace(decision.context, trace=tuple(trace)), problem, "body")
    what = "JSON Schema satisfied" if rule.validator is not None else "accepted"
    trace.append(("body", f"{len(body)} bytes of {media_type(content_type)}: {what}"))
    return dataclasses.replace(decision, context=dataclasses.replace(
        decision.context, trace=tuple(trace + action)))


def render(decision: Decision, method: str, url: str) -> str:
    """Human-readable steps and the final outcome."""
    lines = [f"{method.upper()} {request_target(url)}"]
    width = max((len(step) for step, _ in decision.trace), default=6)
    for step, text in decision.trace:
        lines.append(f"  {step:<{width}}  {text}")
    match decision:
        case Answer(local=local):
            outcome = f"{local.status} allow: answered locally"
        case Forward(upstream=upstream):
            outcome = f"allow: forward to {upstream.url}"
        case Deny(error=error, check=check, reason=reason):
            outcome = (f"{error.status} {error.error_name}: "
                       f"{error.message} (denied at '{check}')")
            if reason:
                outcome += f"\n   reason: {reason}"
    lines.append(f"=> {outcome}")
    for note in decision.dry_run:
        lines.append(f"   dry-run: {note}")
    return "\n".join(lines)
