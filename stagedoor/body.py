"""Request bodies: content type, size and a JSON Schema, checked before anything is forwarded.

A route's ``body:`` is compiled once at load (:func:`compile_body_schema`); per request
:func:`check_body` answers None (acceptable) or the error to send: 415 for another content type,
413 over ``maxBytes``, 400 InputError for a body that is not JSON or violates the schema. The
messages name the problem and the JSON Pointer of the failing location, never the body's
content (at most the first character of a string, as ``'x...'``).

The ``jsonschema`` validator is the reference: it decides every rejection and writes its
message. A body it would accept is recognised first by a compiled ``jsonschema-rs`` validator of
the same schema (:class:`BodyValidator`, ~1 µs instead of ~35-150 µs in the proxy), built so that
it never accepts what the reference refuses: ``pattern``, ``multipleOf`` and ``format`` run the
reference's own Python code, schemas with ``patternProperties`` (keys matched by another regex
dialect) and bodies with numbers a 64-bit float cannot hold exactly go to the reference only.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from .errors import ApiError

log = logging.getLogger("stagedoor.body")

DEFAULT_CONTENT_TYPE = "application/json"
_SIZE = re.compile(r"\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*")
_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
          "GB": 1000**3, "GiB": 1024**3}


def parse_size(value: Any) -> int:
    """``65536``, ``64KiB``, ``1MB`` -> bytes. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(str(value))
        if not match:
            raise ValueError(f"invalid size {value!r} (use e.g. 65536, 64KiB, 1MB)")
        size = int(match.group(1)) * _UNITS[match.group(2)]
    if size < 1:
        raise ValueError(f"size {value!r} must be at least 1 byte")
    return size


def media_type(content_type: str | None) -> str:
    """``Application/JSON; charset=utf-8`` -> ``application/json``."""
    return (content_type or "").partition(";")[0].strip().lower()


def is_json_type(content_type: str | None) -> bool:
    kind = media_type(content_type)
    return kind == "application/json" or (kind.startswith("application/")
                                           and kind.endswith("+json"))


@dataclass(frozen=True, slots=True)
class BodyRule:
    """A route's ``body:``. ``schema`` is the plain schema (for OpenAPI), ``validator`` its
    compiled form (None: any JSON)."""

    content_type: str = DEFAULT_CONTENT_TYPE
    max_bytes: int | None = None
    schema: dict[str, Any] | None = None
    validator: Any = None

    @property
    def parses_json(self) -> bool:
        return is_json_type(self.content_type)


# -- load time -----------------------------------------------------------------------------------
class BodySchemaError(Exception):
    """A route's body schema is not usable: ``path`` is where in the schema (keys, indices)."""

    def __init__(self, message: str, path: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def _load_schema_file(path: Path) -> Any:
    import yaml

    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def _external_refs(node: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """Every ``$ref`` that points outside its own document, with where it is."""
    found: list[tuple[str, tuple[Any, ...]]] = []

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                found.append((ref, (*path, "$ref")))
            for key, child in value.items():
                walk(child, (*path, key))
        elif isinstance(value, list):
            for index, child in enumerate(value):
                walk(child, (*path, index))

    walk(node, ())
    return found


def compile_body_schema(schema: dict[str, Any], policy_file: Path
                        ) -> tuple[dict[str, Any], Draft202012Validator]:
    """Check and compile a route's body schema; ``$ref: file`` (relative to the policy file,
    JSON or YAML, no network) is loaded now, recursively. Returns the schema as documented
    (references inlined where the whole schema is one ``$ref``) and its validator.

    Raises :class:`BodySchemaError`.
    """
    base = policy_file.resolve().parent
    root_uri = policy_file.resolve().as_uri()
    registry: Registry = Registry()
    loaded: dict[str, Any] = {}
    pending = [(root_uri, schema, ())]
    while pending:
        uri, document, where = pending.pop()
        for ref, path in _external_refs(document):
            target = ref.partition("#")[0]
            if "://" in target:
                raise BodySchemaError(f"body schema $ref {ref!r}: only files next to the policy "
                                      "are allowed (no URLs)", where or path)
            file = (Path(uri.removeprefix("file://")).parent / target).resolve() \
                if uri != root_uri else (base / target).resolve()
            file_uri = file.as_uri()
            if file_uri in loaded:
                continue
            try:
                content = _load_schema_file(file)
            except (OSError, ValueError) as exc:
                raise BodySchemaError(f"body schema $ref {ref!r}: cannot read {file}: "
                                      f"{exc}", where or path) from None
            except Exception as exc:  # YAML errors
                raise BodySchemaError(f"body schema $ref {ref!r}: {file} is not valid YAML "
                                      f"or JSON: {exc}", where or path) from None
            if not isinstance(content, dict | bool):
                raise BodySchemaError(f"body schema $ref {ref!r}: {file} is not a schema",
                                      where or path)
            try:
                Draft202012Validator.check_schema(content)
            except SchemaError as exc:
                raise BodySchemaError(f"body schema {file}: {_schema_error(exc)}",
                                      where or path) from None
            loaded[file_uri] = content
            registry = registry.with_resource(file_uri, Resource(content, DRAFT202012))
            pending.append((file_uri, content, where or path))
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise BodySchemaError(f"invalid body schema: {_schema_error(exc)}",
                              tuple(exc.absolute_path)) from None
    rooted = {"$id": root_uri, **schema} if "$id" not in schema else schema
    format_checker = FormatChecker()
    reference = Draft202012Validator(rooted, registry=registry, format_checker=format_checker)
    fast = _fast_validator(rooted, loaded, format_checker)
    return _inlined(schema, base, loaded, 0), BodyValidator(reference, fast)


class BodyValidator:
    """A route's compiled body schema: ``reference`` (``jsonschema``) decides and explains every
    rejection; ``fast`` (``jsonschema-rs``, or None) only ever answers "valid" sooner."""

    __slots__ = ("fast", "reference")

    def __init__(self, reference: Draft202012Validator, fast: Any = None) -> None:
        self.reference = reference
        self.fast = fast

    def iter_errors(self, document: Any) -> Iterator[ValidationError]:
        return self.reference.iter_errors(document)

    def first_error(self, document: Any, body: bytes) -> ValidationError | None:
        """The error to report (``best_match``), or None when the document is valid."""
        if self.fast is not None and not _INEXACT_NUMBER.search(body):
            try:
                if self.fast.is_valid(document):
                    return None
            except Exception:  # anything it cannot take (lone surrogates, ...)
                pass
        return best_match(self.reference.iter_errors(document))


#: A number ``jsonschema-rs`` may not compare exactly as Python does (it holds floats as 64-bit
#: floats; ``1e400`` is infinity): 16 or more digits in a row, or a digit followed by a 3-digit
#: exponent. Such a body (or one with such digits in a string) is checked by the reference only.
#: (Written with a leading digit: ~2x faster to search than the two alternatives on their own.)
_INEXACT_NUMBER = re.compile(rb"[0-9](?:[0-9]{15}|[eE][+-]?[0-9]{3})")


def _keywords_in(node: Any, found: dict[str, set[Any]]) -> None:
    """Every ``format`` value and whether ``patternProperties`` occurs, anywhere in ``node``
    (object keys taken as keywords: a property of that name only makes this conservative)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("format", "patternProperties"):
                found.setdefault(key, set()).add(value if isinstance(value, str) else None)
            _keywords_in(value, found)
    elif isinstance(node, list):
        for item in node:
            _keywords_in(item, found)


def _fast_validator(rooted: dict[str, Any], loaded: dict[str, Any],
                    format_checker: FormatChecker) -> Any:
    """A ``jsonschema-rs`` validator that accepts no document the reference refuses, or None."""
    found: dict[str, set[Any]] = {}
    for document in (rooted, *loaded.values()):
        _keywords_in(document, found)
    if "patternProperties" in found:
        return None
    try:
        import jsonschema_rs
    except ImportError:  # pragma: no cover - a platform without its wheel: the reference only
        return None

    class Pattern:
        """``pattern`` as the reference runs it: Python's ``re.search``."""

        def __init__(self, parent: Any, value: Any, schema_path: Any) -> None:
            self.regex = re.compile(value)

        def validate(self, instance: Any) -> None:
            if isinstance(instance, str) and not self.regex.search(instance):
                raise ValueError("pattern")

    class MultipleOf:
        """``multipleOf`` as the reference runs it (its float arithmetic included)."""

        def __init__(self, parent: Any, value: Any, schema_path: Any) -> None:
            self.check = Draft202012Validator({"multipleOf": value}).is_valid

        def validate(self, instance: Any) -> None:
            if not self.check(instance):
                raise ValueError("multipleOf")

    def conforms(name: str) -> Callable[[str], bool]:
        return lambda instance: format_checker.conforms(instance, name)

    names = set(format_checker.checkers) | {n for n in found.get("format", ()) if n}
    resources = [(uri, content) for uri, content in loaded.items()]

    def no_retrieval(uri: str) -> Any:
        raise ValueError(f"not loaded: {uri}")

    try:
        return jsonschema_rs.Draft202012Validator(
            rooted, validate_formats=True, formats={n: conforms(n) for n in names},
            keywords={"pattern": Pattern, "multipleOf": MultipleOf},
            registry=jsonschema_rs.Registry(resources, retriever=no_retrieval)
            if resources else None,
            retriever=no_retrieval)
    except Exception as exc:  # a schema it cannot compile: the reference only
        log.debug("body schema: no fast validator (%s); jsonschema alone", exc)
        return None


def _inlined(node: Any, base: Path, loaded: dict[str, Any], depth: int) -> Any:
    """The schema with every ``$ref`` to a file replaced by that file's (inlined) schema: one
    self-contained schema for the OpenAPI document. References inside a file stay."""
    if depth > 32:  # a cycle of files: leave the reference
        return node
    if isinstance(node, list):
        return [_inlined(item, base, loaded, depth) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _inlined(v, base, loaded, depth) for k, v in node.items() if k != "$ref"}
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#") and "#" not in ref:
        file = (base / ref).resolve()
        content = loaded.get(file.as_uri())
        if isinstance(content, dict):
            target = _inlined(content, file.parent, loaded, depth + 1)
            return {**{k: v for k, v in target.items() if k not in ("$schema", "$id")}, **out}
    if ref is not None:
        out["$ref"] = ref
    return out


def _schema_error(exc: SchemaError) -> str:
    where = "/".join(str(p) for p in exc.absolute_path)
    return f"{exc.message}" + (f" (at {where})" if where else "")


# -- per request ---------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: ``json.loads(text, parse_constant=...)`` builds a decoder per call (~3.5 µs); this one is
#: built once. ``json.loads`` also refuses a leading BOM: :func:`_parse_json` does as well.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _parse_json(text: str) -> Any:
    """``json.loads(text, parse_constant=_reject_constant)``, with a decoder built once."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


def check_body_head(rule: BodyRule, content_type: str | None, content_encoding: str | None,
                    content_length: int | None) -> ApiError | None:
    """What the head already tells about the body: refused before a byte of it is read."""
    if content_encoding and content_encoding.strip().lower() not in ("", "identity"):
        return ApiError(415, f"Unsupported Content-Encoding; send the body as {rule.content_type}"
                        " without compression", name="UnsupportedMediaTypeError")
    if media_type(content_type) != rule.content_type.lower():
        return ApiError(415, f"Unsupported Media Type: this endpoint accepts "
                        f"{rule.content_type}", name="UnsupportedMediaTypeError")
    if rule.max_bytes is not None and content_length is not None \
            and content_length > rule.max_bytes:
        return ApiError(413, f"request entity too large (at most {rule.max_bytes} bytes)")
    return None


def check_body(rule: BodyRule, content_type: str | None, content_encoding: str | None,
               body: bytes) -> ApiError | None:
    """None when the body is acceptable, else the error to answer (no body content in it)."""
    problem = check_body_head(rule, content_type, content_encoding, len(body))
    if problem is not None:
        return problem
    if not rule.parses_json:
        return None
    if not body.strip():
        return ApiError(400, "Invalid request body: the body is empty")
    try:
        document = _parse_json(body.decode("utf-8"))
    except UnicodeDecodeError:
        return ApiError(400, "Invalid request body: not UTF-8")
    except json.JSONDecodeError as exc:
        return ApiError(400, f"Invalid request body: {exc.msg} (line {exc.lineno}, column "
                        f"{exc.colno})")
    except (ValueError, RecursionError) as exc:
        text = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        return ApiError(400, f"Invalid request body: {text}")
    if rule.validator is None:
        return None
    try:
        error = rule.validator.first_error(document, body)
    except RecursionError:
        return ApiError(400, "Invalid request body: nested too deeply")
    if error is None:
        return None
    return ApiError(400, f"Invalid request body: {describe(error)}")


def pointer(path: Any) -> str:
    """RFC 6901 JSON Pointer of a path (``""`` is the whole document)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _preview(value: Any) -> str:
    """A value named without showing it: strings by their first character only."""
    if isinstance(value, str):
        return f"'{value[:1]}...'" if value else "''"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "the value"


def _short(text: str, limit: int = 64) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[:limit] + "..."


_DESCRIBE: dict[str, Callable[[ValidationError], str]] = {
    "maxLength": lambda e: f"{_preview(e.instance)} is too long (maxLength {e.validator_value})",
    "minLength": lambda e: f"{_preview(e.instance)} is too short (minLength {e.validator_value})",
    "type": lambda e: f"{_preview(e.instance)} is not of type "
                      + ", ".join(repr(t) for t in (e.validator_value if isinstance(
                          e.validator_value, list) else [e.validator_value])),
    "required": lambda e: e.message,  # "'text' is a required property": names from the schema
    "pattern": lambda e: f"{_preview(e.instance)} does not match {e.validator_value!r}",
    "enum": lambda e: f"{_preview(e.instance)} is not one of the allowed values",
    "const": lambda e: f"{_preview(e.instance)} is not the allowed value",
    "maximum": lambda e: f"{_preview(e.instance)} is above the maximum {e.validator_value}",
    "minimum": lambda e: f"{_preview(e.instance)} is below the minimum {e.validator_value}",
    "exclusiveMaximum": lambda e: f"{_preview(e.instance)} is not below {e.validator_value}",
    "exclusiveMinimum": lambda e: f"{_preview(e.instance)} is not above {e.validator_value}",
    "maxItems": lambda e: f"has too many items (maxItems {e.validator_value})",
    "minItems": lambda e: f"has too few items (minItems {e.validator_value})",
    "maxProperties": lambda e: f"has too many properties (maxProperties {e.validator_value})",
    "minProperties": lambda e: f"has too few properties (minProperties {e.validator_value})",
    "uniqueItems": lambda e: "has non-unique items",
    "format": lambda e: f"{_preview(e.instance)} is not a valid {e.validator_value}",
    "multipleOf": lambda e: f"is not a multiple of {e.validator_value}",
}


def describe(error: ValidationError) -> str:
    """``/text: 'x...' is too long (maxLength 500)``: where, and what is wrong."""
    where = pointer(error.absolute_path) or "/"
    kind = str(error.validator)
    if kind in ("additionalProperties", "unevaluatedProperties") and isinstance(
            error.instance, dict):
        allowed = set(error.schema.get("properties", {})) if isinstance(error.schema,
                                                                          dict) else set()
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            return f"{pointer([*error.absolute_path, extra[0]])}: property " \
                   f"'{_short(extra[0])}' is not allowed"
    text = _DESCRIBE.get(kind, lambda e: f"does not satisfy '{kind}'")(error)
    return f"{where}: {text}"
