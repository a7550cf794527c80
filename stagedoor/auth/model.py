"""What verification gives and raises: the principal, the three outcomes that are not a
principal, the messages a client sees, and the Bearer token of a request."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .jwks import JwksClient

USER_TOKEN_TYPE = "vnd.backstage.user"
LIMITED_USER_TOKEN_TYPE = "vnd.backstage.limited-user"
PLUGIN_TOKEN_TYPE = "vnd.backstage.plugin"
USER_TOKEN_AUDIENCE = "backstage"
LEGACY_TOKEN_SUBJECT = "backstage-server"

# The messages of a Backstage backend (docs/credentials.md); the reason stays in the log.
MSG_MISSING_CREDENTIALS = "Missing credentials"
MSG_ILLEGAL_TOKEN = "Illegal token"
MSG_USER_FAILED = "Failed user token verification"
MSG_PLUGIN_FAILED = "Failed plugin token verification"
MSG_SOURCE_UNAVAILABLE = "Unable to verify credentials: a key source is unavailable"

_BEARER_PATTERN = re.compile(r"Bearer +(\S+)", re.IGNORECASE | re.ASCII)


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
    """Verification needs a key-set (re)fetch of ``source`` first: await
    ``TokenVerifier.refresh(source)`` (each of ``sources``), then verify again."""

    def __init__(self, source: JwksClient, sources: tuple[JwksClient, ...] = ()) -> None:
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
