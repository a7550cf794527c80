"""Tokens stagedoor signs: Backstage plugin tokens, and signed identity assertions.

**Plugin tokens** are built exactly as ``@backstage/backend-defaults`` builds them
(``DefaultPluginTokenHandler.issueToken``)::

    header  {"typ":"vnd.backstage.plugin","alg":"ES256","kid":<current key>}
    payload {"sub":<own plugin id>,"aud":<target plugin id>,"iat":..,"exp":..,"obo":<limited>}

``exp`` is ``iat`` + the key duration, capped at the user token's ``exp`` when acting on behalf
of a user. ``obo`` is the user's *limited* token: the user token's ``typ``/``alg``/``kid`` header
and ``sub``/``iat``/``exp`` payload re-encoded, with the user token's ``uip`` claim (the
signature the auth backend made over exactly those bytes) as its signature
(``UserTokenHandler.createLimitedUserToken``). A receiving Backstage plugin verifies the plugin
token with stagedoor's published JWKS and the ``obo`` token with the auth backend's.

**Identity assertions** (``identity: {type: jwt}`` on a route) are short-lived JWTs for an
upstream that is not Backstage, signed with the same key and so verifiable with the same JWKS::

    header  {"typ":"vnd.stagedoor.identity+jwt","alg":"ES256","kid":..}
    payload {"iss":"plugin:<id>","sub":<principal>,"principal_type":"user"|"service",
             "aud":<audience>,"iat":..,"exp":<= iat+60,"jti":<unique>,"request_id":..}

The ``typ`` keeps an assertion from ever being taken for a Backstage token.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any

from .signing import KeyRing

PLUGIN_TOKEN_TYPE = "vnd.backstage.plugin"
USER_TOKEN_TYPE = "vnd.backstage.user"
LIMITED_USER_TOKEN_TYPE = "vnd.backstage.limited-user"
IDENTITY_TOKEN_TYPE = "vnd.stagedoor.identity+jwt"
#: Longest life of a signed identity assertion.
MAX_ASSERTION_TTL = 60


class MintError(Exception):
    """A token cannot be made for this caller (e.g. a user token without ``uip``)."""


@dataclass(frozen=True, slots=True)
class OnBehalfOf:
    """A user's limited token and when it expires (epoch seconds)."""

    token: str
    expires_at: int


def _b64url_json(value: dict[str, Any]) -> str:
    # JSON.stringify: no spaces, non-ASCII as UTF-8 (the bytes the auth backend signed)
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_segment(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, TypeError) as exc:
        raise MintError("the user token is not a JWT") from exc
    if not isinstance(value, dict):
        raise MintError("the user token is not a JWT")
    return value


def limited_user_token(user_token: str) -> OnBehalfOf:
    """The limited form of a (verified) Backstage user token, as Backstage derives it."""
    parts = user_token.split(".")
    if len(parts) != 3:
        raise MintError("the user token is not a JWT")
    header, payload = _decode_segment(parts[0]), _decode_segment(parts[1])
    exp = payload.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise MintError("the user token has no exp")
    typ = header.get("typ")
    if not typ or typ == LIMITED_USER_TOKEN_TYPE:
        return OnBehalfOf(user_token, int(exp))
    if typ != USER_TOKEN_TYPE:
        raise MintError("Failed to create limited user token, invalid token type")
    uip = payload.get("uip")
    if not isinstance(uip, str) or not uip:
        raise MintError("Failed to create limited user token, missing user identity proof")
    limited_header: dict[str, Any] = {"typ": LIMITED_USER_TOKEN_TYPE, "alg": header.get("alg")}
    if header.get("kid"):
        limited_header["kid"] = header["kid"]
    limited_payload = {"sub": payload.get("sub"), "iat": payload.get("iat"), "exp": exp}
    token = ".".join((_b64url_json(limited_header), _b64url_json(limited_payload), uip))
    return OnBehalfOf(token, int(exp))


def plugin_token(ring: KeyRing, target_plugin_id: str,
                 on_behalf_of: OnBehalfOf | None = None) -> str:
    """A plugin token from ``ring``'s plugin to ``target_plugin_id`` (``obo`` when given)."""
    iat = int(ring.clock())
    exp = iat + int(ring.settings.token_ttl)
    if on_behalf_of is not None:
        exp = min(exp, on_behalf_of.expires_at)
    claims: dict[str, Any] = {"sub": ring.plugin_id, "aud": target_plugin_id, "iat": iat,
                              "exp": exp}
    if on_behalf_of is not None:
        claims["obo"] = on_behalf_of.token
    return ring.sign(claims, PLUGIN_TOKEN_TYPE)


def identity_assertion(ring: KeyRing, *, subject: str, principal_type: str, audience: str,
                       request_id: str, ttl: int = MAX_ASSERTION_TTL) -> str:
    """A signed, short-lived statement of who the caller is, for an upstream."""
    iat = int(ring.clock())
    claims = {"iss": f"plugin:{ring.plugin_id}", "sub": subject,
              "principal_type": principal_type, "aud": audience, "iat": iat,
              "exp": iat + max(1, min(int(ttl), MAX_ASSERTION_TTL)),
              "jti": secrets.token_urlsafe(16), "request_id": request_id}
    return ring.sign(claims, IDENTITY_TOKEN_TYPE)
