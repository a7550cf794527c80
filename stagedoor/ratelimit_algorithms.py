"""The pure pieces of rate limiting that every store shares (stagedoor/ratelimit.py holds the
rest): the fixed-window and GCRA algorithms, the store error, and Redis URLs without their
password. Its own module so that the Redis store needs nothing from ``ratelimit.py``, which
imports the store when a config asks for it (no import circle)."""

from __future__ import annotations

import re
from dataclasses import dataclass


def redact_url(url: str) -> str:
    """A Redis URL without its password, for logs."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, refused)."""


# -- the algorithms (pure) ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WindowCount:
    """A fixed window's state after a hit: hits so far and when the window ends (epoch ms)."""

    hits: int
    reset_at_ms: float


def fixed_window_hit(state: WindowCount | None, now_ms: float, window_ms: int) -> WindowCount:
    """``express-rate-limit``'s MemoryStore ``increment``: a new window starts at the first hit
    after the last one ended."""
    if state is None or state.reset_at_ms <= now_ms:
        return WindowCount(1, now_ms + window_ms)
    return WindowCount(state.hits + 1, state.reset_at_ms)


@dataclass(frozen=True, slots=True)
class GcraResult:
    allowed: bool
    remaining: int  # requests that could still go now
    retry_after_ms: float  # 0 when allowed; else until the next one fits
    reset_after_ms: float  # until the bucket is full again (nothing remembered)
    tat_ms: float  # the theoretical arrival time to store (unchanged when refused)


def gcra(tat_ms: float | None, now_ms: float, interval_ms: float, burst: int) -> GcraResult:
    """Generic cell rate algorithm: ``burst`` requests at once, then one per ``interval_ms``.

    ``tat_ms`` is the stored theoretical arrival time (None: nothing stored); the caller stores
    the returned ``tat_ms`` when the request is allowed (and it is not a peek).
    """
    tat = max(tat_ms if tat_ms is not None else now_ms, now_ms)
    capacity = burst * interval_ms
    new_tat = tat + interval_ms
    if new_tat - now_ms > capacity + 1e-9:
        retry = new_tat - now_ms - capacity
        remaining = max(0, int((capacity - (tat - now_ms)) // interval_ms))
        return GcraResult(False, remaining, retry, tat - now_ms, tat)
    remaining = max(0, int((capacity - (new_tat - now_ms) + 1e-9) // interval_ms))
    return GcraResult(True, remaining, 0.0, new_tat - now_ms, new_tat)
