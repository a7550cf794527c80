"""The only place stagedoor reaches into mitmproxy's private parts. Two needs, no public API:

1. **Error pages.** When an upstream refuses, resets or times out, mitmproxy writes an HTML 502
   from ``mitmproxy.proxy.layers.http._http1.make_error_response`` (it also renders the 400 for a
   malformed request line); a ``flow.response`` set in the ``error`` hook is ignored. We replace
   that function with one that writes our JSON error body. The ``error`` hook registers the
   body it wants (method, url, status 502/504) keyed by the identity of the error message object,
   which is the very object mitmproxy passes on to ``make_error_response`` right after the hook.
2. **Upstream timeouts.** mitmproxy awaits a slow upstream forever and ``flow.kill()`` does not
   abort it. We close the flow's server connection through its connection handler, which ends
   the flow with an error that (1) turns into a 504.

3. **Request limits** (``stagedoor.limits``). mitmproxy buffers a request head of any size
   (``_http1.Http1Server.read_headers`` says "FIXME: protect against header size DoS"), waits for
   it forever, and its ``body_size_limit`` applies to requests and responses alike (a large
   answer would be cut off instead of streamed). :func:`install` wraps ``read_headers``
   (431 for a head over ``maxHeaderBytes`` or with more than ``maxHeaderCount`` fields; the
   connection is closed when a head is not complete ``headerTimeoutSeconds`` after its first
   byte) and ``HttpStream.check_body_size`` for requests only (413 over ``maxBodyBytes``, and a
   request body is never streamed: the gateway decides on the whole request before anything
   reaches an upstream). Responses keep mitmproxy's own handling: over the
   ``stream_large_bodies`` option they are streamed, never buffered whole.

``tests/test_mitm_internals.py`` fails loudly if an upgrade moves any of this.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable

from mitmproxy import flow as mflow
from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1

from stagedoor.errors import ERROR_NAMES, JSON_CONTENT_TYPE, SECURITY_HEADERS, error_body
from stagedoor.runtime import Limits, State

log = logging.getLogger("stagedoor.gateway")

_MAX_PENDING = 4096
# id(message) -> (message, status, body, extra headers). The message object is kept alive here,
# so its id cannot be reused while the entry exists.
_pending: OrderedDict[int, tuple[str, int, bytes, tuple[tuple[str, str], ...]]] = OrderedDict()
_installed = False
#: The state current when mitmproxy answers by itself (no flow, or no flow the gateway saw).
_state: Callable[[], State] | None = None


def register_error(message: str, status: int, body: bytes,
                   headers: tuple[tuple[str, str], ...] = ()) -> None:
    """Say which JSON error to write when mitmproxy reports ``message`` to the client.

    ``headers`` are every header to add (security headers included: they come from the state
    the flow was decided on)."""
    _pending[id(message)] = (message, status, body, headers)
    while len(_pending) > _MAX_PENDING:
        _pending.popitem(last=False)


def json_error_response(status_code: int, message: str = "") -> bytes:
    """Drop-in replacement for ``_http1.make_error_response``: JSON, never HTML."""
    entry = _pending.pop(id(message), None)
    if entry is not None and entry[0] is message:
        _, status_code, body, extra = entry
    else:
        extra = _current_security_headers()
        # No flow context (e.g. a malformed request line): still SPEC-shaped, no internals.
        name = ERROR_NAMES.get(status_code, "Error")
        public = {400: "Malformed request", 413: "Request body too large",
                  431: "Request header fields too large", 502: "Bad gateway",
                  504: "Gateway timeout"}.get(status_code, name)
        if status_code == 400 and message:
            log.debug("malformed request rejected by the HTTP parser: %s", message)
        body = error_body(status_code, name, public, "", "")
    headers = http.Headers(
        Server=version.MITMPROXY,
        Connection="close",
        Content_Type=JSON_CONTENT_TYPE,
    )
    for key, value in extra:
        headers[key] = value
    response = http.Response.make(status_code, body, headers)
    return http1.assemble_response(response)


def _current_security_headers() -> tuple[tuple[str, str], ...]:
    headers = _state().security_headers if _state is not None else SECURITY_HEADERS
    return tuple(headers.items())


def install(state: Callable[[], State], url_for: Callable[[str, State], str]) -> None:
    """Install the JSON error pages and ``stagedoor.limits`` (idempotent; a later call replaces
    the providers).

    ``state()`` answers the current state: it is read once per request head (limits, and the
    security headers of a page written without a flow) and once per body check. ``url_for``
    turns a raw request target into the ``request.url`` of an error body under a state.
    """
    global _state, _url_for
    _state = state
    _url_for = url_for
    install_error_pages()
    _install_limits()


def install_error_pages() -> None:
    """Replace mitmproxy's HTML error page writer (idempotent)."""
    global _installed
    if _installed:
        return
    if not callable(getattr(_http1, "make_error_response", None)):  # pragma: no cover
        raise RuntimeError("mitmproxy internals changed: _http1.make_error_response is gone; "
                           "see addons/mitm_internals.py")
    _http1.make_error_response = json_error_response  # type: ignore[assignment]
    _installed = True


def close_server_connection(flow: http.HTTPFlow) -> bool:
    """Abort the upstream connection a flow is waiting on. False if it could not be found."""
    from mitmproxy import ctx

    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    if handler is None:
        return False
    transports = getattr(handler, "transports", {})
    if flow.server_conn not in transports:
        return False
    handler.close_connection(flow.server_conn)
    return True


# -- request limits ------------------------------------------------------------------------------
def _url_as_sent(target: str, state: State) -> str:
    return target


_url_for: Callable[[str, State], str] = _url_as_sent
_original_read_headers: Callable[..., object] | None = None
_original_check_body_size: Callable[..., object] | None = None
_HEAD_END = re.compile(rb"\r?\n\r?\n")
BODY_TOO_LARGE = "Request body exceeds stagedoor.limits.maxBodyBytes"


def _head_problem(buf: bytearray, limits: Limits) -> tuple[bool, str | None]:
    """(head complete?, why it is refused or None) for the bytes of a request head so far."""
    max_bytes = limits.max_header_bytes
    window = bytes(buf)  # (a ReceiveBuffer: no slicing) at most a head and one read
    if max_bytes:
        window = window[: max_bytes + 4]
    window = window.lstrip(b"\r\n")  # empty lines before a request line are ignored
    end = _HEAD_END.search(window)
    if end is None:
        if max_bytes and len(window) > max_bytes:
            return False, "Request header fields too large"
        return False, None
    head = window[: end.start()]
    if max_bytes and len(head) > max_bytes:
        return True, "Request header fields too large"
    if limits.max_header_count and head.count(b"\n") > limits.max_header_count:
        return True, "Too many request header fields"
    return True, None


def _head_context(buf: bytearray, state: State) -> tuple[str, str]:
    """Method and plugin-relative url from a request line, for an error body; '' if unusable."""
    line = bytes(buf)[:8192].lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) == 3 and parts[1].startswith(b"/") and line.isascii() \
            and all(0x20 < c < 0x7F for c in parts[0] + parts[1]):
        return parts[0].decode(), _url_for(parts[1].decode(), state)
    return "", ""


def _limited_read_headers(self: _http1.Http1Server, event: events.Event):  # type: ignore[no-untyped-def]
    assert _original_read_headers is not None
    if isinstance(event, events.DataReceived) and _state is not None:
        state = _state()
        limits = state.limits
        complete, problem = _head_problem(self.buf, limits)
        if problem is not None:
            method, url = _head_context(self.buf, state)
            body = error_body(431, ERROR_NAMES[431], problem, method, url)
            register_error(problem, 431, body, tuple(state.security_headers.items()))
            yield commands.SendData(self.conn, _http1.make_error_response(431, problem))
            yield commands.CloseConnection(self.conn)
            self.state = self.done
            _disarm_head_timer(self)
            return
        if complete:
            _disarm_head_timer(self)
        elif limits.header_timeout and getattr(self, "_stagedoor_head_timer", None) is None:
            self._stagedoor_head_timer = asyncio.get_running_loop().call_later(  # type: ignore[attr-defined]
                limits.header_timeout, _head_timed_out, self.conn.id, time.monotonic())
    elif isinstance(event, events.ConnectionClosed):
        _disarm_head_timer(self)
    yield from _original_read_headers(self, event)  # type: ignore[misc]


def _disarm_head_timer(layer: object) -> None:
    timer = getattr(layer, "_stagedoor_head_timer", None)
    if timer is not None:
        timer.cancel()
        layer._stagedoor_head_timer = None  # type: ignore[attr-defined]


def _head_timed_out(client_id: str, started: float) -> None:
    """A request head still incomplete after ``header_timeout``: close the client connection
    (a slowloris client holds nothing for long)."""
    from mitmproxy import ctx

    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(client_id)
    io = getattr(handler, "transports", {}).get(getattr(handler, "client", None))
    if io is None or io.handler is None:
        return
    log.debug("closing a client connection whose request head was incomplete after %.1fs",
              time.monotonic() - started)
    io.handler.cancel("request header timeout")


def _limited_check_body_size(self: http_layers.HttpStream, request: bool):  # type: ignore[no-untyped-def]
    """Requests: never streamed; over ``max_body_bytes`` answered 413. Responses: mitmproxy's."""
    assert _original_check_body_size is not None
    if not request:
        return (yield from _original_check_body_size(self, request))  # type: ignore[misc]
    if _state is None:
        return False
    state = _state()
    limit = state.limits.max_body_bytes
    if not limit:
        return False
    if self.request_body_buf:
        expected: int | None = len(self.request_body_buf)
    else:
        try:
            expected = http1.expected_http_body_size(self.flow.request, None)
        except ValueError:
            expected = None
    if expected is None or expected <= limit:
        return False
    if not self.request_body_buf:
        yield http_layers.HttpRequestHeadersHook(self.flow)
    # A fresh object per flow: flow.error.msg is the very object make_error_response gets
    # after the (asynchronous) error hook, and register_error keys on its identity.
    message = f"{BODY_TOO_LARGE} ({limit} bytes)"
    req = self.flow.request
    register_error(message, 413, error_body(413, ERROR_NAMES[413], "Request body too large",
                                            req.method, _url_for(req.path, state)),
                   tuple(state.security_headers.items()))
    self.flow.error = mflow.Error(message)
    yield http_layers.HttpErrorHook(self.flow)
    yield http_layers.SendHttp(
        http_layers.ResponseProtocolError(self.stream_id, message,
                                          http_layers.ErrorCode.REQUEST_TOO_LARGE),
        self.context.client)
    self.client_state = self.state_errored
    self.flow.live = False
    return True


def _install_limits() -> None:
    """Wrap ``read_headers`` and ``check_body_size`` once (they read ``_state()`` per use)."""
    global _original_read_headers, _original_check_body_size
    server, stream = _http1.Http1Server, http_layers.HttpStream
    if _original_read_headers is None:
        if not callable(getattr(server, "read_headers", None)) or \
                not callable(getattr(stream, "check_body_size", None)):  # pragma: no cover
            raise RuntimeError("mitmproxy internals changed: Http1Server.read_headers or "
                               "HttpStream.check_body_size is gone; see addons/mitm_internals.py")
        _original_read_headers = server.read_headers
        _original_check_body_size = stream.check_body_size
        server.read_headers = _limited_read_headers  # type: ignore[method-assign]
        stream.check_body_size = _limited_check_body_size  # type: ignore[method-assign]
