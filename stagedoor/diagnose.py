"""Every problem of a config + policy set in one run, for ``check`` and for a failed start.

Loading stops at the first config value it cannot read, so one run of the loader shows one
problem at a time. :func:`collect_problems` keeps going, still through the loader ``run`` and
a reload use (:func:`stagedoor.runtime.load_state`), never a copy of its rules:

1. config: load with a minimal policy; each missing value is recorded, given a placeholder
   in an overlay file, and the load repeated, until it passes or fails on something else;
2. policies: load the real policy directory with those placeholders, which reports every
   policy problem (the loader collects them all, missing config values included).

Missing values that come from an unset ``${VAR}`` are summed up in :func:`env_hint`.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, load_config
from .policy import PolicyLoadError

#: Loads repeated at most, one per missing config value found.
MAX_ROUNDS = 50
PLACEHOLDER = "http://stagedoor-check.invalid"
_MISSING_KEY = re.compile(r"Missing required config value at '([^']+)'")
_PROBE_POLICY = """\
pluginId: stagedoor-check
routes:
  - path: /health
    auth: unauthenticated
    respond: {status: 200, json: {}}
"""


def missing_key(message: str) -> str | None:
    """The config key a "Missing required config value at 'key'" message names, if any."""
    match = _MISSING_KEY.search(message)
    return match.group(1) if match else None


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[last] = value


def collect_problems(config_files: Sequence[str], policy_dir: str) -> list[str]:
    """Every problem ``load_state`` would raise, one per line (``[]``: it loads)."""
    from .runtime import load_state  # the one loader; imported late, it imports everything

    files = [str(f) for f in config_files]
    try:
        load_config(files)
    except ConfigError as exc:  # a file that cannot be read or parsed: nothing else to learn
        return [str(exc)]
    problems: list[str] = []
    placeholders: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="stagedoor-check-") as scratch:
        overlay = Path(scratch) / "placeholders.yaml"
        probe_dir = Path(scratch) / "policies"
        probe_dir.mkdir()
        (probe_dir / "stagedoor-check.yaml").write_text(_PROBE_POLICY)
        missing: list[str] = []

        def load(policies: Path | str) -> None:
            overlay.write_text(yaml.safe_dump(placeholders))
            load_state([*files, str(overlay)], str(policies))

        for _ in range(MAX_ROUNDS):  # 1. config, one missing value per round
            try:
                load(probe_dir)
                break
            except PolicyLoadError:  # the probe policy no longer fits the schema: go on
                break
            except ConfigError as exc:
                key = missing_key(str(exc))
                if key is None or key in missing:
                    # A placeholder of the wrong type says nothing new about the files.
                    if not any(f"'{k}'" in str(exc) for k in missing):
                        problems.append(str(exc))
                    break
                missing.append(key)
                problems.append(str(exc))
                _set(placeholders, key, PLACEHOLDER)
        try:  # 2. every policy problem, config values the policies read included
            load(policy_dir)
        except PolicyLoadError as exc:
            problems.extend(str(p) for p in exc.problems)
        except ConfigError as exc:
            if not any(f"'{k}'" in str(exc) for k in missing):
                problems.append(str(exc))
        # A key no file declares is reported "in" the last file: the user's, not the overlay.
        last = files[-1] if files else "<no config file>"
        problems = [p.replace(str(overlay), last) for p in problems]
    return list(dict.fromkeys(problems))


def env_hint(config_files: Sequence[str], problems: Sequence[str]) -> str | None:
    """``INSIGHTS_API_URL (insights.externalApiUrl), ...``: the unset environment variables
    behind the missing values in ``problems``; None when there are none."""
    try:
        unset = load_config([str(f) for f in config_files]).unset_env
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
