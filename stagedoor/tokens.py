"""Credential verification: Backstage user and plugin tokens, and external access tokens.

This module reproduces the credential checks of a Backstage backend (SPEC.md, "Credentials and
their outcomes") without any mitmproxy dependency:

- ``extract_bearer`` turns the request's ``Authorization`` header values into a token (or None).
- ``TokenVerifier.verify`` is synchronous and uses only cached keys; it never does network I/O.
  When a JWKS (re)fetch is needed it raises :class:`KeysNeeded`; the caller then awaits
  ``TokenVerifier.refresh(exc.source)`` and calls ``verify`` once more::

      try:
          principal = verifier.verify(token, plugin_id)
      except KeysNeeded as needed:
          await verifier.refresh(needed.source)
          principal = verifier.verify(token, plugin_id)

  (``TokenVerifier.authenticate`` does exactly this, and also covers the rare case where more
  than one external JWKS source is a candidate for the same token.)

Design points (MITMPROXY-NOTES.md, "What other gateways got wrong"):

- The algorithm comes from the key, never from the token header: a JWK's ``kty``/``crv`` (and
  its ``alg``, when present) decide which algorithms it may verify; symmetric keys are never
  loaded from a JWKS, so ``HS256`` signed with a public key and ``alg: none`` always fail.
- A JWKS is fetched at most once per ``refetch_interval`` per source, however many unknown
  ``kid``s arrive; concurrent callers share one in-flight fetch; a failed fetch keeps the keys
  already held; "source down and the key is not cached" is :class:`KeySourceUnavailable` (503),
  not a 401.
- ``exp`` is required on every JWT, ``nbf``/``iat`` are checked with a small leeway, static
  tokens and HMAC signatures are compared in constant time.
- Tokens are never logged and never used as cache keys (their SHA-256 digest is).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import get_default_algorithms
from jwt.api_jwk import PyJWK

from .config import Config, ConfigError, MissingConfigError

log = logging.getLogger("stagedoor.tokens")

USER_TOKEN_TYPE = "vnd.backstage.user"
LIMITED_USER_TOKEN_TYPE = "vnd.backstage.limited-user"
PLUGIN_TOKEN_TYPE = "vnd.backstage.plugin"
USER_TOKEN_AUDIENCE = "backstage"
LEGACY_TOKEN_SUBJECT = "backstage-server"

MSG_MISSING_CREDENTIALS = "Missing credentials"
MSG_ILLEGAL_TOKEN = "Illegal token"
MSG_USER_FAILED = "Failed user token verification"
MSG_PLUGIN_FAILED = "Failed plugin token verification"
MSG_SOURCE_UNAVAILABLE = "Unable to verify credentials: a key source is unavailable"

EXTERNAL_ACCESS_KEY = "backend.auth.externalAccess"
OLD_KEYS_KEY = "backend.auth.keys"

PLUGIN_ID_PATTERN = re.compile(r"[a-z][a-z0-9-]*")
_MAX_PLUGIN_ID_LENGTH = 100
_USER_REF_PATTERN = re.compile(r"user:[^\s/:]+/\S+", re.IGNORECASE)
_BEARER_PATTERN = re.compile(r"Bearer +(\S+)", re.IGNORECASE | re.ASCII)
_PLUGIN_ID_PLACEHOLDER = re.compile(r"\{\{\s*pluginId\s*\}\}")
_B64URL_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")

#: Algorithms accepted for Backstage user and plugin tokens.
DEFAULT_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "EdDSA"}
)
#: Every algorithm a JWKS key may ever verify (asymmetric only, by construction).
ASYMMETRIC_ALGORITHMS = DEFAULT_ALGORITHMS | {"PS384", "PS512"}
_RSA_FAMILY = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_FAMILY = {"P-256": frozenset({"ES256"}), "P-384": frozenset({"ES384"}),
              "P-521": frozenset({"ES512"})}
_OKP_FAMILY = {"Ed25519": frozenset({"EdDSA"}), "Ed448": frozenset({"EdDSA"})}
_REFUSED_HEADERS = ("jku", "x5u", "jwk")
_ALGORITHMS = {name: alg for name, alg in get_default_algorithms().items()
               if name in ASYMMETRIC_ALGORITHMS}
_MIN_RSA_BITS = 2048
_MAX_JWKS_BYTES = 1 << 20
_NEW_PLUGIN_SOURCES_PER_INTERVAL = 32
_PERMISSION_ACTIONS = ("create", "read", "update", "delete")


# -- public types ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified credential belongs to."""

    kind: Literal["user", "service"]
    subject: str
    ownership: tuple[str, ...] = ()
    source: str = ""
    access_plugins: frozenset[str] | None = None
    access_permissions: frozenset[str] | None = None
    expires_at: float | None = None
    access_actions: frozenset[str] | None = None


class CredentialError(Exception):
    """The credential is not acceptable: 401 AuthenticationError with ``message``.

    ``reason`` is a log-only detail and never contains the token.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason

    def __repr__(self) -> str:
        return f"CredentialError({self.message!r}, reason={self.reason!r})"


class KeysNeeded(Exception):  # name fixed by the gateway interface
    """Verification needs a JWKS (re)fetch of ``source`` first (see module docstring)."""

    def __init__(self, source: KeySource, sources: tuple[KeySource, ...] = ()) -> None:
        super().__init__(f"keys needed from {source.url}")
        self.source = source
        self.sources = sources or (source,)


class KeySourceUnavailable(Exception):  # name fixed by the gateway interface
    """A key needed to verify the credential cannot be had: 503 + ``Retry-After``."""

    def __init__(self, source_url: str, retry_after: int, reason: str = "") -> None:
        super().__init__(MSG_SOURCE_UNAVAILABLE)
        self.message = MSG_SOURCE_UNAVAILABLE
        self.source_url = source_url
        self.retry_after = retry_after
        self.reason = reason


def extract_bearer(authorization_values: list[str]) -> str | None:
    """The Bearer token of a request, given the values of all its ``Authorization`` headers.

    None means "Missing credentials" (no header, another scheme, ``Bearer`` with nothing).
    Two or more headers raise ``CredentialError("Illegal token")``.
    """
    if not authorization_values:
        return None
    if len(authorization_values) > 1:
        raise CredentialError(MSG_ILLEGAL_TOKEN, "multiple Authorization headers")
    match = _BEARER_PATTERN.fullmatch(authorization_values[0].strip(" \t"))
    return match.group(1) if match else None


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessRestriction:
    """One ``accessRestrictions`` item of an external access entry."""

    plugin: str
    permissions: frozenset[str] | None = None
    actions: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class StaticAccess:
    key: str  # config key of the entry, for messages
    subject: str
    digest: bytes = field(repr=False)
    restrictions: tuple[AccessRestriction, ...] | None = None


@dataclass(frozen=True, slots=True)
class LegacyAccess:
    key: str
    subject: str
    secret: bytes = field(repr=False)
    restrictions: tuple[AccessRestriction, ...] | None = None


@dataclass(frozen=True, slots=True)
class JwksAccess:
    key: str
    url: str
    algorithms: frozenset[str]
    issuers: frozenset[str] | None = None
    audiences: frozenset[str] | None = None
    subject_prefix: str | None = None
    restrictions: tuple[AccessRestriction, ...] | None = None


@dataclass(frozen=True, slots=True)
class DiscoveryEndpoint:
    plugins: tuple[str, ...]
    internal: str | None
    external: str | None


@dataclass
class AuthSettings:
    """Everything the verifier reads from config (see :meth:`from_config`)."""

    base_url: str | None = None
    endpoints: tuple[DiscoveryEndpoint, ...] = ()
    user_tokens: bool = True
    plugin_tokens: bool = True
    leeway: float = 5.0
    max_token_bytes: int = 8192
    refetch_interval: float = 5.0
    jwks_timeout: float = 3.0
    jwks_max_age: float = 600.0
    token_cache_size: int = 10_000
    token_cache_ttl: float = 300.0
    max_plugin_sources: int = 256
    static: tuple[StaticAccess, ...] = ()
    legacy: tuple[LegacyAccess, ...] = ()
    jwks: tuple[JwksAccess, ...] = ()

    # -- discovery --------------------------------------------------------------------------
    def _endpoint(self, plugin_id: str) -> DiscoveryEndpoint | None:
        for endpoint in self.endpoints:
            if plugin_id in endpoint.plugins:
                return endpoint
        return None

    def _default_base(self, plugin_id: str) -> str:
        if not self.base_url:
            raise ConfigError("Missing required config value at 'backend.baseUrl'")
        return f"{self.base_url}/api/{plugin_id}"

    def base_url_for(self, plugin_id: str) -> str:
        """Internal base URL of a plugin (where its JWKS is fetched)."""
        endpoint = self._endpoint(plugin_id)
        target = endpoint.internal if endpoint else None
        if target is None:
            return self._default_base(plugin_id)
        return _PLUGIN_ID_PLACEHOLDER.sub(lambda _: plugin_id, target).rstrip("/")

    def external_base_url_for(self, plugin_id: str) -> str:
        endpoint = self._endpoint(plugin_id)
        target = endpoint.external if endpoint else None
        if target is None:
            return self._default_base(plugin_id)
        return _PLUGIN_ID_PLACEHOLDER.sub(lambda _: plugin_id, target).rstrip("/")

    @property
    def user_jwks_url(self) -> str:
        return f"{self.base_url_for('auth')}/.well-known/jwks.json"

    @property
    def user_issuers(self) -> frozenset[str]:
        """Accepted ``iss`` of user tokens: the auth plugin's external (and internal) base URL."""
        return frozenset({self.external_base_url_for("auth"), self.base_url_for("auth")})

    def plugin_jwks_url(self, plugin_id: str) -> str:
        return f"{self.base_url_for(plugin_id)}/.backstage/auth/v1/jwks.json"

    # -- reading config ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config) -> AuthSettings:
        """Read the settings; raises ConfigError / MissingConfigError naming the key."""
        user_tokens = config.get_bool("stagedoor.auth.userTokens", True)
        plugin_tokens = config.get_bool("stagedoor.auth.pluginTokens", True)
        base_url = None
        if user_tokens or plugin_tokens or config.has("backend.baseUrl"):
            base_url = _read_url(config, "backend.baseUrl",
                                 config.require_string("backend.baseUrl"))
        refetch = _number(config, "stagedoor.auth.jwksRefetchIntervalSeconds", 5.0, 1.0, 3600.0)
        settings = cls(
            base_url=base_url,
            endpoints=_read_endpoints(config),
            user_tokens=user_tokens,
            plugin_tokens=plugin_tokens,
            leeway=_number(config, "stagedoor.auth.leewaySeconds", 5.0, 0.0, 300.0),
            max_token_bytes=int(_number(config, "stagedoor.auth.maxTokenBytes", 8192, 256,
                                        1 << 20)),
            refetch_interval=refetch,
            jwks_timeout=_number(config, "stagedoor.auth.jwksTimeoutSeconds", 3.0, 0.05, 60.0),
            jwks_max_age=_number(config, "stagedoor.auth.jwksMaxAgeSeconds", 600.0, refetch,
                                 86400.0),
            token_cache_size=int(_number(config, "stagedoor.auth.tokenCacheSize", 10_000, 0,
                                         1_000_000)),
            token_cache_ttl=_number(config, "stagedoor.auth.tokenCacheSeconds", 300.0, 0.0,
                                    3600.0),
            max_plugin_sources=int(_number(config, "stagedoor.auth.maxPluginKeySources", 256, 1,
                                           100_000)),
        )
        static, legacy, jwks = _read_external_access(config)
        settings.static, settings.legacy, settings.jwks = static, legacy, jwks
        return settings


def _origin(config: Config, key: str) -> str:
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        origin = config.origins.get(".".join(parts[:end]))
        if origin:
            return origin
    return config.files[-1] if config.files else "<no config file>"


def _invalid(config: Config, key: str, problem: str) -> ConfigError:
    return ConfigError(f"Invalid config value at '{key}' in '{_origin(config, key)}': {problem}")


def _number(config: Config, key: str, default: float, low: float, high: float) -> float:
    value = config.get_number(key, default)
    if not (math.isfinite(value) and low <= value <= high):
        raise _invalid(config, key, f"must be between {low:g} and {high:g}, got {value:g}")
    return value


def _read_url(config: Config, key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", value):
        raise _invalid(config, key, "must be an http(s) URL without whitespace")
    return value.rstrip("/")


def _read_endpoints(config: Config) -> tuple[DiscoveryEndpoint, ...]:
    result = []
    for i, item in enumerate(config.get_list("discovery.endpoints")):
        key = f"discovery.endpoints[{i}]"
        if not isinstance(item, dict):
            raise _invalid(config, key, "must be a mapping with 'target' and 'plugins'")
        target = item.get("target")
        if isinstance(target, str):
            internal = external = _read_target(config, f"{key}.target", target)
        elif isinstance(target, dict):
            internal = _read_target(config, f"{key}.target.internal", target.get("internal"))
            external = _read_target(config, f"{key}.target.external", target.get("external"))
        elif target is None:
            raise MissingConfigError(f"{key}.target", _origin(config, "discovery.endpoints"))
        else:
            raise _invalid(config, f"{key}.target", "must be a string or {internal, external}")
        plugins = item.get("plugins")
        if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
            raise _invalid(config, f"{key}.plugins", "must be a list of plugin ids")
        result.append(DiscoveryEndpoint(tuple(plugins), internal, external))
    return tuple(result)


def _read_target(config: Config, key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(config, key, "must be a string")
    _read_url(config, key, _PLUGIN_ID_PLACEHOLDER.sub("plugin", value))
    return value


def _string_or_list(config: Config, key: str, value: Any) -> frozenset[str] | None:
    """Backstage's readStringOrStringArrayFromConfig: split on spaces and commas, dedupe."""
    if value is None:
        return None
    raw = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in raw):
        raise _invalid(config, key, "must be a string or a list of strings")
    values = frozenset(part for v in raw for part in re.split(r"[ ,]", v) if part)
    return values or None


def _read_restrictions(config: Config, key: str,
                       entry: dict[str, Any]) -> tuple[AccessRestriction, ...] | None:
    items = entry.get("accessRestrictions")
    if items is None:
        return None
    if not isinstance(items, list):
        raise _invalid(config, f"{key}.accessRestrictions", "must be a list")
    result: dict[str, AccessRestriction] = {}
    for j, item in enumerate(items):
        item_key = f"{key}.accessRestrictions[{j}]"
        if not isinstance(item, dict):
            raise _invalid(config, item_key, "must be a mapping")
        for name in item:
            if name not in ("plugin", "permission", "permissionAttribute"):
                raise _invalid(config, item_key, f"unknown key '{name}', expected one of "
                               "'plugin', 'permission', 'permissionAttribute'")
        plugin = item.get("plugin")
        if plugin is None:
            raise MissingConfigError(f"{item_key}.plugin", _origin(config, EXTERNAL_ACCESS_KEY))
        if not isinstance(plugin, str) or not _is_plugin_id(plugin):
            raise _invalid(config, f"{item_key}.plugin", f"not a valid plugin id: {plugin!r}")
        if plugin in result:
            raise _invalid(config, item_key, f"accessRestrictions declared twice for '{plugin}'")
        permissions = _string_or_list(config, f"{item_key}.permission", item.get("permission"))
        actions = None
        attribute = item.get("permissionAttribute")
        if attribute is not None:
            if not isinstance(attribute, dict) or set(attribute) - {"action"}:
                raise _invalid(config, f"{item_key}.permissionAttribute",
                               "must be a mapping with only 'action'")
            actions = _string_or_list(config, f"{item_key}.permissionAttribute.action",
                                      attribute.get("action"))
            if actions and not actions <= set(_PERMISSION_ACTIONS):
                raise _invalid(config, f"{item_key}.permissionAttribute.action",
                               "valid values are 'create', 'read', 'update', 'delete'")
        result[plugin] = AccessRestriction(plugin, permissions, actions)
    return tuple(result.values()) or None


def _required_string(config: Config, key: str, value: Any) -> str:
    if value is None:
        raise MissingConfigError(key, _origin(config, EXTERNAL_ACCESS_KEY))
    if isinstance(value, dict | list):
        raise _invalid(config, key, "must be a string")
    return str(value)


def _decode_secret(config: Config, key: str, secret: str) -> bytes:
    if not re.fullmatch(r"\S+", secret):
        raise _invalid(config, key, "must be a base64 string without whitespace")
    text = secret.replace("-", "+").replace("_", "/").rstrip("=")
    try:
        decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(config, key, "must be a valid base64 string") from None
    if not decoded:
        raise _invalid(config, key, "must not be empty")
    return decoded


def _read_external_access(
    config: Config,
) -> tuple[tuple[StaticAccess, ...], tuple[LegacyAccess, ...], tuple[JwksAccess, ...]]:
    static: list[StaticAccess] = []
    legacy: list[LegacyAccess] = []
    jwks: list[JwksAccess] = []
    for i, entry in enumerate(config.get_list(EXTERNAL_ACCESS_KEY)):
        key = f"{EXTERNAL_ACCESS_KEY}[{i}]"
        if not isinstance(entry, dict):
            raise _invalid(config, key, "must be a mapping with 'type' and 'options'")
        kind = _required_string(config, f"{key}.type", entry.get("type"))
        options = entry.get("options")
        if options is None:
            raise MissingConfigError(f"{key}.options", _origin(config, EXTERNAL_ACCESS_KEY))
        if not isinstance(options, dict):
            raise _invalid(config, f"{key}.options", "must be a mapping")
        restrictions = _read_restrictions(config, key, entry)
        opt = f"{key}.options"
        if kind == "static":
            token = _required_string(config, f"{opt}.token", options.get("token"))
            subject = _required_string(config, f"{opt}.subject", options.get("subject"))
            if not re.fullmatch(r"\S+", token):
                raise _invalid(config, f"{opt}.token", "must be a set of non-space characters")
            if len(token) < 8:
                raise _invalid(config, f"{opt}.token", "must be at least 8 characters long")
            if not re.fullmatch(r"\S+", subject):
                raise _invalid(config, f"{opt}.subject", "must be a set of non-space characters")
            digest = hashlib.sha256(token.encode("utf-8")).digest()
            if any(hmac.compare_digest(digest, s.digest) for s in static):
                raise _invalid(config, f"{opt}.token", "the same static token is declared twice")
            static.append(StaticAccess(key, subject, digest, restrictions))
        elif kind == "legacy":
            secret = _required_string(config, f"{opt}.secret", options.get("secret"))
            subject = _required_string(config, f"{opt}.subject", options.get("subject"))
            if not re.fullmatch(r"\S+", subject):
                raise _invalid(config, f"{opt}.subject", "must be a set of non-space characters")
            legacy.append(LegacyAccess(key, subject, _decode_secret(config, f"{opt}.secret",
                                                                    secret), restrictions))
        elif kind == "jwks":
            url = _read_url(config, f"{opt}.url",
                            _required_string(config, f"{opt}.url", options.get("url")))
            algorithms = _string_or_list(config, f"{opt}.algorithm", options.get("algorithm"))
            if algorithms and not algorithms <= ASYMMETRIC_ALGORITHMS:
                bad = ", ".join(sorted(algorithms - ASYMMETRIC_ALGORITHMS))
                raise _invalid(config, f"{opt}.algorithm", f"unsupported algorithm(s) {bad}; "
                               f"allowed: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}")
            prefix = options.get("subjectPrefix")
            if prefix is not None and (not isinstance(prefix, str) or not prefix):
                raise _invalid(config, f"{opt}.subjectPrefix", "must be a non-empty string")
            jwks.append(JwksAccess(
                key=key,
                url=url,
                algorithms=algorithms or ASYMMETRIC_ALGORITHMS,
                issuers=_string_or_list(config, f"{opt}.issuer", options.get("issuer")),
                audiences=_string_or_list(config, f"{opt}.audience", options.get("audience")),
                subject_prefix=prefix,
                restrictions=restrictions,
            ))
        else:
            raise _invalid(config, f"{key}.type",
                           f"unknown type '{kind}', expected one of 'static', 'legacy', 'jwks'")
    old = config.get_list(OLD_KEYS_KEY)
    if old:
        log.warning("DEPRECATION WARNING: The %s config has been replaced by %s",
                    OLD_KEYS_KEY, EXTERNAL_ACCESS_KEY)
    for i, entry in enumerate(old):
        key = f"{OLD_KEYS_KEY}[{i}]"
        if not isinstance(entry, dict):
            raise _invalid(config, key, "must be a mapping with 'secret'")
        secret = _required_string(config, f"{key}.secret", entry.get("secret"))
        legacy.append(LegacyAccess(key, "backstage-plugin",
                                   _decode_secret(config, f"{key}.secret", secret)))
    return tuple(static), tuple(legacy), tuple(jwks)


def _is_plugin_id(value: str) -> bool:
    return len(value) <= _MAX_PLUGIN_ID_LENGTH and PLUGIN_ID_PATTERN.fullmatch(value) is not None


# -- keys and key sources ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    algorithms: frozenset[str]
    prepared: dict[str, Any] = field(repr=False)


def _key_family(jwk: dict[str, Any]) -> frozenset[str]:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return _RSA_FAMILY
    if kty == "EC" and isinstance(crv, str):
        return _EC_FAMILY.get(crv, frozenset())
    if kty == "OKP" and isinstance(crv, str):
        return _OKP_FAMILY.get(crv, frozenset())
    return frozenset()  # "oct" (symmetric) and anything unknown are never loaded


def _load_jwk(jwk: Any, allowed: frozenset[str]) -> _Key | None:
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
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
            return None
        prepared = {alg: _ALGORITHMS[alg].prepare_key(key) for alg in algorithms}
    except Exception:  # any key PyJWT/cryptography cannot load is unusable
        return None
    return _Key(kid, algorithms, prepared)


def parse_jwks(document: Any, allowed: frozenset[str] = ASYMMETRIC_ALGORITHMS) -> tuple[_Key, ...]:
    """The usable verification keys of a JWK set; ValueError when it is not a usable set."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK set (no 'keys' list)")
    raw = document["keys"]
    keys = tuple(k for k in (_load_jwk(item, allowed) for item in raw) if k is not None)
    if raw and not keys:
        raise ValueError(f"none of its {len(raw)} key(s) is usable")
    return keys


class KeySource:
    """One JWKS endpoint and the keys last fetched from it."""

    def __init__(self, url: str, *, kind: str, name: str,
                 algorithms: frozenset[str] = DEFAULT_ALGORITHMS, pinned: bool = True) -> None:
        self.url = url
        self.kind = kind  # "user" | "plugin" | "external"
        self.name = name
        self.algorithms = algorithms
        self.pinned = pinned
        self.keys: tuple[_Key, ...] = ()
        self._by_kid: dict[str, _Key] = {}
        self.fetched_at: float | None = None    # last successful fetch
        self.attempted_at: float | None = None  # last fetch started
        self.failure: str | None = None         # why the last fetch failed; None if it did not
        self.failure_kind: Literal["unavailable", "not_found"] | None = None
        self._in_flight: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"KeySource({self.name!r}, {self.url!r}, keys={len(self.keys)})"

    def set_keys(self, keys: tuple[_Key, ...], now: float) -> None:
        by_kid: dict[str, _Key] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, key)
        self.keys, self._by_kid = keys, by_kid
        self.fetched_at = now
        self.failure = self.failure_kind = None

    def find(self, kid: str | None) -> _Key | None:
        if kid is not None:
            key = self._by_kid.get(kid)
            if key is not None:
                return key
            if len(self.keys) == 1 and self.keys[0].kid is None:
                return self.keys[0]
            return None
        return self.keys[0] if len(self.keys) == 1 else None


# -- token parsing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Jwt:
    header: dict[str, Any]
    payload: dict[str, Any] | None  # None: the payload segment is not a JSON object
    signing_input: bytes = field(repr=False)
    signature: bytes | None = field(repr=False)


def _b64url_decode(segment: str) -> bytes | None:
    """Strict, unpadded, canonical base64url (as jose requires); None when malformed."""
    if len(segment) % 4 == 1 or not _B64URL_SEGMENT.fullmatch(segment):
        return None
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != segment:
        return None
    return data


def _json_object(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _parse_jwt(token: str) -> _Jwt | None:
    """A compact JWS whose header is a JSON object, else None (not a JWT)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    header = _json_object(_b64url_decode(parts[0]))
    if header is None:
        return None
    return _Jwt(
        header=header,
        payload=_json_object(_b64url_decode(parts[1])),
        signing_input=f"{parts[0]}.{parts[1]}".encode("utf-8", "replace"),
        signature=_b64url_decode(parts[2]),
    )


def _header_problem(header: dict[str, Any]) -> str | None:
    for name in _REFUSED_HEADERS:
        if name in header:
            return f"token carries a '{name}' header"
    if "crit" in header or "b64" in header:
        return "token uses unsupported critical header extensions"
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return "kid header is not a string"
    return None


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _time_problem(claims: dict[str, Any], now: float, leeway: float,
                  require_iat: bool) -> str | None:
    exp = claims.get("exp")
    if exp is None:
        return "missing exp claim"
    if not _is_number(exp):
        return "exp claim is not a number"
    if exp <= now - leeway:
        return "token expired"
    nbf = claims.get("nbf")
    if nbf is not None and (not _is_number(nbf) or nbf > now + leeway):
        return "token not yet valid (nbf)"
    iat = claims.get("iat")
    if iat is None:
        return "missing iat claim" if require_iat else None
    if not _is_number(iat):
        return "iat claim is not a number"
    if iat > now + leeway:
        return "token issued in the future (iat)"
    return None


def _audience_matches(aud: Any, accepted: Iterable[str]) -> bool:
    accepted = set(accepted)
    if isinstance(aud, str):
        return aud in accepted
    if isinstance(aud, list):
        return any(isinstance(a, str) and a in accepted for a in aud)
    return False


def _signature_problem(token: _Jwt, key: _Key) -> str | None:
    alg = token.header.get("alg")
    if not isinstance(alg, str) or alg not in key.algorithms:
        return f"algorithm {str(alg)[:20]!r} not allowed for key (allowed: " \
               f"{', '.join(sorted(key.algorithms))})"
    if token.signature is None:
        return "malformed signature"
    try:
        ok = _ALGORITHMS[alg].verify(token.signing_input, key.prepared[alg], token.signature)
    except Exception:  # a malformed signature is just a bad one
        ok = False
    return None if ok else "invalid signature"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _restricted_access(restrictions: tuple[AccessRestriction, ...] | None, plugin_id: str,
                       ) -> dict[str, frozenset[str] | None]:
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


# -- the verifier ------------------------------------------------------------------------------


_Lookup = tuple[Literal["key", "fetch", "unavailable", "missing"], _Key | None]


class TokenVerifier:
    """Verifies credentials against cached keys; see the module docstring for the protocol.

    Not thread-safe: use it from the event loop's thread (as mitmproxy addons run).
    """

    def __init__(self, settings: AuthSettings, *, clock: Callable[[], float] = time.time,
                 http_client_factory: Callable[[], httpx.AsyncClient] | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._client_factory = http_client_factory or self._default_client
        self.stats: dict[str, int] = dict.fromkeys(
            ("verified_ok", "verified_cached", "failed", "keys_needed", "source_unavailable",
             "jwks_fetch_ok", "jwks_fetch_failed"), 0)
        self._cache: OrderedDict[tuple[bytes, str], tuple[Principal, float]] = OrderedDict()
        self._static = {entry.digest: entry for entry in settings.static}
        self._closed = False

        self.user_source: KeySource | None = None
        if settings.user_tokens:
            self.user_source = KeySource(settings.user_jwks_url, kind="user", name="auth")
        self._user_issuers = settings.user_issuers if settings.user_tokens else frozenset()

        self._pinned_plugins: dict[str, KeySource] = {}
        self._plugin_sources: OrderedDict[str, KeySource] = OrderedDict()
        if settings.plugin_tokens:
            for endpoint in settings.endpoints:
                for plugin_id in endpoint.plugins:
                    if _is_plugin_id(plugin_id) and plugin_id not in self._pinned_plugins:
                        self._pinned_plugins[plugin_id] = KeySource(
                            settings.plugin_jwks_url(plugin_id), kind="plugin",
                            name=f"plugin:{plugin_id}")
        self._new_sources_window = -math.inf
        self._new_sources_count = 0

        by_url: dict[str, KeySource] = {}
        self._jwks: list[tuple[JwksAccess, KeySource]] = []
        for entry in settings.jwks:
            source = by_url.get(entry.url)
            if source is None:
                source = by_url[entry.url] = KeySource(entry.url, kind="external",
                                                       name=f"jwks:{entry.url}",
                                                       algorithms=ASYMMETRIC_ALGORITHMS)
            self._jwks.append((entry, source))

    def _default_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.settings.jwks_timeout, follow_redirects=False,
                                 headers={"Accept": "application/json",
                                          "User-Agent": "stagedoor"})

    @property
    def sources(self) -> list[KeySource]:
        """Every key source currently held (statically known ones first)."""
        result = [self.user_source] if self.user_source else []
        result += self._pinned_plugins.values()
        result += self._plugin_sources.values()
        seen = set()
        for _, source in self._jwks:
            if id(source) not in seen:
                seen.add(id(source))
                result.append(source)
        return result

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

        entry = self._static.get(digest)
        if entry is not None and hmac.compare_digest(entry.digest, digest):
            self.stats["verified_ok"] += 1
            return Principal("service", f"external:{entry.subject}", source="static",
                             **_restricted_access(entry.restrictions, plugin_id))

        jwt = _parse_jwt(token)
        if jwt is None:
            raise CredentialError(MSG_ILLEGAL_TOKEN, "not a JWT and not a static token")
        typ = jwt.header.get("typ")
        if typ == PLUGIN_TOKEN_TYPE and self.settings.plugin_tokens:
            principal = self._verify_plugin(jwt, plugin_id, now)
        elif typ == USER_TOKEN_TYPE and self.user_source is not None:
            principal = self._verify_user(jwt, self.user_source, now)
        elif typ == LIMITED_USER_TOKEN_TYPE:
            raise CredentialError(MSG_ILLEGAL_TOKEN, "limited user tokens are not accepted")
        else:
            principal = self._verify_external(jwt, plugin_id, now)
        self.stats["verified_ok"] += 1
        self._cache_put((digest, plugin_id), principal, now)
        return principal

    def _lookup(self, source: KeySource, kid: str | None, now: float) -> _Lookup:
        key = source.find(kid)
        fresh = source.fetched_at is not None and 0 <= now - source.fetched_at < \
            self.settings.jwks_max_age
        if key is not None and fresh:
            return "key", key
        if not self._closed and self._may_fetch(source, now):
            return "fetch", None
        if key is not None:
            return "key", key  # stale, but the source cannot be asked again yet
        if source.failure_kind == "unavailable" or self._closed:
            return "unavailable", None
        return "missing", None

    def _resolve(self, source: KeySource, kid: str | None, now: float,
                 fail: Callable[[str], CredentialError]) -> _Key:
        outcome, key = self._lookup(source, kid, now)
        if outcome == "key":
            assert key is not None
            return key
        if outcome == "fetch":
            raise KeysNeeded(source)
        if outcome == "unavailable":
            raise self._unavailable(source, now)
        raise fail(f"no key for kid {_short(kid)} in {source.url}")

    def _unavailable(self, source: KeySource, now: float) -> KeySourceUnavailable:
        elapsed = now - (source.attempted_at or now)
        retry = max(1, math.ceil(self.settings.refetch_interval - max(0.0, elapsed)))
        return KeySourceUnavailable(source.url, retry,
                                    f"key source {source.url} unavailable: {source.failure}")

    def _verify_user(self, jwt: _Jwt, source: KeySource, now: float) -> Principal:
        def fail(reason: str) -> CredentialError:
            return CredentialError(MSG_USER_FAILED, reason)

        claims = jwt.payload
        problem = _header_problem(jwt.header)
        if problem:
            raise fail(problem)
        if claims is None:
            raise fail("payload is not a JSON object")
        iss = claims.get("iss")
        if not isinstance(iss, str) or iss not in self._user_issuers:
            raise fail(f"unexpected iss {_short(claims.get('iss'))}")
        if not _audience_matches(claims.get("aud"), (USER_TOKEN_AUDIENCE,)):
            raise fail(f"unexpected aud {_short(claims.get('aud'))}")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _USER_REF_PATTERN.fullmatch(sub):
            raise fail(f"sub is not a user entity ref: {_short(sub)}")
        ent = claims.get("ent")
        if ent is not None and (not isinstance(ent, list)
                                or not all(isinstance(e, str) for e in ent)):
            raise fail("ent claim is not a list of entity refs")
        problem = _time_problem(claims, now, self.settings.leeway, require_iat=True)
        if problem:
            raise fail(problem)
        key = self._resolve(source, jwt.header.get("kid"), now, fail)
        problem = _signature_problem(jwt, key)
        if problem:
            raise fail(problem)
        return Principal("user", sub, ownership=tuple(ent or ()), source="user",
                         expires_at=float(claims["exp"]))

    def _verify_plugin(self, jwt: _Jwt, plugin_id: str, now: float) -> Principal:
        def fail(reason: str) -> CredentialError:
            return CredentialError(MSG_PLUGIN_FAILED, reason)

        claims = jwt.payload
        problem = _header_problem(jwt.header)
        if problem:
            raise fail(problem)
        if claims is None:
            raise fail("payload is not a JSON object")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _is_plugin_id(sub):
            raise fail(f"sub is not a plugin id: {_short(sub)}")
        if not _audience_matches(claims.get("aud"), (plugin_id,)):
            raise fail(f"aud {_short(claims.get('aud'))} is not {plugin_id!r}")
        problem = _time_problem(claims, now, self.settings.leeway, require_iat=True)
        if problem:
            raise fail(problem)
        source = self._plugin_source(sub, now)
        key = self._resolve(source, jwt.header.get("kid"), now, fail)
        problem = _signature_problem(jwt, key)
        if problem:
            raise fail(problem)
        return Principal("service", f"plugin:{sub}", source="plugin",
                         expires_at=float(claims["exp"]))

    def _plugin_source(self, plugin_id: str, now: float) -> KeySource:
        source = self._pinned_plugins.get(plugin_id)
        if source is not None:
            return source
        source = self._plugin_sources.get(plugin_id)
        if source is not None:
            self._plugin_sources.move_to_end(plugin_id)
            return source
        url = self.settings.plugin_jwks_url(plugin_id)
        # A flood of tokens naming random plugins must not turn into a flood of fetches.
        if not 0 <= now - self._new_sources_window < self.settings.refetch_interval:
            self._new_sources_window, self._new_sources_count = now, 0
        if self._new_sources_count >= _NEW_PLUGIN_SOURCES_PER_INTERVAL:
            retry = max(1, math.ceil(self.settings.refetch_interval
                                     - (now - self._new_sources_window)))
            raise KeySourceUnavailable(url, retry, "too many new plugin key sources at once")
        self._new_sources_count += 1
        source = KeySource(url, kind="plugin", name=f"plugin:{plugin_id}", pinned=False)
        self._remember_plugin_source(plugin_id, source)
        return source

    def _remember_plugin_source(self, plugin_id: str, source: KeySource) -> None:
        self._plugin_sources[plugin_id] = source
        self._plugin_sources.move_to_end(plugin_id)
        while len(self._plugin_sources) > self.settings.max_plugin_sources:
            self._plugin_sources.popitem(last=False)

    def _verify_external(self, jwt: _Jwt, plugin_id: str, now: float) -> Principal:
        claims = jwt.payload
        if claims is None:
            raise CredentialError(MSG_ILLEGAL_TOKEN, "JWT payload is not a JSON object")
        if (jwt.header.get("alg") == "HS256" and claims.get("sub") == LEGACY_TOKEN_SUBJECT
                and not claims.get("aud")):
            return self._verify_legacy(jwt, plugin_id, now)
        iss = claims.get("iss")
        candidates = [(entry, source) for entry, source in self._jwks
                      if entry.issuers is None or (isinstance(iss, str) and iss in entry.issuers)]
        if not candidates:
            raise CredentialError(MSG_ILLEGAL_TOKEN,
                                  f"no configured source recognises this token (iss {_short(iss)},"
                                  f" typ {_short(jwt.header.get('typ'))})")
        return self._verify_jwks(jwt, candidates, plugin_id, now)

    def _verify_legacy(self, jwt: _Jwt, plugin_id: str, now: float) -> Principal:
        def fail(reason: str) -> CredentialError:
            return CredentialError(MSG_ILLEGAL_TOKEN, f"legacy token: {reason}")

        if not self.settings.legacy:
            raise fail("no legacy secrets are configured")
        problem = _header_problem(jwt.header)
        if problem:
            raise fail(problem)
        signature = jwt.signature or b""
        match = None
        for entry in self.settings.legacy:  # no early exit: same work whichever entry matches
            expected = hmac.new(entry.secret, jwt.signing_input, hashlib.sha256).digest()
            if hmac.compare_digest(expected, signature) and match is None:
                match = entry
        if match is None:
            raise fail("signature matches no configured secret")
        assert jwt.payload is not None
        problem = _time_problem(jwt.payload, now, self.settings.leeway, require_iat=False)
        if problem:
            raise fail(problem)
        return Principal("service", f"external:{match.subject}", source="legacy",
                         expires_at=float(jwt.payload["exp"]),
                         **_restricted_access(match.restrictions, plugin_id))

    def _verify_jwks(self, jwt: _Jwt, candidates: list[tuple[JwksAccess, KeySource]],
                     plugin_id: str, now: float) -> Principal:
        def fail(reason: str) -> CredentialError:
            return CredentialError(MSG_ILLEGAL_TOKEN, f"external JWT: {reason}")

        claims = jwt.payload
        assert claims is not None
        problem = _header_problem(jwt.header)
        if problem:
            raise fail(problem)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise fail("missing sub claim")
        problem = _time_problem(claims, now, self.settings.leeway, require_iat=False)
        if problem:
            raise fail(problem)
        kid = jwt.header.get("kid")
        alg = jwt.header.get("alg")
        needs: list[KeySource] = []
        unavailable: KeySource | None = None
        reasons: list[str] = []
        for entry, source in candidates:
            if entry.audiences and not _audience_matches(claims.get("aud"), entry.audiences):
                reasons.append(f"{entry.key}: aud {_short(claims.get('aud'))} not accepted")
                continue
            if not isinstance(alg, str) or alg not in entry.algorithms:
                reasons.append(f"{entry.key}: algorithm {_short(alg)} not configured")
                continue
            outcome, key = self._lookup(source, kid, now)
            if outcome == "fetch":
                if source not in needs:
                    needs.append(source)
                continue
            if outcome == "unavailable":
                unavailable = unavailable or source
                continue
            if key is None:
                reasons.append(f"{entry.key}: no key for kid {_short(kid)}")
                continue
            problem = _signature_problem(jwt, key)
            if problem:
                reasons.append(f"{entry.key}: {problem}")
                continue
            prefix = f"external:{entry.subject_prefix}:" if entry.subject_prefix else "external:"
            return Principal("service", f"{prefix}{sub}", source=f"jwks:{entry.url}",
                             expires_at=float(claims["exp"]),
                             **_restricted_access(entry.restrictions, plugin_id))
        if needs:
            raise KeysNeeded(needs[0], tuple(needs))
        if unavailable is not None:
            raise self._unavailable(unavailable, now)
        raise fail("; ".join(reasons) or "no candidate source")

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
    def _may_fetch(self, source: KeySource, now: float) -> bool:
        """True when a fetch is in flight (join it) or the source may be fetched again."""
        if source._in_flight is not None:
            return True
        if source.attempted_at is None:
            return True
        elapsed = now - source.attempted_at
        return not 0 <= elapsed < self.settings.refetch_interval

    async def refresh(self, source: KeySource) -> None:
        """Fetch ``source``'s JWKS, at most once per refetch interval; never raises for I/O.

        Concurrent callers share one in-flight fetch. A failed fetch keeps the keys held.
        """
        if self._closed:
            return
        if source.kind == "plugin" and not source.pinned:
            plugin_id = source.name.removeprefix("plugin:")
            if self._plugin_sources.get(plugin_id) is not source:
                self._remember_plugin_source(plugin_id, source)  # evicted meanwhile
        future = source._in_flight
        if future is None:
            now = self._clock()
            if not self._may_fetch(source, now):
                return
            source.attempted_at = now
            future = asyncio.ensure_future(self._fetch(source))
            source._in_flight = future
        await asyncio.shield(future)

    async def _fetch(self, source: KeySource) -> None:
        kind: Literal["unavailable", "not_found"] = "unavailable"
        try:
            async with asyncio.timeout(self.settings.jwks_timeout):
                document = await self._download(source)
            keys = parse_jwks(document, source.algorithms)
        except _FetchFailed as exc:
            reason, kind = exc.reason, exc.kind
        except TimeoutError:
            reason = f"timed out after {self.settings.jwks_timeout:g}s"
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"[:200]
        except (ValueError, RecursionError) as exc:
            reason = f"invalid JWKS: {exc}"[:200]
        except asyncio.CancelledError:
            self._record_failure(source, "fetch cancelled", "unavailable")
            raise
        except Exception as exc:  # a fetch must never take the verifier down
            reason = f"unexpected {type(exc).__name__}"
            log.exception("Unexpected error fetching JWKS from %s", source.url)
        else:
            source.set_keys(keys, self._clock())
            self.stats["jwks_fetch_ok"] += 1
            log.info("Fetched %d key(s) from %s", len(keys), source.url)
            return
        finally:
            source._in_flight = None
        self._record_failure(source, reason, kind)

    def _record_failure(self, source: KeySource, reason: str,
                        kind: Literal["unavailable", "not_found"]) -> None:
        source.failure, source.failure_kind = reason, kind
        self.stats["jwks_fetch_failed"] += 1
        log.warning("Failed to fetch JWKS from %s: %s (keeping %d cached key(s))",
                    source.url, reason, len(source.keys))

    async def _download(self, source: KeySource) -> Any:
        async with self._client_factory() as client, client.stream("GET", source.url) as response:
            if response.status_code in (404, 410):
                raise _FetchFailed(f"HTTP {response.status_code}", "not_found")
            if response.status_code != 200:
                raise _FetchFailed(f"HTTP {response.status_code}", "unavailable")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > _MAX_JWKS_BYTES:
                    raise _FetchFailed(f"response larger than {_MAX_JWKS_BYTES} bytes",
                                       "unavailable")
        return json.loads(bytes(body))

    async def prefetch(self) -> None:
        """Fetch every statically known source (user, discovery plugins, jwks); never raises."""
        try:
            static = [s for s in self.sources if s.pinned]
            await asyncio.gather(*(self.refresh(s) for s in static), return_exceptions=True)
        except Exception:
            log.exception("JWKS prefetch failed")

    async def authenticate(self, token: str, plugin_id: str) -> Principal:
        """``verify`` plus the KeysNeeded protocol, looping while new sources need a fetch."""
        for _ in range(len(self._jwks) + 2):
            try:
                return self.verify(token, plugin_id)
            except KeysNeeded as needed:
                await asyncio.gather(*(self.refresh(s) for s in needed.sources))
        return self.verify(token, plugin_id)

    def close(self) -> None:
        self._closed = True
        for source in self.sources:
            if source._in_flight is not None:
                try:
                    source._in_flight.cancel()
                except RuntimeError:  # its event loop is already closed
                    source._in_flight = None

    async def aclose(self) -> None:
        self._closed = True
        pending = [s._in_flight for s in self.sources if s._in_flight is not None]
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class _FetchFailed(Exception):
    """A JWKS fetch failed; ``kind`` "not_found" (404/410) means the source is up but has no
    keys for us, so a missing key is a credential failure rather than an outage."""

    def __init__(self, reason: str, kind: Literal["unavailable", "not_found"]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
