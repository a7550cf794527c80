"""The request pipeline as one pure function: ``decide(request, policies, verifier) -> Decision``.

Order of checks (SPEC.md): plugin -> credentials barrier -> route and method -> principal kind
-> access restrictions -> path parameters. Nothing here touches the network or mitmproxy; the
only side door is :class:`~stagedoor.tokens.KeysNeeded`, raised when a token needs a key set that
is not cached yet: the caller fetches it (asynchronously) and calls ``decide`` again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from .errors import ApiError
from .permissions import Authorizer, evaluate
from .policy import LocalResponse, PolicySet, Route
from .routing import PathRejected, split_segments
from .tokens import CredentialError, KeySourceUnavailable, Principal, extract_bearer

API_PREFIX = "/api/"
_SAFE_QUERY = re.compile(r"[\x21-\x7e]*")  # printable ASCII, no space


class Verifier(Protocol):
    def verify(self, token: str, plugin_id: str) -> Principal: ...


@dataclass(frozen=True, slots=True)
class GatewayRequest:
    method: str
    target: str  # the raw request target: path and query, still percent-encoded
    authorization: tuple[str, ...] = ()  # every Authorization header value, in order


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    host: str
    port: int
    path: str  # path and query, encoded, as sent upstream

    @property
    def url(self) -> str:
        default = 443 if self.scheme == "https" else 80
        netloc = self.host if self.port == default else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.path}"


@dataclass(slots=True)
class Decision:
    """What to do with a request, and why. ``check`` names the step that decided."""

    allowed: bool
    check: str  # "allow" or the denying step: plugin, path, barrier, route, method, principal,
    #             access, params
    url: str  # request.url for error bodies: relative to the plugin mount, raw
    plugin_id: str | None = None
    route: Route | None = None
    principal: Principal | None = None
    error: ApiError | None = None
    upstream: Upstream | None = None
    local: LocalResponse | None = None
    timeout: float = 30.0
    params: dict[str, str] = field(default_factory=dict)
    reason: str = ""  # log-only detail (e.g. why a token failed); never a secret
    trace: list[tuple[str, str]] = field(default_factory=list)
    dry_run: list[str] = field(default_factory=list)  # what non-enforced rules would have denied

    @property
    def route_path(self) -> str | None:
        return self.route.path if self.route else None


def _deny(decision: Decision, check: str, error: ApiError, reason: str = "") -> Decision:
    decision.allowed = False
    decision.check = check
    decision.error = error
    decision.reason = reason
    decision.upstream = None
    decision.local = None
    decision.trace.append((check, f"deny {error.status} {error.error_name}: {error.message}"
                           + (f" ({reason})" if reason else "")))
    return decision


def _check_permission(decision: Decision, route: Route, principal: Principal | None,
                      token: str | None, values: dict[str, str], policies: PolicySet,
                      authorizer: Authorizer | None) -> ApiError | None:
    """None when the route's permission is granted, else the 403 to answer."""
    permission = route.permission
    assert permission is not None
    message = f"Permission '{permission}' denied"
    if principal is not None and principal.access_permissions is not None \
            and permission not in principal.access_permissions:
        decision.trace.append(("permission", f"{permission}: outside the token's access "
                                             "restrictions"))
        return ApiError(403, f"This token's access is restricted and does not include "
                             f"permission '{permission}'")
    resource = values.get(route.resource_param) if route.resource_param else None
    groups = authorizer.groups_for(principal) if authorizer else (
        frozenset(principal.ownership) if principal else frozenset())
    ask = (lambda: authorizer.cached(token, permission)) if authorizer else None
    outcome = evaluate(policies.rules_for(route.plugin_id), permission, principal, groups,
                       resource, ask)
    for rule, effect in outcome.shadow:
        if effect == "deny":
            note = f"rule {rule.where} ({rule.permission}, enforce: false) would deny"
            decision.dry_run.append(note)
            decision.trace.append(("permission", f"dry-run: {note}"))
    what = f"{permission}" + (f" on {resource!r}" if resource is not None else "")
    if outcome.rule is None:
        decision.trace.append(("permission", f"{what}: no rule matched: default deny"))
        return ApiError(403, message)
    how = "permission backend" if outcome.delegated else "rule"
    verdict = "allow" if outcome.allowed else "deny"
    decision.trace.append(("permission", f"{what}: {verdict} by {how} {outcome.rule.where}"))
    return None if outcome.allowed else ApiError(403, message)


def _relative_url(target: str, mount: str) -> str:
    rest = target[len(mount):]
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


def decide(request: GatewayRequest, policies: PolicySet, verifier: Verifier | None,
           authorizer: Authorizer | None = None) -> Decision:
    """Run every check for one request.

    Raises only ``KeysNeeded`` (a key set must be fetched) or ``DelegationNeeded`` (the
    permission backend must be asked); the caller resolves either and calls again.
    """
    target = request.target
    decision = Decision(allowed=False, check="plugin", url=target)

    # 1. plugin -----------------------------------------------------------------------------
    path, _, query = target.partition("?")
    query = "?" + query if _ else ""
    if not path.startswith(API_PREFIX):
        return _deny(decision, "plugin", ApiError(404, "Not Found"), "not under /api/")
    plugin_id, slash, rest = path[len(API_PREFIX):].partition("/")
    policy = policies.plugins.get(plugin_id)
    if policy is None:
        return _deny(decision, "plugin", ApiError(404, f"No plugin found with id '{plugin_id}'"
                                                  if plugin_id.isascii() and plugin_id.isprintable()
                                                  else "Not Found"))
    decision.plugin_id = plugin_id
    mount = API_PREFIX + plugin_id
    decision.url = _relative_url(target, mount)
    decision.trace.append(("plugin", f"{plugin_id} ({policy.file})"))

    if "#" in target:
        return _deny(decision, "path", ApiError(400, "Invalid request path"), "fragment in target")
    if query and not _SAFE_QUERY.fullmatch(query):
        # The query is forwarded as sent: no control bytes or raw non-ASCII (RFC 3986), which
        # upstream parsers disagree about.
        return _deny(decision, "path", ApiError(400, "Invalid request target"),
                     "control or non-ASCII byte in query")
    try:
        segments = split_segments(slash + rest)
    except PathRejected as exc:
        return _deny(decision, "path", ApiError(400, "Invalid request path"), exc.reason)

    # 2. credentials barrier (before routing, so routes cannot be enumerated) ------------------
    match = policy.table.match(request.method, segments)
    if match is not None and match.entry is not None:
        open_path = match.entry.unauthenticated
    else:  # 404 or 405: open only if the path itself is declared unauthenticated
        open_path = match is not None and any(r.unauthenticated for r in match.path_entries)
    principal: Principal | None = None
    token: str | None = None
    if open_path:
        decision.trace.append(("barrier", "path is unauthenticated: credentials ignored"))
    else:
        try:
            token = extract_bearer(list(request.authorization))
            if token is None:
                return _deny(decision, "barrier", ApiError(401, "Missing credentials"))
            if verifier is None:
                return _deny(decision, "barrier", ApiError(401, "Illegal token"),
                             "no credential source is configured")
            principal = verifier.verify(token, plugin_id)
        except CredentialError as exc:
            return _deny(decision, "barrier", ApiError(401, exc.message), exc.reason)
        except KeySourceUnavailable as exc:
            return _deny(decision, "barrier",
                         ApiError(503, exc.message,
                                  headers=(("Retry-After", str(exc.retry_after)),)),
                         f"key source unavailable: {exc.source_url}")
        decision.principal = principal
        decision.trace.append(("barrier", f"{principal.kind} {principal.subject} "
                                          f"(via {principal.source})"))

    # 3. route and method ----------------------------------------------------------------------
    if match is None:
        return _deny(decision, "route", ApiError(404, f"No route for {request.method} "
                                                      f"{decision.url.partition('?')[0]}"))
    if match.entry is None:
        allow = ", ".join(match.allowed_methods)
        return _deny(decision, "method",
                     ApiError(405, f"Method {request.method} is not allowed; allowed: {allow}",
                              headers=(("Allow", allow),)))
    route = match.entry
    decision.route = route
    decision.timeout = route.timeout
    decision.trace.append(("route", f"{'/'.join(route.methods)} {route.path} "
                                    f"({route.file}:{route.line})"))

    # 4. principal kind ------------------------------------------------------------------------
    if not route.unauthenticated:
        assert principal is not None  # the barrier demanded credentials for this route
        if principal.kind not in route.auth:
            return _deny(decision, "principal", ApiError(
                403, f"This endpoint does not allow '{principal.kind}' credentials"))
        # External access restrictions: a token limited to some plugins stays there.
        if principal.access_plugins is not None and plugin_id not in principal.access_plugins:
            allowed = ", ".join(f"'{p}'" for p in sorted(principal.access_plugins))
            return _deny(decision, "access", ApiError(
                403, f"This token's access is restricted to plugin(s) {allowed}"))
        decision.trace.append(("principal", f"{principal.kind} allowed by route"))

    # 5. path parameters -----------------------------------------------------------------------
    values = route.template.bind(segments)
    for name, value in values.items():
        problem = route.params[name].check(value)
        if problem is not None:
            return _deny(decision, "params", ApiError(400, problem))
    decision.params = values
    if values:
        decision.trace.append(("params", ", ".join(f"{k}={v!r} ok" for k, v in values.items())))

    # 6. permission ----------------------------------------------------------------------------
    if route.permission is not None:
        denied = _check_permission(decision, route, principal, token, values, policies,
                                   authorizer)
        if denied is not None:
            if route.enforce:
                return _deny(decision, "permission", denied)
            note = (f"route {route.path} ({route.file}:{route.line}) is enforce: false; "
                    f"would deny: {denied.message}")
            decision.dry_run.append(note)
            decision.trace.append(("permission", f"dry-run: {note}"))

    # 6. action --------------------------------------------------------------------------------
    decision.allowed = True
    decision.check = "allow"
    if route.respond is not None:
        decision.local = route.respond
        decision.trace.append(("action", f"answer locally with {route.respond.status}"))
    else:
        assert route.upstream is not None
        up = route.upstream
        decision.upstream = Upstream(up.scheme, up.host, up.port, up.path_for(values) + query)
        decision.trace.append(("action", f"forward to {decision.upstream.url}"))
    return decision
