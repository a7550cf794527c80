"""The gateway's header work per request (addons/gateway.py), as bench/ profiles it: the
forwarded request's Host and X-Request-Id keep their place and name (as ``Headers.set_all``
would leave them), and a forwarded response's head is finished once, in ``responseheaders``,
unless something replaced the response before the ``response`` hook."""

from __future__ import annotations

import asyncio
import io

from mitmproxy import http
from mitmproxy.proxy.layers.http import (
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.test import tflow

from bench.targets import REQUEST_PATH, UPSTREAM_PATH
from stagedoor_addons.gateway import Gateway

from .test_bench_hotpath import _runtime


def _flow(fields: list[tuple[bytes, bytes]]) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request = http.Request.make("GET", f"http://127.0.0.1:7007{REQUEST_PATH}")
    flow.request.data.authority = b""
    flow.request.path = REQUEST_PATH
    flow.request.headers.fields = tuple(fields)  # as the client sent them
    return flow


def _drive(runtime, flow: http.HTTPFlow, replace_response: bool = False) -> int:
    """The four hooks through a lean master; how many times the response head was finished."""
    from stagedoor_addons.master import build_lean_master

    finished = [0]
    original = Gateway._finish_head

    def counting(self, f, *rest):
        finished[0] += 1
        return original(self, f, *rest)

    async def main() -> None:
        m = build_lean_master(runtime, "127.0.0.1", 0, admin=None)
        m.addons.get("tlsconfig").configure({"confdir"})
        m.addons.get("accesslog").stream = io.StringIO()
        Gateway._finish_head = counting  # type: ignore[method-assign]
        try:
            for hook in (HttpRequestHeadersHook, HttpRequestHook):
                await m.addons.handle_lifecycle(hook(flow))
            flow.response = http.Response.make(
                200, b"{}", {"Content-Type": "application/json", "Connection": "x-hop",
                             "X-Hop": "1"})
            await m.addons.handle_lifecycle(HttpResponseHeadersHook(flow))
            if replace_response:  # an addon answering differently after the head came in
                flow.response = http.Response.make(203, b"{}", {"X-Other": "yes"})
            await m.addons.handle_lifecycle(HttpResponseHook(flow))
        finally:
            Gateway._finish_head = original  # type: ignore[method-assign]

    asyncio.run(main())
    return finished[0]


def test_forwarded_request_keeps_host_and_request_id_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(http.MessageData, "__post_init__", http.MessageData.__post_init__)
    runtime, token = _runtime(tmp_path, 2)
    flow = _flow([(b"accept", b"*/*"), (b"hOST", b"client.example"),
                  (b"x-request-id", b"req-1"), (b"Authorization", f"Bearer {token}".encode()),
                  (b"X-REQUEST-ID", b"req-2"),
                  (b"User-Agent", b"t")])
    _drive(runtime, flow)
    assert flow.request.path == UPSTREAM_PATH
    names = [name for name, _ in flow.request.headers.fields]
    assert names[:3] == [b"accept", b"hOST", b"x-request-id"]  # in place, names as sent
    assert names.count(b"hOST") == 1 and b"Host" not in names and b"X-REQUEST-ID" not in names
    assert flow.request.headers["host"] == "127.0.0.1:9"  # the upstream's
    # two client ids: neither is trusted, a fresh one takes the first one's place
    assert len(flow.request.headers["x-request-id"]) == 32
    assert flow.request.headers["x-forwarded-host"] == "client.example"
    assert "authorization" not in flow.request.headers
    assert flow.request.host == "127.0.0.1" and flow.request.port == 9


def test_a_forwarded_response_head_is_finished_once_unless_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(http.MessageData, "__post_init__", http.MessageData.__post_init__)
    runtime, token = _runtime(tmp_path, 2)
    auth = [(b"Host", b"x"), (b"Authorization", f"Bearer {token}".encode())]
    flow = _flow(auth)
    assert _drive(runtime, flow) == 1
    assert "x-hop" not in flow.response.headers and "connection" not in flow.response.headers
    assert flow.response.headers["x-content-type-options"] == "nosniff"
    replaced = _flow(auth)
    assert _drive(runtime, replaced, replace_response=True) == 2
    assert replaced.response.status_code == 203
    assert replaced.response.headers["x-content-type-options"] == "nosniff"
    assert replaced.response.headers["x-request-id"] == replaced.request.headers["x-request-id"]
