"""The mitmproxy release range stagedoor is tested with, checked before a proxy starts.

The range is the one ``pyproject.toml`` declares for the ``mitmproxy`` dependency (read back
from the installed package's metadata, so there is one source of truth). stagedoor patches a
few mitmproxy internals (``addons/mitm_internals.py``); a release outside the tested range may
have moved them, so ``stagedoor run`` refuses to start on one instead of failing oddly later.
This module reads package metadata only: it never imports mitmproxy.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

#: Used when stagedoor's own metadata cannot be read (running from a bare source tree).
FALLBACK_MITMPROXY_RANGE = ">=12.2,<13"


def supported_mitmproxy_range() -> str:
    """The version specifier of the ``mitmproxy`` requirement of the installed stagedoor."""
    try:
        requirements = metadata.requires("stagedoor") or []
    except metadata.PackageNotFoundError:
        return FALLBACK_MITMPROXY_RANGE
    for line in requirements:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if (requirement.name.lower() == "mitmproxy" and requirement.marker is None
                and requirement.specifier):  # lower bound first: ">=12.2,<13"
            return ",".join(str(s) for s in sorted(
                requirement.specifier, key=lambda s: (s.operator.startswith("<"), str(s))))
    return FALLBACK_MITMPROXY_RANGE


def mitmproxy_version_problem(installed: str | None = None,
                              supported: str | None = None) -> str | None:
    """None when the installed mitmproxy is in the supported range, else a message saying
    which version was found, which range is supported and how to fix it."""
    from packaging.specifiers import SpecifierSet

    supported = supported or supported_mitmproxy_range()
    if installed is None:
        try:
            installed = metadata.version("mitmproxy")
        except metadata.PackageNotFoundError:
            return (f"mitmproxy is not installed; stagedoor needs mitmproxy {supported} "
                    "(./run.sh installs it from requirements-test.lock)")
    try:
        version = Version(installed)
    except InvalidVersion:
        version = None
    specifier = SpecifierSet(supported)
    if version is not None and specifier.contains(version, prereleases=True):
        return None
    return (f"mitmproxy {installed} is installed, but this stagedoor is tested with mitmproxy "
            f"{supported} only; install a release in that range (./run.sh does, from "
            "requirements-test.lock; pip install -r requirements.lock for an image)")
