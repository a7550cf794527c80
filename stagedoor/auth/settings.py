"""Everything the credential verifier reads from config, parsed and validated once per load.

Keys read (docs/credentials.md lists them with their defaults): ``backend.baseUrl`` and
``discovery.endpoints`` (where key sets are fetched), ``backend.auth.externalAccess`` (static,
legacy and jwks entries, with ``accessRestrictions``), the deprecated ``backend.auth.keys``, and
``stagedoor.auth.*`` (token kinds on/off, leeway, cache sizes, key-set timeouts). Every problem
raises :class:`~stagedoor.config.ConfigError` naming the key and the file that set it.
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

from ..config import Config, ConfigError, MissingConfigError

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
        """Read the settings; raises ConfigError / MissingConfigError naming the key."""
        user_tokens = config.get_bool("stagedoor.auth.userTokens", True)
        plugin_tokens = config.get_bool("stagedoor.auth.pluginTokens", True)
        base_url = None
        if user_tokens or plugin_tokens or config.has("backend.baseUrl"):
            base_url = _read_url(config, "backend.baseUrl",
                                 config.require_string("backend.baseUrl"))
        refetch = _number(config, "stagedoor.auth.jwksRefetchIntervalSeconds", 5.0, 1.0, 3600.0)
        read: dict[str, Any] = dict(
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
        static, legacy, jwks = _read_external_access(config)  # after the keys above
        return cls(**read, static=static, legacy=legacy, jwks=jwks)


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
        if not isinstance(plugin, str) or not is_plugin_id(plugin):
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


def is_plugin_id(value: str) -> bool:
    """Backstage's plugin id convention: lower-case letters, digits, dashes; a letter first."""
    return len(value) <= _MAX_PLUGIN_ID_LENGTH and PLUGIN_ID_PATTERN.fullmatch(value) is not None
