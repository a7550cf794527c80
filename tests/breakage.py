"""The deliberate-breakage check of the credential code: each entry of BREAKAGES removes or
bends one deliberate behaviour of stagedoor/auth/ (or of the shared outbound client), and the
verifier's tests must fail for every one of them.

    .venv/bin/python -m tests.breakage            # all of them (a few minutes)
    .venv/bin/python -m tests.breakage 3 17       # only these (1-based)

Each breakage is applied to a copy of the repository in a temporary directory (never to the
work tree) and the tests in TESTS run there with ``pytest -x``. The script prints one line per
breakage and exits 1 if any breakage left every test passing. tests/test_breakage_list.py keeps
the list applicable: each ``old`` text must occur exactly once in its file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ("tests/test_tokens.py", "tests/test_auth_parts.py", "tests/test_outbound.py")
AUTH = "stagedoor/auth/"


@dataclass(frozen=True)
class Breakage:
    what: str  # the behaviour that is broken
    file: str
    edits: tuple[tuple[str, str], ...]  # (old, new): old occurs exactly once in the file


def b(what: str, file: str, *edits: tuple[str, str]) -> Breakage:
    return Breakage(what, file, edits)


BREAKAGES: tuple[Breakage, ...] = (
    # -- reading the request and the token
    b("two Authorization headers accepted", AUTH + "model.py",
      ("if len(authorization_values) > 1:", "if False:")),
    b("Bearer scheme case-sensitive", AUTH + "model.py",
      ("re.IGNORECASE | re.ASCII", "re.ASCII")),
    b("oversized tokens parsed", AUTH + "verifier.py",
      ("if len(raw) > self.settings.max_token_bytes:", "if False:")),
    b("non-canonical base64url accepted", AUTH + "strategies.py",
      ("return rest == 0 or (rest != 1 and segment[-1] in _CANONICAL_LAST[rest])",
       "return rest != 1")),
    b("jku header followed (not refused)", AUTH + "strategies.py",
      ('REFUSED_HEADERS = ("jku", "x5u", "jwk", "crit", "b64")',
       'REFUSED_HEADERS = ("x5u", "jwk", "crit", "b64")')),
    b("kid of any JSON type", AUTH + "strategies.py",
      ('if not isinstance(token.header.get("kid", ""), str):', "if False:")),
    b("time claims of any JSON type", AUTH + "strategies.py",
      ("if value is not None and not _is_number(value):", "if False:")),
    # -- jwt.decode arguments
    b("exp not checked", AUTH + "strategies.py",
      ('"verify_exp": True,', '"verify_exp": False,')),
    b("no leeway", AUTH + "strategies.py",
      ('"leeway": self.leeway}', '"leeway": 0}')),
    b("jwt.decode on the system clock, not the verifier's", AUTH + "strategies.py",
      ("super()._validate_exp(payload, self._clock(), leeway)",
       "super()._validate_exp(payload, now, leeway)")),
    b("user tokens without exp", AUTH + "strategies.py",
      ('ClaimRules(("exp", "iat", "iss", "aud", "sub"), USER_TOKEN_AUDIENCE,',
       'ClaimRules(("iat", "iss", "aud", "sub"), USER_TOKEN_AUDIENCE,')),
    b("user token audience not checked", AUTH + "strategies.py",
      ('ClaimRules(("exp", "iat", "iss", "aud", "sub"), USER_TOKEN_AUDIENCE,',
       'ClaimRules(("exp", "iat", "iss", "aud", "sub"), None,')),
    b("user token issuer not checked", AUTH + "strategies.py",
      ("issuers, leeway)\n\n    def verify", "None, leeway)\n\n    def verify")),
    b("user sub need not be a user ref", AUTH + "strategies.py",
      ("if not isinstance(sub, str) or not _USER_REF_PATTERN.fullmatch(sub):",
       "if not isinstance(sub, str):")),
    b("user principal without expiry", AUTH + "strategies.py",
      ('return Principal("user", sub, ownership=tuple(ent or ()), source="user",\n'
       '                         expires_at=float(claims["exp"]))',
       'return Principal("user", sub, ownership=tuple(ent or ()), source="user")')),
    b("algorithm taken from the token", AUTH + "strategies.py",
      ("claims = self.decode(token, key.key, key.algorithms, self.rules)",
       'claims = self.decode(token, key.key, {str(token.header.get("alg"))}, self.rules)')),
    b("plugin token audience not checked", AUTH + "strategies.py",
      ('rules = ClaimRules(("exp", "iat", "sub", "aud"), plugin_id, None, self.leeway)',
       'rules = ClaimRules(("exp", "iat", "sub", "aud"), None, None, self.leeway)')),
    b("plugin sub need not be a plugin id", AUTH + "strategies.py",
      ("if not isinstance(sub, str) or not is_plugin_id(sub):", "if not isinstance(sub, str):")),
    b("new plugin key sources unlimited", AUTH + "strategies.py",
      ("if self._window_count >= NEW_PLUGIN_SOURCES_PER_INTERVAL:", "if False:")),
    b("learnt plugin key sources unbounded", AUTH + "strategies.py",
      ("while len(self.learnt) > self.settings.max_plugin_sources:", "while False:")),
    b("static tokens compared without compare_digest", AUTH + "strategies.py",
      ("if entry is None or not hmac.compare_digest(entry.digest, digest):",
       "if entry is None:")),
    b("legacy tokens without exp", AUTH + "strategies.py",
      ('self.rules = ClaimRules(("exp",), None, None, leeway)',
       "self.rules = ClaimRules((), None, None, leeway)")),
    b("jwks entry algorithm not enforced", AUTH + "strategies.py",
      ("if not isinstance(alg, str) or alg not in entry.algorithms:",
       "if not isinstance(alg, str):")),
    b("jwks subjectPrefix ignored", AUTH + "strategies.py",
      ('prefix = f"external:{entry.subject_prefix}:" if entry.subject_prefix else "external:"',
       'prefix = "external:"')),
    b("access restrictions of another plugin allow everything", AUTH + "strategies.py",
      ("permissions = actions = frozenset()", "permissions = actions = None")),
    # -- key sets
    b("a JWK's declared alg ignored", AUTH + "jwks.py",
      ("        algorithms = frozenset({declared})\n", "        pass\n")),
    b("no cooldown between fetches", AUTH + "jwks.py",
      ("return not 0 <= now - self.attempted_at < self.cooldown", "return True")),
    b("concurrent callers do not share the fetch in flight", AUTH + "jwks.py",
      ("        future = self._in_flight\n        if future is None:",
       "        future = None\n        if future is None:")),
    b("keys never go stale (no lifespan)", AUTH + "jwks.py",
      ("fresh = self.fetched_at is not None and 0 <= now - self.fetched_at < self.lifespan",
       "fresh = self.fetched_at is not None")),
    b("stale keys not used while the source is down", AUTH + "jwks.py",
      ('return "key", key  # stale', 'return "missing", None  # stale')),
    b("the cooldown runs from the start of a fetch, not its end", AUTH + "jwks.py",
      ("            self.attempted_at = self._clock()\n", "")),
    b("a failed fetch drops the keys held", AUTH + "jwks.py",
      ("self.failure, self.failure_kind = reason, kind",
       "self.failure, self.failure_kind, self.keys, self._by_kid = reason, kind, (), {}")),
    b("an outage answered as a bad token (401, not 503)", AUTH + "jwks.py",
      ('if self.failure_kind == "unavailable" or self._closed():', "if self._closed():")),
    b("no key set (404) answered as an outage", AUTH + "jwks.py",
      ("if response.status_code in (404, 410):", "if False:")),
    b("a lone key without kid does not serve", AUTH + "jwks.py",
      ("if len(self.keys) == 1 and self.keys[0].kid is None:", "if False:")),
    b("Retry-After of 0", AUTH + "jwks.py",
      ("retry = max(1, math.ceil(self.cooldown - max(0.0, elapsed)))", "retry = 0")),
    b("symmetric keys loaded from a key set", AUTH + "jwks.py",
      ('    return frozenset()  # "oct"', '    return frozenset({"HS256"})  # "oct"'),
      ("    algorithms &= allowed\n", "")),
    b("short RSA keys loaded", AUTH + "jwks.py",
      ("if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:",
       "if False and isinstance(key, rsa.RSAPublicKey):")),
    b("encryption keys used to verify", AUTH + "jwks.py",
      ('if jwk.get("use") not in (None, "sig"):', "if False:")),
    b("key sets of any size", AUTH + "jwks.py",
      ("MAX_JWKS_BYTES = 1 << 20", "MAX_JWKS_BYTES = 1 << 40")),
    # -- the fetch-and-ask-again loop
    b("a key source fetched again within one request", AUTH + "settle.py",
      ("fresh = [s for s in needed.sources if not any(s is f for f in fetched)]",
       "fresh = list(needed.sources)")),
    # -- verified-token cache
    b("cache shared across plugins", AUTH + "verifier.py",
      ("cached = self._cache_get((digest, plugin_id), now)",
       'cached = self._cache_get((digest, ""), now)'),
      ("self._cache_put((digest, plugin_id), principal, now)",
       'self._cache_put((digest, ""), principal, now)')),
    b("cached tokens outlive their exp", AUTH + "verifier.py",
      ("            expires = min(expires, principal.expires_at)\n", "            pass\n")),
    b("cache unbounded", AUTH + "verifier.py",
      ("while len(self._cache) > size:", "while False:")),
    # -- config
    b("static tokens of any length", "stagedoor/schemas/config.schema.json",  # the schema's
      ('"pattern": "^\\\\S{8,}$"', '"pattern": "^\\\\S{1,}$"')),
    b("symmetric algorithms allowed for jwks entries", AUTH + "settings.py",
      ('ASYMMETRIC_ALGORITHMS = DEFAULT_ALGORITHMS | {"PS384", "PS512"}',
       'ASYMMETRIC_ALGORITHMS = DEFAULT_ALGORITHMS | {"PS384", "PS512", "HS256", "none"}')),
    # -- the shared outbound client
    b("outbound client follows redirects", "stagedoor/outbound.py",
      ("follow_redirects=False", "follow_redirects=True")),
    b("outbound bodies not capped", "stagedoor/outbound.py",
      ("if len(body) > max_bytes:", "if False:")),
    b("a new outbound client per call", "stagedoor/outbound.py",
      ("if _current is None or _current[0] is not loop or _current[1].is_closed:",
       "if True:")),
)


def _copy_repository(into: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", ".venv-lock", "node_modules",
                                    "__pycache__", ".pytest_cache", ".ruff_cache",
                                    ".hypothesis", "*.egg-info", ".stagedoor")
    for name in ("stagedoor", "addons", "tests", "config", "policies"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, into / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, into / name)


def _pytest(where: Path, timeout: float = 600) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": str(where), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=where, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("FAILED")]
    return result.returncode == 0, (failed[0] if failed else lines[-1] if lines else "")


def apply(breakage: Breakage, text: str) -> str:
    for old, new in breakage.edits:
        if text.count(old) != 1:
            raise ValueError(f"{breakage.what}: {old!r} occurs {text.count(old)} times in "
                             f"{breakage.file}")
        text = text.replace(old, new)
    return text


def main(argv: list[str]) -> int:
    chosen = [int(a) for a in argv] or list(range(1, len(BREAKAGES) + 1))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove the copy
    with tempfile.TemporaryDirectory(prefix="stagedoor-breakage-") as tmp:
        where = Path(tmp)
        _copy_repository(where)
        probe = subprocess.run(
            [sys.executable, "-c", "import stagedoor, sys; sys.stdout.write(stagedoor.__file__)"],
            cwd=where, env={**os.environ, "PYTHONPATH": str(where)}, capture_output=True,
            text=True, check=True)
        if not probe.stdout.strip().startswith(str(where)):
            print(f"the copy is not the code imported: {probe.stdout.strip()}")
            return 2
        ok, detail = _pytest(where)
        if not ok:
            print(f"the unbroken code fails its tests: {detail}")
            return 2
        caught = 0
        for number in chosen:
            breakage = BREAKAGES[number - 1]
            path = where / breakage.file
            original = path.read_text()
            path.write_text(apply(breakage, original))
            started = time.monotonic()
            try:
                passed, detail = _pytest(where)
            finally:
                path.write_text(original)
            caught += not passed
            verdict = "SURVIVED (no test failed)" if passed else "caught"
            print(f"{number:2d}. {breakage.what}: {verdict} [{time.monotonic() - started:.0f}s]"
                  f"\n      {detail}", flush=True)
    print(f"{caught} of {len(chosen)} deliberate breakages failed a test")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
