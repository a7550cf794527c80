"""The pure request-head check (stagedoor/head.py) and the edge settings, connection book and log
throttle (stagedoor/edge.py), in-process, over big hostile tables."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stagedoor.config import Config, ConfigError
from stagedoor.edge import ConnectionBook, EdgeSettings, LogThrottle, default_max_connections
from stagedoor.head import (
    PROTECTED_NAMES,
    PROTECTED_PREFIXES,
    HeadAccepted,
    HeadRefusal,
    HeadRules,
    UnderscoreAction,
    apply,
    check_head,
    is_protected,
    normalise_name,
)

BASE = [(b"Host", b"127.0.0.1"), (b"Authorization", b"Bearer t")]


def verdict(*extra: tuple[bytes, bytes], method: str = "GET", authority: str = "",
            path: str = "/api/x", version: str = "HTTP/1.1", base: bool = True,
            rules: HeadRules | None = None):  # type: ignore[no-untyped-def]
    fields = (BASE if base else []) + list(extra)
    return check_head(method, authority, path, version, fields, rules or HeadRules())


# -- field values: every byte 0x00-0x7f and a few above ------------------------------------------
_ALLOWED_VALUE_BYTES = {0x09} | set(range(0x20, 0x7F)) | set(range(0x80, 0x100))


@pytest.mark.parametrize("byte", range(256), ids=lambda b: f"0x{b:02x}")
def test_every_byte_in_a_value(byte):
    v = verdict((b"X-Note", b"a" + bytes([byte]) + b"b"))
    if byte in _ALLOWED_VALUE_BYTES:
        assert isinstance(v, HeadAccepted), v
    else:
        assert isinstance(v, HeadRefusal) and v.status == 400, (byte, v)


SMUGGLED_VALUES = [
    b"a\rX-Stagedoor-Principal: user:default/admin",
    b"a\r\nX-Stagedoor-Principal: user:default/admin",  # obs-fold as the parser joins it
    b"a\r\n\tX-Forwarded-For: 10.0.0.1",
    b"a\nAuthorization: Bearer forged",
    b"a\x00Authorization: Bearer forged",
    b"\rGET /v1/admin HTTP/1.1",
    b"a\r",
    b"\x00",
    b"a\x0bb", b"a\x0cb", b"a\x1bb", b"a\x7fb", b"a\x08b",
]


@pytest.mark.parametrize("value", SMUGGLED_VALUES)
@pytest.mark.parametrize("name", [b"X-Note", b"Authorization", b"Host", b"Cookie", b"X_Note"])
def test_values_with_cr_lf_nul_or_ctl_are_refused(name, value):
    v = verdict((name, value))
    assert isinstance(v, HeadRefusal) and v.status == 400, v


# -- field names -------------------------------------------------------------------------------
BAD_NAMES = [b"X Note", b"X-Note ", b" X-Note", b"X:Note", b"X\tNote", b"X\x00", b"X(Note)",
             b"X/Note", b"X@Note", b"X[1]", b"X{1}", b'X"', b"X\\", b"X,Y", b"X;Y", b"X=Y",
             b"X?", b"\xe9t\xe9", b"X\x7f", b"", b"X-Note\n", b"X-Note\r"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_are_not_tokens_are_refused(name):
    assert isinstance(verdict((name, b"v")), HeadRefusal)


UNDERSCORE_NAMES = [b"X_Stagedoor_Principal", b"x_stagedoor_principal_type", b"X_Forwarded_For",
                    b"X_Forwarded_Host", b"X_Forwarded_Proto", b"X_HTTP_Method_Override",
                    b"X_Original_URL", b"X_Real_IP", b"X_Request_Id", b"Proxy_Authorization",
                    b"Transfer_Encoding", b"Content_Length", b"X-Forwarded_For",
                    b"X_Custom", b"_", b"__", b"a_b"]


@pytest.mark.parametrize("name", UNDERSCORE_NAMES)
def test_underscore_names_are_dropped_by_default(name):
    v = verdict((name, b"10.0.0.1"), (b"X-Keep", b"1"))
    assert isinstance(v, HeadAccepted) and len(v.drop) == 1
    kept = apply([*BASE, (name, b"10.0.0.1"), (b"X-Keep", b"1")], v)
    assert (name, b"10.0.0.1") not in kept and (b"X-Keep", b"1") in kept


@pytest.mark.parametrize("name", UNDERSCORE_NAMES)
def test_underscore_names_are_refused_in_reject_mode(name):
    v = verdict((name, b"x"), rules=HeadRules(UnderscoreAction.REJECT))
    assert isinstance(v, HeadRefusal) and v.status == 400


@pytest.mark.parametrize("name", UNDERSCORE_NAMES)
def test_allow_mode_still_drops_protected_spellings(name):
    rules = HeadRules(UnderscoreAction.ALLOW, frozenset({"x-custom"}))
    v = verdict((name, b"x"), rules=rules)
    assert isinstance(v, HeadAccepted)
    protected = is_protected(name, rules.protected_extra)
    assert (len(v.drop) == 1) == protected, (name, protected)


def test_allow_mode_keeps_unprotected_underscores():
    v = verdict((b"X_Trace_Tag", b"1"), rules=HeadRules(UnderscoreAction.ALLOW))
    assert v == HeadAccepted()


@pytest.mark.parametrize("name", sorted(PROTECTED_NAMES))
def test_every_protected_name_in_every_spelling(name):
    for spelling in (name, name.upper(), name.replace("-", "_"), name.title().replace("-", "_")):
        assert is_protected(spelling) and is_protected(spelling.encode())
    assert normalise_name(name.upper().replace("-", "_")) == name


@pytest.mark.parametrize("prefix", PROTECTED_PREFIXES)
def test_protected_prefixes(prefix):
    assert is_protected(prefix + "anything")
    assert is_protected((prefix + "anything").replace("-", "_").upper())
    assert not is_protected("x-other-" + prefix)


# -- request targets and versions --------------------------------------------------------------
TARGETS = [("127.0.0.1", "/api/x"), ("admin.internal:443", "/v1/admin"), ("", "*"),
           ("", "127.0.0.1:80"), ("", "api/x"), ("", ""), ("", "http://x/y"), ("x", "")]


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/3"])
@pytest.mark.parametrize(("authority", "path"), TARGETS)
def test_only_origin_form_targets_whatever_the_version(authority, path, version):
    v = verdict(authority=authority, path=path, version=version)
    assert isinstance(v, HeadRefusal) and v.status == 400


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/2", "HTTP/3.0", "HTTP/0.9", "HTTP/1.2",
                                     "http/1.1", "HTTP/11", "", "HTTPS/1.1"])
def test_versions_other_than_1_0_and_1_1_are_refused(version):
    assert isinstance(verdict(version=version), HeadRefusal)


# -- Host ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hosts", "ok"), [
    ([b"127.0.0.1"], True), ([b"127.0.0.1:7007"], True), ([b"[::1]:80"], True),
    ([b"a.example"], True), ([b""], True), ([b"xn--bcher-kva.example"], True),
    ([b"a.example", b"b.example"], False), ([b"a.example", b"a.example"], False),
    ([], False), ([b"user@a.example"], False), ([b"a.example/v1/admin"], False),
    ([b"a.example?x"], False), ([b"a.example#x"], False), ([b"a b"], False),
    ([b"a.example:80:81"], False), ([b"a.example:123456"], False), ([b"[::1"], False),
    ([b"a\\b"], False),
])
def test_exactly_one_valid_host(hosts, ok):
    fields = [(b"Host", h) for h in hosts] + [(b"Authorization", b"Bearer t")]
    v = check_head("GET", "", "/api/x", "HTTP/1.1", fields)
    assert isinstance(v, HeadAccepted) is ok, (hosts, v)


def test_host_case_variants_count_as_two():
    v = check_head("GET", "", "/x", "HTTP/1.1", [(b"Host", b"a"), (b"host", b"a")])
    assert isinstance(v, HeadRefusal)


def test_http_1_0_needs_no_host():
    assert check_head("GET", "", "/x", "HTTP/1.0", []) == HeadAccepted()


# -- framing and Expect --------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "version", "ok"), [
    ([(b"Content-Length", b"5")], "HTTP/1.1", True),
    ([(b"Content-Length", b"5"), (b"Content-Length", b"5")], "HTTP/1.1", True),
    ([(b"Content-Length", b"5, 5")], "HTTP/1.1", True),
    ([(b"Content-Length", b"5"), (b"Content-Length", b"6")], "HTTP/1.1", False),
    ([(b"Content-Length", b"+5")], "HTTP/1.1", False),
    ([(b"Content-Length", b"-1")], "HTTP/1.1", False),
    ([(b"Content-Length", b"0x5")], "HTTP/1.1", False),
    ([(b"Content-Length", b"")], "HTTP/1.1", False),
    ([(b"Content-Length", b"1" * 19)], "HTTP/1.1", False),
    ([(b"Transfer-Encoding", b"chunked")], "HTTP/1.1", True),
    ([(b"Transfer-Encoding", b"chunked")], "HTTP/1.0", False),
    ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")], "HTTP/1.1", False),
    ([(b"Transfer-Encoding", b"gzip, chunked")], "HTTP/1.1", False),
    ([(b"Transfer-Encoding", b"identity")], "HTTP/1.1", False),
    ([(b"Transfer-Encoding", b"xchunked")], "HTTP/1.1", False),
    ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], "HTTP/1.1",
     False),
    ([(b"Expect", b"100-continue")], "HTTP/1.1", True),
    ([(b"Expect", b"100-Continue")], "HTTP/1.1", True),
])
def test_framing(fields, version, ok):
    v = check_head("POST", "", "/x", version, [(b"Host", b"a"), *fields])
    assert isinstance(v, HeadAccepted) is ok, (fields, v)


@pytest.mark.parametrize("value", [b"200-ok", b"100-continue, x", b"", b"foo"])
def test_other_expectations_get_417(value):
    v = verdict((b"Expect", value))
    assert isinstance(v, HeadRefusal) and v.status == 417


# -- settings, connection book, log throttle ------------------------------------------------------
def test_edge_settings_from_config():
    s = EdgeSettings.from_config(Config(data={"stagedoor": {
        "headersWithUnderscores": "reject",
        "identityHeaders": {"principal": "X-Caller"},
        "limits": {"idleTimeoutSeconds": 5, "bodyTimeoutSeconds": 7,
                   "maxConnectionsPerClient": 3, "maxConnections": 9,
                   "maxChunkLineBytes": 100}}}))
    assert (s.idle_timeout, s.body_timeout, s.max_connections_per_client, s.max_connections,
            s.max_chunk_line_bytes) == (5, 7, 3, 9, 100)
    assert s.underscores is UnderscoreAction.REJECT and "x-caller" in s.protected_extra
    assert EdgeSettings.from_config(Config(data={})) .underscores is UnderscoreAction.DROP
    assert 16 <= EdgeSettings().total_connections == default_max_connections() <= 4096


@pytest.mark.parametrize("data", [
    {"headersWithUnderscores": "maybe"},
    {"limits": {"idleTimeoutSeconds": -1}},
    {"limits": {"maxConnectionsPerClient": 1e9}},
    {"limits": {"maxChunkLineBytes": "lots"}},
])
def test_edge_settings_refuse_bad_values(data):
    with pytest.raises(ConfigError):
        EdgeSettings.from_config(Config(data={"stagedoor": data}))


def test_connection_book_caps_per_address_and_in_all():
    book = ConnectionBook()
    settings = EdgeSettings(max_connections_per_client=2, max_connections=3)
    quarter = EdgeSettings(max_connections_per_client=100, max_connections=8)
    other = ConnectionBook()
    assert [other.admit("a", quarter) for _ in range(7)].count(None) == 6  # 3/4 of 8
    assert other.admit("b", quarter) is None
    assert book.admit("a", settings) is None and book.admit("a", settings) is None
    assert "maxConnectionsPerClient" in (book.admit("a", settings) or "")
    assert book.admit("b", settings) is None
    assert "maxConnections " in (book.admit("c", settings) or "")
    book.release("a")
    assert book.admit("c", settings) is None
    assert book.total == 3 and book.by_address == {"a": 1, "b": 1, "c": 1}
    for address in ("a", "b", "c", "c"):
        book.release(address)
    assert book.total == 0 and book.by_address == {}


def _record(msg: str, exc: BaseException | None = None, name: str = "mitmproxy.proxy.server",
            level: int = logging.ERROR) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, level, __file__, 1, msg, None, info)


def test_log_throttle_lets_one_line_per_cause_per_interval_through_with_a_count():
    now = [0.0]
    throttle = LogThrottle(interval=10, clock=lambda: now[0])
    try:
        raise OSError(24, "Too many open files")
    except OSError as exc:
        error = exc
    passed = [throttle.filter(_record("mitmproxy has crashed!", error)) for _ in range(11_000)]
    assert passed.count(True) == 1 and throttle.suppressed_total == 10_999
    now[0] = 11.0
    again = _record("mitmproxy has crashed!", error)
    assert throttle.filter(again)
    assert "10999 more like it" in again.getMessage() and again.exc_info is None
    # another cause is not held back by the first, and routine lines are never throttled
    assert throttle.filter(_record("client disconnected", name="mitmproxy.proxy.server"))
    assert all(throttle.filter(_record("reload refused", name="stagedoor")) for _ in range(5))
    assert all(throttle.filter(_record("ok", level=logging.INFO)) for _ in range(5))


def test_log_throttle_tells_causes_apart_by_exception_and_place():
    throttle = LogThrottle(interval=10, clock=lambda: 0.0)
    errors = []
    for exc_type in (ValueError, KeyError):
        try:
            raise exc_type("x")
        except Exception as exc:
            errors.append(exc)
    assert all(throttle.filter(_record("Addon error", e, name="mitmproxy.addonmanager"))
               for e in errors)
    assert not throttle.filter(_record("Addon error", errors[0], name="mitmproxy.addonmanager"))


# -- on the way out ------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "version", "length", "want"), [
    ([(b"Content-Type", b"a")], "HTTP/1.1", 3,
     [(b"Content-Type", b"a"), (b"Date", b"D")]),
    ([(b"date", b"old")], "HTTP/1.1", 3, [(b"date", b"old")]),
    ([(b"Transfer-Encoding", b"chunked"), (b"Date", b"x")], "HTTP/1.1", 3,
     [(b"Transfer-Encoding", b"chunked"), (b"Date", b"x")]),
    ([(b"Transfer-Encoding", b"chunked"), (b"Date", b"x")], "HTTP/1.0", 3,
     [(b"Date", b"x"), (b"Content-Length", b"3"), (b"Connection", b"close")]),
    ([(b"transfer-encoding", b"chunked"), (b"Content-Length", b"9"), (b"Date", b"x")],
     "HTTP/1.0", None, [(b"Date", b"x"), (b"Connection", b"close")]),  # streamed: close ends it
    ([(b"Connection", b"keep-alive"), (b"Date", b"x")], "HTTP/1.0", 3,
     [(b"Date", b"x"), (b"Connection", b"close")]),
])
def test_finish_response_head(fields, version, length, want):
    from stagedoor.head import finish_response_head

    assert list(finish_response_head(fields, version, length, b"D")) == want


def test_http_date_is_an_imf_fixdate():
    from stagedoor.edge import http_date

    assert http_date(0) == b"Thu, 01 Jan 1970 00:00:00 GMT"
    assert http_date(784111777) == b"Sun, 06 Nov 1994 08:49:37 GMT"  # RFC 9110's example


# -- the bad-byte check without the regex engine ---------------------------------------------------
def test_the_bad_value_byte_check_agrees_with_the_regex_on_every_byte():
    from stagedoor.head import _BAD_VALUE_BYTE, _has_bad_value_byte

    for byte in range(256):
        data = b"token " + bytes([byte]) + b" value"
        assert _has_bad_value_byte(data) == (_BAD_VALUE_BYTE.search(data) is not None), byte


@given(st.binary(max_size=300))
def test_the_bad_value_byte_check_agrees_with_the_regex(data: bytes):
    from stagedoor.head import _BAD_VALUE_BYTE, _has_bad_value_byte

    assert _has_bad_value_byte(data) == (_BAD_VALUE_BYTE.search(data) is not None)
