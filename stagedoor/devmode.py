"""``stagedoor run --dev``: trust the demo's dev keys instead of a Backstage backend.

A dev backend (the demo's: :class:`stagedoor.demo.DemoBackend`) serves the public halves of the
keys in ``.stagedoor/dev`` on loopback, and a config layer written next to them points
``backend.baseUrl`` at it, so ``stagedoor token`` tokens verify exactly as Backstage's would,
through the same JWKS code. Anyone who can read ``.stagedoor/dev`` can mint tokens: the mode is
refused unless every listener is on a loopback address.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import yaml

#: The config layer ``--dev`` adds after the user's ``--config`` files.
OVERLAY_FILE = "dev-config.yaml"
#: Where the demo and ``--dev`` say their backend is; ``stagedoor token`` reads it for ``iss``.
BACKEND_FILE = "demo.json"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``; an empty host or 0.0.0.0/:: is every interface."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refusal(listeners: dict[str, str | None]) -> str | None:
    """Why ``--dev`` is refused for these ``{name: host}`` listeners (None host: off)."""
    outside = [f"{name} on {host or '(all interfaces)'}" for name, host in listeners.items()
               if host is not None and not is_loopback(host)]
    if not outside:
        return None
    return ("--dev trusts development keys that anyone can read, so every listener must be "
            f"on loopback (127.0.0.1, ::1 or localhost); not: {', '.join(outside)}")


def write_overlay(dev_dir: Path, base_url: str) -> Path:
    """The config layer that makes the dev backend the Backstage backend; returns its path."""
    path = Path(dev_dir) / OVERLAY_FILE
    layer = {"backend": {"baseUrl": base_url}, "discovery": {"endpoints": []}}
    path.write_text("# Written by `stagedoor run --dev`; rewritten at every start.\n"
                    + yaml.safe_dump(layer, sort_keys=False))
    (Path(dev_dir) / BACKEND_FILE).write_text(json.dumps({"baseUrl": base_url}))
    return path


def banner(base_url: str, dev_dir: Path) -> str:
    """The warning ``run --dev`` logs at start."""
    return (f"DEV MODE: trusting the development keys in {dev_dir} (served on {base_url}) "
            "instead of a Backstage backend; anyone who can read them can mint tokens. "
            "Mint one with `./run.sh token`. Never run --dev in front of real users.")
