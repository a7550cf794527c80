"""Config layering, ${VAR} substitution and the boot error (docs/behaviour.md, "Config")."""

from pathlib import Path

import pytest

from stagedoor.config import Config, MissingConfigError, load_config, substitute_env


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_env_reference_is_replaced():
    assert substitute_env("http://${HOST}:80", {"HOST": "api"}) == "http://api:80"


def test_escaped_reference_is_literal():
    assert substitute_env("$${HOST}", {"HOST": "api"}) == "${HOST}"


def test_unset_variable_leaves_no_value():
    assert substitute_env("x-${NOPE}", {}) is None


def test_later_file_overrides_key_by_key(tmp_path):
    a = write(tmp_path, "a.yaml", "app:\n  one: 1\n  two: 2\n")
    b = write(tmp_path, "b.yaml", "app:\n  two: 22\n  three: 3\n")
    config = load_config([a, b], env={})
    assert config.get("app") == {"one": 1, "two": 22, "three": 3}


def test_unset_variable_in_later_file_keeps_earlier_value(tmp_path):
    a = write(tmp_path, "a.yaml", "x:\n  url: http://a\n")
    b = write(tmp_path, "b.yaml", "x:\n  url: ${UNSET_VAR}\n")
    assert load_config([a, b], env={}).get("x.url") == "http://a"


def test_missing_required_key_names_key_and_declaring_file(tmp_path):
    a = write(tmp_path, "app-config.yaml", "insights:\n  externalApiUrl: ${INSIGHTS_API_URL}\n")
    b = write(tmp_path, "extra.yaml", "other: 1\n")
    config = load_config([a, b], env={})
    with pytest.raises(MissingConfigError) as err:
        config.require_string("insights.externalApiUrl")
    assert str(err.value) == (
        f"Missing required config value at 'insights.externalApiUrl' in '{a}'"
    )


def test_missing_undeclared_key_names_last_file(tmp_path):
    a = write(tmp_path, "a.yaml", "x: 1\n")
    b = write(tmp_path, "b.yaml", "y: 1\n")
    with pytest.raises(MissingConfigError, match=f"'nope.key' in '{b}'"):
        load_config([a, b], env={}).require("nope.key")


def test_get_bool_and_number_convert_strings():
    config = Config(data={"a": {"flag": "true", "n": "2.5"}})
    assert config.get_bool("a.flag", False) is True
    assert config.get_number("a.n", 0) == 2.5
