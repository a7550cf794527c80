"""Every problem of a config + policy set in one run, for ``check`` and for a failed start.

The loader ``run`` and a reload use (:func:`stagedoor.runtime.load_state`) collects every
problem itself: the schema's structure problems, the settings readers' semantic ones and the
policies' (config values the policies read included), each as ``file:line: message``.
:func:`collect_problems` only turns its exceptions into that list.

Missing values that come from an unset ``${VAR}`` are summed up in :func:`env_hint`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .config import ConfigError, load_config
from .policy import PolicyLoadError

_MISSING_KEY = re.compile(r"Missing required config value at '([^']+)'")


def missing_key(message: str) -> str | None:
    """The config key a "Missing required config value at 'key'" message names, if any."""
    match = _MISSING_KEY.search(message)
    return match.group(1) if match else None


def problems_of(error: Exception) -> list[str]:
    """The problem lines of a failed :func:`~stagedoor.runtime.load_state`."""
    if isinstance(error, PolicyLoadError):
        return [str(p) for p in error.problems]
    if isinstance(error, ConfigError):
        return list(dict.fromkeys(error.problems))
    return [str(error)]


def collect_problems(config_files: Sequence[str], policy_dir: str) -> list[str]:
    """Every problem ``load_state`` finds, one per line (``[]``: it loads)."""
    from .runtime import load_state  # the one loader; imported late, it imports everything

    try:
        load_state([str(f) for f in config_files], policy_dir)
    except (ConfigError, PolicyLoadError) as exc:
        return problems_of(exc)
    return []


def env_hint(config_files: Sequence[str], problems: Sequence[str]) -> str | None:
    """``INSIGHTS_API_URL (insights.externalApiUrl), ...``: the unset environment variables
    behind the missing values in ``problems``; None when there are none."""
    try:
        unset = load_config([str(f) for f in config_files], strict=False).unset_env
    except ConfigError:
        return None
    named: dict[str, list[str]] = {}
    for problem in problems:
        key = missing_key(problem)
        for name in unset.get(key or "", ()):
            keys = named.setdefault(name, [])
            if key not in keys:
                keys.append(key or "")
    if not named:
        return None
    return ", ".join(f"{name} ({', '.join(keys)})" for name, keys in named.items())
