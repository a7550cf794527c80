"""How the verified caller reaches the upstream: a route's ``upstream.identity``.

============  ===========================================================================
``headers``   (the default) the principal in ``x-stagedoor-principal`` and
              ``x-stagedoor-principal-type`` (names from ``stagedoor.identityHeaders``);
              only as good as the network between stagedoor and the upstream.
``jwt``       a short-lived signed assertion (``sub``, ``principal_type``, ``aud``, ``iat``,
              ``exp`` <= 60 s, ``jti``, ``request_id``) in ``header`` (default
              ``X-Stagedoor-Identity``), signed with the plugin's key and verifiable with its
              published JWKS (``/api/<pluginId>/.backstage/auth/v1/jwks.json``).
``backstage`` a Backstage plugin token from this plugin to ``plugin`` in ``Authorization``,
              ``obo`` the caller when the caller is a user: for upstreams that are Backstage
              plugins themselves (``${backend.baseUrl}/api/catalog/...``).
``none``      nothing: the upstream learns nothing about the caller.
============  ===========================================================================

Each kind is an *identity mutator*: it names every header it may set (the gateway drops those
from what the client sent, always) and makes the header fields for one request. Pure: the
signing keys are passed in, nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .auth import Principal
from .minting import MintError, identity_assertion, limited_user_token, plugin_token
from .signing import Signer

Fields = tuple[tuple[bytes, bytes], ...]
KINDS = ("headers", "jwt", "backstage", "none")
DEFAULT_JWT_HEADER = "X-Stagedoor-Identity"
DEFAULT_TTL = 60


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class IdentityError(Exception):
    """No identity can be made for this caller: 401 ``AuthenticationError`` with ``message``
    (Backstage answers the same when it cannot act on behalf of a caller)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Caller:
    """What a mutator may use of one request."""

    principal: Principal | None
    token: str | None  # the caller's verified bearer token (never logged)
    request_id: str
    plugin_id: str


class Mutator(Protocol):
    kind: str
    names: frozenset[bytes]  # lowercase names it may set

    def fields(self, caller: Caller) -> Fields: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PlainHeaders:
    principal_header: str = "x-stagedoor-principal"
    principal_type_header: str = "x-stagedoor-principal-type"
    kind: str = "headers"
    names: frozenset[bytes] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", frozenset({_enc(self.principal_header.lower()),
                                                     _enc(self.principal_type_header.lower())}))

    def fields(self, caller: Caller) -> Fields:
        if caller.principal is None:
            return ()
        return ((_enc(self.principal_header), _enc(caller.principal.subject)),
                (_enc(self.principal_type_header), _enc(caller.principal.kind)))

    def describe(self) -> str:
        return f"plain headers {self.principal_header}, {self.principal_type_header}"


@dataclass(frozen=True, slots=True)
class NoIdentity:
    kind: str = "none"
    names: frozenset[bytes] = frozenset()

    def fields(self, caller: Caller) -> Fields:
        return ()

    def describe(self) -> str:
        return "none (identity headers switched off)"


@dataclass(frozen=True, slots=True)
class SignedAssertion:
    signer: Signer = field(compare=False)
    audience: str
    header: str = DEFAULT_JWT_HEADER
    ttl: int = DEFAULT_TTL
    kind: str = "jwt"
    names: frozenset[bytes] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", frozenset({_enc(self.header.lower())}))

    def fields(self, caller: Caller) -> Fields:
        if caller.principal is None:
            return ()
        token = identity_assertion(self.signer.ring(caller.plugin_id),
                                   subject=caller.principal.subject,
                                   principal_type=caller.principal.kind, audience=self.audience,
                                   request_id=caller.request_id, ttl=self.ttl)
        return ((_enc(self.header), _enc(token)),)

    def describe(self) -> str:
        return (f"signed JWT in {self.header} (aud {self.audience}, <= {self.ttl}s, verifiable "
                "with the plugin's JWKS)")


@dataclass(frozen=True, slots=True)
class BackstagePluginToken:
    signer: Signer = field(compare=False)
    target: str
    kind: str = "backstage"
    names: frozenset[bytes] = frozenset({b"authorization"})

    def fields(self, caller: Caller) -> Fields:
        obo = None
        if caller.principal is not None and caller.principal.kind == "user":
            if caller.token is None:
                raise IdentityError("User credentials is unexpectedly missing token")
            try:
                obo = limited_user_token(caller.token)
            except MintError as exc:
                raise IdentityError(str(exc)) from None
        token = plugin_token(self.signer.ring(caller.plugin_id), self.target, obo)
        return ((b"Authorization", b"Bearer " + _enc(token)),)

    def describe(self) -> str:
        return (f"Backstage plugin token to plugin '{self.target}' in Authorization "
                "(obo the caller when a user)")


def build(spec: Any, signer: Signer, default: PlainHeaders) -> Mutator:
    """The mutator of a route's ``upstream.identity`` (None: ``default``). ``spec`` has
    ``type`` and, per kind, ``header``/``audience``/``plugin``/``ttl`` (attributes or keys)."""
    if spec is None:
        return default

    def get(name: str) -> Any:
        return spec.get(name) if isinstance(spec, dict) else getattr(spec, name, None)

    kind = get("type")
    if kind == "headers":
        header = get("header")
        return default if not header else PlainHeaders(str(header),
                                                       default.principal_type_header)
    if kind == "none":
        return NoIdentity()
    if kind == "jwt":
        audience = get("audience")
        if not audience:
            raise ValueError("identity type jwt needs 'audience'")
        ttl = get("ttl")
        return SignedAssertion(signer, str(audience), str(get("header") or DEFAULT_JWT_HEADER),
                               int(ttl) if ttl else DEFAULT_TTL)
    if kind == "backstage":
        plugin = get("plugin")
        if not plugin:
            raise ValueError("identity type backstage needs 'plugin' (the target plugin id)")
        return BackstagePluginToken(signer, str(plugin))
    raise ValueError(f"unknown identity type {kind!r} (use one of {', '.join(KINDS)})")
