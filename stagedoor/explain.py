"""``stagedoor explain``: run the proxy's own decision code on one request and show every step.

Nothing is sent upstream. With ``--token`` the token is verified for real (key sets are
fetched as the proxy would); ``--user``/``--service`` stand in for a verified principal.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

from .decide import Decision, GatewayRequest, decide
from .errors import ERROR_NAMES
from .permissions import DelegationNeeded
from .runtime import Runtime
from .tokens import KeysNeeded, Principal

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


def explain(runtime: Runtime, method: str, url: str, *, token: str | None = None,
            user: str | None = None, service: str | None = None) -> Decision:
    """The decision the proxy would take, resolving key fetches and delegations on the way."""
    verifier = runtime.verifier
    header: tuple[str, ...] = ()
    if token is not None:
        header = (f"Bearer {token}",)
    elif user is not None or service is not None:
        kind, subject = ("user", user) if user is not None else ("service", service)
        assert subject is not None
        principal = Principal(kind, subject, source=f"explain --{kind}")  # type: ignore[arg-type]
        verifier = _StandInVerifier(principal)  # type: ignore[assignment]
        header = (f"Bearer {_STAND_IN_TOKEN}",)
    request = GatewayRequest(method.upper(), request_target(url), header)
    for _ in range(3):
        try:
            return decide(request, runtime.policies, verifier, runtime.authorizer)
        except KeysNeeded as needed:
            assert runtime.verifier is not None
            asyncio.run(runtime.verifier.refresh(needed.source))
        except DelegationNeeded as needed:
            assert runtime.authorizer is not None
            asyncio.run(runtime.authorizer.resolve(token, needed.permission))
    raise RuntimeError("the decision still needs the network after three rounds")


def render(decision: Decision, method: str, url: str) -> str:
    """Human-readable steps and the final outcome."""
    lines = [f"{method.upper()} {request_target(url)}"]
    width = max((len(step) for step, _ in decision.trace), default=6)
    for step, text in decision.trace:
        lines.append(f"  {step:<{width}}  {text}")
    if decision.allowed:
        if decision.local is not None:
            outcome = f"{decision.local.status} allow: answered locally"
        else:
            assert decision.upstream is not None
            outcome = f"allow: forward to {decision.upstream.url}"
    else:
        assert decision.error is not None
        error = decision.error
        outcome = (f"{error.status} {ERROR_NAMES.get(error.status, 'Error')}: {error.message} "
                   f"(denied at '{decision.check}')")
        if decision.reason:
            outcome += f"\n   reason: {decision.reason}"
    lines.append(f"=> {outcome}")
    for note in decision.dry_run:
        lines.append(f"   dry-run: {note}")
    return "\n".join(lines)
