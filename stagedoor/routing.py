"""Path canonicalisation and the route table.

A request path is split into raw segments, each strictly percent-decoded as UTF-8. Anything
ambiguous (``.``/``..`` segments, encoded or not; ``//``; control bytes; malformed escapes;
overlong UTF-8) is refused before routing, so the path that is authorised is the only one that
can be forwarded: the upstream path is rebuilt from the route's template and re-encoded
parameter values, never copied from the request.

Route templates are compiled once into a segment trie (literal children first, then one
parameter child), so matching costs the same with two routes or ten thousand.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

PARAM_SEGMENT = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# RFC 3986 pchar minus '%': what a literal template segment may hold.
LITERAL_SEGMENT = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@]+$")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_SEGMENTS = 64


class PathRejected(Exception):
    """The request path is ambiguous or malformed: answered with 400, never routed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_segment(raw: str) -> str:
    """Strictly percent-decode one path segment as UTF-8. Raises :class:`PathRejected`."""
    if "%" not in raw:
        decoded = raw
    else:
        if raw.count("%") != len(_ESCAPE.findall(raw)):
            raise PathRejected("malformed percent-escape")
        try:
            decoded = unquote_to_bytes(raw).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise PathRejected("invalid UTF-8 in path") from None
    if decoded in (".", ".."):
        raise PathRejected("dot segment in path")
    if _CONTROL.search(decoded):
        raise PathRejected("control character in path")
    return decoded


def split_segments(raw_path: str) -> list[str]:
    """Raw path (after the plugin mount, starting with '/' or empty) -> decoded segments.

    One trailing slash is ignored (``/services/x/`` routes like ``/services/x``); an empty
    segment anywhere else (``//``) is refused.
    """
    if raw_path in ("", "/"):
        return []
    if not raw_path.startswith("/"):
        raise PathRejected("path does not start with '/'")
    if not raw_path.isascii():
        raise PathRejected("raw non-ASCII byte in path")
    parts = raw_path[1:].split("/")
    if parts[-1] == "":
        parts.pop()
    if len(parts) > MAX_SEGMENTS:
        raise PathRejected("too many path segments")
    segments = []
    for part in parts:
        if part == "":
            raise PathRejected("empty path segment")
        if "\\" in part:
            raise PathRejected("backslash in path")
        segments.append(decode_segment(part))
    return segments


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A compiled route path such as ``/services/{id}``."""

    text: str
    parts: tuple[str | None, ...]  # literal text, or None where a parameter sits
    param_names: tuple[str, ...]  # in order of appearance
    param_positions: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        """Compile a template; raises ValueError with a message a person can act on."""
        if not text.startswith("/"):
            raise ValueError(f"path '{text}' must start with '/'")
        body = text[1:]
        if body.endswith("/"):
            body = body[:-1]
        raw_parts = body.split("/") if body else []
        parts: list[str | None] = []
        names: list[str] = []
        positions: list[int] = []
        for index, part in enumerate(raw_parts):
            match = PARAM_SEGMENT.match(part)
            if match:
                name = match.group(1)
                if name in names:
                    raise ValueError(f"path '{text}' names parameter '{name}' twice")
                names.append(name)
                positions.append(index)
                parts.append(None)
            elif not part:
                raise ValueError(f"path '{text}' has an empty segment")
            elif "{" in part or "}" in part:
                raise ValueError(
                    f"path '{text}': a parameter must be a whole segment, like '/{{id}}'"
                )
            elif part in (".", "..") or not LITERAL_SEGMENT.match(part):
                raise ValueError(f"path '{text}': segment '{part}' is not a plain path segment")
            else:
                parts.append(part)
        return cls(text, tuple(parts), tuple(names), tuple(positions))

    @property
    def shape(self) -> tuple[str | None, ...]:
        """What makes two templates collide: literals and parameter positions."""
        return self.parts

    def bind(self, segments: list[str]) -> dict[str, str]:
        return {name: segments[pos] for name, pos in zip(self.param_names, self.param_positions,
                                                          strict=True)}




@dataclass(slots=True)
class _Node[T]:
    literals: dict[str, _Node[T]] = field(default_factory=dict)
    param: _Node[T] | None = None
    by_method: dict[str, T] | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch[T]:
    """Result of a lookup: the entry for the method, or the methods the path does allow."""

    entry: T | None
    allowed_methods: tuple[str, ...]
    path_entries: tuple[T, ...]  # every entry registered on the matched path (any method)


class RouteTable[T]:
    """Maps (method, decoded segments) to entries registered by :class:`PathTemplate`."""

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self.size = 0

    def add(self, template: PathTemplate, methods: list[str], entry: T) -> T | None:
        """Register ``entry``; returns the entry it collides with (same shape and method)."""
        node = self._root
        for part in template.parts:
            if part is None:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node = node.literals.setdefault(part, _Node())
        if node.by_method is None:
            node.by_method = {}
        for method in methods:
            if method in node.by_method:
                return node.by_method[method]
        for method in methods:
            node.by_method[method] = entry
        self.size += 1
        return None

    def _candidates(self, segments: list[str]) -> Iterator[_Node[T]]:
        """Nodes whose template matches the segments, most specific (literal-first) first."""
        stack: list[tuple[_Node[T], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == len(segments):
                if node.by_method:
                    yield node
                continue
            segment = segments[depth]
            # Push the parameter branch first so the literal branch is explored first.
            if node.param is not None:
                stack.append((node.param, depth + 1))
            child = node.literals.get(segment)
            if child is not None:
                stack.append((child, depth + 1))

    def match(self, method: str, segments: list[str]) -> RouteMatch[T] | None:
        """None when no template matches the path at all (404)."""
        first: _Node[T] | None = None
        for node in self._candidates(segments):
            assert node.by_method is not None
            entry = node.by_method.get(method)
            if entry is None and method == "HEAD":
                entry = node.by_method.get("GET")
            if entry is not None:
                return RouteMatch(entry, (), tuple(node.by_method.values()))
            if first is None:
                first = node
        if first is None:
            return None
        assert first.by_method is not None
        allowed = set(first.by_method)
        if "GET" in allowed:
            allowed.add("HEAD")
        return RouteMatch(None, tuple(sorted(allowed)), tuple(first.by_method.values()))
