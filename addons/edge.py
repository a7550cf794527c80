"""Edge hygiene as mitmproxy addons: the request head, connection limits, trailers, crashes.

:class:`Edge` (after the gateway in the chain) applies what the pure core decides:

- The request head itself is judged by the gateway (``addons/gateway.py``, with
  :func:`stagedoor.head.check_head` and ``resolve``) in ``requestheaders``; a refusal is sent
  before any body is read (``addons/mitm_internals.py`` (4)).
- connections (``client_connected`` / ``client_disconnected``): at most
  ``maxConnectionsPerClient`` per peer address and ``maxConnections`` in all; an idle keep-alive
  connection is closed after ``idleTimeoutSeconds``; a body not complete ``bodyTimeoutSeconds``
  after its head gets 408 and the connection is closed. A request refused from its head while
  its body is still coming (a 401, 403 or 413 sent before the body) says ``Connection: close``;
  its body is read and dropped, and the connection is closed once the client has sent nothing
  for ``LINGER_SECONDS`` (as nginx's ``lingering_timeout``), not held until the idle timeout.
- trailers (chunked requests and answers): never forwarded either way, counted and logged with
  the request id.
- ``error``: a client that hung up is recorded as 499 (``check: client``), not as an upstream
  502; the 413/431 of an over-long chunk line or trailer section, the 408 of a slow body and the
  500 of a crash are recorded as such (access log and metrics read ``flow.metadata``).
- a crash inside a connection's layers (mitmproxy logs "mitmproxy has crashed!") answers JSON 500
  if nothing was sent yet, closes the connection, and its flows end through the ``error`` hook,
  so the access log, metrics and ``requests_in_flight`` see them.

Every cause is counted (``stagedoor_edge_events_total{cause}``) and logged through
:class:`stagedoor.edge.LogThrottle`: one line per cause per interval, with a count.

:class:`PlainListenerOnly` (before mitmproxy's ``NextLayer``) closes a connection that starts with
a TLS record: the listener is plain HTTP, and mitmproxy would otherwise answer the handshake with
a certificate of its own CA for any name and tell the upstream ``X-Forwarded-Proto: https``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy import flow as mflow
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import HttpErrorHook

from stagedoor.edge import ConnectionBook, EdgeSettings, LogThrottle, http_date
from stagedoor.errors import ERROR_NAMES, error_body, utf8_safe
from stagedoor.head import VIA, finish_response_head
from stagedoor.logsetup import redact_target
from stagedoor.runtime import Runtime

from . import mitm_internals
from .gateway import new_record
from .record import FlowRecord, record_of

log = logging.getLogger("stagedoor.edge")

CRASHED = "stagedoor: the connection handler crashed"
BODY_TIMED_OUT = "stagedoor: request body not complete within stagedoor.limits.bodyTimeoutSeconds"
#: After a refusal sent from the head, how long the rest of its body may pause before the
#: connection is closed (at most the idle timeout). A client that sends its whole body first and
#: reads the answer after still gets it: the body is read and dropped while it keeps coming.
LINGER_SECONDS = 5.0


@dataclass(slots=True)
class _Conn:
    """What the edge knows about one client connection."""

    address: str
    flows: list[http.HTTPFlow] = field(default_factory=list)
    idle_timer: asyncio.TimerHandle | None = None
    body_timer: asyncio.TimerHandle | None = None
    linger_timer: asyncio.TimerHandle | None = None


class Edge:
    """mitmproxy addon: see the module docstring. Must come after the gateway."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.book = ConnectionBook()
        self.conns: dict[str, _Conn] = {}
        self.events: dict[str, int] = {}
        self._counter: Any = None
        self.throttle = LogThrottle()

    # -- settings --------------------------------------------------------------------------------
    def settings(self) -> EdgeSettings:
        """The connection limits of the state now serving (a reload brings new ones)."""
        return self.runtime.state.settings.edge

    def count(self, cause: str) -> None:
        self.events[cause] = self.events.get(cause, 0) + 1
        if self._counter is not None:
            self._counter.labels(cause).inc()

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        mitm_internals.install_edge(self.settings, self._head_started, self._crashed,
                                    self._interim, self._lingering)

    def _interim(self, status: int, forwarded: bool) -> None:
        self.count(f"interim_{status}_{'forwarded' if forwarded else 'dropped'}")

    def running(self) -> None:
        root = logging.getLogger()
        for handler in root.handlers:
            if self.throttle not in handler.filters:
                handler.addFilter(self.throttle)
        metrics = ctx.master.addons.get("metrics")
        registry = getattr(metrics, "registry", None)
        if registry is not None and self._counter is None:
            from prometheus_client import Counter

            self._counter = Counter(
                "stagedoor_edge_events", "Connection and request-head events at the edge, by "
                "cause (refusals, dropped fields and trailers, timeouts, client aborts, crashes)",
                ["cause"], registry=registry)
            for cause, n in self.events.items():
                self._counter.labels(cause).inc(n)

    # -- connections -----------------------------------------------------------------------------
    def client_connected(self, client: connection.Client) -> None:
        address = client.peername[0] if client.peername else ""
        refused = self.book.admit(address, self.settings())
        if refused is not None:
            client.error = refused
            self.count("connection_refused_total" if "maxConnections " in refused
                       else "connection_refused_per_client")
            log.warning("refusing a connection from %s: %s", address, refused)
            return
        conn = self.conns[client.id] = _Conn(address)
        self._arm_idle(client.id, conn)

    def client_disconnected(self, client: connection.Client) -> None:
        conn = self.conns.pop(client.id, None)
        if conn is None:
            return
        self.book.release(conn.address)
        _cancel(conn.idle_timer)
        _cancel(conn.body_timer)
        _cancel(conn.linger_timer)
        leaked = [f for f in conn.flows if f.error is None and f.response is None]
        conn.flows.clear()
        for flow in leaked:  # ended without a response or error hook: finish them here
            if flow.error is None:
                record = record_of(flow.metadata)
                flow.error = mflow.Error(CRASHED if record is not None and record.crashed
                                         else "Client disconnected.")
            asyncio.get_running_loop().create_task(
                ctx.master.addons.handle_lifecycle(HttpErrorHook(flow)))

    def _head_started(self, client_id: str) -> None:
        conn = self.conns.get(client_id)
        if conn is not None and conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None

    def _arm_idle(self, client_id: str, conn: _Conn) -> None:
        _cancel(conn.idle_timer)
        conn.idle_timer = None
        timeout = self.settings().idle_timeout
        if timeout and not conn.flows:
            conn.idle_timer = asyncio.get_running_loop().call_later(
                timeout, self._idle_expired, client_id)

    def _idle_expired(self, client_id: str) -> None:
        conn = self.conns.get(client_id)
        if conn is None or conn.flows:
            return
        conn.idle_timer = None
        self.count("idle_timeout")
        log.debug("closing a keep-alive connection from %s idle for %gs", conn.address,
                  self.settings().idle_timeout)
        mitm_internals.close_client(client_id, "idle timeout")

    def _lingering(self, client_id: str) -> None:
        """A refusal left from the head, or a piece of its body arrived (and was dropped)."""
        conn = self.conns.get(client_id)
        if conn is None:
            return
        _cancel(conn.linger_timer)
        idle = self.settings().idle_timeout
        conn.linger_timer = asyncio.get_running_loop().call_later(
            min(LINGER_SECONDS, idle) if idle else LINGER_SECONDS, self._linger_expired,
            client_id)

    def _linger_expired(self, client_id: str) -> None:
        conn = self.conns.get(client_id)
        if conn is None:
            return
        conn.linger_timer = None
        self.count("linger_timeout")
        log.debug("closing a connection from %s: the body of a refused request paused for "
                  "%gs", conn.address, LINGER_SECONDS)
        mitm_internals.close_client(client_id, "linger timeout")

    # -- request head ----------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        conn = self.conns.get(flow.client_conn.id)
        if conn is None:
            return
        _cancel(conn.idle_timer)
        conn.idle_timer = None
        conn.flows.append(flow)
        record = record_of(flow.metadata)
        if record is not None and record.dropped_fields:
            self.count("underscore_field_dropped")
        if record is not None and record.check == "head":
            self.count("head_refused")
        timeout = self.settings().body_timeout
        if timeout and flow.error is None and _framed(flow.request.headers.fields) \
                and mitm_internals.expects_body(flow.request):
            _cancel(conn.body_timer)
            conn.body_timer = asyncio.get_running_loop().call_later(
                timeout, self._body_expired, flow)

    def _body_expired(self, flow: http.HTTPFlow) -> None:
        conn = self.conns.get(flow.client_conn.id)
        if conn is not None:
            conn.body_timer = None
        if flow.error is not None or not flow.live:
            return
        self.count("body_timeout")
        timeout = self.settings().body_timeout
        log.info("closing a connection from %s: request body not complete after %gs",
                 conn.address if conn else "?", timeout)
        answer = b""
        if flow.response is None:
            record = self._record(flow)
            record.body_timed_out = True
            answer = error_page(408, "Request body not complete in time", flow.request.method,
                                self._url(flow.request.path), record.request_id)
        mitm_internals.close_client(flow.client_conn.id, "body timeout", answer)

    def _record(self, flow: http.HTTPFlow) -> FlowRecord:
        record = record_of(flow.metadata)
        if record is None:  # a flow the gateway never saw (mitmproxy refused its head)
            record = new_record(flow, self.runtime.state)
        return record

    # -- request / response ----------------------------------------------------------------------
    def request(self, flow: http.HTTPFlow) -> None:
        conn = self.conns.get(flow.client_conn.id)
        if conn is not None:
            _cancel(conn.body_timer)
            conn.body_timer = None
        if flow.request.trailers:
            self._drop_trailers(flow, flow.request, "request")
        record = record_of(flow.metadata)
        if flow.response is None and record is not None and record.forwarded:
            flow.request.headers.fields += (VIA,)  # RFC 9110 §7.6.3, a gateway MUST

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A streamed answer's head leaves before the response hook: finish it here.
        if flow.response is not None and flow.response.stream:
            self._finish_head(flow, None)

    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is not None:
            if resp.trailers:
                self._drop_trailers(flow, resp, "response")
            if not resp.stream:
                self._finish_head(flow, len(resp.raw_content or b""))
        self._flow_ended(flow)

    def _finish_head(self, flow: http.HTTPFlow, body_length: int | None) -> None:
        resp = flow.response
        assert resp is not None
        if flow.request.method == "HEAD":
            body_length = None  # keep what the upstream said the body would be
        resp.headers.fields = finish_response_head(resp.headers.fields,
                                                   flow.request.http_version, body_length,
                                                   http_date())

    def _drop_trailers(self, flow: http.HTTPFlow, message: http.Message, which: str) -> None:
        names = sorted({name.decode("latin-1").lower() for name, _ in message.trailers.fields})
        message.trailers = None
        self.count(f"trailers_dropped_{which}")
        record = record_of(flow.metadata)
        log.info("dropped the %s trailer section (%s) of request %s: trailers are never "
                 "forwarded", which, ", ".join(names)[:200],
                 record.request_id if record else "?")

    def error(self, flow: http.HTTPFlow) -> None:
        record = self._record(flow)
        message = flow.error.msg if flow.error else ""
        lower = message.lower()
        status: int | None = None
        if record.crashed or message == CRASHED:
            status, check, cause = 500, "internal", "crash"
        elif record.body_timed_out:
            status, check, cause = 408, "client", "body_timeout_answered"
        elif mitm_internals.CHUNK_LINE_TOO_LONG in message:
            status, check, cause = 413, "limits", "chunk_line_too_long"
        elif mitm_internals.TRAILERS_TOO_LARGE in message:
            status, check, cause = 431, "limits", "trailers_too_large"
        elif mitm_internals.BODY_TOO_LARGE in message:
            status, check, cause = 413, "limits", "body_too_large"
            flow.response = None  # a refusal set at the head was not sent: the 413 was
        elif flow.response is None and ("client disconnected" in lower or (
                "peer closed connection" in lower
                and not flow.client_conn.state & connection.ConnectionState.CAN_READ)):
            status, check, cause = 499, "client", "client_abort"
        elif record.status is None and flow.response is None:
            status, check, cause = 400, "parser", "malformed_request"
        if status is not None:
            self.count(cause)
            record.failed(check, status, cause)  # the cause only: the message may quote bytes
            if status not in (499, 500):
                record.outcome = "deny"
            level = logging.ERROR if status == 500 else logging.DEBUG
            log.log(level, "request %s ended with %d (%s): %s", record.request_id, status,
                    check, message, extra={"request_id": record.request_id})
        self._flow_ended(flow)

    def _flow_ended(self, flow: http.HTTPFlow) -> None:
        conn = self.conns.get(flow.client_conn.id)
        if conn is None:
            return
        if flow in conn.flows:
            conn.flows.remove(flow)
        if flow.response is not None or flow.error is not None:
            _cancel(conn.body_timer)
            conn.body_timer = None
        self._arm_idle(flow.client_conn.id, conn)

    # -- crashes ---------------------------------------------------------------------------------
    def _crashed(self, handler: Any, exc: BaseException | None) -> None:
        client_id = handler.client.id
        conn = self.conns.get(client_id)
        flows = list(conn.flows) if conn else []
        answer = b""
        for flow in flows:
            record = self._record(flow)
            record.crashed = True
            if flow.response is None and not answer:
                answer = error_page(500, "Internal error", flow.request.method,
                                    self._url(flow.request.path), record.request_id)
        self.count("crash")
        ids = ", ".join(self._record(f).request_id for f in flows) or "none"
        log.error("connection from %s crashed (%s), request(s) %s; answered 500 and closed",
                  handler.client.peername, type(exc).__name__ if exc else "?", ids)
        asyncio.get_running_loop().call_soon(mitm_internals.close_client, client_id,
                                             "crashed", answer)

    def _url(self, target: str) -> str:
        return utf8_safe(redact_target(target if target.startswith("/") else "/",
                                       self.runtime.state.settings.redacted_query_keys))


def error_page(status: int, message: str, method: str, url: str, request_id: str) -> bytes:
    """A whole JSON error response (head and body) to write to a client directly."""
    body = error_body(status, ERROR_NAMES.get(status, "Error"), message, utf8_safe(method), url)
    mitm_internals.register_error(message, status, body, (("X-Request-Id", request_id),))
    return mitm_internals.json_error_response(status, message)


#: The request header names that can announce a body (mitmproxy's expected_http_body_size).
_FRAMING_NAMES = (b"content-length", b"transfer-encoding")


def _framed(fields: tuple[tuple[bytes, bytes], ...]) -> bool:
    """False when no field can announce a body (no Content-Length, no Transfer-Encoding): then
    mitmproxy's ``expected_http_body_size`` says 0 for a request, and its two header lookups
    (each rescanning and re-lowercasing every field) are skipped. A non-ASCII name is left to
    mitmproxy (its names are compared as lowercased text)."""
    return any(name.lower() in _FRAMING_NAMES or not name.isascii() for name, _ in fields)


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


# -- TLS on the plain listener ---------------------------------------------------------------------
class _Refused(layer.Layer):
    """A layer that closes the client connection at once and ignores everything else."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


class PlainListenerOnly:
    """mitmproxy addon (before ``NextLayer``): a connection that starts with a TLS record
    (content type 0x16, a ClientHello) is closed, never answered with a minted certificate."""

    def __init__(self, edge: Edge | None = None) -> None:
        self.edge = edge

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        data = nextlayer.data_client()
        if data[:1] == b"\x16":
            peer = nextlayer.context.client.peername
            log.warning("refusing a TLS handshake from %s: the listener is plain HTTP",
                        peer[0] if peer else "?")
            if self.edge is not None:
                self.edge.count("tls_refused")
            nextlayer.layer = _Refused(nextlayer.context)
