"""Backstage-style app-config: layered YAML files with ``${VAR}`` substitution.

Semantics (see docs/behaviour.md, "Config"):

- Files are read in order; a later file overrides an earlier one key by key (mappings merge,
  everything else is replaced).
- A string ``${VAR}`` is replaced by the environment variable ``VAR``; ``$${VAR}`` is the
  literal text ``${VAR}``. If a variable is unset, the key is left without a value.
- ``{$file: path}`` is replaced by the file's text (relative to the config file; one trailing
  newline removed) and ``{$env: VAR}`` by the variable, as in Backstage: how secrets are read.
- The keys stagedoor reads (``stagedoor.*`` and the Backstage keys ``backend.baseUrl``,
  ``backend.auth.*``, ``discovery.endpoints``, ``permission.*``, ``backend.rateLimit``) are
  checked against ``stagedoor/schemas/config.schema.json`` for structure (types, required
  keys, enums, ranges, unknown keys where stagedoor owns the key space); the settings readers
  keep only semantic checks (base64, URL shapes, duplicates, cross-key rules).
- Every problem is reported at once, as ``file:line: message``: the config remembers the line
  of every key (:meth:`Config.where`), and the readers report into :meth:`Config.collecting`
  instead of raising on the first problem.
- Reading a required key that has no value raises :class:`MissingConfigError`, whose message
  names the key and the file that declares it (or the last file given, if none does), in
  Backstage's wording.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_ENV_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_MISSING = object()


class ConfigError(Exception):
    """A config file cannot be read or a value has the wrong type.

    ``problems`` lists every problem found, one ``file:line: message`` line each (the message
    of a single problem found outside a collecting load has no location prefix).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class MissingConfigError(ConfigError):
    """A required config key has no value."""

    def __init__(self, key: str, file: str) -> None:
        super().__init__(f"Missing required config value at '{key}' in '{file}'")
        self.key = key
        self.file = file


def substitute_env(text: str, env: Mapping[str, str]) -> str | None:
    """Apply ``${VAR}`` / ``$${VAR}`` substitution; None when a referenced variable is unset."""
    missing = False

    def replace(match: re.Match[str]) -> str:
        nonlocal missing
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return "${" + name + "}"
        value = env.get(name.strip())
        if value is None:
            missing = True
            return ""
        return value

    result = _ENV_REF.sub(replace, text)
    return None if missing else result


@dataclass
class Config:
    """The merged configuration and, for every key path, the file that declared it last."""

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    #: key path -> the environment variables it reads that are not set (why it has no value).
    unset_env: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: key path (``a.b[0].c``) -> (file, line) of the key where it was last declared.
    lines: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: Structure problems the schema found (``load_config(strict=False)``), as (key, error).
    problems: list[tuple[str, ConfigError]] = field(default_factory=list)
    #: Whether ``problems`` holds the schema's findings (load_config does it; a Config made
    #: from data is checked on its first :meth:`collecting`).
    checked: bool = False
    _sink: list[tuple[str, ConfigError]] | None = field(default=None, repr=False,
                                                        compare=False)

    # -- reading -------------------------------------------------------------------------------
    def _lookup(self, key: str) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return _MISSING if node is None else node

    def _origin(self, key: str) -> str:
        parts = key.split(".")
        for end in range(len(parts), 0, -1):
            origin = self.origins.get(".".join(parts[:end]))
            if origin:
                return origin
        return self.files[-1] if self.files else "<no config file>"

    def where(self, key: str) -> str:
        """``file:line`` of ``key`` (``a.b[0].c``), else of its nearest declared ancestor, else
        the file that would declare it, line 1."""
        parts = _key_parts(key)
        for end in range(len(parts), 0, -1):
            found = self.lines.get(_join(parts[:end]))
            if found:
                return f"{found[0]}:{found[1]}"
        return f"{self._origin(key)}:1"

    # -- collecting problems -------------------------------------------------------------------
    @contextmanager
    def collecting(self, raise_at_exit: bool = True
                   ) -> Iterator[list[tuple[str, ConfigError]]]:
        """Within it, :meth:`report` (and the typed getters) record problems instead of
        raising. At the outermost exit with ``raise_at_exit``: one problem is raised as itself,
        several as one :class:`ConfigError` listing them all (``file:line: message``). Nested
        uses share the outer list and never raise."""
        if self._sink is not None:
            yield self._sink
            return
        if not self.checked:
            self.problems = _schema_problems(self)
            self.checked = True
        self._sink = sink = list(self.problems)
        try:
            yield sink
        finally:
            self._sink = None
        if raise_at_exit and sink:
            if len(sink) == 1:
                raise sink[0][1]
            raise self.error(sink)

    def error(self, problems: list[tuple[str, ConfigError]]) -> ConfigError:
        """One error listing ``problems``, each as ``file:line: message``, in file order."""
        lines = self.render(problems)
        return ConfigError("\n".join(lines), lines)

    def render(self, problems: list[tuple[str, ConfigError]]) -> list[str]:
        order = {name: i for i, name in enumerate(self.files)}

        def position(item: tuple[str, str]) -> tuple[int, int]:
            file, _, line = item[0].rpartition(":")
            return order.get(file, len(order)), int(line) if line.isdigit() else 0

        located = [(self.where(key), str(exc)) for key, exc in problems]
        located.sort(key=position)
        return list(dict.fromkeys(f"{where}: {message}" for where, message in located))

    def report(self, key: str, error: ConfigError) -> None:
        """Record ``error`` about ``key`` (or raise it outside :meth:`collecting`). A key whose
        ancestor, descendant or self already has a problem is not reported again: one mistake,
        one line."""
        if self._sink is None:
            raise error
        if not any(related(key, other) for other, _ in self._sink):
            self._sink.append((key, error))

    def reported(self) -> list[tuple[str, ConfigError]]:
        """The problems reported so far in this collecting run (empty outside one)."""
        return list(self._sink or ())

    def invalid(self, key: str, problem: str) -> None:
        """Report "Invalid config value at 'key' in 'file': problem"."""
        self.report(key, ConfigError(f"Invalid config value at '{key}' in "
                                     f"'{self._origin(key)}': {problem}"))

    def missing(self, key: str, file: str | None = None) -> None:
        """Report Backstage's "Missing required config value at 'key' in 'file'"."""
        self.report(key, MissingConfigError(key, file or self._origin(key)))

    def guard(self, key: str, read: Callable[[], T], fallback: T) -> T:
        """``read()``; while collecting, a ConfigError it raises is reported (about ``key``, or
        the missing key it names) and ``fallback`` returned: one broken entry does not hide
        the next one's problems."""
        try:
            return read()
        except MissingConfigError as exc:
            self.report(exc.key, exc)
        except ConfigError as exc:
            self.report(key, exc)
        return fallback

    def _wrong_type(self, key: str, message: str) -> None:
        self.report(key, ConfigError(f"Invalid type in config for key '{key}' in "
                                     f"'{self._origin(key)}', {message}"))

    def has(self, key: str) -> bool:
        return self._lookup(key) is not _MISSING

    def get(self, key: str, default: Any = None) -> Any:
        value = self._lookup(key)
        return default if value is _MISSING else value

    def require(self, key: str) -> Any:
        value = self._lookup(key)
        if value is _MISSING:
            raise MissingConfigError(key, self._origin(key))
        return value

    def get_string(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, dict | list):
            self._wrong_type(key, f"got {type(value).__name__}, wanted string")
            return default
        return str(value)

    def require_string(self, key: str) -> str:
        self.require(key)
        value = self.get_string(key)
        return "" if value is None else value  # "": a wrong type, reported while collecting

    def get_number(self, key: str, default: float) -> float:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return default
        try:
            return float(value)
        except (TypeError, ValueError):
            self._wrong_type(key, f"got {value!r}, wanted a number")
            return default

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        self._wrong_type(key, f"got {value!r}, wanted a boolean")
        return default

    def get_list(self, key: str) -> list[Any]:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            self._wrong_type(key, f"got {type(value).__name__}, wanted a list")
            return []
        return value

    def get_mapping(self, key: str) -> dict[str, Any]:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            self._wrong_type(key, f"got {type(value).__name__}, wanted a mapping")
            return {}
        return value


_KEY_PART = re.compile(r"[^.\[\]]+|\[\d+\]")


def _key_parts(key: str) -> list[str]:
    """``a.b[0].c`` -> ``['a', 'b', '[0]', 'c']``."""
    return _KEY_PART.findall(key)


def _join(parts: list[str]) -> str:
    out = ""
    for part in parts:
        out += part if part.startswith("[") or not out else "." + part
    return out


def key_path(path: list[Any] | tuple[Any, ...]) -> str:
    """A schema error's path (``['a', 'b', 0, 'c']``) as a config key (``a.b[0].c``)."""
    return _join([f"[{p}]" if isinstance(p, int) else str(p) for p in path])


def related(a: str, b: str) -> bool:
    """One key is the other or an ancestor of it."""
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    return long == short or long.startswith((short + ".", short + "["))


def _key_lines(node: yaml.Node, file: str, prefix: str, out: dict[str, tuple[str, int]],
               seen: set[int]) -> None:
    """Record ``key path -> (file, line)`` for every key under ``node`` (aliases once)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[path] = (file, key_node.start_mark.line + 1)
            _key_lines(value_node, file, path, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = f"{prefix}[{index}]"
            out[path] = (file, item.start_mark.line + 1)
            _key_lines(item, file, path, out, seen)


#: Values one config file may expand to: YAML aliases are copied here, so a few hundred bytes
#: of nested aliases ("billion laughs") would otherwise become billions of objects.
MAX_VALUES = 100_000


def _include(value: dict[str, Any], env: Mapping[str, str], base: Path | None) -> Any:
    """Backstage's includes: ``{$file: path}`` (the file's text, one trailing newline removed;
    relative to the config file) and ``{$env: VAR}`` (unset: no value)."""
    kind, target = next(iter(value.items()))
    if not isinstance(target, str):
        raise ConfigError(f"{kind} must be a string, got {type(target).__name__}")
    if kind == "$env":
        return env.get(target.strip())
    path = Path(target)
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"$file {target!r}: cannot read {path}: {reason}") from None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _substituted(value: Any, env: Mapping[str, str], budget: list[int] | None = None,
                 base: Path | None = None) -> Any:
    budget = [MAX_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"more than {MAX_VALUES} values (nested aliases?)")
    if isinstance(value, str):
        return substitute_env(value, env)
    if isinstance(value, list):
        return [_substituted(item, env, budget, base) for item in value]
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) in ("$file", "$env"):
            return _include(value, env, base)
        return {str(k): _substituted(v, env, budget, base) for k, v in value.items()}
    return value


def unset_references(value: Any, env: Mapping[str, str], prefix: str = "",
                     found: dict[str, tuple[str, ...]] | None = None
                     ) -> dict[str, tuple[str, ...]]:
    """Key path -> names of the ``${VAR}`` it references that ``env`` does not set."""
    found = {} if found is None else found
    if isinstance(value, str):
        names = tuple(name.strip() for escaped, name in _ENV_REF.findall(value)
                      if not escaped and name.strip() not in env)
        if names:
            found[prefix] = names
    elif isinstance(value, list):
        for index, item in enumerate(value):
            unset_references(item, env, f"{prefix}[{index}]", found)
    elif isinstance(value, dict) and set(value) == {"$env"}:  # {$env: VAR}
        name = str(value["$env"]).strip()
        if name not in env:
            found[prefix] = (name,)
    elif isinstance(value, dict):
        for key, child in value.items():
            unset_references(child, env, f"{prefix}.{key}" if prefix else str(key), found)
    return found


def _merge(target: dict[str, Any], overlay: dict[str, Any], origins: dict[str, str],
           file: str, prefix: str = "") -> None:
    for key, value in overlay.items():
        path = f"{prefix}{key}"
        if value is None:
            # An unset ${VAR} (or an empty key) leaves the key without a value: it does not
            # erase what an earlier file gave, but it does say which file declares the key.
            origins.setdefault(path, file)
            target.setdefault(key, None)
            continue
        origins[path] = file
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, origins, file, path + ".")
        else:
            target[key] = value
            if isinstance(value, dict):
                _record_origins(value, origins, file, path + ".")


def _record_origins(value: dict[str, Any], origins: dict[str, str], file: str, prefix: str) -> None:
    for key, child in value.items():
        origins[f"{prefix}{key}"] = file
        if isinstance(child, dict):
            _record_origins(child, origins, file, f"{prefix}{key}.")


def _schema_problems(config: Config) -> list[tuple[str, ConfigError]]:
    """The schema's findings (``config.schema.json``) as ``(key, error)``; a required key
    without a value reads as Backstage says it."""
    from .policyschema import config_errors  # late: it loads jsonschema

    out: list[tuple[str, ConfigError]] = []
    for path, missing, message in config_errors(config.data):
        key = key_path(path)
        if missing:
            out.append((key, MissingConfigError(key, config._origin(key))))
        else:
            out.append((key, ConfigError(f"Invalid config value at '{key}' in "
                                         f"'{config._origin(key)}': {message}")))
    return out


def load_config(files: list[str | Path], env: Mapping[str, str] | None = None, *,
                strict: bool = True) -> Config:
    """Read and merge config files in order, then check their structure with the schema.

    A file that cannot be read or parsed raises :class:`ConfigError` naming the file. Structure
    problems raise one ``ConfigError`` listing them all (``file:line: message``), unless every
    one is a missing value (that raises when a reader requires the key). All of them are kept
    in ``config.problems``; with ``strict=False`` nothing raises here, for a load that goes on
    to collect the settings readers' problems too (:meth:`Config.collecting`)."""
    environ = os.environ if env is None else env
    config = Config(files=tuple(str(f) for f in files))
    for file in files:
        name = str(file)
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"Cannot read config file '{name}': {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark else name
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}: invalid YAML: {problem}") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise ConfigError(f"{name}:1: a config file must be a mapping at the top level")
        try:
            substituted = _substituted(loaded, environ, base=Path(file).parent)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        _merge(config.data, substituted, config.origins, name)
        config.unset_env.update(unset_references(loaded, environ))
        _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), name, "", config.lines, set())
    # A key another file gave a value after all is not missing.
    config.unset_env = {k: v for k, v in config.unset_env.items() if not config.has(k)}
    config.problems = _schema_problems(config)
    config.checked = True
    # A value that is only missing (an unset ${VAR}, say) stops a strict load no sooner than
    # something requires it: a tool that never reads the key still works.
    if strict and any(not isinstance(exc, MissingConfigError) for _, exc in config.problems):
        raise config.error(config.problems)
    return config
