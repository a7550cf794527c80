"""The ``stagedoor`` command: run, check, demo, token.

mitmproxy is imported only inside the commands that start a proxy, so ``check`` and ``token``
stay fast and the core package stays mitmproxy-free.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .policy import PolicyLoadError, load_policies

DEFAULT_CONFIG = "config/app-config.yaml"
DEFAULT_POLICIES = "policies"
DEFAULT_LISTEN = "127.0.0.1:7007"
DEV_DIR = Path(".stagedoor/dev")

log = logging.getLogger("stagedoor")


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # mitmproxy's per-connection chatter is not an operator's concern.
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", metavar="FILE",
                        help=f"app-config file; repeat to layer (default: {DEFAULT_CONFIG})")
    parser.add_argument("--policies", metavar="DIR", default=DEFAULT_POLICIES,
                        help=f"directory of plugin policies (default: {DEFAULT_POLICIES})")


def _config_files(args: argparse.Namespace) -> list[str]:
    return args.config or [DEFAULT_CONFIG]


def _fail(message: str) -> int:
    print(f"stagedoor: {message}", file=sys.stderr)
    return 1


# -- check -----------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    problems: list[str] = []
    try:
        config = load_config(_config_files(args))
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        policies = load_policies(args.policies, config)
    except PolicyLoadError as exc:
        problems.extend(str(p) for p in exc.problems)
    else:
        try:
            from .runtime import GatewaySettings
            from .tokens import AuthSettings

            GatewaySettings.from_config(config)
            AuthSettings.from_config(config)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"stagedoor check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: {len(policies.plugins)} plugin(s), {policies.route_count} route(s) "
          f"from {args.policies}")
    return 0


# -- run -------------------------------------------------------------------------------------------
def _load_runtime(config_files: list[str], policy_dir: str):  # -> Runtime | None
    from .runtime import Runtime

    try:
        return Runtime.load(config_files, policy_dir)
    except PolicyLoadError as exc:
        for problem in exc.problems:
            print(f"stagedoor: {problem}", file=sys.stderr)
    except ConfigError as exc:
        print(f"stagedoor: {exc}", file=sys.stderr)
    return None


def _listen_from(args: argparse.Namespace, runtime) -> tuple[str, int]:
    if args.listen:
        return _parse_listen(args.listen)
    return _parse_listen(runtime.config.get_string("stagedoor.listen", DEFAULT_LISTEN))


def cmd_run(args: argparse.Namespace) -> int:
    runtime = _load_runtime(_config_files(args), args.policies)
    if runtime is None:
        return 1
    _setup_logging(runtime.config.get_string("stagedoor.log.level", "info") or "info")
    try:
        host, port = _listen_from(args, runtime)
    except argparse.ArgumentTypeError as exc:
        return _fail(str(exc))

    def ready(addrs: list[tuple[str, int]]) -> None:
        where = ", ".join(f"http://{h}:{p}" for h, p in addrs)
        log.info("stagedoor listening on %s (%d plugin(s), %d route(s))", where,
                 len(runtime.policies.plugins), runtime.policies.route_count)

    from addons.master import serve

    asyncio.run(serve(runtime, host, port, on_ready=ready))
    return 0


# -- demo ------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoBackend
    from .devkeys import generate_dev_keys, mint_plugin_token, mint_user_token

    keys = generate_dev_keys(Path(args.dev_dir))
    try:
        backend = DemoBackend(("127.0.0.1", args.upstream_port), keys.user_jwks(),
                              keys.plugin_jwks())
    except OSError:  # the default port is taken: any free loopback port will do
        backend = DemoBackend(("127.0.0.1", 0), keys.user_jwks(), keys.plugin_jwks())
    backend.start()
    os.environ["INSIGHTS_API_URL"] = backend.base_url
    os.environ["BACKSTAGE_BASE_URL"] = backend.base_url
    (Path(args.dev_dir) / "demo.json").write_text(json.dumps({"baseUrl": backend.base_url}))

    runtime = _load_runtime(_config_files(args), args.policies)
    if runtime is None:
        return 1
    _setup_logging("info")
    try:
        host, port = _listen_from(args, runtime)
    except argparse.ArgumentTypeError as exc:
        return _fail(str(exc))
    user_token = mint_user_token(keys.user, issuer=f"{backend.base_url}/api/auth")
    plugin_token = mint_plugin_token(keys.plugin, subject_plugin="catalog",
                                     target_plugin="insights")

    def ready(addrs: list[tuple[str, int]]) -> None:
        h, p = addrs[0] if addrs else (host, port)
        base = f"http://{h}:{p}/api/insights"
        print(f"""
stagedoor demo: sidecar on http://{h}:{p}, demo upstream on {backend.base_url}
(dev keys in {args.dev_dir}; tokens below are valid for 1 hour; Ctrl-C stops)

  # unauthenticated health check, answered by stagedoor itself
  curl -s {base}/health

  # no credentials: 401 Missing credentials
  curl -s {base}/services/payments-api

  # a Backstage user token (user:default/jane): forwarded to the upstream
  curl -s -H 'Authorization: Bearer {user_token}' {base}/services/payments-api

  # a bad service id: 400 InputError
  curl -s -H 'Authorization: Bearer {user_token}' {base}/services/Bad_Id

  # a plugin token from 'catalog': this route only allows users, so 403
  curl -s -H 'Authorization: Bearer {plugin_token}' {base}/services/payments-api

  # mint more: ./run.sh token --user user:default/someone
""", flush=True)

    from addons.master import serve

    asyncio.run(serve(runtime, host, port, on_ready=ready))
    backend.shutdown()
    return 0


# -- token -----------------------------------------------------------------------------------------
def cmd_token(args: argparse.Namespace) -> int:
    from .devkeys import generate_dev_keys, mint_plugin_token, mint_user_token

    dev_dir = Path(args.dev_dir)
    keys = generate_dev_keys(dev_dir)
    base_url = args.base_url
    if base_url is None:
        demo = dev_dir / "demo.json"
        if demo.exists():
            base_url = json.loads(demo.read_text())["baseUrl"]
        else:
            base_url = "http://127.0.0.1:7008"
    if args.plugin:
        print(mint_plugin_token(keys.plugin, subject_plugin=args.plugin,
                                target_plugin=args.target, ttl=args.ttl))
    else:
        print(mint_user_token(keys.user, issuer=f"{base_url.rstrip('/')}/api/auth",
                              subject=args.user, ttl=args.ttl))
    return 0


# -- explain ---------------------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain, render

    _setup_logging("warning")
    runtime = _load_runtime(_config_files(args), args.policies)
    if runtime is None:
        return 2
    decision = explain(runtime, args.method, args.url, token=args.token, user=args.user,
                       service=args.service)
    print(render(decision, args.method, args.url))
    return 0 if decision.allowed else 1


# -- entry point -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagedoor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the sidecar")
    _add_common(run)
    run.add_argument("--listen", metavar="HOST:PORT",
                     help=f"proxy address (default: stagedoor.listen or {DEFAULT_LISTEN})")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate config and policies; exit 1 listing problems")
    _add_common(check)
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="run the sidecar in front of a bundled demo upstream")
    _add_common(demo)
    demo.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN)
    demo.add_argument("--upstream-port", type=int, default=7008)
    demo.add_argument("--dev-dir", default=str(DEV_DIR))
    demo.set_defaults(func=cmd_demo)

    explain = sub.add_parser("explain", help="show every check the proxy would make for one "
                             "request, without sending it; exit 0 allow, 1 deny")
    _add_common(explain)
    explain.add_argument("method", help="HTTP method, e.g. GET")
    explain.add_argument("url", help="full URL or path, e.g. /api/insights/services/x")
    caller = explain.add_mutually_exclusive_group()
    caller.add_argument("--token", help="a bearer token, verified for real")
    caller.add_argument("--user", metavar="REF", help="act as this verified user entity ref")
    caller.add_argument("--service", metavar="SUBJECT",
                        help="act as this verified service subject (e.g. plugin:catalog)")
    explain.set_defaults(func=cmd_explain)

    token = sub.add_parser("token", help="mint a dev token signed with the demo's dev keys")
    who = token.add_mutually_exclusive_group()
    who.add_argument("--user", default="user:default/jane", help="user entity ref")
    who.add_argument("--plugin", help="calling plugin id (makes a plugin token)")
    token.add_argument("--target", default="insights", help="plugin the plugin token is for")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--base-url", help="backend.baseUrl the demo runs with")
    token.add_argument("--dev-dir", default=str(DEV_DIR))
    token.set_defaults(func=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
