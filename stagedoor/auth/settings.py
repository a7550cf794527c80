"""Everything the credential verifier reads from config, parsed and validated once per load.

Keys read (docs/credentials.md lists them with their defaults): ``backend.baseUrl`` and
``discovery.endpoints`` (where key sets are fetched), ``backend.auth.externalAccess`` (static,
legacy and jwks entries, with ``accessRestrictions``), the deprecated ``backend.auth.keys``, and
``stagedoor.auth.*`` (token kinds on/off, leeway, cache sizes, key-set timeouts). Their
structure is checked by ``stagedoor/schemas/config.schema.json``; this module keeps the
semantic checks (URL shapes, base64 secrets, algorithms, duplicates, cross-key rules) and
collects every problem (see :meth:`stagedoor.config.Config.collecting`), each naming the key and
the file that set it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, ConfigError
from ..config import related as _related

log = logging.getLogger("stagedoor.auth")

EXTERNAL_ACCESS_KEY = "backend.auth.externalAccess"
OLD_KEYS_KEY = "backend.auth.keys"

PLUGIN_ID_PATTERN = re.compile(r"[a-z][a-z0-9-]*")
_MAX_PLUGIN_ID_LENGTH = 100
_PLUGIN_ID_PLACEHOLDER = re.compile(r"\{\{\s*pluginId\s*\}\}")

#: Algorithms accepted for Backstage user and plugin tokens.
DEFAULT_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "EdDSA"}
)
#: Every algorithm a JWKS key may ever verify (asymmetric only, by construction).
ASYMMETRIC_ALGORITHMS = DEFAULT_ALGORITHMS | {"PS384", "PS512"}
_PERMISSION_ACTIONS = ("create", "read", "update", "delete")


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


@dataclass(frozen=True)
class AuthSettings:
    """Everything the verifier reads from config (see :meth:`from_config`); equal settings
    mean a reload can keep the verifier with its key and token caches."""

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
        """Read the settings. Structure (types, required keys, ranges) is the schema's
        (``config.schema.json``); this keeps the semantic checks. Every problem is collected
        (:meth:`Config.collecting`): alone it raises as itself (ConfigError /
        MissingConfigError naming the key), several raise as one listing them all."""
        with config.collecting():
            return cls._read(config)

    @classmethod
    def _read(cls, config: Config) -> AuthSettings:
        user_tokens = config.get_bool("stagedoor.auth.userTokens", True)
        plugin_tokens = config.get_bool("stagedoor.auth.pluginTokens", True)
        base_url = None
        if user_tokens or plugin_tokens or config.has("backend.baseUrl"):
            # Required while tokens are checked against the backend's keys (a cross-key rule).
            base_url = config.guard("backend.baseUrl", lambda: _read_url(
                config, "backend.baseUrl", config.require_string("backend.baseUrl")), None)
        refetch = _number(config, "stagedoor.auth.jwksRefetchIntervalSeconds", 5.0)
        max_age = _number(config, "stagedoor.auth.jwksMaxAgeSeconds", 600.0)
        if max_age < refetch:
            config.invalid("stagedoor.auth.jwksMaxAgeSeconds", "must be at least "
                           f"stagedoor.auth.jwksRefetchIntervalSeconds ({refetch:g}), "
                           f"got {max_age:g}")
        read: dict[str, Any] = dict(
            base_url=base_url,
            endpoints=_read_endpoints(config),
            user_tokens=user_tokens,
            plugin_tokens=plugin_tokens,
            leeway=_number(config, "stagedoor.auth.leewaySeconds", 5.0),
            max_token_bytes=int(_number(config, "stagedoor.auth.maxTokenBytes", 8192)),
            refetch_interval=refetch,
            jwks_timeout=_number(config, "stagedoor.auth.jwksTimeoutSeconds", 3.0),
            jwks_max_age=max(max_age, refetch),
            token_cache_size=int(_number(config, "stagedoor.auth.tokenCacheSize", 10_000)),
            token_cache_ttl=_number(config, "stagedoor.auth.tokenCacheSeconds", 300.0),
            max_plugin_sources=int(_number(config, "stagedoor.auth.maxPluginKeySources", 256)),
        )
        static, legacy, jwks = _read_external_access(config)  # after the keys above
        return cls(**read, static=static, legacy=legacy, jwks=jwks)


def _origin(config: Config, key: str) -> str:
    return config._origin(key)


def _invalid(config: Config, key: str, problem: str) -> ConfigError:
    return ConfigError(f"Invalid config value at '{key}' in '{_origin(config, key)}': {problem}")


def _number(config: Config, key: str, default: float) -> float:
    """A number the schema has checked (type and range); NaN/inf are refused here."""
    value = config.get_number(key, default)
    if not math.isfinite(value):
        config.invalid(key, f"must be a finite number, got {value:g}")
        return default
    return value


def _read_url(config: Config, key: str, value: Any) -> str:
    """An http(s) URL without whitespace (a shape the schema leaves to code); raises."""
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", value):
        raise _invalid(config, key, "must be an http(s) URL without whitespace")
    return value.rstrip("/")


def _read_endpoints(config: Config) -> tuple[DiscoveryEndpoint, ...]:
    result = []
    for i, item in enumerate(config.get_list("discovery.endpoints")):
        key = f"discovery.endpoints[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("plugins"), list):
            continue  # the schema said what is wrong with it
        target = item.get("target")
        if isinstance(target, str):
            internal = external = _read_target(config, f"{key}.target", target)
        elif isinstance(target, dict):
            internal = _read_target(config, f"{key}.target.internal", target.get("internal"))
            external = _read_target(config, f"{key}.target.external", target.get("external"))
        else:
            if target is None:  # the schema reports it too (Config made from data: here)
                config.missing(f"{key}.target")
            continue
        result.append(DiscoveryEndpoint(tuple(map(str, item["plugins"])), internal, external))
    return tuple(result)


def _read_target(config: Config, key: str, value: Any, template: bool = True) -> str | None:
    """A URL (with ``template``, a discovery target: ``{{pluginId}}`` allowed); None when
    absent or reported."""
    if value is None:
        return None
    try:
        text = str(value)
        _read_url(config, key, _PLUGIN_ID_PLACEHOLDER.sub("plugin", text) if template else text)
    except ConfigError as exc:
        config.report(key, exc)
        return None
    return str(value)


def _string_or_list(value: Any) -> frozenset[str] | None:
    """Backstage's readStringOrStringArrayFromConfig: split on spaces and commas, dedupe."""
    if value is None:
        return None
    raw = value if isinstance(value, list) else [value]
    values = frozenset(part for v in raw for part in re.split(r"[ ,]", str(v)) if part)
    return values or None


def _read_restrictions(config: Config, key: str,
                       entry: dict[str, Any]) -> tuple[AccessRestriction, ...] | None:
    items = entry.get("accessRestrictions")
    if not isinstance(items, list):
        return None  # absent, or the schema said what is wrong
    result: dict[str, AccessRestriction] = {}
    for j, item in enumerate(items):
        item_key = f"{key}.accessRestrictions[{j}]"
        plugin = item.get("plugin") if isinstance(item, dict) else None
        if not isinstance(plugin, str) or not is_plugin_id(plugin):
            continue  # the schema said what is wrong
        if plugin in result:
            config.invalid(item_key, f"accessRestrictions declared twice for '{plugin}'")
            continue
        permissions = _string_or_list(item.get("permission"))
        actions = None
        attribute = item.get("permissionAttribute")
        if isinstance(attribute, dict):
            actions = _string_or_list(attribute.get("action"))
            if actions and not actions <= set(_PERMISSION_ACTIONS):
                config.invalid(f"{item_key}.permissionAttribute.action",
                               "valid values are 'create', 'read', 'update', 'delete'")
                continue
        result[plugin] = AccessRestriction(plugin, permissions, actions)
    return tuple(result.values()) or None


def _decode_secret(config: Config, key: str, secret: str) -> bytes | None:
    """A base64 (or base64url) secret; None after reporting one that is not."""
    text = secret.replace("-", "+").replace("_", "/").rstrip("=")
    try:
        decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        config.invalid(key, "must be a valid base64 string")
        return None
    if not decoded:
        config.invalid(key, "must not be empty")
        return None
    return decoded


def _read_external_access(
    config: Config,
) -> tuple[tuple[StaticAccess, ...], tuple[LegacyAccess, ...], tuple[JwksAccess, ...]]:
    """The entries of ``backend.auth.externalAccess`` (and the deprecated ``keys``). The schema
    checked their structure (an entry it found wrong is skipped here); this checks what it
    cannot: base64 secrets, URL shapes, algorithms, the same token twice."""
    static: list[StaticAccess] = []
    legacy: list[LegacyAccess] = []
    jwks: list[JwksAccess] = []
    for i, entry in enumerate(config.get_list(EXTERNAL_ACCESS_KEY)):
        key = f"{EXTERNAL_ACCESS_KEY}[{i}]"
        opt = f"{key}.options"
        options = entry.get("options") if isinstance(entry, dict) else None
        if not isinstance(options, dict) or any(
                _related(key, other) for other, _ in config.reported()):
            continue  # the schema said what is wrong with it
        kind = entry.get("type")
        restrictions = _read_restrictions(config, key, entry)
        if kind == "static":
            token, subject = str(options.get("token")), str(options.get("subject"))
            digest = hashlib.sha256(token.encode("utf-8")).digest()
            if any(hmac.compare_digest(digest, s.digest) for s in static):
                config.invalid(f"{opt}.token", "the same static token is declared twice")
                continue
            static.append(StaticAccess(key, subject, digest, restrictions))
        elif kind == "legacy":
            secret = _decode_secret(config, f"{opt}.secret", str(options.get("secret")))
            if secret is not None:
                legacy.append(LegacyAccess(key, str(options.get("subject")), secret,
                                           restrictions))
        elif kind == "jwks":
            url = _read_target(config, f"{opt}.url", options.get("url"), template=False)
            url = url.rstrip("/") if url else None
            algorithms = _string_or_list(options.get("algorithm"))
            if algorithms and not algorithms <= ASYMMETRIC_ALGORITHMS:
                bad = ", ".join(sorted(algorithms - ASYMMETRIC_ALGORITHMS))
                config.invalid(f"{opt}.algorithm", f"unsupported algorithm(s) {bad}; "
                               f"allowed: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}")
                continue
            if url is None:
                continue
            prefix = options.get("subjectPrefix")
            jwks.append(JwksAccess(
                key=key,
                url=url,
                algorithms=algorithms or ASYMMETRIC_ALGORITHMS,
                issuers=_string_or_list(options.get("issuer")),
                audiences=_string_or_list(options.get("audience")),
                subject_prefix=str(prefix) if prefix is not None else None,
                restrictions=restrictions,
            ))
    old = config.get_list(OLD_KEYS_KEY)
    if old:
        log.warning("DEPRECATION WARNING: The %s config has been replaced by %s",
                    OLD_KEYS_KEY, EXTERNAL_ACCESS_KEY)
    for i, entry in enumerate(old):
        key = f"{OLD_KEYS_KEY}[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("secret"), str):
            continue  # the schema said what is wrong with it
        secret = _decode_secret(config, f"{key}.secret", entry["secret"])
        if secret is not None:
            legacy.append(LegacyAccess(key, "backstage-plugin", secret))
    return tuple(static), tuple(legacy), tuple(jwks)


def is_plugin_id(value: str) -> bool:
    """Backstage's plugin id convention: lower-case letters, digits, dashes; a letter first."""
    return len(value) <= _MAX_PLUGIN_ID_LENGTH and PLUGIN_ID_PATTERN.fullmatch(value) is not None
