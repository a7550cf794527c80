"""Query parameters: only what a route declares reaches the upstream, validated and re-encoded.

A Backstage backend plugin builds its upstream URL itself, so the client's query string never
reaches the upstream as sent. A route declares its parameters (``query:``); each value is
percent-decoded (``+`` is a space, as Express reads it), fully matched by the parameter's regex
and encoded again for the upstream. What the route does not declare is dropped (the default),
refused (``unknownQuery: reject``) or re-encoded and passed on (``unknownQuery: forward``). A
route's fixed upstream query (``upstream.query``) is added last and always wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

UNKNOWN_QUERY_MODES = ("drop", "reject", "forward")
#: More pairs than this in one query string is a 400 (parse_qsl's own guard).
MAX_QUERY_FIELDS = 256
MAX_VALUE_LENGTH = 2048


class QueryRejected(Exception):
    """The query string is not acceptable: ``message`` is the 400 InputError message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class QueryRule:
    """One declared query parameter."""

    name: str
    pattern: re.Pattern[str]
    required: bool = False
    repeated: bool = False
    message: str = ""

    def check(self, value: str) -> str | None:
        """None when ``value`` (decoded) is acceptable, else the client-facing message."""
        if len(value) <= MAX_VALUE_LENGTH and self.pattern.fullmatch(value) is not None:
            return None
        template = self.message or f"Invalid query parameter '{self.name}': {{value}}"
        return template.replace("{value}", value)


@dataclass(frozen=True, slots=True)
class QueryPolicy:
    """A route's query rules: declared parameters, what to do with others, fixed additions.

    ``fixed`` values may be secrets (:class:`~stagedoor.policy.Secret`); ``secret_names`` lists
    the fixed names whose values must never be shown.
    """

    rules: tuple[QueryRule, ...] = ()
    unknown: str = "drop"
    fixed: tuple[tuple[str, str], ...] = ()
    secret_names: frozenset[str] = frozenset()

    def rule(self, name: str) -> QueryRule | None:
        for rule in self.rules:
            if rule.name == name:
                return rule
        return None


@dataclass(frozen=True, slots=True)
class ShapedQuery:
    """What goes upstream: ``text`` (``?a=1&b=2`` or empty), the same with secret values
    masked for logs and ``explain`` (``shown``), and what was left out (names only)."""

    text: str
    shown: str
    kept: tuple[tuple[str, str], ...]  # the client's (name, decoded value) pairs passed on
    dropped: tuple[str, ...]


def _encode(name: str, value: str) -> str:
    return f"{quote(name, safe='')}={quote(value, safe='')}"


def parse_query(raw: str) -> list[tuple[str, str]]:
    """``a=1&b=x%20y`` (no ``?``) -> decoded pairs. Raises :class:`QueryRejected`."""
    if not raw:
        return []
    try:
        return parse_qsl(raw, keep_blank_values=True, strict_parsing=False, encoding="utf-8",
                         errors="strict", max_num_fields=MAX_QUERY_FIELDS)
    except UnicodeDecodeError:
        raise QueryRejected("Invalid query string: not UTF-8") from None
    except ValueError:
        raise QueryRejected(f"Invalid query string: more than {MAX_QUERY_FIELDS} "
                            "parameters") from None


def shape_query(raw: str, policy: QueryPolicy) -> ShapedQuery:
    """The upstream query for a client's raw query string (without ``?``).

    Raises :class:`QueryRejected` for a bad value, a repeated non-repeatable parameter, a
    missing required one, or (``unknown: reject``) an undeclared one.
    """
    pairs = parse_query(raw)
    fixed_names = {name for name, _ in policy.fixed}
    counts: dict[str, int] = {}
    kept: list[tuple[str, str]] = []
    dropped: list[str] = []
    for name, value in pairs:
        rule = policy.rule(name)
        if rule is None:
            if policy.unknown == "reject":
                raise QueryRejected(f"Unknown query parameter '{name}'")
            if policy.unknown == "forward" and name not in fixed_names:
                kept.append((name, value))
            elif name not in dropped:
                dropped.append(name)
            continue
        counts[name] = counts.get(name, 0) + 1
        if counts[name] > 1 and not rule.repeated:
            raise QueryRejected(f"Query parameter '{name}' must not be repeated")
        problem = rule.check(value)
        if problem is not None:
            raise QueryRejected(problem)
        kept.append((name, value))
    for rule in policy.rules:
        if rule.required and rule.name not in counts:
            raise QueryRejected(f"Missing required query parameter '{rule.name}'")
    parts = [_encode(n, v) for n, v in kept]
    shown_parts = list(parts)
    for name, value in policy.fixed:
        parts.append(_encode(name, value))
        shown_parts.append(f"{quote(name, safe='')}=***" if name in policy.secret_names
                           else _encode(name, value))
    text = "?" + "&".join(parts) if parts else ""
    shown = "?" + "&".join(shown_parts) if shown_parts else ""
    return ShapedQuery(text, shown, tuple(kept), tuple(dropped))
