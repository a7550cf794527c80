"""Rate limiting, in process: settings from config, policy rules, the two algorithms, the
memory store, and the Redis store against a real redis-server (tests/redisserver.py)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import pytest

from stagedoor.config import Config, ConfigError, load_config
from stagedoor.ratelimit import (
    BACKSTAGE_MESSAGE,
    DEFAULT_IP_ALLOW_LIST,
    BackstageLimit,
    LimitOutcome,
    MemoryStore,
    RateLimiter,
    RateLimitRule,
    RateLimitSettings,
    StoreError,
    WindowCount,
    backstage_429_body,
    backstage_duration_ms,
    client_ip,
    fixed_window_hit,
    gcra,
    ip_key,
    parse_rules,
    parse_trusted_proxies,
    policy_duration,
    rule_subject,
)
from stagedoor.ratelimit_redis import RedisStore

from .redisserver import RedisServer


def config_of(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "app-config.yaml"
    path.write_text(text)
    return load_config([path], env={})


def rule(limit: int = 3, window: float = 60, burst: int | None = None, key: str = "principal",
         enforce: bool = True, name: str = "plugin#1") -> RateLimitRule:
    return RateLimitRule("insights", name, key, limit, window, burst or limit, enforce,
                         "insights.yaml:3")


# -- Backstage durations -----------------------------------------------------------------------
@pytest.mark.parametrize(("value", "ms"), [
    ({"minutes": 1}, 60_000), ({"seconds": 30, "milliseconds": 5}, 30_005),
    ({"hours": 1, "minutes": 30}, 5_400_000), ("PT1M", 60_000), ("PT1.5S", 1_500),
    ("P1D", 86_400_000), ("1m", 60_000), ("30 seconds", 30_000), ("2h", 7_200_000),
    ("500ms", 500), ("1.5s", 1_500), ("1y", 365 * 86_400_000),
])
def test_backstage_duration_formats(value: Any, ms: int) -> None:
    assert backstage_duration_ms(value) == ms


@pytest.mark.parametrize("value", ["60", "1 fortnight", "PT", {}, {"minutes": "1"},
                                   {"mins": 1}, 60, True])
def test_backstage_duration_refuses_what_backstage_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        backstage_duration_ms(value)


def test_policy_window_units() -> None:
    assert policy_duration("1m") == 60
    assert policy_duration("1h") == 3600
    assert policy_duration("1d") == 86400
    assert policy_duration(30) == 30
    for bad in ("2d", "0s", "soon", True):
        with pytest.raises(ValueError):
            policy_duration(bad)


# -- settings ---------------------------------------------------------------------------------
def test_no_rate_limit_config_means_no_backstage_limiter(tmp_path: Path) -> None:
    settings = RateLimitSettings.from_config(config_of(tmp_path, "backend: {}\n"))
    assert settings.global_limit is None and settings.plugin_limits == {}
    assert settings.store.kind == "memory"


def test_true_means_express_rate_limit_defaults(tmp_path: Path) -> None:
    settings = RateLimitSettings.from_config(config_of(tmp_path, "backend:\n  rateLimit: true\n"))
    limit = settings.global_limit
    assert limit is not None
    assert (limit.window_ms, limit.limit) == (60_000, 5)
    assert limit.ip_allow_list == DEFAULT_IP_ALLOW_LIST
    assert not (limit.skip_successful or limit.skip_failed or limit.pass_on_store_error)


def test_options_plugins_and_store(tmp_path: Path) -> None:
    settings = RateLimitSettings.from_config(config_of(tmp_path, """\
backend:
  rateLimit:
    window: {seconds: 30}
    incomingRequestLimit: 100
    ipAllowList: [10.0.0.1]
    skipFailedRequests: true
    passOnStoreError: true
    store: {type: redis, connection: "redis://user:s3cret@127.0.0.1:6379"}
    plugin:
      insights: {window: PT1M, incomingRequestLimit: 2, skipSuccessfulRequests: true}
"""))
    g = settings.global_limit
    assert g is not None
    assert (g.window_ms, g.limit, g.ip_allow_list) == (30_000, 100, ("10.0.0.1",))
    assert g.skip_failed and g.pass_on_store_error and not g.skip_successful
    p = settings.plugin_limits["insights"]
    assert (p.window_ms, p.limit, p.skip_successful, p.pass_on_store_error) == (60_000, 2, True,
                                                                                 False)
    assert p.ip_allow_list == DEFAULT_IP_ALLOW_LIST  # each limiter has its own defaults
    assert settings.store.kind == "redis"
    assert "s3cret" not in settings.store.describe()
    assert (g.key_prefix, p.key_prefix) == ("rl:", "insights")  # Backstage's Redis layout


def test_global_false_keeps_only_plugin_limiters(tmp_path: Path) -> None:
    settings = RateLimitSettings.from_config(config_of(tmp_path, """\
backend:
  rateLimit:
    global: false
    plugin: {insights: {incomingRequestLimit: 1}}
"""))
    assert settings.global_limit is None
    assert settings.plugin_limits["insights"].limit == 1


def test_plugin_options_alone_still_enable_the_global_limiter(tmp_path: Path) -> None:
    # Backstage: config.has('backend.rateLimit') is true, global is not false.
    settings = RateLimitSettings.from_config(config_of(tmp_path, """\
backend:
  rateLimit:
    plugin: {insights: {incomingRequestLimit: 1}}
"""))
    assert settings.global_limit is not None and settings.global_limit.limit == 5


def test_stagedoor_store_wins_over_backstage_store(tmp_path: Path) -> None:
    settings = RateLimitSettings.from_config(config_of(tmp_path, """\
backend:
  rateLimit: {global: false, store: {type: memory}}
stagedoor:
  rateLimit:
    store: {type: redis, connection: "redis://127.0.0.1:1"}
    timeout: 100ms
"""))
    assert settings.store.kind == "redis" and settings.store.timeout == 0.1


@pytest.mark.parametrize(("text", "key"), [
    ("backend:\n  rateLimit: 5\n", "backend.rateLimit"),
    ("backend:\n  rateLimit: {window: 60}\n", "backend.rateLimit.window"),
    ("backend:\n  rateLimit: {incomingRequestLimit: lots}\n",
     "backend.rateLimit.incomingRequestLimit"),
    ("backend:\n  rateLimit: {ipAllowList: 127.0.0.1}\n", "backend.rateLimit.ipAllowList"),
    ("backend:\n  rateLimit: {plugin: {insights: true}}\n", "backend.rateLimit.plugin.insights"),
    ("backend:\n  rateLimit: {store: {type: memcached}}\n", "backend.rateLimit.store.type"),
    ("backend:\n  rateLimit: {store: {type: redis}}\n", "backend.rateLimit.store.connection"),
    ("stagedoor:\n  trustedProxies: [not-an-ip]\n", "stagedoor.trustedProxies"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):  # the schema (at load) or the reader
        RateLimitSettings.from_config(config_of(tmp_path, text))


# -- client address ---------------------------------------------------------------------------
def test_forwarded_for_is_ignored_unless_the_peer_is_trusted(tmp_path: Path) -> None:
    trusted = parse_trusted_proxies(config_of(
        tmp_path, "stagedoor:\n  trustedProxies: [10.0.0.0/8, 127.0.0.1]\n"))
    assert client_ip("192.0.2.7", ["6.6.6.6"], trusted) == "192.0.2.7"
    assert client_ip("192.0.2.7", ["6.6.6.6"], ()) == "192.0.2.7"
    assert client_ip("10.1.2.3", ["6.6.6.6, 10.9.9.9"], trusted) == "6.6.6.6"
    # right-most untrusted hop: the spoofed left part is never believed
    assert client_ip("10.1.2.3", ["6.6.6.6, 198.51.100.4, 10.9.9.9"], trusted) == "198.51.100.4"
    assert client_ip("127.0.0.1", ["198.51.100.4"], trusted) == "198.51.100.4"
    assert client_ip("127.0.0.1", ["garbage"], trusted) == "127.0.0.1"
    assert client_ip("127.0.0.1", [], trusted) == "127.0.0.1"


def test_ip_keys_follow_express_rate_limit() -> None:
    # what express-rate-limit's ipKeyGenerator answers for these (observed with its 8.x)
    assert ip_key("192.0.2.1") == "192.0.2.1"
    assert ip_key("::ffff:1.2.3.4") == "1.2.3.4"
    assert ip_key("2001:db8:1:2:3::4") == "2001:db8:1::/56"
    assert ip_key("::1") == "::/56"
    assert ip_key("2001:db8:1:2:3::4") == ip_key("2001:db8:1:ff::1")  # same /56


# -- algorithms -------------------------------------------------------------------------------
def test_fixed_window_starts_at_the_first_hit_and_resets_after_it() -> None:
    state = fixed_window_hit(None, 1000, 60_000)
    assert state == WindowCount(1, 61_000)
    state = fixed_window_hit(state, 30_000, 60_000)
    assert state == WindowCount(2, 61_000)
    assert fixed_window_hit(state, 61_000, 60_000) == WindowCount(1, 121_000)


def test_gcra_allows_the_burst_then_one_per_interval() -> None:
    tat = None
    now = 0.0
    for i in range(3):
        result = gcra(tat, now, 1000, 3)
        assert result.allowed and result.remaining == 2 - i
        tat = result.tat_ms
    refused = gcra(tat, now, 1000, 3)
    assert not refused.allowed and refused.remaining == 0
    assert refused.retry_after_ms == pytest.approx(1000)
    assert refused.tat_ms == tat  # a refusal changes nothing
    assert gcra(tat, 999, 1000, 3).allowed is False
    later = gcra(tat, 1000, 1000, 3)
    assert later.allowed and later.remaining == 0


def test_gcra_burst_smaller_than_the_limit_smooths() -> None:
    # 100 a minute, at most 20 at once: the 21st waits 0.6 s.
    r = rule(limit=100, window=60, burst=20)
    tat = None
    for _ in range(20):
        result = gcra(tat, 0, r.interval_ms, r.burst)
        assert result.allowed
        tat = result.tat_ms
    refused = gcra(tat, 0, r.interval_ms, r.burst)
    assert not refused.allowed and refused.retry_after_ms == pytest.approx(600)


def test_gcra_state_after_a_window_of_silence_is_fresh() -> None:
    first = gcra(None, 0, 1000, 2)
    assert first.allowed and first.remaining == 1
    again = gcra(first.tat_ms, 5000, 1000, 2)
    assert again.allowed and again.remaining == 1


# -- policy rules -----------------------------------------------------------------------------
def test_rules_parse_with_defaults_and_names() -> None:
    problems: list[tuple[int, str]] = []
    rules = parse_rules([{"limit": 10, "window": "1m"},
                         {"key": "header:X-Api-Key", "limit": 100, "window": "1h", "burst": 5,
                          "enforce": False, "name": "api-key"}],
                        "insights", "plugin", "insights.yaml", [4, 6], problems)
    assert problems == []
    assert [(r.name, r.key, r.limit, r.window, r.burst, r.enforce) for r in rules] == [
        ("plugin#1", "principal", 10, 60.0, 10, True),
        ("api-key", "header:X-Api-Key", 100, 3600.0, 5, False)]
    assert rules[0].where == "insights.yaml:4" and rules[1].header_name == "x-api-key"


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"limit": 0, "window": "1m"}, "'limit'"),
    ({"limit": 5}, "'window' is required"),
    ({"limit": 5, "window": "forever"}, "invalid window"),
    ({"limit": 5, "window": "1m", "key": "cookie"}, "'key'"),
    ({"limit": 5, "window": "1m", "key": "header:"}, "'key'"),
    ({"limit": 5, "window": "1m", "burst": -1}, "'burst'"),
    ({"limit": 5, "window": "1m", "enforce": "no"}, "'enforce'"),
    ({"limit": 5, "window": "1m", "per": "user"}, "unknown key"),
    ("ten a minute", "mapping"),
])
def test_bad_rules_are_reported_with_their_line(entry: Any, fragment: str) -> None:
    problems: list[tuple[int, str]] = []
    assert parse_rules([entry], "insights", "/x", "insights.yaml", [9], problems) == ()
    assert len(problems) == 1 and problems[0][0] == 9 and fragment in problems[0][1]


def test_rule_subject_is_the_principal_else_the_ip() -> None:
    assert rule_subject(rule(), "user:default/jane", "10.0.0.1", {}) == "user:default/jane"
    assert rule_subject(rule(), None, "10.0.0.1", {}) == "ip:10.0.0.1"
    assert rule_subject(rule(key="ip"), "user:default/jane", "10.0.0.1", {}) == "ip:10.0.0.1"
    hashed = rule_subject(rule(key="header:x-api-key"), None, "10.0.0.1",
                          {"x-api-key": "secret-key"})
    assert hashed.startswith("sha256:") and "secret" not in hashed
    assert rule_subject(rule(key="header:x-api-key"), None, "10.0.0.1", {}) == "ip:10.0.0.1"


# -- memory store and the limiter -------------------------------------------------------------
def test_memory_store_stays_within_its_bound() -> None:
    async def run() -> MemoryStore:
        store = MemoryStore(max_keys=100)
        for i in range(1000):
            await store.window_hit(f"k{i}", 60_000)
            await store.gcra(f"g{i}", 1000, 5)
        return store
    store = asyncio.run(run())
    assert len(store) <= 100


def test_backstage_limiter_counts_sets_headers_and_refuses() -> None:
    limit = BackstageLimit("global", "backend.rateLimit", window_ms=60_000, limit=2,
                           ip_allow_list=("10.9.9.9",))
    limiter = RateLimiter()

    async def hit(ip: str) -> LimitOutcome:
        outcome = LimitOutcome()
        await limiter.check_backstage(limit, ip, ip, outcome)
        return outcome

    async def run() -> list[LimitOutcome]:
        return [await hit("192.0.2.1") for _ in range(3)] + [await hit("10.9.9.9"),
                                                              await hit("192.0.2.2")]
    first, second, third, allowed_ip, other = asyncio.run(run())
    assert dict(first.headers)["X-RateLimit-Remaining"] == "1" and not first.refused
    assert dict(second.headers)["X-RateLimit-Remaining"] == "0" and not second.refused
    assert third.refused and third.backstage_body
    headers = dict(third.headers)
    assert headers["X-RateLimit-Limit"] == "2" and headers["X-RateLimit-Remaining"] == "0"
    assert abs(int(headers["X-RateLimit-Reset"]) - math.ceil(time.time() + 60)) <= 2
    assert 58 <= int(headers["Retry-After"]) <= 60
    assert third.error is not None and third.error.message == BACKSTAGE_MESSAGE
    assert allowed_ip.headers == [] and not allowed_ip.refused
    assert not other.refused  # another IP has its own window
    assert limiter.stats[("", "backend.rateLimit", "limited")] == 1


def test_backstage_429_body_has_no_request_member() -> None:
    assert backstage_429_body() == (b'{"error":{"name":"Error","message":"Too many requests, '
                                    b'please try again later"},"response":{"statusCode":429}}')


def test_skip_failed_requests_undoes_hits_of_failed_answers() -> None:
    limit = BackstageLimit("insights", "backend.rateLimit.plugin.insights", limit=1,
                           skip_failed=True)
    limiter = RateLimiter()

    async def run() -> list[bool]:
        refused = []
        for status in (404, 500, None, 200, 200):
            outcome = LimitOutcome()
            await limiter.check_backstage(limit, "192.0.2.1", "192.0.2.1", outcome)
            refused.append(outcome.refused)
            await limiter.settle(outcome.decrements, 429 if outcome.refused else status)
        return refused
    assert asyncio.run(run()) == [False, False, False, False, True]


def test_policy_rules_refuse_dry_run_and_send_ietf_fields() -> None:
    limiter = RateLimiter()
    enforced = rule(limit=2, window=60, name="per-user")
    shadow = rule(limit=1, window=60, enforce=False, name="shadow")

    async def run() -> list[LimitOutcome]:
        outcomes = []
        for _ in range(3):
            outcome = LimitOutcome()
            await limiter.check_rules([enforced, shadow], ["user:default/jane"] * 2, outcome)
            outcomes.append(outcome)
        return outcomes
    first, second, third = asyncio.run(run())
    assert not first.refused and first.dry_run == []
    assert dict(first.headers)["RateLimit-Policy"] == '"per-user";q=2;w=60, "shadow";q=1;w=60'
    assert dict(first.headers)["RateLimit"].startswith('"per-user";r=1;t=')
    assert not second.refused and len(second.dry_run) == 1 and "shadow" in second.dry_run[0]
    assert third.refused and third.error is not None and third.error.status == 429
    assert int(dict(third.headers)["Retry-After"]) == 30
    assert limiter.stats[("insights", "per-user", "limited")] == 1
    assert limiter.stats[("insights", "shadow", "dry_run")] == 2


def test_peek_shows_the_limit_without_consuming_it() -> None:
    limiter = RateLimiter()
    one = rule(limit=1, window=60)

    async def run() -> tuple[LimitOutcome, LimitOutcome]:
        for _ in range(3):
            await limiter.check_rules([one], ["user:default/jane"], LimitOutcome(), peek=True)
        real = LimitOutcome()
        await limiter.check_rules([one], ["user:default/jane"], real)
        peek = LimitOutcome()
        await limiter.check_rules([one], ["user:default/jane"], peek, peek=True)
        return real, peek
    real, peek = asyncio.run(run())
    assert not real.refused
    assert not peek.refused and "would be refused" in peek.notes[0]
    assert limiter.stats.get(("insights", "plugin#1", "allowed")) == 1


# -- the Redis store, on a real redis-server --------------------------------------------------
def test_redis_fixed_window_is_atomic_across_clients(redis_server: RedisServer) -> None:
    async def run() -> list[int]:
        stores = [RedisStore(redis_server.url, timeout=2.0) for _ in range(4)]
        try:
            hits = await asyncio.gather(*(stores[i % 4].window_hit("rl:192.0.2.1", 60_000)
                                          for i in range(40)))
        finally:
            for store in stores:
                await store.close()
        return sorted(h.hits for h in hits)
    assert asyncio.run(run()) == list(range(1, 41))
    ttl = int(redis_server.command("PTTL", "rl:192.0.2.1").split(b"\r\n")[0][1:])
    assert 0 < ttl <= 60_000  # expires by itself


def test_redis_gcra_holds_one_limit_across_clients(redis_server: RedisServer) -> None:
    r = rule(limit=10, window=3600)

    async def run() -> int:
        stores = [RedisStore(redis_server.url, timeout=2.0) for _ in range(3)]
        try:
            results = await asyncio.gather(*(
                stores[i % 3].gcra("stagedoor:insights:plugin#1:user:default/jane",
                                   r.interval_ms, r.burst) for i in range(30)))
        finally:
            for store in stores:
                await store.close()
        return sum(result.allowed for result in results)
    assert asyncio.run(run()) == 10
    assert b":-1" not in redis_server.command("PTTL",
                                              "stagedoor:insights:plugin#1:user:default/jane")


def test_redis_down_fails_fast_and_comes_back_by_itself(redis_server: RedisServer) -> None:
    async def run() -> tuple[list[str], bool]:
        store = RedisStore(redis_server.url, timeout=0.5)
        try:
            await store.window_hit("rl:a", 60_000)
            redis_server.stop()
            errors = []
            for _ in range(3):
                try:
                    await store.window_hit("rl:a", 60_000)
                except StoreError as exc:
                    errors.append(str(exc))
            redis_server.start()  # an empty Redis: the scripts are gone too (NOSCRIPT)
            for _ in range(100):  # the cool-down after a failure is short; bounded wait
                try:
                    count = await store.window_hit("rl:a", 60_000)
                    return errors, count.hits == 1
                except StoreError:
                    await asyncio.sleep(0.1)
            return errors, False
        finally:
            await store.close()
    errors, recovered = asyncio.run(run())
    assert len(errors) == 3
    assert recovered


def test_redis_unreachable_store_error_modes() -> None:
    from .redisserver import free_port
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    for pass_on in (True, False):
        limit = BackstageLimit("global", "backend.rateLimit", limit=1,
                               pass_on_store_error=pass_on)
        settings = RateLimitSettings(global_limit=limit)

        async def run(limit: BackstageLimit = limit,
                      settings: RateLimitSettings = settings) -> tuple[LimitOutcome, LimitOutcome]:
            limiter = RateLimiter(store=RedisStore(url, timeout=0.5))
            try:
                outcome = await limiter.check_head(settings, None, "192.0.2.1", "192.0.2.1")
                rules = LimitOutcome()
                await limiter.check_policy(settings, [rule()], "user:default/jane",
                                           "192.0.2.1", {}, rules)
                return outcome, rules
            finally:
                await limiter.close()
        backstage, policy = asyncio.run(run())
        if pass_on:
            assert not backstage.refused and not policy.refused
        else:
            for outcome in (backstage, policy):
                assert outcome.error is not None and outcome.error.status == 503
                assert dict(outcome.error.headers)["Retry-After"] == "5"


def test_store_error_is_never_a_hang(tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers: bounded by the timeout."""
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"

    async def run() -> bool:
        store = RedisStore(url, timeout=0.3)
        try:
            async with asyncio.timeout(10):  # the test's own bound, far above the store's
                await store.window_hit("rl:x", 60_000)
        except StoreError:
            return True
        finally:
            await store.close()
        return False
    try:
        assert asyncio.run(run())
    finally:
        sock.close()


# -- reloads --------------------------------------------------------------------------------------
def test_a_reload_keeps_the_store_and_its_counts_unless_the_store_changes(tmp_path: Path) -> None:
    from stagedoor.runtime import Runtime, load_state

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "limited.yaml").write_text(
        "pluginId: limited\nroutes:\n  - path: /x\n    auth: unauthenticated\n"
        "    respond: {status: 200}\n")
    config = tmp_path / "app-config.yaml"
    config.write_text("backend:\n  baseUrl: http://127.0.0.1:1\n"
                      "  rateLimit: {incomingRequestLimit: 1}\n")
    runtime = Runtime.load([str(config)], str(policies))
    first = runtime.state.limiter
    first.count("limited", "r", "allowed")
    config.write_text("backend:\n  baseUrl: http://127.0.0.1:1\n"
                      "  rateLimit: {incomingRequestLimit: 7}\n")
    runtime.apply(load_state([str(config)], str(policies), runtime.state))
    assert runtime.state.limiter is first  # same store: counts survive the reload
    assert runtime.state.ratelimit.global_limit is not None
    assert runtime.state.ratelimit.global_limit.limit == 7  # the new settings apply
    config.write_text("backend:\n  baseUrl: http://127.0.0.1:1\n"
                      "  rateLimit:\n    incomingRequestLimit: 7\n"
                      "    store: {type: redis, connection: 'redis://127.0.0.1:1'}\n")
    runtime.apply(load_state([str(config)], str(policies), runtime.state))
    assert runtime.state.limiter is not first
    assert runtime.state.limiter.store.kind == "redis"
    assert runtime.state.limiter.stats[("limited", "r", "allowed")] == 1  # counters go on
