"""Policy language v2 as pure code: schema messages with file:line, query shaping, body checks,
the response filter and secrets (issue 12)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagedoor.body import BodyRule, check_body, compile_body_schema, parse_size
from stagedoor.config import Config
from stagedoor.policy import PolicyLoadError, Secret, load_policies
from stagedoor.query import QueryPolicy, QueryRejected, QueryRule, shape_query
from stagedoor.response_rules import DEFAULT_RESPONSE_RULE, ResponseRule, filter_response_fields

from . import forkserver

CONFIG = Config(data={"notes": {"url": "http://127.0.0.1:9000", "remote": "http://api.example.com",
                                "token": "s3cret-upstream-token"}},
                files=("config/app-config.yaml",))

FULL = """\
pluginId: notes
routes:
  - path: /services/{id}/notes
    methods: [POST]
    auth: [user]
    params: {id: {pattern: "^[a-z0-9-]+$", message: "Invalid service id: {value}"}}
    query:
      dryRun: {pattern: "^(true|false)$"}
      tag: {pattern: "^[a-z]{1,20}$", repeated: true}
      page: {pattern: "^[0-9]{1,4}$", required: true, message: "page must be a number"}
    unknownQuery: reject
    body:
      contentType: application/json
      maxBytes: 64KiB
      schema:
        type: object
        required: [text]
        properties: {text: {type: string, maxLength: 500}}
        additionalProperties: false
    upstream:
      url: ${notes.url}/v1/services/{id}/notes
      headers:
        Authorization: Bearer ${notes.token}
        X-Source: stagedoor
      query: {source: stagedoor}
      identity: {type: jwt, audience: notes-api}
    response:
      headers:
        allow: [Set-Cookie]
        remove: [X-Internal-Trace]
      expect: json
"""


def load(tmp_path: Path, text: str, config: Config = CONFIG, **extra: str):
    (tmp_path / "p.yaml").write_text(textwrap.dedent(text))
    for name, content in extra.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return load_policies(tmp_path, config)


def problems(tmp_path: Path, text: str, **extra: str) -> list[str]:
    with pytest.raises(PolicyLoadError) as err:
        load(tmp_path, text, **extra)
    return [str(p).split("/p.yaml", 1)[-1] for p in err.value.problems]


# -- loading ---------------------------------------------------------------------------------------
def test_the_whole_language_loads(tmp_path):
    route = load(tmp_path, FULL).plugins["notes"].routes[0]
    assert [r.name for r in route.query.rules] == ["dryRun", "tag", "page"]
    assert route.query.unknown == "reject" and route.query.fixed == (("source", "stagedoor"),)
    assert route.body is not None and route.body.max_bytes == 65536
    assert route.upstream is not None and route.upstream.identity is not None
    assert route.upstream.identity.audience == "notes-api"
    headers = dict(route.upstream.headers)
    assert headers["Authorization"] == "Bearer s3cret-upstream-token"
    assert isinstance(headers["Authorization"], Secret)
    assert not isinstance(headers["X-Source"], Secret)
    assert route.response == ResponseRule(frozenset({"set-cookie"}),
                                          frozenset({"x-internal-trace"}), True)


def test_a_secret_never_shows_in_a_repr(tmp_path):
    route = load(tmp_path, FULL).plugins["notes"].routes[0]
    assert "s3cret" not in repr(route)
    assert route.upstream is not None
    assert ("Authorization", "***") in route.upstream.shown_headers()
    assert route.secret_values == ("Bearer s3cret-upstream-token", "s3cret-upstream-token")


def test_every_structure_problem_is_reported_with_its_line(tmp_path):
    text = FULL.replace("repeated: true", "repeated: often").replace(
        "unknownQuery: reject", "unknownQuery: sometimes").replace(
        "maxBytes: 64KiB", "maxBytes: lots").replace("expect: json", "expect: xml").replace(
        "X-Source: stagedoor", "X-Source: [a]").replace("{type: jwt,", "{type: saml,")
    found = problems(tmp_path, text)
    assert found == [
        ":9: 'repeated' must be true or false, got a string",
        ":11: 'unknownQuery' must be one of drop, reject, forward, got 'sometimes'",
        ":14: invalid size 'lots' (use e.g. 65536, 64KiB, 1MB)",
        ":24: 'X-Source' must be a string, got a list",
        ":26: 'type' must be one of headers, jwt, backstage, none, got 'saml'",
        ":31: 'expect' must be one of json, got 'xml'",
    ]


def test_semantic_problems_are_reported_with_structure_problems(tmp_path):
    text = FULL.replace('"^[0-9]{1,4}$"', '"^([0-9]{1,4}$"').replace("maxLength: 500",
                                                                  "maxLength: -1")
    text = text.replace("unknownQuery: reject", "unknownQuery: reject\n    colour: red")
    found = problems(tmp_path, text)
    assert any(p.startswith(":12: unknown key 'colour' in route (allowed: auth, body, ")
               for p in found), found
    assert any(p.startswith(":10: query parameter 'page': invalid regex") for p in found), found
    assert any(p.startswith(":19: invalid body schema: -1 is less than the minimum of 0")
               for p in found), found


def test_upstream_mapping_unknown_key_is_named(tmp_path):
    found = problems(tmp_path, FULL.replace("query: {source: stagedoor}",
                                            "querry: {source: stagedoor}"))
    assert found == [":25: unknown key 'querry' in upstream (allowed: headers, identity, query, "
                     "tls, url)"]


def test_a_declared_query_parameter_cannot_shadow_a_fixed_one(tmp_path):
    found = problems(tmp_path, FULL.replace("query: {source: stagedoor}",
                                            "query: {page: '1'}"))
    assert found == [":10: query parameter 'page' is also a fixed upstream query parameter "
                     "(upstream.query): the fixed value would always win"]


def test_body_schema_ref_file_is_loaded_relative_to_the_policy(tmp_path):
    text = FULL.replace("""      schema:
        type: object
        required: [text]
        properties: {text: {type: string, maxLength: 500}}
        additionalProperties: false
""", "      schema: {$ref: schemas/note.json}\n")
    note = json.dumps({"type": "object", "required": ["text"],
                       "properties": {"text": {"$ref": "text.yaml"}}})
    route = load(tmp_path, text, **{"schemas/note.json": note,
                                    "schemas/text.yaml": "type: string\nmaxLength: 3\n"}
                 ).plugins["notes"].routes[0]
    assert route.body is not None
    error = check_body(route.body, "application/json", None, b'{"text": "long"}')
    assert error is not None and error.message == ("Invalid request body: /text: 'l...' is too "
                                                   "long (maxLength 3)")


def test_a_missing_schema_file_is_a_problem_at_its_line(tmp_path):
    text = FULL.replace("""      schema:
        type: object
""", "      schema:\n        $ref: nowhere.json\n        type: object\n")
    found = problems(tmp_path, text)
    assert len(found) == 1 and found[0].startswith(":16: body schema $ref 'nowhere.json': "
                                                   "cannot read"), found


def test_a_secret_over_plain_http_to_a_remote_host_is_a_warning(tmp_path):
    policies = load(tmp_path, FULL.replace("${notes.url}", "${notes.remote}"))
    assert [w.message for w in policies.warnings] == [
        "warning: a secret is sent to http://api.example.com over plain http (not loopback): "
        "use https"]
    assert not load(tmp_path, FULL).warnings  # loopback: fine


def test_insecure_tls_is_a_warning_and_needs_https(tmp_path):
    text = FULL.replace("      query: {source: stagedoor}",
                        "      query: {source: stagedoor}\n      tls: {insecureSkipVerify: true}")
    assert problems(tmp_path, text) == [":26: 'tls' needs an https:// upstream"]
    https = text.replace("${notes.url}", "https://127.0.0.1:9443")
    policies = load(tmp_path, https)
    assert [w.line for w in policies.warnings] == [26]
    assert policies.upstream_tls[("127.0.0.1", 9443)].insecure_skip_verify


def test_routes_to_one_upstream_must_agree_on_tls(tmp_path):
    text = """\
    pluginId: notes
    routes:
      - path: /a
        upstream: {url: "https://127.0.0.1:9443/a", tls: {insecureSkipVerify: true}}
      - path: /b
        upstream: https://127.0.0.1:9443/b
    """
    found = problems(tmp_path, text)
    assert len(found) == 1 and found[0].startswith(":5: upstream https://127.0.0.1:9443: tls "
                                                   "differs from"), found


def test_the_shipped_policies_name_their_schema():
    root = Path(__file__).parent.parent
    shipped = [*(root / "policies").glob("*.yaml"), *(root / "examples").glob("*/*.yaml")]
    assert len(shipped) >= 2
    for path in shipped:
        first = path.read_text().splitlines()[0]
        schema = (path.parent / first.partition("$schema=")[2]).resolve()
        assert first.startswith("# yaml-language-server: $schema=") and schema.is_file(), path


def test_the_notes_example_loads(tmp_path):
    root = Path(__file__).parent.parent
    config = Config(data={"insights": {"externalApiUrl": "http://127.0.0.1:7008"},
                          "notes": {"apiToken": "t0ken-for-the-notes-api"}})
    policies = load_policies(root / "examples" / "notes", config)
    routes = policies.plugins["notes"].routes
    assert [r.path for r in routes] == ["/services/{id}/notes"] * 2 + ["/search"]
    post = routes[1]
    assert post.body is not None and post.body.schema is not None
    assert post.body.schema["properties"]["text"]["maxLength"] == 500  # the $ref, inlined
    assert post.query.unknown == "reject" and not policies.warnings


# -- query -----------------------------------------------------------------------------------------
RULES = QueryPolicy((QueryRule("page", re.compile("^[0-9]{1,4}$"), required=True,
                               message="page must be a number"),
                     QueryRule("tag", re.compile("^[a-z]{1,20}$"), repeated=True),
                     QueryRule("q", re.compile(".{1,50}"))),
                    "drop", (("source", "stagedoor"), ("key", Secret("k3y"))),
                    frozenset({"key"}))


def test_declared_values_are_decoded_checked_and_reencoded():
    shaped = shape_query("page=7&tag=a&tag=b&q=a+b%2Fc%3F&x=1&token=abc", RULES)
    assert shaped.text == "?page=7&tag=a&tag=b&q=a%20b%2Fc%3F&source=stagedoor&key=k3y"
    assert shaped.shown == "?page=7&tag=a&tag=b&q=a%20b%2Fc%3F&source=stagedoor&key=***"
    assert shaped.dropped == ("x", "token")


@pytest.mark.parametrize(("raw", "message"), [
    ("tag=a", "Missing required query parameter 'page'"),
    ("page=x", "page must be a number"),
    ("page=1&page=2", "Query parameter 'page' must not be repeated"),
    ("page=1&tag=A", "Invalid query parameter 'tag': A"),
    ("page=1&q=%ff", "Invalid query string: not UTF-8"),
])
def test_bad_query_strings_are_refused(raw, message):
    with pytest.raises(QueryRejected) as err:
        shape_query(raw, RULES)
    assert err.value.message == message


def test_unknown_query_modes():
    reject = QueryPolicy(RULES.rules[:1], "reject")
    with pytest.raises(QueryRejected, match="Unknown query parameter 'x'"):
        shape_query("page=1&x=2", reject)
    forward = QueryPolicy(RULES.rules[:1], "forward", (("source", "stagedoor"),))
    assert shape_query("page=1&x=a%20b&source=evil", forward).text == \
        "?page=1&x=a%20b&source=stagedoor"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["page", "tag", "q", "x", "token", "Page", "tag[]",
                                           "", "%70age"]),
                          st.text(max_size=8)), max_size=8))
def test_property_nothing_undeclared_reaches_the_upstream(pairs):
    from urllib.parse import quote_plus

    raw = "&".join(f"{quote_plus(k, safe='%[]')}={quote_plus(v)}" for k, v in pairs)
    try:
        shaped = shape_query(raw, QueryPolicy(RULES.rules, "drop"))
    except QueryRejected:
        return
    for name, value in parse_qsl(shaped.text.lstrip("?"), keep_blank_values=True):
        rule = QueryPolicy(RULES.rules).rule(name)
        assert rule is not None, name
        assert rule.pattern.fullmatch(value), (name, value)


# -- body ------------------------------------------------------------------------------------------
def _rule(tmp_path: Path, **schema) -> BodyRule:
    documented, validator = compile_body_schema(schema or {
        "type": "object", "required": ["text"], "additionalProperties": False,
        "properties": {"text": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}}},
        tmp_path / "p.yaml")
    return BodyRule("application/json", 100, documented, validator)


@pytest.mark.parametrize(("ctype", "body", "status", "message"), [
    ("application/json", b'{"text": "hi"}', None, None),
    ("application/json; charset=utf-8", b'{"text": "hi"}', None, None),
    ("text/plain", b'{"text": "hi"}', 415, "Unsupported Media Type: this endpoint accepts "
                                           "application/json"),
    ("application/x-www-form-urlencoded", b"text=hi", 415, None),
    ("application/json", b'{"text": "' + b"x" * 200 + b'"}', 413, None),
    ("application/json", b'{"text": "secret-ish', 400, "Invalid request body: Unterminated string "
                                                       "starting at (line 1, column 10)"),
    ("application/json", b'{"text": "abcdefgh"}', 400, "Invalid request body: /text: 'a...' is "
                                                       "too long (maxLength 5)"),
    ("application/json", b'{"text": "a", "n": "7"}', 400, "Invalid request body: /n: '7...' is "
                                                          "not of type 'integer'"),
    ("application/json", b'{"n": 1}', 400, "Invalid request body: /: 'text' is a required "
                                           "property"),
    ("application/json", b'{"text": "a", "zz": 1}', 400, "Invalid request body: /zz: property "
                                                         "'zz' is not allowed"),
    ("application/json", b"", 400, "Invalid request body: the body is empty"),
    ("application/json", b"NaN", 400, "Invalid request body: NaN is not valid JSON"),
    (None, b'{"text": "hi"}', 415, None),
])
def test_body_checks(tmp_path, ctype, body, status, message):
    error = check_body(_rule(tmp_path), ctype, None, body)
    if status is None:
        assert error is None
        return
    assert error is not None and error.status == status
    if message:
        assert error.message == message
    assert b"secret-ish" not in error.message.encode() and "abcdefgh" not in error.message


def test_a_compressed_body_is_refused(tmp_path):
    error = check_body(_rule(tmp_path), "application/json", "gzip", b"\x1f\x8b")
    assert error is not None and error.status == 415


def test_sizes():
    assert parse_size("64KiB") == 65536 and parse_size("1MB") == 1_000_000
    assert parse_size(10) == 10
    with pytest.raises(ValueError):
        parse_size("ten")


# -- response --------------------------------------------------------------------------------------
SECURITY = ((b"x-frame-options", b"X-Frame-Options", b"SAMEORIGIN"),)
UPSTREAM = ((b"Content-Type", b"application/json"), (b"Set-Cookie", b"sid=1"),
            (b"Server", b"nginx/1.2"), (b"X-Powered-By", b"PHP"), (b"X-Frame-Options", b"ALLOW"),
            (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Content-Length", b"2"),
            (b"X-Internal-Trace", b"abc"), (b"X-Kept", b"yes"))


def test_the_default_response_filter():
    out = filter_response_fields(UPSTREAM, DEFAULT_RESPONSE_RULE.dropped_names(), SECURITY)
    assert out == ((b"Content-Type", b"application/json"), (b"Content-Length", b"2"),
                   (b"X-Internal-Trace", b"abc"), (b"X-Kept", b"yes"),
                   (b"X-Frame-Options", b"SAMEORIGIN"))


def test_a_route_allows_and_removes_headers():
    rule = ResponseRule(frozenset({"set-cookie"}), frozenset({"x-internal-trace"}))
    out = dict(filter_response_fields(UPSTREAM, rule.dropped_names(), SECURITY))
    assert out[b"Set-Cookie"] == b"sid=1" and b"X-Internal-Trace" not in out
    assert b"Server" not in out and out[b"X-Frame-Options"] == b"SAMEORIGIN"


# -- config ----------------------------------------------------------------------------------------
def test_config_file_and_env_includes(tmp_path):
    from stagedoor.config import load_config

    (tmp_path / "token.txt").write_text("s3cret\n")
    config_file = tmp_path / "app-config.yaml"
    config_file.write_text("notes:\n  token: {$file: token.txt}\n  url: {$env: NOTES_URL}\n"
                           "  unset: {$env: NOPE}\n")
    config = load_config([config_file], env={"NOTES_URL": "http://127.0.0.1:1"})
    assert config.get("notes.token") == "s3cret"
    assert config.get("notes.url") == "http://127.0.0.1:1"
    assert not config.has("notes.unset")


def test_config_missing_include_file_names_it(tmp_path):
    from stagedoor.config import ConfigError, load_config

    config_file = tmp_path / "app-config.yaml"
    config_file.write_text("notes:\n  token: {$file: /nonexistent/token}\n")
    with pytest.raises(ConfigError, match="cannot read /nonexistent/token"):
        load_config([config_file], env={})


def test_stagedoor_config_keys_are_checked_against_the_schema(tmp_path):
    from stagedoor.config import ConfigError, load_config
    from stagedoor.policyschema import CONFIG_SCHEMA, load_schema

    STAGEDOOR_KEYS = load_schema(CONFIG_SCHEMA)["properties"]["stagedoor"]["properties"]

    config_file = tmp_path / "app-config.yaml"
    config_file.write_text("stagedoor:\n  listen: ${LISTEN}\n  limts: {maxBodyBytes: 1}\n"
                           "  accessLog: {enabled: maybe}\n  limits: {maxBodyBytes: '10'}\n")
    with pytest.raises(ConfigError) as err:
        load_config([config_file], env={})
    assert str(err.value).splitlines() == err.value.problems == [  # in file order, with lines
        f"{config_file}:3: Invalid config value at 'stagedoor.limts' in '{config_file}': "
        "unknown key 'limts' in stagedoor (allowed: " + ", ".join(sorted(STAGEDOOR_KEYS)) + ")",
        f"{config_file}:4: Invalid config value at 'stagedoor.accessLog.enabled' in "
        f"'{config_file}': 'enabled' must be true or false, got 'maybe'",
    ]


def test_every_stagedoor_config_key_the_code_reads_is_in_the_schema():
    """A key read in code but missing from the schema would be refused as unknown."""
    from stagedoor.policyschema import CONFIG_SCHEMA, load_schema

    root = Path(__file__).parent.parent
    schema = load_schema(CONFIG_SCHEMA)["properties"]["stagedoor"]
    keys = set()
    literal = re.compile(r"f?[\"']stagedoor\.([a-zA-Z.]+)")
    sources = [*root.glob("stagedoor/**/*.py"), *root.glob("addons/*.py")]
    loggers = {name for path in sources for name in
               re.findall(r"getLogger\([\"']stagedoor\.(\w+)", path.read_text())}
    for path in sources:
        text = path.read_text()
        if 'f"stagedoor.limits.{key}"' in text:  # number("maxBodyBytes", ...) helpers
            keys |= {f"limits.{name}" for name in re.findall(r"number\(\"(\w+)\"", text)}
        for key in literal.findall(text):
            parts = key.rstrip(".").split(".")
            module = (root / "stagedoor" / f"{parts[0]}.py").exists() \
                or (root / "stagedoor" / parts[0]).is_dir()
            if key in loggers or (parts[0] in loggers and len(parts) == 1) or (module and (
                    len(parts) == 1 or parts[1][:1].isupper())):
                continue  # a module, a name in one, or a logger: not a config key
            keys.add(key.rstrip("."))
    assert "limits" in keys and "accessLog.enabled" in keys  # the scan finds them
    missing = []
    for key in sorted(keys):
        node = schema
        for part in key.split("."):
            props = node.get("properties", {})
            if part not in props:
                if node.get("additionalProperties") is False:
                    missing.append(key)
                break
            node = props[part]
    assert missing == []


# -- the property through the whole decision -------------------------------------------------------
class _Jane:
    def verify(self, token: str, plugin_id: str):
        from stagedoor.auth import Principal

        return Principal("user", "user:default/jane", source="test")


_PROPERTY_POLICY = """\
pluginId: notes
routes:
  - path: /search
    auth: [user]
    query:
      q: {pattern: "^[a-z ]{1,20}$", required: true}
      tag: {pattern: "^[a-z]{1,10}$", repeated: true}
      page: {pattern: "^[0-9]{1,4}$"}
    upstream: {url: "http://127.0.0.1:9/v1/search", query: {source: stagedoor}}
"""
_QUERY_PIECES = st.one_of(
    st.sampled_from(["q", "tag", "page", "token", "Q", "q[]", "%71", "tag%00", "", "source",
                     "a=b", "q=a", "&", "=", "+", "%", "%zz", "?", "#"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 %+=&;/?-_.~[]", max_size=12))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_QUERY_PIECES, _QUERY_PIECES), max_size=8),
       st.sampled_from(["&", ";", "&&"]))
def test_property_no_undeclared_parameter_or_bad_value_ever_reaches_the_upstream(pairs, sep):
    """Over generated query strings, through decide(): a forward's upstream query holds only
    declared parameters (plus the fixed one), each value matching its pattern in full."""
    import tempfile

    from stagedoor.decide import Forward, GatewayRequest, decide

    global _PROPERTY_POLICIES
    if _PROPERTY_POLICIES is None:
        directory = Path(tempfile.mkdtemp())
        (directory / "notes.yaml").write_text(_PROPERTY_POLICY)
        _PROPERTY_POLICIES = load_policies(directory, Config())
    raw = sep.join(f"{k}={v}" for k, v in pairs)
    target = "/api/notes/search?" + raw
    decision = decide(GatewayRequest("GET", target, ("Bearer x",)), _PROPERTY_POLICIES, _Jane())
    if not isinstance(decision, Forward):
        assert decision.check in ("query", "path"), decision
        return
    route = decision.route
    assert route is not None
    path, _, query = decision.upstream.path.partition("?")
    assert path == "/v1/search"
    seen_q = 0
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=True):
        if name == "source":
            assert value == "stagedoor"
            continue
        rule = route.query.rule(name)
        assert rule is not None, (raw, name)
        assert rule.pattern.fullmatch(value), (raw, name, value)
        seen_q += name == "q"
    assert seen_q == 1  # required, not repeatable


_PROPERTY_POLICIES = None


def test_check_prints_warnings_and_still_passes(tmp_path):
    import sys

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "w.yaml").write_text(textwrap.dedent("""\
        pluginId: w
        routes:
          - path: /a
            upstream:
              url: https://127.0.0.1:9443/a
              tls: {insecureSkipVerify: true}
          - path: /b
            upstream:
              url: http://api.example.com/b
              headers: {Authorization: "Bearer ${w.token}"}
        """))
    config = tmp_path / "app-config.yaml"
    config.write_text("backend:\n  baseUrl: http://127.0.0.1:7007\nw:\n  token: s3cret-w-token\n")
    result = forkserver.run([sys.executable, "-m", "stagedoor_addons", "check", "--config",
                             str(config), "--policies", str(policies)], text=True)
    assert result.returncode == 0, result.stderr
    assert f"{policies}/w.yaml:6: warning: tls.insecureSkipVerify" in result.stderr
    assert f"{policies}/w.yaml:9: warning: a secret is sent to http://api.example.com over " \
           "plain http (not loopback): use https" in result.stderr
    assert "s3cret-w-token" not in result.stderr + result.stdout
