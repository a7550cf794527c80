"""The policy gateway: turns each flow into a :class:`~stagedoor.decide.GatewayRequest`, runs
``resolve`` and writes the decision back (a local answer, a JSON error, or an upstream rewrite).

Everything is decided on the request head, in the ``requestheaders`` hook, before a byte of the
body is read: first what of the head is acceptable (:func:`stagedoor.head.check_head`), then
credentials, route and method (``resolve``). A refusal or local answer is sent at once (for a
request with a body, ``addons/mitm_internals.py`` (4) sends it before any ``100 Continue`` and
drops the body as it arrives); a forward waits for the ``request`` hook, when the body is in.

Hooks stay cheap: all parsing, compiling and encoding happened when the
:class:`~stagedoor.runtime.State` was built.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable
from typing import Any

from mitmproxy import ctx, http

from stagedoor import forwarding
from stagedoor.body import check_body, check_body_head, is_json_type
from stagedoor.decide import (
    API_PREFIX,
    Answer,
    Decision,
    Deny,
    Forward,
    GatewayRequest,
    Upstream,
    refuse,
)
from stagedoor.errors import JSON_CONTENT_TYPE, ApiError, render_error
from stagedoor.errors import utf8_safe as _utf8_safe
from stagedoor.head import HeadRefusal, apply, check_head
from stagedoor.identity import Caller, IdentityError
from stagedoor.logsetup import current_request_id, redact_target
from stagedoor.resolve import resolve
from stagedoor.response_rules import ResponseRule, content_type_of
from stagedoor.runtime import Runtime, State

from . import mitm_internals, ratelimit
from .record import META, FlowRecord, record_of

__all__ = ["META", "Gateway"]

log = logging.getLogger("stagedoor.gateway")

_INTERNAL_ERROR = (b'{"error":{"name":"Error","message":"Internal error"},'
                   b'"request":{"method":"","url":""},"response":{"statusCode":500}}')


class Gateway:
    """mitmproxy addon: one concern, the request pipeline (docs/design.md).

    Each flow captures ``runtime.state`` once, in its :class:`FlowRecord`, and everything done
    for it (decision, forwarding, response headers, error pages) reads that state only.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        # JSON error pages and stagedoor.limits for what mitmproxy answers itself (malformed or
        # oversized heads, bodies over the limit): read from the state current at that moment.
        mitm_internals.install(self._current_state, error_url)

    def _current_state(self) -> State:
        return self.runtime.state

    def running(self) -> None:
        state = self.runtime.state
        # Answers larger than this are streamed to the client, never buffered whole (at start).
        stream = state.limits.stream_response_bytes
        ctx.options.update(stream_large_bodies=str(stream) if stream else None)
        # Prefetch key sets in the background: an identity provider that is down at start must
        # not keep the proxy from serving (requests that need its keys get 503 meanwhile).
        self._prefetch = asyncio.get_running_loop().create_task(
            state.verifier.prefetch(), name="stagedoor-jwks-prefetch")

    # -- request ---------------------------------------------------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Decide on the head: refusals and local answers leave before any body is read."""
        if flow.response or flow.error:
            return
        record = new_record(flow, self.runtime.state)
        current_request_id.set(record.request_id)  # for lines logged deep inside (logsetup.py)
        try:
            await self._decide_head(flow, record)
        except Exception:  # fail closed: a bug here must never forward anything
            self._internal_error(flow, record)

    async def request(self, flow: http.HTTPFlow) -> None:
        """The body is in: forward what the head decision allowed."""
        if flow.response or flow.error:
            return
        record = record_of(flow.metadata)
        if record is None:  # no requestheaders hook ran (a replayed or injected flow)
            record = new_record(flow, self.runtime.state)
            await self._guarded(flow, record, self._decide_head)
            if flow.response:
                return
        decision = record.decision
        if isinstance(decision, Forward) and decision.route is not None \
                and decision.route.body is not None:
            # The body is in: check it before anything leaves (the route's body: rules).
            problem = check_body(decision.route.body, flow.request.headers.get("content-type"),
                                 flow.request.headers.get("content-encoding"),
                                 flow.request.raw_content or b"")
            if problem is not None:
                denied = Deny(decision.context, problem, "body")
                record.decided(denied)
                self._respond_error(flow, problem, denied.url, record.state)
                return
        if isinstance(decision, Forward):
            current_request_id.set(record.request_id)  # for lines logged deep inside
            try:
                self._forward(flow, record, decision)
            except Exception:  # fail closed: a bug here must never forward anything
                self._internal_error(flow, record)

    async def _guarded(self, flow: http.HTTPFlow, record: FlowRecord, step: Any) -> None:
        current_request_id.set(record.request_id)  # for lines logged deep inside (logsetup.py)
        try:
            await step(flow, record)
        except Exception:  # fail closed: a bug here must never forward anything
            self._internal_error(flow, record)

    def _internal_error(self, flow: http.HTTPFlow, record: FlowRecord) -> None:
        """Called from an ``except`` block: log it, answer a JSON 500, never forward."""
        log.exception("internal error while handling %s %s", flow.request.method,
                      redact_target(record.target,
                                    record.state.settings.redacted_query_keys),
                      extra={"request_id": record.request_id})
        self._cancel_timer(flow)
        record.decision = None
        record.failed("internal", reason="internal error (see the log line with this "
                      "request_id)")
        try:
            self._respond_error(flow, ApiError(500, "Internal error"), flow.request.path,
                                record.state)
        except Exception:  # not even an error page: a fixed one, never "carry on"
            flow.response = http.Response.make(500, _INTERNAL_ERROR, _header_fields(
                [("Content-Type", JSON_CONTENT_TYPE)]))

    async def _decide_head(self, flow: http.HTTPFlow, record: FlowRecord) -> None:
        req = flow.request
        state = record.state
        verdict = check_head(req.method, req.authority, req.path, req.http_version,
                             req.headers.fields, state.settings.edge.head_rules)
        if isinstance(verdict, HeadRefusal):
            target = req.path if req.path.startswith("/") else "/"
            decision: Decision = refuse(_mount_relative(target, state), "head",
                                        ApiError(verdict.status, verdict.message),
                                        verdict.reason)
        else:
            if verdict.drop:  # header fields with underscores (stagedoor.headersWithUnderscores)
                req.headers.fields = apply(req.headers.fields, verdict)
                log.debug("dropped header fields with underscores: %s",
                          ", ".join(verdict.dropped_names))
                record.dropped_fields = len(verdict.drop)
            # Backstage's limiters (backend.rateLimit) first: they count every request.
            if state.ratelimit.backstage_enabled:
                refused = await ratelimit.limit_head(flow, record, error_url(req.path, state))
                if refused is not None:
                    record.decided(refused)
                    return
            decision = await resolve(GatewayRequest(req.method, record.target,
                                                    record.authorization), state)
            # The policy's rateLimit rules, once the request is authenticated and routed.
            rules = ratelimit.rules_for(record, decision)
            if rules:
                decision = await ratelimit.limit_decided(flow, record, decision, rules)
            if isinstance(decision, Forward) and decision.route is not None \
                    and decision.route.body is not None:
                # The route's body rules, as far as the head tells (type, encoding, declared
                # length): refused before the body is read.
                problem = check_body_head(decision.route.body, req.headers.get("content-type"),
                                          req.headers.get("content-encoding"),
                                          _content_length(req.headers))
                if problem is not None:
                    decision = Deny(decision.context, problem, "body")
        record.decided(decision)
        if decision.dry_run:
            for note in decision.dry_run:
                log.warning("dry-run: %s %s: %s", req.method, decision.url.partition("?")[0],
                            note, extra={"request_id": record.request_id})
        if flow.response is not None:  # refused by a rate limit rule, and answered
            return
        match decision:
            case Forward():
                pass  # in the request hook, once the body is in
            case Answer(local=local):
                flow.response = http.Response.make(local.status, local.body,
                                                   _header_fields(local.headers))
            case Deny(error=error):
                if decision.reason:
                    log.debug("%s %s denied at %s: %s", req.method,
                              decision.url.partition("?")[0], decision.check, decision.reason,
                              extra={"request_id": record.request_id})
                self._respond_error(flow, error, decision.url, state)

    def _forward(self, flow: http.HTTPFlow, record: FlowRecord, decision: Forward) -> None:
        req = flow.request
        up = decision.upstream
        peer = flow.client_conn.peername
        state = record.state  # the header policy of the state this request was decided on
        principal = decision.principal
        # The verified token (only with a principal: an open route may carry anything), as
        # decide() read it from the same Authorization values.
        token = decision.token if principal else None
        caller = Caller(principal, token, record.request_id, decision.context.plugin_id or "")
        try:
            head = forwarding.upstream_fields(
                req.headers.fields, identity=state.identity_for(decision.route), caller=caller,
                host=up.host_header, policy=state.forwarding,
                client=forwarding.Client(peer[0] if peer else "",
                                         flow.client_conn.tls_established),
                # The route's upstream.headers (credentials from app-config): the client's
                # copies of those names are dropped.
                extra=decision.route.upstream.header_fields
                if decision.route is not None and decision.route.upstream is not None else ())
        except IdentityError as exc:  # no identity can be made for this caller: not forwarded
            record.outcome, record.check = "deny", "identity"
            self._respond_error(flow, ApiError(401, exc.message), decision.url, state)
            return
        record.client_close = head.client_close  # mitmproxy reads the stripped request for that
        record.forwarded_at = time.perf_counter()  # upstream latency, for the log and metrics
        retarget(req, up)
        req.headers.fields = head.fields
        self._timers[flow.id] = asyncio.get_running_loop().call_later(decision.timeout,
                                                                      self._expire, flow)

    def _expire(self, flow: http.HTTPFlow) -> None:
        self._timers.pop(flow.id, None)
        # An answer whose head came in time but whose body did not is still a 504, unless it
        # is being streamed (its head already left for the client).
        if flow.error is not None or (flow.response is not None and flow.response.stream):
            return
        record = record_of(flow.metadata)
        if record is not None:
            record.timed_out = True
        if not mitm_internals.close_server_connection(flow):
            log.warning("upstream timeout: could not find the server connection of flow %s",
                        flow.id, extra={"request_id": record.request_id if record else None})

    def _respond_error(self, flow: http.HTTPFlow, error: ApiError, url: str,
                       state: State) -> None:
        # request.url is echoed raw, except the values of secret-looking query parameters
        # (stagedoor.accessLog.redactQueryKeys): a token never comes back in an error body.
        url = _utf8_safe(redact_target(url, state.settings.redacted_query_keys))
        error = dataclasses.replace(error, message=_utf8_safe(error.message))
        status, body, headers = render_error(error, _utf8_safe(flow.request.method), url)
        flow.response = http.Response.make(status, body, _header_fields(headers))

    # -- response --------------------------------------------------------------------------------
    def _cancel_timer(self, flow: http.HTTPFlow) -> None:
        timer = self._timers.pop(flow.id, None)
        if timer is not None:
            timer.cancel()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # An upstream answer may be streamed (stagedoor.limits.streamResponseBytes), and then
        # its head leaves before the response hook: finish it here already.
        record = record_of(flow.metadata)
        if flow.response is not None and record is not None and record.forwarded:
            self._finish_head(flow, False)
            record.finished_head = flow.response

    def response(self, flow: http.HTTPFlow) -> None:
        self._cancel_timer(flow)
        record = record_of(flow.metadata)
        assert flow.response is not None
        current_request_id.set(record.request_id if record is not None else None)
        ratelimit.settle(record, flow.response.status_code)  # skip*Requests, once the status is in
        if record is not None and record.finished_head is flow.response \
                and not record.not_json:
            # The same upstream answer whose head responseheaders finished: nothing changed it
            # since (the body was read), so only the HEAD rule is left.
            if flow.request.method == "HEAD" and flow.response.raw_content:
                flow.response.raw_content = b""
            return
        self._finish_head(flow, True)

    def _finish_head(self, flow: http.HTTPFlow, final: bool = True) -> None:
        resp = flow.response
        assert resp is not None
        if flow.request.method == "HEAD" and resp.raw_content:
            # A local answer or error to HEAD: headers (Content-Length included) as for GET, but
            # no body, or the bytes would be read as the next response on this connection.
            resp.raw_content = b""
        # Raw header fields in, raw fields out (stagedoor/forwarding.py): mitmproxy's Headers API
        # rescans and re-lowercases every field for each lookup (~200 µs per response with a
        # dozen security headers). Once per response: in responseheaders for a forwarded one.
        record = record_of(flow.metadata)
        if record is None:  # a flow the gateway never saw (mitmproxy answered it itself)
            resp.headers.fields = forwarding.client_fields(
                resp.headers.fields, policy=self.runtime.state.forwarding, forwarded=False,
                request_id=None)
            return
        forwarded = record.forwarded
        fields = resp.headers.fields
        if forwarded:
            if record.upstream_status is None:
                record.upstream_status = resp.status_code
            route = record.decision.route if record.decision is not None else None
            if route is not None:
                rule = route.response
                if rule.expect_json and not record.not_json and not is_json_type(
                        content_type_of(fields)):
                    # expect: json, and the upstream answered something else (an HTML error
                    # page, say): the client gets a 502, never the upstream's body.
                    record.not_json = True
                    log.warning("upstream answer for %s %s is not JSON (Content-Type %r): 502",
                                flow.request.method, record.route, content_type_of(fields))
                if record.not_json:
                    if not final:  # buffered (never streamed out); replaced once it is in
                        resp.stream = False
                        return
                    self._replace_with_error(flow, record, ApiError(
                        502, "The upstream answered with something other than JSON"))
                    return
                # Set-Cookie, Server, X-Powered-By (unless the route allows them), the route's
                # headers.remove, hop-by-hop headers; stagedoor's security headers replace the
                # upstream's copies; X-Request-Id set. One pass (stagedoor/forwarding.py).
                fields = forwarding.forwarded_fields(
                    fields, _dropped_names(rule), policy=record.state.forwarding,
                    request_id=record.request_id, client_close=record.client_close)
                resp.headers.fields = ratelimit.finish_headers(record, fields)
                return
        fields = forwarding.client_fields(
            fields, policy=record.state.forwarding, forwarded=forwarded,
            request_id=record.request_id, client_close=record.client_close)
        resp.headers.fields = ratelimit.finish_headers(record, fields)

    def _replace_with_error(self, flow: http.HTTPFlow, record: FlowRecord,
                            error: ApiError) -> None:
        """Answer with a JSON error instead of the upstream's answer (whose head has not left)."""
        resp = flow.response
        assert resp is not None
        url = _utf8_safe(redact_target(record.url, record.state.settings.redacted_query_keys))
        status, body, headers = render_error(error, _utf8_safe(flow.request.method), url)
        resp.status_code = status
        resp.reason = ""
        resp.stream = False
        resp.headers.fields = forwarding.client_fields(
            tuple((forwarding.encode(k), forwarding.encode(v)) for k, v in headers),
            policy=record.state.forwarding, forwarded=False, request_id=record.request_id,
            client_close=record.client_close)
        # Content-Length follows the body mitmproxy sends: ours, not the upstream's.
        resp.content = b"" if flow.request.method == "HEAD" else body
        record.failed("upstream", status)

    def error(self, flow: http.HTTPFlow) -> None:
        self._cancel_timer(flow)
        record = record_of(flow.metadata)
        current_request_id.set(record.request_id if record is not None else None)
        ratelimit.settle(record, None)  # a failed exchange (skipFailedRequests gives it back)
        if record is None or flow.error is None or not record.forwarded:
            return
        # A response head from the upstream does not mean the client got anything: unless it
        # was streamed, a reset or timeout mid-body still gets the JSON 502/504.
        if flow.response is not None and flow.response.stream:
            return
        if record.timed_out:
            error = ApiError(504, "The upstream did not answer in time")
        else:
            error = ApiError(502, "The upstream could not be reached")
        # A client that hangs up is routine (load generators, impatient browsers): not a warning.
        level = logging.DEBUG if "client disconnected" in flow.error.msg.lower() else \
            logging.WARNING
        log.log(level, "upstream error for %s %s -> %s: %s", flow.request.method,
                record.route, record.upstream, flow.error.msg,
                extra={"request_id": record.request_id})
        state = record.state
        url = _utf8_safe(redact_target(record.url, state.settings.redacted_query_keys))
        status, body, headers = render_error(error, _utf8_safe(flow.request.method), url)
        extra = tuple((k, v) for k, v in headers if k.lower() != "content-type")
        extra += (("X-Request-Id", record.request_id),)
        if flow.request.method == "HEAD":
            body = b""  # a body after a HEAD answer would be read as the next response
        mitm_internals.register_error(flow.error.msg, status, body,
                                      tuple(state.security_headers.items()) + extra)
        # For the access log and metrics (they run after); the warning above has the details.
        record.failed("upstream", status, "upstream timed out" if record.timed_out
                      else f"upstream error: {flow.error.msg}")


def error_url(target: str, state: State) -> str:
    """``request.url`` of an error body for a raw target (relative to a known mount)."""
    return redact_target(_mount_relative(target, state), state.settings.redacted_query_keys)


def _mount_relative(target: str, state: State) -> str:
    """A raw target relative to its plugin's mount (``/api/<pluginId>``) when the plugin is
    known; as it is otherwise."""
    plugin = target[len(API_PREFIX):].partition("/")[0].partition("?")[0]
    if target.startswith(API_PREFIX) and plugin in state.policies.plugins:
        rest = target[len(API_PREFIX) + len(plugin):]
        target = rest if rest.startswith("/") else "/" + rest
    return target


def _content_length(headers: http.Headers) -> int | None:
    """The declared Content-Length, when there is exactly one well-formed one."""
    values = headers.get_all("content-length")
    if len(values) == 1 and values[0].strip().isdigit():
        return int(values[0])
    return None


@functools.lru_cache(maxsize=1024)
def _dropped_names(rule: ResponseRule) -> frozenset[bytes]:
    """``rule.dropped_names()``, computed once per rule (a route's rule is frozen)."""
    return rule.dropped_names()


def _header_fields(pairs: Iterable[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in pairs])


def new_record(flow: http.HTTPFlow, state: State) -> FlowRecord:
    """A request's record, settled before any decision so refusals carry a request id too, and
    put on the flow. "target" is the path as the client sent it (forwarding rewrites
    flow.request.path). One pass over the raw fields for the two headers read here (mitmproxy's
    get_all rescans them per name)."""
    ids: list[str] = []
    authorization: list[str] = []
    for name, value in flow.request.headers.fields:
        lower = name.lower()
        if lower == b"authorization":
            authorization.append(value.decode("utf-8", "surrogateescape"))
        elif lower == b"x-request-id":
            ids.append(value.decode("utf-8", "surrogateescape"))
    record = FlowRecord(forwarding.request_id(ids), flow.request.path, time.perf_counter(),
                        state, authorization=tuple(authorization))
    flow.metadata[META] = record
    return record


def retarget(req: http.Request, up: Upstream) -> None:
    """Point ``req`` at the upstream: scheme, host, port and path (its header fields are left
    empty: the caller sets the upstream's, Host included)."""
    # No header fields while the target is rewritten: with a Host field present, each of
    # mitmproxy's host and port setters rescans and rewrites the headers (measured: a fifth
    # of the gateway's time per request).
    req.headers.fields = ()
    req.scheme = up.scheme
    # Each of the host and port setters recomputes the authority from scheme, host and port
    # (~4 µs each): one run after the last change gives the same request, so a setter whose
    # value is already there is skipped, unless no other one runs (a sidecar's upstream is
    # usually on 127.0.0.1, the host reverse mode already put there).
    host_changed = req.host != up.host
    if host_changed:
        req.host = up.host
    if req.port != up.port or not host_changed:
        req.port = up.port
    req.path = up.path
    # mitmproxy reads "get" as GET (decide saw GET) but would send "get" on: forward the
    # method that was authorised, byte for byte.
    req.method = req.method


def running_address() -> str:
    """``host:port`` the proxy listens on (after ``running``)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    addrs = proxyserver.listen_addrs() if proxyserver else []
    return ", ".join(f"{a[0]}:{a[1]}" for a in addrs)
