"""``stagedoor run --workers N``: N sidecar processes sharing one listening port.

mitmproxy runs one event loop on one core; N workers use N cores. Each worker is a complete
``stagedoor run`` process (its own policies, verifier, token cache, access log lines, admin
listener, hot reload and graceful drain); the kernel spreads new connections across their
listening sockets (``SO_REUSEPORT``).

The parent (:class:`Supervisor`) holds no proxy at all, imports no mitmproxy and does no request
work:

- it binds the address first (``SO_REUSEPORT``, not listening, so it never receives connections)
  to reserve the port, resolve port 0, and fail early when the address is taken;
- it starts the workers with the same command line plus ``--listen HOST:PORT`` (the resolved
  port), an admin address of their own and a pipe on which each says "ready";
- once all are ready it logs ``stagedoor listening on http://HOST:PORT (...)``, like one process;
- a worker that exits on its own is restarted after a backoff (0.5s, doubling up to 30s, back to
  0.5s once a worker has stayed up for a minute). New connections go to the other workers
  meanwhile; connections already queued on the dead worker's socket are reset by the kernel,
  unless ``sysctl net.ipv4.tcp_migrate_req=1`` (Linux 5.14+) lets it hand them over;
- SIGTERM/SIGINT are passed on to every worker (each drains its requests in flight) and the
  parent exits 0 when they all have; SIGHUP (reload) is passed on too. A second SIGTERM/SIGINT,
  or workers still alive after the grace period, end them with SIGKILL (exit status 1).

Worker side: :func:`worker_loop_factory` gives ``asyncio.run`` an event loop whose
``create_server`` sets ``SO_REUSEPORT`` for the proxy port only, which is how mitmproxy's
listener (``asyncio.start_server`` in ``mitmproxy/proxy/mode_servers.py``) gets it without any
change to mitmproxy. ``tests/test_workers.py`` checks that mitmproxy still listens that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .eventloop import ReusePortSelectorLoop, choose
from .signing import SEED_ENV, Seed

log = logging.getLogger("stagedoor")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
#: A worker that ran this long before exiting starts the backoff over.
STABLE_AFTER = 60.0
READY_TIMEOUT = 120.0
#: Added to the workers' own shutdown grace period before the parent resorts to SIGKILL.
STOP_MARGIN = 5.0


# -- worker side -------------------------------------------------------------------------------
#: asyncio's selector loop with SO_REUSEPORT on the shared port (uvloop's twin: eventloop.py).
ReusePortEventLoop = ReusePortSelectorLoop


def worker_loop_factory(port: int, setting: str | None = None,
                        ) -> Callable[[], asyncio.AbstractEventLoop]:
    """For ``asyncio.run(..., loop_factory=...)`` in a worker listening on ``port``: the loop
    ``stagedoor.eventLoop`` / ``STAGEDOOR_EVENT_LOOP`` picks (uvloop where installed)."""
    return choose(setting, reuse_port=port).factory


def announce_ready(ready_fd: int, index: int) -> None:
    """Tell the supervisor this worker listens. Never raises: the parent may be gone."""
    with contextlib.suppress(OSError):
        os.write(ready_fd, f"{index} {os.getpid()}\n".encode())
    with contextlib.suppress(OSError):
        os.close(ready_fd)


def exit_with_parent() -> None:
    """Linux: get SIGTERM when the supervisor dies, even by SIGKILL (no orphaned workers)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


# -- parent side -------------------------------------------------------------------------------
def reserve(host: str, port: int) -> list[socket.socket]:
    """Bind (not listen) every address of ``host:port`` with SO_REUSEPORT; port 0 -> one port.

    Raises OSError (e.g. EADDRINUSE) like a listener would.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # every family on the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def strip_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (every occurrence)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def worker_admin(admin: tuple[str, int] | None, index: int) -> str:
    """Worker ``index``'s admin address: the configured port plus the index (port 0 stays 0)."""
    if admin is None:
        return "off"
    host, port = admin
    return format_address(host, port + index if port else 0)


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready: bool = False
    failures: int = 0
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Starts ``count`` workers from ``command(index, ready_fd)`` and keeps them running."""

    count: int
    command: Callable[[int, int], list[str]]
    on_ready: Callable[[list[int]], None] | None = None
    stop_grace: float = 10.0 + STOP_MARGIN
    ready_timeout: float = READY_TIMEOUT
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    stable_after: float = STABLE_AFTER
    env: dict[str, str] | None = None
    slots: list[_Slot] = field(default_factory=list)
    restarts: int = 0

    def run(self) -> int:
        """Until SIGTERM/SIGINT: 0 when every worker stopped in time, 1 otherwise."""
        self.slots = [_Slot(i) for i in range(self.count)]
        ready_r, ready_w = os.pipe()
        wake_r, wake_w = os.pipe()
        for fd in (ready_r, wake_r, wake_w):
            os.set_blocking(fd, False)
        self._ready_w = ready_w
        received: list[int] = []
        previous: dict[int, Any] = {}
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in handled:
            previous[sig] = signal.signal(sig, lambda signum, _frame: received.append(signum))
        sel = selectors.DefaultSelector()
        sel.register(ready_r, selectors.EVENT_READ, "ready")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            return self._loop(sel, ready_r, wake_r, received)
        finally:
            self._kill_all()
            sel.close()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (ready_r, ready_w, wake_r, wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self, sel: selectors.BaseSelector, ready_r: int, wake_r: int,
              received: list[int]) -> int:
        for slot in self.slots:
            self._start(slot)
        starting = True
        start_deadline = time.monotonic() + self.ready_timeout
        buffer = b""
        stop_deadline: float | None = None
        while True:
            for key, _ in sel.select(0.25):
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                else:
                    with contextlib.suppress(BlockingIOError):
                        buffer += os.read(ready_r, 4096)
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._mark_ready(line)

            signals, received[:] = list(received), []
            for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    if stop_deadline is not None:
                        log.warning("stagedoor: second shutdown signal, killing the workers")
                        self._kill_all()
                        return 1
                    log.info("stagedoor: stopping %d worker(s)", self._alive())
                    self._signal_all(signal.SIGTERM)
                    stop_deadline = time.monotonic() + self.stop_grace
                elif signum == signal.SIGHUP and stop_deadline is None:
                    log.info("stagedoor: passing SIGHUP (reload) on to the workers")
                    self._signal_all(signal.SIGHUP)

            now = time.monotonic()
            if stop_deadline is not None:
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.poll() is not None:
                        slot.proc = None
                if not self._alive():
                    log.info("stagedoor: all workers stopped")
                    return 0
                if now > stop_deadline:
                    log.error("stagedoor: %d worker(s) still running %.0fs after SIGTERM, killing "
                              "them", self._alive(), self.stop_grace)
                    self._kill_all()
                    return 1
                continue

            for slot in self.slots:
                if slot.proc is not None and slot.proc.poll() is not None:
                    code = slot.proc.returncode
                    if starting:
                        log.error("stagedoor: worker %d exited with %s during startup",
                                  slot.index, _describe(code))
                        self._stop_all_now()
                        return 1
                    self._schedule_restart(slot, code, now)
                if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                    self.restarts += 1
                    self._start(slot)

            if starting:
                if all(slot.ready for slot in self.slots):
                    starting = False
                    if self.on_ready is not None:
                        self.on_ready([s.proc.pid for s in self.slots if s.proc is not None])
                elif now > start_deadline:
                    log.error("stagedoor: workers not ready after %.0fs", self.ready_timeout)
                    self._stop_all_now()
                    return 1

    # -- workers ---------------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        slot.ready = False
        slot.started_at = time.monotonic()
        # Own process group: a terminal's Ctrl-C reaches the supervisor only, which passes one
        # SIGTERM on (a second signal would cut a worker's drain short).
        slot.proc = subprocess.Popen(self.command(slot.index, self._ready_w),
                                     pass_fds=(self._ready_w,), env=self.env,
                                     stdin=subprocess.DEVNULL, process_group=0)

    def _mark_ready(self, line: bytes) -> None:
        try:
            index_text, pid_text = line.decode().split()
            index, pid = int(index_text), int(pid_text)
        except ValueError:
            return
        if 0 <= index < len(self.slots):
            slot = self.slots[index]
            if slot.proc is not None and slot.proc.pid == pid:
                slot.ready = True
                log.info("stagedoor: worker %d (pid %d) ready", index, pid)

    def _schedule_restart(self, slot: _Slot, code: int, now: float) -> None:
        assert slot.proc is not None
        lived = now - slot.started_at
        slot.failures = 1 if lived >= self.stable_after else slot.failures + 1
        delay = min(self.backoff_max, self.backoff_initial * 2 ** (slot.failures - 1))
        log.warning("stagedoor: worker %d (pid %d) exited with %s after %.1fs; restarting in "
                    "%.1fs", slot.index, slot.proc.pid, _describe(code), lived, delay)
        slot.proc = None
        slot.ready = False
        slot.restart_at = now + delay

    def _alive(self) -> int:
        return sum(1 for s in self.slots if s.proc is not None and s.proc.poll() is None)

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if signum != signal.SIGHUP:
                slot.restart_at = None  # stopping: no restarts
            if slot.proc is not None and slot.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signum)

    def _stop_all_now(self) -> None:
        """Startup failed: SIGTERM, a short wait, then SIGKILL."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._kill_all()

    def _kill_all(self) -> None:
        for slot in self.slots:
            slot.restart_at = None
            if slot.proc is not None:
                if slot.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        slot.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    slot.proc.wait(5)
                slot.proc = None


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"status {code}"


def worker_command(argv: Sequence[str], host: str, port: int, admin: tuple[str, int] | None,
                   module: str = "stagedoor_addons") -> Callable[[int, int], list[str]]:
    """The command line of worker ``index``: ``python -m <module>`` (the command that starts a
    proxy) with the parent's own ``run`` arguments, minus ``--workers``, plus the resolved listen
    address, its admin address and the ready pipe."""
    base = [sys.executable, "-m", module, *strip_option(argv, "--workers")]

    def command(index: int, ready_fd: int) -> list[str]:
        return [*base, "--listen", format_address(host, port), "--admin",
                worker_admin(admin, index), "--worker-index", str(index),
                "--ready-fd", str(ready_fd)]

    return command


def supervise(module: str, argv: Sequence[str], count: int, host: str, port: int,
              admin: tuple[str, int] | None, grace_period: float,
              on_ready: Callable[[str, int, list[int]], None]) -> int:
    """The ``--workers N`` parent: reserve the address, run ``count`` workers (``python -m
    module``), return the exit status.

    ``on_ready(host, port, pids)`` runs once every worker listens.
    """
    try:
        reserved = reserve(host, port)
    except OSError as exc:
        log.error("stagedoor: cannot listen on %s: %s", format_address(host, port),
                  exc.strerror or exc)
        return 1
    port = reserved[0].getsockname()[1]
    # One signing-key seed for all workers: they publish and sign with the same plugin keys.
    os.environ.setdefault(SEED_ENV, Seed.new().encode())
    supervisor = Supervisor(
        count, worker_command(argv, host, port, admin, module),
        on_ready=lambda pids: on_ready(host, port, pids),
        stop_grace=grace_period + STOP_MARGIN,
    )
    try:
        return supervisor.run()
    finally:
        for sock in reserved:
            sock.close()
