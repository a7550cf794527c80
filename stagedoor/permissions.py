"""Permission rules: which principal may use a route's named permission.

Rules are an ordered list (in a plugin's policy under ``permissions:`` and in the shared
``policies/permissions.yaml``); the first rule whose permission and conditions match decides,
and nothing matching means deny::

    permissions:
      - permission: insights.service.read        # exact name or glob (insights.*)
        effect: allow                            # allow | deny | delegate
        when:                                    # every condition given must hold
          principal: user                        # user | service
          user: user:default/*                   # entity ref glob (user principals)
          memberOf: [group:default/payments]     # any of these (membership: see below)
          service: plugin:catalog                # subject glob (service principals)
          resource: payments-*                   # glob on the route's resource parameter
        enforce: false                           # dry-run: log what it would do, then ignore it

``effect: delegate`` asks a Backstage permission backend (``POST <permission base>/authorize``)
the way a Backstage plugin does: with a plugin token of the route's own plugin (``aud:
permission``, ``obo`` the calling user), never with the caller's token. Answers are cached
briefly; an unreachable backend is a deny. Service callers get Backstage's answer without a
call (``ServerPermissionClient``: a service principal is allowed within its access
restrictions, which the pipeline has already applied).

``memberOf`` reads the user's ownership refs, first found wins: the static map
``stagedoor.permissions.membership`` (an override), the token's ``ent`` claim, then the auth
backend's ``/v1/userinfo`` (``stagedoor/userinfo.py``; cached per token, 503 when it cannot
answer). Without an auth backend a principal owns just itself.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import outbound
from .auth import Principal
from .config import Config
from .minting import MintError, OnBehalfOf, limited_user_token, plugin_token
from .signing import Signer
from .userinfo import UserInfoClient

log = logging.getLogger("stagedoor.permissions")

EFFECTS = ("allow", "deny", "delegate")


def _glob(pattern: str) -> re.Pattern[str]:
    """Case-sensitive glob (``*``, ``?``, ``[...]``), anchored."""
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True, slots=True)
class Condition:
    principal: str | None = None
    user: re.Pattern[str] | None = None
    member_of: frozenset[str] | None = None
    service: re.Pattern[str] | None = None
    resource: re.Pattern[str] | None = None

    def holds(self, principal: Principal | None,
              groups: frozenset[str] | Callable[[], frozenset[str]],
              resource: str | None) -> bool:
        """``groups`` may be a callable: asked only when a ``memberOf`` is left to check (it
        may need the auth backend)."""
        if self.principal is not None and (principal is None or principal.kind != self.principal):
            return False
        if self.user is not None and (principal is None or principal.kind != "user"
                                      or not self.user.match(principal.subject)):
            return False
        if self.service is not None and (principal is None or principal.kind != "service"
                                         or not self.service.match(principal.subject)):
            return False
        if self.resource is not None and (resource is None
                                          or self.resource.match(resource) is None):
            return False
        if self.member_of is not None:
            owned = groups() if callable(groups) else groups
            return bool(self.member_of & owned)
        return True


@dataclass(frozen=True, slots=True)
class PermissionRule:
    permission: str
    effect: str
    condition: Condition
    enforce: bool
    file: str
    line: int
    _permission_re: re.Pattern[str] = field(repr=False, compare=False,
                                            default=re.compile(""))

    @classmethod
    def build(cls, permission: str, effect: str, condition: Condition, enforce: bool, file: str,
              line: int) -> PermissionRule:
        return cls(permission, effect, condition, enforce, file, line, _glob(permission))

    def applies_to(self, permission: str) -> bool:
        return self._permission_re.match(permission) is not None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(slots=True)
class PermissionOutcome:
    """The verdict for one permission check, and how it was reached."""

    allowed: bool
    rule: PermissionRule | None  # None: no rule matched (default deny)
    delegated: bool = False
    shadow: list[tuple[PermissionRule, str]] = field(default_factory=list)  # dry-run verdicts
    detail: str = ""


class DelegationNeeded(Exception):
    """A rule delegates to the permission backend and no cached answer exists: the caller
    awaits :meth:`Authorizer.resolve` and decides again."""

    def __init__(self, permission: str, plugin_id: str | None = None) -> None:
        super().__init__(permission)
        self.permission = permission
        self.plugin_id = plugin_id  # whose plugin token asks (set by decide)
        self.principal: Principal | None = None  # on whose behalf (set by decide)


def parse_rules(node: list[Any], file: str, lines: list[int],
                problems: list[tuple[int, str]]) -> list[PermissionRule]:
    """Rule dicts (with their lines) -> rules; problems collected as (line, message).

    Structure is the schema's (``permissionRule`` in ``policy.schema.json``, the same check
    the policy loader runs, with the same messages); a rule it refuses is reported and skipped.
    What is left here is building the globs."""
    from .policyschema import structure_errors  # the schema module imports little, but late

    rules: list[PermissionRule] = []
    for item, line in zip(node, lines, strict=False):
        errors = structure_errors(item, "permissionRule")
        if errors:
            problems.extend((line, message) for _, _, message in errors)
            continue
        when = item.get("when") or {}
        member_of = when.get("memberOf")
        if isinstance(member_of, str):
            member_of = [member_of]
        condition = Condition(
            principal=when.get("principal"),
            user=_glob(str(when["user"])) if "user" in when else None,
            member_of=frozenset(member_of) if member_of is not None else None,
            service=_glob(str(when["service"])) if "service" in when else None,
            resource=_glob(str(when["resource"])) if "resource" in when else None,
        )
        rules.append(PermissionRule.build(item["permission"], item["effect"], condition,
                                          item.get("enforce", True), file, line))
    return rules


def evaluate(rules: list[PermissionRule], permission: str, principal: Principal | None,
             groups: frozenset[str] | Callable[[], frozenset[str]], resource: str | None,
             delegated: Callable[[], bool | None] | None = None) -> PermissionOutcome:
    """First enforced matching rule wins; dry-run rules are recorded and skipped.

    ``delegated`` gives the permission backend's cached answer (None: not known yet, which
    raises :class:`DelegationNeeded`); without it a delegating rule denies. ``groups`` (or
    the callable giving them, asked at most once) are the principal's ownership refs.
    """
    shadow: list[tuple[PermissionRule, str]] = []
    if callable(groups):
        lookup, known = groups, []

        def groups() -> frozenset[str]:
            if not known:
                known.append(lookup())
            return known[0]

    for rule in rules:
        if not rule.applies_to(permission) or not rule.condition.holds(principal, groups,
                                                                       resource):
            continue
        effect = rule.effect
        if effect == "delegate":
            answer = delegated() if delegated is not None else False
            if answer is None:
                raise DelegationNeeded(permission)
            effect = "allow" if answer else "deny"
        if not rule.enforce:
            shadow.append((rule, effect))
            continue
        return PermissionOutcome(effect == "allow", rule, rule.effect == "delegate", shadow)
    return PermissionOutcome(False, None, False, shadow, "no rule matched (default deny)")


#: Where a principal's ownership refs came from (``stagedoor explain`` shows it).
MEMBERSHIP_SOURCES = ("map", "token", "userinfo", "subject")


class Authorizer:
    """Asks a Backstage permission backend, with a short bounded cache of its answers, and
    knows the principals' ownership refs (for ``memberOf``)."""

    def __init__(self, permission_base_url: str | None, *, cache_ttl: float = 10.0,
                 cache_size: int = 10_000, timeout: float = 2.0,
                 membership: dict[str, frozenset[str]] | None = None,
                 signer: Signer | None = None,
                 userinfo: UserInfoClient | None = None) -> None:
        self.base_url = permission_base_url.rstrip("/") if permission_base_url else None
        self.membership = membership or {}
        self.signer = signer
        self.userinfo = userinfo
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.timeout = timeout
        self._cache: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self.stats = {"delegated": 0, "cached": 0, "unreachable": 0}

    def membership_of(self, principal: Principal | None,
                      token: str | None = None) -> tuple[frozenset[str], str]:
        """(ownership refs, where they came from). May raise ``MembershipNeeded`` (ask the
        auth backend, then decide again) or ``MembershipUnavailable`` (503)."""
        if principal is None:
            return frozenset(), "subject"
        mapped = self.membership.get(principal.subject)
        if mapped is not None:
            return mapped, "map"
        if principal.ownership:
            return frozenset({principal.subject, *principal.ownership}), "token"
        if principal.kind == "user" and self.userinfo is not None and token is not None \
                and not principal.source.startswith("explain"):  # a stand-in has no token
            return self.userinfo.cached(token, principal.subject,
                                        principal.expires_at), "userinfo"
        return frozenset({principal.subject}), "subject"

    def groups_for(self, principal: Principal | None) -> frozenset[str]:
        """Ownership refs known without asking anyone (map, token, the subject itself)."""
        if principal is None:
            return frozenset()
        mapped = self.membership.get(principal.subject)
        if mapped is not None:
            return mapped
        if principal.ownership:
            return frozenset({principal.subject, *principal.ownership})
        return frozenset({principal.subject})

    @staticmethod
    def check_config(config: Config) -> None:
        """``stagedoor.permissions.*``: the schema checks all of it (types, ranges); nothing
        semantic is left. Reading it here reports what a Config made from data got wrong."""
        with config.collecting():
            config.get_mapping("stagedoor.permissions.membership")
            for key in ("cacheSeconds", "timeoutSeconds", "userinfo.timeoutSeconds",
                        "userinfo.cacheSize", "userinfo.retryAfterSeconds"):
                config.get_number(f"stagedoor.permissions.{key}", 0.0)
            config.get_bool("stagedoor.permissions.userinfo.enabled", True)

    @classmethod
    def from_config(cls, config: Config, permission_base_url: str | None,
                    auth_base_url: str | None = None,
                    signer: Signer | None = None) -> Authorizer:
        """Build from ``stagedoor.permissions.*`` (checked by :meth:`check_config`)."""
        membership: dict[str, frozenset[str]] = {}
        raw = config.get_mapping("stagedoor.permissions.membership")
        for subject, refs in raw.items():
            refs = [refs] if isinstance(refs, str) else refs
            if isinstance(refs, list):  # else the schema refused it
                membership[str(subject)] = frozenset({str(subject), *map(str, refs)})
        userinfo = None
        if auth_base_url and config.get_bool("stagedoor.permissions.userinfo.enabled", True):
            userinfo = UserInfoClient(
                auth_base_url,
                timeout=config.get_number("stagedoor.permissions.userinfo.timeoutSeconds", 2.0),
                cache_size=int(config.get_number(
                    "stagedoor.permissions.userinfo.cacheSize", 10_000)),
                retry_after=config.get_number(
                    "stagedoor.permissions.userinfo.retryAfterSeconds", 2.0))
        return cls(permission_base_url,
                   cache_ttl=config.get_number("stagedoor.permissions.cacheSeconds", 10.0),
                   timeout=config.get_number("stagedoor.permissions.timeoutSeconds", 2.0),
                   membership=membership, signer=signer, userinfo=userinfo)

    @staticmethod
    def _key(token: str | None, permission: str) -> tuple[str, str]:
        digest = hashlib.sha256((token or "").encode()).hexdigest()
        return digest, permission

    def cached(self, token: str | None, permission: str) -> bool | None:
        key = self._key(token, permission)
        entry = self._cache.get(key)
        if entry is None:
            return None
        allowed, expires = entry
        if expires < time.monotonic():
            self._cache.pop(key, None)
            return None
        self.stats["cached"] += 1
        return allowed

    def _store(self, key: tuple[str, str], allowed: bool, ttl: float) -> None:
        self._cache[key] = (allowed, time.monotonic() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def resolve(self, token: str | None, permission: str,
                      plugin_id: str | None = None,
                      principal: Principal | None = None) -> bool:
        """Ask the backend (once per key at a time); deny when it cannot be asked."""
        key = self._key(token, permission)
        pending = self._inflight.get(key)
        if pending is not None:
            return await pending
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            allowed, ttl = await self._ask(token, permission, plugin_id, principal)
            self._store(key, allowed, ttl)
            future.set_result(allowed)
            return allowed
        finally:
            self._inflight.pop(key, None)
            if not future.done():
                future.set_result(False)

    def _credentials(self, token: str | None, plugin_id: str | None,
                     principal: Principal | None) -> str | None:
        """What authenticates the question: this plugin's own plugin token to the permission
        backend, ``obo`` the calling user; the caller's token only without a signer."""
        if self.signer is None or plugin_id is None:
            return token
        obo: OnBehalfOf | None = None
        if token is not None and (principal is None or principal.kind == "user"):
            obo = limited_user_token(token)
        return plugin_token(self.signer.ring(plugin_id), "permission", obo)

    async def _ask(self, token: str | None, permission: str, plugin_id: str | None = None,
                   principal: Principal | None = None) -> tuple[bool, float]:
        if principal is not None and principal.kind == "service" and self.signer is not None:
            # Backstage's ServerPermissionClient: service principals are not asked about
            # (their access restrictions were applied before the rules ran).
            return True, self.cache_ttl
        self.stats["delegated"] += 1
        if self.base_url is None or token is None:
            log.warning("permission %s delegated but %s: deny", permission,
                        "no permission backend is configured" if token else "no caller token")
            return False, 1.0
        try:
            credentials = self._credentials(token, plugin_id, principal)
        except MintError as exc:
            log.warning("permission %s delegated but no plugin token can act for the caller "
                        "(%s): deny", permission, exc)
            return False, 1.0
        item_id = str(uuid.uuid4())
        body = {"items": [{"id": item_id, "permission": {"type": "basic", "name": permission,
                                                         "attributes": {}}}]}
        try:
            async with asyncio.timeout(self.timeout):
                resp = await outbound.client().post(
                    f"{self.base_url}/authorize", json=body, timeout=outbound.timeout(self.timeout),
                    headers={"Authorization": f"Bearer {credentials}"})
            if resp.status_code != 200:
                raise ValueError(f"status {resp.status_code}")
            items = resp.json().get("items", [])
            result = next(i.get("result") for i in items if i.get("id") == item_id)
            if result not in ("ALLOW", "DENY"):
                raise ValueError(f"unexpected result {result!r}")
            return result == "ALLOW", self.cache_ttl
        except Exception as exc:  # unreachable, slow, garbage: fail closed
            self.stats["unreachable"] += 1
            log.warning("permission backend %s/authorize failed for %s (%s): deny",
                        self.base_url, permission, type(exc).__name__ + (f": {exc}" if
                                                                        str(exc) else ""))
            return False, 1.0
