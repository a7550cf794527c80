"""The request pipeline as one pure function: ``decide(request, policies, verifier) -> Decision``.

Order of checks (docs/design.md): plugin -> credentials barrier -> route and method -> principal
kind -> access restrictions -> path parameters -> query parameters -> permission -> action.
Nothing here touches the network or mitmproxy. Three side doors, all exceptions:
:class:`~stagedoor.auth.KeysNeeded` (a token needs a key set that is not cached yet),
:class:`~stagedoor.permissions.DelegationNeeded` (a rule asks the permission backend) and
:class:`~stagedoor.userinfo.MembershipNeeded` (a ``memberOf`` needs the user's ownership refs
from the auth backend); the caller does the I/O and calls ``decide`` again.
:func:`stagedoor.resolve.resolve` is that caller.

A :data:`Decision` is one of three things: :class:`Deny`, :class:`Answer` (a local response) or
:class:`Forward` (an upstream). Each carries the same :class:`Context` (plugin, route,
principal, url, params, trace, dry-run notes); a combination such as "allowed with an error" or
"forward without an upstream" cannot be built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Protocol

from .auth import CredentialError, KeySourceUnavailable, Principal, extract_bearer
from .errors import ApiError
from .permissions import Authorizer, DelegationNeeded, evaluate
from .policy import LocalResponse, PolicySet, Route
from .query import QueryRejected, shape_query
from .routing import PathRejected, split_segments
from .userinfo import MembershipUnavailable

API_PREFIX = "/api/"
_SAFE_QUERY = re.compile(r"[\x21-\x7e]*")  # printable ASCII, no space
_NO_PARAMS: Mapping[str, str] = MappingProxyType({})

#: One step of an explanation: (step name, what it found).
TraceStep = tuple[str, str]


class Verifier(Protocol):
    def verify(self, token: str, plugin_id: str) -> Principal: ...


@dataclass(frozen=True, slots=True)
class GatewayRequest:
    """What a decision reads of a request: its head only (never the body), so it can be
    decided as soon as the head is in."""

    method: str
    target: str  # the raw request target: path and query, still percent-encoded
    authorization: tuple[str, ...] = ()  # every Authorization header value, in order


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    host: str
    port: int
    path: str  # path and query, encoded, as sent upstream (may carry a policy's secrets)
    shown_path: str | None = None  # the same with secret query values masked, for display

    @property
    def url(self) -> str:
        """For logs, ``explain`` and saved flows: secret query values masked."""
        default = 443 if self.scheme == "https" else 80
        netloc = self.host if self.port == default else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.shown_path or self.path}"

    @property
    def host_header(self) -> str:
        """The ``Host`` header for this upstream (port omitted when it is the default)."""
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Context:
    """What every decision carries, whatever it is: where the request went and who sent it.

    ``trace`` is filled only when asked for (``decide(..., explain=True)``): ``stagedoor
    explain`` and tests read it; the proxy's hot path does not build it.
    """

    url: str  # request.url for error bodies: relative to the plugin mount, raw
    plugin_id: str | None = None
    route: Route | None = None
    principal: Principal | None = None
    params: Mapping[str, str] = _NO_PARAMS
    trace: tuple[TraceStep, ...] = ()
    dry_run: tuple[str, ...] = ()  # what non-enforced rules would have denied

    @property
    def route_path(self) -> str | None:
        return self.route.path if self.route is not None else None


class _Decided:
    """Read-through properties to the shared :class:`Context` (no state of its own)."""

    __slots__ = ()
    context: Context

    @property
    def url(self) -> str:
        return self.context.url

    @property
    def plugin_id(self) -> str | None:
        return self.context.plugin_id

    @property
    def route(self) -> Route | None:
        return self.context.route

    @property
    def route_path(self) -> str | None:
        return self.context.route_path

    @property
    def principal(self) -> Principal | None:
        return self.context.principal

    @property
    def params(self) -> Mapping[str, str]:
        return self.context.params

    @property
    def trace(self) -> tuple[TraceStep, ...]:
        return self.context.trace

    @property
    def dry_run(self) -> tuple[str, ...]:
        return self.context.dry_run


@dataclass(frozen=True, slots=True)
class Deny(_Decided):
    """Refuse with ``error``; ``check`` names the step that refused (plugin, path, barrier,
    route, method, principal, access, params, permission); ``reason`` is a log-only detail
    (why a token failed, say), never a secret."""

    context: Context
    error: ApiError
    check: str
    reason: str = ""
    allowed: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Answer(_Decided):
    """Answer locally (a health check, static JSON, the OpenAPI document)."""

    context: Context
    local: LocalResponse
    allowed: ClassVar[bool] = True
    check: ClassVar[str] = "allow"


@dataclass(frozen=True, slots=True)
class Forward(_Decided):
    """Send the request to ``upstream`` (its path rebuilt from the route's template), waiting at
    most ``timeout`` seconds for the answer. Only a matched route forwards."""

    context: Context
    upstream: Upstream
    timeout: float
    #: The bearer token the principal was verified from (None on an open route), for an
    #: identity that passes it on: the gateway need not parse Authorization again. Never
    #: shown or compared, as the flow record's ``authorization``.
    token: str | None = field(default=None, repr=False, compare=False)
    allowed: ClassVar[bool] = True
    check: ClassVar[str] = "allow"

    def __post_init__(self) -> None:
        if self.context.route is None or self.context.plugin_id is None:
            raise ValueError("a Forward decision needs a matched plugin and route")


Decision = Deny | Answer | Forward


def refuse(url: str, check: str, error: ApiError, reason: str = "") -> Deny:
    """A denial before any plugin is known (e.g. a request target that is not origin-form)."""
    return Deny(Context(url), error, check, reason)


class _Draft:
    """The context as the pipeline learns it; frozen into a :class:`Context` at the end."""

    __slots__ = ("dry_run", "params", "plugin_id", "principal", "route", "trace", "url")

    def __init__(self, url: str, explain: bool) -> None:
        self.url = url
        self.plugin_id: str | None = None
        self.route: Route | None = None
        self.principal: Principal | None = None
        self.params: Mapping[str, str] = _NO_PARAMS
        self.trace: list[TraceStep] | None = [] if explain else None
        self.dry_run: list[str] = []

    def context(self) -> Context:
        return Context(self.url, self.plugin_id, self.route, self.principal, self.params,
                       tuple(self.trace) if self.trace else (), tuple(self.dry_run))

    def deny(self, check: str, error: ApiError, reason: str = "") -> Deny:
        if self.trace is not None:
            self.trace.append((check, f"deny {error.status} {error.error_name}: "
                                      f"{error.message}" + (f" ({reason})" if reason else "")))
        return Deny(self.context(), error, check, reason)

    def would_deny(self, note: str) -> None:
        self.dry_run.append(note)
        if self.trace is not None:
            self.trace.append(("permission", f"dry-run: {note}"))


def _check_permission(draft: _Draft, route: Route, principal: Principal | None,
                      token: str | None, values: Mapping[str, str], policies: PolicySet,
                      authorizer: Authorizer | None) -> ApiError | None:
    """None when the route's permission is granted, else the 403 to answer."""
    permission = route.permission
    assert permission is not None
    trace = draft.trace
    if principal is not None and principal.access_permissions is not None \
            and permission not in principal.access_permissions:
        if trace is not None:
            trace.append(("permission", f"{permission}: outside the token's access "
                                        "restrictions"))
        return ApiError(403, f"This token's access is restricted and does not include "
                             f"permission '{permission}'")
    resource = values.get(route.resource_param) if route.resource_param else None

    def groups() -> frozenset[str]:  # asked only when a memberOf condition is reached
        if authorizer is None:
            return frozenset(principal.ownership) if principal else frozenset()
        refs, source = authorizer.membership_of(principal, token)
        if trace is not None and principal is not None:
            trace.append(("membership", f"{principal.subject}: {len(refs)} ownership ref(s) "
                                        f"from {MEMBERSHIP_SOURCE_NAMES[source]}"))
        return refs

    ask = (lambda: authorizer.cached(token, permission)) if authorizer else None
    try:
        outcome = evaluate(policies.rules_for(route.plugin_id), permission, principal, groups,
                           resource, ask)
    except DelegationNeeded as needed:
        needed.plugin_id, needed.principal = route.plugin_id, principal
        raise
    for rule, effect in outcome.shadow:
        if effect == "deny":
            draft.would_deny(f"rule {rule.where} ({rule.permission}, enforce: false) would deny")
    if trace is not None:  # the texts only when explaining (an allowed request needs none)
        what = f"{permission}" + (f" on {resource!r}" if resource is not None else "")
        if outcome.rule is None:
            trace.append(("permission", f"{what}: no rule matched: default deny"))
        else:
            how = "permission backend" if outcome.delegated else "rule"
            verdict = "allow" if outcome.allowed else "deny"
            trace.append(("permission", f"{what}: {verdict} by {how} {outcome.rule.where}"))
    if outcome.rule is not None and outcome.allowed:
        return None
    return ApiError(403, f"Permission '{permission}' denied")


MEMBERSHIP_SOURCE_NAMES = {
    "map": "the static map (stagedoor.permissions.membership)",
    "token": "the token's ent claim",
    "userinfo": "the auth backend's /v1/userinfo",
    "subject": "the principal itself (no membership source)",
}


def _relative_url(target: str, mount: str) -> str:
    rest = target[len(mount):]
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


def decide(request: GatewayRequest, policies: PolicySet, verifier: Verifier | None,
           authorizer: Authorizer | None = None, *, explain: bool = False) -> Decision:
    """Run every check for one request; pure and synchronous.

    Raises only ``KeysNeeded`` (a key set must be fetched), ``DelegationNeeded`` (the
    permission backend must be asked) or ``MembershipNeeded`` (the auth backend must be asked
    for the user's ownership refs); the caller resolves it and calls again.
    ``explain``: record every step in ``context.trace`` (off on the proxy's hot path).
    """
    target = request.target
    draft = _Draft(target, explain)
    trace = draft.trace

    # 1. plugin -----------------------------------------------------------------------------
    path, _, query = target.partition("?")
    query = "?" + query if _ else ""
    if not path.startswith(API_PREFIX):
        return draft.deny("plugin", ApiError(404, "Not Found"), "not under /api/")
    plugin_id, slash, rest = path[len(API_PREFIX):].partition("/")
    policy = policies.plugins.get(plugin_id)
    if policy is None:
        return draft.deny("plugin", ApiError(404, f"No plugin found with id '{plugin_id}'"
                                             if plugin_id.isascii() and plugin_id.isprintable()
                                             else "Not Found"))
    draft.plugin_id = plugin_id
    mount = API_PREFIX + plugin_id
    draft.url = _relative_url(target, mount)
    if trace is not None:
        trace.append(("plugin", f"{plugin_id} ({policy.file})"))

    if "#" in target:
        return draft.deny("path", ApiError(400, "Invalid request path"), "fragment in target")
    if query and not _SAFE_QUERY.fullmatch(query):
        # No control bytes or raw non-ASCII (RFC 3986), which parsers disagree about (values
        # are decoded, checked and re-encoded for the upstream: the raw query never goes on).
        return draft.deny("path", ApiError(400, "Invalid request target"),
                          "control or non-ASCII byte in query")
    try:
        segments = split_segments(slash + rest)
    except PathRejected as exc:
        return draft.deny("path", ApiError(400, "Invalid request path"), exc.reason)

    # 2. credentials barrier (before routing, so routes cannot be enumerated) ------------------
    match = policy.table.match(request.method, segments)
    if match is not None and match.entry is not None:
        open_path = match.entry.unauthenticated
    else:  # 404 or 405: open only if the path itself is declared unauthenticated
        open_path = match is not None and any(r.unauthenticated for r in match.path_entries)
    principal: Principal | None = None
    token: str | None = None
    if open_path:
        if trace is not None:
            trace.append(("barrier", "path is unauthenticated: credentials ignored"))
    else:
        try:
            token = extract_bearer(list(request.authorization))
            if token is None:
                return draft.deny("barrier", ApiError(401, "Missing credentials"))
            if verifier is None:
                return draft.deny("barrier", ApiError(401, "Illegal token"),
                                  "no credential source is configured")
            principal = verifier.verify(token, plugin_id)
        except CredentialError as exc:
            return draft.deny("barrier", ApiError(401, exc.message), exc.reason)
        except KeySourceUnavailable as exc:
            return draft.deny("barrier",
                              ApiError(503, exc.message,
                                       headers=(("Retry-After", str(exc.retry_after)),)),
                              f"key source unavailable: {exc.source_url}")
        draft.principal = principal
        if trace is not None:
            trace.append(("barrier", f"{principal.kind} {principal.subject} "
                                     f"(via {principal.source})"))

    # 3. route and method ----------------------------------------------------------------------
    if match is None:
        return draft.deny("route", ApiError(404, f"No route for {request.method} "
                                                 f"{draft.url.partition('?')[0]}"))
    if match.entry is None:
        allow = ", ".join(match.allowed_methods)
        return draft.deny("method",
                          ApiError(405, f"Method {request.method} is not allowed; allowed: "
                                        f"{allow}", headers=(("Allow", allow),)))
    route = match.entry
    draft.route = route
    if trace is not None:
        trace.append(("route", f"{'/'.join(route.methods)} {route.path} "
                               f"({route.file}:{route.line})"))

    # 4. principal kind ------------------------------------------------------------------------
    if not route.unauthenticated:
        assert principal is not None  # the barrier demanded credentials for this route
        if principal.kind not in route.auth:
            return draft.deny("principal", ApiError(
                403, f"This endpoint does not allow '{principal.kind}' credentials"))
        # External access restrictions: a token limited to some plugins stays there.
        if principal.access_plugins is not None and plugin_id not in principal.access_plugins:
            allowed = ", ".join(f"'{p}'" for p in sorted(principal.access_plugins))
            return draft.deny("access", ApiError(
                403, f"This token's access is restricted to plugin(s) {allowed}"))
        if trace is not None:
            trace.append(("principal", f"{principal.kind} allowed by route"))

    # 5. path parameters -----------------------------------------------------------------------
    values = route.template.bind(segments)
    for name, value in values.items():
        problem = route.params[name].check(value)
        if problem is not None:
            return draft.deny("params", ApiError(400, problem))
    if values:
        draft.params = MappingProxyType(values)
        if trace is not None:
            trace.append(("params", ", ".join(f"{k}={v!r} ok" for k, v in values.items())))

    # 5b. query parameters: only declared ones go on, validated and re-encoded ----------------
    try:
        shaped = shape_query(query[1:], route.query)
    except QueryRejected as exc:
        return draft.deny("query", ApiError(400, exc.message))
    if trace is not None and (query or route.query.rules or route.query.fixed):
        kept = ", ".join(f"{k}={v!r} ok" for k, v in shaped.kept) or "none"
        text = f"kept {kept}"
        if shaped.dropped:
            text += f"; dropped (undeclared) {', '.join(shaped.dropped)}"
        if route.query.fixed:
            text += f"; fixed added: {shaped.shown.rpartition('?')[2]}"
        trace.append(("query", text))

    # 6. permission ----------------------------------------------------------------------------
    if route.permission is not None:
        try:
            denied = _check_permission(draft, route, principal, token, values, policies,
                                       authorizer)
        except MembershipUnavailable as exc:  # fail closed, as for a missing key set
            return draft.deny("permission",
                              ApiError(503, exc.message,
                                       headers=(("Retry-After", str(exc.retry_after)),)),
                              f"membership unavailable: {exc.url}: {exc.reason}")
        if denied is not None:
            if route.enforce:
                return draft.deny("permission", denied)
            draft.would_deny(f"route {route.path} ({route.file}:{route.line}) is enforce: false; "
                             f"would deny: {denied.message}")

    # 7. action --------------------------------------------------------------------------------
    if route.respond is not None:
        if trace is not None:
            trace.append(("action", f"answer locally with {route.respond.status}"))
        return Answer(draft.context(), route.respond)
    assert route.upstream is not None
    up = route.upstream
    upstream_path = up.path_for(values)
    upstream = Upstream(up.scheme, up.host, up.port, upstream_path + shaped.text,
                        upstream_path + shaped.shown if route.query.secret_names else None)
    if trace is not None:
        if route.body is not None:
            body = route.body
            trace.append(("body", f"checked when it arrives: Content-Type {body.content_type}"
                                  + (f", at most {body.max_bytes} bytes" if body.max_bytes
                                     else "")
                                  + (", JSON Schema" if body.validator is not None else "")))
        if up.headers:
            shown = ", ".join(f"{n}: {v}" for n, v in up.shown_headers())
            trace.append(("upstream", f"headers set (client copies removed): {shown}"))
        trace.append(("action", f"forward to {upstream.url}"))
    return Forward(draft.context(), upstream, route.timeout, token)
