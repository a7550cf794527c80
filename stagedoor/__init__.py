"""stagedoor: a policy-driven sidecar proxy for Backstage-style plugin APIs, on mitmproxy."""

__version__ = "0.1.0"
