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

The CLI tests' ``python -m stagedoor_addons ...`` and ``python -m stagedoor.cli ...`` commands
run the same way (:func:`run` for ``subprocess.run``, :func:`popen` for ``subprocess.Popen``):
about sixty of them, each a third of a second to a second of CPU, nearly all imports. What still
runs as its own command (``subprocess``): the tests of a fresh interpreter (tests/test_layering.py,
the comparisons in tests/test_forkserver.py), ``--workers``' worker processes (the supervisor
starts them with ``sys.executable -m``), the documentation examples. ``STAGEDOOR_TEST_FORK=0``
(or a platform without ``os.pidfd_open`` and ``socket.send_fds``) runs every one of them with
``subprocess``.

The protocol, over a ``SOCK_SEQPACKET`` socket pair (one message per datagram):
the worker sends ``{"entry", "argv", "env", "cwd"}`` JSON with the child's stdout and stderr as file
descriptors; the server answers ``{"pid": N}`` (or ``{"error": text}``), and
``{"exited": N, "code": C}`` when the child ends (``C`` as ``Popen.returncode``: negative for a
signal). When the worker goes away, the server kills its children and exits; a child dies with
the server (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.util
import io
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
MAX_MESSAGE = 1 << 20
#: The commands a child can stand for: ``python -m <key>``, which runs ``<value>.main()``.
ENTRY_POINTS = {"stagedoor_addons": "stagedoor_addons.main", "stagedoor.cli": "stagedoor.cli"}
PR_SET_PDEATHSIG = 1


def supported() -> bool:
    return (sys.platform == "linux" and hasattr(os, "pidfd_open")
            and hasattr(socket, "send_fds") and os.environ.get("STAGEDOOR_TEST_FORK") != "0")


# -- the worker's side -----------------------------------------------------------------------------
class ForkedProcess:
    """The parts of ``subprocess.Popen`` the suite uses, for a child of the fork server."""

    def __init__(self, server: ForkServer, pid: int, args: list[str], stdout: IO[Any],
                 stderr: IO[Any] | None) -> None:
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

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """What is left of stdout and stderr, once the child has ended (``Popen.communicate``
        without input)."""
        outputs: dict[str, Any] = {}
        streams = {"stdout": self.stdout, "stderr": self.stderr}
        readers = [threading.Thread(target=lambda name=name, stream=stream: outputs.__setitem__(
                       name, stream.read()), daemon=True)
                   for name, stream in streams.items() if stream is not None]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(reader.is_alive() for reader in readers):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for stream in streams.values():
            if stream is not None:
                stream.close()
        return outputs.get("stdout"), outputs.get("stderr")

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

    def spawn(self, args: list[str], env: dict[str, str], cwd: Path, timeout: float = 30.0,
              *, stderr_to_stdout: bool = False, text: bool = False) -> ForkedProcess:
        """Fork a child running ``main()`` with ``args[3:]``: ``args`` is the command line it
        stands for (``[python, "-m", "stagedoor_addons", ...]``, see ``ENTRY_POINTS``).
        ``stderr_to_stdout`` as ``stderr=subprocess.STDOUT``, ``text`` as ``text=True``."""
        if not forkable(args):
            raise ValueError(f"the fork server runs 'python -m' one of {sorted(ENTRY_POINTS)}, "
                             f"not {args}")
        out_r, out_w = os.pipe()
        err_r, err_w = (-1, os.dup(out_w)) if stderr_to_stdout else os.pipe()
        request = json.dumps({"entry": args[2], "argv": args[3:], "env": env,
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
            _close(out_r, err_r)
            raise
        finally:
            _close(out_w, err_w)
        if "pid" not in reply:
            _close(out_r, err_r)
            raise RuntimeError(f"the fork server could not start {args}: {reply.get('error')}")
        # The pipes' read ends: the test reads them to EOF (the child's exit closes them).
        stdout = _reader(out_r, text)
        stderr = None if stderr_to_stdout else _reader(err_r, text)
        return ForkedProcess(self, reply["pid"], args, stdout, stderr)

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


def _close(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _reader(fd: int, text: bool) -> IO[Any]:
    """A pipe's read end as ``Popen`` gives it: bytes, or text in the locale's encoding with
    universal newlines (``text=True``)."""
    raw = open(fd, "rb")  # noqa: SIM115 (the caller closes it, as Popen's)
    return io.TextIOWrapper(raw) if text else raw


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


def forkable(args: list[str]) -> bool:
    """Whether ``args`` is a command the fork server runs: ``python -m <ENTRY_POINTS key> ...``
    with this interpreter."""
    return (len(args) >= 3 and args[0] == sys.executable and args[1] == "-m"
            and args[2] in ENTRY_POINTS)


def popen(args: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None,
          text: bool = False, stderr_to_stdout: bool = False, fork: bool = True
          ) -> ForkedProcess | subprocess.Popen[Any]:
    """``subprocess.Popen(args, stdin=DEVNULL, stdout=PIPE, stderr=PIPE or STDOUT)``, forked
    from this worker's fork server where it can be (see the module docstring); ``fork=False``
    for a fresh interpreter."""
    env = dict(os.environ if env is None else env)
    if fork and supported() and forkable(args):
        return server().spawn(args, env, Path(cwd), stderr_to_stdout=stderr_to_stdout, text=text)
    return subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if stderr_to_stdout else subprocess.PIPE,
                            text=text)


def run(args: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None,
        timeout: float = 60.0, text: bool = False) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(args, capture_output=True, stdin=DEVNULL, timeout=timeout)``, forked
    from this worker's fork server where it can be (see the module docstring)."""
    if not (supported() and forkable(args)):
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=text,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    child = popen(args, cwd=cwd, env=env, text=text)
    try:
        out, err = child.communicate(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate(10)
        raise
    return subprocess.CompletedProcess(args, child.wait(), out, err)


# -- the server's side -----------------------------------------------------------------------------
@dataclass
class ChildRequest:
    entry: str
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
    for package_name in ("stagedoor", "stagedoor_addons"):
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
                return ChildRequest(message["entry"], message["argv"], message["env"],
                                    message["cwd"], *fds)
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
    sys.argv = [_main_path(request.entry), *request.argv]


def _main_path(entry: str) -> str:
    """``sys.argv[0]`` as ``python -m <entry>`` sets it: the file that runs."""
    spec = importlib.util.find_spec(entry)
    assert spec is not None
    if spec.submodule_search_locations is not None:  # a package: its __main__
        spec = importlib.util.find_spec(entry + ".__main__")
        assert spec is not None
    return str(spec.origin)


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    preload()
    # What the imports made lives as long as the process, in the server and in every child: out
    # of the collector's reach (the permanent generation), a child's collections do not walk it,
    # and do not write to its pages (copy-on-write). Measured on `stagedoor check`, forked:
    # 0.25 s of CPU without, 0.07 s with (a fresh interpreter: 0.37 s).
    gc.freeze()
    request = serve(sock)
    if request is None:
        return
    sock.close()
    become(request)
    command = importlib.import_module(ENTRY_POINTS[request.entry])
    # As `python -m <entry>` ends: SystemExit through the interpreter's own shutdown.
    sys.exit(command.main())


if __name__ == "__main__":
    main(int(sys.argv[1]))
