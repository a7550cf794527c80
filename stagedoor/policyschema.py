"""The policy file format and the ``stagedoor.*`` config keys as JSON Schema (2020-12).

The schemas live in ``stagedoor/schemas/``; they are the one description of the formats: the
loader checks structure with them (unknown keys, types, enums), editors complete with them
(``# yaml-language-server: $schema=...``) and ``docs/policy-reference.md`` is generated from
them (:mod:`stagedoor.policydoc`). Code keeps only what a schema cannot say (regexes compile,
routes do not clash, templates name known parameters, referenced files exist).

Problems come back as ``(line, message)``: the line is found by walking the YAML nodes along
the error's path, so every message reads ``file:line: message``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from .yamlsource import LinedList, LinedMap, plain

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
POLICY_SCHEMA = SCHEMA_DIR / "policy.schema.json"
CONFIG_SCHEMA = SCHEMA_DIR / "config.schema.json"
#: What shipped policies put on their first line so editors find the schema.
SCHEMA_URL = ("https://raw.githubusercontent.com/stagedoor/stagedoor/main/stagedoor/schemas/"
              "policy.schema.json")


@cache
def load_schema(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _as_number(instance: Any) -> float | None:
    """A number, or a string that spells one (``${VAR}`` values are always strings)."""
    if isinstance(instance, bool):
        return None
    if isinstance(instance, int | float):
        return instance
    if isinstance(instance, str):
        try:
            return float(instance)
        except ValueError:
            return None
    return None


def _bound(validator: Any, bound: float, instance: Any, schema: dict[str, Any]) -> Any:
    """``minimum`` / ``maximum`` that also hold numbers written as strings; the message says
    both bounds: ``must be between 0 and 300, got 500``."""
    value = _as_number(instance)
    if value is None:
        return
    low, high = schema.get("minimum"), schema.get("maximum")
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        if low is not None and high is not None:
            want = f"between {_figure(low)} and {_figure(high)}"
        else:
            want = f"at least {_figure(low)}" if low is not None else f"at most {_figure(high)}"
        yield ValidationError(f"must be {want}, got {instance}")


def _figure(value: float) -> str:
    """``1099511627776`` rather than ``1.09951e+12``; ``0.05`` as is."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _bound_once(validator: Any, bound: float, instance: Any, schema: dict[str, Any]) -> Any:
    if "minimum" in schema:  # "minimum" reports both bounds; "maximum" only when alone
        return
    yield from _bound(validator, bound, instance, schema)


#: Draft 2020-12 with ranges that see numbers written as strings.
_ConfigValidator = validators.extend(Draft202012Validator,
                                     {"minimum": _bound, "maximum": _bound_once})


@cache
def _validator(path: Path, definition: str | None = None) -> Draft202012Validator:
    schema = load_schema(path)
    validator = (_ConfigValidator if path == CONFIG_SCHEMA else Draft202012Validator)(schema)
    if definition is not None:  # a sub-schema; "#/$defs/..." still resolve against the root
        validator = validator.evolve(schema=schema["$defs"][definition])
    return validator


_MISSING = re.compile(r"missing '([^']+)' in .*")


def config_errors(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], bool, str]]:
    """Structure problems of the config keys stagedoor reads, as ``(path, missing,
    message)``: ``missing`` when the problem is a required key without a value (``path``
    then names that key), which :mod:`stagedoor.config` words as Backstage does."""
    found: dict[tuple[Any, ...], tuple[tuple[Any, ...], bool, str]] = {}
    for error in _validator(CONFIG_SCHEMA).iter_errors(_without_empty(data)):
        if error.validator == "required" and isinstance(error.instance, dict):
            for name in error.validator_value:
                if name not in error.instance:
                    path = (*error.absolute_path, name)
                    found.setdefault(path, (path, True, ""))
            continue
        for path, message in _messages(error):
            missing = _MISSING.fullmatch(message)
            if missing:  # a required key inside an alternative
                whole = (*path, missing.group(1))
                found.setdefault(whole, (whole, True, ""))
            else:
                found.setdefault((*path, "\0", message), (tuple(path), False, message))
    return [found[k] for k in sorted(found, key=lambda k: [str(p) for p in k])]


def structure_errors(doc: Any, definition: str | None = None
                     ) -> list[tuple[tuple[Any, ...], int, str]]:
    """``(path, line, message)`` for every structure problem of a policy document."""
    validator = _validator(POLICY_SCHEMA, definition)
    out = []
    for error in validator.iter_errors(plain(doc)):
        for path, message in _messages(error):
            out.append((tuple(path), line_of(doc, path), message))
    out.sort(key=lambda item: item[1])
    return _dedupe(out)


def _dedupe(items: list[tuple[tuple[Any, ...], int, str]]
            ) -> list[tuple[tuple[Any, ...], int, str]]:
    seen: set[tuple[int, str]] = set()
    out = []
    for path, line, message in items:
        if (line, message) not in seen:
            seen.add((line, message))
            out.append((path, line, message))
    return out


def _without_empty(value: Any) -> Any:
    """Config keys without a value (an unset ``${VAR}``) are absent, not wrong."""
    if isinstance(value, dict):
        return {k: _without_empty(v) for k, v in value.items() if v is not None}
    return value


# -- lines ---------------------------------------------------------------------------------------
def line_of(doc: Any, path: Sequence[Any]) -> int:
    """The line of the YAML node at ``path`` (a key's own line for mapping entries); the
    nearest known ancestor's line when the path runs out of nodes."""
    node = doc
    line = getattr(doc, "line", 1)
    for part in path:
        if isinstance(node, LinedMap) and isinstance(part, str) and part in node.values:
            line = node.line_of(part)
            node = node.values[part]
        elif isinstance(node, LinedList) and isinstance(part, int) and part < len(node.items):
            line = node.item_lines[part] if part < len(node.item_lines) else node.line
            node = node.items[part]
        else:
            break
    return line


# -- messages ------------------------------------------------------------------------------------
_SHAPE = ("type", "enum", "const", "pattern")
_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number",
               "boolean": "true or false", "array": "a list", "object": "a mapping",
               "null": "empty"}


def kind_of(value: Any) -> str:
    """What a (YAML/JSON) value is, in words, without showing it."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _definition(ref: str) -> dict[str, Any] | None:
    """``#/$defs/x`` in either schema."""
    name = ref.rpartition("/")[2]
    for file in (POLICY_SCHEMA, CONFIG_SCHEMA):
        found = load_schema(file).get("$defs", {}).get(name)
        if found is not None:
            return found
    return None


def _name(path: Sequence[Any], schema: dict[str, Any]) -> str:
    """How a message names the thing at ``path``: its key, or the schema's title."""
    for part in reversed(path):
        if isinstance(part, str):
            return f"'{part}'"
    return str(schema.get("title", "the document"))


def _expected(schema: dict[str, Any]) -> str:
    """What a (sub)schema wants, in words."""
    if "enum" in schema:
        return "one of " + ", ".join(str(v) for v in schema["enum"] if not
                                     (isinstance(v, str) and v.islower() and v.upper() in
                                      schema["enum"]))
    if "$ref" in schema:
        target = _definition(schema["$ref"])
        return _expected(target) if target else str(schema["$ref"].rsplit("/", 1)[-1])
    if "title" in schema:
        if schema.get("type") == "object":
            return f"a mapping ({schema['title']})"
        return str(schema["title"])
    types = schema.get("type")
    if isinstance(types, str):
        return _TYPE_WORDS.get(types, types)
    if isinstance(types, list):
        return " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    return "something else"


def _messages(error: ValidationError) -> list[tuple[list[Any], str]]:
    """One error -> ``(path, message)`` pairs (several for several unknown keys)."""
    path = list(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    name = _name(path, schema)
    hint = schema.get("x-error")
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(schema.get("properties", {}))
        title = schema.get("title") or name
        out = []
        for key in error.instance:
            if key in allowed:
                continue
            message = f"unknown key '{key}' in {title}"
            if allowed:
                message += f" (allowed: {', '.join(allowed)})"
            else:  # additionalProperties with a schema: the value is what was wrong
                continue
            out.append(([*path, key], message))
        return out
    if hint:
        return [(path, str(hint).replace("{value}", repr(error.instance))
                 .replace("{name}", name))]
    if kind == "required":
        missing = [k for k in error.validator_value if k not in (error.instance or {})]
        title = schema.get("title") or name
        return [(path, f"missing '{key}' in {title}") for key in missing]
    if kind == "type":
        return [(path, f"{name} must be {_expected(schema)}, got {kind_of(error.instance)}")]
    if kind == "enum":
        return [(path, f"{name} must be {_expected(schema)}, got {error.instance!r}")]
    if kind in ("minimum", "maximum"):
        return [(path, f"{name} {error.message}")]
    if kind == "pattern":
        return [(path, f"{name}: {error.instance!r} does not match {error.validator_value}")]
    if kind in ("anyOf", "oneOf"):
        options = [_expected(option) for option in error.validator_value]
        # The alternative whose type fits the value is what the author meant: say what is
        # wrong inside it (an unknown key in the mapping form, say) rather than "must be X or Y".
        branches: dict[Any, list[ValidationError]] = {}
        for sub in error.context or ():
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        fitting = [errors for errors in branches.values()
                   if not any(e.validator in _SHAPE and not e.relative_path for e in errors)]
        if len(fitting) == 1:
            return [m for sub in fitting[0] for m in _messages(sub)]
        deepest = best_match(error.context) if error.context else None
        if deepest is not None and len(deepest.absolute_path) > len(path):
            return _messages(deepest)  # the right shape, wrong inside: say what is wrong
        return [(path, f"{name} must be {' or '.join(options)}, got {kind_of(error.instance)}"
                 + (f" {error.instance!r}" if isinstance(error.instance, str | int) else ""))]
    return [(path, f"{name}: {error.message}")]
