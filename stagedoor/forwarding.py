"""The forwarding header policy: what goes upstream, and what goes back to the client.

Pure functions over raw header fields (``(name, value)`` byte pairs, in order, as they came):
no mitmproxy, no I/O. The gateway hands them the fields it has and applies what they return.

Upstream (:func:`upstream_fields`), in this order:

1. dropped from the client's fields: hop-by-hop headers and any header the client lists in
   ``Connection`` (RFC 9110, 7.6.1), ``Authorization`` (the caller's credential never leaves
   the sidecar), ``Forwarded`` and every ``X-Forwarded-*`` (never trusted), headers some
   upstream frameworks read as "the real method / URL / client" (:data:`CLIENT_OVERRIDES`),
   ``X-Stagedoor-*``, every header an identity mutator sets, and every header the route sets.
   Framing headers (``Content-Length``, ``Transfer-Encoding``) always stay: the body is
   forwarded as it came.
2. added: the identity of the verified caller (the route's identity mutator,
   :mod:`stagedoor.identity`: plain headers, a signed JWT or a Backstage plugin token), the
   route's own headers (``extra``), ``X-Forwarded-For`` /
   ``-Proto`` / ``-Host`` from what the sidecar saw, ``X-Request-Id``, and ``Host`` of the
   upstream.

Back to the client (:func:`client_fields`): an upstream's hop-by-hop headers are dropped (the
proxy frames the answer itself), the response filter runs (``ForwardingPolicy.
response_filter``), the security headers are added where the answer has none of that name,
``Connection: close`` is echoed when the client asked for it, and ``X-Request-Id`` is set.

Extension points: the identity mutator (per route, :meth:`stagedoor.runtime.State.
identity_for`); and fields of :class:`ForwardingPolicy` (built once per load):
``response_filter`` (e.g.
``Set-Cookie`` / ``Server`` / ``X-Powered-By`` dropped unless a route allows them),
``protected_name`` (how a header name is compared against the protected names: e.g. ``_``
read as ``-``, so ``X_Forwarded_For`` is dropped too), and the route-configured upstream
headers passed per request as ``extra``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .identity import Caller, Mutator

Field = tuple[bytes, bytes]
Fields = tuple[Field, ...]
#: (lowercase name, name, value), encoded once per load.
SecurityFields = tuple[tuple[bytes, bytes, bytes], ...]

HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "proxy-authorization",
              "proxy-authenticate", "te", "trailer", "upgrade")
FRAMING = ("content-length", "transfer-encoding")
# Headers some upstream frameworks read as "the real method / URL / client": honouring them
# would run another method or path than the one authorised, or trust a client-set address.
CLIENT_OVERRIDES = frozenset({
    "x-http-method-override", "x-http-method", "x-method-override", "x-original-method",
    "x-original-url", "x-original-uri", "x-rewrite-url", "x-override-url",
    "x-real-ip", "true-client-ip", "x-client-ip", "x-cluster-client-ip", "client-ip",
})
#: Name prefixes a client can never send upstream.
DROPPED_PREFIXES = ("x-stagedoor-", "x-forwarded-")

_HOP_BY_HOP_B = frozenset(name.encode() for name in HOP_BY_HOP)
_FRAMING_B = frozenset(name.encode() for name in FRAMING)
_REQUEST_DROP_B = frozenset(name.encode() for name in (*HOP_BY_HOP, *CLIENT_OVERRIDES,
                                                       "authorization", "forwarded"))
_REQUEST_DROP_PREFIXES_B = tuple(prefix.encode() for prefix in DROPPED_PREFIXES)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_REQUEST_IDS = random.Random()  # our own instance: random.seed() elsewhere cannot touch it


def encode(text: str) -> bytes:
    """How mitmproxy's ``Headers`` encode a str name or value."""
    return text.encode("utf-8", "surrogateescape")


# -- extension points ------------------------------------------------------------------------------
def same_name(lower: bytes) -> bytes:
    """The default ``protected_name``: a lowercased name compares as it is."""
    return lower


@dataclass(frozen=True, slots=True)
class ForwardingPolicy:
    """What one load decided about headers (part of the frozen state)."""

    security: SecurityFields = ()
    #: Applied to an upstream's answer before the security headers are added.
    response_filter: Callable[[Fields], Fields] | None = None
    #: Maps a lowercased client header name to the name it is checked as against the
    #: protected names (identity, overrides, X-Forwarded-*...).
    protected_name: Callable[[bytes], bytes] = same_name

    #: The security headers can take the one-pass route of :func:`forwarded_fields` (none of
    #: them is hop-by-hop or X-Request-Id, and there is no response filter).
    one_pass: bool = field(init=False, default=False)
    secured: frozenset[bytes] = field(init=False, default=frozenset())  # their lowercase names

    def __post_init__(self) -> None:
        object.__setattr__(self, "secured", frozenset(lower for lower, _, _ in self.security))
        object.__setattr__(self, "one_pass", self.response_filter is None and not any(
            lower in _HOP_BY_HOP_B or lower in (b"connection", b"x-request-id")
            for lower, _, _ in self.security))

    @classmethod
    def from_settings(cls, security_headers: dict[str, str]) -> ForwardingPolicy:
        return cls(security=encode_security(security_headers))


def encode_security(headers: dict[str, str]) -> SecurityFields:
    return tuple((encode(name.lower()), encode(name), encode(value))
                 for name, value in headers.items())


# -- what goes upstream ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Client:
    """What the sidecar itself saw of the client (never what the client claims)."""

    address: str  # the peer's IP address, "" when unknown
    tls: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamHead:
    fields: Fields
    client_close: bool  # the client listed "close" in Connection: echo it on the answer


def connection_tokens(fields: Iterable[Field]) -> set[bytes]:
    """The lowercased names listed in ``Connection`` headers (RFC 9110, 7.6.1)."""
    return {token.strip().lower() for name, value in fields if name.lower() == b"connection"
            for token in value.split(b",")}


def upstream_fields(fields: Sequence[Field], *, identity: Mutator, caller: Caller, host: str,
                    client: Client, policy: ForwardingPolicy,
                    extra: Fields = ()) -> UpstreamHead:
    """The header fields to send upstream for a forwarded request (see the module docstring).

    ``identity`` makes the caller's identity headers (it may raise
    :class:`~stagedoor.identity.IdentityError`); ``host``: the upstream's ``Host`` value;
    ``extra``: headers the route sets upstream (a client's headers of those names are dropped
    first).

    One pass over the client's fields, each name lowercased once: the result is what
    :func:`set_field` for ``X-Request-Id`` and then ``Host`` over the kept fields would give
    (the first copy replaced in place, the others dropped, appended when absent).
    """
    lowers = [name.lower() for name, _ in fields]
    listed = connection_tokens(fields) if b"connection" in lowers else set()
    protect = policy.protected_name
    plain = protect is same_name
    made = identity.fields(caller)  # first: a caller it cannot speak for stops everything
    identity_names = identity.names
    own = {name.lower() for name, _ in extra} if extra else ()
    request_id = encode(caller.request_id)
    upstream_host = encode(host)
    kept: list[Field] = []
    hosts: list[bytes] = []
    id_set = host_set = False
    for (name, value), lower in zip(fields, lowers, strict=True):
        if lower in _FRAMING_B:
            kept.append((name, value))
            continue
        if lower == b"host":
            hosts.append(value)
        checked = lower if plain else protect(lower)
        if (checked in _REQUEST_DROP_B or lower in listed or checked in identity_names
                or checked in own or checked.startswith(_REQUEST_DROP_PREFIXES_B)):
            continue
        if lower == b"host":
            if host_set:
                continue
            host_set = True
            kept.append((name, upstream_host))
            continue
        if lower == b"x-request-id":
            if id_set:
                continue
            id_set = True
            kept.append((name, request_id))
            continue
        kept.append((name, value))
    for name, value in (*made, *extra):  # a few fields: the same rules for Host and the id
        lower = name.lower()
        if lower == b"host":
            if not host_set:
                host_set = True
                kept.append((name, upstream_host))
        elif lower == b"x-request-id":
            if not id_set:
                id_set = True
                kept.append((name, request_id))
        else:
            kept.append((name, value))
    kept.append((b"X-Forwarded-For", encode(client.address)))
    kept.append((b"X-Forwarded-Proto", b"https" if client.tls else b"http"))
    if hosts:
        kept.append((b"X-Forwarded-Host", b", ".join(hosts)))
    if not id_set:
        kept.append((b"X-Request-Id", request_id))
    if not host_set:
        kept.append((b"Host", upstream_host))
    return UpstreamHead(tuple(kept), b"close" in listed)


# -- what goes back to the client ------------------------------------------------------------------
def without_hop_by_hop(fields: Sequence[Field]) -> Fields:
    """An upstream answer's fields without its hop-by-hop headers (framing kept)."""
    listed = connection_tokens(fields)
    return tuple((name, value) for name, value in fields
                 if (lower := name.lower()) in _FRAMING_B
                 or (lower not in _HOP_BY_HOP_B and lower not in listed))


def client_fields(fields: Sequence[Field], *, policy: ForwardingPolicy, forwarded: bool,
                  request_id: str | None, client_close: bool = False) -> Fields:
    """The header fields of an answer as the client gets it.

    ``forwarded``: the answer came from an upstream (its hop-by-hop headers go, the response
    filter runs); otherwise it is the sidecar's own (a local answer, an error). Security
    headers the answer already has are left as they are.
    """
    out = tuple(fields)
    if forwarded:
        out = without_hop_by_hop(out)
        if policy.response_filter is not None:
            out = policy.response_filter(out)
    present = {name.lower() for name, _ in out}
    out += tuple((name, value) for lower, name, value in policy.security
                 if lower not in present)
    if forwarded and client_close:
        out += ((b"Connection", b"close"),)
    if request_id is not None:
        out = set_field(out, b"X-Request-Id", encode(request_id))
    return out


def forwarded_fields(fields: Sequence[Field], dropped: frozenset[bytes], *,
                     policy: ForwardingPolicy, request_id: str,
                     client_close: bool = False) -> Fields:
    """An upstream answer's fields as the client gets them, for a routed request: what
    ``client_fields(filter_response_fields(fields, dropped, policy.security), policy=policy,
    forwarded=True, ...)`` gives (stagedoor/response_rules.py), in one pass over the fields.

    ``dropped``: lowercase names the route drops (``ResponseRule.dropped_names``); hop-by-hop
    headers and the upstream's copies of the security headers go too, framing stays, the
    security headers follow the upstream's fields, then ``Connection: close`` when the client
    asked for it; ``X-Request-Id`` replaces the upstream's first copy in place (appended when
    it sent none).
    """
    if not policy.one_pass:  # a response filter, or odd security headers: step by step
        from .response_rules import filter_response_fields

        return client_fields(filter_response_fields(tuple(fields), dropped, policy.security),
                             policy=policy, forwarded=True, request_id=request_id,
                             client_close=client_close)
    lowers = [name.lower() for name, _ in fields]
    listed = connection_tokens(fields) if b"connection" in lowers else ()
    secured = policy.secured
    rid = encode(request_id)
    out: list[Field] = []
    id_set = False
    for (name, value), lower in zip(fields, lowers, strict=True):
        if lower in _FRAMING_B:
            out.append((name, value))
        elif lower in _HOP_BY_HOP_B or lower in listed or lower in dropped:
            continue
        elif lower == b"x-request-id":
            if not id_set:
                id_set = True
                out.append((name, rid))
        elif lower not in secured:
            out.append((name, value))
    out.extend((name, value) for _, name, value in policy.security)
    if client_close:
        out.append((b"Connection", b"close"))
    if not id_set:
        out.append((b"X-Request-Id", rid))
    return tuple(out)


# -- small tools -----------------------------------------------------------------------------------
def set_field(fields: Fields, name: bytes, value: bytes) -> Fields:
    """``Headers.set_all(name, [value])`` on raw fields: the first one replaced in place, any
    others dropped, appended when absent."""
    lower = name.lower()
    out: list[Field] = []
    done = False
    for item in fields:
        if item[0].lower() == lower:
            if not done:
                out.append((item[0], value))
                done = True
        else:
            out.append(item)
    if not done:
        out.append((name, value))
    return tuple(out)


def request_id(values: Sequence[str]) -> str:
    """The client's ``X-Request-Id`` values -> the id to use: the client's when it sent exactly
    one, short and safe; else a new one."""
    if len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return values[0]
    # Unique, not secret: a PRNG seeded from the OS, where uuid4 makes a getrandom() system
    # call per request (~2% of the proxy's CPU under load, measured).
    return f"{_REQUEST_IDS.getrandbits(128):032x}"
