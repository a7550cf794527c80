"""Key sets: JWKs loaded into verification keys, and one async JWKS client per endpoint.

:class:`JwksClient` is shaped like PyJWT's ``PyJWKClient`` (keys cached for a lifespan, a fetch
when an unknown ``kid`` shows up, ``get_signing_key(kid)``), async over the shared outbound
client (``stagedoor/outbound.py``), with what a gateway needs on top (docs/credentials.md,
"Key sets"):

- **cooldown**: at most one fetch per ``cooldown`` seconds, however many unknown ``kid``s
  arrive; concurrent callers share the one fetch in flight;
- **stale keys while down**: a failed fetch keeps the keys held, and they keep verifying;
- **outage is not a bad token**: "source down and the key is not held" is
  :class:`KeySourceUnavailable` (503 + ``Retry-After``); "source up, ``kid`` unknown" is
  :class:`SigningKeyNotFound` (a 401 for the strategy to word);
- **bounded**: a response over 1 MiB, a non-200 answer, a timeout or garbage is a failed fetch.

``get_signing_key`` never does I/O: it answers from the held keys or raises
:class:`KeysNeeded` so that the caller awaits :meth:`JwksClient.refresh` and asks again
(``get_signing_key_async`` does both). Symmetric keys are never loaded from a key set, and a key's
``kty``/``crv`` (and ``alg`` when it declares one) fix which algorithms it may verify.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.api_jwk import PyJWK

from .. import outbound
from .model import KeysNeeded, KeySourceUnavailable
from .settings import ASYMMETRIC_ALGORITHMS, DEFAULT_ALGORITHMS
from .settle import Unsettled, fetch_until_settled

log = logging.getLogger("stagedoor.auth")

_RSA_FAMILY = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_FAMILY = {"P-256": frozenset({"ES256"}), "P-384": frozenset({"ES384"}),
              "P-521": frozenset({"ES512"})}
_OKP_FAMILY = {"Ed25519": frozenset({"EdDSA"}), "Ed448": frozenset({"EdDSA"})}
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A verification key of a key set and the algorithms it may verify (never from a token)."""

    kid: str | None
    algorithms: frozenset[str]
    key: Any = field(repr=False)  # a cryptography public key, as jwt.decode takes it


class SigningKeyNotFound(Exception):
    """The source answered, but holds no key for this ``kid``."""


def _key_family(jwk: dict[str, Any]) -> frozenset[str]:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return _RSA_FAMILY
    if kty == "EC" and isinstance(crv, str):
        return _EC_FAMILY.get(crv, frozenset())
    if kty == "OKP" and isinstance(crv, str):
        return _OKP_FAMILY.get(crv, frozenset())
    return frozenset()  # "oct" (symmetric) and anything unknown are never loaded


def load_jwk(jwk: Any, allowed: frozenset[str]) -> SigningKey | None:
    """A verification key from one JWK, or None when it is unusable for ``allowed``."""
    if not isinstance(jwk, dict):
        return None
    if jwk.get("use") not in (None, "sig"):
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    algorithms = _key_family(jwk)
    declared = jwk.get("alg")
    if declared is not None:
        if declared not in algorithms:
            return None
        algorithms = frozenset({declared})
    algorithms &= allowed
    if not algorithms:
        return None
    try:
        key = PyJWK(jwk, algorithm=min(algorithms)).key
        if hasattr(key, "public_key"):  # a private key in a JWKS: verify with its public half
            key = key.public_key()
    except Exception:  # any key PyJWT/cryptography cannot load is unusable
        return None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return None
    return SigningKey(kid, algorithms, key)


def parse_jwks(document: Any,
               allowed: frozenset[str] = ASYMMETRIC_ALGORITHMS) -> tuple[SigningKey, ...]:
    """The usable verification keys of a JWK set; ValueError when it is not a usable set."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK set (no 'keys' list)")
    raw = document["keys"]
    keys = tuple(k for k in (load_jwk(item, allowed) for item in raw) if k is not None)
    if raw and not keys:
        raise ValueError(f"none of its {len(raw)} key(s) is usable")
    return keys


class _FetchFailed(Exception):
    """A fetch failed; ``kind`` "not_found" (404/410) means the source is up but has no keys
    for us, so a missing key is a credential failure rather than an outage."""

    def __init__(self, reason: str, kind: Literal["unavailable", "not_found"]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


Lookup = Literal["key", "fetch", "unavailable", "missing"]


class JwksClient:
    """One JWKS endpoint and the keys last fetched from it (see the module docstring).

    ``lifespan``: how long fetched keys count as fresh (a key older than that is refetched
    first, and used stale if the fetch fails); ``cooldown``: the least time between two fetch
    attempts; ``timeout``: one fetch, start to end. Not thread-safe: use it from one loop.
    """

    def __init__(self, url: str, *, kind: str, name: str,
                 algorithms: frozenset[str] = DEFAULT_ALGORITHMS, pinned: bool = True,
                 lifespan: float = 600.0, cooldown: float = 5.0, timeout: float = 3.0,
                 clock: Callable[[], float] = time.time,
                 http_client: Callable[[], httpx.AsyncClient] = outbound.client,
                 stats: dict[str, int] | None = None,
                 closed: Callable[[], bool] = lambda: False) -> None:
        self.url = url
        self.kind = kind  # "user" | "plugin" | "external"
        self.name = name
        self.algorithms = algorithms
        self.pinned = pinned  # known from config (prefetched), not learnt from a token
        self.lifespan, self.cooldown, self.timeout = lifespan, cooldown, timeout
        self._clock = clock
        self._http_client = http_client
        self._stats = stats if stats is not None else {}
        self._closed = closed
        self.keys: tuple[SigningKey, ...] = ()
        self._by_kid: dict[str, SigningKey] = {}
        self.fetched_at: float | None = None    # last successful fetch
        self.attempted_at: float | None = None  # last fetch started, then when it ended
        self.failure: str | None = None         # why the last fetch failed; None if it did not
        self.failure_kind: Literal["unavailable", "not_found"] | None = None
        self._in_flight: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"JwksClient({self.name!r}, {self.url!r}, keys={len(self.keys)})"

    # -- held keys (no I/O) -----------------------------------------------------------------
    def set_keys(self, keys: tuple[SigningKey, ...], now: float) -> None:
        by_kid: dict[str, SigningKey] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, key)
        self.keys, self._by_kid = keys, by_kid
        self.fetched_at = now
        self.failure = self.failure_kind = None

    def find(self, kid: str | None) -> SigningKey | None:
        """The held key for ``kid``; a lone key without a ``kid`` serves any ``kid``."""
        if kid is not None:
            key = self._by_kid.get(kid)
            if key is not None:
                return key
            if len(self.keys) == 1 and self.keys[0].kid is None:
                return self.keys[0]
            return None
        return self.keys[0] if len(self.keys) == 1 else None

    def may_fetch(self, now: float) -> bool:
        """True when a fetch is in flight (join it) or the cooldown since the last is over."""
        if self._closed():
            return False
        if self._in_flight is not None or self.attempted_at is None:
            return True
        return not 0 <= now - self.attempted_at < self.cooldown

    def lookup(self, kid: str | None, now: float) -> tuple[Lookup, SigningKey | None]:
        """What to do for ``kid`` now: use a key, fetch first, or give up (503 or 401)."""
        key = self.find(kid)
        fresh = self.fetched_at is not None and 0 <= now - self.fetched_at < self.lifespan
        if key is not None and fresh:
            return "key", key
        if self.may_fetch(now):
            return "fetch", None
        if key is not None:
            return "key", key  # stale, but the source cannot be asked again yet
        if self.failure_kind == "unavailable" or self._closed():
            return "unavailable", None
        return "missing", None

    def get_signing_key(self, kid: str | None, now: float | None = None) -> SigningKey:
        """The key for ``kid`` from the held keys. Raises KeysNeeded (await :meth:`refresh`,
        then ask again), KeySourceUnavailable (503) or SigningKeyNotFound (401)."""
        now = self._clock() if now is None else now
        outcome, key = self.lookup(kid, now)
        if outcome == "key":
            assert key is not None
            return key
        if outcome == "fetch":
            raise KeysNeeded(self)
        if outcome == "unavailable":
            raise self.unavailable(now)
        raise SigningKeyNotFound(f"no key for kid {str(kid)[:40]!r} in {self.url}")

    async def get_signing_key_async(self, kid: str | None) -> SigningKey:
        """Like PyJWKClient.get_signing_key: fetch when needed (once), then answer."""
        try:
            return await fetch_until_settled(lambda: self.get_signing_key(kid),
                                             JwksClient.refresh, rounds=1)
        except Unsettled:
            raise self.unavailable(self._clock()) from None

    def unavailable(self, now: float) -> KeySourceUnavailable:
        elapsed = now - (self.attempted_at or now)
        retry = max(1, math.ceil(self.cooldown - max(0.0, elapsed)))
        return KeySourceUnavailable(self.url, retry,
                                    f"key source {self.url} unavailable: {self.failure}")

    # -- fetching (I/O) ---------------------------------------------------------------------
    async def refresh(self) -> None:
        """Fetch the key set, at most once per cooldown; never raises for I/O.

        Concurrent callers share one fetch in flight. A failed fetch keeps the keys held.
        """
        future = self._in_flight
        if future is None:
            now = self._clock()
            if not self.may_fetch(now):
                return
            self.attempted_at = now
            future = asyncio.ensure_future(self._fetch())
            self._in_flight = future
        await asyncio.shield(future)

    async def _fetch(self) -> None:
        kind: Literal["unavailable", "not_found"] = "unavailable"
        try:
            async with asyncio.timeout(self.timeout):
                document = await self._download()
            keys = parse_jwks(document, self.algorithms)
        except _FetchFailed as exc:
            reason, kind = exc.reason, exc.kind
        except TimeoutError:
            reason = f"timed out after {self.timeout:g}s"
        except (httpx.HTTPError, outbound.ResponseTooLarge) as exc:
            reason = f"{type(exc).__name__}: {exc}"[:200]
        except (ValueError, RecursionError) as exc:
            reason = f"invalid JWKS: {exc}"[:200]
        except asyncio.CancelledError:
            self._record_failure("fetch cancelled", "unavailable")
            raise
        except Exception as exc:  # a fetch must never take the verifier down
            reason = f"unexpected {type(exc).__name__}"
            log.exception("Unexpected error fetching JWKS from %s", self.url)
        else:
            self.set_keys(keys, self._clock())
            self._stats["jwks_fetch_ok"] = self._stats.get("jwks_fetch_ok", 0) + 1
            log.info("Fetched %d key(s) from %s", len(keys), self.url)
            return
        finally:
            self._in_flight = None
            # The cooldown runs from the end of a fetch: a fetch that took longer than the
            # cooldown (a slow source timing out) must not be retried by the very request
            # that waited for it.
            self.attempted_at = self._clock()
        self._record_failure(reason, kind)

    def _record_failure(self, reason: str, kind: Literal["unavailable", "not_found"]) -> None:
        self.failure, self.failure_kind = reason, kind
        self._stats["jwks_fetch_failed"] = self._stats.get("jwks_fetch_failed", 0) + 1
        log.warning("Failed to fetch JWKS from %s: %s (keeping %d cached key(s))",
                    self.url, reason, len(self.keys))

    async def _download(self) -> Any:
        client = self._http_client()
        async with client.stream("GET", self.url, timeout=outbound.timeout(self.timeout),
                                 headers={"Accept": "application/json"}) as response:
            if response.status_code in (404, 410):
                raise _FetchFailed(f"HTTP {response.status_code}", "not_found")
            if response.status_code != 200:
                raise _FetchFailed(f"HTTP {response.status_code}", "unavailable")
            body = await outbound.read_capped(response, MAX_JWKS_BYTES)
        return json.loads(body)

    def cancel(self) -> None:
        """Cancel a fetch in flight (the verifier is closing)."""
        if self._in_flight is not None:
            try:
                self._in_flight.cancel()
            except RuntimeError:  # its event loop is already closed
                self._in_flight = None


#: The name this class had before the split (tests and benchmarks use it).
KeySource = JwksClient
