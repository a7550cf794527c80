"""Path canonicalisation and the route table."""

import pytest

from stagedoor.routing import PathRejected, PathTemplate, RouteTable, split_segments


@pytest.mark.parametrize(
    ("raw", "segments"),
    [
        ("", []),
        ("/", []),
        ("/services/payments-api", ["services", "payments-api"]),
        ("/services/payments-api/", ["services", "payments-api"]),
        ("/services/pay%2Fments", ["services", "pay/ments"]),
        ("/%73ervices/x", ["services", "x"]),
        ("/caf%C3%A9", ["café"]),
    ],
)
def test_split_segments_decodes(raw, segments):
    assert split_segments(raw) == segments


@pytest.mark.parametrize(
    "raw",
    [
        "/services/..", "/services/.", "/services/%2e%2e", "/services/%2E", "/a//b",
        "/a/%00", "/a/%0a", "/a/%zz", "/a/%", "/a/%C0%AE", "/a/%ff", "/a\\b", "/a/b%5c/../c",
        "/a/\u00e9", "services",
    ],
)
def test_split_segments_rejects_ambiguous_paths(raw):
    with pytest.raises(PathRejected):
        split_segments(raw)


def test_template_parses_params():
    template = PathTemplate.parse("/services/{id}/checks/{check}")
    assert template.param_names == ("id", "check")
    assert template.bind(["services", "a", "checks", "b"]) == {"id": "a", "check": "b"}


@pytest.mark.parametrize("text", ["services", "/a/{id}x", "/a/{id}/{id}", "/a//b", "/a/../b"])
def test_template_rejects_bad_paths(text):
    with pytest.raises(ValueError):
        PathTemplate.parse(text)


def table(*routes):
    t = RouteTable()
    for path, methods in routes:
        assert t.add(PathTemplate.parse(path), methods, (path, tuple(methods))) is None
    return t


def test_literal_beats_parameter():
    t = table(("/services/{id}", ["GET"]), ("/services/special", ["GET"]))
    assert t.match("GET", ["services", "special"]).entry[0] == "/services/special"
    assert t.match("GET", ["services", "other"]).entry[0] == "/services/{id}"


def test_backtracks_to_parameter_branch():
    t = table(("/a/b/c", ["GET"]), ("/a/{x}/d", ["GET"]))
    assert t.match("GET", ["a", "b", "d"]).entry[0] == "/a/{x}/d"


def test_method_found_on_less_specific_route():
    t = table(("/services/special", ["GET"]), ("/services/{id}", ["DELETE"]))
    assert t.match("DELETE", ["services", "special"]).entry[0] == "/services/{id}"


def test_wrong_method_lists_allowed_including_head():
    t = table(("/services/{id}", ["GET", "POST"]))
    result = t.match("PUT", ["services", "x"])
    assert result.entry is None
    assert result.allowed_methods == ("GET", "HEAD", "POST")


def test_head_served_by_get():
    t = table(("/health", ["GET"]))
    assert t.match("HEAD", ["health"]).entry[0] == "/health"


def test_no_match_is_none():
    assert table(("/health", ["GET"])).match("GET", ["nope"]) is None


def test_duplicate_shape_and_method_is_reported():
    t = RouteTable()
    t.add(PathTemplate.parse("/s/{id}"), ["GET"], "first")
    assert t.add(PathTemplate.parse("/s/{name}"), ["GET"], "second") == "first"
    assert t.add(PathTemplate.parse("/s/{name}"), ["POST"], "third") is None
