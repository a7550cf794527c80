"""mitmproxy addons for stagedoor: thin translations between flows and the core."""
