"""The policy gateway: turns each flow into a :class:`~stagedoor.decide.GatewayRequest`, runs
``decide`` and writes the decision back (a local answer, a JSON error, or an upstream rewrite).

Hooks stay cheap: all parsing and compiling happened when the :class:`Runtime` was built.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any

from mitmproxy import ctx, http

from stagedoor.decide import Decision, GatewayRequest, decide
from stagedoor.errors import ApiError, render_error
from stagedoor.permissions import DelegationNeeded
from stagedoor.runtime import Runtime
from stagedoor.tokens import KeysNeeded, KeySourceUnavailable, extract_bearer

from . import mitm_internals

log = logging.getLogger("stagedoor.gateway")
access_log = logging.getLogger("stagedoor.access")

META = "stagedoor"
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "proxy-authorization",
              "proxy-authenticate", "te", "trailer", "upgrade")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class Gateway:
    """mitmproxy addon: one concern, the request pipeline of SPEC.md."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._strip_prefix = "x-stagedoor-"

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        mitm_internals.install_error_pages(self.runtime.settings.security_headers)

    def running(self) -> None:
        # Prefetch key sets in the background: an identity provider that is down at start must
        # not keep the proxy from serving (requests that need its keys get 503 meanwhile).
        if self.runtime.verifier is not None:
            self._prefetch = asyncio.get_running_loop().create_task(
                self.runtime.verifier.prefetch(), name="stagedoor-jwks-prefetch")

    # -- request ---------------------------------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        started = time.perf_counter()
        try:
            await self._handle(flow, started)
        except Exception:  # fail closed: a bug here must never forward anything
            log.exception("internal error while handling %s %s", flow.request.method,
                          _redact_target(flow.request.path,
                                         self.runtime.settings.redacted_query_keys))
            self._cancel_timer(flow)
            flow.metadata[META] = {"decision": "error", "check": "internal", "started": started}
            self._respond_error(flow, ApiError(500, "Internal error"), flow.request.path)

    async def _handle(self, flow: http.HTTPFlow, started: float) -> None:
        req = flow.request
        decision = await self._decide(flow)
        flow.metadata[META] = {
            "plugin": decision.plugin_id,
            "route": decision.route_path,
            "decision": "allow" if decision.allowed else "deny",
            "check": decision.check,
            "principal": decision.principal.subject if decision.principal else None,
            "principal_type": decision.principal.kind if decision.principal else None,
            "reason": decision.reason,
            "url": decision.url,
            "started": started,
        }
        for note in decision.dry_run:
            log.warning("dry-run: %s %s: %s", req.method, decision.url.partition("?")[0], note)
        if decision.dry_run:
            flow.metadata[META]["dry_run"] = list(decision.dry_run)
        if decision.reason and not decision.allowed:
            log.debug("%s %s denied at %s: %s", req.method, decision.url.partition("?")[0],
                      decision.check, decision.reason)

        if not decision.allowed:
            assert decision.error is not None
            self._respond_error(flow, decision.error, decision.url)
            return
        if decision.local is not None:
            local = decision.local
            flow.response = http.Response.make(local.status, local.body,
                                               _header_fields(local.headers))
            return
        self._forward(flow, decision)

    async def _decide(self, flow: http.HTTPFlow) -> Decision:
        req = flow.request
        if (req.authority and not req.is_http2) or not req.path.startswith("/"):
            # Absolute-form or authority-form target: never a gateway request.
            return Decision(False, "path", req.path, error=ApiError(400, "Invalid request target"),
                            reason="non-origin-form request target")
        greq = GatewayRequest(req.method, req.path, tuple(req.headers.get_all("authorization")))
        runtime = self.runtime
        # One snapshot for the whole request: a reload swaps these, never mutates them.
        policies, verifier, authorizer = runtime.policies, runtime.verifier, runtime.authorizer
        # decide() is pure and synchronous; when it needs the network (a key set, a permission
        # backend answer) it says so, we fetch, and decide again. A few rounds at most.
        for _ in range(3):
            try:
                return decide(greq, policies, verifier, authorizer)
            except KeysNeeded as needed:
                assert verifier is not None
                await verifier.refresh(needed.source)
            except DelegationNeeded as needed:
                assert authorizer is not None
                token = extract_bearer(list(greq.authorization))
                await authorizer.resolve(token, needed.permission)
        unavailable = KeySourceUnavailable("(several)", 5)
        return Decision(False, "barrier", req.path,
                        error=ApiError(503, unavailable.message,
                                       headers=(("Retry-After", "5"),)),
                        reason="credentials still unresolved after refetching")

    def _forward(self, flow: http.HTTPFlow, decision: Decision) -> None:
        req = flow.request
        up = decision.upstream
        assert up is not None
        settings = self.runtime.settings
        client_host = req.headers.get("host", "")
        headers = req.headers
        for name in list(headers.keys()):
            lower = name.lower()
            if (lower in HOP_BY_HOP or lower == "authorization"
                    or lower.startswith(self._strip_prefix)
                    or lower in (settings.principal_header, settings.principal_type_header)
                    or lower.startswith("x-forwarded-") or lower == "forwarded"):
                del headers[name]
        principal = decision.principal
        if principal is not None:
            headers[settings.principal_header] = principal.subject
            headers[settings.principal_type_header] = principal.kind
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        headers["X-Forwarded-For"] = peer
        headers["X-Forwarded-Proto"] = "https" if flow.client_conn.tls_established else "http"
        if client_host:
            headers["X-Forwarded-Host"] = client_host
        request_id = req.headers.get("x-request-id", "")
        if not _REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex
        headers["X-Request-Id"] = request_id
        flow.metadata[META]["request_id"] = request_id
        flow.metadata[META]["upstream"] = up.url

        req.scheme = up.scheme
        req.host = up.host
        req.port = up.port
        req.path = up.path
        default = 443 if up.scheme == "https" else 80
        headers["Host"] = up.host if up.port == default else f"{up.host}:{up.port}"

        loop = asyncio.get_running_loop()
        self._timers[flow.id] = loop.call_later(decision.timeout, self._expire, flow)

    def _expire(self, flow: http.HTTPFlow) -> None:
        self._timers.pop(flow.id, None)
        if flow.response is not None or flow.error is not None:
            return
        meta = flow.metadata.get(META)
        if meta is not None:
            meta["timed_out"] = True
        if not mitm_internals.close_server_connection(flow):
            log.warning("upstream timeout: could not find the server connection of flow %s",
                        flow.id)

    def _respond_error(self, flow: http.HTTPFlow, error: ApiError, url: str) -> None:
        status, body, headers = render_error(error, flow.request.method, url)
        flow.response = http.Response.make(status, body, _header_fields(headers))

    # -- response --------------------------------------------------------------------------------
    def _cancel_timer(self, flow: http.HTTPFlow) -> None:
        timer = self._timers.pop(flow.id, None)
        if timer is not None:
            timer.cancel()

    def response(self, flow: http.HTTPFlow) -> None:
        self._cancel_timer(flow)
        resp = flow.response
        assert resp is not None
        for name, value in self.runtime.settings.security_headers.items():
            if name not in resp.headers:
                resp.headers[name] = value
        meta = flow.metadata.get(META)
        if meta is not None and "upstream" in meta:
            meta["upstream_status"] = resp.status_code
        self._log(flow, resp.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        self._cancel_timer(flow)
        meta = flow.metadata.get(META)
        if meta is None or flow.error is None or flow.response is not None:
            return
        if meta.get("timed_out"):
            error = ApiError(504, "The upstream did not answer in time")
        else:
            error = ApiError(502, "The upstream could not be reached")
        log.warning("upstream error for %s %s -> %s: %s", flow.request.method,
                    meta.get("route"), meta.get("upstream"), flow.error.msg)
        status, body, headers = render_error(error, flow.request.method, meta.get("url", "/"))
        extra = tuple((k, v) for k, v in headers if k.lower() != "content-type")
        mitm_internals.register_error(flow.error.msg, status, body, extra)
        meta["decision"] = "error"
        meta["check"] = "upstream"
        self._log(flow, status)

    # -- access log ------------------------------------------------------------------------------
    def _log(self, flow: http.HTTPFlow, status: int) -> None:
        if not self.runtime.settings.access_log:
            return
        meta = flow.metadata.get(META) or {}
        started = meta.get("started")
        latency = round((time.perf_counter() - started) * 1000, 2) if started else None
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "request_id": meta.get("request_id"),
            "method": flow.request.method,
            "plugin": meta.get("plugin"),
            "route": meta.get("route"),
            "path": _redact_target(meta.get("url") or "",
                                   self.runtime.settings.redacted_query_keys),
            "status": status,
            "decision": meta.get("decision"),
            "check": meta.get("check"),
            "principal": meta.get("principal"),
            "upstream_status": meta.get("upstream_status"),
            "latency_ms": latency,
        }
        sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")


def _header_fields(pairs: Iterable[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in pairs])


def _redact_target(target: str, keys: frozenset[str]) -> str:
    path, sep, query = target.partition("?")
    if not sep:
        return path
    parts = []
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        parts.append(f"{name}=[REDACTED]" if eq and name.lower() in keys else pair)
    return path + "?" + "&".join(parts)


def running_address() -> str:
    """``host:port`` the proxy listens on (after ``running``)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    addrs = proxyserver.listen_addrs() if proxyserver else []
    return ", ".join(f"{a[0]}:{a[1]}" for a in addrs)
