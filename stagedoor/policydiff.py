"""What a reload changes for clients, in words an operator reads in one log line.

A reload that drops a plugin (its file deleted or renamed, its ``pluginId`` changed) or a
route turns working URLs into 404s (or 405s) without any error: :func:`removed` names them so
the reload can say so as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import PolicySet

#: Names listed in one log line at most; then "and N more".
MAX_LISTED = 5


def plugin_names(policies: PolicySet) -> str:
    """``catalog, insights`` (sorted), or ``none``."""
    return ", ".join(sorted(policies.plugins)) or "none"


def _routes(policies: PolicySet, plugin_id: str) -> set[str]:
    plugin = policies.plugins[plugin_id]
    return {f"{method} /api/{plugin_id}{route.template.text}"
            for route in plugin.routes for method in route.methods}


@dataclass(frozen=True)
class Removed:
    """Plugins that are gone, and routes (``METHOD /api/<plugin>/path``) gone from plugins that
    are still there."""

    plugins: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.plugins or self.routes)

    def describe(self) -> str:
        """``plugin(s) insights (every /api/insights/... now answers 404); route(s) GET ...``"""
        parts = []
        if self.plugins:
            mounts = ", ".join(f"/api/{p}/..." for p in self.plugins[:MAX_LISTED])
            parts.append(f"plugin(s) {_listed(self.plugins)} (now 404: {mounts})")
        if self.routes:
            parts.append(f"route(s) {_listed(self.routes)}")
        return "; ".join(parts)


def _listed(names: tuple[str, ...]) -> str:
    text = ", ".join(names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        text += f" and {len(names) - MAX_LISTED} more"
    return text


def removed(old: PolicySet, new: PolicySet) -> Removed:
    """What ``old`` served that ``new`` does not."""
    plugins = tuple(sorted(set(old.plugins) - set(new.plugins)))
    routes: list[str] = []
    for plugin_id in sorted(set(old.plugins) & set(new.plugins)):
        routes += sorted(_routes(old, plugin_id) - _routes(new, plugin_id))
    return Removed(plugins, tuple(routes))
