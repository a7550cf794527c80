"""The access log: one line per request on stdout, built from what the gateway recorded.

The gateway leaves its decision in ``flow.metadata["stagedoor"]`` (request id, the target as
sent, plugin, route, decision, check, principal, upstream status, ``forwarded_at``); this addon
only reads it, so it must come after the gateway in the addon chain. Never logged: the
``Authorization`` header, cookies, or the value of a query parameter named in
``stagedoor.accessLog.redactQueryKeys``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from mitmproxy import http

from stagedoor.logsetup import format_access_record, iso_time, redact_target
from stagedoor.runtime import Runtime

from .gateway import META

log = logging.getLogger("stagedoor.access")

_NO_META: dict[str, Any] = {}


def access_record(flow: http.HTTPFlow, status: int, keys: frozenset[str],
                  now: float, now_perf: float) -> dict[str, Any]:
    """The fields of one access-log line (``None`` values are dropped when written)."""
    meta = flow.metadata.get(META) or _NO_META
    request = flow.request
    decision = meta.get("decision")
    forwarded_at = meta.get("forwarded_at")
    peer = flow.client_conn.peername
    return {
        "time": iso_time(now),
        "request_id": meta.get("request_id"),
        "client": peer[0] if peer else None,
        "method": request.method,
        "path": redact_target(meta.get("target") or request.path, keys),
        "plugin": meta.get("plugin"),
        "route": meta.get("route"),
        "status": status,
        "decision": decision,
        "check": meta.get("check"),
        "reason": (meta.get("reason") or None) if decision != "allow" else None,
        "principal": meta.get("principal"),
        "principal_type": meta.get("principal_type"),
        "upstream_status": meta.get("upstream_status"),
        "upstream_ms": round((now_perf - forwarded_at) * 1000, 2) if forwarded_at else None,
        "latency_ms": round(max(0.0, now - request.timestamp_start) * 1000, 2),
    }


class AccessLog:
    """mitmproxy addon: writes the access log (``stagedoor.accessLog.enabled``, default on)."""

    def __init__(self, runtime: Runtime, stream: TextIO | None = None) -> None:
        self.runtime = runtime
        self.stream = stream
        self._broken = False

    def response(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        self._write(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        # Only flows the gateway handled and that end without a response (upstream refused or
        # timed out): mitmproxy then answers with the error page the gateway registered.
        meta = flow.metadata.get(META)
        if meta is None or flow.response is not None or "status" not in meta:
            return
        self._write(flow, meta["status"])

    def _write(self, flow: http.HTTPFlow, status: int) -> None:
        runtime = self.runtime
        if not runtime.settings.access_log or self._broken:
            return
        record = access_record(flow, status, runtime.settings.redacted_query_keys, time.time(),
                               time.perf_counter())
        line = format_access_record(record, runtime.operations.log_format)
        stream = self.stream or sys.stdout
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:  # stdout closed: keep serving, say so once
            self._broken = True
            log.error("access log disabled: cannot write to stdout: %s", exc)
