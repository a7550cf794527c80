"""The access log: one line per request on stdout, built from what the gateway recorded.

The gateway leaves its :class:`~addons.record.FlowRecord` in ``flow.metadata["stagedoor"]``
(request id, the target as sent, the decision, upstream status, ``forwarded_at``); this addon
only reads it, so it must come after the gateway in the addon chain. Never logged: the
``Authorization`` header, cookies, or the value of a query parameter named in
``stagedoor.accessLog.redactQueryKeys``.
"""

from __future__ import annotations

import asyncio
import json.encoder as json_encoder
import logging
import sys
import time
from typing import Any, TextIO

from mitmproxy import http

from stagedoor.logsetup import format_access_record, iso_time, redact_target
from stagedoor.runtime import Runtime

from .record import record_of

log = logging.getLogger("stagedoor.access")

def access_record(flow: http.HTTPFlow, status: int, keys: frozenset[str],
                  now: float, now_perf: float) -> dict[str, Any]:
    """The fields of one access-log line (``None`` values are dropped when written)."""
    record = record_of(flow.metadata)
    request = flow.request
    peer = flow.client_conn.peername
    latency_ms = round(max(0.0, now - request.timestamp_start) * 1000, 2)
    if record is None:
        return {
            "time": iso_time(now), "request_id": None, "client": peer[0] if peer else None,
            "method": request.method, "path": redact_target(request.path, keys),
            "plugin": None, "route": None, "status": status, "decision": None, "check": None,
            "reason": None, "principal": None, "principal_type": None,
            "upstream_status": None, "upstream_ms": None, "latency_ms": latency_ms,
        }
    # One dict, built in line order (the JSON line keeps this order).
    decision = record.decision
    principal = decision.principal if decision is not None else None
    outcome = record.outcome
    forwarded_at = record.forwarded_at
    return {
        "time": iso_time(now),
        "request_id": record.request_id,
        "client": peer[0] if peer else None,
        "method": request.method,
        "path": redact_target(record.target, keys),
        "plugin": decision.plugin_id if decision is not None else None,
        "route": decision.route_path if decision is not None else None,
        "status": status,
        "decision": outcome,
        "check": record.check,
        "reason": (record.reason or None) if outcome != "allow" else None,
        "principal": principal.subject if principal is not None else None,
        "principal_type": principal.kind if principal is not None else None,
        "upstream_status": record.upstream_status,
        "upstream_ms": round((now_perf - forwarded_at) * 1000, 2) if forwarded_at else None,
        "latency_ms": latency_ms,
    }


#: The C encoder behind ``json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))``, built
#: once: ``JSONEncoder.encode`` builds it again for every call. No circular-reference check
#: (``markers`` None): an access record holds only strings and numbers. None when the C
#: accelerator is missing (then :func:`format_access_record` writes every line).
_ENCODE_JSON = (json_encoder.c_make_encoder(None, json_encoder.JSONEncoder().default,
                                            json_encoder.encode_basestring, None, ":", ",",
                                            False, False, True)
                if json_encoder.c_make_encoder is not None else None)


def access_line(fields: dict[str, Any], fmt: str) -> str:
    """``format_access_record(fields, fmt)``, the JSON format through the prebuilt encoder."""
    if fmt == "json" and _ENCODE_JSON is not None:
        return "".join(_ENCODE_JSON({k: v for k, v in fields.items() if v is not None}, 0))
    return format_access_record(fields, fmt)


#: Lines are written in batches, one write and one flush per batch instead of per line (a
#: system call per request was ~4% of the proxy's CPU under load): a batch goes out at most this
#: long after its first line, at MAX_BATCH lines, and at shutdown (the ``done`` hook). A process
#: killed outright (SIGKILL) loses at most that last fraction of a second of lines.
FLUSH_DELAY = 0.05
MAX_BATCH = 256


class AccessLog:
    """mitmproxy addon: writes the access log (``stagedoor.accessLog.enabled``, default on)."""

    def __init__(self, runtime: Runtime, stream: TextIO | None = None) -> None:
        self.runtime = runtime
        self.stream = stream
        self._broken = False
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def done(self) -> None:
        self.flush()

    def response(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        self._write(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        # Only flows the gateway handled and that end without a response (upstream refused or
        # timed out): mitmproxy then answers with the error page the gateway registered.
        record = record_of(flow.metadata)
        if record is None or flow.response is not None or record.status is None:
            return
        self._write(flow, record.status)

    def _write(self, flow: http.HTTPFlow, status: int) -> None:
        # The state the flow was decided on (the current one for a flow the gateway never saw).
        record = record_of(flow.metadata)
        state = record.state if record is not None else self.runtime.state
        if not state.settings.access_log or self._broken:
            return
        fields = access_record(flow, status, state.settings.redacted_query_keys, time.time(),
                               time.perf_counter())
        self._pending.append(access_line(fields, state.operations.log_format))
        if len(self._pending) >= MAX_BATCH:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # outside the proxy's loop (tools, tests): write it now
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Write the lines not written yet (one write, one flush)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._broken:
            self._pending.clear()
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        stream = self.stream or sys.stdout
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError) as exc:  # stdout closed: keep serving, say so once
            self._broken = True
            log.error("access log disabled: cannot write to stdout: %s", exc)
