"""The Redis rate-limit store: counts shared by every replica, one atomic round trip a check.

Each check is one Lua script run (``EVALSHA``; redis-py reloads the script by itself after a
Redis restart), so two replicas never both take the last request of a window. Keys carry a
time to live and expire by themselves; nothing needs cleaning up. Time comes from the Redis
server (``TIME``) for the policy rules, so replicas with skewed clocks still agree.

Failure is bounded: every command has a timeout (connect included), there are no client-side
retries, and after a failure the store answers :class:`StoreError` at once for a short
cool-down instead of trying again per request. The connection pool reconnects on the first
command after that, so a restarted Redis is picked up without restarting anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from .ratelimit_algorithms import GcraResult, StoreError, WindowCount, gcra, redact_url

log = logging.getLogger("stagedoor.ratelimit")

#: How long the store answers "unavailable" without trying, after a failure (seconds).
COOLDOWN = 0.5
#: Connections to Redis per process; checks beyond that wait for one (bounded by the timeout).
MAX_CONNECTIONS = 64

# rate-limit-redis's increment script (what Backstage runs), so counts can be shared with
# Backstage replicas on the same Redis: the window starts at the first hit and is never moved.
WINDOW_HIT = """
local windowMs = tonumber(ARGV[1])
local timeToExpire = redis.call("PTTL", KEYS[1])
if timeToExpire <= 0 then
  redis.call("SET", KEYS[1], 1, "PX", windowMs)
  return { 1, windowMs }
end
local totalHits = redis.call("INCR", KEYS[1])
return { totalHits, timeToExpire }
"""

# Only within a live window, and never below zero (a bare DECR would create a key with no TTL).
WINDOW_DECREMENT = """
if redis.call("PTTL", KEYS[1]) > 0 and tonumber(redis.call("GET", KEYS[1]) or "0") > 0 then
  return redis.call("DECR", KEYS[1])
end
return 0
"""

# GCRA on the server's clock. Returns {allowed, stored TAT before the check, now} as strings
# (Lua numbers would be truncated to integers in the reply); the caller recomputes the details
# with the same arithmetic (stagedoor.ratelimit.gcra).
GCRA = """
redis.replicate_commands()
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local commit = ARGV[3] == "1"
local stored = redis.call("GET", KEYS[1])
local tat = now
if stored then tat = math.max(tonumber(stored), now) end
local new_tat = tat + interval
local old = stored and string.format("%.3f", tonumber(stored)) or ""
if new_tat - now > burst * interval + 1e-9 then
  return { 0, old, string.format("%.3f", now) }
end
if commit then
  redis.call("SET", KEYS[1], string.format("%.3f", new_tat), "PX", math.ceil(new_tat - now) + 1000)
end
return { 1, old, string.format("%.3f", now) }
"""


class RedisStore:
    """:class:`~stagedoor.ratelimit.Store` on Redis (``redis`` package, asyncio API)."""

    kind = "redis"

    def __init__(self, url: str, timeout: float = 0.25) -> None:
        self.url = url
        self.timeout = timeout
        # A blocking pool: past max_connections a check waits (at most ``timeout``) for a free
        # connection instead of failing at once.
        pool = BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0)
        self.client: Redis = Redis(connection_pool=pool)
        self._window_hit = self.client.register_script(WINDOW_HIT)
        self._window_decrement = self.client.register_script(WINDOW_DECREMENT)
        self._gcra = self.client.register_script(GCRA)
        self._down_until = 0.0
        self._down_reason = ""
        self.failures = 0

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        now = time.monotonic()
        if now < self._down_until:
            raise StoreError(f"{redact_url(self.url)} unavailable ({self._down_reason}); "
                             "not retried for a moment")
        try:
            # The socket timeouts bound each read and connect; this bounds the whole exchange
            # (a script load after NOSCRIPT included).
            async with asyncio.timeout(self.timeout * 3):
                return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failures += 1
            self._down_reason = f"{type(exc).__name__}: {exc}"[:200]
            self._down_until = time.monotonic() + COOLDOWN
            raise StoreError(f"{redact_url(self.url)}: {self._down_reason}") from exc

    async def window_hit(self, key: str, window_ms: int) -> WindowCount:
        hits, ttl = await self._run(self._window_hit, [key], [window_ms])
        return WindowCount(int(hits), time.time() * 1000.0 + int(ttl))

    async def window_decrement(self, key: str) -> None:
        await self._run(self._window_decrement, [key], [])

    async def gcra(self, key: str, interval_ms: float, burst: int,
                   commit: bool = True) -> GcraResult:
        allowed, old, now = await self._run(self._gcra, [key],
                                            [repr(interval_ms), burst, 1 if commit else 0])
        old_text = old.decode() if isinstance(old, bytes) else str(old)
        now_ms = float(now.decode() if isinstance(now, bytes) else now)
        result = gcra(float(old_text) if old_text else None, now_ms, interval_ms, burst)
        if bool(int(allowed)) != result.allowed:  # float edge: the server's word is final
            result = GcraResult(bool(int(allowed)), result.remaining, result.retry_after_ms,
                                result.reset_after_ms, result.tat_ms)
        return result

    async def close(self) -> None:
        try:
            await self.client.aclose()
            await self.client.connection_pool.disconnect()
        except (RedisError, OSError) as exc:  # closing a dead connection
            log.debug("closing the rate limit store: %s", exc)
