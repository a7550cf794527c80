"""A newcomer's paths: `check` lists everything, `run --dev` with `token` tokens, `--group` for
`memberOf`, `explain`'s exit codes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from . import forkserver
from .conftest import ROOT, RecordingServer, start_sidecar, write_config
from .httpraw import request
from .test_cli import CLEAN_ENV, stagedoor

MEMBER_OF_POLICY = """\
pluginId: insights
routes:
  - path: /services/{id}
    methods: [GET]
    auth: [user]
    params: {id: {pattern: '^[a-z0-9-]+$'}}
    permission: insights.service.read
    resource: id
    upstream: ${insights.externalApiUrl}/v1/services/{id}
permissions:
  - permission: insights.service.read
    effect: allow
    when: {principal: user, memberOf: [group:default/payments]}
"""


def _token(dev_dir: Path, *args: str) -> str:
    result = stagedoor("token", "--dev-dir", str(dev_dir), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# -- check -------------------------------------------------------------------------------------
def test_check_lists_every_missing_value_and_every_policy_problem_in_one_run(tmp_path):
    config = write_config(tmp_path / "app-config.yaml", """\
        backend:
          baseUrl: ${NEWCOMER_BACKSTAGE}
        stagedoor:
          auth:
            leewaySeconds: ${NEWCOMER_LEEWAY}
        """)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text("pluginId: a\nroutes:\n  - path: /x\n"
                                     "    upstream: ${a.url}/x\n    colour: red\n")
    (policies / "b.yaml").write_text("pluginId: b\nroutes:\n  - path: /y\n"
                                     "    upstream: ${b.url}/y\n")
    result = stagedoor("check", "--config", str(config), "--policies", str(policies))
    assert result.returncode == 1
    err = result.stderr
    assert f"Missing required config value at 'backend.baseUrl' in '{config}'" in err
    assert "a.yaml:4: Missing required config value at 'a.url'" in err
    assert "a.yaml:5: unknown key 'colour'" in err
    assert "b.yaml:4: Missing required config value at 'b.url'" in err
    assert "stagedoor check: 4 problem(s)" in err, err
    assert "hint: set the environment variable(s) NEWCOMER_BACKSTAGE (backend.baseUrl)" in err


def test_check_lists_several_missing_config_values_the_loader_reads_one_at_a_time(tmp_path):
    config = write_config(tmp_path / "app-config.yaml", """\
        backend:
          baseUrl: ${NEWCOMER_BACKSTAGE}
        discovery:
          endpoints:
            - plugins: [catalog]
        insights:
          externalApiUrl: ${NEWCOMER_INSIGHTS}
        """)
    result = stagedoor("check", "--config", str(config))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "Missing required" in line]
    assert any("'backend.baseUrl'" in line for line in lines), result.stderr
    assert any("'discovery.endpoints[0].target'" in line for line in lines), result.stderr
    assert any("insights.yaml:" in line and "'insights.externalApiUrl'" in line
               for line in lines), result.stderr
    assert ("hint: set the environment variable(s) NEWCOMER_BACKSTAGE (backend.baseUrl), "
            "NEWCOMER_INSIGHTS (insights.externalApiUrl)") in result.stderr


def test_check_passes_when_everything_loads():
    result = stagedoor("check", env={"INSIGHTS_API_URL": "http://127.0.0.1:1",
                                     "BACKSTAGE_BASE_URL": "http://127.0.0.1:2"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_run_that_cannot_start_lists_every_problem_like_check():
    result = stagedoor("run", "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert ("stagedoor: config/app-config.yaml:6: Missing required config value at "
            "'backend.baseUrl'") in result.stderr
    assert "stagedoor: policies/insights.yaml:" in result.stderr
    assert "BACKSTAGE_BASE_URL (backend.baseUrl), INSIGHTS_API_URL" in result.stderr


# -- explain -----------------------------------------------------------------------------------
def test_explain_exits_2_when_the_config_does_not_load_listing_every_problem():
    result = stagedoor("explain", "GET", "/api/insights/services/x", "--user", "user:default/a")
    assert result.returncode == 2
    assert "'backend.baseUrl'" in result.stderr and "'insights.externalApiUrl'" in result.stderr


def test_explain_group_gives_the_user_ownership_refs_for_member_of(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "insights.yaml").write_text(MEMBER_OF_POLICY)
    env = {"INSIGHTS_API_URL": "http://127.0.0.1:1", "BACKSTAGE_BASE_URL": "http://127.0.0.1:2"}
    base = ["explain", "GET", "/api/insights/services/payments-api", "--policies", str(policies),
            "--user", "user:default/jane"]
    without = stagedoor(*base, env=env)
    assert without.returncode == 1, without.stdout + without.stderr  # no groups known: deny
    member = stagedoor(*base, "--group", "group:default/payments", env=env)
    assert member.returncode == 0, member.stdout + member.stderr
    assert f"allow by rule {policies}/insights.yaml:" in member.stdout, member.stdout
    other = stagedoor(*base, "--group", "group:default/search", env=env)
    assert other.returncode == 1


def test_explain_group_without_user_is_a_usage_error():
    result = stagedoor("explain", "GET", "/api/insights/x", "--group", "group:default/payments",
                       env={"INSIGHTS_API_URL": "http://x", "BACKSTAGE_BASE_URL": "http://y"})
    assert result.returncode == 2 and "--group needs --user" in result.stderr


# -- token -------------------------------------------------------------------------------------
def test_token_group_puts_ownership_refs_in_the_ent_claim(tmp_path):
    import jwt

    token = _token(tmp_path, "--user", "user:default/jane", "--group", "group:default/payments",
                   "--group", "group:default/search")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["ent"] == ["user:default/jane", "group:default/payments", "group:default/search"]
    refused = stagedoor("token", "--dev-dir", str(tmp_path), "--group", "payments")
    assert refused.returncode == 2 and "entity ref" in refused.stderr


# -- run --dev ---------------------------------------------------------------------------------
@pytest.fixture
def insights_api():
    server = RecordingServer("json")
    yield server
    server.stop()


@pytest.mark.e2e
def test_run_dev_accepts_token_tokens_without_a_backstage_backend(tmp_path, insights_api):
    dev = tmp_path / "dev"
    sidecar = start_sidecar([ROOT / "config" / "app-config.yaml"], ROOT / "policies",
                            env={"INSIGHTS_API_URL": insights_api.url},
                            extra_args=["--dev", "--dev-dir", str(dev)])
    try:
        warning = [i for i, line in enumerate(sidecar.stderr_lines) if "DEV MODE" in line]
        listening = [i for i, line in enumerate(sidecar.stderr_lines)
                     if "stagedoor listening on" in line]
        assert warning and listening and warning[0] < listening[0], sidecar.stderr_lines
        assert '"level":"warning"' in sidecar.stderr_lines[warning[0]]
        token = _token(dev, "--user", "user:default/jane")
        resp = request(sidecar.port, "GET", "/api/insights/services/payments-api",
                       {"Authorization": f"Bearer {token}"})
        assert resp.status == 200, resp.body
        seen = insights_api.seen[-1]
        assert seen.path == "/v1/services/payments-api"
        assert seen.headers["x-stagedoor-principal"] == ["user:default/jane"]
        garbage = request(sidecar.port, "GET", "/api/insights/services/payments-api",
                          {"Authorization": f"Bearer {token[:-4]}AAAA"})
        assert garbage.status == 401
    finally:
        assert sidecar.stop() == 0


@pytest.mark.e2e
def test_run_dev_token_group_matches_a_member_of_rule_through_the_proxy(tmp_path, insights_api):
    dev = tmp_path / "dev"
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "insights.yaml").write_text(MEMBER_OF_POLICY)
    sidecar = start_sidecar([ROOT / "config" / "app-config.yaml"], policies,
                            env={"INSIGHTS_API_URL": insights_api.url},
                            extra_args=["--dev", "--dev-dir", str(dev)])
    try:
        plain = _token(dev, "--user", "user:default/jane")
        member = _token(dev, "--user", "user:default/jane", "--group", "group:default/payments")
        url = "/api/insights/services/payments-api"
        assert request(sidecar.port, "GET", url, {"Authorization": f"Bearer {plain}"}).status \
            == 403
        assert request(sidecar.port, "GET", url, {"Authorization": f"Bearer {member}"}).status \
            == 200
    finally:
        sidecar.stop()


@pytest.mark.parametrize("flags", [["--listen", "0.0.0.0:0"],
                                   ["--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"],
                                   ["--listen", "127.0.0.1:0", "--workers", "2"]])
def test_run_dev_is_refused_unless_every_listener_is_loopback(tmp_path, flags):
    result = forkserver.run([sys.executable, "-m", "stagedoor_addons", "run", "--dev",
                             "--dev-dir", str(tmp_path), *flags],
                            env={**CLEAN_ENV, "INSIGHTS_API_URL": "http://127.0.0.1:1"},
                            text=True, timeout=30)
    assert result.returncode == 1
    assert "--dev" in result.stderr and "listening on" not in result.stderr


def test_run_dev_is_refused_when_the_config_listens_beyond_loopback(tmp_path):
    config = write_config(tmp_path / "c.yaml", """\
        insights: {externalApiUrl: http://127.0.0.1:1}
        stagedoor: {admin: {listen: 0.0.0.0:0}}
        """)
    result = forkserver.run([sys.executable, "-m", "stagedoor_addons", "run", "--dev", "--config",
                             str(config), "--dev-dir", str(tmp_path / "dev"), "--listen",
                             "127.0.0.1:0"], env=CLEAN_ENV, text=True, timeout=30)
    assert result.returncode == 1
    assert "not: admin on 0.0.0.0" in result.stderr
