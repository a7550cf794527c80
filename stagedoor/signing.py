"""Plugin signing keys: what stagedoor signs its own tokens with, and the JWKS it publishes.

A Backstage plugin signs the tokens it sends (plugin tokens to other plugins) with a key of its
own and publishes the public half at ``/api/<pluginId>/.backstage/auth/v1/jwks.json``, where the
receiving plugin finds it through discovery. stagedoor does the same for each plugin it serves:

- **generated** (default, Backstage's ``database`` key store): an ES256 key per plugin, replaced
  every ``stagedoor.signing.keyDuration`` (default ``1h``, as in Backstage). A token lives at
  most one key duration, so a replaced key stays published for one more key duration (until
  every token it signed has expired), then disappears. Keys are derived from a random seed
  made at start (:class:`Seed`); the workers of ``run --workers N`` get the supervisor's seed
  and so publish and sign with the same keys.
- **static** (Backstage's ``backend.auth.pluginKeyStore: {type: static}``): key pairs read from
  PEM files (a Kubernetes Secret mounted into every replica, so replicas share them). The first
  key signs; every listed key is published. Rotating means listing a new key first and keeping
  the old one listed until its tokens have expired; removing a key revokes its tokens.

The JWKS document is rendered byte for byte as a Backstage backend renders it
(``{"keys":[{"kty":"EC","x":..,"y":..,"crv":"P-256","kid":..,"alg":"ES256"}]}``).

Pure: no network, no mitmproxy; the clock is injectable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .config import Config, ConfigError

KEY_STORE_KEY = "backend.auth.pluginKeyStore"
KEY_DURATION_KEY = "stagedoor.signing.keyDuration"
#: Backstage's plugin key duration (fixed at one hour in @backstage/backend-defaults).
DEFAULT_KEY_DURATION = 3600.0
JWKS_PATH = "/.backstage/auth/v1/jwks.json"
JWKS_CONTENT_TYPE = "application/json; charset=utf-8"

_CURVES: dict[str, tuple[type[ec.EllipticCurve], str, int]] = {
    "ES256": (ec.SECP256R1, "P-256", 32),
    "ES384": (ec.SECP384R1, "P-384", 48),
    "ES512": (ec.SECP521R1, "P-521", 66),
}


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_seconds(value: Any) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``1d`` -> seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.fullmatch(str(value))
    if not match:
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 15m, 1h)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public_key: ec.EllipticCurvePublicKey, kid: str, alg: str) -> dict[str, str]:
    """The public JWK in the member order Backstage publishes (``jose.exportJWK`` + kid, alg)."""
    _, crv, size = _CURVES[alg]
    numbers = public_key.public_numbers()
    return {"kty": "EC", "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")), "crv": crv, "kid": kid, "alg": alg}


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    private_key: ec.EllipticCurvePrivateKey | None  # None: published only (static, no private)
    jwk: dict[str, str]
    signs_until: float  # after this a new key signs (inf: static)
    published_until: float  # after this it leaves the JWKS (inf: static)


@dataclass(frozen=True, slots=True)
class StaticKeyFile:
    key_id: str
    public_key_file: str
    private_key_file: str | None
    algorithm: str
    digest: str  # of the files' content: equal settings, equal keys (reload compares)


@dataclass(frozen=True, slots=True)
class SigningSettings:
    """``backend.auth.pluginKeyStore`` and ``stagedoor.signing.*``."""

    key_duration: float = DEFAULT_KEY_DURATION
    static_keys: tuple[StaticKeyFile, ...] = ()  # empty: generated keys

    @property
    def token_ttl(self) -> float:
        """How long a plugin token lives at most (Backstage: one key duration)."""
        return self.key_duration

    @classmethod
    def from_config(cls, config: Config) -> SigningSettings:
        """Structure (store type, key entries, algorithms) is the schema's; the duration, the
        key files and the rules across entries are checked here, every problem reported."""
        with config.collecting():
            return cls._read(config)

    @classmethod
    def _read(cls, config: Config) -> SigningSettings:
        raw_duration = config.get(KEY_DURATION_KEY)
        duration = DEFAULT_KEY_DURATION
        if raw_duration is not None:
            try:
                duration = parse_seconds(raw_duration)
                if not 1 <= duration <= 7 * 86400:
                    raise ValueError("must be between 1s and 7d")
            except ValueError as exc:
                config.invalid(KEY_DURATION_KEY, str(exc))
                duration = DEFAULT_KEY_DURATION
        store = config.get_mapping(KEY_STORE_KEY)
        if store.get("type", "database") != "static":  # database: generated, rotated keys
            return cls(duration)
        static = store.get("static")
        keys = static.get("keys") if isinstance(static, Mapping) else None
        if not isinstance(keys, list) or not keys or not all(
                isinstance(item, Mapping) and isinstance(item.get("keyId"), str)
                and isinstance(item.get("publicKeyFile"), str) for item in keys):
            # The schema said what is wrong; Backstage's words when nothing reached it.
            config.report(f"{KEY_STORE_KEY}.static.keys", ConfigError(
                "At least one key pair must be provided in static.keys, when the static key "
                f"store type is used ('{KEY_STORE_KEY}.static.keys')"))
            return cls(duration)
        files = [_static_key(config, i, item) for i, item in enumerate(keys)]
        if files[0].private_key_file is None:
            config.report(f"{KEY_STORE_KEY}.static.keys[0]", ConfigError(
                "Private key for signing must be provided in the first key pair in static.keys "
                f"('{KEY_STORE_KEY}.static.keys[0].privateKeyFile')"))
        if len({f.key_id for f in files}) != len(files):
            config.report(f"{KEY_STORE_KEY}.static.keys", ConfigError(
                f"Duplicate keyId in '{KEY_STORE_KEY}.static.keys'"))
        return cls(duration, tuple(files))


def _static_key(config: Config, index: int, item: Mapping[str, Any]) -> StaticKeyFile:
    """One key pair entry (its structure checked by the schema); an unreadable file is
    reported."""
    where = f"{KEY_STORE_KEY}.static.keys[{index}]"
    key_id, public, private = item["keyId"], item["publicKeyFile"], item.get("privateKeyFile")
    alg = item.get("algorithm", "ES256")
    if alg not in _CURVES:
        config.invalid(f"{where}.algorithm", f"stagedoor signs with {', '.join(_CURVES)}, "
                                             f"got {alg!r}")
        alg = "ES256"
    digest = hashlib.sha256()
    for name, path in (("publicKeyFile", public), ("privateKeyFile", private)):
        if path is None:
            continue
        try:
            digest.update(Path(path).read_bytes())
        except OSError as exc:
            config.report(f"{where}.{name}", ConfigError(
                f"Cannot read '{where}' key file {path}: {exc.strerror}"))
    return StaticKeyFile(str(key_id), str(public), None if private is None else str(private),
                         str(alg), digest.hexdigest())


def _load_static(spec: StaticKeyFile) -> SigningKey:
    curve = _CURVES[spec.algorithm][0]
    try:
        public = serialization.load_pem_public_key(Path(spec.public_key_file).read_bytes())
        private = (serialization.load_pem_private_key(
            Path(spec.private_key_file).read_bytes(), password=None)
            if spec.private_key_file else None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"Cannot load signing key '{spec.key_id}': {exc}") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, curve):
        raise ConfigError(f"Signing key '{spec.key_id}' is not an {spec.algorithm} public key")
    if private is not None and (not isinstance(private, ec.EllipticCurvePrivateKey)
                                or private.public_key().public_numbers()
                                != public.public_numbers()):
        raise ConfigError(f"Signing key '{spec.key_id}': the private key does not match the "
                          "public key")
    return SigningKey(spec.key_id, spec.algorithm, private,
                      public_jwk(public, spec.key_id, spec.algorithm), float("inf"),
                      float("inf"))


#: Environment variable carrying the key seed from a ``--workers`` supervisor to its workers.
SEED_ENV = "STAGEDOOR_SIGNING_SEED"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass(frozen=True, slots=True)
class Seed:
    """Where generated keys come from: key *e* of a plugin is derived from the secret, the
    plugin id and the epoch number *e* (``floor(time / keyDuration)``). Processes sharing a
    seed (the workers of one ``--workers N`` supervisor) hold the same keys and rotate them at
    the same moments. ``since``: when the seed was made (no key before it ever signed)."""

    secret: bytes
    since: float

    @classmethod
    def new(cls, now: float | None = None) -> Seed:
        return cls(secrets.token_bytes(32), time.time() if now is None else now)

    def encode(self) -> str:
        return f"{self.secret.hex()}:{self.since:.0f}"

    @classmethod
    def decode(cls, text: str) -> Seed:
        secret, _, since = text.partition(":")
        value = bytes.fromhex(secret)
        if len(value) < 16:
            raise ValueError("seed too short")
        return cls(value, float(since or 0))

    def derive(self, label: str) -> bytes:
        return hmac.new(self.secret, label.encode(), hashlib.sha512).digest()


class KeyRing:
    """One plugin's signing keys: the current one and those still published."""

    def __init__(self, plugin_id: str, settings: SigningSettings,
                 clock: Callable[[], float] = time.time, seed: Seed | None = None) -> None:
        self.plugin_id = plugin_id
        self.settings = settings
        self.clock = clock
        self.seed = seed if seed is not None else Seed.new(clock())
        self._static: list[SigningKey] = [_load_static(spec) for spec in settings.static_keys]
        self._derived: dict[int, SigningKey] = {}
        self._jwks: tuple[tuple[str, ...], bytes] | None = None
        self._epoch: int | None = None
        self.rotations = 0
        self.current()

    def _epoch_of(self, when: float) -> int:
        return int(when // self.settings.key_duration)

    def _derive(self, epoch: int) -> SigningKey:
        key = self._derived.get(epoch)
        if key is None:
            label = f"stagedoor-plugin-key:{self.plugin_id}:{epoch}"
            scalar = int.from_bytes(self.seed.derive(label), "big") % (_P256_ORDER - 1) + 1
            private = ec.derive_private_key(scalar, ec.SECP256R1())
            kid = str(uuid.UUID(bytes=self.seed.derive("kid:" + label)[:16], version=4))
            duration = self.settings.key_duration
            signs_until = (epoch + 1) * duration
            key = SigningKey(kid, "ES256", private, public_jwk(private.public_key(), kid, "ES256"),
                             signs_until, signs_until + self.settings.token_ttl)
            self._derived[epoch] = key
        return key

    def current(self) -> SigningKey:
        """The key to sign with now (a new one each key duration)."""
        if self._static:
            return self._static[0]
        epoch = self._epoch_of(self.clock())
        if self._epoch != epoch:
            if self._epoch is not None:
                self.rotations += 1
            self._epoch = epoch
            for old in [e for e in self._derived if self._derived[e].published_until
                        <= self.clock()]:
                del self._derived[old]
        return self._derive(epoch)

    def published(self) -> list[SigningKey]:
        """Newest first: the current key and every earlier one (since the seed was made)
        whose tokens may still be alive."""
        if self._static:
            return list(self._static)
        now = self.clock()
        current = self.current()
        out = [current]
        epoch = self._epoch_of(now) - 1
        first = self._epoch_of(self.seed.since)
        while epoch >= first:
            key = self._derive(epoch)
            if key.published_until <= now:
                break
            out.append(key)
            epoch -= 1
        return out

    def jwks_document(self) -> bytes:
        """The JWKS as a Backstage backend serves it (``res.json({keys})``)."""
        keys = self.published()
        kids = tuple(k.kid for k in keys)
        if self._jwks is None or self._jwks[0] != kids:
            body = json.dumps({"keys": [k.jwk for k in keys]}, separators=(",", ":"),
                              ensure_ascii=False).encode()
            self._jwks = (kids, body)
        return self._jwks[1]

    def sign(self, claims: dict[str, Any], typ: str) -> str:
        """A compact JWS of ``claims`` with header ``{typ, alg, kid}`` (Backstage's order)."""
        key = self.current()
        assert key.private_key is not None  # the signing key always has its private half
        return jwt.encode(claims, key.private_key, algorithm=key.alg,
                          headers={"typ": typ, "kid": key.kid}, sort_headers=False)


@dataclass
class Signer:
    """The key rings of every plugin stagedoor serves (made on first use of a plugin id)."""

    settings: SigningSettings = field(default_factory=SigningSettings)
    clock: Callable[[], float] = time.time
    seed: Seed | None = None  # None: a new one (this process's own keys)
    rings: dict[str, KeyRing] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = Seed.new(self.clock())

    @classmethod
    def from_environment(cls, settings: SigningSettings) -> Signer:
        """With ``STAGEDOOR_SIGNING_SEED`` (set by a ``--workers`` supervisor): the keys every
        worker shares; else keys of this process alone."""
        text = os.environ.get(SEED_ENV)
        seed = None
        if text:
            try:
                seed = Seed.decode(text)
            except ValueError as exc:
                raise ConfigError(f"Invalid {SEED_ENV}: {exc}") from None
        return cls(settings, seed=seed)

    def ring(self, plugin_id: str) -> KeyRing:
        ring = self.rings.get(plugin_id)
        if ring is None:
            ring = self.rings[plugin_id] = KeyRing(plugin_id, self.settings, self.clock,
                                                   self.seed)
        return ring

    def prepare(self, plugin_ids: list[str]) -> None:
        """Make every plugin's key now (at start), not on its first request."""
        for plugin_id in plugin_ids:
            self.ring(plugin_id)


def jwks_plugin(path: str) -> str | None:
    """The plugin id of a JWKS request path ``/api/<pluginId>/.backstage/auth/v1/jwks.json``
    (exactly that, no query), else None."""
    if not path.startswith("/api/") or not path.endswith(JWKS_PATH):
        return None
    plugin_id = path[len("/api/"):-len(JWKS_PATH)]
    if not plugin_id or "/" in plugin_id or not plugin_id.replace("-", "").replace(
            "_", "").isalnum() or not plugin_id.isascii():
        return None
    return plugin_id
