"""Backstage's ``backend.rateLimit``, side by side: a real Backstage backend (tests/backstage.py)
and a stagedoor sidecar, started with the same rate-limit config file, get the same requests
in the same order; statuses, bodies and the X-RateLimit-* / Retry-After headers must match
(reset times within a small tolerance: the two are a few milliseconds apart).

The requests come from 127.0.0.2 (still loopback): the fixtures' own readiness probes come
from 127.0.0.1, which the config puts in ``ipAllowList``, so they count nowhere and every
window starts with the first request of the test.
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from .backstage import start_backstage
from .conftest import ROOT, start_sidecar, write_config
from .redisserver import RedisServer

pytestmark = [pytest.mark.backstage, pytest.mark.e2e]

CLIENT_ADDRESS = "127.0.0.2"
RATE_LIMIT_CONFIG = """\
backend:
  rateLimit:
    window: 1m
    incomingRequestLimit: 5
    ipAllowList: [127.0.0.1]       # the fixtures' probes; the test's client is 127.0.0.2
    plugin:
      insights:
        window: {seconds: 30}
        incomingRequestLimit: 2
        ipAllowList: [127.0.0.1]
"""
# (method, path, what to compare): "body" compares the body; "status" only status and headers,
# where stagedoor answers differently on purpose (an unknown plugin gets a JSON 404 body).
REQUESTS = [
    ("GET", "/api/insights/health", "body"),        # global 1/5, plugin 1/2
    ("GET", "/api/insights/services/x", "body"),    # no token: 401; plugin 2/2
    ("GET", "/api/insights/health", "body"),        # the plugin's limiter: 429
    ("GET", "/api/nope", "status"),                 # the global limiter counts every path
    ("GET", "/api/insights/health", "body"),        # global 5/5, plugin still 429
    ("GET", "/api/insights/health", "body"),        # the global limiter: 429
    ("GET", "/api/nope", "status"),                 # 429 before any routing
]
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
                "retry-after")
TOLERANCE_S = 2  # reset times and Retry-After: the two servers see a request ms apart


def send(port: int, method: str, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15,
                                      source_address=(CLIENT_ADDRESS, 0))
    try:
        conn.request(method, path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    return {"status": response.status, "body": body,
            "rate": {name: headers[name] for name in RATE_HEADERS if name in headers}}


def test_backend_rate_limit_matches_the_real_backstage_backend(tmp_path: Path) -> None:
    limits = write_config(tmp_path / "rate-limit.yaml", RATE_LIMIT_CONFIG)
    backstage = start_backstage([limits])
    try:
        policies = tmp_path / "policies"
        policies.mkdir()
        shutil.copy(ROOT / "policies" / "insights.yaml", policies / "insights.yaml")
        base = write_config(tmp_path / "app-config.yaml", f"""\
            backend:
              baseUrl: {backstage.base_url}
            insights:
              externalApiUrl: {backstage.upstream_url}
            """)
        sidecar = start_sidecar([base, limits], policies)
        try:
            pairs = []
            for method, path, compare in REQUESTS:
                theirs = send(int(backstage.base_url.rsplit(":", 1)[1]), method, path)
                ours = send(sidecar.port, method, path)
                pairs.append((method, path, compare, theirs, ours))
        finally:
            sidecar.stop()
    finally:
        backstage.stop()

    statuses = [(t["status"], o["status"]) for _, _, _, t, o in pairs]
    assert [t for t, _ in statuses] == [200, 401, 429, 404, 429, 429, 429], statuses
    for method, path, compare, theirs, ours in pairs:
        what = f"{method} {path}"
        assert ours["status"] == theirs["status"], what
        if compare == "body":
            assert json.loads(ours["body"]) == json.loads(theirs["body"]), what
            if theirs["status"] == 429:
                assert ours["body"] == theirs["body"], what  # byte for byte
        assert ours["rate"].keys() == theirs["rate"].keys(), (what, ours["rate"], theirs["rate"])
        for name, value in theirs["rate"].items():
            if name in ("x-ratelimit-reset", "retry-after"):
                assert abs(int(ours["rate"][name]) - int(value)) <= TOLERANCE_S, (what, name)
            else:
                assert ours["rate"][name] == value, (what, name)
    # and the values are the ones the config asks for
    plugin_429, global_429 = pairs[2][3], pairs[5][3]
    assert plugin_429["rate"]["x-ratelimit-limit"] == "2"
    assert 28 <= int(plugin_429["rate"]["retry-after"]) <= 30
    assert global_429["rate"]["x-ratelimit-limit"] == "5"
    assert abs(int(global_429["rate"]["x-ratelimit-reset"]) - (time.time() + 60)) <= 30
    assert pairs[3][4]["body"] != pairs[3][3]["body"]  # the deliberate JSON 404 (see docs)


SHARED_REDIS_CONFIG = """\
backend:
  rateLimit:
    global: false
    store: {{type: redis, connection: "{url}"}}
    plugin:
      insights:
        incomingRequestLimit: 3
        ipAllowList: [127.0.0.1]
        skipFailedRequests: true
"""


def test_backstage_and_stagedoor_on_one_redis_share_the_plugin_count(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """A mixed fleet during a migration: the same Redis, the same key layout
    (``<pluginId><ip>``), one count; ``skipFailedRequests`` gives back the hits of failed
    answers on both sides, 429s included."""
    limits = write_config(tmp_path / "rate-limit.yaml",
                          SHARED_REDIS_CONFIG.format(url=redis_server.url))
    backstage = start_backstage([limits])
    key = f"insights{CLIENT_ADDRESS}"
    try:
        policies = tmp_path / "policies"
        policies.mkdir()
        shutil.copy(ROOT / "policies" / "insights.yaml", policies / "insights.yaml")
        base = write_config(tmp_path / "app-config.yaml", f"""\
            backend:
              baseUrl: {backstage.base_url}
            insights:
              externalApiUrl: {backstage.upstream_url}
            """)
        sidecar = start_sidecar([base, limits], policies)
        ports = {"backstage": int(backstage.base_url.rsplit(":", 1)[1]),
                 "stagedoor": sidecar.port}
        # (who, path, status, X-RateLimit-Remaining, the count in Redis once settled)
        steps = [("backstage", "/api/insights/health", 200, "2", 1),
                 ("stagedoor", "/api/insights/health", 200, "1", 2),
                 ("backstage", "/api/insights/services/x", 401, "0", 2),  # failed: given back
                 ("stagedoor", "/api/insights/services/x", 401, "0", 2),
                 ("stagedoor", "/api/insights/health", 200, "0", 3),
                 ("backstage", "/api/insights/health", 429, "0", 3),     # a 429 is failed too
                 ("stagedoor", "/api/insights/health", 429, "0", 3)]
        seen = []
        try:
            for who, path, _, _, count in steps:
                answer = send(ports[who], "GET", path)
                seen.append((who, path, answer["status"],
                             answer["rate"].get("x-ratelimit-remaining"),
                             settled_count(redis_server, key, count)))
        finally:
            sidecar.stop()
    finally:
        backstage.stop()
    assert seen == [(who, path, status, remaining, count)
                    for who, path, status, remaining, count in steps]


def settled_count(redis: RedisServer, key: str, expected: int) -> int:
    """The key's count once it reads ``expected`` (a decrement lands just after the answer),
    or what it reads after a bounded wait."""
    deadline = time.monotonic() + 5
    while True:
        reply = redis.command("GET", key)
        value = int(reply.split(b"\r\n")[1]) if reply.startswith(b"$") and \
            not reply.startswith(b"$-1") else 0
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)
