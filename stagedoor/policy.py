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
        upstream: ${insights.externalApiUrl}/v1/services/{id}
        timeout: 10s

Every problem is reported as a :class:`PolicyProblem` with the file and line to fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from .config import Config, ConfigError, MissingConfigError
from .errors import JSON_CONTENT_TYPE
from .permissions import PermissionRule, parse_rules
from .ratelimit import RateLimitRule
from .ratelimit import parse_rules as parse_rate_limits
from .routing import PathTemplate, RouteTable
from .yamlsource import LinedList, LinedMap, LinedScalar, YamlSyntaxError, load_lined, plain

PLUGIN_ID = re.compile(r"^[a-z][a-z0-9-]*$")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
AUTH_KINDS = ("unauthenticated", "user", "service")
DEFAULT_TIMEOUT = 30.0
MAX_PARAM_LENGTH = 1024

_CONFIG_REF = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")
_UPSTREAM_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

POLICY_KEYS = {"pluginId", "description", "timeout", "routes", "permissions", "rateLimit"}
SHARED_PERMISSIONS_FILE = "permissions.yaml"
ROUTE_KEYS = {"path", "methods", "method", "auth", "params", "upstream", "respond", "timeout",
              "description", "permission", "resource", "enforce", "rateLimit"}
PARAM_KEYS = {"pattern", "message"}
RESPOND_KEYS = {"status", "json", "body", "contentType", "headers"}


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
class UpstreamTemplate:
    """Where a route forwards to: fixed scheme/host/port, a path built from parameters."""

    text: str
    scheme: str
    host: str
    port: int
    path_pieces: tuple[tuple[bool, str], ...]  # (is_param, literal text or parameter name)

    def path_for(self, params: dict[str, str]) -> str:
        out = []
        for is_param, text in self.path_pieces:
            out.append(quote(params[text], safe="") if is_param else text)
        return "".join(out)

    def url_for(self, params: dict[str, str], query: str = "") -> str:
        default_port = 443 if self.scheme == "https" else 80
        netloc = self.host if self.port == default_port else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.path_for(params)}{query}"


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

    @property
    def unauthenticated(self) -> bool:
        return "unauthenticated" in self.auth

    @property
    def path(self) -> str:
        return self.template.text


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


class _FileLoader:
    """Validates one policy file, collecting every problem instead of stopping at the first."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path = path
        self.file = str(path)
        self.config = config
        self.problems: list[PolicyProblem] = []

    def problem(self, line: int, message: str) -> None:
        self.problems.append(PolicyProblem(self.file, line, message))

    def unknown_keys(self, node: LinedMap, allowed: set[str], what: str) -> None:
        for key in node.values:
            if key not in allowed:
                self.problem(node.line_of(key), f"unknown key '{key}' in {what} "
                             f"(allowed: {', '.join(sorted(allowed))})")

    def scalar(self, node: Any) -> Any:
        return node.value if isinstance(node, LinedScalar) else None

    def resolve_config_refs(self, text: str, line: int) -> str | None:
        failed = False

        def replace(match: re.Match[str]) -> str:
            nonlocal failed
            key = match.group(1)
            try:
                return self.config.require_string(key)
            except MissingConfigError as exc:
                self.problem(line, str(exc))
            except ConfigError as exc:
                self.problem(line, str(exc))
            failed = True
            return ""

        result = _CONFIG_REF.sub(replace, text)
        return None if failed else result

    # --------------------------------------------------------------------------------------
    def load(self) -> PluginPolicy | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(1, f"cannot read policy file: {exc}")
            return None
        try:
            doc = load_lined(text)
        except YamlSyntaxError as exc:
            self.problem(exc.line, exc.message)
            return None
        if not isinstance(doc, LinedMap):
            self.problem(1, "a policy file must be a mapping starting with 'pluginId: <id>'")
            return None
        self.unknown_keys(doc, POLICY_KEYS, "policy")

        plugin_id = self.scalar(doc.values.get("pluginId"))
        if plugin_id is None:
            self.problem(doc.line, "missing 'pluginId'")
            return None
        if not isinstance(plugin_id, str) or not PLUGIN_ID.match(plugin_id):
            self.problem(doc.line_of("pluginId"), f"invalid pluginId {plugin_id!r}: use lower-case "
                         "letters, digits and dashes, starting with a letter")
            return None

        default_timeout = DEFAULT_TIMEOUT
        if "timeout" in doc.values:
            try:
                default_timeout = parse_duration(plain(doc.values["timeout"]))
            except ValueError as exc:
                self.problem(doc.line_of("timeout"), str(exc))

        routes_node = doc.values.get("routes")
        policy = PluginPolicy(plugin_id, self.file, [])
        if "permissions" in doc.values:
            policy.rules = self.permission_rules(doc.values["permissions"],
                                                 doc.line_of("permissions"))
        if "rateLimit" in doc.values:
            policy.rate_limits = self.rate_limits(doc.values["rateLimit"], plugin_id, "plugin",
                                                  doc.line_of("rateLimit"))
        if routes_node is None:
            self.problem(doc.line, "missing 'routes' (a list of routes)")
            return None
        if not isinstance(routes_node, LinedList):
            self.problem(doc.line_of("routes"), "'routes' must be a list")
            return None
        for route_node in routes_node.items:
            route = self.route(plugin_id, route_node, default_timeout)
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

    def permission_rules(self, node: Any, line: int) -> list[PermissionRule]:
        if not isinstance(node, LinedList):
            self.problem(line, "'permissions' must be a list of rules")
            return []
        found: list[tuple[int, str]] = []
        rules = parse_rules([plain(item) for item in node.items], self.file, node.item_lines,
                            found)
        for problem_line, message in found:
            self.problem(problem_line, message)
        return rules

    def load_shared_rules(self) -> list[PermissionRule]:
        """``permissions.yaml``: rules shared by every plugin, no routes."""
        try:
            doc = load_lined(self.path.read_text(encoding="utf-8"))
        except YamlSyntaxError as exc:
            self.problem(exc.line, exc.message)
            return []
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(1, f"cannot read permission rules: {exc}")
            return []
        if doc is None:
            return []
        if not isinstance(doc, LinedMap):
            self.problem(1, "permissions.yaml must be a mapping with 'permissions: [...]'")
            return []
        self.unknown_keys(doc, {"permissions", "description"}, "permissions.yaml")
        if "permissions" not in doc.values:
            return []
        return self.permission_rules(doc.values["permissions"], doc.line_of("permissions"))

    def route(self, plugin_id: str, node: Any, default_timeout: float) -> Route | None:
        line = getattr(node, "line", 1)
        if not isinstance(node, LinedMap):
            self.problem(line, "each route must be a mapping with at least 'path'")
            return None
        before = len(self.problems)
        self.unknown_keys(node, ROUTE_KEYS, "route")

        path = self.scalar(node.values.get("path"))
        if not isinstance(path, str):
            self.problem(line, "route is missing 'path' (e.g. path: /services/{id})")
            return None
        try:
            template = PathTemplate.parse(path)
        except ValueError as exc:
            self.problem(node.line_of("path"), str(exc))
            return None

        methods = self.methods(node)
        auth = self.auth(node)
        params = self.params(node, template)

        timeout = default_timeout
        if "timeout" in node.values:
            try:
                timeout = parse_duration(plain(node.values["timeout"]))
            except ValueError as exc:
                self.problem(node.line_of("timeout"), str(exc))

        upstream = respond = None
        if ("upstream" in node.values) == ("respond" in node.values):
            self.problem(line, f"route {path} needs exactly one of 'upstream' (forward) "
                         "or 'respond' (answer locally)")
        elif "upstream" in node.values:
            upstream = self.upstream(node, template)
        else:
            respond = self.respond(node)

        permission = resource = None
        enforce = True
        if "permission" in node.values:
            permission = self.scalar(node.values["permission"])
            if not isinstance(permission, str) or not permission:
                self.problem(node.line_of("permission"), "'permission' must be a permission "
                             "name such as insights.service.read")
        if "resource" in node.values:
            resource = self.scalar(node.values["resource"])
            if permission is None:
                self.problem(node.line_of("resource"), "'resource' needs a 'permission'")
            elif resource not in template.param_names:
                self.problem(node.line_of("resource"), f"'resource' must name a path parameter "
                             f"of '{template.text}', got {resource!r}")
        if "enforce" in node.values:
            enforce = self.scalar(node.values["enforce"])
            if not isinstance(enforce, bool):
                self.problem(node.line_of("enforce"), "'enforce' must be true or false")
        rate_limits: tuple[RateLimitRule, ...] = ()
        if "rateLimit" in node.values:
            rate_limits = self.rate_limits(node.values["rateLimit"], plugin_id, path,
                                           node.line_of("rateLimit"))
        if permission is not None and "unauthenticated" in auth:
            self.problem(node.line_of("permission"), "an unauthenticated route cannot check a "
                         "permission (there is no principal)")

        if len(self.problems) != before:
            return None
        return Route(plugin_id, template, methods, auth, params, upstream, respond, timeout,
                     self.file, line, permission, resource, bool(enforce), rate_limits)

    def methods(self, node: LinedMap) -> tuple[str, ...]:
        raw = plain(node.values.get("methods", node.values.get("method", ["GET"])))
        key = "methods" if "methods" in node.values else "method"
        if "methods" in node.values and "method" in node.values:
            self.problem(node.line_of("method"), "use either 'method' or 'methods', not both")
        items = raw if isinstance(raw, list) else [raw]
        methods: list[str] = []
        for item in items:
            if not isinstance(item, str) or item.upper() not in HTTP_METHODS:
                self.problem(node.line_of(key), f"unknown HTTP method {item!r} "
                             f"(allowed: {', '.join(HTTP_METHODS)})")
                continue
            if item.upper() not in methods:
                methods.append(item.upper())
        if not methods and items:
            return ("GET",)
        if not methods:
            self.problem(node.line_of(key), "a route needs at least one method")
        return tuple(methods)

    def auth(self, node: LinedMap) -> frozenset[str]:
        if "auth" not in node.values:
            return frozenset({"user", "service"})
        raw = plain(node.values["auth"])
        items = raw if isinstance(raw, list) else [raw]
        kinds = set()
        for item in items:
            if item not in AUTH_KINDS:
                self.problem(node.line_of("auth"), f"unknown auth kind {item!r} "
                             f"(allowed: {', '.join(AUTH_KINDS)})")
            else:
                kinds.add(item)
        if "unauthenticated" in kinds and len(kinds) > 1:
            self.problem(node.line_of("auth"), "'unauthenticated' lets anyone in and cannot be "
                         "combined with 'user' or 'service'")
        if not kinds and items:
            return frozenset({"user", "service"})
        if not kinds:
            self.problem(node.line_of("auth"), "'auth' must not be empty")
        return frozenset(kinds)

    def params(self, node: LinedMap, template: PathTemplate) -> dict[str, ParamRule]:
        rules: dict[str, ParamRule] = {}
        params_node = node.values.get("params")
        declared: dict[str, Any] = {}
        if params_node is not None:
            if not isinstance(params_node, LinedMap):
                self.problem(node.line_of("params"), "'params' must map parameter names to "
                             "{pattern, message}")
            else:
                declared = params_node.values
                for name in declared:
                    if name not in template.param_names:
                        self.problem(params_node.line_of(name), f"parameter '{name}' is not in "
                                     f"path '{template.text}'")
        for name in template.param_names:
            spec = declared.get(name)
            if spec is None:
                self.problem(node.line_of("path"), f"path parameter '{name}' has no regex: add "
                             f"params: {{{name}: {{pattern: '^...$'}}}}")
                continue
            assert isinstance(params_node, LinedMap)
            pline = params_node.line_of(name)
            if isinstance(spec, LinedScalar) and isinstance(spec.value, str):
                pattern_text, message = spec.value, None
            elif isinstance(spec, LinedMap):
                self.unknown_keys(spec, PARAM_KEYS, f"parameter '{name}'")
                pattern_text = self.scalar(spec.values.get("pattern"))
                message = self.scalar(spec.values.get("message"))
                if not isinstance(pattern_text, str):
                    self.problem(pline, f"parameter '{name}' needs a 'pattern' (a regex)")
                    continue
                if message is not None and not isinstance(message, str):
                    self.problem(spec.line_of("message"), f"parameter '{name}': 'message' must "
                                 "be a string")
                    continue
            else:
                self.problem(pline, f"parameter '{name}' must be a regex or "
                             "{pattern, message}")
                continue
            try:
                compiled = re.compile(pattern_text)
            except re.error as exc:
                self.problem(pline, f"parameter '{name}': invalid regex {pattern_text!r}: {exc}")
                continue
            rules[name] = ParamRule(name, compiled, message or f"Invalid {name}: {{value}}")
        return rules

    def upstream(self, node: LinedMap, template: PathTemplate) -> UpstreamTemplate | None:
        line = node.line_of("upstream")
        raw = self.scalar(node.values["upstream"])
        if not isinstance(raw, str):
            self.problem(line, "'upstream' must be a URL such as "
                         "${insights.externalApiUrl}/v1/services/{id}")
            return None
        resolved = self.resolve_config_refs(raw, line)
        if resolved is None:
            return None
        try:
            parts = urlsplit(resolved)
            port = parts.port
        except ValueError as exc:
            self.problem(line, f"upstream {resolved!r} is not a valid URL: {exc}")
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(line, f"upstream {resolved!r} must be an absolute http(s) URL")
            return None
        if parts.query or parts.fragment or parts.username or parts.password:
            self.problem(line, f"upstream {resolved!r} must not carry a query, fragment or "
                         "credentials")
            return None
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
                return None
            pieces.append((True, name))
            cursor = match.end()
        if cursor < len(path):
            pieces.append((False, path[cursor:]))
        if any("{" in text or "}" in text for is_param, text in pieces if not is_param):
            self.problem(line, f"upstream {resolved!r} has a malformed '{{parameter}}'")
            return None
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        return UpstreamTemplate(raw, parts.scheme, parts.hostname, port, tuple(pieces))

    def respond(self, node: LinedMap) -> LocalResponse | None:
        spec = node.values["respond"]
        line = node.line_of("respond")
        if not isinstance(spec, LinedMap):
            self.problem(line, "'respond' must be a mapping like {status: 200, json: {...}}")
            return None
        self.unknown_keys(spec, RESPOND_KEYS, "respond")
        status = plain(spec.values.get("status", 200))
        if not isinstance(status, int) or not 200 <= status <= 599:
            self.problem(spec.line_of("status"), f"invalid status {status!r}")
            return None
        if "json" in spec.values and "body" in spec.values:
            self.problem(line, "use either 'json' or 'body' in 'respond', not both")
            return None
        headers: list[tuple[str, str]] = []
        if "json" in spec.values:
            body = json.dumps(plain(spec.values["json"]), separators=(",", ":")).encode()
            headers.append(("Content-Type", JSON_CONTENT_TYPE))
        else:
            text = plain(spec.values.get("body", ""))
            body = str(text).encode("utf-8")
            ctype = plain(spec.values.get("contentType", "text/plain; charset=utf-8"))
            headers.append(("Content-Type", str(ctype)))
        extra = plain(spec.values.get("headers", {}))
        if not isinstance(extra, dict):
            self.problem(spec.line_of("headers"), "'headers' must be a mapping")
            return None
        headers.extend((str(k), str(v)) for k, v in extra.items())
        return LocalResponse(status, body, tuple(headers))


def load_policy_file(path: Path, config: Config) -> tuple[PluginPolicy | None, list[PolicyProblem]]:
    loader = _FileLoader(path, config)
    policy = loader.load()
    return (policy if not loader.problems else None), loader.problems


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory, skipping hidden entries (ConfigMap ``..data`` etc.)."""
    return sorted(
        p for p in directory.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
        and p.name != SHARED_PERMISSIONS_FILE
    )


def load_policies(directory: str | Path, config: Config) -> PolicySet:
    """Load and validate every policy in ``directory``. Raises :class:`PolicyLoadError`."""
    root = Path(directory)
    problems: list[PolicyProblem] = []
    plugins: dict[str, PluginPolicy] = {}
    if not root.is_dir():
        raise PolicyLoadError([PolicyProblem(str(root), 0, "policy directory does not exist")])
    files = policy_files(root)
    if not files:
        problems.append(PolicyProblem(str(root), 0, "no policy files (*.yaml) found"))
    for path in files:
        policy, file_problems = load_policy_file(path, config)
        problems.extend(file_problems)
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
    if problems:
        raise PolicyLoadError(problems)
    return PolicySet(plugins, tuple(str(f) for f in files), shared_rules)
