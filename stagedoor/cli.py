"""The ``stagedoor`` command: run, check, demo, token, explain, openapi, inspect.

The core package never imports mitmproxy or the addons. The commands that start a proxy
(``run``, ``demo``, ``inspect``) get it from a :class:`ProxyStarter` that the composition root
passes to :func:`main`: ``stagedoor_addons.main`` (the installed ``stagedoor`` command and
``python -m stagedoor_addons``). ``python -m stagedoor.cli`` runs the other commands only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, Protocol

from .config import ConfigError

DEFAULT_CONFIG = "config/app-config.yaml"
DEFAULT_POLICIES = "policies"
DEFAULT_LISTEN = "127.0.0.1:7007"
DEV_DIR = Path(".stagedoor/dev")

log = logging.getLogger("stagedoor")


class ProxyStarter(Protocol):
    """The mitmproxy side, as the commands that start a proxy use it."""

    #: ``python -m <module>`` runs this command line with a proxy (the ``--workers``).
    module: str

    def serve(self, runtime: Any, host: str, port: int, *,
              on_ready: Callable[[list[tuple[str, int]]], None] | None,
              admin: tuple[str, int] | bool | None) -> Coroutine[Any, Any, None]: ...

    def serve_web(self, runtime: Any, host: str, port: int, web_host: str, web_port: int,
                  settings: Any, *, on_ready: Callable[[list[tuple[str, int]], str], None]
                  ) -> Coroutine[Any, Any, None]: ...

    def inspect_settings(self, config: Any, settings: Any, *, max_flows: int | None,
                         save_path: str | None) -> Any: ...


_starter: ProxyStarter | None = None


def _proxy() -> ProxyStarter | None:
    """The proxy side, or None after saying how to get one."""
    if _starter is None:
        print("stagedoor: this command starts a proxy: run it as `stagedoor` (or "
              "`python -m stagedoor_addons`), not `python -m stagedoor.cli`", file=sys.stderr)
    return _starter


def _setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Diagnostics on stderr (``stagedoor.log.level`` / ``stagedoor.log.format``)."""
    from .logsetup import configure_logging

    configure_logging(level, fmt)  # also quiets mitmproxy's and httpx's chatter


def _admin_address(text: str | None) -> tuple[str, int] | bool | None:
    """``--admin HOST:PORT`` or ``off``; not given: True (``stagedoor.admin.listen``)."""
    if text is None:
        return True
    if text.strip().lower() in ("off", "none", "false"):
        return None
    from .runtime import parse_listen

    try:
        return parse_listen(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--admin wants HOST:PORT or off, got {text!r}") from None


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
def _print_problems(config_files: list[str], problems: list[str], prefix: str) -> None:
    """One line per problem and, when unset environment variables are why values are
    missing, which ones to set."""
    from .diagnose import env_hint

    for line in problems:
        print(f"{prefix}{line}", file=sys.stderr)
    hint = env_hint(config_files, problems)
    if hint:
        print(f"{prefix}hint: set the environment variable(s) {hint}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    """Every config and policy problem in one run, each as ``file:line: message``; exit 1 if
    any. Exactly what ``run`` and a reload validate (:func:`stagedoor.runtime.load_state`)."""
    from .diagnose import problems_of
    from .policy import PolicyLoadError
    from .runtime import load_state

    files = _config_files(args)
    problems: list[str] = []
    try:
        policies = load_state(files, args.policies).policies
    except (PolicyLoadError, ConfigError) as exc:
        problems = problems_of(exc)
    if problems:
        _print_problems(files, problems, "")
        print(f"stagedoor check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    for warning in policies.warnings:  # worth fixing, not fatal (insecure TLS, clear text)
        print(warning, file=sys.stderr)
    print(f"ok: {len(policies.plugins)} plugin(s), {policies.route_count} route(s) "
          f"from {args.policies}")
    return 0


# -- run -------------------------------------------------------------------------------------------
def _load_runtime(config_files: list[str], policy_dir: str):  # -> Runtime | None
    """The runtime, or None after printing every problem (as ``check`` does)."""
    from .policy import PolicyLoadError
    from .runtime import Runtime
    from .versions import mitmproxy_version_problem

    problem = mitmproxy_version_problem()  # every command that starts a proxy comes here
    if problem is not None:
        print(f"stagedoor: {problem}", file=sys.stderr)
        return None
    try:
        runtime = Runtime.load(config_files, policy_dir)
        for warning in runtime.state.policies.warnings:
            print(f"stagedoor: {warning}", file=sys.stderr)
        return runtime
    except (PolicyLoadError, ConfigError) as exc:  # every problem, as `check` lists them
        from .diagnose import problems_of

        _print_problems(config_files, problems_of(exc), "stagedoor: ")
    return None


def _serving(runtime) -> str:
    """``1 plugin(s), 2 route(s); plugins: insights`` for the start line."""
    from .policydiff import plugin_names

    policies = runtime.state.policies
    return (f"{len(policies.plugins)} plugin(s), {policies.route_count} route(s); "
            f"plugins: {plugin_names(policies)}")


def _listen_from(args: argparse.Namespace, runtime) -> tuple[str, int]:
    if args.listen:
        return _parse_listen(args.listen)
    return _parse_listen(runtime.state.config.get_string("stagedoor.listen", DEFAULT_LISTEN))


def _start_dev_backend(args: argparse.Namespace, host: str, port: int, admin):
    """``--dev``: refuse unless every listener is loopback, then serve the dev keys (the
    demo's backend) on the listen port + 1; returns (backend, config layer) or an exit code."""
    from .demo import DemoBackend
    from .devkeys import generate_dev_keys
    from .devmode import refusal, write_overlay

    # An admin address from config (admin is True) is checked once the config is loaded.
    why = refusal({"proxy": host, "admin": admin[0] if isinstance(admin, tuple) else None})
    if why is None and args.workers > 1:
        why = "--dev runs one process: leave out --workers"
    if why:
        return _fail(why)
    keys = generate_dev_keys(Path(args.dev_dir))
    dev_port = port + 1 if port else 0
    try:
        backend = DemoBackend(("127.0.0.1", dev_port), keys.user_jwks(), keys.plugin_jwks())
    except OSError as exc:
        return _fail(f"--dev: cannot serve the dev keys on 127.0.0.1:{dev_port} (the listen "
                     f"port + 1): {exc.strerror}; is `./run.sh demo` or another --dev running?")
    backend.start()
    return backend, write_overlay(Path(args.dev_dir), backend.base_url)


def cmd_run(args: argparse.Namespace) -> int:
    if _proxy() is None:
        return 1
    config_files = _config_files(args)
    dev_backend = None
    if args.dev:  # the listen address is known before the config only when given
        try:
            host, port = _parse_listen(args.listen) if args.listen else (None, None)
            admin = _admin_address(args.admin)
        except argparse.ArgumentTypeError as exc:
            return _fail(str(exc))
        if host is None:
            from .config import load_config

            try:
                listen = load_config(config_files).get_string("stagedoor.listen",
                                                              DEFAULT_LISTEN)
                host, port = _parse_listen(listen or DEFAULT_LISTEN)
            except (ConfigError, argparse.ArgumentTypeError) as exc:
                return _fail(str(exc))
        started = _start_dev_backend(args, host, port, admin)
        if isinstance(started, int):
            return started
        dev_backend, overlay = started
        config_files = [*config_files, str(overlay)]
    try:
        return _run(args, config_files, dev_backend)
    finally:
        if dev_backend is not None:
            dev_backend.shutdown()
            dev_backend.server_close()


def _run(args: argparse.Namespace, config_files: list[str], dev_backend) -> int:
    proxy = _proxy()
    assert proxy is not None  # cmd_run checked
    runtime = _load_runtime(config_files, args.policies)
    if runtime is None:
        return 1
    _setup_logging(runtime.state.operations.log_level, runtime.state.operations.log_format)
    from . import eventloop

    try:
        host, port = _listen_from(args, runtime)
        admin = _admin_address(args.admin)
        loop_setting = runtime.state.config.get_string(eventloop.CONFIG_KEY)
        loop = eventloop.choose(loop_setting)  # uvloop where installed (stagedoor/eventloop.py)
    except (argparse.ArgumentTypeError, eventloop.EventLoopError) as exc:
        return _fail(str(exc))
    if dev_backend is not None:
        from .devmode import banner, refusal

        admin_addr = runtime.state.operations.admin_listen if admin is True else admin
        why = refusal({"proxy": host, "admin": admin_addr[0] if admin_addr else None})
        if why:
            return _fail(why)
        log.warning("%s", banner(dev_backend.base_url, Path(args.dev_dir)))

    def ready(addrs: list[tuple[str, int]]) -> None:
        where = ", ".join(f"http://{h}:{p}" for h, p in addrs)
        log.info("stagedoor listening on %s (%s)", where, _serving(runtime))

    loop_factory = loop.factory
    if args.workers > 1 and args.worker_index is None:  # the supervisor (stagedoor/supervisor.py)
        from . import supervisor

        def all_ready(h: str, p: int, pids: list[int]) -> None:
            log.info("stagedoor listening on http://%s (%d workers, pids %s; %s)",
                     supervisor.format_address(h, p), len(pids), " ".join(map(str, pids)),
                     _serving(runtime))

        return supervisor.supervise(
            proxy.module, args.argv, args.workers, host, port,
            runtime.state.operations.admin_listen if admin is True else admin or None,
            runtime.state.operations.grace_period, all_ready)
    if args.worker_index is not None:  # one of the supervisor's workers
        from . import supervisor

        supervisor.exit_with_parent()
        loop_factory = supervisor.worker_loop_factory(port, loop_setting)
        index, ready_fd = args.worker_index, args.ready_fd

        def ready(addrs: list[tuple[str, int]]) -> None:  # the supervisor says "listening"
            supervisor.announce_ready(ready_fd, index)

    log.info("stagedoor event loop: %s", loop.reason)
    import asyncio  # here, not at the top: the commands that start no proxy stay light

    asyncio.run(proxy.serve(runtime, host, port, on_ready=ready, admin=admin),
                loop_factory=loop_factory)
    args.served = True
    return 0


# -- inspect ---------------------------------------------------------------------------------------
DEFAULT_WEB = "127.0.0.1:8081"


def _web_address(text: str) -> tuple[str, int]:
    """``--web HOST:PORT``: loopback only; port 0 picks a free port now (mitmweb prints and
    keys its login cookie on the configured port, so it must be the real one)."""
    import ipaddress
    import socket

    host, port = _parse_listen(text)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise argparse.ArgumentTypeError(
            f"--web must be a loopback address (127.0.0.1, ::1 or localhost), got {host!r}: "
            "the UI shows live traffic")
    if port == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    return host, port


def cmd_inspect(args: argparse.Namespace) -> int:
    proxy = _proxy()
    if proxy is None:
        return 1
    runtime = _load_runtime(_config_files(args), args.policies)
    if runtime is None:
        return 1
    _setup_logging(runtime.state.operations.log_level, runtime.state.operations.log_format)
    try:
        host, port = _listen_from(args, runtime)
        web_host, web_port = _web_address(args.web)
    except argparse.ArgumentTypeError as exc:
        return _fail(str(exc))
    try:
        settings = proxy.inspect_settings(runtime.state.config, runtime.state.settings,
                                          max_flows=args.max_flows, save_path=args.save)
    except ConfigError as exc:
        return _fail(str(exc))

    def ready(addrs: list[tuple[str, int]], web_url: str) -> None:
        where = ", ".join(f"http://{h}:{p}" for h, p in addrs)
        log.info("stagedoor listening on %s (%s)", where, _serving(runtime))
        # Printed once, here only: the token in this URL is the UI's only key.
        print(f"\nstagedoor inspect: web UI at {web_url}\n"
              f"  (loopback only; keeps the last {settings.max_flows} flows; secrets redacted"
              + (f"; saving to {settings.save_path}" if settings.save_path else "") + ")\n",
              file=sys.stderr, flush=True)

    import asyncio

    try:
        asyncio.run(proxy.serve_web(runtime, host, port, web_host, web_port, settings,
                                    on_ready=ready))
        args.served = True
    except OSError as exc:  # the web port is taken, --save cannot be written...
        import errno

        if exc.errno == errno.EADDRINUSE and "Web server" in str(exc):
            return _fail(f"inspect: the web UI address {web_host}:{web_port} is in use; choose "
                         "another with --web HOST:PORT (port 0 picks a free one)")
        return _fail(f"inspect: {exc}")
    return 0


# -- demo ------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    proxy = _proxy()
    if proxy is None:
        return 1
    from .demo import DemoBackend
    from .devkeys import generate_dev_keys, mint_plugin_token, mint_user_token

    dev_dir = Path(args.dev_dir)
    keys = generate_dev_keys(dev_dir)
    # The notes example's upstream credential: a fresh one per run, read from a $file by an
    # extra config layer, as a deployment would read a mounted secret.
    notes_token = secrets.token_urlsafe(24)
    token_file = dev_dir / "notes-api-token"
    token_file.touch(mode=0o600)
    token_file.write_text(notes_token + "\n")
    demo_config = dev_dir / "demo-config.yaml"
    demo_config.write_text("# written by `stagedoor demo`: the notes example's upstream token\n"
                           "notes:\n  apiToken: {$file: notes-api-token}\n")
    try:
        backend = DemoBackend(("127.0.0.1", args.upstream_port), keys.user_jwks(),
                              keys.plugin_jwks(), notes_token)
    except OSError:  # the default port is taken: any free loopback port will do
        backend = DemoBackend(("127.0.0.1", 0), keys.user_jwks(), keys.plugin_jwks(),
                              notes_token)
    backend.start()
    os.environ["INSIGHTS_API_URL"] = backend.base_url
    os.environ["BACKSTAGE_BASE_URL"] = backend.base_url
    (dev_dir / "demo.json").write_text(json.dumps({"baseUrl": backend.base_url}))

    policy_dir = _demo_policies(Path(args.policies), dev_dir)
    runtime = _load_runtime([*_config_files(args), str(demo_config)], str(policy_dir))
    if runtime is None:
        return 1
    if not runtime.state.config.has("stagedoor.log.format"):  # a person is watching: text
        from dataclasses import replace

        state = runtime.state
        runtime.state = replace(state, operations=replace(state.operations, log_format="text"))
    _setup_logging(runtime.state.operations.log_level, runtime.state.operations.log_format)
    try:
        host, port = _listen_from(args, runtime)
        admin = _admin_address(args.admin)
    except argparse.ArgumentTypeError as exc:
        return _fail(str(exc))
    user_token = mint_user_token(keys.user, issuer=f"{backend.base_url}/api/auth")
    plugin_token = mint_plugin_token(keys.plugin, subject_plugin="catalog",
                                     target_plugin="insights")

    def ready(addrs: list[tuple[str, int]]) -> None:
        h, p = addrs[0] if addrs else (host, port)
        base = f"http://{h}:{p}/api/insights"
        notes = f"http://{h}:{p}/api/notes"
        notes_banner = _NOTES_BANNER.format(
            notes=notes, svc=f"{notes}/services/payments-api/notes",
            auth=f"-H 'Authorization: Bearer {user_token}'",
            json="-H 'Content-Type: application/json'", config=demo_config, policies=policy_dir,
        ) if "notes" in runtime.state.policies.plugins else ""
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
{notes_banner}
  # mint more: ./run.sh token --user user:default/someone
""", flush=True)

    import asyncio

    asyncio.run(proxy.serve(runtime, host, port, on_ready=ready, admin=admin))
    backend.shutdown()
    args.served = True
    return 0


_NOTES_BANNER = """
  # the notes example (examples/notes/notes.yaml, policy language v2; see
  # docs/policy-reference.md). Declared query parameters only, re-encoded; the upstream gets
  # its own token from app-config, never yours; Set-Cookie and X-Powered-By stay behind:
  curl -s -i {auth} '{svc}?tag=ops&debug=1'

  # a query value that does not match its pattern: 400 InputError "page must be a number"
  curl -s {auth} '{svc}?page=x'

  # a JSON body checked against schemas/note.json, then forwarded: 201
  curl -s {auth} {json} -d '{{"text": "Paged twice", "tags": ["oncall"]}}' '{svc}'

  # a body the schema refuses: 400 naming the JSON Pointer (/text), never echoing the body
  curl -s {auth} {json} -d '{{"text": ""}}' '{svc}'

  # a form body where JSON is required: 415
  curl -s {auth} -d 'text=hello' '{svc}'

  # a required query parameter missing: 400 InputError
  curl -s {auth} '{notes}/search'

  # what stagedoor checks, step by step, without sending anything:
  #   ./run.sh explain POST /api/notes/services/payments-api/notes --user user:default/jane \\
  #     --body note.json --config config/app-config.yaml --config {config} --policies {policies}
"""


def _demo_policies(policies: Path, dev_dir: Path) -> Path:
    """The demo serves ``policies/`` plus the notes example: links to both in one directory
    (``stagedoor run`` reads one)."""
    combined = dev_dir / "policies"
    combined.mkdir(parents=True, exist_ok=True)
    for old in combined.iterdir():
        if old.is_symlink() or old.is_file():
            old.unlink()
    sources = [p for p in policies.iterdir() if p.suffix in (".yaml", ".yml")] \
        if policies.is_dir() else []
    example = Path(__file__).resolve().parent.parent / "examples" / "notes" / "notes.yaml"
    if example.is_file():
        sources.append(example)
    for source in sources:
        (combined / source.name).symlink_to(source.resolve())
    return combined


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
        if args.group:
            return _fail("--group is for user tokens (a plugin token has no ownership refs)")
        print(mint_plugin_token(keys.plugin, subject_plugin=args.plugin,
                                target_plugin=args.target, ttl=args.ttl))
    else:
        print(mint_user_token(keys.user, issuer=f"{base_url.rstrip('/')}/api/auth",
                              subject=args.user, ownership=_ownership(args.user, args.group),
                              ttl=args.ttl))
    return 0


def _ownership(user: str, groups: list[str] | None) -> list[str]:
    """A user's ownership refs (the token's ``ent``): the user and its ``--group`` refs."""
    return list(dict.fromkeys([user, *(groups or [])]))


def _entity_ref(text: str) -> str:
    kind, sep, rest = text.partition(":")
    if not sep or not kind or not rest:
        raise argparse.ArgumentTypeError(
            f"wants an entity ref like group:default/payments, got {text!r}")
    return text


# -- explain ---------------------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain, render

    _setup_logging("warning")
    runtime = _load_runtime(_config_files(args), args.policies)
    if runtime is None:
        return 2
    if args.group and not args.user:
        print("stagedoor: --group needs --user (a --token carries its own ownership refs)",
              file=sys.stderr)
        return 2
    body = None
    if args.body is not None:
        try:
            body = Path(args.body).read_bytes() if args.body != "-" else sys.stdin.buffer.read()
        except OSError as exc:
            return _fail(f"explain: cannot read --body {args.body}: {exc.strerror}")
    decision = explain(runtime.state, args.method, args.url, token=args.token, user=args.user,
                       service=args.service,
                       groups=tuple(_ownership(args.user, args.group)) if args.group else (),
                       body=body, content_type=args.content_type)
    print(render(decision, args.method, args.url))
    return 0 if decision.allowed else 1


# -- openapi ---------------------------------------------------------------------------------------
def cmd_openapi(args: argparse.Namespace) -> int:
    from .openapi import SERVE_KEY, build_document, load_for_document, render
    from .policy import PolicyLoadError

    files = args.config or ([DEFAULT_CONFIG] if Path(DEFAULT_CONFIG).is_file() else [])
    try:
        policies, config = load_for_document(args.policies, files)
        serve_self = config.get_bool(SERVE_KEY, False)
    except PolicyLoadError as exc:
        for problem in exc.problems:
            print(f"stagedoor: {problem}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        return _fail(str(exc))
    warnings: list[str] = []
    try:
        document = build_document(policies, plugin_ids=args.plugin or None,
                                  serve_self=serve_self, warnings=warnings)
    except KeyError as exc:
        return _fail(str(exc.args[0]))
    for warning in warnings:
        print(f"stagedoor: warning: {warning}", file=sys.stderr)
    if args.format == "yaml":
        import yaml

        data = yaml.safe_dump(document, sort_keys=False, allow_unicode=True).encode("utf-8")
    else:
        data = render(document)
    if args.output and args.output != "-":
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


# -- entry point -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagedoor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the sidecar")
    _add_common(run)
    run.add_argument("--listen", metavar="HOST:PORT",
                     help=f"proxy address (default: stagedoor.listen or {DEFAULT_LISTEN})")
    run.add_argument("--admin", metavar="HOST:PORT",
                     help="admin listener (/metrics, /healthz, /readyz), or 'off'; port 0 picks "
                          "a free one (default: stagedoor.admin.listen or 127.0.0.1:9464)")
    run.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                     help="N processes sharing the listening port (SO_REUSEPORT), supervised; "
                          "worker i's admin listener is on the admin port + i (default: 1)")
    run.add_argument("--dev", action="store_true",
                     help="trust the demo's dev keys (./run.sh token) instead of a Backstage "
                          "backend, served on the listen port + 1; loopback listeners only")
    run.add_argument("--dev-dir", default=str(DEV_DIR), help=argparse.SUPPRESS)
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    run.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    insp = sub.add_parser("inspect", help="run the sidecar under mitmweb: each request's "
                          "decision in a web UI, secrets redacted")
    _add_common(insp)
    insp.add_argument("--listen", metavar="HOST:PORT",
                      help=f"proxy address (default: stagedoor.listen or {DEFAULT_LISTEN})")
    insp.add_argument("--web", metavar="HOST:PORT", default=DEFAULT_WEB,
                      help=f"web UI address, loopback only; port 0 picks a free one "
                           f"(default: {DEFAULT_WEB})")
    insp.add_argument("--save", metavar="FILE",
                      help="also write every finished flow, redacted, to this mitmproxy flow file")
    insp.add_argument("--max-flows", type=int, metavar="N",
                      help="flows the UI keeps, oldest dropped first "
                           "(default: stagedoor.inspect.maxFlows or 1000)")
    insp.set_defaults(func=cmd_inspect)

    check = sub.add_parser("check", help="validate config and policies; exit 1 listing problems")
    _add_common(check)
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="run the sidecar in front of a bundled demo upstream")
    _add_common(demo)
    demo.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN)
    demo.add_argument("--admin", metavar="HOST:PORT", default="127.0.0.1:0",
                      help="admin listener, or 'off' (default: a free loopback port, logged)")
    demo.add_argument("--upstream-port", type=int, default=7008)
    demo.add_argument("--dev-dir", default=str(DEV_DIR))
    demo.set_defaults(func=cmd_demo)

    explain = sub.add_parser("explain", help="show every check the proxy would make for one "
                             "request, without sending it; exit 0 allow, 1 deny, 2 config, "
                             "policy or usage error")
    _add_common(explain)
    explain.add_argument("method", help="HTTP method, e.g. GET")
    explain.add_argument("url", help="full URL or path, e.g. /api/insights/services/x")
    caller = explain.add_mutually_exclusive_group()
    caller.add_argument("--token", help="a bearer token, verified for real")
    caller.add_argument("--user", metavar="REF", help="act as this verified user entity ref")
    caller.add_argument("--service", metavar="SUBJECT",
                        help="act as this verified service subject (e.g. plugin:catalog)")
    explain.add_argument("--group", action="append", metavar="REF", type=_entity_ref,
                         help="with --user: an ownership ref the user has, for memberOf rules "
                              "(repeat for several), e.g. group:default/payments")
    explain.add_argument("--body", metavar="FILE",
                         help="check this request body too (- reads stdin); it is never shown")
    explain.add_argument("--content-type", default="application/json", metavar="TYPE",
                         help="the body's Content-Type (default: application/json)")
    explain.set_defaults(func=cmd_explain)

    openapi = sub.add_parser("openapi", help="print the OpenAPI 3.1 document of the policies")
    _add_common(openapi)
    openapi.add_argument("--plugin", action="append", metavar="ID",
                         help="only this plugin (repeat for several; default: all)")
    openapi.add_argument("--format", choices=("json", "yaml"), default="json")
    openapi.add_argument("--output", "-o", metavar="FILE", help="write here (default: stdout)")
    openapi.set_defaults(func=cmd_openapi)

    token = sub.add_parser("token", help="mint a dev token signed with the demo's dev keys")
    who = token.add_mutually_exclusive_group()
    who.add_argument("--user", default="user:default/jane", help="user entity ref")
    who.add_argument("--plugin", help="calling plugin id (makes a plugin token)")
    token.add_argument("--group", action="append", metavar="REF", type=_entity_ref,
                       help="an ownership ref of the user (token 'ent' claim, for memberOf "
                            "rules); repeat for several, e.g. group:default/payments")
    token.add_argument("--target", default="insights", help="plugin the plugin token is for")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--base-url", help="backend.baseUrl the demo runs with")
    token.add_argument("--dev-dir", default=str(DEV_DIR))
    token.set_defaults(func=cmd_token)
    return parser


def _worker_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"--workers wants a number from 1 to 256, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None, proxy: ProxyStarter | None = None) -> int:
    """Run one command; ``proxy``: the mitmproxy side, for the commands that start a proxy."""
    global _starter
    if proxy is not None:
        _starter = proxy
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --workers: the workers' own
    code = int(args.func(args) or 0)
    if argv is None and getattr(args, "served", False):
        _exit_once_stopped(code)
    return code


def _exit_once_stopped(code: int) -> NoReturn:
    """A sidecar that has stopped (listeners closed, requests drained, logs written) exits at
    once: the interpreter would otherwise wait for helper threads to notice on their own, such
    as the file watcher's, which looks at its stop flag between waits (the 0.1-2 s an operator
    saw between ``stopped`` and the process exit)."""
    logging.shutdown()  # flushes every handler
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
