"""What of a request head is acceptable, and which of its fields go on (pure; no mitmproxy).

One function, :func:`check_head`, looks at a parsed request head (method, target, version and
the raw header fields as bytes, exactly as the HTTP/1 parser produced them) and says either
"refuse with this status" or "accept, without these fields". The mitmproxy glue
(``addons/edge.py``) only applies the answer, from the ``requestheaders`` hook, before a byte of
the body is read.

The rules, each with the RFC section that asks for it (docs/security.md has the table):

- The request target must be origin-form (``/path?query``): absolute-form, authority-form and
  asterisk-form are refused with 400, whatever the version in the request line (RFC 9112 §3.2;
  a gateway is not a forward proxy).
- Only ``HTTP/1.0`` and ``HTTP/1.1`` are served on the plain listener: any other version in the
  request line (``HTTP/2.0`` included) gets 400 (RFC 9112 §2.3 lets a server refuse a major
  version; 505 would break the "never a 5xx for a client error" invariant of the suite).
- A field value with CR, LF or NUL is refused with 400 (RFC 9110 §5.5: "a recipient of CR, LF or
  NUL within a field value MUST either reject the message or replace each of those characters
  with SP"). This covers bare CR (RFC 9112 §2.2), which some upstream parsers (Python's
  ``http.server``, ``wsgiref``) read as a line break, and obs-fold continuation lines (RFC 9112
  §5.2), which the HTTP/1 parser joins with ``CRLF SP``. Other control characters than HTAB are
  refused as well (they are not ``field-vchar``).
- A field name that is not a ``token`` (RFC 9110 §5.1) is refused with 400.
- A field name with ``_``: CGI and WSGI servers map ``X_Forwarded_For`` and ``X-Forwarded-For``
  to the same ``HTTP_X_FORWARDED_FOR`` variable. Like nginx (``underscores_in_headers off``) and
  Envoy (``headers_with_underscores_action``), the default is to **drop** such fields;
  ``reject`` answers 400, ``allow`` keeps them, except those that name a protected field once
  ``_`` is read as ``-`` (:func:`normalise_name`): protection never depends on the spelling.
- ``Host``: exactly one in an HTTP/1.1 request, and a valid ``uri-host [":" port]``; none, two
  or an invalid one is 400 (RFC 9112 §3.2). A second Host is never joined with the first.
- ``Content-Length`` must be digits; several with different values, or together with
  ``Transfer-Encoding``, are 400 (RFC 9112 §6.3); ``Transfer-Encoding`` in an HTTP/1.0
  request is faulty framing, 400 (RFC 9112 §6.1).
- ``Expect`` with anything but ``100-continue`` is 417 (RFC 9110 §10.1.1); in an HTTP/1.0
  request it is dropped (RFC 9110 §10.1.1: "MUST ignore"), so no ``100`` is ever sent to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

Field = tuple[bytes, bytes]


class UnderscoreAction(Enum):
    """A field name with ``_``: ``stagedoor.headersWithUnderscores``."""

    DROP = "drop"
    REJECT = "reject"
    ALLOW = "allow"


#: Field names a client never sets for the upstream, compared after :func:`normalise_name`.
PROTECTED_NAMES: frozenset[str] = frozenset({
    # hop-by-hop and framing (RFC 9110 §7.6.1, RFC 9112 §6)
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
    "te", "trailer", "upgrade", "transfer-encoding", "content-length", "host",
    # credentials and forwarding
    "authorization", "forwarded", "x-request-id",
    # headers some frameworks read as "the real method / URL / client"
    "x-http-method-override", "x-http-method", "x-method-override", "x-original-method",
    "x-original-url", "x-original-uri", "x-rewrite-url", "x-override-url",
    "x-real-ip", "true-client-ip", "x-client-ip", "x-cluster-client-ip", "client-ip",
})
#: Name prefixes that are protected too (stagedoor's own identity headers, X-Forwarded-*).
PROTECTED_PREFIXES: tuple[str, ...] = ("x-stagedoor-", "x-forwarded-")

_TCHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(rb"^" + _TCHARS + rb"\Z")
_TOKENS = re.compile(rb"^" + _TCHARS + rb"(?:\n" + _TCHARS + rb")*\Z")  # names joined by LF
#: Lengths of the names check_head reads (host, expect, content-length, transfer-encoding).
_WATCHED_LENGTHS = frozenset({4, 6, 14, 17})
# field-value: VCHAR, obs-text, SP and HTAB; nothing else (no CR, LF, NUL or other CTL).
_BAD_VALUE_BYTES = bytes([*range(0x00, 0x09), *range(0x0a, 0x20), 0x7f])
_BAD_VALUE_BYTE = re.compile(b"[" + re.escape(_BAD_VALUE_BYTES) + b"]")
_DIGITS = re.compile(rb"^[0-9]{1,18}\Z")
# uri-host [":" port]: reg-name (unreserved / pct-encoded / sub-delims), IPv4, or [IP-literal].
_HOST = re.compile(rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?\Z")
_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1"})


def is_token(name: bytes) -> bool:
    """Whether ``name`` is a field name (``token``, RFC 9110 §5.1, §5.6.2)."""
    return _TOKEN.match(name) is not None


def normalise_name(name: str | bytes) -> str:
    """A field name as CGI/WSGI would see it, for comparisons: lower case, ``_`` read as ``-``."""
    text = name.decode("latin-1") if isinstance(name, bytes) else name
    return text.lower().replace("_", "-")


def is_protected(name: str | bytes, extra: Iterable[str] = ()) -> bool:
    """True if ``name`` (in any spelling) is a field only stagedoor may set upstream.

    ``extra``: more protected names (e.g. configured identity header names), any spelling.
    """
    norm = normalise_name(name)
    if norm in PROTECTED_NAMES or norm.startswith(PROTECTED_PREFIXES):
        return True
    return any(norm == normalise_name(other) for other in extra)


@dataclass(frozen=True, slots=True)
class HeadRules:
    """How strict :func:`check_head` is; built once per loaded state."""

    underscores: UnderscoreAction = UnderscoreAction.DROP
    #: More protected names (the configured identity headers), normalised.
    protected_extra: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class HeadRefusal:
    """Refuse the request: ``status`` with ``message`` (client-facing), ``reason`` for logs."""

    status: int
    message: str
    reason: str


@dataclass(frozen=True, slots=True)
class HeadAccepted:
    """Accept the request; ``drop`` lists the indexes of fields not to forward."""

    drop: tuple[int, ...] = ()
    dropped_names: tuple[str, ...] = field(default=())


HeadVerdict = HeadRefusal | HeadAccepted
ACCEPTED = HeadAccepted()


def _refuse(reason: str, message: str = "Malformed request", status: int = 400) -> HeadRefusal:
    return HeadRefusal(status, message, reason)


def check_target(authority: str, path: str) -> HeadRefusal | None:
    """Origin-form only. ``authority`` is what the parser found before the path (absolute- or
    authority-form); ``path`` the rest of the request target."""
    if authority:
        return _refuse("absolute-form or authority-form request target",
                       "Invalid request target")
    if not path.startswith("/"):
        return _refuse("request target is not origin-form", "Invalid request target")
    return None


def _has_bad_value_byte(data: bytes) -> bool:
    """``_BAD_VALUE_BYTE.search(data) is not None``, without the regex engine's per-byte
    cost (deleting the bytes in C and comparing lengths is about four times faster)."""
    return len(data.translate(None, _BAD_VALUE_BYTES)) != len(data)


def check_head(method: str, authority: str, path: str, http_version: str,
               fields: Sequence[Field], rules: HeadRules = HeadRules()) -> HeadVerdict:
    """Decide on one request head; see the module docstring for the rules.

    The common case costs a few C-level scans: all names in one regex match, all values in one
    search; the per-field loop only looks at the few names that matter.
    """
    if http_version not in _VERSIONS:
        return _refuse(f"HTTP version {http_version[:16]!r} on an HTTP/1 connection",
                       "HTTP version not supported")
    target = check_target(authority, path)
    if target is not None:
        return target
    names = b"\n".join([name for name, _ in fields])
    if fields and not _TOKENS.match(names):
        bad_name = next(name for name, _ in fields if not _TOKEN.match(name))
        return _refuse(f"field name {bad_name[:40]!r} is not a token")
    if _has_bad_value_byte(b"\t".join([value for _, value in fields])):
        for name, value in fields:
            bad = _BAD_VALUE_BYTE.search(value)
            if bad is not None:
                char = bad.group()
                what = {b"\r": "CR (or an obs-fold line)", b"\n": "LF (obs-fold line)",
                        b"\x00": "NUL"}.get(char, f"control byte {char!r}")
                return _refuse(f"{what} in the value of {name[:40]!r}")
    underscores = b"_" in names
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    expects: list[bytes] = []
    drop: list[int] = []
    dropped: list[str] = []
    for index, (name, value) in enumerate(fields):
        if underscores and b"_" in name:
            if rules.underscores is UnderscoreAction.REJECT:
                return _refuse(f"field name {name[:40]!r} has an underscore",
                               "Header field names with underscores are not accepted")
            if rules.underscores is UnderscoreAction.DROP or is_protected(
                    name, rules.protected_extra):
                drop.append(index)
                dropped.append(name.decode("latin-1"))
                continue
        if len(name) not in _WATCHED_LENGTHS:
            continue
        lower = name.lower()
        if lower == b"host":
            hosts.append(value)
        elif lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding":
            codings.append(value)
        elif lower == b"expect":
            if http_version == "HTTP/1.0":  # RFC 9110 §10.1.1: MUST be ignored in HTTP/1.0
                drop.append(index)
                dropped.append(name.decode("latin-1"))
                continue
            expects.append(value)
    if http_version == "HTTP/1.1" and len(hosts) != 1:
        return _refuse("no Host header" if not hosts else f"{len(hosts)} Host headers",
                       "Exactly one Host header is required")
    if len(hosts) > 1:
        return _refuse(f"{len(hosts)} Host headers", "Exactly one Host header is required")
    if hosts and not _HOST.match(hosts[0]):
        return _refuse(f"invalid Host {hosts[0][:60]!r}", "Invalid Host header")
    if lengths or codings:
        framing = _check_framing(http_version, lengths, codings)
        if framing is not None:
            return framing
    for value in expects:
        if value.strip().lower() != b"100-continue":
            return _refuse(f"Expect: {value[:40]!r}", "Expectation not supported", 417)
    if not drop:
        return ACCEPTED
    return HeadAccepted(tuple(drop), tuple(dropped))


def _check_framing(version: str, lengths: list[bytes], codings: list[bytes]) -> HeadRefusal | None:
    values = {part.strip() for value in lengths for part in value.split(b",")}
    if lengths and (len(values) != 1 or not _DIGITS.match(next(iter(values)))):
        return _refuse(f"Content-Length {b', '.join(lengths)[:60]!r}")
    if codings and lengths:
        return _refuse("Transfer-Encoding and Content-Length together")
    if codings and version == "HTTP/1.0":
        return _refuse("Transfer-Encoding in an HTTP/1.0 request")
    if len(codings) > 1:
        return _refuse("more than one Transfer-Encoding header")
    if codings and codings[0].strip().lower() != b"chunked":
        return _refuse(f"Transfer-Encoding {codings[0][:40]!r}",
                       "Only the chunked transfer coding is accepted")
    return None


def apply(fields: Sequence[Field], verdict: HeadAccepted) -> tuple[Field, ...]:
    """``fields`` without the ones ``verdict`` drops."""
    if not verdict.drop:
        return tuple(fields)
    gone = set(verdict.drop)
    return tuple(f for i, f in enumerate(fields) if i not in gone)


def parse_underscore_action(text: str | None) -> UnderscoreAction:
    """``stagedoor.headersWithUnderscores``: drop (default), reject or allow; ValueError else."""
    if text is None or text == "":
        return UnderscoreAction.DROP
    try:
        return UnderscoreAction(str(text).strip().lower())
    except ValueError:
        raise ValueError(f"must be one of drop, reject, allow; got {text!r}") from None


# -- on the way out -------------------------------------------------------------------------------
#: What stagedoor adds to every request it forwards (RFC 9110 §7.6.3: "An HTTP-to-HTTP gateway
#: MUST send an appropriate Via header field in each inbound request message").
VIA = (b"Via", b"1.1 stagedoor")


def finish_response_head(fields: Sequence[Field], request_version: str, body_length: int | None,
                         date: bytes) -> tuple[Field, ...]:
    """A response head as it may leave for the client.

    - Fields whose name is not a token are dropped, and CR, LF, NUL and other control bytes in
      values become SP (RFC 9110 §5.5: a recipient MUST reject or replace them before
      forwarding; an upstream answer is not refused for it).
    - ``Date`` is added when absent (RFC 9110 §6.6.1: an origin with a clock MUST send it in
      2xx-4xx answers, and a recipient that forwards an answer without one MUST append it).
    - To an HTTP/1.0 request, no ``Transfer-Encoding`` (RFC 9112 §6.1: "A server MUST NOT send a
      response containing Transfer-Encoding unless the corresponding request indicates
      HTTP/1.1"): the body is then framed by ``Content-Length`` (``body_length``, when the whole
      body is known) or by closing the connection (a streamed answer); and the connection is
      closed after the answer (RFC 9112 §9.3: "A proxy server MUST NOT maintain a persistent
      connection with an HTTP/1.0 client"), whatever ``Connection: keep-alive`` it sent.
    """
    out = list(fields)
    if _has_bad_value_byte(b"\t".join([value for _, value in out])) or not _TOKENS.match(
            b"\n".join([name for name, _ in out])):
        out = [(name, _BAD_VALUE_BYTE.sub(b" ", value)) for name, value in out
               if is_token(name)]
    names = {name.lower() for name, _ in out}
    if b"date" not in names:
        out.append((b"Date", date))
    if request_version == "HTTP/1.0":
        if b"transfer-encoding" in names:
            out = [(n, v) for n, v in out
                   if n.lower() not in (b"transfer-encoding", b"content-length")]
            if body_length is not None:
                out.append((b"Content-Length", str(body_length).encode()))
        if b"connection" in names:
            out = [(n, v) for n, v in out if n.lower() != b"connection"]
        out.append((b"Connection", b"close"))
    return tuple(out)
