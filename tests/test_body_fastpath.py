"""The compiled body validator (jsonschema-rs) only ever answers "valid" sooner: every body the
reference validator (jsonschema) refuses is still refused, with the reference's message
(stagedoor/body.py, issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagedoor.body import BodyRule, check_body, compile_body_schema


def _validator(tmp_path: Path, schema: dict) -> object:
    policy = tmp_path / "p.yaml"
    policy.write_text("")
    _, validator = compile_body_schema(schema, policy)
    return validator


# Bodies jsonschema-rs on its own would accept and jsonschema refuses: Python's regex dialect
# (\S does not match \x1c), Python's float arithmetic for multipleOf, Python's regex syntax for
# format: regex, and a number beyond a 64-bit float.
@pytest.mark.parametrize(("schema", "body", "message"), [
    ({"properties": {"t": {"type": "string", "pattern": r"^\S+$"}}}, b'{"t": "a\\u001cb"}',
     "Invalid request body: /t: 'a...' does not match '^\\\\S+$'"),
    ({"properties": {"m": {"multipleOf": 0.1}}}, b'{"m": 0.3}',
     "Invalid request body: /m: is not a multiple of 0.1"),
    ({"properties": {"r": {"type": "string", "format": "regex"}}}, b'{"r": "(?<n>a)"}',
     "Invalid request body: /r: '(...' is not a valid regex"),
    ({"properties": {"n": {"maximum": 10}}}, b'{"n": 1e400}',
     "Invalid request body: /n: a number is above the maximum 10"),
])
def test_what_the_reference_refuses_stays_refused(tmp_path, schema, body, message):
    validator = _validator(tmp_path, schema)
    assert validator.fast is not None  # the fast path is in use for these schemas
    rule = BodyRule("application/json", None, schema, validator)
    error = check_body(rule, "application/json", None, body)
    assert error is not None and error.status == 400 and error.message == message


def test_a_valid_body_is_answered_by_the_fast_validator(tmp_path):
    validator = _validator(tmp_path, {"type": "object", "required": ["text"],
                                      "properties": {"text": {"type": "string"}}})
    reference = validator.reference
    validator.reference = None  # would raise if it were asked
    rule = BodyRule("application/json", None, None, validator)
    assert check_body(rule, "application/json", None, b'{"text": "ok"}') is None
    validator.reference = reference
    assert check_body(rule, "application/json", None, b'{"text": 1}') is not None


def test_pattern_properties_are_left_to_the_reference(tmp_path):
    # Keys are matched by the validator's own regex dialect there: no fast path at all.
    assert _validator(tmp_path, {"patternProperties": {"^a": {"type": "string"}}}).fast is None


def test_a_referenced_file_is_used_by_the_fast_validator(tmp_path):
    (tmp_path / "note.json").write_text(json.dumps(
        {"type": "object", "properties": {"text": {"type": "string", "maxLength": 3}}}))
    validator = _validator(tmp_path, {"$ref": "note.json"})
    assert validator.fast is not None
    assert validator.fast.is_valid({"text": "abc"})
    assert not validator.fast.is_valid({"text": "abcd"})


SCHEMAS = [
    {"type": "object", "additionalProperties": False,
     "properties": {"text": {"type": "string", "maxLength": 5, "pattern": r"^\S+$"},
                    "tags": {"type": "array", "maxItems": 3, "uniqueItems": True,
                             "items": {"type": "string", "pattern": r"^[a-z]{1,4}$"}},
                    "n": {"type": "number", "multipleOf": 0.1, "maximum": 100},
                    "when": {"type": "string", "format": "date"},
                    "kind": {"enum": ["a", 1, True, None]}}},
    {"anyOf": [{"type": "integer", "minimum": 3}, {"type": "string", "format": "email"}]},
]
LEAF = (st.none() | st.booleans() | st.integers(-10, 200)
        | st.sampled_from([0.5, 1.0, 0.3, 2.5])
        | st.text(alphabet=st.sampled_from("ab_1 \x1c\u0661é@-"), max_size=7)
        | st.sampled_from(["2024-02-30", "2024-02-28", "x@y", "abc"]))
KEYS = st.sampled_from(["text", "tags", "n", "when", "kind", "zz"])
OBJECTS = st.dictionaries(KEYS, LEAF | st.lists(LEAF, max_size=4), max_size=4) | st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=8)
NOTES = st.fixed_dictionaries({}, optional={
    "text": LEAF, "n": LEAF, "when": LEAF, "kind": LEAF, "tags": st.lists(LEAF, max_size=3)})
DOCUMENTS = (NOTES | OBJECTS, LEAF | OBJECTS)  # one per schema


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_never_laxer_than_the_reference(tmp_path, index):
    validator = _validator(tmp_path, SCHEMAS[index])
    assert validator.fast is not None
    seen = {"valid": 0, "invalid": 0}

    @settings(max_examples=1000, deadline=None, database=None)
    @given(document=DOCUMENTS[index])
    def check(document: object) -> None:
        valid = validator.reference.is_valid(document)
        seen["valid" if valid else "invalid"] += 1
        if validator.fast.is_valid(document):
            assert valid, document

    check()
    assert seen["valid"] and seen["invalid"]  # both kinds were generated
