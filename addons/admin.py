"""Metrics (Prometheus) and the admin listener: ``/metrics``, ``/healthz``, ``/readyz``.

The admin listener (``stagedoor.admin.listen``, default 127.0.0.1:9464; ``--admin``) is a small
HTTP/1.1 server on the proxy's own event loop, separate from the proxy port: when the loop is
stuck, ``/healthz`` stops answering too, which is what a liveness probe should see.

Metrics live in a per-process :class:`CollectorRegistry`. Per request, the cost is two dict
lookups (label children are cached), one counter increment and one or two histogram
observations; everything read from the verifier and the reloader is collected at scrape time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from stagedoor.runtime import Runtime

from .record import record_of

if TYPE_CHECKING:
    from .lifecycle import Lifecycle
    from .reload import Reloader

log = logging.getLogger("stagedoor")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
#: TokenVerifier.stats key -> ``outcome`` label of stagedoor_token_verifications_total.
TOKEN_OUTCOMES = {"verified_ok": "ok", "verified_cached": "cached", "failed": "failed",
                  "keys_needed": "keys_needed", "source_unavailable": "source_unavailable"}
JWKS_OUTCOMES = {"jwks_fetch_ok": "ok", "jwks_fetch_failed": "failed"}


class _StateCollector(Collector):
    """Counters and gauges read at scrape time from the verifier, reloader and lifecycle."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        runtime = m.runtime
        state = runtime.state  # one state for the whole scrape
        stats = dict(runtime.retired_token_stats)
        for name, value in state.verifier.stats.items():
            stats[name] = stats.get(name, 0) + value
        tokens = CounterMetricFamily("stagedoor_token_verifications",
                                     "Credential verifications by outcome", labels=["outcome"])
        for key, outcome in TOKEN_OUTCOMES.items():
            tokens.add_metric([outcome], stats.get(key, 0))
        yield tokens
        jwks = CounterMetricFamily("stagedoor_jwks_fetches", "JWKS fetches by outcome",
                                   labels=["outcome"])
        for key, outcome in JWKS_OUTCOMES.items():
            jwks.add_metric([outcome], stats.get(key, 0))
        yield jwks
        if state.authorizer is not None:
            asked = CounterMetricFamily(
                "stagedoor_permission_delegations",
                "Permission checks delegated to the permission backend, by outcome "
                "(asked: a request to the backend; cached: answered from the decision cache; "
                "unreachable: the backend could not be asked, so the check denied)",
                labels=["outcome"])
            for outcome, key in (("asked", "delegated"), ("cached", "cached"),
                                 ("unreachable", "unreachable")):
                asked.add_metric([outcome], state.authorizer.stats.get(key, 0))
            yield asked
            userinfo = state.authorizer.userinfo
            if userinfo is not None:
                lookups = CounterMetricFamily(
                    "stagedoor_userinfo_lookups",
                    "Group membership from the auth backend's /v1/userinfo, by outcome "
                    "(lookup: a request to the auth backend; cache_hit: answered from the "
                    "per-token cache; failure: the auth backend could not answer, so the "
                    "request got 503)", labels=["outcome"])
                for outcome, key in (("lookup", "lookups"), ("cache_hit", "cache_hits"),
                                     ("failure", "failures")):
                    lookups.add_metric([outcome], userinfo.stats.get(key, 0))
                yield lookups
        signer = state.signer
        rotations = CounterMetricFamily("stagedoor_signing_key_rotations",
                                        "Signing keys replaced on schedule, by plugin",
                                        labels=["plugin"])
        for plugin_id, ring in sorted(signer.rings.items()):
            rotations.add_metric([plugin_id], ring.rotations)
        yield rotations
        limits = CounterMetricFamily(
            "stagedoor_ratelimit_decisions",
            "Rate limit checks by plugin, rule and outcome (allowed, limited, dry_run: an "
            "enforce: false rule would have refused; store_error: the store could not answer). "
            "Backstage's limiters are rule backend.rateLimit and backend.rateLimit.plugin",
            labels=["plugin", "rule", "outcome"])
        for (plugin, rule, outcome), value in sorted(state.limiter.stats.items()):
            limits.add_metric([plugin, rule, outcome], value)
        yield limits
        if m.reloader is not None:
            reloads = CounterMetricFamily("stagedoor_reloads",
                                          "Reloads of policies and config by outcome",
                                          labels=["outcome"])
            for outcome in ("success", "failure"):
                reloads.add_metric([outcome], m.reloader.stats.get(outcome, 0))
            yield reloads
        loaded_at = (m.reloader.last_success if m.reloader else None) or m.started_at
        yield GaugeMetricFamily("stagedoor_config_loaded_timestamp_seconds",
                                "When the state now serving was loaded (start or last reload)",
                                value=loaded_at)
        policies = state.policies
        yield GaugeMetricFamily("stagedoor_policy_plugins", "Plugins in the serving policy set",
                                value=len(policies.plugins))
        yield GaugeMetricFamily("stagedoor_policy_routes", "Routes in the serving policy set",
                                value=policies.route_count)
        if m.lifecycle is not None:
            yield GaugeMetricFamily("stagedoor_requests_in_flight",
                                    "Requests received and not answered yet",
                                    value=m.lifecycle.in_flight)


class Metrics:
    """mitmproxy addon: counts and times every request; must come after the gateway."""

    def __init__(self, runtime: Runtime, lifecycle: Lifecycle | None = None,
                 reloader: Reloader | None = None) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.reloader = reloader
        self.started_at = time.time()
        # The *_created series double the series count and tell a scraper nothing it needs.
        disable_created_metrics()
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "stagedoor_requests", "Requests answered, by plugin, route template, status and "
            "decision (allow, deny, error) with the check that decided",
            ["plugin", "route", "status", "decision", "check"], registry=registry)
        self.duration = Histogram(
            "stagedoor_request_duration_seconds", "Whole request, first byte in to response "
            "ready, by plugin and route template", ["plugin", "route"], buckets=LATENCY_BUCKETS,
            registry=registry)
        self.upstream_duration = Histogram(
            "stagedoor_upstream_duration_seconds", "Upstream part of forwarded requests, by "
            "plugin and route template", ["plugin", "route"], buckets=LATENCY_BUCKETS,
            registry=registry)
        registry.register(_StateCollector(self))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self._request_children: dict[tuple[str, str, int, str, str], Any] = {}
        self._duration_children: dict[tuple[str, str], Any] = {}
        self._upstream_children: dict[tuple[str, str], Any] = {}

    def response(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        self.observe(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow.metadata)
        if record is None or flow.response is not None or record.status is None:
            return
        self.observe(flow, record.status)

    def observe(self, flow: http.HTTPFlow, status: int) -> None:
        record = record_of(flow.metadata)
        if record is None:
            key = ("", "", status, "none", "none")
            forwarded_at = None
        else:
            key = (record.plugin or "", record.route or "", status, record.outcome or "none",
                   record.check or "none")
            forwarded_at = record.forwarded_at
        plugin, route = key[0], key[1]
        counter = self._request_children.get(key)
        if counter is None:
            counter = self.requests.labels(plugin, route, str(status), key[3], key[4])
            self._request_children[key] = counter
        counter.inc()
        where = (plugin, route)
        timer = self._duration_children.get(where)
        if timer is None:
            timer = self._duration_children[where] = self.duration.labels(plugin, route)
        timer.observe(max(0.0, time.time() - flow.request.timestamp_start))
        if forwarded_at is not None:
            timer = self._upstream_children.get(where)
            if timer is None:
                timer = self._upstream_children[where] = self.upstream_duration.labels(*where)
            timer.observe(max(0.0, time.perf_counter() - forwarded_at))


class AdminServer:
    """mitmproxy addon: the admin HTTP listener. Logs ``stagedoor admin listening on URL``."""

    MAX_HEAD = 16 * 1024
    READ_TIMEOUT = 5.0

    def __init__(self, metrics: Metrics, lifecycle: Lifecycle,
                 listen: tuple[str, int] | None) -> None:
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.listen = listen
        self.address: tuple[str, int] | None = None
        self._socket: socket.socket | None = None
        self._server: asyncio.Server | None = None

    def load(self, loader: Any) -> None:
        # Bind now, before the proxy listens: a taken port is logged at error level, and
        # mitmproxy's ErrorCheck then exits with status 1 before anything is served.
        if self.listen is None:
            return
        host, port = self.listen
        try:
            self._socket = socket.create_server(
                (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            log.error("stagedoor admin cannot listen on %s:%d: %s (set stagedoor.admin.listen "
                      "or --admin)", host, port, exc.strerror or exc)

    async def running(self) -> None:
        if self._socket is None:
            if self.listen is None:
                log.info("stagedoor admin listener disabled")
            return
        self._server = await asyncio.start_server(self._client, sock=self._socket,
                                                  limit=self.MAX_HEAD)
        sockname = self._socket.getsockname()
        self.address = (sockname[0], sockname[1])
        shown = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
        log.info("stagedoor admin listening on http://%s:%d (/metrics, /healthz, /readyz)",
                 shown, sockname[1])

    def done(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        elif self._socket is not None:
            self._socket.close()

    # -- HTTP ------------------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self.READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return
            method, path, accept = parse_head(head)
            status, content_type, body = self.answer(method, path, accept)
            lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
                     f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                     "Cache-Control: no-store", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:  # never let a scrape take anything down
            log.exception("admin listener: error while answering")
        finally:
            writer.close()

    def answer(self, method: str, path: str, accept: str = "") -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        if not method:
            return _json(400, {"status": "bad request"})
        if method not in ("GET", "HEAD"):
            return _json(405, {"status": "method not allowed"})
        if path == "/metrics":
            encoder, content_type = choose_encoder(accept)
            return 200, content_type, encoder(self.metrics.registry)
        if path == "/healthz":
            return _json(200, {"status": "ok"})
        if path == "/readyz":
            reasons = self.lifecycle.not_ready_reasons()
            if reasons:
                return _json(503, {"status": "not ready", "reasons": reasons})
            return _json(200, {"status": "ready"})
        return _json(404, {"status": "not found", "paths": ["/metrics", "/healthz", "/readyz"]})


def parse_head(head: bytes) -> tuple[str, str, str]:
    """(method, path without query, Accept value) of a request head; method "" if malformed."""
    request_line, _, header_block = head.partition(b"\r\n")
    parts = request_line.decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return "", "", ""
    accept = ""
    for line in header_block.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    return parts[0], parts[1].partition("?")[0], accept


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


def _json(status: int, payload: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(payload).encode() + b"\n"
