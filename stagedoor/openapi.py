"""An OpenAPI 3.1 description of what the sidecar serves, generated from the policies.

Pure: no mitmproxy, no network. ``stagedoor openapi`` prints :func:`build_document`; the gateway
serves the same document per plugin at ``/api/<pluginId>/.stagedoor/openapi.json`` through
:class:`ServedDocuments` when ``stagedoor.openapi.serve`` is true.

What the document says, and why:

- One path per route template under ``/api/<pluginId>``; every method of the route, plus ``HEAD``
  wherever ``GET`` is served (as the router does). HEAD responses carry no content.
- Path parameters carry their policy regex as ``pattern``. OpenAPI patterns are ECMA-262 and
  *unanchored*, while stagedoor full-matches the percent-decoded value with Python's ``re``:
  :func:`ecma_pattern` translates and anchors the regex into the dialect both understand, and
  the schema adds what the gateway refuses whatever the regex says (empty, over 1024
  characters, ``.``/``..``, ``/``, ``\\`` and control characters). The policy's own regex is kept
  in ``x-stagedoor-pattern``.
- Routes that need credentials use the ``backstage`` bearer scheme; ``unauthenticated`` routes
  say ``security: []``.
- Errors stagedoor produces (docs/behaviour.md) are described per status: 400, 404, 405 and 431
  (request head over the limits) always; 401, 403 and 503 where credentials are checked; 502 and
  504 where the route forwards; 413 where a body is passed on. What the
  upstream answers is passed through unchanged, so a forwarding route documents it as
  ``default`` with no schema: stagedoor cannot know it. (An upstream answering one of the error
  statuses above with a body of its own is not described by the error schema.)
- Nothing internal leaks: no upstream URL, no file path.

Not expressed: a parameter value equal to a literal sibling segment (``/items/new`` next to
``/items/{id}``) is routed to the literal route, as the router prefers literals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .config import Config, ConfigError, MissingConfigError, load_config
from .decide import API_PREFIX, Answer, Context, Decision, Deny
from .errors import ERROR_NAMES, JSON_CONTENT_TYPE, ApiError
from .policy import (
    HTTP_METHODS,
    MAX_PARAM_LENGTH,
    LocalResponse,
    PluginPolicy,
    PolicySet,
    Route,
    load_policies,
)
from .query import MAX_VALUE_LENGTH as MAX_QUERY_VALUE_LENGTH

log = logging.getLogger("stagedoor.openapi")

OPENAPI_VERSION = "3.1.0"
SELF_PATH = "/.stagedoor/openapi.json"  # under /api/<pluginId>
SERVE_KEY = "stagedoor.openapi.serve"
SECURITY_SCHEME = "backstage"
ERROR_SCHEMA = "ErrorBody"

# Values the gateway refuses whatever a parameter's regex says (routing.py, policy.ParamRule).
_REFUSED_CHARACTERS = r"[/\\\x00-\x1f\x7f]"
_REFUSED_VALUES = [".", ".."]

_ERROR_DESCRIPTIONS = {
    400: "Invalid request path, path or query parameter, or request body (InputError).",
    401: "Missing or invalid credentials (AuthenticationError); checked before routing.",
    403: "The credentials are valid but not allowed here: principal kind, access restrictions "
         "or permission (NotAllowedError).",
    404: "No such route (NotFoundError).",
    405: "Method not allowed on this path (MethodNotAllowedError); `Allow` lists the methods.",
    413: "The request body is over the route's `body.maxBytes` or "
         "`stagedoor.limits.maxBodyBytes` (PayloadTooLargeError).",
    415: "The request body is not of the route's `body.contentType`, or is compressed "
         "(UnsupportedMediaTypeError).",
    431: "The request line and header fields are over `stagedoor.limits.maxHeaderBytes` (or "
         "more than `maxHeaderCount` fields): RequestHeaderFieldsTooLargeError. Long parameter "
         "values can add up to this even when each is within its own `maxLength`.",
    502: "The upstream could not be reached, or answered something other than JSON where the "
         "route expects JSON (BadGatewayError).",
    503: "A key source (JWKS) is unavailable and no usable key is cached "
         "(ServiceUnavailableError); retry after `Retry-After` seconds.",
    504: "The upstream did not answer within the route's timeout (GatewayTimeoutError).",
}
_ERROR_HEADERS = {
    401: ("WWW-Authenticate", "Always `Bearer`.", {"type": "string"}),
    405: ("Allow", "The methods this path serves.", {"type": "string"}),
    503: ("Retry-After", "Seconds to wait before retrying.", {"type": "string",
                                                              "pattern": "^[0-9]+$"}),
}


# -- regex translation -----------------------------------------------------------------------------
class PatternNotTranslatable(ValueError):
    """A policy regex uses Python-only syntax with no ECMA-262 equivalent (inline flags, ...)."""


_SYNTAX = frozenset("^$\\.*+?()[]{}|/")  # ECMA-262 SyntaxCharacter plus '/'
_QUANTIFIER = re.compile(r"\{(\d*)(?:(,)(\d*))?\}")
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OCTAL3 = re.compile(r"[0-7]{3}")


def _char(code: int) -> str:
    """An escape for one character, valid in Python and in ECMA-262 (``u`` flag or not)."""
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return chr(code)  # astral: a literal code point reads the same in both


def _literal(ch: str, in_class: bool) -> str:
    """``ch`` as a literal, escaped only where either dialect would read it as syntax."""
    if ch in _SYNTAX or (in_class and ch == "-"):
        return "\\" + ch
    return ch


def _escape(p: str, i: int, in_class: bool) -> tuple[str, int]:
    """Translate the escape starting at ``p[i] == '\\'``; returns (text, next index)."""
    if i + 1 >= len(p):
        raise PatternNotTranslatable("trailing backslash")
    c = p[i + 1]
    if c in "dDwWsS":
        return "\\" + c, i + 2
    if c in "nrtfv":
        return "\\" + c, i + 2
    if c == "a":
        return "\\x07", i + 2
    if c == "b":
        return ("\\x08", i + 2) if in_class else ("\\b", i + 2)
    if c == "B" and not in_class:
        return "\\B", i + 2
    if c == "A" and not in_class:
        return "^", i + 2
    if c == "Z" and not in_class:
        return "$", i + 2
    if c == "x":
        return _char(int(p[i + 2:i + 4], 16)), i + 4
    if c == "u":
        return _char(int(p[i + 2:i + 6], 16)), i + 6
    if c == "U":
        return _char(int(p[i + 2:i + 10], 16)), i + 10
    if c == "N":
        end = p.index("}", i)
        return _char(ord(unicodedata.lookup(p[i + 3:end]))), end + 1
    if c.isdigit():
        if c == "0":
            match = re.match(r"0[0-7]{0,2}", p[i + 1:])
            assert match is not None
            return _char(int(match.group(0), 8)), i + 1 + len(match.group(0))
        if _OCTAL3.match(p, i + 1):
            return _char(int(p[i + 1:i + 4], 8)), i + 4
        match = re.match(r"[1-9][0-9]?", p[i + 1:])
        assert match is not None
        if in_class:
            raise PatternNotTranslatable("a backreference inside a character class")
        return "\\" + match.group(0), i + 1 + len(match.group(0))
    if c.isascii() and c.isalpha():
        raise PatternNotTranslatable(f"escape \\{c}")
    return _literal(c, in_class), i + 2


def _char_class(p: str, i: int) -> tuple[str, int]:
    """Translate ``[...]`` starting at ``p[i] == '['``."""
    out = ["["]
    i += 1
    if i < len(p) and p[i] == "^":
        out.append("^")
        i += 1
    first = True
    while i < len(p):
        c = p[i]
        if c == "]" and not first:
            out.append("]")
            return "".join(out), i + 1
        if c == "\\":
            text, i = _escape(p, i, True)
            out.append(text)
        elif c == "-":
            out.append("-")  # a range, or a literal dash at either end: the same in both
            i += 1
        elif c in "[]^":
            out.append("\\" + c)
            i += 1
        else:
            out.append(c)
            i += 1
        first = False
    raise PatternNotTranslatable("unterminated character class")


def _translate(p: str) -> str:
    out: list[str] = []
    names: dict[str, int] = {}
    groups = 0
    i = 0
    quantified = False  # the previous token was a quantifier (for lazy/possessive suffixes)
    while i < len(p):
        c = p[i]
        was_quantified, quantified = quantified, False
        if c == "\\":
            text, i = _escape(p, i, False)
            out.append(text)
        elif c == "[":
            text, i = _char_class(p, i)
            out.append(text)
        elif c == "(":
            if p.startswith("(?P<", i):
                end = p.index(">", i)
                groups += 1
                names[p[i + 4:end]] = groups
                out.append("(")
                i = end + 1
            elif p.startswith("(?P=", i):
                end = p.index(")", i)
                out.append(f"(?:\\{names[p[i + 4:end]]})")  # (?:) keeps a digit after it apart
                i = end + 1
            elif p.startswith("(?#", i):
                i = p.index(")", i) + 1
            elif p.startswith(("(?:", "(?=", "(?!"), i):
                out.append(p[i:i + 3])
                i += 3
            elif p.startswith(("(?<=", "(?<!"), i):
                out.append(p[i:i + 4])
                i += 4
            elif p.startswith("(?", i):
                raise PatternNotTranslatable(
                    f"the group {p[i:i + 4]!r}... (inline flags, conditionals and atomic groups "
                    "have no ECMA-262 form)")
            else:
                groups += 1
                out.append("(")
                i += 1
        elif c == ".":
            out.append("[^\\n]")  # Python's '.'; ECMA's also refuses \r, U+2028 and U+2029
            i += 1
        elif c in "*+?":
            if was_quantified and c == "?":
                out.append("?")  # lazy
            elif was_quantified:
                raise PatternNotTranslatable("possessive quantifiers have no ECMA-262 form")
            else:
                out.append(c)
                quantified = True
            i += 1
        elif c == "{":
            match = _QUANTIFIER.match(p, i)
            if match and (match.group(1) or match.group(2)):
                low, comma, high = match.group(1) or "0", match.group(2) or "", match.group(3)
                out.append("{" + low + comma + (high or "") + "}")
                quantified = True
                i = match.end()
            else:
                out.append("\\{")
                i += 1
        elif c in "}]":
            out.append("\\" + c)  # literal in Python here, a syntax error in ECMA-262
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _anchored(text: str) -> bool:
    """True when ``text`` can only match a whole string: ``^...$``, no alternation anywhere."""
    if not text.startswith("^") or not text.endswith("$") or "|" in text:
        return False
    backslashes = len(text[:-1]) - len(text[:-1].rstrip("\\"))
    return backslashes % 2 == 0 and len(text) > 1


def ecma_pattern(python_regex: str) -> str:
    """A JSON Schema ``pattern`` (ECMA-262, unanchored search) accepting exactly the strings
    ``re.fullmatch(python_regex, s)`` accepts, and also a valid Python regex (schema tooling
    written in Python reads it with ``re``).

    ``\\d``, ``\\w`` and ``\\s`` are kept: Python reads them as Unicode classes, ECMA-262 as
    ASCII ones (a client validating with ECMA semantics is then stricter than the gateway).
    Raises :class:`PatternNotTranslatable` for syntax with no ECMA-262 form.
    """
    re.compile(python_regex)  # a policy regex is valid by construction; fail loudly if not
    text = _translate(python_regex)
    if not _anchored(text):
        text = f"^(?:{text})$"
    try:
        re.compile(text)
    except re.error as exc:  # pragma: no cover - a translation bug, not a user error
        raise PatternNotTranslatable(f"translation {text!r} is not a valid regex: {exc}") from None
    return text


# -- the document ----------------------------------------------------------------------------------
def error_body_schema() -> dict[str, Any]:
    """JSON Schema of the error body (docs/behaviour.md): exactly these keys, no stack."""

    def strict(**properties: Any) -> dict[str, Any]:
        return {"type": "object", "required": list(properties), "properties": properties,
                "additionalProperties": False}

    return {
        **strict(
            error=strict(name={"type": "string"}, message={"type": "string"}),
            request=strict(method={"type": "string"},
                           url={"type": "string",
                                "description": "Relative to the plugin mount, still "
                                               "percent-encoded, query included."}),
            response=strict(statusCode={"type": "integer"}),
        ),
        "description": "Backstage's error body, for every error stagedoor produces.",
    }


def error_response(status: int, with_content: bool = True) -> dict[str, Any]:
    """The response object of one error status (``with_content=False``: for HEAD)."""
    name = ERROR_NAMES[status]
    response: dict[str, Any] = {"description": _ERROR_DESCRIPTIONS[status]}
    if status in _ERROR_HEADERS:
        header, text, schema = _ERROR_HEADERS[status]
        response["headers"] = {header: {"description": text, "required": True,
                                        "schema": schema}}
    if with_content:
        response["content"] = {"application/json": {"schema": {"allOf": [
            {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"},
            {"properties": {"error": {"properties": {"name": {"const": name}}},
                            "response": {"properties": {"statusCode": {"const": status}}}}},
        ]}}}
    return response


def _media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower() or "application/octet-stream"


def _local_response(local: LocalResponse, with_content: bool) -> dict[str, Any]:
    response: dict[str, Any] = {"description": "Answered by stagedoor itself."}
    headers = {name: {"required": True, "schema": {"type": "string", "const": value}}
               for name, value in local.headers if name.lower() != "content-type"}
    if headers:
        response["headers"] = headers
    if with_content:
        ctype = next((v for k, v in local.headers if k.lower() == "content-type"),
                     "application/octet-stream")
        media = _media_type(ctype)
        schema: dict[str, Any]
        if media == "application/json" or media.endswith("+json"):
            try:
                schema = {"const": json.loads(local.body)}
            except ValueError:
                schema = {}
        else:
            schema = {"type": "string", "example": local.body.decode("utf-8", "replace")}
        response["content"] = {media: {"schema": schema}}
    return response


def _either(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """One status, two possible answers (a local 404 and stagedoor's own 404, say)."""
    merged: dict[str, Any] = {"description": f"{first['description']} Or: "
                                             f"{second['description']}"}
    content: dict[str, Any] = dict(second.get("content", {}))
    for media, spec in first.get("content", {}).items():
        if media in content:
            content[media] = {"schema": {"anyOf": [spec["schema"], content[media]["schema"]]}}
        else:
            content[media] = spec
    if content:
        merged["content"] = content
    headers = {**second.get("headers", {}), **first.get("headers", {})}
    if headers:  # no header is certain any more
        merged["headers"] = {k: {**v, "required": False} for k, v in headers.items()}
    return merged


def _segments(route: Route) -> list[tuple[str, str | None]]:
    """(literal text, None) or ("", parameter name) per segment of the route's template."""
    names = iter(route.template.param_names)
    return [(part, None) if part is not None else ("", next(names))
            for part in route.template.parts]


def _path_key(plugin_id: str, route: Route) -> str:
    segs = "".join("/" + (f"{{{name}}}" if name else part) for part, name in _segments(route))
    return f"{API_PREFIX}{plugin_id}{segs}"


class _Builder:
    """Collects paths, the shared responses they use, unique operation ids and warnings."""

    def __init__(self, warnings: list[str]) -> None:
        self.warnings = warnings
        self.operation_ids: set[str] = set()
        self.responses: dict[str, dict[str, Any]] = {}  # components.responses actually used

    # -- pieces ----------------------------------------------------------------------------------
    def error_ref(self, status: int, with_content: bool) -> dict[str, Any]:
        name = ERROR_NAMES[status] + ("" if with_content else "NoBody")
        if name not in self.responses:
            self.responses[name] = error_response(status, with_content)
        return {"$ref": f"#/components/responses/{name}"}

    def operation_id(self, method: str, plugin_id: str, route: Route) -> str:
        words = [method.lower(), plugin_id]
        words += [f"by_{name}" if name else part for part, name in _segments(route)]
        base = re.sub(r"[^A-Za-z0-9_]+", "_", "_".join(words)).strip("_")
        candidate, n = base, 2
        while candidate in self.operation_ids:
            candidate, n = f"{base}_{n}", n + 1
        self.operation_ids.add(candidate)
        return candidate

    def param_schema(self, route: Route, name: str) -> dict[str, Any]:
        rule = route.params[name]
        schema: dict[str, Any] = {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_PARAM_LENGTH,
            "not": {"anyOf": [{"enum": list(_REFUSED_VALUES)},
                              {"pattern": _REFUSED_CHARACTERS}]},
        }
        try:
            schema["pattern"] = ecma_pattern(rule.pattern.pattern)
        except PatternNotTranslatable as exc:
            warning = (f"{route.file}:{route.line}: parameter '{name}' of {route.path}: regex "
                       f"{rule.pattern.pattern!r} left out of the document: {exc}")
            if warning not in self.warnings:  # once, not once per method
                self.warnings.append(warning)
        return schema

    def query_parameters(self, route: Route) -> list[dict[str, Any]]:
        """The route's declared query parameters (only these reach the upstream)."""
        out = []
        others = {"drop": "Undeclared query parameters are dropped.",
                  "reject": "Undeclared query parameters are refused with 400.",
                  "forward": "Undeclared query parameters are passed on re-encoded."}
        for rule in route.query.rules:
            value: dict[str, Any] = {"type": "string", "maxLength": MAX_QUERY_VALUE_LENGTH}
            try:
                value["pattern"] = ecma_pattern(rule.pattern.pattern)
            except PatternNotTranslatable as exc:
                warning = (f"{route.file}:{route.line}: query parameter '{rule.name}' of "
                           f"{route.path}: regex {rule.pattern.pattern!r} left out of the "
                           f"document: {exc}")
                if warning not in self.warnings:
                    self.warnings.append(warning)
            message = rule.message or f"Invalid query parameter '{rule.name}': {{value}}"
            param: dict[str, Any] = {
                "name": rule.name,
                "in": "query",
                "required": rule.required,
                "description": f"Full match of the decoded value against "
                               f"`{rule.pattern.pattern}`; otherwise 400 \"{message}\". "
                               + ("May be repeated. " if rule.repeated else "")
                               + others[route.query.unknown],
                "schema": {"type": "array", "items": value, "minItems": 1} if rule.repeated
                else value,
                "x-stagedoor-pattern": rule.pattern.pattern,
            }
            if rule.repeated:
                param.update(style="form", explode=True)
            out.append(param)
        return out

    # -- operations ------------------------------------------------------------------------------
    def operation(self, plugin_id: str, route: Route, method: str,
                  key_names: tuple[str, ...]) -> dict[str, Any]:
        head = method == "HEAD"
        forwards = route.upstream is not None
        op: dict[str, Any] = {
            "tags": [plugin_id],
            "operationId": self.operation_id(method, plugin_id, route),
            "summary": f"{method} {route.path}" + (" (forwarded to the upstream)" if forwards
                                                   else " (answered by stagedoor)"),
        }
        notes = []
        if head:
            notes.append(f"Served wherever GET is: the answer of GET {route.path}, no body.")
        kinds = sorted(route.auth)
        if kinds == ["user"]:
            notes.append("Needs a Backstage user token; service credentials get 403.")
        elif kinds == ["service"]:
            notes.append("Needs service credentials (a plugin or external access token); "
                         "user tokens get 403.")
        if notes:
            op["description"] = " ".join(notes)

        params = []
        for key_name, name in zip(key_names, route.template.param_names, strict=True):
            rule = route.params[name]
            params.append({
                "name": key_name,
                "in": "path",
                "required": True,
                "description": f"Full match of the percent-decoded value against "
                               f"`{rule.pattern.pattern}`; otherwise 400 \"{rule.message}\".",
                "schema": self.param_schema(route, name),
                "x-stagedoor-pattern": rule.pattern.pattern,
            })
        params.extend(self.query_parameters(route))
        if params:
            op["parameters"] = params
        body = route.body
        if body is not None and method not in ("GET", "HEAD"):
            limit = f" of at most {body.max_bytes} bytes" if body.max_bytes else ""
            op["requestBody"] = {
                "required": True,
                "description": f"A {body.content_type} body{limit}, checked before it is "
                               "forwarded: another type is a 415, a larger one a 413, one that "
                               "is not valid against the schema a 400.",
                "content": {body.content_type: {"schema": body.schema or {}}},
            }
        elif forwards and method in ("POST", "PUT", "PATCH", "DELETE"):
            op["requestBody"] = {"required": False,
                                 "description": "Passed to the upstream unchanged.",
                                 "content": {"application/json": {"schema": {}}}}

        statuses = [400, 404, 405, 431]
        if not route.unauthenticated:
            statuses += [401, 403, 503]
        if forwards:
            statuses += [502, 504]
        if "requestBody" in op:
            statuses.append(413)
        if body is not None and "requestBody" in op:
            statuses.append(415)
        responses: dict[str, Any] = {str(s): self.error_ref(s, not head) for s in statuses}
        if route.respond is not None:
            key = str(route.respond.status)
            local = _local_response(route.respond, not head)
            if key in responses:
                local = _either(local, error_response(route.respond.status, not head))
            responses[key] = local
        else:
            responses["default"] = {"description": "The upstream's answer, passed through "
                                                   "unchanged (status, headers and body)."}
        op["responses"] = dict(sorted(responses.items()))

        op["security"] = [] if route.unauthenticated else [{SECURITY_SCHEME: []}]
        if not route.unauthenticated:
            op["x-stagedoor-auth"] = kinds
        permission = getattr(route, "permission", None)
        if permission:
            op["x-stagedoor-permission"] = permission
        return op

    def self_operation(self, plugin_id: str, method: str) -> dict[str, Any]:
        ok: dict[str, Any] = {"description": "This document, for this plugin."}
        if method == "GET":
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        base = f"{method.lower()}_{plugin_id}_stagedoor_openapi".replace("-", "_")
        candidate, n = base, 2
        while candidate in self.operation_ids:
            candidate, n = f"{base}_{n}", n + 1
        self.operation_ids.add(candidate)
        return {
            "tags": [plugin_id],
            "operationId": candidate,
            "summary": f"The OpenAPI description of /api/{plugin_id}",
            "security": [],
            "responses": {"200": ok},
        }

    def plugin_paths(self, policy: PluginPolicy, serve_self: bool) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        # Routes of one shape (GET /items/{name}, DELETE /items/{id}) are one OpenAPI path,
        # named by the first route's parameter names.
        key_by_shape: dict[tuple[str | None, ...], tuple[str, tuple[str, ...]]] = {}
        implicit_head = []
        for route in policy.routes:
            key, key_names = key_by_shape.setdefault(
                route.template.shape,
                (_path_key(policy.plugin_id, route), route.template.param_names))
            item = paths.setdefault(key, {})
            for method in route.methods:
                item[method.lower()] = self.operation(policy.plugin_id, route, method, key_names)
            if "GET" in route.methods:
                implicit_head.append((item, route, key_names))
        for item, route, key_names in implicit_head:  # a route declaring HEAD itself wins
            if "head" not in item:
                item["head"] = self.operation(policy.plugin_id, route, "HEAD", key_names)
        order = {m.lower(): i for i, m in enumerate(HTTP_METHODS)}
        paths = {k: dict(sorted(v.items(), key=lambda kv: order[kv[0]]))
                 for k, v in paths.items()}
        if serve_self:
            own = f"{API_PREFIX}{policy.plugin_id}{SELF_PATH}"
            if own in paths:
                self.warnings.append(f"{policy.file}: route {SELF_PATH} is shadowed by the "
                                     "served OpenAPI document (stagedoor.openapi.serve)")
            paths[own] = {m.lower(): self.self_operation(policy.plugin_id, m)
                          for m in ("GET", "HEAD")}
        return paths


def build_document(policies: PolicySet, *, plugin_ids: Iterable[str] | None = None,
                   serve_self: bool = False,
                   warnings: list[str] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``plugin_ids`` (default: every plugin), as a dict.

    ``serve_self`` adds the ``/.stagedoor/openapi.json`` operations (when the sidecar serves
    them). Regexes that cannot be expressed are left out and reported in ``warnings``.
    Raises KeyError for an unknown plugin id.
    """
    builder = _Builder([] if warnings is None else warnings)
    wanted = sorted(policies.plugins) if plugin_ids is None else list(plugin_ids)
    unknown = [p for p in wanted if p not in policies.plugins]
    if unknown:
        raise KeyError(f"no policy for plugin(s) {', '.join(unknown)}")
    paths: dict[str, Any] = {}
    for plugin_id in wanted:
        paths.update(builder.plugin_paths(policies.plugins[plugin_id], serve_self))
    digest = hashlib.sha256(json.dumps(paths, sort_keys=True).encode()).hexdigest()[:12]
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "stagedoor: " + ", ".join(f"/api/{p}" for p in wanted),
            "version": digest,
            "description": (
                "Generated by stagedoor from its policies. Every route needs a Backstage "
                "credential unless its operation says `security: []`; credentials are checked "
                "before routing, so an unknown route or method without them is 401. Errors "
                f"stagedoor produces are `{JSON_CONTENT_TYPE}` with the `{ERROR_SCHEMA}` shape. "
                "A forwarded route passes the upstream's answer through unchanged (its "
                "`default` response)."
            ),
        },
        "tags": [{"name": p} for p in wanted],
        "paths": paths,
        "components": {
            "schemas": {ERROR_SCHEMA: error_body_schema()},
            "responses": dict(sorted(builder.responses.items())),
            "securitySchemes": {SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "A Backstage user token, a plugin token addressed to this "
                               "plugin, or an external access token (static, legacy or JWKS).",
            }},
        },
    }


def render(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"


# -- loading for the command line -----------------------------------------------------------------
UNSET_UPSTREAM = "http://config-value-not-set.invalid"


class _DocumentConfig(Config):
    """Upstream addresses never appear in the document, so a ``${...}`` in an ``upstream`` whose
    config value is unset is no reason to refuse generating it (``stagedoor check`` still is)."""

    def require_string(self, key: str) -> str:
        try:
            return super().require_string(key)
        except MissingConfigError:
            return UNSET_UPSTREAM


def load_for_document(policy_dir: str | Path, config_files: list[str]) -> tuple[PolicySet, Config]:
    """Policies and config as ``stagedoor openapi`` reads them.

    Raises ConfigError (an unreadable config file) or PolicyLoadError (a broken policy).
    """
    loaded = load_config(list(config_files))
    config = _DocumentConfig(data=loaded.data, origins=loaded.origins, files=loaded.files)
    return load_policies(policy_dir, config), loaded


# -- serving it ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServedDocuments:
    """The documents ``GET /api/<pluginId>/.stagedoor/openapi.json`` answers with, rendered once
    per load (they are part of the frozen state); empty when ``stagedoor.openapi.serve`` is
    off."""

    serve: bool = False
    bodies: Mapping[str, LocalResponse] = field(default_factory=dict)

    @classmethod
    def build(cls, policies: PolicySet, config: Config) -> ServedDocuments:
        try:
            serve = config.get_bool(SERVE_KEY, False)
        except ConfigError as exc:  # refuse to serve rather than refuse to start
            log.error("openapi: not serving the document: %s", exc)
            serve = False
        bodies: dict[str, LocalResponse] = {}
        if serve:
            headers = (("Content-Type", JSON_CONTENT_TYPE), ("Cache-Control", "no-cache"))
            for plugin_id in policies.plugins:
                warnings: list[str] = []
                doc = build_document(policies, plugin_ids=[plugin_id], serve_self=True,
                                     warnings=warnings)
                for warning in warnings:
                    log.warning("openapi: %s", warning)
                bodies[plugin_id] = LocalResponse(200, render(doc), headers)
        return cls(serve, MappingProxyType(bodies))

    def answer(self, method: str, target: str) -> Decision | None:
        """The local answer for the document's path (no credentials); None for every other
        request. Per request: one substring test and, on a hit, a dict lookup."""
        if not self.serve or SELF_PATH not in target:
            return None
        path = target.partition("?")[0]
        if not path.startswith(API_PREFIX) or not path.endswith(SELF_PATH):
            return None
        plugin_id = path[len(API_PREFIX):-len(SELF_PATH)]
        local = self.bodies.get(plugin_id)
        if local is None:
            return None
        context = Context(target[len(API_PREFIX) + len(plugin_id):], plugin_id)
        if method not in ("GET", "HEAD"):
            return Deny(context, ApiError(405, f"Method {method} is not allowed; allowed: "
                                               "GET, HEAD", headers=(("Allow", "GET, HEAD"),)),
                        "method")
        return Answer(context, local)
