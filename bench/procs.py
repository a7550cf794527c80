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


def tree_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` and its direct children (a supervisor's workers), KiB."""
    total = 0
    for each in (pid, *children_of(pid)):
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_kib(each)
    return total


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its direct children (a supervisor's workers, nginx's worker)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children_of(pid))


def system_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / _TICK  # guest time is already counted in user


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


_SPIN = """
import time
end = time.monotonic() + {seconds}
n = 0
while time.monotonic() < end:
    for i in range(2000):
        n += i
print(n)
"""


def cpu_scaling(python: str, seconds: float = 2.0) -> float:
    """How much work two CPU-bound processes get done at once, relative to one alone (ideal:
    2.0 on two free cores). On a VM whose vCPUs share a physical core, or with busy neighbours,
    it is less: the ceiling for ``--workers 2`` on this machine at this moment."""
    code = _SPIN.format(seconds=seconds)

    def work(count: int) -> int:
        procs = [subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE)
                 for _ in range(count)]
        return sum(int(p.communicate(timeout=seconds + 30)[0]) for p in procs)

    alone = work(1)
    return round(work(2) / alone, 2) if alone else 0.0
