"""Policy loading: validation with file:line, compilation of routes and upstream templates."""

import textwrap
from pathlib import Path

import pytest

from stagedoor.config import Config
from stagedoor.policy import PolicyLoadError, load_policies, parse_duration

CONFIG = Config(data={"insights": {"externalApiUrl": "http://127.0.0.1:9000"}},
                files=("config/app-config.yaml",))

GOOD = """\
pluginId: insights
routes:
  - path: /health
    auth: unauthenticated
    respond: {status: 200, json: {status: ok}}
  - path: /services/{id}
    methods: [GET]
    auth: [user]
    params:
      id:
        pattern: ^[a-z0-9-]+$
        message: "Invalid service id: {value}"
    upstream: ${insights.externalApiUrl}/v1/services/{id}
"""


def policy_dir(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(text))
    return tmp_path


def problems(tmp_path: Path, text: str, config: Config = CONFIG) -> list[str]:
    with pytest.raises(PolicyLoadError) as err:
        load_policies(policy_dir(tmp_path, p=text), config)
    return [str(p) for p in err.value.problems]


def test_shipped_policy_loads():
    policies = load_policies(Path(__file__).parent.parent / "policies", CONFIG)
    insights = policies.plugins["insights"]
    assert [r.path for r in insights.routes] == ["/health", "/services/{id}"]


def test_upstream_template_is_resolved_and_reencodes_values(tmp_path):
    policies = load_policies(policy_dir(tmp_path, insights=GOOD), CONFIG)
    route = policies.plugins["insights"].routes[1]
    assert route.upstream.host == "127.0.0.1" and route.upstream.port == 9000
    assert route.upstream.path_for({"id": "a b/c"}) == "/v1/services/a%20b%2Fc"


def test_unknown_key_reported_with_line(tmp_path):
    text = GOOD.replace("    methods: [GET]\n", "    methods: [GET]\n    metods: [POST]\n")
    found = problems(tmp_path, text)
    assert any(":8: unknown key 'metods' in route (allowed: auth, body, description, "
               "enforce, method, methods, params, path, " in p for p in found), found


def test_bad_regex_reported_with_line(tmp_path):
    found = problems(tmp_path, GOOD.replace("^[a-z0-9-]+$", "^[a-z("))
    assert len(found) == 1 and ":10: parameter 'id': invalid regex" in found[0]


def test_parameter_without_regex_reported(tmp_path):
    text = GOOD.replace("/services/{id}\n", "/services/{id}/{extra}\n")
    assert any("path parameter 'extra' has no regex" in p for p in problems(tmp_path, text))


def test_upstream_naming_unknown_parameter_reported(tmp_path):
    text = GOOD.replace("/v1/services/{id}", "/v1/services/{name}")
    assert any(":13: upstream names parameter 'name'" in p for p in problems(tmp_path, text))


def test_duplicate_route_reported(tmp_path):
    text = GOOD + """\
  - path: /services/{other}
    params: {other: '^x$'}
    upstream: http://127.0.0.1:1/x
"""
    found = problems(tmp_path, text)
    assert any(":14: duplicate route: GET /services/{other} overlaps /services/{id} (line 6)"
               in p for p in found), found


def test_missing_config_value_names_key_and_file(tmp_path):
    empty = Config(data={}, files=("config/app-config.yaml",))
    found = problems(tmp_path, GOOD, empty)
    assert found == [f"{tmp_path}/p.yaml:13: Missing required config value at "
                     "'insights.externalApiUrl' in 'config/app-config.yaml'"]


def test_invalid_plugin_id_names_file(tmp_path):
    found = problems(tmp_path, GOOD.replace("pluginId: insights", "pluginId: Insights_X"))
    assert found[0].startswith(f"{tmp_path}/p.yaml:1: invalid pluginId 'Insights_X'")


def test_yaml_syntax_error_has_line(tmp_path):
    found = problems(tmp_path, "pluginId: x\nroutes:\n  - path: [unclosed\n")
    assert found[0].startswith(f"{tmp_path}/p.yaml:")
    assert "invalid YAML" in found[0]


def test_unauthenticated_cannot_combine(tmp_path):
    text = GOOD.replace("auth: [user]", "auth: [user, unauthenticated]")
    assert any("cannot be combined" in p for p in problems(tmp_path, text))


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    text = GOOD.replace("auth: [user]", "auth: [robot]").replace("^[a-z0-9-]+$", "(")
    assert len(problems(tmp_path, text)) == 2


def test_same_plugin_in_two_files_reported(tmp_path):
    with pytest.raises(PolicyLoadError, match="already defined"):
        load_policies(policy_dir(tmp_path, a=GOOD, b=GOOD), CONFIG)


def test_hidden_files_and_configmap_dirs_are_skipped(tmp_path):
    policy_dir(tmp_path, insights=GOOD)
    (tmp_path / "..data").mkdir()
    (tmp_path / ".hidden.yaml").write_text("garbage: [")
    assert list(load_policies(tmp_path, CONFIG).plugins) == ["insights"]


@pytest.mark.parametrize(("text", "seconds"), [(5, 5.0), ("30s", 30.0), ("500ms", 0.5),
                                               ("2m", 120.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_rate_limit_rules_on_plugin_and_route(tmp_path):
    text = GOOD.replace("routes:\n", "rateLimit: {limit: 10, window: 1m}\nroutes:\n", 1).replace(
        "    methods: [GET]\n", "    methods: [GET]\n    rateLimit: [{key: ip, limit: 2, "
        "window: 1h, name: by-ip}]\n", 1)
    path = tmp_path / "p.yaml"
    path.write_text(text)
    policies = load_policies(tmp_path, CONFIG)
    [plugin] = policies.plugins.values()
    route = next(r for r in plugin.routes if r.rate_limits)
    assert [(r.name, r.limit, r.window) for r in plugin.rate_limits] == [("plugin#1", 10, 60)]
    assert [(r.name, r.key) for r in plugin.rate_limits_for(route)] == [("by-ip", "ip")]
    other = next(r for r in plugin.routes if not r.rate_limits)
    assert plugin.rate_limits_for(other) == plugin.rate_limits


def test_rate_limit_problems_and_duplicate_names_have_lines(tmp_path):
    text = GOOD.replace("routes:\n", "rateLimit: [{limit: 10, window: 1m, name: x}, "
                                     "{limit: 0, window: 1m}, {limit: 1, window: 1m, name: x}]"
                                     "\nroutes:\n", 1)
    found = problems(tmp_path, text)
    assert any("'limit' must be a whole number" in p for p in found), found
    assert any("name 'x' is already used" in p for p in found), found
