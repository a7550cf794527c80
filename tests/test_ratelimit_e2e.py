"""Rate limits end to end: real `stagedoor run` processes, a real redis-server, real upstreams
and real signed user tokens, all on 127.0.0.1."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stagedoor.devkeys import generate_dev_keys, mint_user_token

from . import forkserver
from .conftest import RecordingServer, Sidecar, start_sidecar, write_config
from .httpraw import RawResponse, request
from .redisserver import RedisServer

pytestmark = pytest.mark.e2e

POLICY = """\
pluginId: limited
rateLimit:                      # the plugin's rule: per principal, across every replica
  - limit: 10
    window: 1h
    name: per-principal
routes:
  - path: /items/{id}
    auth: [user]
    params: {id: '^[a-z0-9-]+$'}
    upstream: ${limited.url}/v1/items/{id}
  - path: /open
    auth: unauthenticated
    rateLimit: [{key: ip, limit: 2, window: 1h, name: open-by-ip}]   # the route's rule wins
    respond: {status: 200, json: {open: true}}
  - path: /shadow
    auth: [user]
    rateLimit: [{limit: 1, window: 1h, enforce: false, name: shadow}]
    respond: {status: 200, json: {shadow: true}}
"""

_ADMIN = re.compile(r"stagedoor admin listening on (http://[\d.]+:\d+)")
BACKSTAGE_429 = {"error": {"name": "Error", "message": "Too many requests, please try again later"},
                 "response": {"statusCode": 429}}


class Fleet:
    """An upstream with the user-token JWKS, dev keys, and sidecars made on demand."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.upstream = RecordingServer("json")
        self.keys = generate_dev_keys(tmp / "keys")
        self.upstream.jwks = self.keys.user_jwks()
        self.issuer = f"{self.upstream.url}/api/auth"
        self.policies = tmp / "policies"
        self.policies.mkdir()
        (self.policies / "limited.yaml").write_text(POLICY)
        self.sidecars: list[Sidecar] = []

    def token(self, subject: str) -> str:
        return mint_user_token(self.keys.user, issuer=self.issuer, subject=subject)

    def start(self, name: str, extra_config: str = "") -> Sidecar:
        sidecar = start_sidecar(self.config(name, extra_config), self.policies)
        self.sidecars.append(sidecar)
        return sidecar

    def config(self, name: str, extra_config: str = "") -> list[Path]:
        """The base app-config, and ``extra_config`` as a second file layered over it."""
        files = [write_config(self.tmp / f"{name}.yaml", f"""\
            backend:
              baseUrl: {self.upstream.url}
            limited:
              url: {self.upstream.url}
            """)]
        if extra_config:
            files.append(write_config(self.tmp / f"{name}-extra.yaml", extra_config))
        return files

    def stop(self) -> None:
        for sidecar in self.sidecars:
            sidecar.stop()
        self.upstream.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    f = Fleet(tmp_path)
    yield f
    f.stop()


def get(sidecar: Sidecar, target: str, token: str | None = None,
        headers: dict[str, str] | None = None) -> RawResponse:
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    return request(sidecar.port, "GET", target, all_headers)


def metrics(sidecar: Sidecar) -> str:
    url = next(m.group(1) for line in sidecar.stderr_lines if (m := _ADMIN.search(line)))
    port = int(url.rsplit(":", 1)[1])
    return request(port, "GET", "/metrics").body.decode()


def metric(sidecar: Sidecar, plugin: str, rule: str, outcome: str) -> float:
    """``stagedoor_ratelimit_decisions_total{plugin, rule, outcome}`` from the admin listener."""
    labels = f'outcome="{outcome}",plugin="{plugin}",rule="{rule}"'
    for line in metrics(sidecar).splitlines():
        if line.startswith("stagedoor_ratelimit_decisions_total{"):
            found = ",".join(sorted(line[line.index("{") + 1:line.index("}")].split(",")))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def redis_store(redis: RedisServer, pass_on_store_error: bool | None = None) -> str:
    text = f"""\
        stagedoor:
          rateLimit:
            store: {{type: redis, connection: "{redis.url}"}}
            timeout: 500ms
        """
    if pass_on_store_error is not None:
        text += f"    passOnStoreError: {str(pass_on_store_error).lower()}\n"
    return text


# -- Must show: two replicas, one Redis, one combined limit ----------------------------------------
def test_two_sidecars_on_one_redis_hold_one_combined_limit_per_principal(
        fleet: Fleet, redis_server: RedisServer) -> None:
    a = fleet.start("a", redis_store(redis_server))
    b = fleet.start("b", redis_store(redis_server))
    jane, joe = fleet.token("user:default/jane"), fleet.token("user:default/joe")
    statuses = [get((a, b)[i % 2], "/api/limited/items/x", jane).status for i in range(30)]
    assert Counter(statuses) == {200: 10, 429: 20}
    assert statuses[:10] == [200] * 10  # the first ten, wherever they landed
    # another principal is counted apart, on either replica
    assert [get((b, a)[i % 2], "/api/limited/items/y", joe).status for i in range(4)] == [200] * 4
    # both replicas counted their share, and the upstream saw only the allowed ones
    assert metric(a, "limited", "per-principal", "allowed") == 5 + 2
    assert metric(b, "limited", "per-principal", "allowed") == 5 + 2
    assert metric(a, "limited", "per-principal", "limited") == 10
    assert len([s for s in fleet.upstream.seen if s.path.startswith("/v1/items/")]) == 14


def test_a_limited_answer_is_backstage_shaped_with_ietf_fields(
        fleet: Fleet, redis_server: RedisServer) -> None:
    sidecar = fleet.start("a", redis_store(redis_server))
    jane = fleet.token("user:default/jane")
    first = get(sidecar, "/api/limited/items/x", jane)
    assert first.status == 200
    assert first.header("RateLimit-Policy") == '"per-principal";q=10;w=3600'
    assert re.fullmatch(r'"per-principal";r=9;t=\d+', first.header("RateLimit") or "")
    for _ in range(9):
        get(sidecar, "/api/limited/items/x", jane)
    refused = get(sidecar, "/api/limited/items/x", jane)
    assert refused.status == 429
    assert refused.header("content-type") == "application/json; charset=utf-8"
    assert refused.json() == {
        "error": {"name": "Error", "message": "Too many requests, please try again later"},
        "request": {"method": "GET", "url": "/items/x"}, "response": {"statusCode": 429}}
    assert 300 <= int(refused.header("Retry-After") or 0) <= 360  # one request's worth: 6 min
    assert re.fullmatch(r'"per-principal";r=0;t=\d+', refused.header("RateLimit") or "")
    assert refused.header("X-Content-Type-Options") == "nosniff"  # the usual headers too
    # Redis holds one key per principal, prefixed per plugin, expiring by itself
    keys = redis_server.command("KEYS", "*").decode()
    assert "stagedoor:limited:per-principal:user:default/jane" in keys
    ttl = redis_server.command("PTTL", "stagedoor:limited:per-principal:user:default/jane")
    assert int(ttl.split(b"\r\n")[0][1:]) > 0


def test_route_rules_win_and_unauthenticated_routes_count_the_client_ip(fleet: Fleet) -> None:
    sidecar = fleet.start("a")  # the in-process store
    statuses = [get(sidecar, "/api/limited/open").status for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = get(sidecar, "/api/limited/open")
    assert refused.header("RateLimit-Policy") == '"open-by-ip";q=2;w=3600'


def test_a_dry_run_rule_counts_and_logs_but_lets_through(fleet: Fleet) -> None:
    sidecar = fleet.start("a")
    jane = fleet.token("user:default/jane")
    assert [get(sidecar, "/api/limited/shadow", jane).status for _ in range(3)] == [200] * 3
    assert metric(sidecar, "limited", "shadow", "dry_run") == 2
    assert any("dry-run" in line and "shadow" in line for line in sidecar.stderr_lines)


# -- Must show: Redis killed mid-run, then restarted -----------------------------------------------
def test_redis_killed_then_restarted_with_and_without_pass_on_store_error(
        fleet: Fleet, redis_server: RedisServer) -> None:
    passing = fleet.start("passing", redis_store(redis_server, pass_on_store_error=True))
    strict = fleet.start("strict", redis_store(redis_server, pass_on_store_error=False))
    jane = fleet.token("user:default/jane")
    assert get(passing, "/api/limited/items/x", jane).status == 200
    assert get(strict, "/api/limited/items/x", jane).status == 200

    redis_server.stop()  # killed (SIGKILL) mid-run
    through = [get(passing, "/api/limited/items/x", jane) for _ in range(12)]
    assert [r.status for r in through] == [200] * 12  # more than the limit: nothing counts
    refused = get(strict, "/api/limited/items/x", jane)
    assert refused.status == 503
    assert refused.json() == {
        "error": {"name": "ServiceUnavailableError",
                  "message": "Rate limit store unavailable, please try again later"},
        "request": {"method": "GET", "url": "/items/x"}, "response": {"statusCode": 503}}
    assert refused.header("Retry-After") == "5"
    assert metric(passing, "limited", "per-principal", "store_error") >= 12
    assert metric(strict, "limited", "per-principal", "store_error") >= 1
    assert any("passOnStoreError" in line for line in passing.stderr_lines)

    redis_server.start()  # same port, empty: counting starts again, nothing restarted
    deadline = time.monotonic() + 15
    status = 503
    while status == 503 and time.monotonic() < deadline:
        status = get(strict, "/api/limited/items/x", jane).status
        if status == 503:
            time.sleep(0.2)
    assert status == 200
    statuses = [get((passing, strict)[i % 2], "/api/limited/items/x", jane).status
                for i in range(12)]
    assert Counter(statuses) == {200: 9, 429: 3}  # one limit again, shared by both


# -- Backstage's own keys --------------------------------------------------------------------------
def test_backstage_global_limiter_counts_every_path_by_client_ip(fleet: Fleet) -> None:
    sidecar = fleet.start("a", """\
            backend:
              rateLimit:
                incomingRequestLimit: 3
                ipAllowList: [192.0.2.1]     # not loopback: the test client is limited
            """)
    answers = [get(sidecar, path) for path in ("/api/limited/open", "/api/nope",
                                               "/api/limited/items/x", "/api/limited/open")]
    assert [a.status for a in answers] == [200, 404, 401, 429]
    assert [a.header("X-RateLimit-Remaining") for a in answers] == ["2", "1", "0", "0"]
    refused = answers[-1]
    assert refused.json() == BACKSTAGE_429
    assert refused.header("X-RateLimit-Limit") == "3"
    reset = int(refused.header("X-RateLimit-Reset") or 0)
    assert abs(reset - (time.time() + 60)) <= 5
    assert 55 <= int(refused.header("Retry-After") or 0) <= 60
    assert refused.header("content-type") == "application/json; charset=utf-8"


def test_backstage_default_ip_allow_list_exempts_loopback(fleet: Fleet) -> None:
    sidecar = fleet.start("a", """\
            backend:
              rateLimit: {incomingRequestLimit: 1}
            """)
    answers = [get(sidecar, "/api/limited/items/x") for _ in range(3)]
    assert [a.status for a in answers] == [401, 401, 401]
    assert all(a.header("X-RateLimit-Limit") is None for a in answers)


def test_trusted_proxy_forwarded_for_picks_the_client(fleet: Fleet) -> None:
    sidecar = fleet.start("a", """\
            backend:
              rateLimit: {incomingRequestLimit: 1, ipAllowList: [198.51.100.9]}
            stagedoor:
              trustedProxies: [127.0.0.1]
            """)
    one = {"X-Forwarded-For": "198.51.100.7"}
    other = {"X-Forwarded-For": "198.51.100.8"}
    assert get(sidecar, "/api/nope", headers=one).status == 404
    assert get(sidecar, "/api/nope", headers=one).status == 429
    assert get(sidecar, "/api/nope", headers=other).status == 404
    # a forwarded address in ipAllowList is never counted
    allowed = {"X-Forwarded-For": "198.51.100.9"}
    assert [get(sidecar, "/api/nope", headers=allowed).status for _ in range(3)] == [404] * 3


def test_explain_shows_the_limit_without_consuming_it(fleet: Fleet, redis_server: RedisServer
                                                      ) -> None:
    import sys
    configs = fleet.config("explain", redis_store(redis_server))
    args = [sys.executable, "-m", "stagedoor.cli", "explain", "GET", "/api/limited/items/x",
            "--user", "user:default/jane", "--policies", str(fleet.policies)]
    for config in configs:
        args += ["--config", str(config)]
    outputs = [forkserver.run(args, text=True) for _ in range(2)]
    for out in outputs:
        assert out.returncode == 0, out.stderr
        assert "per-principal" in out.stdout and "10 per 1h by principal" in out.stdout
        assert "would be allowed (9 left after it)" in out.stdout
    assert redis_server.command("KEYS", "*").startswith(b"*0")  # nothing was counted


def test_skip_successful_requests_gives_back_forwarded_successes(fleet: Fleet) -> None:
    sidecar = fleet.start("a", """\
            backend:
              rateLimit:
                global: false
                plugin:
                  limited: {incomingRequestLimit: 2, ipAllowList: [], skipSuccessfulRequests: true}
            """)
    jane = fleet.token("user:default/jane")
    # forwarded 200s give their hit back: never limited
    assert [get(sidecar, "/api/limited/items/x", jane).status for _ in range(4)] == [200] * 4
    # failures count: two 401s fill the window, then even a good request is refused
    assert [get(sidecar, "/api/limited/items/x").status for _ in range(2)] == [401, 401]
    refused = get(sidecar, "/api/limited/items/x", jane)
    assert refused.status == 429 and refused.json() == BACKSTAGE_429


def test_backstage_limiters_on_a_killed_redis_follow_their_pass_on_store_error(
        fleet: Fleet, redis_server: RedisServer) -> None:
    def config(pass_on: bool) -> str:
        return f"""\
            backend:
              rateLimit:
                incomingRequestLimit: 100
                ipAllowList: []
                passOnStoreError: {str(pass_on).lower()}
                store: {{type: redis, connection: "{redis_server.url}"}}
            """
    passing, strict = fleet.start("passing", config(True)), fleet.start("strict", config(False))
    assert get(passing, "/api/limited/open").header("X-RateLimit-Remaining") == "99"
    assert get(strict, "/api/limited/open").header("X-RateLimit-Remaining") == "98"  # shared
    redis_server.stop()
    through = get(passing, "/api/limited/open")
    assert through.status == 200 and through.header("X-RateLimit-Limit") is None
    refused = get(strict, "/api/limited/open")
    assert refused.status == 503 and refused.header("Retry-After") == "5"
    assert refused.json()["error"]["name"] == "ServiceUnavailableError"
    assert metric(passing, "", "backend.rateLimit", "store_error") == 1
    assert metric(strict, "", "backend.rateLimit", "store_error") == 1
