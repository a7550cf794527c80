"""Development keys and Backstage-shaped tokens, for the demo and the tests.

Nothing here is used to verify anything: :mod:`stagedoor.auth` only ever sees the public
halves, through a JWKS served over HTTP.

- :func:`generate_dev_keys` creates (or loads) two ES256 keys, one standing in for the auth
  backend (user tokens), one for a calling plugin (plugin tokens), as 0600 PEM files.
- :func:`mint_user_token`, :func:`mint_plugin_token`, :func:`mint_legacy_token` produce tokens
  shaped like the ones Backstage issues (header and claims).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

USER_TOKEN_TYPE = "vnd.backstage.user"
LIMITED_USER_TOKEN_TYPE = "vnd.backstage.limited-user"
PLUGIN_TOKEN_TYPE = "vnd.backstage.plugin"

AUTH_KEY_FILE = "auth-signing-key.pem"
PLUGIN_KEY_FILE = "plugin-signing-key.pem"

PrivateKey = (ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
              | ed448.Ed448PrivateKey)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def algorithm_for(key: PrivateKey) -> str:
    """The JWS algorithm a private key signs with (ES256 for P-256, RS256 for RSA, ...)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return "EdDSA"
    raise TypeError(f"unsupported key type {type(key).__name__}")


def public_jwk(key: PrivateKey, *, kid: str | None = None,
               alg: str | None = None) -> dict[str, Any]:
    """The public JWK of ``key`` with ``kid`` (default: its RFC 7638 thumbprint), alg, use."""
    algorithm = alg or algorithm_for(key)
    impl = jwt.get_algorithm_by_name(algorithm)
    data = impl.to_jwk(key.public_key(), as_dict=True)
    data = {k: v for k, v in data.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    data["kid"] = kid or thumbprint(data)
    data["alg"] = algorithm
    data["use"] = "sig"
    return data


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url)."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


@dataclass(frozen=True)
class DevKey:
    """A private signing key, its ``kid`` and where it is stored (if anywhere)."""

    private_key: PrivateKey
    kid: str
    path: Path | None = None

    @property
    def algorithm(self) -> str:
        return algorithm_for(self.private_key)

    def public_jwk(self) -> dict[str, Any]:
        return public_jwk(self.private_key, kid=self.kid)

    def jwks(self) -> dict[str, Any]:
        """The JWK set to serve for this key: ``{"keys": [public JWK]}``."""
        return {"keys": [self.public_jwk()]}

    @classmethod
    def generate(cls, algorithm: str = "ES256", *, kid: str | None = None) -> DevKey:
        """A fresh in-memory key: ES256/ES384/ES512, RS256 (2048-bit) or EdDSA (Ed25519)."""
        if algorithm in ("ES256", "ES384", "ES512"):
            curve = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
            key: PrivateKey = ec.generate_private_key(curve[algorithm]())
        elif algorithm.startswith(("RS", "PS")):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "EdDSA":
            key = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unsupported algorithm {algorithm}")
        return cls.from_private_key(key, kid=kid)

    @classmethod
    def from_private_key(cls, key: PrivateKey, *, kid: str | None = None,
                         path: Path | None = None) -> DevKey:
        return cls(key, kid or thumbprint(public_jwk(key, kid="-")), path)


@dataclass(frozen=True)
class DevKeys:
    """The two development keys: ``user`` (auth backend) and ``plugin`` (a calling plugin)."""

    user: DevKey
    plugin: DevKey

    def user_jwks(self) -> dict[str, Any]:
        """What ``<auth base URL>/.well-known/jwks.json`` serves."""
        return self.user.jwks()

    def plugin_jwks(self) -> dict[str, Any]:
        """What ``<plugin base URL>/.backstage/auth/v1/jwks.json`` serves."""
        return self.plugin.jwks()


def _write_private(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_or_create(path: Path) -> DevKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError(f"{path}: expected an EC P-256 (ES256) private key")
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return DevKey.from_private_key(key, path=path)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return DevKey.from_private_key(key, path=path)


def generate_dev_keys(directory: Path) -> DevKeys:
    """Create (or load, if present) the auth and plugin ES256 keys in ``directory`` (0600)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return DevKeys(user=_load_or_create(directory / AUTH_KEY_FILE),
                   plugin=_load_or_create(directory / PLUGIN_KEY_FILE))


def _key_and_kid(key: DevKey | PrivateKey, kid: str | None) -> tuple[PrivateKey, str]:
    if isinstance(key, DevKey):
        return key.private_key, kid or key.kid
    return key, kid or DevKey.from_private_key(key).kid


def _sign(header: dict[str, Any], claims: dict[str, Any], key: PrivateKey, alg: str) -> str:
    """Compact JWS with exactly this header (in this order) and these claims."""
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
    signature = jwt.get_algorithm_by_name(alg).sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{_b64url(signature)}"


def mint_user_token(key: DevKey | PrivateKey, *, issuer: str,
                    subject: str = "user:default/jane", ownership: list[str] | None = None,
                    ttl: int = 3600, kid: str | None = None,
                    extra_claims: dict[str, Any] | None = None,
                    now: float | None = None) -> str:
    """A user token as the auth backend issues it.

    Header ``{alg, kid, typ: vnd.backstage.user}``; claims ``iss, sub, ent, aud: backstage,
    iat, exp, uip``. ``uip`` is the signature of the matching limited user token, as Backstage
    computes it. ``ownership`` defaults to ``[subject]``.
    """
    private, kid = _key_and_kid(key, kid)
    alg = algorithm_for(private)
    iat = int(time.time() if now is None else now)
    exp = iat + ttl
    limited = _sign({"typ": LIMITED_USER_TOKEN_TYPE, "alg": alg, "kid": kid},
                    {"sub": subject, "iat": iat, "exp": exp}, private, alg)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "ent": list(ownership) if ownership is not None else [subject],
        "aud": "backstage",
        "iat": iat,
        "exp": exp,
        "uip": limited.rsplit(".", 1)[1],
    }
    claims.update(extra_claims or {})
    return _sign({"alg": alg, "kid": kid, "typ": USER_TOKEN_TYPE}, claims, private, alg)


def mint_plugin_token(key: DevKey | PrivateKey, *, subject_plugin: str, target_plugin: str,
                      ttl: int = 3600, kid: str | None = None,
                      now: float | None = None) -> str:
    """A plugin-to-plugin token: header ``{typ: vnd.backstage.plugin, alg, kid}``, claims
    ``sub`` (calling plugin), ``aud`` (target plugin), ``iat``, ``exp``."""
    private, kid = _key_and_kid(key, kid)
    alg = algorithm_for(private)
    iat = int(time.time() if now is None else now)
    return _sign({"typ": PLUGIN_TOKEN_TYPE, "alg": alg, "kid": kid},
                 {"sub": subject_plugin, "aud": target_plugin, "iat": iat, "exp": iat + ttl},
                 private, alg)


def mint_legacy_token(secret_b64: str, *, ttl: int | None = 3600,
                      now: float | None = None) -> str:
    """A legacy service-to-service token: HS256 over the base64 secret, ``sub:
    backstage-server``, ``exp`` after ``ttl`` seconds (no ``exp`` at all when ttl is None)."""
    text = secret_b64.replace("-", "+").replace("_", "/").rstrip("=")
    secret = base64.b64decode(text + "=" * (-len(text) % 4))
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": "backstage-server"}
    if ttl is not None:
        claims["exp"] = issued + ttl
    return _sign({"alg": "HS256"}, claims, secret, "HS256")  # type: ignore[arg-type]
