"""The token verifier: one strategy per credential kind, a verified-token cache, key sets.

``TokenVerifier.verify`` is synchronous and uses only held keys; it never does network I/O.
When a key-set (re)fetch is needed it raises :class:`KeysNeeded` naming the sources; the
caller awaits ``TokenVerifier.refresh(source)`` for each and calls ``verify`` again. Nobody
writes that loop by hand: :func:`stagedoor.auth.settle.fetch_until_settled` is the one loop
(each source fetched at most once per request, bounded rounds), used by
``TokenVerifier.authenticate`` and, for whole requests, by ``stagedoor.resolve``.

Tokens are never logged and never used as cache keys: their SHA-256 digest is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import httpx

from .. import outbound
from .jwks import JwksClient
from .model import (
    LIMITED_USER_TOKEN_TYPE,
    MSG_ILLEGAL_TOKEN,
    PLUGIN_TOKEN_TYPE,
    USER_TOKEN_TYPE,
    CredentialError,
    KeysNeeded,
    KeySourceUnavailable,
    Principal,
)
from .settings import ASYMMETRIC_ALGORITHMS, AuthSettings
from .settle import Unsettled, fetch_until_settled
from .strategies import (
    ClockedJWT,
    JwksTokens,
    LegacyTokens,
    PluginTokens,
    StaticTokens,
    UnverifiedToken,
    UserTokens,
    peek,
)

log = logging.getLogger("stagedoor.auth")

#: ``Retry-After`` of the 503 when keys are still needed after fetching (as the gateway's).
RETRY_AFTER = 5

STAT_NAMES = ("verified_ok", "verified_cached", "failed", "keys_needed", "source_unavailable",
              "jwks_fetch_ok", "jwks_fetch_failed")


class TokenVerifier:
    """Verifies credentials against held keys; see the module docstring for the protocol.

    The strategies are chosen here, once: a kind that config turns off has no strategy, and a
    token of that kind is then judged as an external token (usually "Illegal token").
    ``http_client_factory`` gives the client key sets are fetched with (default: the shared
    one of ``stagedoor/outbound.py``); the verifier never closes it. Not thread-safe: use it
    from the event loop's thread (as mitmproxy addons run).
    """

    def __init__(self, settings: AuthSettings, *, clock: Callable[[], float] = time.time,
                 http_client_factory: Callable[[], httpx.AsyncClient] | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._http_client = http_client_factory or outbound.client
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._cache: OrderedDict[tuple[bytes, str], tuple[Principal, float]] = OrderedDict()
        self._closed = False
        decoder = ClockedJWT(clock)

        self._user: UserTokens | None = None
        if settings.user_tokens:
            source = self._source(settings.user_jwks_url, "user", "auth")
            self._user = UserTokens(decoder, settings.leeway, source, settings.user_issuers)
        self._plugin: PluginTokens | None = None
        if settings.plugin_tokens:
            self._plugin = PluginTokens(
                decoder, settings,
                lambda url, name, pinned: self._source(url, "plugin", name, pinned=pinned))
        self._static = StaticTokens(settings.static) if settings.static else None
        self._legacy = LegacyTokens(decoder, settings.leeway, settings.legacy) \
            if settings.legacy else None
        by_url: dict[str, JwksClient] = {}
        for entry in settings.jwks:
            if entry.url not in by_url:
                by_url[entry.url] = self._source(entry.url, "external", f"jwks:{entry.url}",
                                                 algorithms=ASYMMETRIC_ALGORITHMS)
        self._jwks = JwksTokens(decoder, settings.leeway,
                                [(entry, by_url[entry.url]) for entry in settings.jwks])

    def _source(self, url: str, kind: str, name: str, *, pinned: bool = True,
                algorithms: frozenset[str] | None = None) -> JwksClient:
        extra = {} if algorithms is None else {"algorithms": algorithms}
        return JwksClient(url, kind=kind, name=name, pinned=pinned,
                          lifespan=self.settings.jwks_max_age,
                          cooldown=self.settings.refetch_interval,
                          timeout=self.settings.jwks_timeout, clock=self._clock,
                          http_client=self._http_client, stats=self.stats,
                          closed=lambda: self._closed, **extra)

    @property
    def user_source(self) -> JwksClient | None:
        return self._user.source if self._user is not None else None

    @property
    def sources(self) -> list[JwksClient]:
        """Every key source currently held (statically known ones first)."""
        result = [self._user.source] if self._user is not None else []
        if self._plugin is not None:
            result += self._plugin.pinned.values()
            result += self._plugin.learnt.values()
        return result + self._jwks.sources

    # -- verify (sync, no I/O) --------------------------------------------------------------
    def verify(self, token: str, plugin_id: str) -> Principal:
        """The principal of ``token`` for a request to ``plugin_id``.

        Raises CredentialError (401), KeysNeeded (refresh, then call again) or
        KeySourceUnavailable (503).
        """
        try:
            return self._verify(token, plugin_id)
        except CredentialError as exc:
            self.stats["failed"] += 1
            log.debug("Rejected credential for plugin %r: %s (%s)", plugin_id, exc.message,
                      exc.reason)
            raise
        except KeysNeeded:
            self.stats["keys_needed"] += 1
            raise
        except KeySourceUnavailable as exc:
            self.stats["source_unavailable"] += 1
            log.debug("Cannot verify credential for plugin %r: %s", plugin_id, exc.reason)
            raise

    def _verify(self, token: str, plugin_id: str) -> Principal:
        raw = token.encode("utf-8", "replace")
        if len(raw) > self.settings.max_token_bytes:
            raise CredentialError(MSG_ILLEGAL_TOKEN,
                                  f"token longer than {self.settings.max_token_bytes} bytes")
        digest = hashlib.sha256(raw).digest()
        now = self._clock()
        cached = self._cache_get((digest, plugin_id), now)
        if cached is not None:
            self.stats["verified_cached"] += 1
            return cached
        principal = self._static.verify(digest, plugin_id) if self._static else None
        if principal is not None:
            self.stats["verified_ok"] += 1
            return principal
        principal = self._verify_jwt(peek(token), plugin_id, now)
        self.stats["verified_ok"] += 1
        self._cache_put((digest, plugin_id), principal, now)
        return principal

    def _verify_jwt(self, token: UnverifiedToken, plugin_id: str, now: float) -> Principal:
        """Hand the token to the strategy its ``typ`` (or, for external tokens, its shape)
        names."""
        typ = token.header.get("typ")
        if typ == PLUGIN_TOKEN_TYPE and self._plugin is not None:
            return self._plugin.verify(token, plugin_id, now)
        if typ == USER_TOKEN_TYPE and self._user is not None:
            return self._user.verify(token, now)
        if typ == LIMITED_USER_TOKEN_TYPE:
            raise CredentialError(MSG_ILLEGAL_TOKEN, "limited user tokens are not accepted")
        if LegacyTokens.recognises(token):
            if self._legacy is None:
                raise CredentialError(MSG_ILLEGAL_TOKEN,
                                      "legacy token: no legacy secrets are configured")
            return self._legacy.verify(token, plugin_id)
        candidates = self._jwks.candidates(token)
        if not candidates:
            raise CredentialError(MSG_ILLEGAL_TOKEN, "no configured source recognises this "
                                  f"token (iss {str(token.claims.get('iss'))[:60]!r}, "
                                  f"typ {str(typ)[:40]!r})")
        return self._jwks.verify(token, candidates, plugin_id, now)

    # -- verified-token cache ---------------------------------------------------------------
    def _cache_get(self, key: tuple[bytes, str], now: float) -> Principal | None:
        item = self._cache.get(key)
        if item is None:
            return None
        principal, expires = item
        if now >= expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return principal

    def _cache_put(self, key: tuple[bytes, str], principal: Principal, now: float) -> None:
        size, ttl = self.settings.token_cache_size, self.settings.token_cache_ttl
        if size <= 0 or ttl <= 0:
            return
        expires = now + ttl
        if principal.expires_at is not None:
            expires = min(expires, principal.expires_at)
        if expires <= now:
            return
        self._cache[key] = (principal, expires)
        self._cache.move_to_end(key)
        while len(self._cache) > size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- fetching keys ----------------------------------------------------------------------
    async def refresh(self, source: JwksClient) -> None:
        """Fetch ``source``'s key set, at most once per refetch interval; never raises for I/O.

        Concurrent callers share one in-flight fetch. A failed fetch keeps the keys held.
        """
        if self._closed:
            return
        if source.kind == "plugin" and not source.pinned and self._plugin is not None:
            self._plugin.remember(source)  # it may have been dropped meanwhile
        await source.refresh()

    async def prefetch(self) -> None:
        """Fetch every statically known source (user, discovery plugins, jwks); never raises."""
        try:
            pinned = [s for s in self.sources if s.pinned]
            await asyncio.gather(*(self.refresh(s) for s in pinned), return_exceptions=True)
        except Exception:
            log.exception("JWKS prefetch failed")

    async def authenticate(self, token: str, plugin_id: str) -> Principal:
        """``verify``, fetching the key sets it asks for (each at most once) in between.

        Raises CredentialError (401) or KeySourceUnavailable (503, also when keys are still
        needed after each named source was fetched once).
        """
        try:
            return await fetch_until_settled(lambda: self.verify(token, plugin_id),
                                             self.refresh)
        except Unsettled as exc:
            url = exc.source.url if exc.source is not None else ""
            raise KeySourceUnavailable(url, RETRY_AFTER, exc.reason) from None

    def close(self) -> None:
        self._closed = True
        for source in self.sources:
            source.cancel()

    async def aclose(self) -> None:
        self._closed = True
        pending = [s._in_flight for s in self.sources if s._in_flight is not None]
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
