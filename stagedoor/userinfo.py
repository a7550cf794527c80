"""A user's ownership refs from the Backstage auth backend (``GET <auth base>/v1/userinfo``).

Current Backstage user tokens carry no ``ent`` claim; a Backstage plugin learns whom a user
belongs to by asking the auth backend with the user's own token, which answers
``{"claims":{"sub":"user:default/jane","ent":["user:default/jane","group:default/team-a"]}}``
(``DefaultUserInfoService``). stagedoor does the same when a ``memberOf`` condition needs it:

- answers are cached per token (by its SHA-256) until the token's ``exp``, in a bounded LRU;
- concurrent lookups for one token share one request (single flight);
- an auth backend that cannot answer (down, slow, not 200, garbage, another ``sub``) is
  **fail closed**: the request gets 503 with ``Retry-After``, as when a JWKS is missing; the
  failure is remembered for ``retry_after`` seconds so a dead backend is not asked per request.

Like ``decide``'s other side doors, :meth:`UserInfoClient.cached` is synchronous and raises
:class:`MembershipNeeded` when the network must be asked; the caller awaits
:meth:`UserInfoClient.resolve` and decides again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from . import outbound

log = logging.getLogger("stagedoor.userinfo")

MAX_USERINFO_BYTES = 64 << 10
MAX_OWNERSHIP_REFS = 1000


class MembershipNeeded(Exception):
    """The user's ownership refs are not cached: await ``UserInfoClient.resolve(token)``."""

    def __init__(self, token: str, subject: str, expires_at: float | None) -> None:
        super().__init__("userinfo lookup needed")
        self.token = token
        self.subject = subject
        self.expires_at = expires_at

    def __repr__(self) -> str:  # never the token
        return "MembershipNeeded()"


class MembershipUnavailable(Exception):
    """The auth backend could not tell: 503 with ``Retry-After``."""

    message = "Unable to determine group membership: the auth backend is unavailable"

    def __init__(self, url: str, retry_after: int, reason: str) -> None:
        super().__init__(self.message)
        self.url = url
        self.retry_after = retry_after
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Entry:
    refs: frozenset[str] | None  # None: the lookup failed
    expires: float  # epoch seconds
    reason: str = ""


class UserInfoClient:
    """Asks ``<auth base>/v1/userinfo`` for users' ownership refs, with a cache."""

    def __init__(self, auth_base_url: str, *, timeout: float = 2.0, cache_size: int = 10_000,
                 retry_after: float = 2.0, max_ttl: float = 3600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = f"{auth_base_url.rstrip('/')}/v1/userinfo"
        self.timeout = timeout
        self.cache_size = cache_size
        self.retry_after = retry_after
        self.max_ttl = max_ttl
        self.clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self.stats = {"lookups": 0, "cache_hits": 0, "failures": 0}

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def cached(self, token: str, subject: str, expires_at: float | None) -> frozenset[str]:
        """The cached refs; raises MembershipNeeded (ask) or MembershipUnavailable (503)."""
        key = self._key(token)
        entry = self._cache.get(key)
        now = self.clock()
        if entry is not None and entry.expires <= now:
            self._cache.pop(key, None)
            entry = None
        if entry is None:
            raise MembershipNeeded(token, subject, expires_at)
        if entry.refs is None:
            raise MembershipUnavailable(self.url, max(1, math.ceil(entry.expires - now)),
                                        entry.reason)
        self.stats["cache_hits"] += 1
        self._cache.move_to_end(key)
        return entry.refs

    def _store(self, key: str, entry: _Entry) -> None:
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def resolve(self, token: str, subject: str, expires_at: float | None) -> None:
        """Look the user up (once per token at a time) and cache the answer or the failure."""
        key = self._key(token)
        pending = self._inflight.get(key)
        if pending is not None:
            await asyncio.shield(pending)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            now = self.clock()
            try:
                refs = await self._ask(token, subject)
            except Exception as exc:  # down, slow, garbage: fail closed, briefly remembered
                self.stats["failures"] += 1
                reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
                log.warning("userinfo lookup at %s failed (%s): membership unavailable",
                            self.url, reason)
                self._store(key, _Entry(None, now + self.retry_after, reason))
            else:
                until = min(expires_at if expires_at is not None else now + self.max_ttl,
                            now + self.max_ttl)
                self._store(key, _Entry(refs, until))
        finally:
            self._inflight.pop(key, None)
            future.set_result(None)

    async def _ask(self, token: str, subject: str) -> frozenset[str]:
        self.stats["lookups"] += 1
        client = outbound.client()
        async with asyncio.timeout(self.timeout):
            async with client.stream("GET", self.url, timeout=outbound.timeout(self.timeout),
                                     headers={"Authorization": f"Bearer {token}"}) as response:
                if response.status_code != 200:
                    raise ValueError(f"status {response.status_code}")
                body = await outbound.read_capped(response, MAX_USERINFO_BYTES)
        return parse_userinfo(body, subject)


def parse_userinfo(body: bytes, subject: str) -> frozenset[str]:
    """The ownership refs of a ``/v1/userinfo`` answer for ``subject``; ValueError if unusable."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ValueError("answer is not JSON") from exc
    claims = document.get("claims") if isinstance(document, dict) else None
    if not isinstance(claims, dict):
        raise ValueError("answer has no claims")
    if claims.get("sub") != subject:
        raise ValueError("answer is about another user")
    ent = claims.get("ent")
    if not isinstance(ent, list) or not all(isinstance(e, str) for e in ent):
        raise ValueError("ent is not a list of entity refs")
    if len(ent) > MAX_OWNERSHIP_REFS:
        raise ValueError(f"more than {MAX_OWNERSHIP_REFS} ownership refs")
    return frozenset({subject, *ent})
