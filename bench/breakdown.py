"""Where stagedoor's own time goes per request: in-process micro-benchmarks of each piece.

The bench's request (``GET /api/insights/services/payments-api`` with the ES256 user token)
is driven ``requests`` times through the four flow hooks of a real lean master
(``addons/master.py``, the shipped policy, an upstream on 127.0.0.1 that serves the JWKS),
with a timer around every addon handler; ``decide()``, the verified-token cache and the
request-limit check are also timed on their own. No sockets carry the requests here: what
mitmproxy itself spends (parsing, the connection, the event loop) is what the floor scenario
measures, and full-policy CPU per request minus the floor's is stagedoor's cost in the real
process (:func:`attribute`). Bounded: ``requests`` iterations, and a time cap.
"""

from __future__ import annotations

import asyncio
import inspect
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .targets import REQUEST_PATH, UPSTREAM_PATH

#: (key, label), in the order they are shown. ``decide`` excludes the token cache.
PIECES = (
    ("decide", "decide(): plugin, path, route, principal, params (token cache excluded)"),
    ("token_cache", "verified-token cache (SHA-256 of the token, LRU lookup)"),
    ("head_rules", "request-head rules (stagedoor/head.py: Host, framing, CR/NUL, underscores)"),
    ("headers", "gateway, the rest: request/response header passes, upstream rewrite, request "
                "id, timeout timer, flow record, rate-limit hooks (no limit configured)"),
    ("access_log", "access log (record, JSON line, write)"),
    ("metrics", "metrics (Prometheus counters and histograms)"),
    ("limits", "request limits (head size/count check per request head)"),
    ("other_addons", "lifecycle, reload and the rest of stagedoor's hooks"),
)
TIME_CAP = 120.0


def _flow(token: str) -> Any:
    from mitmproxy import http
    from mitmproxy.test import tflow

    flow = tflow.tflow()
    flow.request = http.Request.make("GET", f"http://127.0.0.1:7007{REQUEST_PATH}", b"",
                                     {"Host": "127.0.0.1:7007", "User-Agent": "wrk",
                                      "Authorization": f"Bearer {token}"})
    flow.request.data.authority = b""
    flow.request.path = REQUEST_PATH
    # As wrk sends it: no Content-Length on a GET (Request.make adds "content-length: 0").
    flow.request.headers.fields = tuple(
        field for field in flow.request.headers.fields if field[0] != b"content-length")
    return flow


def _median_ns(fn: Callable[[], Any], repeat: int) -> float:
    """Median CPU time of ``repeat`` single calls, in µs (thread CPU time, not wall time: other
    processes on the machine do not count)."""
    samples = []
    for _ in range(repeat):
        t0 = time.thread_time_ns()
        fn()
        samples.append(time.thread_time_ns() - t0)
    return statistics.median(samples) / 1000.0


class _Timers:
    """Wraps every cached handler of a FastAddonManager with a CPU timer (thread CPU time, so
    other processes on a busy machine do not count), summed by addon class."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self.armed = False

    def wrap(self, func: Callable[..., Any]) -> Callable[..., Any]:
        owner = type(getattr(func, "__self__", func)).__name__
        ns = self.ns

        def timed(*args: Any) -> Any:
            if not self.armed:
                return func(*args)
            t0 = time.thread_time_ns()
            result = func(*args)
            if result is not None and inspect.isawaitable(result):
                async def finish() -> Any:
                    try:
                        return await result
                    finally:
                        ns[owner] += time.thread_time_ns() - t0
                return finish()
            ns[owner] += time.thread_time_ns() - t0
            return result
        return timed


def measure(config_file: Path, policy_dir: Path, token: str, access_log: Path,
            requests: int = 3000) -> dict[str, Any]:
    """Run the breakdown; µs per request by piece, plus the handler totals by addon."""
    from stagedoor.runtime import Runtime

    runtime = Runtime.load([str(config_file)], str(policy_dir))
    return asyncio.run(_measure(runtime, token, access_log, requests))


async def _measure(runtime: Any, token: str, access_log: Path, requests: int,
                   ) -> dict[str, Any]:
    from mitmproxy import http
    from mitmproxy.proxy.layers.http import (
        HttpRequestHeadersHook,
        HttpRequestHook,
        HttpResponseHeadersHook,
        HttpResponseHook,
    )

    from stagedoor.decide import GatewayRequest, decide
    from stagedoor.head import check_head
    from stagedoor_addons import mitm_internals
    from stagedoor_addons.master import build_lean_master

    m = build_lean_master(runtime, "127.0.0.1", 0, admin=None)
    m.addons.get("tlsconfig").configure({"confdir"})
    log_stream = open(access_log, "w")  # noqa: SIM115 - a real file, as the bench scenarios
    m.addons.get("accesslog").stream = log_stream
    hooks = (HttpRequestHeadersHook, HttpRequestHook, HttpResponseHeadersHook, HttpResponseHook)
    timers = _Timers()
    upstream_body = b'{"id":"payments-api"}'
    # One keep-alive connection the edge tracks, as wrk's: its per-request connection work
    # (the body check, the idle timer) counts too. The head starting is what mitmproxy's
    # request-head reader tells the edge (addons/mitm_internals.py) before the first hook.
    from mitmproxy.test import tflow

    edge = m.addons.get("edge")
    client = tflow.tclient_conn()
    edge.client_connected(client)

    async def one() -> None:
        flow = _flow(token)
        flow.client_conn = client
        edge._head_started(client.id)
        for hook in hooks[:2]:
            await m.addons.handle_lifecycle(hook(flow))
        if flow.response is not None or flow.request.path != UPSTREAM_PATH:
            raise RuntimeError(f"breakdown: the request was not forwarded: "
                               f"{flow.response and flow.response.status_code}")
        flow.response = http.Response.make(200, upstream_body,
                                           {"Content-Type": "application/json",
                                            "Server": "nginx", "Connection": "keep-alive"})
        for hook in hooks[2:]:
            await m.addons.handle_lifecycle(hook(flow))

    try:
        for _ in range(3):  # warm-up: the first request fetches the JWKS, then caches
            await one()
        for hook in hooks:  # every cached handler list, wrapped once
            handlers = m.addons.handlers_for(hook(_flow(token)))
            m.addons._handlers[hook.name] = tuple(timers.wrap(f) for f in handlers)
        m.addons._handlers["update"] = ()
        timers.armed = True
        started = time.perf_counter()
        done = 0
        while done < requests and time.perf_counter() - started < TIME_CAP:
            await one()
            done += 1
        timers.armed = False
    finally:
        log_stream.close()
        for timer in list(m.addons.get("gateway")._timers.values()):
            timer.cancel()
        edge.client_disconnected(client)  # its idle timer

    per_addon = {name: ns / done / 1000.0 for name, ns in timers.ns.items()}

    # The pieces on their own (medians of single calls).
    greq = GatewayRequest("GET", REQUEST_PATH, (f"Bearer {token}",))
    state = runtime.state
    policies, verifier, authorizer = state.policies, state.verifier, state.authorizer
    decide_us = _median_ns(lambda: decide(greq, policies, verifier, authorizer), done)
    token_us = _median_ns(lambda: verifier.verify(token, "insights"), done)
    head = (f"GET {REQUEST_PATH} HTTP/1.1\r\nHost: 127.0.0.1:7007\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()
    from h11._receivebuffer import ReceiveBuffer

    def limits_check() -> None:
        buf = ReceiveBuffer()
        buf += head
        mitm_internals._head_problem(buf, state.limits)
    buf_us = _median_ns(lambda: ReceiveBuffer().__iadd__(head), done)
    sample = _flow(token).request
    head_rules = state.settings.edge.head_rules
    head_rules_us = _median_ns(lambda: check_head(
        sample.method, sample.authority, sample.path, sample.http_version,
        sample.headers.fields, head_rules), done)
    limits_us = max(0.0, _median_ns(limits_check, done) - buf_us)

    gateway_us = per_addon.get("Gateway", 0.0)
    pieces = {
        "decide": max(0.0, decide_us - token_us),
        "token_cache": token_us,
        "head_rules": head_rules_us,
        "headers": max(0.0, gateway_us - decide_us - head_rules_us),
        "access_log": per_addon.get("AccessLog", 0.0),
        "metrics": per_addon.get("Metrics", 0.0),
        "limits": limits_us,
        "other_addons": sum(v for k, v in per_addon.items()
                            if k not in ("Gateway", "AccessLog", "Metrics")),
    }
    return {"requests": done, "pieces_us": {k: round(v, 2) for k, v in pieces.items()},
            "addons_us": {k: round(v, 2) for k, v in sorted(per_addon.items())},
            "decide_with_token_us": round(decide_us, 2),
            "total_us": round(sum(pieces.values()), 2)}


def attribute(breakdown: dict[str, Any], full_us: float | None, floor_us: float | None,
              ) -> dict[str, Any]:
    """Put the in-process pieces next to the measured gap between full policy and the floor
    (CPU µs per request of the proxy process): what the pieces do not explain is the extra
    hook dispatch, flow metadata, allocation and cache effects of running them in the proxy."""
    total = breakdown.get("total_us") or 0.0
    if not full_us or not floor_us:
        return {"gap_us": None, "explained_us": total, "unexplained_us": None}
    gap = full_us - floor_us
    return {"gap_us": round(gap, 1), "explained_us": round(total, 1),
            "unexplained_us": round(gap - total, 1)}


def text(breakdown: dict[str, Any]) -> str:
    labels = dict(PIECES)
    lines = [f"  {labels[k][:60]:<60} {v:8.1f} µs" for k, v in breakdown["pieces_us"].items()]
    lines.append(f"  {'sum':<60} {breakdown['total_us']:8.1f} µs")
    return "\n".join(lines)

