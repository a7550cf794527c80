"""What of an upstream's answer reaches the client: a pure function over header fields.

By default the upstream's ``Set-Cookie``, ``Server`` and ``X-Powered-By`` (and every hop-by-hop
header) stay behind, unless the route lists them under ``response.headers.allow``; a route may
remove more (``response.headers.remove``). stagedoor's security headers always replace the
upstream's copies. ``expect: json`` turns an answer whose Content-Type is not JSON into a 502.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Dropped from upstream answers unless a route allows them.
DEFAULT_DROPPED = ("set-cookie", "server", "x-powered-by")
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "proxy-authorization",
              "proxy-authenticate", "te", "trailer", "upgrade", "transfer-encoding")
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

Fields = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class ResponseRule:
    """A route's ``response:``: header names lower-case."""

    allow: frozenset[str] = frozenset()
    remove: frozenset[str] = frozenset()
    expect_json: bool = False

    def dropped_names(self) -> frozenset[bytes]:
        names = (set(DEFAULT_DROPPED) - self.allow) | self.remove
        return frozenset(name.encode("latin-1") for name in names)


DEFAULT_RESPONSE_RULE = ResponseRule()
_HOP_BY_HOP_B = frozenset(name.encode() for name in HOP_BY_HOP)


def _connection_tokens(fields: Fields) -> set[bytes]:
    return {token.strip().lower() for name, value in fields if name.lower() == b"connection"
            for token in value.split(b",")}


def filter_response_fields(fields: Fields, dropped: frozenset[bytes],
                           security: tuple[tuple[bytes, bytes, bytes], ...]) -> Fields:
    """The upstream's header fields as the client gets them.

    ``dropped``: lower-case names to remove (:meth:`ResponseRule.dropped_names`);
    ``security``: (lower-case name, name, value) of stagedoor's security headers, which replace
    any upstream copy. Framing headers (Content-Length, Transfer-Encoding) are left to the
    proxy, which frames the body for the client.
    """
    listed = _connection_tokens(fields)
    secured = {lower for lower, _, _ in security}
    kept = tuple((name, value) for name, value in fields
                 if (lower := name.lower()) in _FRAMING
                 or (lower not in _HOP_BY_HOP_B and lower not in listed
                     and lower not in dropped and lower not in secured))
    return kept + tuple((name, value) for _, name, value in security)


def content_type_of(fields: Fields) -> str | None:
    for name, value in fields:
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return None
