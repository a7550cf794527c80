"""What a running sidecar holds: config, gateway settings, policies and the token verifier.

Built once at boot (and again on reload); the addons only read it. Swapping ``policies`` is a
single attribute assignment, so a request sees either the old or the new set, never a mix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, ConfigError, load_config
from .errors import SECURITY_HEADERS
from .permissions import Authorizer
from .policy import PolicySet, load_policies
from .tokens import AuthSettings, TokenVerifier

log = logging.getLogger("stagedoor")

DEFAULT_REDACTED_QUERY_KEYS = ("token", "access_token", "id_token", "api_key", "apikey", "key",
                               "secret", "password", "signature", "sig", "code")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    principal_header: str = "x-stagedoor-principal"
    principal_type_header: str = "x-stagedoor-principal-type"
    security_headers: dict[str, str] = field(default_factory=lambda: dict(SECURITY_HEADERS))
    access_log: bool = True
    redacted_query_keys: frozenset[str] = frozenset(DEFAULT_REDACTED_QUERY_KEYS)
    trust_forwarded_headers: bool = False

    @classmethod
    def from_config(cls, config: Config) -> GatewaySettings:
        headers: dict[str, str] = {}
        sec = config.get("stagedoor.securityHeaders", True)
        if sec is True or sec is None:
            headers = dict(SECURITY_HEADERS)
        elif sec is False:
            headers = {}
        elif isinstance(sec, dict):
            headers = dict(SECURITY_HEADERS)
            for name, value in sec.items():
                if value is None or value is False:
                    headers.pop(name, None)
                else:
                    headers[str(name)] = str(value)
        else:
            raise ConfigError("Invalid type in config for key 'stagedoor.securityHeaders': use "
                              "true, false or a mapping of header names to values")
        principal = config.get_string("stagedoor.identityHeaders.principal",
                                      "x-stagedoor-principal")
        principal_type = config.get_string("stagedoor.identityHeaders.principalType",
                                           "x-stagedoor-principal-type")
        assert principal is not None and principal_type is not None
        redacted = {str(k).lower() for k in config.get_list("stagedoor.accessLog.redactQueryKeys")}
        return cls(
            principal_header=principal.lower(),
            principal_type_header=principal_type.lower(),
            security_headers=headers,
            access_log=config.get_bool("stagedoor.accessLog.enabled", True),
            redacted_query_keys=frozenset(redacted | set(DEFAULT_REDACTED_QUERY_KEYS)),
        )


@dataclass
class Runtime:
    config_files: list[str]
    policy_dir: str
    config: Config
    settings: GatewaySettings
    policies: PolicySet
    verifier: TokenVerifier | None
    authorizer: Authorizer | None = None

    @classmethod
    def load(cls, config_files: list[str], policy_dir: str) -> Runtime:
        """Load everything; raises ConfigError / MissingConfigError / PolicyLoadError."""
        config = load_config(config_files)
        settings = GatewaySettings.from_config(config)
        policies = load_policies(Path(policy_dir), config)
        auth_settings = AuthSettings.from_config(config)
        verifier = TokenVerifier(auth_settings)
        authorizer = Authorizer.from_config(config, _permission_base_url(auth_settings))
        return cls(config_files, policy_dir, config, settings, policies, verifier, authorizer)


def _permission_base_url(settings: AuthSettings) -> str | None:
    """Where a Backstage permission backend is (discovery of 'permission'), if known."""
    try:
        return settings.base_url_for("permission")
    except ConfigError:
        return None
