"""Child processes of a benchmark run: started with their output in files, waited for, stopped.

Every process is ours (started here, stopped here by its own pid), listens on 127.0.0.1 only and
is stopped by :class:`Processes` even when the run fails half way.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def wait_for_line(path: Path, pattern: re.Pattern[str], timeout: float,
                  proc: subprocess.Popen[bytes]) -> re.Match[str]:
    """Poll a log file until ``pattern`` shows up in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = pattern.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"{path.stem} exited with {proc.returncode} before it was ready:\n"
                               + text[-2000:])
        time.sleep(0.05)
    raise RuntimeError(f"{path.stem} not ready after {timeout:g}s:\n"
                       + (path.read_text(errors="replace")[-2000:] if path.exists() else ""))


def rss_kib(pid: int) -> int:
    """Resident set size of one process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        return [int(p) for p in path.read_text().split()]
    return []


@dataclass
class Processes:
    """Starts processes with output to files under ``workdir``; ``stop_all`` ends them all."""

    workdir: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              stdout: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(stdout or self.workdir / f"{name}.out", "wb")  # noqa: SIM115
        err = open(self.workdir / f"{name}.err", "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env=env, cwd=self.workdir)
        finally:
            out.close()
            err.close()
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.err"

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc in list(reversed(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def which(name: str) -> str | None:
    from shutil import which as _which

    found = _which(name)
    if found is None:
        for base in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
            candidate = os.path.join(base, name)
            if os.access(candidate, os.X_OK):
                return candidate
    return found
