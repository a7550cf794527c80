"""One validation path (docs/operations.md, "How config is validated"): the schema checks
structure, the settings readers keep the semantic checks, and every problem of token settings,
permission settings and rules, and operations settings comes out in one run as
``file:line: message`` — from ``stagedoor check``, at ``stagedoor run`` boot, and from
:func:`stagedoor.runtime.load_state` itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stagedoor.config import Config, ConfigError, MissingConfigError, load_config
from stagedoor.runtime import load_state

from .conftest import write_config
from .test_cli import stagedoor

# Several independent mistakes, one per line marked "# <- n" (n: the problem's number below).
BROKEN_CONFIG = """\
backend:
  baseUrl: ${VALIDATE_UNSET_BASE_URL}
  auth:
    externalAccess:
      - type: static
        options:
          token: short                     # <- 1 token settings: too short
          subject: ci
      - type: legacy
        options:
          secret: not*base64               # <- 2 token settings: not base64
          subject: old
      - type: jwks
        options:
          url: ftp://idp.example/jwks      # <- 3 token settings: not an http(s) URL
      - type: magic                        # <- 4 token settings: unknown type
        options: {}
  rateLimit:
    store: {type: redis}                   # <- 5 operations: redis without a connection
discovery:
  endpoints:
    - plugins: [catalog]                   # <- 6 token settings: no target
stagedoor:
  auth:
    leewaySeconds: 900                     # <- 7 token settings: out of range
  permissions:
    cacheSeconds: lots                     # <- 8 permission settings: not a number
    membership:
      user:default/jane: {group: payments} # <- 9 permission settings: not entity refs
  limits:
    maxBodyBytes: -1                       # <- 10 operations: out of range
  admin:
    listen: nowhere                        # <- 11 operations: not HOST:PORT
  shutdown:
    gracePeriod: soon                      # <- 12 operations: not a duration
  log:
    format: xml                            # <- 13 operations: unknown format
  trustedProxies: [not-an-ip]              # <- 14 operations: not an address
  listen: localhost                        # <- 15 operations: not HOST:PORT
  eventLoop: trio                          # <- 16 operations: unknown loop
"""

#: (problem number, the key the message names, a fragment of its message).
EXPECTED = [
    (1, "backend.auth.externalAccess[0].options.token", "at least 8 characters"),
    (2, "backend.auth.externalAccess[1].options.secret", "valid base64"),
    (3, "backend.auth.externalAccess[2].options.url", "http(s) URL"),
    (4, "backend.auth.externalAccess[3].type", "one of static, legacy, jwks"),
    (5, "backend.rateLimit.store.connection", "Missing required config value"),
    (6, "discovery.endpoints[0].target", "Missing required config value"),
    (7, "stagedoor.auth.leewaySeconds", "must be between 0 and 300, got 900"),
    (8, "stagedoor.permissions.cacheSeconds", "must be a number"),
    (9, "stagedoor.permissions.membership.user:default/jane", "must be"),
    (10, "stagedoor.limits.maxBodyBytes", "must be between 0 and"),
    (11, "stagedoor.admin.listen", "HOST:PORT"),
    (12, "stagedoor.shutdown.gracePeriod", "soon"),
    (13, "stagedoor.log.format", "must be one of json, text"),
    (14, "stagedoor.trustedProxies", "not an IP address or CIDR"),
    (15, "stagedoor.listen", "wants HOST:PORT, got 'localhost'"),
    (16, "stagedoor.eventLoop", "must be one of auto, uvloop, asyncio, got 'trio'"),
]

BROKEN_RULES = """\
permissions:
  - permission: insights.*
    effect: allow
  - permission: insights.service.read
    effect: maybe
"""


def _marked_lines(text: str) -> dict[int, int]:
    """Problem number -> its line in ``text`` (the ``# <- n`` marks)."""
    return {int(m.group(1)): number for number, line in enumerate(text.splitlines(), 1)
            if (m := re.search(r"# <- (\d+)", line))}


@pytest.fixture
def broken(tmp_path: Path) -> tuple[Path, Path]:
    config = write_config(tmp_path / "app-config.yaml", BROKEN_CONFIG)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "permissions.yaml").write_text(BROKEN_RULES)
    (policies / "insights.yaml").write_text(
        "pluginId: insights\nroutes:\n  - path: /health\n    auth: unauthenticated\n"
        "    respond: {status: 200, json: {}}\n")
    return config, policies


def _assert_every_problem(output: str, config: Path, policies: Path, prefix: str = "") -> None:
    lines = _marked_lines(BROKEN_CONFIG)
    problems = [line for line in output.splitlines() if line.startswith(f"{prefix}/")]
    for number, key, fragment in EXPECTED:
        where = f"{prefix}{config}:{lines[number]}: "
        found = [p for p in problems if p.startswith(where) and f"'{key}'" in p]
        assert found, f"problem {number} ({key}) not reported at {where!r}:\n{output}"
        assert any(fragment in p for p in found), (number, found)
    # the permission rule in the policy directory, in the same run
    assert f"{prefix}{policies}/permissions.yaml:5: 'effect' must be one of allow, deny, " \
           "delegate, got 'maybe'" in output, output
    # the missing required key, in Backstage's words, with the key's name
    assert (f"{prefix}{config}:2: Missing required config value at 'backend.baseUrl' in "
            f"'{config}'") in output, output
    assert all(re.match(rf"{re.escape(prefix)}/\S+:\d+: ", p) for p in problems), problems
    assert len(problems) == len(EXPECTED) + 2, "\n".join(problems)  # nothing twice


def test_check_reports_every_mistake_of_token_permission_and_operations_settings_at_once(
        broken: tuple[Path, Path]) -> None:
    config, policies = broken
    result = stagedoor("check", "--config", str(config), "--policies", str(policies))
    assert result.returncode == 1
    _assert_every_problem(result.stderr, config, policies)
    assert f"stagedoor check: {len(EXPECTED) + 2} problem(s)" in result.stderr, result.stderr
    assert "hint: set the environment variable(s) VALIDATE_UNSET_BASE_URL (backend.baseUrl)" \
        in result.stderr


def test_run_exits_at_boot_with_every_mistake(broken: tuple[Path, Path]) -> None:
    config, policies = broken
    result = stagedoor("run", "--listen", "127.0.0.1:0", "--config", str(config),
                       "--policies", str(policies))
    assert result.returncode == 1
    _assert_every_problem(result.stderr, config, policies, prefix="stagedoor: ")
    assert "listening" not in result.stderr


def test_load_state_raises_one_error_listing_config_and_policy_problems(
        broken: tuple[Path, Path]) -> None:
    config, policies = broken
    with pytest.raises(ConfigError) as info:
        load_state([str(config)], str(policies))
    assert info.value.problems == str(info.value).splitlines()
    assert len(info.value.problems) == len(EXPECTED) + 2


def test_a_missing_required_key_alone_still_stops_the_boot_naming_it(tmp_path: Path) -> None:
    config = write_config(tmp_path / "app-config.yaml", """\
        backend:
          baseUrl: ${VALIDATE_UNSET_BASE_URL}
        """)
    result = stagedoor("run", "--listen", "127.0.0.1:0", "--config", str(config))
    assert result.returncode == 1
    assert (f"stagedoor: {config}:2: Missing required config value at 'backend.baseUrl' "
            f"in '{config}'") in result.stderr, result.stderr


def test_keys_other_backstage_plugins_use_stay_allowed(tmp_path: Path) -> None:
    config = write_config(tmp_path / "app-config.yaml", """\
        app: {title: Backstage}
        backend:
          baseUrl: http://127.0.0.1:7007
          listen: {port: 7007}
          database: {client: better-sqlite3, connection: ':memory:'}
          auth:
            dangerouslyDisableDefaultAuthPolicy: false
            externalAccess:
              - type: static
                options: {token: abcdefgh12345678, subject: ci, futureOption: 1}
          rateLimit: {global: true, window: 1m, someFutureKey: x}
        discovery:
          endpoints:
            - target: http://127.0.0.1:8080/api/{{pluginId}}
              plugins: [catalog]
              someFutureKey: x
        catalog: {rules: [{allow: [Component]}]}
        permission: {enabled: true}
        """)
    loaded = load_config([config], env={})
    assert loaded.problems == []


def test_stagedoor_keys_stay_closed_and_ranges_see_env_strings(tmp_path: Path) -> None:
    config = write_config(tmp_path / "app-config.yaml", """\
        stagedoor:
          auth:
            leewaySeconds: ${LEEWAY}
            leeway: 5
        """)
    with pytest.raises(ConfigError) as info:
        load_config([config], env={"LEEWAY": "301"})
    assert info.value.problems == [
        f"{config}:3: Invalid config value at 'stagedoor.auth.leewaySeconds' in '{config}': "
        "'leewaySeconds' must be between 0 and 300, got 301",
        f"{config}:4: Invalid config value at 'stagedoor.auth.leeway' in '{config}': unknown "
        "key 'leeway' in 'auth' (allowed: jwksMaxAgeSeconds, "
        "jwksRefetchIntervalSeconds, jwksTimeoutSeconds, leewaySeconds, maxPluginKeySources, "
        "maxTokenBytes, pluginTokens, tokenCacheSeconds, tokenCacheSize, userTokens)",
    ]


def test_a_reader_called_alone_raises_one_problem_as_itself_in_backstage_words() -> None:
    """Direct callers (and the parity tests) see the message without a location prefix."""
    from stagedoor.auth.settings import AuthSettings

    with pytest.raises(MissingConfigError) as info:
        AuthSettings.from_config(Config(data={}))
    assert str(info.value) == ("Missing required config value at 'backend.baseUrl' in "
                               "'<no config file>'")


def test_cross_key_rule_is_reported_with_the_rest(tmp_path: Path) -> None:
    from stagedoor.auth.settings import AuthSettings

    config = write_config(tmp_path / "app-config.yaml", """\
        backend: {baseUrl: 'http://127.0.0.1:1'}
        stagedoor:
          auth:
            jwksRefetchIntervalSeconds: 60
            jwksMaxAgeSeconds: 30
            leewaySeconds: -1
        """)
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_config(load_config([config], strict=False))
    assert [p.split(": ")[0] for p in info.value.problems] == [f"{config}:5", f"{config}:6"]
    assert "must be at least stagedoor.auth.jwksRefetchIntervalSeconds (60)" in str(info.value)
