"""A fork server for the suite's sidecars: import once, fork a real ``stagedoor`` per start.

A start of ``stagedoor run`` costs about a second of CPU on the suite's 2-core machine, four
fifths of it importing mitmproxy, stagedoor and their dependencies, and the suite starts about
eighty of them. Each pytest worker gets one fork server (``python -m tests.forkserver``) that
imports those modules once and then forks a child per sidecar. The child is a real process
running the real command: the same ``main()`` as ``python -m stagedoor_addons``, with its own
argv, environment, working directory, stdin (``/dev/null``), stdout and stderr (pipes the test
reads), a fresh interpreter's signal dispositions and no other file descriptor, and it ends the
way that command ends. Only the imports happened before the fork, and no module reads the
variables tests set at import time (``tests/test_forkserver.py`` holds both).

What is not a sidecar start still runs as its own command (``subprocess``): the CLI tests,
``--workers``' worker processes (the supervisor starts them with ``sys.executable -m``), the
documentation examples. ``STAGEDOOR_TEST_FORK=0`` (or a platform without ``os.pidfd_open`` and
``socket.send_fds``) starts every sidecar with ``subprocess`` too.

The protocol, over a ``SOCK_SEQPACKET`` socket pair (one message per datagram):
the worker sends ``{"argv", "env", "cwd"}`` JSON with the child's stdout and stderr as file
descriptors; the server answers ``{"pid": N}`` (or ``{"error": text}``), and
``{"exited": N, "code": C}`` when the child ends (``C`` as ``Popen.returncode``: negative for a
signal). When the worker goes away, the server kills its children and exits; a child dies with
the server (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import pkgutil
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
MAX_MESSAGE = 1 << 20
#: The package whose ``main()`` a child runs (``python -m stagedoor_addons``).
ENTRY_PACKAGE = "stagedoor_addons"
PR_SET_PDEATHSIG = 1


def supported() -> bool:
    return (sys.platform == "linux" and hasattr(os, "pidfd_open")
            and hasattr(socket, "send_fds") and os.environ.get("STAGEDOOR_TEST_FORK") != "0")


# -- the worker's side -----------------------------------------------------------------------------
class ForkedProcess:
    """The parts of ``subprocess.Popen`` the suite uses, for a child of the fork server."""

    def __init__(self, server: ForkServer, pid: int, args: list[str], stdout: IO[bytes],
                 stderr: IO[bytes]) -> None:
        self._server = server
        self.pid = pid
        self.args = args
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = None

    @property
    def returncode(self) -> int | None:
        return self._server.exit_code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet: the pid is still this child's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """A worker's connection to its fork server (started on first use)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The server's own output, for error messages; closed by close().
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log)
        theirs.close()
        self._sock = ours
        self._spawn_lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: list[dict[str, Any]] = []
        self._exits: dict[int, int] = {}
        self._gone = False
        self._reader = threading.Thread(target=self._read, name="forkserver-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._gone = True
                    self._cond.notify_all()
                    return
                message = json.loads(data)
                if "exited" in message:
                    self._exits[message["exited"]] = message["code"]
                else:
                    self._replies.append(message)
                self._cond.notify_all()

    def _server_log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def spawn(self, args: list[str], env: dict[str, str], cwd: Path,
              timeout: float = 30.0) -> ForkedProcess:
        """Fork a child running ``main(args[3:])``: ``args`` is the command line it stands
        for (``[python, "-m", "stagedoor_addons", ...]``)."""
        if args[1:3] != ["-m", ENTRY_PACKAGE]:
            raise ValueError(f"the fork server only runs 'python -m {ENTRY_PACKAGE}': {args}")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        request = json.dumps({"argv": [ENTRY_PACKAGE, *args[3:]], "env": env,
                              "cwd": str(cwd)}).encode()
        try:
            with self._spawn_lock:
                with self._cond:
                    if self._gone:
                        raise RuntimeError("the fork server is gone:\n" + self._server_log())
                socket.send_fds(self._sock, [request], [out_w, err_w])
                with self._cond:
                    if not self._cond.wait_for(lambda: self._replies or self._gone, timeout):
                        raise RuntimeError("the fork server did not answer:\n"
                                           + self._server_log())
                    if not self._replies:
                        raise RuntimeError("the fork server is gone:\n" + self._server_log())
                    reply = self._replies.pop(0)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        if "pid" not in reply:
            os.close(out_r)
            os.close(err_r)
            raise RuntimeError(f"the fork server could not start {args}: {reply.get('error')}")
        # The pipes' read ends: the test reads them to EOF (the child's exit closes them).
        return ForkedProcess(self, reply["pid"], args, open(out_r, "rb"), open(err_r, "rb"))

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._gone, timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        """Stop the server; it kills the children still running."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


_server: ForkServer | None = None
_server_lock = threading.Lock()


def server() -> ForkServer:
    """This worker's fork server, started on first use (and again if it died)."""
    global _server
    with _server_lock:
        if _server is None or _server.proc.poll() is not None:
            _server = ForkServer()
        return _server


def shutdown() -> None:
    global _server
    with _server_lock:
        if _server is not None:
            _server.close()
            _server = None


# -- the server's side -----------------------------------------------------------------------------
@dataclass
class ChildRequest:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    stdout: int
    stderr: int


#: What a start imports lazily, beyond stagedoor's own modules: the event loop and the
#: control-plane HTTP client's transport (measured: a tenth of a second per start), and
#: mitmweb's master for ``inspect``.
LAZY_IMPORTS = ("uvloop", "httpcore", "anyio._backends._asyncio", "encodings.idna",
                "mitmproxy.tools.web.master")


def preload() -> list[str]:
    """Import what a sidecar start imports: every module of stagedoor and of its addons
    package (``__main__`` aside: it runs the command), and ``LAZY_IMPORTS``."""
    names = []
    for name in LAZY_IMPORTS:
        with contextlib.suppress(ImportError):  # uvloop is optional (a clean fallback)
            importlib.import_module(name)
            names.append(name)
    for package_name in ("stagedoor", ENTRY_PACKAGE):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue
            importlib.import_module(info.name)
            names.append(info.name)
    return names


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the worker is gone: serve() notices on its next read
        sock.send(json.dumps(message).encode())


def serve(sock: socket.socket) -> ChildRequest | None:
    """Fork a child per request; report each child's exit. Returns in the child (with what it
    is to run), or None once the worker has gone (children killed)."""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, None)
    children: dict[int, int] = {}  # pid -> pidfd
    while True:
        for key, _ in selector.select():
            if key.data is not None:  # a child ended
                pid = key.data
                selector.unregister(key.fd)
                os.close(key.fd)
                del children[pid]
                _, status = os.waitpid(pid, 0)
                _send(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})
                continue
            try:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
            except OSError:
                data, fds = b"", []
            if not data:  # the worker has gone: take its sidecars with it
                for pid, pidfd in children.items():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    os.close(pidfd)
                return None
            message = json.loads(data)
            if len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                _send(sock, {"error": f"expected stdout and stderr, got {len(fds)} fds"})
                continue
            pid = os.fork()
            if pid == 0:
                selector.close()
                return ChildRequest(message["argv"], message["env"], message["cwd"], *fds)
            for fd in fds:
                os.close(fd)
            pidfd = os.pidfd_open(pid)
            children[pid] = pidfd
            selector.register(pidfd, selectors.EVENT_READ, pid)
            _send(sock, {"pid": pid})


def become(request: ChildRequest) -> None:
    """In the child: take the request's stdio, environment, directory and argv, and drop every
    other descriptor. (The server installs no signal handler: the child's are a fresh
    interpreter's until stagedoor installs its own; tests/test_forkserver.py compares them.)"""
    with contextlib.suppress(OSError, AttributeError):  # die with the server (Linux)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(request.stdout, 1)
    os.dup2(request.stderr, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    sys.argv = list(request.argv)


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    preload()
    request = serve(sock)
    if request is None:
        return
    sock.close()
    become(request)
    from stagedoor_addons.main import main as stagedoor_main

    # As `python -m stagedoor_addons` ends: SystemExit through the interpreter's own shutdown.
    sys.exit(stagedoor_main())


if __name__ == "__main__":
    main(int(sys.argv[1]))
