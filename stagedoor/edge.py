"""Connection-level hygiene, pure: the settings, a per-client connection book and a log throttle.

- :class:`EdgeSettings`: the connection limits of ``stagedoor.limits`` (idle keep-alive timeout,
  body read timeout, connections per client address and in all, chunk line length) and
  ``stagedoor.headersWithUnderscores``. The request-head limits (size, count, header timeout,
  body size) stay in :class:`stagedoor.runtime.Limits`.
- :class:`ConnectionBook`: who holds how many connections; says whether one more is admitted.
- :class:`LogThrottle`: a ``logging.Filter`` that lets one record per cause through per interval
  and folds the rest into a count on the next one ("... (and 41 more like it in 10s)"), with
  the traceback of only the first. A flood of identical failures (a low file-descriptor limit,
  hundreds of idle connections) is then a handful of lines, never thousands of tracebacks.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate

from .config import Config
from .head import HeadRules, UnderscoreAction, normalise_name, parse_underscore_action

#: File descriptors kept back from ``maxConnections`` for upstream connections, key fetches,
#: the admin listener, logs and policy files (each client connection may need one upstream).
FD_RESERVE = 64


_date_cache: tuple[int, bytes] = (-1, b"")


def http_date(now: float | None = None) -> bytes:
    """The ``Date`` value for now (IMF-fixdate, RFC 9110 §5.6.7), formatted once per second."""
    global _date_cache
    second = int(time.time() if now is None else now)
    if _date_cache[0] != second:
        _date_cache = (second, formatdate(second, usegmt=True).encode("ascii"))
    return _date_cache[1]


def default_max_connections() -> int:
    """Half of what the soft file-descriptor limit leaves after :data:`FD_RESERVE` (each proxied
    request may hold a client and an upstream socket), at most 4096, at least 16."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover
        soft = 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 16
    return max(16, min(4096, (soft - FD_RESERVE) // 2))


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    """``stagedoor.limits`` for connections (0 disables a limit)."""

    idle_timeout: float = 60.0          # idleTimeoutSeconds: keep-alive, nothing sent
    body_timeout: float = 60.0          # bodyTimeoutSeconds: from the head's end to the body's end
    max_connections_per_client: int = 256   # maxConnectionsPerClient (per peer address)
    max_connections: int = 0            # maxConnections; 0 here means "from the fd limit"
    max_chunk_line_bytes: int = 4096    # maxChunkLineBytes: chunk-size line with extensions
    underscores: UnderscoreAction = UnderscoreAction.DROP  # stagedoor.headersWithUnderscores
    protected_extra: frozenset[str] = frozenset()  # identity header names, normalised

    @property
    def total_connections(self) -> int:
        return self.max_connections or default_max_connections()

    @property
    def head_rules(self) -> HeadRules:
        return HeadRules(self.underscores, self.protected_extra)

    @classmethod
    def from_config(cls, config: Config) -> EdgeSettings:
        with config.collecting():
            return cls._read(config)

    @classmethod
    def _read(cls, config: Config) -> EdgeSettings:
        def number(key: str, default: float, high: float) -> float:
            """Type and range (``high``) are the schema's; NaN is refused here."""
            value = config.get_number(f"stagedoor.limits.{key}", default)
            if not (value == value and 0 <= value <= high):  # NaN-safe
                config.invalid(f"stagedoor.limits.{key}",
                               f"must be between 0 and {high:g}, got {value:g}")
                return default
            return value

        d = cls()
        try:
            underscores = parse_underscore_action(
                config.get_string("stagedoor.headersWithUnderscores", "drop"))
        except ValueError as exc:
            config.invalid("stagedoor.headersWithUnderscores", str(exc))
            underscores = UnderscoreAction.DROP
        identity = {config.get_string("stagedoor.identityHeaders.principal",
                                      "x-stagedoor-principal") or "",
                    config.get_string("stagedoor.identityHeaders.principalType",
                                      "x-stagedoor-principal-type") or ""}
        return cls(
            idle_timeout=number("idleTimeoutSeconds", d.idle_timeout, 86400),
            body_timeout=number("bodyTimeoutSeconds", d.body_timeout, 86400),
            max_connections_per_client=int(number("maxConnectionsPerClient",
                                                  d.max_connections_per_client, 1 << 20)),
            max_connections=int(number("maxConnections", d.max_connections, 1 << 20)),
            max_chunk_line_bytes=int(number("maxChunkLineBytes", d.max_chunk_line_bytes,
                                            1 << 20)),
            underscores=underscores,
            protected_extra=frozenset(normalise_name(n) for n in identity if n),
        )


class ConnectionBook:
    """Open client connections per peer address. Not thread-safe (one event loop).

    One address may hold at most ``maxConnectionsPerClient`` connections, and never more than
    three quarters of ``maxConnections``, so a single client cannot starve the others even
    when the total is small (a low file-descriptor limit)."""

    def __init__(self) -> None:
        self.by_address: dict[str, int] = {}
        self.total = 0

    def admit(self, address: str, settings: EdgeSettings) -> str | None:
        """Count one more connection from ``address``; or say why not (and count nothing)."""
        total_cap = settings.total_connections
        if total_cap and self.total >= total_cap:
            return f"stagedoor.limits.maxConnections ({total_cap}) reached"
        held = self.by_address.get(address, 0)
        per_client = settings.max_connections_per_client
        if total_cap:  # one address never takes the last quarter: others still get in
            per_client = min(per_client or total_cap, max(1, total_cap - total_cap // 4))
        if per_client and held >= per_client:
            return f"stagedoor.limits.maxConnectionsPerClient ({per_client}) reached"
        self.by_address[address] = held + 1
        self.total += 1
        return None

    def release(self, address: str) -> None:
        held = self.by_address.get(address, 0)
        if held <= 1:
            self.by_address.pop(address, None)
        else:
            self.by_address[address] = held - 1
        self.total = max(0, self.total - 1)


class LogThrottle(logging.Filter):
    """At most one record per cause per ``interval`` seconds; the rest are counted and the
    count is added to the next record of that cause that gets through.

    The cause is ``key(record)``: by default the logger name and the message template plus,
    for a record with an exception, its type and the place it was raised. Only records with a
    traceback and warnings from ``loggers`` (those that can repeat per connection: mitmproxy,
    asyncio, the edge) are throttled; a refused reload, say, is always logged.
    """

    def __init__(self, interval: float = 10.0, max_causes: int = 1024,
                 loggers: tuple[str, ...] = ("mitmproxy", "asyncio", "stagedoor.edge"),
                 key: Callable[[logging.LogRecord], str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.max_causes = max_causes
        self.loggers = loggers
        self.key = key or cause_of
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # cause -> (last let through, suppressed)
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info and (record.levelno < logging.WARNING
                                    or not record.name.startswith(self.loggers)):
            return True  # routine lines and one-off events are not throttled
        cause = self.key(record)
        now = self.clock()
        last = self._seen.get(cause)
        if last is not None and now - last[0] < self.interval:
            self._seen[cause] = (last[0], last[1] + 1)
            self.suppressed_total += 1
            return False
        if last is not None and last[1]:
            record.msg = f"{record.msg} (and {last[1]} more like it in the last " \
                         f"{now - last[0]:.0f}s)"
            record.exc_info = None  # the first one carried the traceback
            record.exc_text = None
        if len(self._seen) >= self.max_causes and cause not in self._seen:
            self._seen.pop(next(iter(self._seen)))
        self._seen[cause] = (now, 0)
        return True


def cause_of(record: logging.LogRecord) -> str:
    """Logger, message template, and for an exception its type and innermost frame."""
    parts = [record.name, str(record.msg)[:200]]
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        parts.append(type(exc).__name__)
        tb = record.exc_info[2]
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            parts.append(f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}")
    return "|".join(parts)
