"""The policy model: one YAML file per plugin, validated and compiled at load time.

A policy reads top to bottom the way the request is handled::

    pluginId: insights
    routes:
      - path: /services/{id}           # matched against the path under /api/insights
        methods: [GET]                 # HEAD is served wherever GET is
        auth: [user]                   # unauthenticated | user | service
        params:
          id:
            pattern: ^[a-z0-9-]+$      # full match against the percent-decoded value
            message: "Invalid service id: {value}"
        query:                         # declared query parameters only
          page: {pattern: "^[0-9]{1,4}$"}
        upstream: ${insights.externalApiUrl}/v1/services/{id}
        timeout: 10s

Structure (keys, types, enums) is checked against the JSON Schema in ``stagedoor/schemas/``
(:mod:`stagedoor.policyschema`); this module keeps the semantic checks and compiles. Every
problem is reported as a :class:`PolicyProblem` with the file and line to fix; warnings (an
unverified TLS upstream, a secret sent in clear text) ride along in ``PolicySet.warnings``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from .body import BodyRule, BodySchemaError, compile_body_schema, parse_size
from .config import Config, ConfigError, MissingConfigError
from .errors import JSON_CONTENT_TYPE
from .permissions import PermissionRule, parse_rules
from .policyschema import line_of, structure_errors
from .query import QueryPolicy, QueryRule
from .ratelimit import RateLimitRule
from .ratelimit import parse_rules as parse_rate_limits
from .response_rules import DEFAULT_DROPPED, DEFAULT_RESPONSE_RULE, HOP_BY_HOP, ResponseRule
from .routing import PathTemplate, RouteTable
from .yamlsource import LinedList, LinedMap, LinedScalar, YamlSyntaxError, load_lined, plain

PLUGIN_ID = re.compile(r"^[a-z][a-z0-9-]*$")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
AUTH_KINDS = ("unauthenticated", "user", "service")
DEFAULT_TIMEOUT = 30.0
MAX_PARAM_LENGTH = 1024

_CONFIG_REF = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")
_UPSTREAM_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Headers a policy may not set upstream: the proxy owns framing, routing and identity.
_RESERVED_UPSTREAM_HEADERS = frozenset({"host", "content-length", "transfer-encoding",
                                        "connection", "te", "upgrade", "x-request-id"})

SHARED_PERMISSIONS_FILE = "permissions.yaml"


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class PolicyLoadError(Exception):
    """Loading failed; ``problems`` lists every problem found, each with file and line."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class Secret(str):
    """A value read from app-config (``${key}``): sent upstream, never shown. ``repr`` hides it,
    so a dataclass printed into a log or a traceback does not carry it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


@dataclass(frozen=True, slots=True)
class ParamRule:
    name: str
    pattern: re.Pattern[str]
    message: str

    def check(self, value: str) -> str | None:
        """None when the value is acceptable, else the client-facing error message."""
        if (
            len(value) <= MAX_PARAM_LENGTH
            and "/" not in value
            and "\\" not in value
            and self.pattern.fullmatch(value) is not None
        ):
            return None
        return self.message.replace("{value}", value)


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How an https upstream is verified (``upstream.tls``); files already checked at load."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class Identity:
    """``upstream.identity``: how the verified caller reaches the upstream (reserved here;
    carried for the identity mutators)."""

    type: str
    header: str | None = None
    audience: str | None = None
    plugin: str | None = None
    ttl: int | None = None  # jwt: seconds the assertion lives (<= 60)


@dataclass(frozen=True, slots=True)
class UpstreamTemplate:
    """Where a route forwards to: fixed scheme/host/port, a path built from parameters, and
    what stagedoor adds (headers, fixed query, TLS, identity)."""

    text: str
    scheme: str
    host: str
    port: int
    path_pieces: tuple[tuple[bool, str], ...]  # (is_param, literal text or parameter name)
    #: (name, value) set on the upstream request; values may be :class:`Secret`.
    headers: tuple[tuple[str, str], ...] = ()
    tls: UpstreamTls | None = None
    identity: Identity | None = None
    #: Every secret this upstream gets (header and query values, and the app-config values
    #: in them), for redaction; never shown.
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def header_fields(self) -> tuple[tuple[bytes, bytes], ...]:
        """``headers`` as raw header fields, for the forwarding header policy."""
        return tuple((name.encode("utf-8", "surrogateescape"),
                      str(value).encode("utf-8", "surrogateescape"))
                     for name, value in self.headers)

    def path_for(self, params: dict[str, str]) -> str:
        out = []
        for is_param, text in self.path_pieces:
            out.append(quote(params[text], safe="") if is_param else text)
        return "".join(out)

    def url_for(self, params: dict[str, str], query: str = "") -> str:
        return f"{self.origin}{self.path_for(params)}{query}"

    @property
    def origin(self) -> str:
        default_port = 443 if self.scheme == "https" else 80
        netloc = self.host if self.port == default_port else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}"

    @property
    def header_names(self) -> frozenset[str]:
        """Lower-case names of the headers this upstream gets from the policy."""
        return frozenset(name.lower() for name, _ in self.headers)

    def shown_headers(self) -> list[tuple[str, str]]:
        """The headers as ``explain`` shows them: secrets masked."""
        return [(n, "***" if isinstance(v, Secret) else v) for n, v in self.headers]


@dataclass(frozen=True, slots=True)
class LocalResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Route:
    plugin_id: str
    template: PathTemplate
    methods: tuple[str, ...]
    auth: frozenset[str]
    params: dict[str, ParamRule]
    upstream: UpstreamTemplate | None
    respond: LocalResponse | None
    timeout: float
    file: str
    line: int
    permission: str | None = None
    resource_param: str | None = None  # path parameter whose value is the permission resource
    enforce: bool = True  # False: a permission denial is logged and counted, not enforced
    rate_limits: tuple[RateLimitRule, ...] = ()  # the route's own rateLimit: rules
    query: QueryPolicy = field(default_factory=QueryPolicy)
    body: BodyRule | None = None
    response: ResponseRule = DEFAULT_RESPONSE_RULE

    @property
    def unauthenticated(self) -> bool:
        return "unauthenticated" in self.auth

    @property
    def path(self) -> str:
        return self.template.text

    @property
    def secret_values(self) -> tuple[str, ...]:
        """Every secret this route sends upstream (headers and fixed query values, and the
        app-config values in them)."""
        return self.upstream.secrets if self.upstream else ()


@dataclass(slots=True)
class PluginPolicy:
    plugin_id: str
    file: str
    routes: list[Route]
    table: RouteTable[Route] = field(default_factory=RouteTable)
    rules: list[PermissionRule] = field(default_factory=list)
    rate_limits: tuple[RateLimitRule, ...] = ()  # the plugin's rateLimit: rules

    def rate_limits_for(self, route: Route) -> tuple[RateLimitRule, ...]:
        """The route's rules when it has any, else the plugin's."""
        return route.rate_limits or self.rate_limits


@dataclass(slots=True)
class PolicySet:
    """Everything the gateway serves, by plugin id. Immutable once built; reloads swap it."""

    plugins: dict[str, PluginPolicy]
    files: tuple[str, ...] = ()
    shared_rules: list[PermissionRule] = field(default_factory=list)
    _rules_by_plugin: dict[str, list[PermissionRule]] = field(default_factory=dict)
    #: Worth fixing, not fatal: an unverified TLS upstream, a secret over plain http.
    warnings: tuple[PolicyProblem, ...] = ()
    #: (host, port) of https upstreams -> how to verify them (one setting per address).
    upstream_tls: dict[tuple[str, int], UpstreamTls] = field(default_factory=dict)

    def rules_for(self, plugin_id: str) -> list[PermissionRule]:
        """The plugin's own rules first, then the shared ones (computed once)."""
        rules = self._rules_by_plugin.get(plugin_id)
        if rules is None:
            plugin = self.plugins.get(plugin_id)
            rules = [*(plugin.rules if plugin else []), *self.shared_rules]
            self._rules_by_plugin[plugin_id] = rules
        return rules

    @property
    def route_count(self) -> int:
        return sum(len(p.routes) for p in self.plugins.values())

    @property
    def secret_values(self) -> frozenset[str]:
        """Every secret any route sends upstream, for redaction (inspect, logs)."""
        return frozenset(v for p in self.plugins.values() for r in p.routes
                         for v in r.secret_values)

    @property
    def secret_header_names(self) -> frozenset[str]:
        return frozenset(name.lower() for p in self.plugins.values() for r in p.routes
                         if r.upstream for name, v in r.upstream.headers if isinstance(v, Secret))


# ------------------------------------------------------------------------------------------------
def parse_duration(value: Any) -> float:
    """``30``, ``30s``, ``500ms``, ``2m`` -> seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", str(value))
        if not match:
            raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 500ms, 2m)")
        number, unit = float(match.group(1)), match.group(2) or "s"
        seconds = number / 1000 if unit == "ms" else number * 60 if unit == "m" else number
    if not 0 < seconds <= 3600:
        raise ValueError(f"duration {value!r} must be between 0 and 1 hour")
    return seconds


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _FileLoader:
    """Validates one policy file, collecting every problem instead of stopping at the first."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path = path
        self.file = str(path)
        self.config = config
        self.problems: list[PolicyProblem] = []
        self.warnings: list[PolicyProblem] = []

    def problem(self, line: int, message: str) -> None:
        self.problems.append(PolicyProblem(self.file, line, message))

    def warn(self, line: int, message: str) -> None:
        self.warnings.append(PolicyProblem(self.file, line, f"warning: {message}"))

    def scalar(self, node: Any) -> Any:
        return node.value if isinstance(node, LinedScalar) else None

    def resolve_config_refs(self, text: str, line: int,
                            values: list[str] | None = None) -> tuple[str | None, bool]:
        """``${key}`` -> app-config values. Returns (text or None on failure, used config);
        the values substituted are appended to ``values``."""
        failed = False
        used = False

        def replace(match: re.Match[str]) -> str:
            nonlocal failed, used
            used = True
            key = match.group(1)
            try:
                value = self.config.require_string(key)
                if values is not None:
                    values.append(value)
                return value
            except MissingConfigError as exc:
                self.problem(line, str(exc))
            except ConfigError as exc:
                self.problem(line, str(exc))
            failed = True
            return ""

        result = _CONFIG_REF.sub(replace, text)
        return (None if failed else result), used

    def read(self) -> Any:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(1, f"cannot read policy file: {exc}")
            return None
        try:
            return load_lined(text)
        except YamlSyntaxError as exc:
            self.problem(exc.line, exc.message)
            return None

    # --------------------------------------------------------------------------------------
    def load(self) -> PluginPolicy | None:
        doc = self.read()
        if doc is None and not self.problems:
            self.problem(1, "a policy file must be a mapping starting with 'pluginId: <id>'")
        if doc is None:
            return None
        if not isinstance(doc, LinedMap):
            self.problem(1, "a policy file must be a mapping starting with 'pluginId: <id>'")
            return None
        # Structure first (the schema), then meaning, route by route: a route with a structure
        # problem is not checked further (its message would repeat), the others are.
        broken_routes: dict[int, set[str]] = {}
        broken_top: set[str] = set()
        for path, line, message in structure_errors(doc):
            self.problem(line, message)
            if len(path) >= 2 and path[0] == "routes" and isinstance(path[1], int):
                # params.id / query.page: only that entry is dropped from the semantic checks
                depth = 4 if len(path) > 3 and path[2] in ("params", "query") else 3
                broken_routes.setdefault(path[1], set()).add(
                    ".".join(str(p) for p in path[2:depth]) or "*")
            elif path:
                broken_top.add(str(path[0]))
            else:
                broken_top.add("*")

        plugin_id = self.scalar(doc.values.get("pluginId"))
        if not isinstance(plugin_id, str) or not PLUGIN_ID.match(plugin_id):
            plugin_id = "-"  # reported already; the routes are still checked
        default_timeout = DEFAULT_TIMEOUT
        if "timeout" in doc.values and "timeout" not in broken_top:
            try:
                default_timeout = parse_duration(plain(doc.values["timeout"]))
            except ValueError as exc:
                self.problem(doc.line_of("timeout"), str(exc))

        policy = PluginPolicy(plugin_id, self.file, [])
        if "permissions" in doc.values and "permissions" not in broken_top:
            policy.rules = self.permission_rules(doc.values["permissions"])
        if "rateLimit" in doc.values and "rateLimit" not in broken_top:
            policy.rate_limits = self.rate_limits(doc.values["rateLimit"], plugin_id, "plugin",
                                                  doc.line_of("rateLimit"))
        routes_node = doc.values.get("routes")
        if not isinstance(routes_node, LinedList):
            return None
        for index, route_node in enumerate(routes_node.items):
            broken = broken_routes.get(index, set())
            if not isinstance(route_node, LinedMap) or broken & {"*", "path"}:
                continue
            if broken:  # check the rest of the route; what is broken is reported already
                route_node = _without(route_node, broken)
            route = self.route(plugin_id, route_node, default_timeout, broken)
            if route is None:
                continue
            clash = policy.table.add(route.template, list(route.methods), route)
            if clash is not None:
                self.problem(route.line, f"duplicate route: {'/'.join(route.methods)} "
                             f"{route.path} overlaps {clash.path} (line {clash.line})")
                continue
            policy.routes.append(route)
        self.unique_rate_limit_names(policy)
        return policy

    def unique_rate_limit_names(self, policy: PluginPolicy) -> None:
        """Rule names key the counts and the metrics: two rules of a plugin never share one."""
        seen: dict[str, str] = {}
        route_rules = (rule for route in policy.routes for rule in route.rate_limits)
        for rule in [*policy.rate_limits, *route_rules]:
            if rule.name in seen:
                self.problem(int(rule.where.rpartition(":")[2]), f"rateLimit: name '{rule.name}' "
                             f"is already used at {seen[rule.name]}; give one of them a 'name'")
            else:
                seen[rule.name] = rule.where

    def rate_limits(self, node: Any, plugin_id: str, scope: str,
                    line: int) -> tuple[RateLimitRule, ...]:
        lines = node.item_lines if isinstance(node, LinedList) else [getattr(node, "line", line)]
        found: list[tuple[int, str]] = []
        rules = parse_rate_limits(plain(node), plugin_id, scope, self.file, lines or [line], found)
        for problem_line, message in found:
            self.problem(problem_line, message)
        return rules

    def permission_rules(self, node: Any) -> list[PermissionRule]:
        assert isinstance(node, LinedList)  # the schema said so
        found: list[tuple[int, str]] = []
        rules = parse_rules([plain(item) for item in node.items], self.file, node.item_lines,
                            found)
        for problem_line, message in found:
            self.problem(problem_line, message)
        return rules

    def load_shared_rules(self) -> list[PermissionRule]:
        """``permissions.yaml``: rules shared by every plugin, no routes."""
        doc = self.read()
        if doc is None:
            return []
        if not isinstance(doc, LinedMap):
            self.problem(1, "permissions.yaml must be a mapping with 'permissions: [...]'")
            return []
        errors = structure_errors(doc, "permissionsFile")
        for _, line, message in errors:
            self.problem(line, message)
        if errors or "permissions" not in doc.values:
            return []
        return self.permission_rules(doc.values["permissions"])

    def route(self, plugin_id: str, node: LinedMap, default_timeout: float,
              broken: set[str] | frozenset[str] = frozenset()) -> Route | None:
        """One route's meaning; ``broken`` keys had structure problems and were removed."""
        line = node.line
        before = len(self.problems)
        path = self.scalar(node.values["path"])
        try:
            template = PathTemplate.parse(path)
        except ValueError as exc:
            self.problem(node.line_of("path"), str(exc))
            return None

        methods = self.methods(node)
        auth = self.auth(node)
        params = self.params(node, template, broken)

        timeout = default_timeout
        if "timeout" in node.values:
            try:
                timeout = parse_duration(plain(node.values["timeout"]))
            except ValueError as exc:
                self.problem(node.line_of("timeout"), str(exc))

        upstream = respond = None
        fixed_query: tuple[tuple[str, str], ...] = ()
        if broken & {"upstream", "respond"}:
            pass
        elif ("upstream" in node.values) == ("respond" in node.values):
            self.problem(line, f"route {path} needs exactly one of 'upstream' (forward) "
                         "or 'respond' (answer locally)")
        elif "upstream" in node.values:
            upstream, fixed_query = self.upstream(node, template)
        else:
            respond = self.respond(node)
        query = self.query(node, fixed_query)
        body = self.body(node, methods)
        response = self.response(node)
        if respond is not None:
            for key in ("body", "response"):
                if key in node.values:
                    self.problem(node.line_of(key), f"'{key}' applies to forwarded requests; "
                                 "this route answers locally ('respond')")

        permission = self.scalar(node.values.get("permission"))
        resource = self.scalar(node.values.get("resource"))
        enforce = self.scalar(node.values.get("enforce"))
        if resource is not None:
            if permission is None:
                self.problem(node.line_of("resource"), "'resource' needs a 'permission'")
            elif resource not in template.param_names:
                self.problem(node.line_of("resource"), f"'resource' must name a path parameter "
                             f"of '{template.text}', got {resource!r}")
        rate_limits: tuple[RateLimitRule, ...] = ()
        if "rateLimit" in node.values:
            rate_limits = self.rate_limits(node.values["rateLimit"], plugin_id, path,
                                           node.line_of("rateLimit"))
        if permission is not None and "unauthenticated" in auth:
            self.problem(node.line_of("permission"), "an unauthenticated route cannot check a "
                         "permission (there is no principal)")

        if len(self.problems) != before or broken:  # a broken route is checked, never built
            return None
        return Route(plugin_id, template, methods, auth, params, upstream, respond, timeout,
                     self.file, line, permission, resource, enforce is not False, rate_limits,
                     query, body, response)

    def methods(self, node: LinedMap) -> tuple[str, ...]:
        if "methods" in node.values and "method" in node.values:
            self.problem(node.line_of("method"), "use either 'method' or 'methods', not both")
        raw = plain(node.values.get("methods", node.values.get("method", ["GET"])))
        items = raw if isinstance(raw, list) else [raw]
        methods: list[str] = []
        for item in items:
            if item.upper() not in methods:
                methods.append(item.upper())
        return tuple(methods)

    def auth(self, node: LinedMap) -> frozenset[str]:
        if "auth" not in node.values:
            return frozenset({"user", "service"})
        raw = plain(node.values["auth"])
        kinds = set(raw if isinstance(raw, list) else [raw])
        if "unauthenticated" in kinds and len(kinds) > 1:
            self.problem(node.line_of("auth"), "'unauthenticated' lets anyone in and cannot be "
                         "combined with 'user' or 'service'")
        return frozenset(kinds)

    def compile_regex(self, text: str, line: int, what: str) -> re.Pattern[str] | None:
        try:
            return re.compile(text)
        except re.error as exc:
            self.problem(line, f"{what}: invalid regex {text!r}: {exc}")
            return None

    def params(self, node: LinedMap, template: PathTemplate,
               broken: set[str] | frozenset[str] = frozenset()) -> dict[str, ParamRule]:
        rules: dict[str, ParamRule] = {}
        params_node = node.values.get("params")
        declared: dict[str, Any] = params_node.values if isinstance(params_node, LinedMap) else {}
        for name in declared:
            assert isinstance(params_node, LinedMap)
            if name not in template.param_names:
                self.problem(params_node.line_of(name), f"parameter '{name}' is not in "
                             f"path '{template.text}'")
        for name in template.param_names:
            spec = declared.get(name)
            if spec is None and ("params" in broken or f"params.{name}" in broken):
                continue
            if spec is None:
                self.problem(node.line_of("path"), f"path parameter '{name}' has no regex: add "
                             f"params: {{{name}: {{pattern: '^...$'}}}}")
                continue
            assert isinstance(params_node, LinedMap)
            pline = params_node.line_of(name)
            plain_spec = plain(spec)
            if isinstance(plain_spec, str):
                pattern_text, message = plain_spec, None
            else:
                pattern_text, message = plain_spec["pattern"], plain_spec.get("message")
            compiled = self.compile_regex(pattern_text, pline, f"parameter '{name}'")
            if compiled is not None:
                rules[name] = ParamRule(name, compiled, message or f"Invalid {name}: {{value}}")
        return rules

    def query(self, node: LinedMap, fixed: tuple[tuple[str, str], ...]) -> QueryPolicy:
        unknown = self.scalar(node.values.get("unknownQuery")) or "drop"
        secret_names = frozenset(name for name, value in fixed if isinstance(value, Secret))
        query_node = node.values.get("query")
        if not isinstance(query_node, LinedMap):
            return QueryPolicy((), unknown, fixed, secret_names)
        fixed_names = {name for name, _ in fixed}
        rules = []
        for name, spec_node in query_node.values.items():
            line = query_node.line_of(name)
            spec = plain(spec_node)
            if name in fixed_names:
                self.problem(line, f"query parameter '{name}' is also a fixed upstream query "
                             "parameter (upstream.query): the fixed value would always win")
                continue
            compiled = self.compile_regex(spec["pattern"], line, f"query parameter '{name}'")
            if compiled is None:
                continue
            rules.append(QueryRule(name, compiled, bool(spec.get("required", False)),
                                   bool(spec.get("repeated", False)), spec.get("message", "")))
        return QueryPolicy(tuple(rules), unknown, fixed, secret_names)

    def body(self, node: LinedMap, methods: tuple[str, ...]) -> BodyRule | None:
        body_node = node.values.get("body")
        if not isinstance(body_node, LinedMap):
            return None
        spec = plain(body_node)
        if not set(methods) & {"POST", "PUT", "PATCH", "DELETE", "OPTIONS"}:
            self.problem(node.line_of("body"), "'body' needs a method that carries a body "
                         "(POST, PUT, PATCH, DELETE)")
        content_type = str(spec.get("contentType", "application/json")).strip().lower()
        if "/" not in content_type or ";" in content_type:
            self.problem(body_node.line_of("contentType"), f"'contentType' must be a media "
                         f"type such as application/json (no parameters), got {content_type!r}")
        max_bytes = None
        if "maxBytes" in spec:
            try:
                max_bytes = parse_size(spec["maxBytes"])
            except ValueError as exc:
                self.problem(body_node.line_of("maxBytes"), str(exc))
        schema = validator = None
        if "schema" in spec:
            try:
                schema, validator = compile_body_schema(spec["schema"], self.path)
            except BodySchemaError as exc:
                self.problem(line_of(body_node, ["schema", *exc.path]), exc.message)
        return BodyRule(content_type, max_bytes, schema, validator)

    def response(self, node: LinedMap) -> ResponseRule:
        spec = plain(node.values.get("response")) or {}
        headers = spec.get("headers") or {}
        allow = frozenset(h.lower() for h in headers.get("allow", []))
        remove = frozenset(h.lower() for h in headers.get("remove", []))
        response_node = node.values.get("response")
        line = response_node.line if isinstance(response_node, LinedMap) else node.line
        for name in sorted(allow):
            if name in HOP_BY_HOP:
                self.problem(line, f"response.headers.allow: '{name}' is hop-by-hop and never "
                             "forwarded")
            elif name not in DEFAULT_DROPPED:
                self.problem(line, f"response.headers.allow: '{name}' is not filtered (only "
                             f"{', '.join(DEFAULT_DROPPED)} are)")
        if not allow and not remove and not spec.get("expect"):
            return DEFAULT_RESPONSE_RULE
        return ResponseRule(allow, remove, spec.get("expect") == "json")

    def upstream(self, node: LinedMap, template: PathTemplate
                 ) -> tuple[UpstreamTemplate | None, tuple[tuple[str, str], ...]]:
        spec_node = node.values["upstream"]
        if isinstance(spec_node, LinedMap):
            url_node = spec_node.values["url"]
            line = spec_node.line_of("url")
        else:
            spec_node, url_node, line = None, node.values["upstream"], node.line_of("upstream")
        raw = self.scalar(url_node)
        resolved, _ = self.resolve_config_refs(raw, line)
        if resolved is None:
            return None, ()
        try:
            parts = urlsplit(resolved)
            port = parts.port
        except ValueError as exc:
            self.problem(line, f"upstream {resolved!r} is not a valid URL: {exc}")
            return None, ()
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(line, f"upstream {resolved!r} must be an absolute http(s) URL")
            return None, ()
        if parts.query or parts.fragment or parts.username or parts.password:
            self.problem(line, f"upstream {resolved!r} must not carry a query, fragment or "
                         "credentials (use upstream.query and upstream.headers)")
            return None, ()
        pieces: list[tuple[bool, str]] = []
        path = parts.path or "/"
        cursor = 0
        for match in _UPSTREAM_PARAM.finditer(path):
            if match.start() > cursor:
                pieces.append((False, path[cursor:match.start()]))
            name = match.group(1)
            if name not in template.param_names:
                self.problem(line, f"upstream names parameter '{name}', which is not in path "
                             f"'{template.text}'")
                return None, ()
            pieces.append((True, name))
            cursor = match.end()
        if cursor < len(path):
            pieces.append((False, path[cursor:]))
        if any("{" in text or "}" in text for is_param, text in pieces if not is_param):
            self.problem(line, f"upstream {resolved!r} has a malformed '{{parameter}}'")
            return None, ()
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        headers: list[tuple[str, str]] = []
        fixed: list[tuple[str, str]] = []
        secrets: list[str] = []
        tls = identity = None
        if spec_node is not None:
            headers = self.upstream_values(spec_node, "headers", secrets)
            fixed = self.upstream_values(spec_node, "query", secrets)
            tls = self.upstream_tls(spec_node, parts.scheme)
            ident = plain(spec_node.values.get("identity"))
            if isinstance(ident, dict):
                identity = Identity(ident["type"], ident.get("header"), ident.get("audience"),
                                    ident.get("plugin"), ident.get("ttl"))
                ident_line = spec_node.line_of("identity")
                if identity.type == "jwt" and not identity.audience:
                    self.problem(ident_line, "identity type jwt needs 'audience' (who the "
                                 "assertion is for)")
                if identity.type == "backstage" and not identity.plugin:
                    self.problem(ident_line, "identity type backstage needs 'plugin' (the "
                                 "target plugin id)")
                if identity.type == "backstage" and any(name.lower() == "authorization"
                                                        for name, _ in headers):
                    self.problem(ident_line, "identity type backstage sets Authorization: "
                                 "the upstream headers cannot set it too")
        for name, _ in headers:
            if not _HEADER_NAME.match(name):
                self.problem(line, f"upstream header name {name!r} is not a valid header name")
            elif name.lower() in _RESERVED_UPSTREAM_HEADERS:
                self.problem(line, f"upstream header '{name}' is set by the proxy itself")
        if parts.scheme == "http" and not _is_loopback(parts.hostname) and any(
                isinstance(v, Secret) for _, v in headers + fixed):
            self.warn(line, f"a secret is sent to {parts.scheme}://{parts.hostname} over plain "
                      "http (not loopback): use https")
        return UpstreamTemplate(raw, parts.scheme, parts.hostname, port, tuple(pieces),
                                tuple(headers), tls, identity,
                                tuple(dict.fromkeys(s for s in secrets if s))), tuple(fixed)

    def upstream_values(self, spec_node: LinedMap, key: str,
                        secrets: list[str]) -> list[tuple[str, str]]:
        """``upstream.headers`` / ``upstream.query``: values with ``${key}`` are secrets
        (appended to ``secrets``, with the app-config values in them)."""
        values_node = spec_node.values.get(key)
        if not isinstance(values_node, LinedMap):
            return []
        out: list[tuple[str, str]] = []
        for name, value_node in values_node.values.items():
            value = plain(value_node)
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            parts: list[str] = []
            resolved, secret = self.resolve_config_refs(text, values_node.line_of(name), parts)
            if resolved is None:
                continue
            if secret:
                secrets.extend([resolved, *parts])
            if key == "headers" and any(ch in resolved for ch in "\r\n\0"):
                self.problem(values_node.line_of(name), f"upstream header '{name}': the value "
                             "contains a line break or NUL")
                continue
            out.append((name, Secret(resolved) if secret else resolved))
        return out

    def upstream_tls(self, spec_node: LinedMap, scheme: str) -> UpstreamTls | None:
        tls_node = spec_node.values.get("tls")
        if not isinstance(tls_node, LinedMap):
            return None
        line = spec_node.line_of("tls")
        if scheme != "https":
            self.problem(line, "'tls' needs an https:// upstream")
            return None
        files: dict[str, str | None] = {}
        for key in ("caFile", "certFile", "keyFile"):
            raw = self.scalar(tls_node.values.get(key))
            if raw is None:
                files[key] = None
                continue
            resolved, _ = self.resolve_config_refs(str(raw), tls_node.line_of(key))
            if resolved is not None and not Path(resolved).is_file():
                self.problem(tls_node.line_of(key), f"tls.{key}: no such file: {resolved}")
                resolved = None
            files[key] = resolved
        insecure = self.scalar(tls_node.values.get("insecureSkipVerify")) is True
        if insecure:
            self.warn(tls_node.line_of("insecureSkipVerify"), "tls.insecureSkipVerify: the "
                      "upstream's certificate is not verified; anyone on the path can read and "
                      "change this traffic")
        if files["keyFile"] and not files["certFile"]:
            self.problem(tls_node.line_of("keyFile"), "tls.keyFile needs tls.certFile")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            if files["caFile"]:
                context.load_verify_locations(cafile=files["caFile"])
            if files["certFile"]:
                context.load_cert_chain(files["certFile"], files["keyFile"] or None)
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.problem(line, f"tls: cannot load the certificates: {exc}")
        return UpstreamTls(files["caFile"], files["certFile"], files["keyFile"], insecure)

    def respond(self, node: LinedMap) -> LocalResponse | None:
        spec = plain(node.values["respond"])
        line = node.line_of("respond")
        status = spec.get("status", 200)
        if "json" in spec and "body" in spec:
            self.problem(line, "use either 'json' or 'body' in 'respond', not both")
            return None
        headers: list[tuple[str, str]] = []
        if "json" in spec:
            body = json.dumps(spec["json"], separators=(",", ":")).encode()
            headers.append(("Content-Type", JSON_CONTENT_TYPE))
        else:
            body = str(spec.get("body", "")).encode("utf-8")
            headers.append(("Content-Type", str(spec.get("contentType",
                                                         "text/plain; charset=utf-8"))))
        headers.extend((str(k), str(v)) for k, v in (spec.get("headers") or {}).items())
        return LocalResponse(status, body, tuple(headers))


def _without(node: LinedMap, paths: set[str]) -> LinedMap:
    """A route node without the keys (``body``) and entries (``query.page``) named."""
    values = {}
    for key, value in node.values.items():
        if key in paths:
            continue
        entries = {p.partition(".")[2] for p in paths if p.startswith(key + ".")}
        if entries and isinstance(value, LinedMap):
            value = LinedMap({k: v for k, v in value.values.items() if k not in entries},
                             value.line, value.key_lines)
        values[key] = value
    return LinedMap(values, node.line, node.key_lines)


def load_policy_file(path: Path, config: Config) -> tuple[PluginPolicy | None, list[PolicyProblem]]:
    policy, problems, _ = _load_file(path, config)
    return policy, problems


def _load_file(path: Path, config: Config
               ) -> tuple[PluginPolicy | None, list[PolicyProblem], list[PolicyProblem]]:
    loader = _FileLoader(path, config)
    policy = loader.load()
    return (policy if not loader.problems else None), loader.problems, loader.warnings


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory, skipping hidden entries (ConfigMap ``..data`` etc.)."""
    return sorted(
        p for p in directory.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
        and p.name != SHARED_PERMISSIONS_FILE
    )


def _upstream_tls_table(plugins: dict[str, PluginPolicy], problems: list[PolicyProblem]
                        ) -> dict[tuple[str, int], UpstreamTls]:
    """One TLS setting per https upstream address: a connection serves every route to it."""
    table: dict[tuple[str, int], UpstreamTls] = {}
    first: dict[tuple[str, int], Route] = {}
    for policy in plugins.values():
        for route in policy.routes:
            up = route.upstream
            if up is None or up.scheme != "https":
                continue
            address = (up.host, up.port)
            setting = up.tls or UpstreamTls()
            if address not in table:
                table[address], first[address] = setting, route
            elif table[address] != setting:
                other = first[address]
                problems.append(PolicyProblem(route.file, route.line, f"upstream {up.origin}: "
                                f"tls differs from {other.file}:{other.line}; every route to "
                                "one upstream address must use the same tls settings"))
    return table


def load_policies(directory: str | Path, config: Config) -> PolicySet:
    """Load and validate every policy in ``directory``. Raises :class:`PolicyLoadError`."""
    root = Path(directory)
    problems: list[PolicyProblem] = []
    warnings: list[PolicyProblem] = []
    plugins: dict[str, PluginPolicy] = {}
    if not root.is_dir():
        raise PolicyLoadError([PolicyProblem(str(root), 0, "policy directory does not exist")])
    files = policy_files(root)
    if not files:
        problems.append(PolicyProblem(str(root), 0, "no policy files (*.yaml) found"))
    for path in files:
        policy, file_problems, file_warnings = _load_file(path, config)
        problems.extend(file_problems)
        warnings.extend(file_warnings)
        if policy is None:
            continue
        if policy.plugin_id in plugins:
            problems.append(PolicyProblem(str(path), 1, f"pluginId '{policy.plugin_id}' is "
                                          f"already defined in {plugins[policy.plugin_id].file}"))
            continue
        plugins[policy.plugin_id] = policy
    shared_rules: list[PermissionRule] = []
    shared = root / SHARED_PERMISSIONS_FILE
    if shared.is_file():
        loader = _FileLoader(shared, config)
        shared_rules = loader.load_shared_rules()
        problems.extend(loader.problems)
        files.append(shared)
    upstream_tls = _upstream_tls_table(plugins, problems)
    if problems:
        raise PolicyLoadError(problems)
    return PolicySet(plugins, tuple(str(f) for f in files), shared_rules,
                     warnings=tuple(warnings), upstream_tls=upstream_tls)
