"""The per-request shortcuts of issue 18 give what the plain code gives: the upstream rewrite
that skips a setter whose value is already there (addons/gateway.py ``retarget``), and the
access-log line through the prebuilt JSON encoder (addons/accesslog.py ``access_line``)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from stagedoor.decide import Upstream
from stagedoor.logsetup import format_access_record
from stagedoor_addons.accesslog import access_line
from stagedoor_addons.gateway import retarget


def _request(authority: bytes, method: str = "GET") -> http.Request:
    """A request as reverse mode hands it over: aimed at 127.0.0.1:9, origin-form unless
    ``authority`` (absolute-form)."""
    req = http.Request.make(method, "http://127.0.0.1:9/api/unit/things/a?b=c", b"",
                            {"Host": "sidecar.example:7007", "X-A": "1"})
    req.data.authority = authority
    return req


def _plainly(req: http.Request, up: Upstream) -> None:
    """What the gateway did before the shortcut: every setter, in order."""
    req.headers.fields = ()
    req.scheme = up.scheme
    req.host = up.host
    req.port = up.port
    req.path = up.path
    req.method = req.method


@pytest.mark.parametrize(("authority", "host", "port", "scheme", "method"), list(itertools.product(
    (b"", b"sidecar.example:7007"), ("127.0.0.1", "upstream.internal"), (9, 8080),
    ("http", "https"), ("GET", "get"))))
def test_retarget_gives_what_every_setter_gives(authority, host, port, scheme, method):
    up = Upstream(scheme, host, port, "/v1/things/a")
    fast = _request(authority, method)
    plain = fast.copy()
    retarget(fast, up)
    _plainly(plain, up)
    assert fast.data.get_state() == plain.data.get_state()
    assert (fast.url, fast.authority, fast.host, fast.port) == (plain.url, plain.authority,
                                                                 plain.host, plain.port)


RECORDS = [
    {},
    {"a": None},
    {"time": "2026-12-02T13:00:00.000Z", "request_id": "r1", "client": "127.0.0.1",
     "method": "GET", "path": "/api/x?token=[REDACTED]", "plugin": None, "status": 200,
     "latency_ms": 0.1 + 0.2, "upstream_ms": 12.0, "n": 10**20, "big": 1e300},
    {"reason": 'quote " backslash \\ newline \n nul \x00 line-sep \u2028 é 猫 \udcff',
     "nan": float("nan"), "inf": float("-inf"), "flag": True, "off": False},
]


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("fmt", ["json", "logfmt"])
def test_access_line_is_the_formatted_record(record, fmt):
    assert access_line(record, fmt) == format_access_record(record, fmt)


def test_access_line_refuses_what_json_refuses():
    with pytest.raises(TypeError, match="not JSON serializable"):
        access_line({"x": object()}, "json")
    assert json.loads(access_line({"a": 1, "b": None}, "json")) == {"a": 1}


@pytest.mark.parametrize("authorization", ["Bearer {t}", "bearer   {t}", " \tBEARER {t} "])
def test_forward_carries_the_token_it_was_verified_from(tmp_path, authorization):
    from stagedoor.auth import extract_bearer
    from stagedoor.decide import Forward, GatewayRequest, decide

    from .test_bench_hotpath import _runtime

    runtime, token = _runtime(tmp_path, 0)
    state = runtime.state
    values = (authorization.format(t=token),)
    decision = decide(GatewayRequest("GET", "/api/insights/services/payments-api", values),
                      state.policies, state.verifier, state.authorizer)
    assert isinstance(decision, Forward) and decision.principal is not None
    assert decision.token == extract_bearer(list(values)) == token
    assert token not in repr(decision)


# -- the edge's body check: mitmproxy's expected_http_body_size only when a field can frame a body
_NAMES = [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Transfer-Encoding",
          b"transfer-encoding", b"Host", b"Authorization", b"X-Content-Length", b"Content-Type",
          "Content-Lengt\u0127".encode(), "\u212aeep".encode()]
_VALUES = [b"", b"0", b"5", b"chunked", b"gzip", b"gzip, chunked", b"x", b"1, 1", b"-1"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=4),
       st.sampled_from(["GET", "POST", "HEAD", "CONNECT"]))
def test_framed_skips_only_what_has_no_body(fields, method):
    from stagedoor_addons import mitm_internals
    from stagedoor_addons.edge import _framed

    request = http.Request.make(method, "http://127.0.0.1:9/x", b"")
    request.headers.fields = tuple(fields)
    assert (_framed(request.headers.fields) and mitm_internals.expects_body(request)) \
        == mitm_internals.expects_body(request)
