"""A real Backstage backend for the test suite, started by the tests themselves.

The app lives in ``tests/backstage/app/`` (a genuine new-backend-system Backstage backend: auth
backend with the guest provider, the permission backend with a test policy, the ``insights``
plugin, a ``whoami`` helper and a ``devtokens`` helper). Its ``node_modules`` are installed with
``npm ci`` once per machine into a cache directory keyed by the hash of ``package-lock.json``
(and the Node version: ``better-sqlite3`` is a native module); every start then copies the app's
sources into a fresh run directory that links that ``node_modules``.

Use it as the session fixture ``backstage`` (tests marked ``@pytest.mark.backstage``) or call
:func:`start_backstage` for an instance with extra app-config files. If Node.js or npm is
missing, the install fails or the backend does not come up in time, the test FAILS with the
reason and the tail of the logs (it never skips). Deselect locally with ``-m "not backstage"``.

Cache: ``$STAGEDOOR_BACKSTAGE_CACHE``, else ``$XDG_CACHE_HOME/stagedoor/backstage`` (``~/.cache``),
else ``.cache/backstage`` in the checkout (gitignored). The first install takes a few minutes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "tests" / "backstage" / "app"

INSTALL_TIMEOUT_S = float(os.environ.get("STAGEDOOR_BACKSTAGE_INSTALL_TIMEOUT", 1800))
START_TIMEOUT_S = float(os.environ.get("STAGEDOOR_BACKSTAGE_START_TIMEOUT", 180))

#: External-access credentials configured in the app (``app-config.yaml``).
STATIC_TOKEN = "reference-static-token-0123456789abcdef"
STATIC_SUBJECT = "reference-static-client"
# base64url("reference-legacy-secret-0123456789abcdef")
LEGACY_SECRET = "cmVmZXJlbmNlLWxlZ2FjeS1zZWNyZXQtMDEyMzQ1Njc4OWFiY2RlZg"
LEGACY_SUBJECT = "reference-legacy-client"
#: The key id of the auth backend's user-token signing key (``app-config.static-keys.yaml``).
USER_KEY_ID = "reference-static-key-1"
GUEST_USER = "user:development/guest"
#: A group the auth backend says the guest belongs to (only /v1/userinfo tells: not the token).
GUEST_GROUP = "group:default/insights-team"


class BackstageUnavailable(RuntimeError):
    """Node/npm missing, the install failed or the backend did not come up."""


def free_port() -> int:
    """A loopback port nothing listens on right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


# -- install (once per machine) --------------------------------------------------------------------
def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise BackstageUnavailable(
            f"{name} not found on PATH: the Backstage tests need Node.js 20 and npm "
            "(deselect them locally with -m 'not backstage')")
    return path


def _node_version(node: str) -> str:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30,
                         check=False)
    if out.returncode != 0:
        raise BackstageUnavailable(f"`node --version` failed: {out.stderr.strip()}")
    return out.stdout.strip()


def cache_root() -> Path:
    """Where installed ``node_modules`` are kept, shared by every checkout on the machine."""
    configured = os.environ.get("STAGEDOOR_BACKSTAGE_CACHE")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidate = base / "stagedoor" / "backstage"
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    return ROOT / ".cache" / "backstage"


def install_key(node_version: str) -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((APP_DIR / name).read_bytes())
    digest.update(node_version.encode())
    return digest.hexdigest()[:20]


_DONE_MARK = ".stagedoor-install-complete"


def _run_group(cmd: list[str], cwd: Path, env: dict[str, str], out: Any) -> int:
    """Run ``cmd`` in its own process group, bounded in time; the whole group (node-gyp,
    compilers) is killed if it overruns or the caller is interrupted."""
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise BackstageUnavailable(
            f"{' '.join(cmd[1:3])} took longer than {INSTALL_TIMEOUT_S:.0f}s") from exc
    finally:  # the leader may be gone while its children still run
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def ensure_installed() -> Path:
    """``npm ci`` the app into the cache unless already there; returns its ``node_modules``."""
    node, npm = _tool("node"), _tool("npm")
    key = install_key(_node_version(node))
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    if (target / _DONE_MARK).exists():
        return target / "node_modules"
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be installing right now
        if (target / _DONE_MARK).exists():
            return target / "node_modules"
        for stale in root.glob(f"{key}.tmp-*"):  # left by an interrupted install
            shutil.rmtree(stale, ignore_errors=True)
        work = root / f"{key}.tmp-{os.getpid()}"
        work.mkdir()
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(APP_DIR / name, work / name)
        log = root / f"{key}.install.log"
        env = dict(os.environ)
        # better-sqlite3 is built from source against the local Node headers
        if Path("/usr/include/node/node.h").exists():
            env.setdefault("npm_config_nodedir", "/usr")
        env.setdefault("npm_config_update_notifier", "false")
        native = work / "node_modules/better-sqlite3/build/Release/better_sqlite3.node"
        with open(log, "w") as out:
            code = _run_group([npm, "ci", "--no-audit", "--no-fund"], work, env, out)
            if code != 0:
                raise BackstageUnavailable(f"npm ci failed ({code}); log {log}:\n{_tail(log)}")
            if not native.exists():  # install scripts skipped: build it explicitly
                _run_group([npm, "rebuild", "better-sqlite3"], work, env, out)
            if not native.exists():
                raise BackstageUnavailable(
                    f"better-sqlite3 was not built; log {log}:\n{_tail(log)}")
        (work / _DONE_MARK).write_text(key + "\n")
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    return target / "node_modules"


# -- a running backend -----------------------------------------------------------------------------
@dataclass
class BackstageBackend:
    """A running Backstage backend and its fake upstream, both on 127.0.0.1."""

    base_url: str
    upstream_url: str
    run_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: plugin id -> base URL that this backend's discovery resolves it to (``discovery.endpoints``)
    discovered: dict[str, str] = field(default_factory=dict)

    @property
    def backend_log(self) -> Path:
        return self.run_dir / "backend.log"

    @property
    def upstream_log(self) -> Path:
        return self.run_dir / "upstream.log"

    @property
    def user_private_key(self) -> Path:
        """PEM of the auth backend's user-token signing key (ES256, kid ``USER_KEY_ID``)."""
        return self.run_dir / "keys" / "private.pem"

    @property
    def auth_base_url(self) -> str:
        return f"{self.base_url}/api/auth"

    def logs(self, lines: int = 60) -> str:
        """The tails of both logs, for failure messages."""
        return (f"--- {self.backend_log} ---\n{_tail(self.backend_log, lines)}\n"
                f"--- {self.upstream_log} ---\n{_tail(self.upstream_log, 10)}")

    def log_lines(self) -> list[str]:
        try:
            return self.backend_log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    # helpers
    def _get_json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.base_url}{path}", timeout=30, **kwargs)
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path} -> {response.status_code} {response.text}\n"
                                 + self.logs(20))
        return response.json()

    def guest_token(self) -> str:
        """A real user token (``typ: vnd.backstage.user``) for ``user:development/guest``."""
        body = self._get_json("POST", "/api/auth/guest/refresh")
        return str(body["backstageIdentity"]["token"])

    def plugin_token(self, target: str = "insights") -> str:
        """A real plugin token from ``plugin:devtokens`` to ``target`` (no ``obo``)."""
        body = self._get_json("GET", "/api/devtokens/plugin-token", params={"target": target})
        return str(body["token"])

    def whoami(self, token: str) -> httpx.Response:
        """Who this backend thinks the bearer of ``token`` is (``{"principal": ...}``)."""
        return httpx.get(f"{self.base_url}/api/whoami/whoami",
                         headers={"authorization": f"Bearer {token}"}, timeout=30)

    def userinfo(self, token: str) -> httpx.Response:
        return httpx.get(f"{self.auth_base_url}/v1/userinfo",
                         headers={"authorization": f"Bearer {token}"}, timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def __enter__(self) -> BackstageBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_user_keys(keys_dir: Path) -> None:
    keys_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    (keys_dir / "private.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (keys_dir / "public.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _discovery_config(discover: Mapping[str, str]) -> str:
    endpoints = [{"target": url.rstrip("/"), "plugins": [plugin]}
                 for plugin, url in discover.items()]
    return json.dumps({"discovery": {"endpoints": endpoints}})


def start_backstage(extra_config: Sequence[Path] = (), *,
                    discover: Mapping[str, str] | None = None,
                    timeout: float = START_TIMEOUT_S, **env: str) -> BackstageBackend:
    """Install (once) and start the backend on free loopback ports; returns when it serves.

    ``extra_config`` are more app-config files (later ones win); ``discover`` maps plugin ids to
    the base URL this backend's discovery should resolve them to (e.g. ``{"insights":
    "http://127.0.0.1:7007/api/insights"}`` for a stagedoor sidecar); ``env`` is passed to the
    node processes (e.g. ``INSIGHTS_API_URL``). Raises :class:`BackstageUnavailable`.
    """
    node = _tool("node")
    node_modules = ensure_installed()
    run_dir = Path(tempfile.mkdtemp(prefix="stagedoor-backstage-"))
    shutil.copytree(APP_DIR / "src", run_dir / "src")
    for name in ("package.json", "app-config.yaml", "app-config.static-keys.yaml"):
        shutil.copy2(APP_DIR / name, run_dir / name)
    (run_dir / "node_modules").symlink_to(node_modules, target_is_directory=True)
    _write_user_keys(run_dir / "keys")

    backend_port, upstream_port = free_port(), free_port()
    while upstream_port == backend_port:
        upstream_port = free_port()
    base_url = f"http://127.0.0.1:{backend_port}"
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("INSIGHTS_", "BACKSTAGE_", "NODE_OPTIONS"))}
    full_env.update({
        "BACKEND_PORT": str(backend_port), "BACKEND_URL": base_url,
        "UPSTREAM_HOST": "127.0.0.1", "UPSTREAM_PORT": str(upstream_port),
        "INSIGHTS_API_URL": upstream_url,
        "INSIGHTS_STATIC_TOKEN": STATIC_TOKEN, "INSIGHTS_LEGACY_SECRET": LEGACY_SECRET,
        "AUTH_KEYS_DIR": str(run_dir / "keys"),
        "NODE_ENV": "production",
    })
    full_env.update(env)

    config_args = ["--config", str(run_dir / "app-config.yaml"),
                   "--config", str(run_dir / "app-config.static-keys.yaml")]
    if discover:
        discovery_file = run_dir / "app-config.discovery.yaml"
        discovery_file.write_text(_discovery_config(discover))  # JSON is YAML
        config_args += ["--config", str(discovery_file)]
    for extra in extra_config:
        config_args += ["--config", str(Path(extra).resolve())]

    backend = BackstageBackend(base_url, upstream_url, run_dir, discovered=dict(discover or {}))
    try:
        for name, script, args in (("upstream", "src/upstream.js", []),
                                   ("backend", "src/index.js", config_args)):
            log = open(run_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
            backend.procs[name] = subprocess.Popen(
                [node, script, *args], cwd=run_dir, env=full_env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
        _wait_ready(backend, timeout)
    except BaseException:
        backend.stop()
        raise
    return backend


def _wait_ready(backend: BackstageBackend, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    probes = (f"{backend.base_url}/api/insights/health",
              f"{backend.upstream_url}/v1/services/ping")
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            for name, proc in backend.procs.items():
                if proc.poll() is not None:
                    raise BackstageUnavailable(
                        f"Backstage {name} exited with {proc.returncode} while starting\n"
                        + backend.logs())
            try:
                if all(client.get(url).status_code == 200 for url in probes):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise BackstageUnavailable(
        f"Backstage did not answer {probes[0]} within {timeout:.0f}s\n" + backend.logs())


# -- pytest plugin (registered from tests/conftest.py) ---------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backstage: starts a real Backstage backend (Node.js); "
                   "deselect with -m 'not backstage'")


_install_error: list[str] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """Install the app before the first Backstage test runs, outside any per-test timeout
    (the first ``npm ci`` on a machine takes minutes); a failure fails those tests."""
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker("backstage") for item in session.items):
        return
    try:
        ensure_installed()
    except BackstageUnavailable as exc:
        _install_error.append(str(exc))


#: The base URL (on a port reserved up front) at which the session backend discovers the
#: ``insights`` plugin: a stagedoor sidecar started with ``--listen`` on ``SIDECAR_PORT``.
@dataclass(frozen=True)
class SessionBackstage:
    backend: BackstageBackend
    sidecar_port: int

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


@pytest.fixture(scope="session")
def backstage() -> Iterator[SessionBackstage]:
    """One real Backstage backend for the session.

    Its discovery resolves ``insights`` to ``http://127.0.0.1:<sidecar_port>/api/insights``
    (a port reserved for a stagedoor sidecar); every other plugin is served by itself.
    """
    if _install_error:
        pytest.fail(f"the real Backstage backend could not be installed: {_install_error[0]}",
                    pytrace=False)
    sidecar_port = free_port()
    try:
        backend = start_backstage(
            discover={"insights": f"http://127.0.0.1:{sidecar_port}/api/insights"})
    except BackstageUnavailable as exc:
        pytest.fail(f"the real Backstage backend could not be started: {exc}", pytrace=False)
    try:
        yield SessionBackstage(backend, sidecar_port)
    finally:
        backend.stop()
        shutil.rmtree(backend.run_dir, ignore_errors=True)
