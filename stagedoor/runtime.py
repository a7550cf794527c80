"""What a running sidecar holds: one frozen :class:`State` per load, swapped as one reference.

:func:`load_state` reads the files, validates them and derives everything a request needs
(encoded security headers, OpenAPI documents, limits) once; :class:`Runtime` holds the current
state and swaps it whole on reload. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import identity
from .auth import AuthSettings, TokenVerifier
from .config import Config, ConfigError, load_config, related
from .edge import EdgeSettings
from .errors import SECURITY_HEADERS
from .forwarding import ForwardingPolicy
from .logsetup import LOG_FORMATS, parse_level
from .openapi import ServedDocuments
from .permissions import Authorizer
from .policy import PolicyLoadError, PolicySet, load_policies, parse_duration, policy_files
from .ratelimit import RateLimiter, RateLimitSettings
from .signing import KEY_STORE_KEY, Signer, SigningSettings

log = logging.getLogger("stagedoor")

DEFAULT_REDACTED_QUERY_KEYS = ("token", "access_token", "id_token", "api_key", "apikey", "key",
                               "secret", "password", "signature", "sig", "code", "jwt",
                               "bearer", "authorization", "auth", "refresh_token",
                               "client_secret")
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9464"
DEFAULT_GRACE_PERIOD = 10.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may send, and when an answer is streamed (``stagedoor.limits``).

    Defaults follow Node's HTTP server, which a Backstage backend runs on: 16 KiB of request
    head, 60 s to send it. 0 disables a limit.
    """

    max_header_bytes: int = 16384      # maxHeaderBytes: request line + header fields -> 431
    max_header_count: int = 100        # maxHeaderCount -> 431
    max_body_bytes: int = 10 << 20     # maxBodyBytes -> 413
    header_timeout: float = 60.0       # headerTimeoutSeconds: then the connection is closed
    stream_response_bytes: int = 1 << 20  # streamResponseBytes: larger answers are streamed

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        def number(key: str, default: float) -> float:  # range: the schema's
            return limit_number(config, f"stagedoor.limits.{key}", default)

        d = cls()  # the defaults (slots: no class attributes to read them from)
        with config.collecting():
            return cls(
                max_header_bytes=int(number("maxHeaderBytes", d.max_header_bytes)),
                max_header_count=int(number("maxHeaderCount", d.max_header_count)),
                max_body_bytes=int(number("maxBodyBytes", d.max_body_bytes)),
                header_timeout=number("headerTimeoutSeconds", d.header_timeout),
                stream_response_bytes=int(number("streamResponseBytes",
                                                 d.stream_response_bytes)),
            )


def limit_number(config: Config, key: str, default: float) -> float:
    """A ``stagedoor.limits`` number: type and range are the schema's; a value it refused (or
    NaN) is reported and the default used."""
    value = config.get_number(key, default)
    if any(related(key, other) for other, _ in config.reported()):
        return default
    if value != value:  # NaN
        config.invalid(key, "must be a number, got NaN")
        return default
    return value


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    principal_header: str = "x-stagedoor-principal"
    principal_type_header: str = "x-stagedoor-principal-type"
    security_headers: dict[str, str] = field(default_factory=lambda: dict(SECURITY_HEADERS))
    access_log: bool = True
    redacted_query_keys: frozenset[str] = frozenset(DEFAULT_REDACTED_QUERY_KEYS)
    trust_forwarded_headers: bool = False
    limits: Limits = field(default_factory=Limits)
    #: connection limits and request-head rules (stagedoor/edge.py, stagedoor/head.py)
    edge: EdgeSettings = field(default_factory=EdgeSettings)

    @classmethod
    def from_config(cls, config: Config) -> GatewaySettings:
        with config.collecting():
            return cls._read(config)

    @classmethod
    def _read(cls, config: Config) -> GatewaySettings:
        headers: dict[str, str] = {}
        sec = config.get("stagedoor.securityHeaders", True)
        if sec is True or sec is None:
            headers = dict(SECURITY_HEADERS)
        elif sec is False or config.get_bool("stagedoor.securityHeaders", True) is False:
            headers = {}
        elif isinstance(sec, dict):
            headers = dict(SECURITY_HEADERS)
            for name, value in sec.items():
                if value is None or value is False:
                    headers.pop(name, None)
                else:
                    headers[str(name)] = str(value)
        else:  # "true" (an ${ENV} value); anything else the schema refused
            headers = dict(SECURITY_HEADERS)
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
            limits=Limits.from_config(config),
            edge=EdgeSettings.from_config(config),
        )


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); raises ValueError."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True, slots=True)
class OperationsSettings:
    """How the process is operated: logs, admin listener, reload and shutdown (``stagedoor.*``).

    ``admin_listen`` None means no admin listener. The admin address applies at start only; the
    rest takes effect on reload too.
    """

    log_level: str = "info"
    log_format: str = "json"
    admin_listen: tuple[str, int] | None = ("127.0.0.1", 9464)
    watch: bool = True
    grace_period: float = DEFAULT_GRACE_PERIOD

    @classmethod
    def from_config(cls, config: Config) -> OperationsSettings:
        """Level and format are checked by the schema; the address and the duration here."""
        with config.collecting():
            return cls._read(config)

    @classmethod
    def _read(cls, config: Config) -> OperationsSettings:
        level = config.get_string("stagedoor.log.level", "info") or "info"
        try:
            parse_level(level)
        except ValueError as exc:
            config.invalid("stagedoor.log.level", str(exc))
            level = "info"
        fmt = (config.get_string("stagedoor.log.format", "json") or "json").strip().lower()
        if fmt not in LOG_FORMATS:
            config.invalid("stagedoor.log.format",
                           f"use one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
            fmt = "json"
        admin: tuple[str, int] | None = None
        raw_admin = config.get("stagedoor.admin.listen", DEFAULT_ADMIN_LISTEN)
        if raw_admin is not False and str(raw_admin).strip().lower() not in ("off", "false", ""):
            try:
                admin = parse_listen(str(raw_admin))
            except ValueError as exc:
                config.invalid("stagedoor.admin.listen", str(exc))
        listen = config.get_string("stagedoor.listen")
        if listen is not None:  # read by the CLI at start; checked here with the rest
            try:
                parse_listen(listen)
            except ValueError as exc:
                config.invalid("stagedoor.listen", str(exc))
        grace_raw = config.get("stagedoor.shutdown.gracePeriod", DEFAULT_GRACE_PERIOD)
        try:
            grace = 0.0 if grace_raw in (0, "0", "0s") else parse_duration(grace_raw)
        except ValueError as exc:
            config.invalid("stagedoor.shutdown.gracePeriod", str(exc))
            grace = DEFAULT_GRACE_PERIOD
        return cls(
            log_level=level.strip().lower(),
            log_format=fmt,
            admin_listen=admin,
            watch=config.get_bool("stagedoor.reload.watch", True),
            grace_period=grace,
        )


@dataclass(frozen=True, slots=True)
class State:
    """Everything one load produced, parsed, validated and derived, never changed afterwards.

    A request captures the state once, at its start, and reads only that: a reload builds a
    new ``State`` (off the event loop) and :class:`Runtime` swaps one reference. The verifier
    and the authorizer hold caches (keys, tokens, permission answers); they are carried over
    from the previous state when what they are built from did not change.
    """

    config: Config
    settings: GatewaySettings
    operations: OperationsSettings
    policies: PolicySet
    auth: AuthSettings
    verifier: TokenVerifier
    authorizer: Authorizer
    authorizer_inputs: tuple[Any, ...]  # what the authorizer was built from (reuse if equal)
    openapi: ServedDocuments
    #: The header policy (security headers encoded once, extension points); identity
    #: headers come from :meth:`identity_for`.
    forwarding: ForwardingPolicy
    fingerprint: str = ""  # input_fingerprint() of the files, taken before reading them
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    #: Holds the rate-limit store chosen at load; carried over while the store settings are
    #: equal, so counts (in-process) and connections (Redis) survive reloads.
    limiter: RateLimiter = field(default_factory=RateLimiter)
    #: The plugins' signing keys (kept across reloads while their settings are equal).
    signer: Signer = field(default_factory=Signer)
    #: Each forwarding route's identity mutator, by ``id(route)`` (see :meth:`identity_for`).
    identities: dict[int, identity.Mutator] = field(default_factory=dict)
    default_identity: identity.Mutator = field(default_factory=identity.PlainHeaders)

    def identity_for(self, route: Any) -> identity.Mutator:
        """How the caller reaches ``route``'s upstream (``upstream.identity``)."""
        return self.identities.get(id(route), self.default_identity)

    @property
    def limits(self) -> Limits:
        return self.settings.limits

    @property
    def security_headers(self) -> dict[str, str]:
        return self.settings.security_headers


def load_state(config_files: Sequence[str], policy_dir: str,
                previous: State | None = None) -> State:
    """Read, validate and derive a :class:`State`; no network, no event loop: safe in a thread.

    With ``previous``, its verifier and authorizer (and their caches) are kept when the
    settings they are built from are equal. Config problems are collected, not raised one by
    one: any raise one :class:`ConfigError` whose ``problems`` list every config problem and
    every policy problem, each as ``file:line: message``; policy problems alone raise
    :class:`PolicyLoadError`.
    """
    fingerprint = input_fingerprint(config_files, policy_dir)
    config = load_config(list(config_files), strict=False)
    # Every settings reader reports into one list (the schema's findings first), and the
    # policies are loaded even when the config has problems: one run says everything.
    with config.collecting(raise_at_exit=False) as problems:
        settings = GatewaySettings.from_config(config)
        operations = OperationsSettings.from_config(config)
        auth = AuthSettings.from_config(config)
        signing = config.guard(KEY_STORE_KEY, lambda: SigningSettings.from_config(config),
                               SigningSettings())
        ratelimit = config.guard("backend.rateLimit",
                                 lambda: RateLimitSettings.from_config(config),
                                 RateLimitSettings())
        Authorizer.check_config(config)
    try:
        policies = load_policies(Path(policy_dir), config)
    except PolicyLoadError as exc:
        if not problems:
            raise
        error = config.error(problems)
        raise ConfigError(str(error) + "".join(f"\n{p}" for p in exc.problems),
                          [*error.problems, *(str(p) for p in exc.problems)]) from None
    if problems:
        raise config.error(problems)
    if previous is not None and previous.signer.settings == signing:
        signer = previous.signer  # same keys: tokens already out stay valid
    else:
        signer = Signer.from_environment(signing)
    signer.prepare(sorted(policies.plugins))
    permission_url = _permission_base_url(auth)
    auth_url = _base_url(auth, "auth")
    inputs = (repr(config.get("stagedoor.permissions")), permission_url, auth_url, id(signer))
    if previous is not None and previous.authorizer_inputs == inputs:
        authorizer = previous.authorizer
    else:
        authorizer = Authorizer.from_config(config, permission_url, auth_url, signer)
    default_identity = identity.PlainHeaders(settings.principal_header,
                                             settings.principal_type_header)
    identities = _identities(policies, signer, default_identity)
    if previous is not None and previous.auth == auth:
        verifier = previous.verifier
    else:
        verifier = TokenVerifier(auth)
    forwarding = ForwardingPolicy.from_settings(settings.security_headers)
    if previous is not None and previous.limiter.spec == ratelimit.store:
        limiter = previous.limiter
    else:
        limiter = RateLimiter(ratelimit.store)
    return State(config, settings, operations, policies, auth, verifier, authorizer, inputs,
                 ServedDocuments.build(policies, config), forwarding, fingerprint,
                 ratelimit=ratelimit, limiter=limiter, signer=signer, identities=identities,
                 default_identity=default_identity)


def _identities(policies: PolicySet, signer: Signer,
                default: identity.Mutator) -> dict[int, identity.Mutator]:
    """Build every route's ``upstream.identity`` mutator once; a bad one is a ConfigError
    naming the route."""
    out: dict[int, identity.Mutator] = {}
    for policy in policies.plugins.values():
        for route in policy.routes:
            spec = getattr(route.upstream, "identity", None) if route.upstream else None
            if spec is None:
                continue
            try:
                out[id(route)] = identity.build(spec, signer, default)
            except ValueError as exc:
                raise ConfigError(f"{route.file}:{route.line}: upstream.identity: {exc}") \
                    from None
    return out


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What :meth:`Runtime.apply` changed."""

    plugins: int
    routes: int
    verifier_replaced: bool
    authorizer_replaced: bool
    restart_needed: tuple[str, ...] = ()  # config keys that changed but apply at start only


def input_fingerprint(config_files: Sequence[str], policy_dir: str) -> str:
    """A digest of every file a load reads (through symlinks): equal digests, equal inputs.

    Lets a watcher ignore events that changed nothing it reads (editor swap files, a ConfigMap
    swap to identical content) without parsing anything.
    """
    digest = hashlib.sha256()
    root = Path(policy_dir)
    try:
        files = [Path(f) for f in config_files] + policy_files(root)
    except OSError as exc:
        files = [Path(f) for f in config_files]
        digest.update(f"policy dir: {exc}".encode())
    for path in files:
        digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0")
        try:
            data = path.read_bytes()
        except OSError as exc:
            data = f"unreadable: {exc.strerror}".encode()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


class Runtime:
    """What a running sidecar holds: where it loads from, and the one current :class:`State`.

    ``runtime.state`` is the only thing a reload changes, in one assignment on the event
    loop's thread; read it once per request and keep using what you read.
    """

    def __init__(self, config_files: Sequence[str], policy_dir: str, state: State) -> None:
        self.config_files = list(config_files)
        self.policy_dir = policy_dir
        self.state = state
        #: Token stats of verifiers replaced by reloads, so counters built on them never go down.
        self.retired_token_stats: dict[str, int] = {}

    @classmethod
    def load(cls, config_files: Sequence[str], policy_dir: str) -> Runtime:
        """Load everything; raises ConfigError / MissingConfigError / PolicyLoadError."""
        return cls(config_files, policy_dir, load_state(config_files, policy_dir))

    def apply(self, state: State) -> ReloadReport:
        """Swap in a state built by :func:`load_state` (with this runtime's current state as
        ``previous``). Call on the event loop's thread.

        One assignment: a request sees the old or the new state, never a mix, and requests in
        flight finish on the state they captured. A replaced verifier is not closed: requests
        in flight may still be awaiting its fetch.
        """
        old = self.state
        restart: tuple[str, ...] = ()
        if old.config.get("stagedoor.listen") != state.config.get("stagedoor.listen"):
            restart += ("stagedoor.listen",)
        if old.operations.admin_listen != state.operations.admin_listen:
            restart += ("stagedoor.admin.listen",)
        if old.operations.watch != state.operations.watch:
            restart += ("stagedoor.reload.watch",)
        self.state = state  # -- the swap --
        if state.limiter is not old.limiter:  # another store: counts move on, old one closes
            state.limiter.inherit_stats(old.limiter)
            old.limiter.close_later()
        verifier_replaced = state.verifier is not old.verifier
        if verifier_replaced:
            for name, value in old.verifier.stats.items():
                self.retired_token_stats[name] = self.retired_token_stats.get(name, 0) + value
        return ReloadReport(len(state.policies.plugins), state.policies.route_count,
                            verifier_replaced=verifier_replaced,
                            authorizer_replaced=state.authorizer is not old.authorizer,
                            restart_needed=restart)


def _permission_base_url(settings: AuthSettings) -> str | None:
    """Where a Backstage permission backend is (discovery of 'permission'), if known."""
    return _base_url(settings, "permission")


def _base_url(settings: AuthSettings, plugin_id: str) -> str | None:
    """Where a Backstage plugin is (discovery), if known."""
    try:
        return settings.base_url_for(plugin_id)
    except ConfigError:
        return None
