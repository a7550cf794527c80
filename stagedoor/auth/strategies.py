"""One verification strategy per credential kind, chosen once when the verifier is built.

Like mitmproxy's ``proxyauth`` picking its validator in ``configure()``: the verifier holds one
object per kind that config enables (user, plugin, static, legacy, jwks) and hands each token
to the one its shape names (docs/credentials.md, "Which strategy a token goes to"). Each has
``verify(...) -> Principal`` and raises :class:`CredentialError` (401 with the kind's message),
:class:`KeysNeeded` (fetch, then verify again) or :class:`KeySourceUnavailable` (503).

JWTs are verified by ``jwt.decode`` (PyJWT): signature with the algorithms the *key* allows
(never the token's say-so), ``exp`` required, ``nbf``/``iat`` with the configured leeway,
``aud``/``iss`` against config, unknown ``crit`` extensions refused. What PyJWT does not do is
ours and stays here: ``jku``/``x5u``/``jwk``/``crit``/``b64`` headers are refused outright, time
claims must be JSON numbers, Backstage's ``sub``/``ent`` shapes, and the choice of key set.
When the key is not held yet, every claim check runs before the key set is asked (so a token
that would fail anyway never causes a fetch, and an expired token is a 401 even while its key
set is down); ``jwt.decode`` then checks everything again with the signature.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from .jwks import JwksClient, SigningKey, SigningKeyNotFound
from .model import (
    LEGACY_TOKEN_SUBJECT,
    MSG_ILLEGAL_TOKEN,
    MSG_PLUGIN_FAILED,
    MSG_USER_FAILED,
    USER_TOKEN_AUDIENCE,
    CredentialError,
    KeysNeeded,
    KeySourceUnavailable,
    Principal,
)
from .settings import (
    AccessRestriction,
    AuthSettings,
    JwksAccess,
    LegacyAccess,
    StaticAccess,
    is_plugin_id,
)

#: Headers that would let a token name its own key; refused whatever else it says. ``crit``
#: and ``b64`` too: stagedoor understands no JWS extension.
REFUSED_HEADERS = ("jku", "x5u", "jwk", "crit", "b64")
#: New plugin key sources (plugins not in discovery) created per refetch interval at most.
NEW_PLUGIN_SOURCES_PER_INTERVAL = 32
_USER_REF_PATTERN = re.compile(r"user:[^\s/:]+/\S+", re.IGNORECASE)
# A compact JWS in strict, unpadded, canonical base64url (as jose requires): the unused low
# bits of a segment's last character must be zero.
_COMPACT_JWS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)\.([A-Za-z0-9_-]*)")
_CANONICAL_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


# -- reading a token before verifying it ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnverifiedToken:
    """A JWT's header and claims as sent, only to choose a strategy and a key set."""

    token: str
    header: dict[str, Any]
    claims: dict[str, Any]


def _canonical(segment: str) -> bool:
    rest = len(segment) % 4
    return rest == 0 or (rest != 1 and segment[-1] in _CANONICAL_LAST[rest])


def _json_segment(segment: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # bad base64, bad UTF-8 or bad JSON
        return None


def peek(token: str) -> UnverifiedToken:
    """The header and claims of ``token``, unverified, only to pick a strategy and a key set
    (``jwt.decode`` parses it again, as the authority); CredentialError when not a JWT."""
    match = _COMPACT_JWS.fullmatch(token)
    if match is None or not all(_canonical(segment) for segment in match.groups()):
        raise CredentialError(MSG_ILLEGAL_TOKEN, "not a JWT and not a static token")
    header, claims = _json_segment(match[1]), _json_segment(match[2])
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise CredentialError(MSG_ILLEGAL_TOKEN, "not a JWT: header or payload is not a JSON "
                              "object")
    return UnverifiedToken(token, header, claims)


# -- jwt.decode, on the verifier's clock ----------------------------------------------------------


class ClockedJWT(jwt.PyJWT):
    """``jwt.PyJWT`` whose time checks read ``clock`` (the system clock in production; tests
    move a fake one, so key lifespans and token lifetimes move together)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self._clock = clock

    def _validate_iat(self, payload: dict[str, Any], now: float, leeway: float) -> None:
        super()._validate_iat(payload, self._clock(), leeway)

    def _validate_nbf(self, payload: dict[str, Any], now: float, leeway: float) -> None:
        super()._validate_nbf(payload, self._clock(), leeway)

    def _validate_exp(self, payload: dict[str, Any], now: float, leeway: float) -> None:
        super()._validate_exp(payload, self._clock(), leeway)


@dataclass(frozen=True, slots=True)
class ClaimRules:
    """What ``jwt.decode`` checks besides the signature, for one kind of token."""

    require: tuple[str, ...]
    audience: str | frozenset[str] | None = None
    issuer: frozenset[str] | None = None
    leeway: float = 5.0

    def arguments(self, verify_signature: bool) -> dict[str, Any]:
        options: dict[str, Any] = {
            "require": list(self.require), "verify_signature": verify_signature,
            "verify_exp": True, "verify_nbf": True, "verify_iat": True,
            "verify_iss": self.issuer is not None, "verify_aud": self.audience is not None,
        }
        audience = sorted(self.audience) if isinstance(self.audience, frozenset) \
            else self.audience
        return {"options": options, "audience": audience, "issuer": self.issuer,
                "leeway": self.leeway}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _reason(exc: jwt.InvalidTokenError, claims: dict[str, Any]) -> str:
    """The log-only reason for a PyJWT failure (never the token, at most a claim's value)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token issued in the future (iat)" if "(iat)" in str(exc) \
            else "token not yet valid (nbf)"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing {exc.claim} claim"
    if isinstance(exc, jwt.InvalidAudienceError):
        return f"aud {_short(claims.get('aud'))} not accepted"
    if isinstance(exc, jwt.InvalidIssuerError):
        return f"unexpected iss {_short(claims.get('iss'))}"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "invalid signature"
    if isinstance(exc, jwt.DecodeError):
        return f"malformed token: {_short(str(exc))}"
    return f"{type(exc).__name__}: {_short(str(exc))}"


class JwtStrategy:
    """What every JWT strategy shares: header refusals, the two ``jwt.decode`` passes."""

    #: The 401 message of this kind of token; ``prefix`` starts every logged reason.
    message = MSG_ILLEGAL_TOKEN
    prefix = ""

    def __init__(self, decoder: ClockedJWT, leeway: float) -> None:
        self._jwt = decoder
        self.leeway = leeway

    def fail(self, reason: str) -> CredentialError:
        return CredentialError(self.message, self.prefix + reason)

    def refuse_odd_shapes(self, token: UnverifiedToken) -> None:
        """What PyJWT allows and stagedoor does not: key-naming or extension headers, time
        claims that are not JSON numbers."""
        for name in REFUSED_HEADERS:
            if name in token.header:
                raise self.fail(f"token carries a '{name}' header")
        if not isinstance(token.header.get("kid", ""), str):
            raise self.fail("kid header is not a string")
        for name in ("exp", "nbf", "iat"):
            value = token.claims.get(name)
            if value is not None and not _is_number(value):
                raise self.fail(f"{name} claim is not a number")

    def screen(self, token: UnverifiedToken, rules: ClaimRules) -> None:
        """Everything but the signature (before a key set is asked for a key)."""
        self.refuse_odd_shapes(token)
        try:
            self._jwt.decode(token.token, **rules.arguments(verify_signature=False))
        except jwt.InvalidTokenError as exc:
            raise self.fail(_reason(exc, token.claims)) from None

    def decode(self, token: UnverifiedToken, key: Any, algorithms: Iterable[str],
               rules: ClaimRules) -> dict[str, Any]:
        """``jwt.decode`` with the signature: the claims, or a CredentialError."""
        self.refuse_odd_shapes(token)
        allowed = sorted(algorithms)
        try:
            return self._jwt.decode(token.token, key, algorithms=allowed,
                                    **rules.arguments(verify_signature=True))
        except jwt.InvalidAlgorithmError:
            raise self.fail(f"algorithm {str(token.header.get('alg'))[:20]!r} not allowed for "
                            f"key (allowed: {', '.join(allowed)})") from None
        except jwt.InvalidTokenError as exc:
            raise self.fail(_reason(exc, token.claims)) from None

    def signing_key(self, source: JwksClient | None, token: UnverifiedToken, rules: ClaimRules,
                    now: float, source_for: Callable[[], JwksClient] | None = None) -> SigningKey:
        """The key to verify ``token`` with. When ``source`` does not hold it (or there is no
        source yet, and ``source_for`` makes one), the claims are screened first."""
        self.refuse_odd_shapes(token)
        kid = token.header.get("kid")
        if source is None or source.lookup(kid, now)[0] != "key":
            self.screen(token, rules)
        if source is None:
            assert source_for is not None
            source = source_for()
        try:
            return source.get_signing_key(kid, now)
        except SigningKeyNotFound as exc:
            raise self.fail(str(exc)) from None


def restricted_access(restrictions: tuple[AccessRestriction, ...] | None, plugin_id: str,
                      ) -> dict[str, frozenset[str] | None]:
    """The Principal fields of an external access entry's ``accessRestrictions``."""
    if restrictions is None:
        return {}
    for restriction in restrictions:
        if restriction.plugin == plugin_id:
            permissions, actions = restriction.permissions, restriction.actions
            break
    else:  # the gateway answers 403 for a plugin outside access_plugins
        permissions = actions = frozenset()
    return {
        "access_plugins": frozenset(r.plugin for r in restrictions),
        "access_permissions": permissions,
        "access_actions": actions,
    }


# -- the strategies --------------------------------------------------------------------------------


class UserTokens(JwtStrategy):
    """Backstage user tokens (``typ: vnd.backstage.user``), keys from the auth plugin."""

    message = MSG_USER_FAILED

    def __init__(self, decoder: ClockedJWT, leeway: float, source: JwksClient,
                 issuers: frozenset[str]) -> None:
        super().__init__(decoder, leeway)
        self.source = source
        self.rules = ClaimRules(("exp", "iat", "iss", "aud", "sub"), USER_TOKEN_AUDIENCE,
                                issuers, leeway)

    def verify(self, token: UnverifiedToken, now: float) -> Principal:
        sub, ent = token.claims.get("sub"), token.claims.get("ent")
        if not isinstance(sub, str) or not _USER_REF_PATTERN.fullmatch(sub):
            raise self.fail(f"sub is not a user entity ref: {_short(sub)}")
        if ent is not None and (not isinstance(ent, list)
                                or not all(isinstance(e, str) for e in ent)):
            raise self.fail("ent claim is not a list of entity refs")
        key = self.signing_key(self.source, token, self.rules, now)
        claims = self.decode(token, key.key, key.algorithms, self.rules)
        return Principal("user", sub, ownership=tuple(ent or ()), source="user",
                         expires_at=float(claims["exp"]))


class PluginTokens(JwtStrategy):
    """Backstage plugin tokens (``typ: vnd.backstage.plugin``), keys from the calling plugin.

    Key sources of plugins named in discovery are pinned; others are learnt from tokens, at
    most ``max_sources`` held (least recently used dropped) and at most
    :data:`NEW_PLUGIN_SOURCES_PER_INTERVAL` new ones per refetch interval, so a flood of
    tokens naming random plugins cannot become a flood of fetches.
    """

    message = MSG_PLUGIN_FAILED

    def __init__(self, decoder: ClockedJWT, settings: AuthSettings,
                 make_source: Callable[[str, str, bool], JwksClient]) -> None:
        super().__init__(decoder, settings.leeway)
        self.settings = settings
        self._make_source = make_source
        self.pinned: dict[str, JwksClient] = {}
        for endpoint in settings.endpoints:
            for plugin_id in endpoint.plugins:
                if is_plugin_id(plugin_id) and plugin_id not in self.pinned:
                    self.pinned[plugin_id] = make_source(
                        settings.plugin_jwks_url(plugin_id), f"plugin:{plugin_id}", True)
        self.learnt: OrderedDict[str, JwksClient] = OrderedDict()
        self._window_start = -math.inf
        self._window_count = 0

    def verify(self, token: UnverifiedToken, plugin_id: str, now: float) -> Principal:
        sub = token.claims.get("sub")
        if not isinstance(sub, str) or not is_plugin_id(sub):
            raise self.fail(f"sub is not a plugin id: {_short(sub)}")
        rules = ClaimRules(("exp", "iat", "sub", "aud"), plugin_id, None, self.leeway)
        key = self.signing_key(self.pinned.get(sub) or self.learnt.get(sub), token, rules, now,
                               lambda: self.source_for(sub, now))
        claims = self.decode(token, key.key, key.algorithms, rules)
        return Principal("service", f"plugin:{sub}", source="plugin",
                         expires_at=float(claims["exp"]))

    def source_for(self, plugin_id: str, now: float) -> JwksClient:
        source = self.pinned.get(plugin_id) or self.learnt.get(plugin_id)
        if source is not None:
            if not source.pinned:
                self.learnt.move_to_end(plugin_id)
            return source
        url = self.settings.plugin_jwks_url(plugin_id)
        interval = self.settings.refetch_interval
        if not 0 <= now - self._window_start < interval:
            self._window_start, self._window_count = now, 0
        if self._window_count >= NEW_PLUGIN_SOURCES_PER_INTERVAL:
            retry = max(1, math.ceil(interval - (now - self._window_start)))
            raise KeySourceUnavailable(url, retry, "too many new plugin key sources at once")
        self._window_count += 1
        source = self._make_source(url, f"plugin:{plugin_id}", False)
        self.remember(source)
        return source

    def remember(self, source: JwksClient) -> None:
        """Hold a learnt source (again: it may have been dropped while its fetch ran)."""
        plugin_id = source.name.removeprefix("plugin:")
        if self.learnt.get(plugin_id) is not source:
            self.learnt[plugin_id] = source
        self.learnt.move_to_end(plugin_id)
        while len(self.learnt) > self.settings.max_plugin_sources:
            self.learnt.popitem(last=False)


class StaticTokens:
    """``externalAccess`` static tokens: found by the token's SHA-256, compared in constant time."""

    def __init__(self, entries: tuple[StaticAccess, ...]) -> None:
        self._by_digest = {entry.digest: entry for entry in entries}

    def verify(self, digest: bytes, plugin_id: str) -> Principal | None:
        """The principal of a static token, or None when ``digest`` is no configured token's."""
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        return Principal("service", f"external:{entry.subject}", source="static",
                         **restricted_access(entry.restrictions, plugin_id))


class LegacyTokens(JwtStrategy):
    """``externalAccess`` legacy tokens: HS256 with one of the configured secrets, no ``aud``;
    ``exp`` required (Backstage accepts tokens without one: deliberately not here)."""

    prefix = "legacy token: "

    def __init__(self, decoder: ClockedJWT, leeway: float,
                 entries: tuple[LegacyAccess, ...]) -> None:
        super().__init__(decoder, leeway)
        self.entries = entries
        self.rules = ClaimRules(("exp",), None, None, leeway)

    def verify(self, token: UnverifiedToken, plugin_id: str) -> Principal:
        self.refuse_odd_shapes(token)
        match: tuple[LegacyAccess, dict[str, Any]] | None = None
        failure: jwt.InvalidTokenError | None = None
        arguments = self.rules.arguments(verify_signature=True)
        for entry in self.entries:  # no early exit: the same work whichever entry matches
            try:
                claims = self._jwt.decode(token.token, entry.secret, algorithms=["HS256"],
                                          **arguments)
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidTokenError as exc:
                failure = failure or exc  # the signature matched, a claim did not
                continue
            if match is None:
                match = (entry, claims)
        if match is None:
            raise self.fail(_reason(failure, token.claims) if failure is not None
                            else "signature matches no configured secret")
        entry, claims = match
        return Principal("service", f"external:{entry.subject}", source="legacy",
                         expires_at=float(claims["exp"]),
                         **restricted_access(entry.restrictions, plugin_id))

    @staticmethod
    def recognises(token: UnverifiedToken) -> bool:
        """Backstage's test for a legacy token: HS256, ``sub: backstage-server``, no ``aud``."""
        return (token.header.get("alg") == "HS256"
                and token.claims.get("sub") == LEGACY_TOKEN_SUBJECT
                and not token.claims.get("aud"))


class JwksTokens(JwtStrategy):
    """``externalAccess`` jwks entries: tokens of an identity provider, chosen by ``iss``."""

    prefix = "external JWT: "

    def __init__(self, decoder: ClockedJWT, leeway: float,
                 entries: list[tuple[JwksAccess, JwksClient]]) -> None:
        super().__init__(decoder, leeway)
        self.entries = entries

    @property
    def sources(self) -> list[JwksClient]:
        return list({id(source): source for _, source in self.entries}.values())

    def candidates(self, token: UnverifiedToken) -> list[tuple[JwksAccess, JwksClient]]:
        iss = token.claims.get("iss")
        return [(entry, source) for entry, source in self.entries
                if entry.issuers is None or (isinstance(iss, str) and iss in entry.issuers)]

    def verify(self, token: UnverifiedToken, candidates: list[tuple[JwksAccess, JwksClient]],
               plugin_id: str, now: float) -> Principal:
        sub = token.claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise self.fail("missing sub claim")
        alg = token.header.get("alg")
        needs: list[JwksClient] = []
        unavailable: JwksClient | None = None
        reasons: list[str] = []
        self.refuse_odd_shapes(token)
        for entry, source in candidates:
            rules = ClaimRules(("exp", "sub"), entry.audiences, entry.issuers, self.leeway)
            if not isinstance(alg, str) or alg not in entry.algorithms:
                reasons.append(f"{entry.key}: algorithm {_short(alg)} not configured")
                continue
            outcome, key = source.lookup(token.header.get("kid"), now)
            if outcome != "key":  # no fetch, no 503, for a token this entry refuses anyway
                try:
                    self.screen(token, rules)
                except CredentialError as exc:
                    reasons.append(f"{entry.key}: {exc.reason.removeprefix(self.prefix)}")
                    continue
            if outcome == "fetch":
                if source not in needs:
                    needs.append(source)
                continue
            if outcome == "unavailable":
                unavailable = unavailable or source
                continue
            if key is None:
                reasons.append(f"{entry.key}: no key for kid {_short(token.header.get('kid'))}")
                continue
            try:
                claims = self.decode(token, key.key, key.algorithms & entry.algorithms, rules)
            except CredentialError as exc:
                reasons.append(f"{entry.key}: {exc.reason.removeprefix(self.prefix)}")
                continue
            prefix = f"external:{entry.subject_prefix}:" if entry.subject_prefix else "external:"
            return Principal("service", f"{prefix}{sub}", source=f"jwks:{entry.url}",
                             expires_at=float(claims["exp"]),
                             **restricted_access(entry.restrictions, plugin_id))
        if needs:
            raise KeysNeeded(needs[0], tuple(needs))
        if unavailable is not None:
            raise unavailable.unavailable(now)
        raise self.fail("; ".join(reasons) or "no candidate source")
