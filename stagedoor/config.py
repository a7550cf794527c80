"""Backstage-style app-config: layered YAML files with ``${VAR}`` substitution.

Semantics (see docs/behaviour.md, "Config"):

- Files are read in order; a later file overrides an earlier one key by key (mappings merge,
  everything else is replaced).
- A string ``${VAR}`` is replaced by the environment variable ``VAR``; ``$${VAR}`` is the
  literal text ``${VAR}``. If a variable is unset, the key is left without a value.
- ``{$file: path}`` is replaced by the file's text (relative to the config file; one trailing
  newline removed) and ``{$env: VAR}`` by the variable, as in Backstage: how secrets are read.
- The ``stagedoor.*`` keys are checked against ``stagedoor/schemas/config.schema.json``
  (unknown keys, types), every problem reported at once.
- Reading a required key that has no value raises :class:`MissingConfigError`, whose message
  names the key and the file that declares it (or the last file given, if none does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_ENV_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_MISSING = object()


class ConfigError(Exception):
    """A config file cannot be read or a value has the wrong type."""


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
            raise ConfigError(f"Invalid type in config for key '{key}' in '{self._origin(key)}', "
                              f"got {type(value).__name__}, wanted string")
        return str(value)

    def require_string(self, key: str) -> str:
        self.require(key)
        value = self.get_string(key)
        assert value is not None
        return value

    def get_number(self, key: str, default: float) -> float:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return default
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"Invalid type in config for key '{key}' in '{self._origin(key)}', "
                              f"got {value!r}, wanted a number") from None

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
        raise ConfigError(f"Invalid type in config for key '{key}' in '{self._origin(key)}', "
                          f"got {value!r}, wanted a boolean")

    def get_list(self, key: str) -> list[Any]:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"Invalid type in config for key '{key}' in '{self._origin(key)}', "
                              f"got {type(value).__name__}, wanted a list")
        return value

    def get_mapping(self, key: str) -> dict[str, Any]:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"Invalid type in config for key '{key}' in '{self._origin(key)}', "
                              f"got {type(value).__name__}, wanted a mapping")
        return value


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


def load_config(files: list[str | Path], env: Mapping[str, str] | None = None) -> Config:
    """Read and merge config files in order. Raises :class:`ConfigError` naming the file."""
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
    # A key another file gave a value after all is not missing.
    config.unset_env = {k: v for k, v in config.unset_env.items() if not config.has(k)}
    from .policyschema import config_problems  # the stagedoor.* keys' structure

    problems = config_problems(config.data, config._origin)
    if problems:
        raise ConfigError("\n".join(problems))
    return config
