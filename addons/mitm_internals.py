"""The fence: every place stagedoor touches a private part of mitmproxy (or of h11, which
mitmproxy's HTTP/1 layer is built on), with why, and what would replace it.

Everything here is checked at start (:func:`check_internals`: a clear error naming the missing
piece instead of a half-working proxy) and pinned by behavioural tests that talk to a real
sidecar over a raw socket (``tests/test_mitm_internals.py``: bytes in, bytes out), never by
reading mitmproxy's source text. The supported mitmproxy range is pinned in ``pyproject.toml``.

Each entry: the private name; why stagedoor needs it; what would replace it.

1. ``proxy.layers.http._http1.make_error_response`` (module global, replaced). mitmproxy writes
   its own HTML error pages (malformed request line, upstream refused/reset, body too large)
   with ``Server: mitmproxy <version>``, and a ``flow.response`` set in the ``error`` hook is
   ignored. We write JSON error bodies, without a ``Server`` header.
   *Replacement:* an error-page hook or option in mitmproxy.
2. ``_http1.Http1Server.read_headers`` (wrapped). No request-head size limit ("FIXME: protect
   against header size DoS") and no header timeout: 431 over ``maxHeaderBytes`` or
   ``maxHeaderCount``, close after ``headerTimeoutSeconds``. It also tells ``addons/edge.py``
   that a new head began (the idle timer stops). *Replacement:* head size/timeout options.
3. ``layers.http.HttpStream.check_body_size`` (wrapped). ``body_size_limit`` applies to requests
   *and* responses (a large answer would be cut off instead of streamed): 413 for request
   bodies only, which are never streamed. *Replacement:* a request-only body limit option.
4. ``HttpStream.check_killed`` (wrapped; it uses ``send_response``, ``flow_done``,
   ``client_state`` and ``state_*``). A ``flow.response`` set in ``requestheaders`` is only sent
   once the whole body was read, and ``Expect: 100-continue`` gets ``100`` first. We send the
   refusal at once (``Connection: close``) and drop the body as it comes, never buffered.
   *Replacement:* an "answer now" path for responses set in ``requestheaders``.
5. ``_http1.make_body_reader`` (replaced) and ``h11._readers.ChunkedReader`` (subclassed). h11
   buffers a chunk-size line, its extensions and a trailer section without bound: 413 over
   ``maxChunkLineBytes`` (what Node answers), 431 for trailers over ``maxHeaderBytes``.
   Trailers are kept aside, since mitmproxy's HTTP/1 layer raises ``NotImplementedError``
   ("HTTP trailers are not implemented yet") on them, crashing the connection.
   *Replacement:* limits in h11, HTTP/1 trailer support in mitmproxy.
6. ``_http1.Http1Connection.read_body`` (wrapped). Passes (5)'s trailers on as
   ``RequestTrailers``/``ResponseTrailers`` events, which the stream layer handles
   (``addons/edge.py`` drops them, counted and logged), and writes (5)'s 413/431 before
   mitmproxy closes the connection. *Replacement:* as (5).
7. ``Proxyserver.connections``, ``ConnectionHandler.transports`` / ``close_connection``,
   ``ConnectionIO.handler`` / ``.writer``. Closing or answering a connection from outside its
   layers: upstream timeout (504), head/body/idle timeouts, the JSON 500 after a crash.
   *Replacement:* per-connection timeouts and a close API for connections.
8. The log text ``mitmproxy has crashed!`` of ``mitmproxy.proxy.server`` (a string, not code).
   A crash inside a connection's layers is only logged, with a traceback, and the client then
   waits for ``tcp_timeout``. We answer JSON 500 (or close) once, and ``addons/edge.py``
   finishes the connection's flows (access log, metrics, in-flight gauge).
   *Replacement:* a connection-crashed hook.
9. ``addonmanager.AddonManager._iter_hooks`` / ``_configure_all`` and
   ``addonmanager.cut_traceback`` (``addons/lean.py``): per-event handler lists on the hot path
   (~120 µs per request, measured). *Replacement:* a cheaper dispatch in mitmproxy itself.

10. ``http.MessageData.__post_init__`` (replaced by a no-op, ``addons/lean.py``): mitmproxy's
    ``__debug__``-only type checks of every message. Kept after a bounded loopback A/B (708 ->
    635 µs of proxy CPU per request, -10%), applied only while a behavioural guard finds it is
    still a pure type check. *Replacement:* ``python -O`` (which would drop stagedoor's asserts
    too), or mitmproxy making the checks opt-in.
11. ``_http1.Http1Client.read_headers`` (wrapped). mitmproxy takes an upstream's interim
    ``1xx`` answer (``103 Early Hints``) for the final one: the client got the ``103`` as the
    answer and the real one was lost, or on a kept-alive connection taken as the answer to the
    next request (a response desync). We read interim answers off first: ``102``/``103`` are
    forwarded to HTTP/1.1 clients (RFC 9110 §15.2; hop-by-hop fields removed), ``100`` (the
    proxy already answered ``Expect`` itself) and anything to an HTTP/1.0 client are dropped.
    *Replacement:* interim response support in mitmproxy's HTTP/1 client.
12. mitmweb, for ``stagedoor inspect`` only (``addons/inspect.py``): ``view.View._store`` (the
    flow buffer a ``ShadowView`` bounds and redacts), ``WebMaster.view`` (replaced by it: the
    web handlers find flows through ``master.view``), ``WebMaster._sig_view_*`` (the UI's
    signal handlers, re-connected to it: they push flows to browsers), and the names of
    mitmweb's live flow writers it removes (checked at install, with a clear error). Pinned in
    ``tests/test_inspect.py`` through mitmweb's real web server (websocket pushes, ``/flows``
    lookups). *Replacement:* a view size limit and a flow-redaction hook in mitmweb.

(2)-(6) are the request limits of ``stagedoor.limits`` (docs/security.md). Upstream timeouts:
mitmproxy awaits a slow upstream forever and ``flow.kill()`` does not abort it; we close the
flow's server connection through (7), which ends the flow with an error that (1) turns into a
504.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable

import h11
from h11._readers import ChunkedReader
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, server
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp

from stagedoor.edge import EdgeSettings, http_date
from stagedoor.errors import ERROR_NAMES, JSON_CONTENT_TYPE, SECURITY_HEADERS, error_body
from stagedoor.head import is_token
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
    headers = http.Headers(  # no "Server: mitmproxy <version>"
        Date=http_date().decode(),
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


def connection_handler(client_id: str) -> server.ConnectionHandler | None:
    """The live connection handler of a client connection (7), or None."""
    from mitmproxy import ctx

    proxyserver = ctx.master.addons.get("proxyserver")
    return getattr(proxyserver, "connections", {}).get(client_id)


def close_server_connection(flow: http.HTTPFlow) -> bool:
    """Abort the upstream connection a flow is waiting on. False if it could not be found."""
    handler = connection_handler(flow.client_conn.id)
    if handler is None:
        return False
    transports = getattr(handler, "transports", {})
    if flow.server_conn not in transports:
        return False
    handler.close_connection(flow.server_conn)
    return True


def close_client(client_id: str, reason: str, answer: bytes = b"") -> bool:
    """Write ``answer`` (if any) to a client connection and close it (7). False if gone."""
    handler = connection_handler(client_id)
    io = getattr(handler, "transports", {}).get(getattr(handler, "client", None))
    if io is None or io.handler is None:
        return False
    if answer and io.writer is not None and not io.writer.is_closing():
        with contextlib.suppress(OSError, RuntimeError):
            io.writer.write(answer)
    io.handler.cancel(reason)
    return True


# -- request limits ------------------------------------------------------------------------------
def _url_as_sent(target: str, state: State) -> str:
    return target


_url_for: Callable[[str, State], str] = _url_as_sent
_edge: Callable[[], EdgeSettings] = EdgeSettings
_head_listener: Callable[[str], None] | None = None  # a client connection's head began
_linger_listener: Callable[[str], None] | None = None  # a refused request's body is dropped
_original_read_headers: Callable[..., object] | None = None
_original_check_body_size: Callable[..., object] | None = None
_HEAD_END = re.compile(rb"\r?\n\r?\n")
BODY_TOO_LARGE = "Request body exceeds stagedoor.limits.maxBodyBytes"


def _head_end(data: bytes) -> int:
    """Where ``_HEAD_END`` (``\\r?\\n\\r?\\n``) first matches in ``data``, or -1: the same
    answer from two ``bytes.find`` calls: the regex's optional leading ``\\r`` defeats the regex
    engine's literal scan (4.6 µs against 1.2 µs of CPU for a 652-byte head, measured)."""
    lf_lf, lf_cr_lf = data.find(b"\n\n"), data.find(b"\n\r\n")
    first = lf_lf if lf_cr_lf < 0 or 0 <= lf_lf < lf_cr_lf else lf_cr_lf
    if first > 0 and data[first - 1] == 0x0D:  # the blank line's CR before the LF
        return first - 1
    return first


def _head_problem(buf: bytearray, limits: Limits) -> tuple[bool, str | None]:
    """(head complete?, why it is refused or None) for the bytes of a request head so far."""
    max_bytes = limits.max_header_bytes
    window = bytes(buf)  # (a ReceiveBuffer: no slicing) at most a head and one read
    if max_bytes:
        window = window[: max_bytes + 4]
    window = window.lstrip(b"\r\n")  # empty lines before a request line are ignored
    head_length = _head_end(window)  # the head is window[:head_length]; counted in place
    if head_length < 0:
        if max_bytes and len(window) > max_bytes:
            return False, "Request header fields too large"
        return False, None
    if max_bytes and head_length > max_bytes:
        return True, "Request header fields too large"
    if limits.max_header_count and \
            window.count(b"\n", 0, head_length) > limits.max_header_count:
        return True, "Too many request header fields"
    return True, None


URI_TOO_LONG = "Request target too long"


def _request_line_too_long(buf: bytearray, max_bytes: int) -> bool:
    """Whether the request line alone is over ``max_bytes`` (its end not within them)."""
    if not max_bytes:
        return False
    window = _prefix(buf, max_bytes + 256).lstrip(b"\r\n")
    end = window.find(b"\n")
    return (end < 0 and len(window) > max_bytes) or end > max_bytes


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
        if event.data and _head_listener is not None:
            _head_listener(self.conn.id)
        state = _state()
        limits = state.limits
        complete, problem = _head_problem(self.buf, limits)
        if problem is not None:
            method, url = _head_context(self.buf, state)
            status = 431
            if _request_line_too_long(self.buf, limits.max_header_bytes):
                # RFC 9112 §3: a request-target longer than the server parses MUST get 414
                status, problem, method, url = 414, URI_TOO_LONG, method, ""
            body = error_body(status, ERROR_NAMES.get(status, "Error"), problem, method, url)
            register_error(problem, status, body, tuple(state.security_headers.items()))
            yield commands.SendData(self.conn, _http1.make_error_response(status, problem))
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
    log.debug("closing a client connection whose request head was incomplete after %.1fs",
              time.monotonic() - started)
    close_client(client_id, "request header timeout")


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


# -- (4) answer a refusal decided on the request head, before the body -----------------------
_original_check_killed: Callable[..., object] | None = None


def expects_body(request: http.Request) -> bool:
    """Whether a body follows this request head (Content-Length > 0 or chunked)."""
    try:
        return http1.expected_http_body_size(request) != 0
    except ValueError:
        return True


def _check_killed_or_answer_from_head(self: http_layers.HttpStream, emit_error_hook: bool):  # type: ignore[no-untyped-def]
    """mitmproxy calls ``check_killed(True)`` right after the ``requestheaders`` hook. If that
    hook set a response (a refusal) and a body is to follow, send the response now with
    ``Connection: close``, before any ``100 Continue``, and drop the body as it arrives."""
    assert _original_check_killed is not None
    killed = yield from _original_check_killed(self, emit_error_hook)  # type: ignore[misc]
    if killed or not emit_error_hook:
        return killed
    flow = self.flow
    if (self.client_state != self.state_wait_for_request_headers or flow.response is None
            or not expects_body(flow.request)):
        return False
    flow.response.headers["Connection"] = "close"
    self.client_state = _drop_request_body.__get__(self)
    flow.response.timestamp_start = time.time()
    yield http_layers.HttpResponseHeadersHook(flow)
    yield from self.send_response()
    if _linger_listener is not None:
        _linger_listener(self.context.client.id)
    return True


def _drop_request_body(self: http_layers.HttpStream, event: events.Event):  # type: ignore[no-untyped-def]
    """``client_state`` of a request answered from its head: its body is read and dropped
    (never buffered); at its end the stream finishes as usual (the connection then closes).
    Each piece tells ``addons/edge.py``, which closes the connection once the client has sent
    nothing for a few seconds (a client that stops half-way would otherwise hold it until the
    idle timeout)."""
    if isinstance(event, http_layers.RequestData) and _linger_listener is not None:
        _linger_listener(self.context.client.id)
    if isinstance(event, http_layers.RequestEndOfMessage):
        self.client_state = self.state_done
        if self.server_state == self.state_done:
            yield from self.flow_done()
    yield from ()


# -- (5) (6) chunked bodies: bounded lines, trailers as events ------------------------------------
CHUNK_LINE_TOO_LONG = "Chunk size line longer than stagedoor.limits.maxChunkLineBytes"
TRAILERS_TOO_LARGE = "Trailer section larger than stagedoor.limits.maxHeaderBytes"
MALFORMED_CHUNKED = "Malformed chunked request body"
_original_read_body: Callable[..., object] | None = None
_original_make_body_reader: Callable[..., object] | None = None


def _prefix(buf: object, size: int) -> bytes:
    data = getattr(buf, "_data", None)  # h11's ReceiveBuffer keeps its bytes there
    if isinstance(data, bytearray):
        return bytes(data[:size])
    return bytes(buf)[:size]  # type: ignore[call-overload]


class BoundedChunkedReader(ChunkedReader):
    """h11's chunked reader with a bound on the chunk-size line (extensions included) and on
    the trailer section, and trailers kept aside instead of handed to mitmproxy (see (6))."""

    def __init__(self, max_line: int, max_trailer: int) -> None:
        super().__init__()
        self.max_line = max_line
        self.max_trailer = max_trailer
        self.violation: tuple[int, str] | None = None
        self.trailers: list[tuple[bytes, bytes]] | None = None

    def __call__(self, buf):  # type: ignore[no-untyped-def]
        size = len(buf)
        if self._reading_trailer:
            if self.max_trailer and size > self.max_trailer:
                head = _prefix(buf, self.max_trailer + 4)
                if not head.startswith(b"\r\n") and b"\r\n\r\n" not in head:
                    self.violation = (431, TRAILERS_TOO_LARGE)
                    raise h11.RemoteProtocolError(TRAILERS_TOO_LARGE)
        elif (not self._bytes_to_discard and self._bytes_in_chunk == 0 and self.max_line
              and size > self.max_line and b"\n" not in _prefix(buf, self.max_line + 2)):
            self.violation = (413, CHUNK_LINE_TOO_LONG)
            raise h11.RemoteProtocolError(CHUNK_LINE_TOO_LONG)
        try:
            event = super().__call__(buf)
        except h11.ProtocolError:
            if self.violation is None:  # (a nested call may have set a more exact one)
                self.violation = (400, MALFORMED_CHUNKED)  # answered, not just closed
            raise
        if isinstance(event, h11.EndOfMessage) and event.headers:
            self.trailers = [(bytes(name), bytes(value)) for name, value in event.headers]
            return h11.EndOfMessage()
        return event


def _make_body_reader(expected_size: int | None):  # type: ignore[no-untyped-def]
    if expected_size is None:
        max_trailer = _state().limits.max_header_bytes if _state is not None else 0
        return BoundedChunkedReader(_edge().max_chunk_line_bytes, max_trailer)
    assert _original_make_body_reader is not None
    return _original_make_body_reader(expected_size)


def _read_body_with_trailers(self: _http1.Http1Connection, event: events.Event):  # type: ignore[no-untyped-def]
    """mitmproxy's ``read_body``, with (5)'s trailers passed on as a trailers event right
    before the end of the message, and (5)'s 413/431 written before the connection closes."""
    assert _original_read_body is not None
    reader = self.body_reader
    inner = _original_read_body(self, event)  # type: ignore[misc]
    if not isinstance(reader, BoundedChunkedReader):
        return (yield from inner)
    result = None
    while True:
        try:
            command = inner.send(result)
        except StopIteration as stop:
            return stop.value
        if reader.violation is not None and isinstance(command, commands.CloseConnection) \
                and isinstance(self, _http1.Http1Server):
            status, message = reader.violation
            reader.violation = None
            method, url = "", ""
            state = _state() if _state is not None else None
            if self.request is not None and state is not None:
                method, url = self.request.method, _url_for(self.request.path, state)
            register_error(message, status, error_body(status, ERROR_NAMES[status], message,
                                                       method, url),
                           _current_security_headers())
            yield commands.SendData(self.conn, _http1.make_error_response(status, message))
        elif reader.trailers is not None and isinstance(command, ReceiveHttp) and isinstance(
                command.event, (http_layers.RequestEndOfMessage,
                                http_layers.ResponseEndOfMessage)):
            kind = (http_layers.RequestTrailers
                    if isinstance(command.event, http_layers.RequestEndOfMessage)
                    else http_layers.ResponseTrailers)
            trailers = http.Headers(reader.trailers)
            reader.trailers = None
            yield ReceiveHttp(kind(command.event.stream_id, trailers))
        result = yield command


# -- (11) interim 1xx answers from an upstream ---------------------------------------------------
_original_client_read_headers: Callable[..., object] | None = None
_HOP_BY_HOP_1XX = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                             b"trailer", b"transfer-encoding", b"upgrade", b"content-length",
                             b"proxy-authenticate"})
_interim_listener: Callable[[int, bool], None] | None = None


def interim_head(data: bytes) -> tuple[int, bytes] | None:
    """(status, the whole head) when ``data`` starts with a complete interim (1xx, not 101)
    response head; None otherwise (another answer, or not complete yet)."""
    if not data.startswith(b"HTTP/1.") or data[12:13] not in (b" ", b"\r", b"\n") \
            or not data[9:12].isdigit() or data[9:10] != b"1" or data[9:12] == b"101":
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    return int(data[9:12]), data[:end + 4]


def forwardable_interim(head: bytes) -> bytes:
    """An upstream's interim head as it goes to the client: status line rebuilt, hop-by-hop
    and malformed fields left out."""
    lines = head[:-4].split(b"\r\n")
    out = [b"HTTP/1.1 " + lines[0][9:12] + b" " + (lines[0][13:].strip() or b"Informational")]
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not is_token(name) or any(c in value for c in (b"\r"[0], b"\n"[0], 0)):
            continue
        if name.lower() in _HOP_BY_HOP_1XX:
            continue
        out.append(name + b": " + value.strip())
    return b"\r\n".join(out) + b"\r\n\r\n"


def _read_response_headers(self: _http1.Http1Client, event: events.Event):  # type: ignore[no-untyped-def]
    assert _original_client_read_headers is not None
    if isinstance(event, events.DataReceived) and self.request is not None:
        while True:
            found = interim_head(_prefix(self.buf, 65536))
            if found is None:
                break
            status, head = found
            self.buf.maybe_extract_lines()  # exactly that head
            forward = status in (102, 103) and self.request.http_version == "HTTP/1.1"
            if forward:
                yield commands.SendData(self.context.client, forwardable_interim(head))
            if _interim_listener is not None:
                _interim_listener(status, forward)
    return (yield from _original_client_read_headers(self, event))  # type: ignore[misc]


# -- (8) a crash inside a connection's layers ----------------------------------------------------
CRASH_MESSAGE = "mitmproxy has crashed!"
_crash_listener: Callable[[server.ConnectionHandler, BaseException | None], None] | None = None


class CrashWatch(logging.Filter):
    """On mitmproxy's "mitmproxy has crashed!" record (``mitmproxy.proxy.server``), find the
    connection it is about and hand it to the crash listener (``addons/edge.py``), which answers
    and closes it. The record itself goes on (the log throttle keeps a flood down)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _crash_listener is not None and record.msg == CRASH_MESSAGE:
            peer = getattr(record, "client", None)
            exc = record.exc_info[1] if record.exc_info else None
            for handler in _handlers():
                if handler.client.peername == peer:
                    _crash_listener(handler, exc)
                    break
        return True


def _handlers() -> list[server.ConnectionHandler]:
    from mitmproxy import ctx

    proxyserver = ctx.master.addons.get("proxyserver")
    return list(getattr(proxyserver, "connections", {}).values())


_crash_watch = CrashWatch()


def check_internals() -> None:
    """Raise RuntimeError naming every private piece of mitmproxy this module needs that is
    missing (a mitmproxy upgrade moved it): better no start than a half-working proxy."""
    from mitmproxy.addons.proxyserver import Proxyserver

    needed = {
        "_http1.make_error_response": getattr(_http1, "make_error_response", None),
        "_http1.make_body_reader": getattr(_http1, "make_body_reader", None),
        "_http1.Http1Server.read_headers": getattr(_http1.Http1Server, "read_headers", None),
        "_http1.Http1Connection.read_body": getattr(_http1.Http1Connection, "read_body", None),
        "_http1.Http1Client.read_headers": getattr(_http1.Http1Client, "read_headers", None),
        "HttpStream.check_body_size": getattr(http_layers.HttpStream, "check_body_size", None),
        "HttpStream.check_killed": getattr(http_layers.HttpStream, "check_killed", None),
        "HttpStream.send_response": getattr(http_layers.HttpStream, "send_response", None),
        "HttpStream.flow_done": getattr(http_layers.HttpStream, "flow_done", None),
        "HttpStream.state_wait_for_request_headers": getattr(
            http_layers.HttpStream, "state_wait_for_request_headers", None),
        "ConnectionHandler.close_connection": getattr(server.ConnectionHandler,
                                                      "close_connection", None),
        "Proxyserver.connections": getattr(Proxyserver(), "connections", None),
        "h11 ChunkedReader state": all(hasattr(ChunkedReader(), a) for a in (
            "_bytes_in_chunk", "_bytes_to_discard", "_reading_trailer")) or None,
    }
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise RuntimeError("mitmproxy internals changed (see addons/mitm_internals.py): "
                           + ", ".join(missing) + " missing")


def install_edge(edge: Callable[[], EdgeSettings],
                 on_head_started: Callable[[str], None] | None = None,
                 on_crash: Callable[[server.ConnectionHandler, BaseException | None], None]
                 | None = None,
                 on_interim: Callable[[int, bool], None] | None = None,
                 on_linger: Callable[[str], None] | None = None) -> None:
    """Providers for (2)-(8) from ``addons/edge.py``: ``edge()`` answers the connection limits
    now serving; ``on_head_started(client_id)`` is called when bytes of a request head arrive;
    ``on_crash(handler, exception)`` when a connection's layers crashed; ``on_linger(client_id)``
    when a refusal was sent from the head (4) and then for every piece of its body dropped. A
    later call replaces them."""
    global _edge, _head_listener, _crash_listener, _interim_listener, _linger_listener
    _edge = edge
    _head_listener = on_head_started
    _linger_listener = on_linger
    _crash_listener = on_crash
    _interim_listener = on_interim
    _install_limits()


def _install_limits() -> None:
    """Install (2)-(6) and (8) once (they read ``_state()`` and ``_edge()`` per use)."""
    global _original_read_headers, _original_check_body_size, _original_check_killed
    global _original_read_body, _original_make_body_reader, _original_client_read_headers
    if _original_read_headers is not None:
        return
    check_internals()
    h1server, stream, h1conn = _http1.Http1Server, http_layers.HttpStream, _http1.Http1Connection
    _original_read_headers = h1server.read_headers
    _original_check_body_size = stream.check_body_size
    _original_check_killed = stream.check_killed
    _original_read_body = h1conn.read_body
    _original_make_body_reader = _http1.make_body_reader
    _original_client_read_headers = _http1.Http1Client.read_headers
    _http1.Http1Client.read_headers = _read_response_headers  # type: ignore[method-assign]
    h1server.read_headers = _limited_read_headers  # type: ignore[method-assign]
    stream.check_body_size = _limited_check_body_size  # type: ignore[method-assign]
    stream.check_killed = _check_killed_or_answer_from_head  # type: ignore[method-assign]
    h1conn.read_body = _read_body_with_trailers  # type: ignore[method-assign]
    _http1.make_body_reader = _make_body_reader  # type: ignore[assignment]
    logging.getLogger("mitmproxy.proxy.server").addFilter(_crash_watch)
