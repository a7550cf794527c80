"""Credential verification: Backstage user and plugin tokens, and external access tokens.

Reproduces the credential checks of a Backstage backend (docs/credentials.md) without any
mitmproxy dependency. The parts:

- ``settings``: what config says (``AuthSettings.from_config``), validated once per load;
- ``jwks``: key sets, one async ``JwksClient`` per endpoint (shaped like PyJWT's ``PyJWKClient``);
- ``strategies``: one class per credential kind (user, plugin, static, legacy, jwks), each
  verifying with ``jwt.decode``;
- ``verifier``: ``TokenVerifier``, which picks the strategies at load and caches verified tokens;
- ``model``: ``Principal``, the errors, the messages, ``extract_bearer``.
"""

from .jwks import JwksClient, KeySource, SigningKey, SigningKeyNotFound, load_jwk, parse_jwks
from .model import (
    LEGACY_TOKEN_SUBJECT,
    LIMITED_USER_TOKEN_TYPE,
    MSG_ILLEGAL_TOKEN,
    MSG_MISSING_CREDENTIALS,
    MSG_PLUGIN_FAILED,
    MSG_SOURCE_UNAVAILABLE,
    MSG_USER_FAILED,
    PLUGIN_TOKEN_TYPE,
    USER_TOKEN_AUDIENCE,
    USER_TOKEN_TYPE,
    CredentialError,
    KeysNeeded,
    KeySourceUnavailable,
    Principal,
    extract_bearer,
)
from .settings import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_ALGORITHMS,
    EXTERNAL_ACCESS_KEY,
    OLD_KEYS_KEY,
    PLUGIN_ID_PATTERN,
    AccessRestriction,
    AuthSettings,
    DiscoveryEndpoint,
    JwksAccess,
    LegacyAccess,
    StaticAccess,
    is_plugin_id,
)
from .verifier import TokenVerifier

__all__ = [
    "ASYMMETRIC_ALGORITHMS", "DEFAULT_ALGORITHMS", "EXTERNAL_ACCESS_KEY", "LEGACY_TOKEN_SUBJECT",
    "LIMITED_USER_TOKEN_TYPE", "MSG_ILLEGAL_TOKEN", "MSG_MISSING_CREDENTIALS",
    "MSG_PLUGIN_FAILED", "MSG_SOURCE_UNAVAILABLE", "MSG_USER_FAILED", "OLD_KEYS_KEY",
    "PLUGIN_ID_PATTERN", "PLUGIN_TOKEN_TYPE", "USER_TOKEN_AUDIENCE", "USER_TOKEN_TYPE",
    "AccessRestriction", "AuthSettings", "CredentialError", "DiscoveryEndpoint", "JwksAccess",
    "JwksClient", "KeySource", "KeySourceUnavailable", "KeysNeeded", "LegacyAccess", "Principal",
    "SigningKey", "SigningKeyNotFound", "StaticAccess", "TokenVerifier", "extract_bearer",
    "is_plugin_id", "load_jwk", "parse_jwks",
]
