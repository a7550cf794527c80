"""Rate limiting: Backstage's ``backend.rateLimit`` and the policy's own ``rateLimit:`` rules.

Two kinds of limit, one store:

* **Backstage's limiter** (``backend.rateLimit``, ``backend.rateLimit.plugin.<pluginId>``), as
  ``@backstage/backend-defaults`` runs it on ``express-rate-limit``: a fixed window per client IP
  that starts with the key's first hit, default 5 requests a minute, loopback callers exempt
  (``ipAllowList``), ``X-RateLimit-Limit/Remaining/Reset`` on every answer it covers, and on
  refusal ``429``, ``Retry-After`` (seconds left in the window) and a body without a
  ``request`` member. The global limiter counts every request, ``/health`` included.
* **Policy rules** (``rateLimit:`` on a plugin or a route; the route's rules win): keyed by the
  verified principal (or ``ip``, ``token-subject``, ``header:<name>``), a sustained rate
  ``limit`` per ``window`` with a ``burst`` allowance, as GCRA (a token bucket that refills
  continuously); ``enforce: false`` only counts and logs. They send the IETF
  ``RateLimit-Policy`` / ``RateLimit`` fields.

Everything here is pure or in-process: settings parsed once from config and policy, the two
algorithms as functions over plain numbers, the in-process store, and :class:`RateLimiter`,
which runs checks against whichever store was chosen at load (``stagedoor.ratelimit_redis``
holds the Redis one). No mitmproxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .config import Config
from .errors import JSON_CONTENT_TYPE, ApiError, render_error
from .ratelimit_algorithms import (
    GcraResult,
    StoreError,
    WindowCount,
    fixed_window_hit,
    gcra,
    redact_url,
)

log = logging.getLogger("stagedoor.ratelimit")

#: Backstage's default ``ipAllowList``: loopback callers are never limited.
DEFAULT_IP_ALLOW_LIST = ("127.0.0.1", "0:0:0:0:0:0:0:1", "::1")
#: ``express-rate-limit``'s defaults, which Backstage leaves in place.
DEFAULT_WINDOW_MS = 60_000
DEFAULT_LIMIT = 5
BACKSTAGE_MESSAGE = "Too many requests, please try again later"
#: Seconds a client is told to wait when the store cannot be reached.
STORE_ERROR_RETRY_AFTER = 5
DEFAULT_MAX_KEYS = 100_000
DEFAULT_REDIS_TIMEOUT = 0.25
DEFAULT_REDIS_PREFIX = "stagedoor:"
MAX_POLICY_WINDOW = 86_400.0  # one day
KEY_KINDS = ("principal", "ip", "token-subject")
RULE_KEYS = {"key", "limit", "window", "burst", "enforce", "name", "description"}

BACKSTAGE_LIMIT_KEYS = {"window", "incomingRequestLimit", "ipAllowList", "skipSuccessfulRequests",
                        "skipFailedRequests", "passOnStoreError"}
_HUMAN_DURATION_MS = {"years": 365 * 86_400_000, "months": 30 * 86_400_000,
                      "weeks": 7 * 86_400_000, "days": 86_400_000, "hours": 3_600_000,
                      "minutes": 60_000, "seconds": 1000, "milliseconds": 1}
# The `ms` package's units, which Backstage's readDurationFromConfig accepts in strings.
_MS_UNITS = {
    "years": 31_557_600_000, "year": 31_557_600_000, "yrs": 31_557_600_000,
    "yr": 31_557_600_000, "y": 31_557_600_000,
    "weeks": 604_800_000, "week": 604_800_000, "w": 604_800_000,
    "days": 86_400_000, "day": 86_400_000, "d": 86_400_000,
    "hours": 3_600_000, "hour": 3_600_000, "hrs": 3_600_000, "hr": 3_600_000, "h": 3_600_000,
    "minutes": 60_000, "minute": 60_000, "mins": 60_000, "min": 60_000, "m": 60_000,
    "seconds": 1000, "second": 1000, "secs": 1000, "sec": 1000, "s": 1000,
    "milliseconds": 1, "millisecond": 1, "msecs": 1, "msec": 1, "ms": 1,
}
_MS_DURATION = re.compile(r"^(-?(?:\d+)?\.?\d+) *([a-z]+)?$", re.IGNORECASE)
_ISO_DURATION = re.compile(
    r"^P(?:(\d+(?:\.\d+)?)Y)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+)(?:[.,](\d+))?S)?)?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _backstage_bool(config: Config, key: str, value: Any) -> bool | None:
    """``getOptionalBoolean``: booleans, and y/yes/true/1/on or n/no/false/0/off."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float | str):
        text = str(value).strip().lower()
        if text in ("y", "yes", "true", "1", "on"):
            return True
        if text in ("n", "no", "false", "0", "off"):
            return False
    config.invalid(key, "must be true or false")  # the schema said so too
    return None


def _backstage_number(config: Config, key: str, value: Any) -> float | None:
    """``getOptionalNumber``: numbers, and strings that are numbers (``${ENV}`` values)."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    config.invalid(key, "must be a number")  # the schema said so too
    return None


# -- durations ------------------------------------------------------------------------------------
def backstage_duration_ms(value: Any) -> int:
    """A duration as Backstage's ``readDurationFromConfig`` reads it, in milliseconds.

    ``{minutes: 1}`` (any of years .. milliseconds), an ISO 8601 string (``PT1M``) or an
    ``ms``-style string (``1m``, ``30 seconds``; a bare number is refused). Raises ValueError.
    """
    if isinstance(value, dict):
        unknown = [k for k in value if k not in _HUMAN_DURATION_MS]
        if unknown or not value:
            raise ValueError(f"expected one or more of {', '.join(_HUMAN_DURATION_MS)}")
        total = 0.0
        for unit, amount in value.items():
            if isinstance(amount, bool) or not isinstance(amount, int | float):
                raise ValueError(f"'{unit}' must be a number")
            total += amount * _HUMAN_DURATION_MS[unit]
        return int(total)
    if not isinstance(value, str):
        raise ValueError("use e.g. {minutes: 1}, 'PT1M' or '1m'")
    text = value.strip()
    if text.startswith("P"):
        match = _ISO_DURATION.fullmatch(text)
        if not match or not any(match.groups()):
            raise ValueError(f"invalid ISO duration {text!r} (e.g. 'PT1M')")
        y, mo, w, d, h, mi, s, frac = match.groups()
        total = sum(float(v or 0) * _HUMAN_DURATION_MS[u] for v, u in (
            (y, "years"), (mo, "months"), (w, "weeks"), (d, "days"), (h, "hours"),
            (mi, "minutes"), (s, "seconds")))
        if frac:
            total += math.floor(float(f"0.{frac}") * 1000)
        return int(total)
    if text.isdigit():
        raise ValueError("a duration cannot be a plain number; add a unit like 'ms' or 'seconds'")
    match = _MS_DURATION.fullmatch(text)
    unit = (match.group(2) or "ms").lower() if match else ""
    if not match or unit not in _MS_UNITS:
        raise ValueError(f"invalid duration {text!r} (e.g. '1m', '30 seconds', 'PT1M')")
    ms = float(match.group(1)) * _MS_UNITS[unit]
    if ms < 0:
        raise ValueError("negative durations are not allowed")
    # Backstage splits the milliseconds into whole years/weeks/.../ms, then adds them back
    # with 365-day years: only years come out differently, and only by that rule.
    years = math.floor(ms / _MS_UNITS["y"])
    return int(years * _HUMAN_DURATION_MS["years"] + (ms - years * _MS_UNITS["y"]))


def policy_duration(value: Any) -> float:
    """``30s``, ``1m``, ``1h``, ``1d``, ``500ms`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid window {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(value))
        if not match:
            raise ValueError(f"invalid window {value!r} (use e.g. 30s, 1m, 1h, 1d)")
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"]
        seconds = float(match.group(1)) * scale
    if not 0.001 <= seconds <= MAX_POLICY_WINDOW:
        raise ValueError(f"window {value!r} must be between 1ms and 1d")
    return seconds


# -- client addresses -----------------------------------------------------------------------------
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted_proxies(config: Config) -> tuple[Network, ...]:
    """``stagedoor.trustedProxies``: addresses or CIDRs whose ``X-Forwarded-For`` is believed."""
    key = "stagedoor.trustedProxies"
    raw = config.get(key)
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    networks: list[Network] = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            config.invalid(key, f"{item!r} is not an IP address or CIDR")
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_ip(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the
    right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy."""
    peer_addr = _address(peer)
    if peer_addr is None or not trusted or not any(peer_addr in n for n in trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        addr = _address(hop)
        if addr is None:
            return peer  # a malformed chain: believe only what we saw ourselves
        if not any(addr in n for n in trusted):
            return str(addr)
    return str(_address(hops[0])) if hops else peer


def ip_key(ip: str) -> str:
    """The limiter key of an address, as ``express-rate-limit``'s ``ipKeyGenerator``: IPv4 as
    is (IPv4-mapped IPv6 unwrapped), IPv6 as its /56 network."""
    addr = _address(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{addr}/56", strict=False))
    return str(addr)


# -- Backstage's limiter --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BackstageLimit:
    """One ``express-rate-limit`` instance: the global one or one plugin's."""

    scope: str  # "global" or the plugin id
    config_key: str  # where it came from, for messages
    window_ms: int = DEFAULT_WINDOW_MS
    limit: int = DEFAULT_LIMIT
    ip_allow_list: tuple[str, ...] = DEFAULT_IP_ALLOW_LIST
    skip_successful: bool = False
    skip_failed: bool = False
    pass_on_store_error: bool = False

    @property
    def key_prefix(self) -> str:
        """Backstage's Redis key layout: ``rl:<ip>`` globally, ``<pluginId><ip>`` per plugin, so
        stagedoor and Backstage replicas on one Redis share their counts."""
        return "rl:" if self.scope == "global" else self.scope

    def skips(self, ip: str, peer: str) -> bool:
        return ip in self.ip_allow_list or peer in self.ip_allow_list

    @classmethod
    def from_options(cls, config: Config, key: str, scope: str,
                     options: dict[str, Any] | None) -> BackstageLimit:
        if options is None:
            return cls(scope, key)
        window_ms = DEFAULT_WINDOW_MS
        if options.get("window") is not None:
            try:
                window_ms = backstage_duration_ms(options["window"])
            except ValueError as exc:
                config.invalid(f"{key}.window", str(exc))
            if not 1 <= window_ms <= 2**31 - 1:
                config.invalid(f"{key}.window", "must be between 1ms and ~24.8 days")
                window_ms = DEFAULT_WINDOW_MS
        limit = _backstage_number(config, f"{key}.incomingRequestLimit",
                                  options.get("incomingRequestLimit"))
        if limit is None or limit < 0:  # < 0: the schema said so
            limit = DEFAULT_LIMIT
        allow = options.get("ipAllowList")
        if isinstance(allow, list) and all(isinstance(a, str) for a in allow):
            allow_list = tuple(allow)
        else:  # absent, or the schema said what is wrong
            allow_list = DEFAULT_IP_ALLOW_LIST
        flags: dict[str, bool] = {}
        for name in ("skipSuccessfulRequests", "skipFailedRequests", "passOnStoreError"):
            flags[name] = bool(_backstage_bool(config, f"{key}.{name}", options.get(name)))
        return cls(scope, key, window_ms, int(limit), allow_list, flags["skipSuccessfulRequests"],
                   flags["skipFailedRequests"], flags["passOnStoreError"])


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """Where counts live: ``memory`` (this process) or ``redis`` (shared by replicas)."""

    kind: Literal["memory", "redis"] = "memory"
    url: str = ""
    config_key: str = ""
    timeout: float = DEFAULT_REDIS_TIMEOUT  # per command, connect included
    prefix: str = DEFAULT_REDIS_PREFIX  # for policy-rule keys (Backstage keys keep its layout)
    max_keys: int = DEFAULT_MAX_KEYS  # memory store bound

    def describe(self) -> str:
        if self.kind == "memory":
            return "memory"
        return f"redis {redact_url(self.url)}"


def _store_spec(config: Config, key: str, raw: Any, base: StoreSpec) -> StoreSpec:
    """The schema checked the store's structure (type, connection URL scheme); one it refused
    is reported already and memory is used meanwhile."""
    kind = raw.get("type", "memory") if isinstance(raw, dict) else None
    url = raw.get("connection", "") if isinstance(raw, dict) else None
    if kind not in ("memory", "redis") or (kind == "redis" and (
            not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")))):
        config.invalid(key, "use {type: memory} or {type: redis, connection: redis://...}")
        return base
    assert isinstance(url, str)
    return StoreSpec(kind, url if kind == "redis" else "", key, base.timeout, base.prefix,
                     base.max_keys)


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Everything about limits read from config, once per load."""

    global_limit: BackstageLimit | None = None
    plugin_limits: dict[str, BackstageLimit] = field(default_factory=dict)
    store: StoreSpec = field(default_factory=StoreSpec)
    trusted_proxies: tuple[Network, ...] = ()
    #: stagedoor.rateLimit.passOnStoreError: for policy rules; None: as Backstage's limiter of
    #: the plugin (or the global one) says, else false.
    pass_on_store_error: bool | None = None

    @property
    def backstage_enabled(self) -> bool:
        return self.global_limit is not None or bool(self.plugin_limits)

    def policy_pass_on_store_error(self, plugin_id: str) -> bool:
        if self.pass_on_store_error is not None:
            return self.pass_on_store_error
        limit = self.plugin_limits.get(plugin_id) or self.global_limit
        return limit.pass_on_store_error if limit is not None else False

    @classmethod
    def from_config(cls, config: Config) -> RateLimitSettings:
        with config.collecting():
            return cls._read(config)

    @classmethod
    def _read(cls, config: Config) -> RateLimitSettings:
        """Structure is the schema's; durations, addresses and store URLs are checked here,
        every problem reported (a broken part falls back to its default meanwhile)."""
        raw = config.get("backend.rateLimit")
        global_limit: BackstageLimit | None = None
        plugin_limits: dict[str, BackstageLimit] = {}
        base = StoreSpec()
        extra = config.get_mapping("stagedoor.rateLimit")
        timeout = extra.get("timeout")
        if timeout is not None:
            try:
                base = StoreSpec(timeout=policy_duration(timeout))
            except ValueError as exc:
                config.invalid("stagedoor.rateLimit.timeout", str(exc))
        if extra.get("maxKeys") is not None:
            max_keys = int(config.get_number("stagedoor.rateLimit.maxKeys", DEFAULT_MAX_KEYS))
            if max_keys < 100:
                config.invalid("stagedoor.rateLimit.maxKeys", "must be a number >= 100")
                max_keys = DEFAULT_MAX_KEYS
            base = StoreSpec(timeout=base.timeout, max_keys=max_keys)
        if extra.get("prefix") is not None:
            base = StoreSpec(timeout=base.timeout, max_keys=base.max_keys,
                             prefix=str(extra["prefix"]))
        store = base
        if raw is True:
            global_limit = BackstageLimit("global", "backend.rateLimit")
        elif raw is None or raw is False:
            pass
        elif isinstance(raw, dict):
            if _backstage_bool(config, "backend.rateLimit.global", raw.get("global")) is not False:
                options = {k: v for k, v in raw.items() if k in BACKSTAGE_LIMIT_KEYS}
                global_limit = BackstageLimit.from_options(config, "backend.rateLimit", "global",
                                                           options)
            plugins = raw.get("plugin") or {}
            for plugin_id, options in (plugins.items() if isinstance(plugins, dict) else ()):
                key = f"backend.rateLimit.plugin.{plugin_id}"
                if not isinstance(options, dict):
                    # Backstage's getConfig() refuses anything but an object here, at start.
                    config.invalid(key, "must be an object of rate limit options "
                                        "(window, incomingRequestLimit, ...)")
                    continue
                plugin_limits[str(plugin_id)] = BackstageLimit.from_options(
                    config, key, str(plugin_id), options)
            if raw.get("store") is not None:
                store = _store_spec(config, "backend.rateLimit.store", raw["store"], base)
        else:
            config.invalid("backend.rateLimit", "use true or an object of options")
        if extra.get("store") is not None:
            store = _store_spec(config, "stagedoor.rateLimit.store", extra["store"], base)
        pass_on: bool | None = None
        if extra.get("passOnStoreError") is not None:
            pass_on = config.get_bool("stagedoor.rateLimit.passOnStoreError", False)
        return cls(global_limit, plugin_limits, store, parse_trusted_proxies(config), pass_on)


# -- policy rules ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """One ``rateLimit:`` entry of a policy: ``limit`` per ``window``, ``burst`` at once."""

    plugin_id: str
    name: str  # unique within the plugin; the metrics label and the RateLimit-Policy item
    key: str  # principal | ip | token-subject | header:<name>
    limit: int
    window: float  # seconds
    burst: int
    enforce: bool
    where: str  # file:line

    @property
    def interval_ms(self) -> float:
        """GCRA emission interval: one request's worth of the window."""
        return self.window * 1000.0 / self.limit

    @property
    def header_name(self) -> str | None:
        return self.key[len("header:"):].lower() if self.key.startswith("header:") else None

    def describe(self) -> str:
        text = f"{self.limit} per {_seconds_text(self.window)} by {self.key}"
        if self.burst != self.limit:
            text += f", burst {self.burst}"
        return text + ("" if self.enforce else " (enforce: false)")


def _seconds_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds * 1000:g}ms"


def parse_rules(raw: Any, plugin_id: str, scope: str, file: str, lines: Sequence[int],
                problems: list[tuple[int, str]]) -> tuple[RateLimitRule, ...]:
    """``rateLimit:`` of a plugin or a route (``scope``: ``plugin`` or the route path).

    ``raw`` is a mapping or a list of mappings (plain values); ``lines`` their line numbers.
    Problems are appended as (line, message); the rules that parsed are returned.
    """
    items = raw if isinstance(raw, list) else [raw]
    rules: list[RateLimitRule] = []
    for index, item in enumerate(items):
        line = lines[index] if index < len(lines) else (lines[0] if lines else 1)
        where = f"{file}:{line}"

        def problem(message: str, line: int = line) -> None:
            problems.append((line, f"rateLimit: {message}"))

        if not isinstance(item, dict):
            problem("each entry must be a mapping with 'limit' and 'window'")
            continue
        unknown = sorted(set(item) - RULE_KEYS)
        if unknown:
            problem(f"unknown key(s) {', '.join(map(repr, unknown))} "
                    f"(allowed: {', '.join(sorted(RULE_KEYS))})")
            continue
        key = item.get("key", "principal")
        if not isinstance(key, str) or not (key in KEY_KINDS or (
                key.startswith("header:") and _HEADER_NAME.match(key[len("header:"):]))):
            problem(f"'key' must be one of {', '.join(KEY_KINDS)} or header:<name>, got {key!r}")
            continue
        limit = item.get("limit")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10**9:
            problem(f"'limit' must be a whole number of requests (1 or more), got {limit!r}")
            continue
        if "window" not in item:
            problem("'window' is required (e.g. 1m)")
            continue
        try:
            window = policy_duration(item["window"])
        except ValueError as exc:
            problem(str(exc))
            continue
        burst = item.get("burst", limit)
        if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= 10**9:
            problem(f"'burst' must be a whole number of requests (1 or more), got {burst!r}")
            continue
        enforce = item.get("enforce", True)
        if not isinstance(enforce, bool):
            problem("'enforce' must be true or false")
            continue
        name = item.get("name") or f"{scope}#{index + 1}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:/{}#\-]{1,100}", name):
            problem("'name' must be 1-100 letters, digits or _ . : / { } # -")
            continue
        rules.append(RateLimitRule(plugin_id, name, key, limit, window, burst, enforce, where))
    return tuple(rules)


# -- stores ---------------------------------------------------------------------------------------
class Store(Protocol):
    """Counts behind one interface; chosen once at load (memory | redis)."""

    kind: str

    async def window_hit(self, key: str, window_ms: int) -> WindowCount: ...

    async def window_decrement(self, key: str) -> None: ...

    async def gcra(self, key: str, interval_ms: float, burst: int,
                   commit: bool = True) -> GcraResult:
        """One request's check; ``commit=False`` only looks (nothing is stored)."""
        ...

    async def close(self) -> None: ...


def _now_ms() -> float:
    return time.time() * 1000.0


class MemoryStore:
    """In-process counts: bounded (``max_keys``), entries expire by themselves.

    A dict in insertion order; expired entries are swept when it grows past its bound, and if
    still full the oldest entries go (they lose their count: a bound on memory, not on
    correctness for the keys in use). Not shared: with N replicas each counts its own share.
    """

    kind = "memory"

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._windows: dict[str, WindowCount] = {}
        self._tats: dict[str, tuple[float, float]] = {}  # key -> (tat, expires at)

    def __len__(self) -> int:
        return len(self._windows) + len(self._tats)

    def _bound(self, now: float) -> None:
        """Room for a new key: sweep the expired ones; if that is not enough, drop the oldest
        tenth at once, so a flood of new keys costs one sweep per tenth, not one per key."""
        if len(self._windows) + len(self._tats) < self.max_keys:
            return
        self._windows = {k: v for k, v in self._windows.items() if v.reset_at_ms > now}
        self._tats = {k: v for k, v in self._tats.items() if v[1] > now}
        target = self.max_keys - max(1, self.max_keys // 10)
        while self._windows and len(self._windows) + len(self._tats) > target:
            del self._windows[next(iter(self._windows))]
        while self._tats and len(self._windows) + len(self._tats) > target:
            del self._tats[next(iter(self._tats))]

    async def window_hit(self, key: str, window_ms: int) -> WindowCount:
        now = _now_ms()
        state = self._windows.get(key)
        if state is None:
            self._bound(now)
        new = fixed_window_hit(state, now, window_ms)
        if state is not None and new.hits == 1:
            del self._windows[key]  # a new window: move it to the end (newest)
        self._windows[key] = new
        return new

    async def window_decrement(self, key: str) -> None:
        state = self._windows.get(key)
        if state is not None and state.hits > 0:
            self._windows[key] = WindowCount(state.hits - 1, state.reset_at_ms)

    async def gcra(self, key: str, interval_ms: float, burst: int,
                   commit: bool = True) -> GcraResult:
        now = _now_ms()
        stored = self._tats.get(key)
        tat = stored[0] if stored is not None and stored[1] > now else None
        result = gcra(tat, now, interval_ms, burst)
        if result.allowed and commit:
            if stored is None:
                self._bound(now)
            else:
                del self._tats[key]
            self._tats[key] = (result.tat_ms, result.tat_ms)
        return result

    async def close(self) -> None:
        self._windows.clear()
        self._tats.clear()


def make_store(spec: StoreSpec) -> Store:
    """The store a spec names. Redis is imported only when asked for."""
    if spec.kind == "redis":
        from .ratelimit_redis import RedisStore
        return RedisStore(spec.url, timeout=spec.timeout)
    return MemoryStore(spec.max_keys)


# -- checks -------------------------------------------------------------------------------------
OUTCOMES = ("allowed", "limited", "dry_run", "store_error")


@dataclass(slots=True)
class LimitOutcome:
    """What the limits say about one request: refuse it (``error``) or let it on, and the
    headers its answer carries either way."""

    error: ApiError | None = None
    backstage_body: bool = False  # render as Backstage's limiter does (no `request` member)
    headers: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # trace lines (explain, logs)
    dry_run: list[str] = field(default_factory=list)
    #: (store key, skip_successful, skip_failed, reset at ms) to decrement once the status is known
    decrements: list[tuple[str, bool, bool, float]] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return self.error is not None


def backstage_429_body() -> bytes:
    """Backstage's limiter answer, byte for byte (``express``'s ``res.send(object)``)."""
    return (b'{"error":{"name":"Error","message":"' + BACKSTAGE_MESSAGE.encode()
            + b'"},"response":{"statusCode":429}}')


def store_unavailable(retry_after: int = STORE_ERROR_RETRY_AFTER) -> ApiError:
    return ApiError(503, "Rate limit store unavailable, please try again later",
                    headers=(("Retry-After", str(retry_after)),))


def _hashed(value: str) -> str:
    """Client-chosen header values may be secrets (API keys): stored and shown only hashed."""
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def rule_subject(rule: RateLimitRule, principal_subject: str | None, ip: str,
                 headers: dict[str, str]) -> str:
    """What ``rule`` counts for this request: the verified principal (the client IP on an
    unauthenticated route), the IP, or a header's value (hashed; the IP when absent)."""
    name = rule.header_name
    if name is not None:
        value = headers.get(name)
        return _hashed(value) if value else f"ip:{ip_key(ip)}"
    if rule.key == "ip" or principal_subject is None:
        return f"ip:{ip_key(ip)}"
    return principal_subject


class RateLimiter:
    """Runs the checks against the store chosen at load; counts outcomes for metrics.

    ``stats`` maps (plugin, rule, outcome) -> count, outcome one of :data:`OUTCOMES`; the
    Backstage limiters use the rule names ``backend.rateLimit`` and
    ``backend.rateLimit.plugin``.
    """

    def __init__(self, spec: StoreSpec | None = None, store: Store | None = None) -> None:
        self.spec = spec if spec is not None else StoreSpec()
        self.store = store if store is not None else make_store(self.spec)
        self.stats: dict[tuple[str, str, str], int] = {}

    # -- what the gateway calls -------------------------------------------------------------
    async def check_head(self, settings: RateLimitSettings, plugin_id: str | None, ip: str,
                         peer: str) -> LimitOutcome:
        """Backstage's limiters, before anything else is decided: the global one (every
        request), then the plugin's (``plugin_id``: an installed plugin the target is under)."""
        outcome = LimitOutcome()
        if settings.global_limit is not None:
            await self.check_backstage(settings.global_limit, ip, peer, outcome)
        if not outcome.refused and plugin_id is not None:
            limit = settings.plugin_limits.get(plugin_id)
            if limit is not None:
                await self.check_backstage(limit, ip, peer, outcome)
        return outcome

    async def check_policy(self, settings: RateLimitSettings, rules: Sequence[RateLimitRule],
                           principal_subject: str | None, ip: str, headers: dict[str, str],
                           outcome: LimitOutcome, peek: bool = False) -> None:
        """The policy's rules for a routed request (``principal_subject`` None on an
        unauthenticated route: the client IP counts instead)."""
        if not rules:
            return
        subjects = [rule_subject(rule, principal_subject, ip, headers) for rule in rules]
        await self.check_rules(rules, subjects, outcome, peek=peek,
                               pass_on_store_error=settings.policy_pass_on_store_error(
                                   rules[0].plugin_id))

    def count(self, plugin: str, rule: str, outcome: str) -> None:
        key = (plugin, rule, outcome)
        self.stats[key] = self.stats.get(key, 0) + 1

    async def close(self) -> None:
        await self.store.close()

    def inherit_stats(self, old: RateLimiter) -> None:
        """Counters never go down: a limiter replaced by a reload hands its counts on."""
        for key, value in old.stats.items():
            self.stats[key] = self.stats.get(key, 0) + value

    def close_later(self, delay: float = 30.0) -> None:
        """Close the store once requests in flight are done with it (on the running loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(delay, lambda: loop.create_task(self.close()))

    # -- Backstage's limiter ----------------------------------------------------------------
    async def check_backstage(self, limit: BackstageLimit, ip: str, peer: str,
                              outcome: LimitOutcome) -> None:
        """One ``express-rate-limit`` pass: count the hit, set X-RateLimit-*, maybe refuse."""
        plugin = "" if limit.scope == "global" else limit.scope
        rule = "backend.rateLimit" if limit.scope == "global" else "backend.rateLimit.plugin"
        if limit.skips(ip, peer):
            outcome.notes.append(f"{limit.config_key}: {ip} is in ipAllowList: not counted")
            return
        key = limit.key_prefix + ip_key(ip)
        try:
            count = await self.store.window_hit(key, limit.window_ms)
        except StoreError as exc:
            self.count(plugin, rule, "store_error")
            if limit.pass_on_store_error:
                log.warning("rate limit store error (%s): %s; passOnStoreError lets the request "
                            "through", limit.config_key, exc)
                outcome.notes.append(f"{limit.config_key}: store error, passOnStoreError: let "
                                     "through")
                return
            log.error("rate limit store error (%s): %s; refusing with 503", limit.config_key, exc)
            outcome.notes.append(f"{limit.config_key}: store error: 503")
            outcome.error = store_unavailable()
            return
        now = _now_ms()
        remaining = max(limit.limit - count.hits, 0)
        # setHeader: a plugin limiter after the global one overwrites these.
        outcome.headers = [h for h in outcome.headers if not h[0].startswith("X-RateLimit-")]
        outcome.headers += [("X-RateLimit-Limit", str(limit.limit)),
                            ("X-RateLimit-Remaining", str(remaining)),
                            ("X-RateLimit-Reset", str(math.ceil(count.reset_at_ms / 1000)))]
        if limit.skip_successful or limit.skip_failed:
            outcome.decrements.append((key, limit.skip_successful, limit.skip_failed,
                                       count.reset_at_ms))
        if count.hits > limit.limit:
            self.count(plugin, rule, "limited")
            retry = max(0, math.ceil((count.reset_at_ms - now) / 1000))
            outcome.headers.append(("Retry-After", str(retry)))
            outcome.error = ApiError(429, BACKSTAGE_MESSAGE, name="Error")
            outcome.backstage_body = True
            outcome.notes.append(f"{limit.config_key}: {count.hits} > {limit.limit} in the "
                                 f"window for {ip_key(ip)}: 429")
            return
        self.count(plugin, rule, "allowed")
        outcome.notes.append(f"{limit.config_key}: hit {count.hits} of {limit.limit} for "
                             f"{ip_key(ip)}")

    async def settle(self, decrements: Iterable[tuple[str, bool, bool, float]], status: int | None,
                     ) -> None:
        """After the answer: undo hits that ``skipSuccessfulRequests`` / ``skipFailedRequests``
        do not count. ``status`` None: the exchange failed (counts as failed)."""
        now = _now_ms()
        for key, skip_successful, skip_failed, reset_at in decrements:
            success = status is not None and status < 400
            if not ((skip_successful and success) or (skip_failed and not success)):
                continue
            if now >= reset_at:
                continue
            try:
                await self.store.window_decrement(key)
            except StoreError as exc:
                log.warning("rate limit store error during decrement: %s", exc)

    # -- policy rules -----------------------------------------------------------------------
    async def check_rules(self, rules: Sequence[RateLimitRule], subjects: Sequence[str],
                          outcome: LimitOutcome, peek: bool = False,
                          pass_on_store_error: bool = False) -> None:
        """Every rule counts the request (``peek``: only look); a refusing enforced rule
        makes the answer 429. A store error lets the request through with
        ``pass_on_store_error``, else answers 503."""
        policies: list[str] = []
        states: list[str] = []
        limited: float | None = None
        for rule, subject in zip(rules, subjects, strict=True):
            key = f"{self.spec.prefix}{rule.plugin_id}:{rule.name}:{subject}"
            try:
                result = await self.store.gcra(key, rule.interval_ms, rule.burst,
                                               commit=not peek)
            except StoreError as exc:
                if peek:
                    outcome.notes.append(f"rate limit {rule.name}: {rule.describe()} for "
                                         f"{subject}: store unavailable ({exc})")
                    continue
                self.count(rule.plugin_id, rule.name, "store_error")
                if pass_on_store_error:
                    log.warning("rate limit store error (%s %s): %s; passOnStoreError lets "
                                "the request through", rule.plugin_id, rule.name, exc)
                    outcome.notes.append(f"rate limit {rule.name}: store error, "
                                         "passOnStoreError: let through")
                    continue
                log.error("rate limit store error (%s %s): %s; refusing with 503",
                          rule.plugin_id, rule.name, exc)
                outcome.notes.append(f"rate limit {rule.name}: store error: 503")
                outcome.error = store_unavailable()
                return
            window_s = _seconds_text(rule.window)
            policies.append(f'"{rule.name}";q={rule.limit};w={math.ceil(rule.window)}')
            reset = math.ceil((result.retry_after_ms if not result.allowed
                               else result.reset_after_ms) / 1000)
            states.append(f'"{rule.name}";r={result.remaining};t={reset}')
            what = f"rate limit {rule.name} ({rule.describe()}, {rule.where}) for {subject}"
            if peek:
                verdict = (f"would be allowed ({result.remaining} left after it)"
                           if result.allowed else "would be refused with 429"
                           + ("" if rule.enforce else " (enforce: false: let through)"))
                outcome.notes.append(f"{what}: the next request {verdict}; not counted")
                continue
            if result.allowed:
                self.count(rule.plugin_id, rule.name, "allowed")
                outcome.notes.append(f"{what}: allowed, {result.remaining} left")
                continue
            retry_s = max(1, math.ceil(result.retry_after_ms / 1000))
            if not rule.enforce:
                self.count(rule.plugin_id, rule.name, "dry_run")
                note = (f"{what}: enforce: false; would refuse with 429 (over {rule.limit} "
                        f"per {window_s})")
                outcome.dry_run.append(note)
                outcome.notes.append(f"dry-run: {note}")
                continue
            self.count(rule.plugin_id, rule.name, "limited")
            outcome.notes.append(f"{what}: over the limit: 429, retry after {retry_s}s")
            limited = max(limited or 0, retry_s)
        if policies:
            outcome.headers.append(("RateLimit-Policy", ", ".join(policies)))
            outcome.headers.append(("RateLimit", ", ".join(states)))
        if limited is not None:
            outcome.headers.append(("Retry-After", str(int(limited))))
            outcome.error = ApiError(429, BACKSTAGE_MESSAGE, name="Error")


def describe_backstage_limit(limit: BackstageLimit) -> str:
    """One line for ``explain``: what a Backstage limiter does (it keys by client IP, which
    an explanation does not have: nothing is read or counted)."""
    flags = [name for name, on in (("skipSuccessfulRequests", limit.skip_successful),
                                   ("skipFailedRequests", limit.skip_failed),
                                   ("passOnStoreError", limit.pass_on_store_error)) if on]
    return (f"{limit.config_key}: {limit.limit} per {_seconds_text(limit.window_ms / 1000)} "
            f"per client IP (fixed window; ipAllowList: {', '.join(limit.ip_allow_list) or '-'}"
            + (f"; {', '.join(flags)}" if flags else "") + "): counts every request"
            + ("" if limit.scope == "global" else f" under /api/{limit.scope}"))


def render_refusal(outcome: LimitOutcome, method: str, url: str,
                   ) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and headers of a refused request: Backstage's limiter body byte for byte
    for its keys; the usual stagedoor error body (with ``request``) for policy limits and
    store errors. The outcome's rate-limit headers are included."""
    assert outcome.error is not None
    if outcome.backstage_body:
        return 429, backstage_429_body(), [("Content-Type", JSON_CONTENT_TYPE), *outcome.headers]
    status, body, headers = render_error(outcome.error, method, url)
    names = {name.lower() for name, _ in headers}
    return status, body, headers + [h for h in outcome.headers if h[0].lower() not in names]
