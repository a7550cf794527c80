"""The suite's fork server (tests/forkserver.py) starts sidecars that are what a fresh
``python -m stagedoor_addons run`` would be: same signals, same descriptors, same exit codes,
nothing of the server's own left in them, nothing read from the environment at import time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from tests import forkserver
from tests.conftest import ROOT, Sidecar, start_sidecar, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not forkserver.supported(),
                                                   reason="fork server: Linux only")]

#: Environment variables tests set for a sidecar: a module that read one at import time would
#: see the fork server's value, not the test's.
TEST_VARIED_PREFIXES = ("INSIGHTS_", "BACKSTAGE_", "STAGEDOOR_")
#: Modules known to copy the whole environment at import, and why that is harmless here.
WHOLE_ENVIRONMENT_READERS = {
    # BaseHandler.os_environ: the base environment of wsgiref's CGI handlers, which nothing in
    # stagedoor runs (prometheus-client imports the module for its WSGI app).
    "wsgiref/handlers.py",
}


def _start(tmp_path: Path, fork: bool) -> Sidecar:
    tmp_path.mkdir(exist_ok=True)
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "tiny.yaml").write_text(textwrap.dedent("""\
        pluginId: tiny
        routes:
          - path: /things
            auth: unauthenticated
            upstream: http://127.0.0.1:9/things
        """))
    config = write_config(tmp_path / "app-config.yaml", """\
        backend:
          baseUrl: http://127.0.0.1:9
        stagedoor:
          auth: {userTokens: false, pluginTokens: false}
        """)
    return start_sidecar([config], policies, fork=fork)


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def _settled_status_field(pid: int, name: str, samples: int = 15) -> str:
    """The value a field holds most of the time: glibc's ``pthread_create`` blocks every signal
    in the thread that starts another for the moment it takes (seen once in twenty runs: SigBlk
    fffffffffffbfeff in the forked sidecar), which a single read can catch."""
    seen = []
    for _ in range(samples):
        seen.append(_status_field(pid, name))
        time.sleep(0.01)
    return Counter(seen).most_common(1)[0][0]


def _fd_targets(pid: int) -> dict[int, str]:
    base = Path(f"/proc/{pid}/fd")
    targets = {}
    for entry in base.iterdir():
        try:
            targets[int(entry.name)] = os.readlink(entry)
        except FileNotFoundError:  # closed while listing
            continue
    return targets


def test_no_module_reads_a_variable_tests_set_at_import_time():
    """What the server imports once is imported with its environment, not the child's: a
    module reading STAGEDOOR_* or INSIGHTS_* at import time would see the wrong value."""
    probe = textwrap.dedent("""\
        import collections.abc, json, os, sys
        read = set()

        def whole():  # who copies the whole environment: the first frame outside this probe
            frame = sys._getframe(2)
            while frame.f_code.co_filename in ("<string>", collections.abc.__file__) \
                    or frame.f_code.co_filename.startswith("<frozen"):
                frame = frame.f_back
            read.add("<every variable> " + frame.f_code.co_filename)

        class Spy(collections.abc.MutableMapping):
            def __init__(self, real): self.real = real
            def __getitem__(self, key): read.add(key); return self.real[key]
            def __setitem__(self, key, value): self.real[key] = value
            def __delitem__(self, key): del self.real[key]
            def __iter__(self): whole(); return iter(self.real)
            def __len__(self): return len(self.real)
            def __contains__(self, key): read.add(key); return key in self.real
            def copy(self): whole(); return dict(self.real)

        os.environ = Spy(os.environ)
        from tests import forkserver
        names = forkserver.preload()
        print(json.dumps({"read": sorted(read), "modules": len(names)}))
        """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    report = json.loads(out.splitlines()[-1])
    assert report["modules"] > 30  # stagedoor's and the addons' modules were imported
    varied = [k for k in report["read"] if k.startswith(TEST_VARIED_PREFIXES)
              or (k.startswith("<every variable>")
                  and not k.endswith(tuple(WHOLE_ENVIRONMENT_READERS)))]
    assert varied == [], f"read at import time: {varied}"


def test_a_forked_sidecar_has_the_signals_descriptors_and_exit_of_a_fresh_one(tmp_path):
    fresh = _start(tmp_path / "fresh", fork=False)
    forked = _start(tmp_path / "forked", fork=True)
    try:
        assert isinstance(forked.proc, forkserver.ForkedProcess)
        server_pid = forkserver.server().proc.pid
        assert os.getppid() != server_pid and forked.proc.pid != server_pid
        # Signal handling: blocked, ignored and caught signals as in a fresh interpreter that
        # ran the same command.
        for name in ("SigBlk", "SigIgn", "SigCgt"):
            assert _settled_status_field(forked.proc.pid, name) == \
                _settled_status_field(fresh.proc.pid, name), name
        # Descriptors: stdin is /dev/null, stdout and stderr are pipes, and nothing of the
        # server's (its control socket) is left open in the child.
        targets = _fd_targets(forked.proc.pid)
        assert targets[0] == "/dev/null"
        assert targets[1].startswith("pipe:") and targets[2].startswith("pipe:")
        server_sockets = {t for t in _fd_targets(server_pid).values() if t.startswith("socket:")}
        assert server_sockets and not server_sockets & set(targets.values())
        assert len(targets) == len(_fd_targets(fresh.proc.pid))
        assert os.readlink(f"/proc/{forked.proc.pid}/cwd") == str(ROOT)
        # Exit: SIGTERM is a graceful stop (0), as for the fresh one; SIGKILL is -9.
        assert forked.stop() == 0 and fresh.stop() == 0
        assert any("stagedoor listening" in line for line in forked.stderr_lines)
        again = _start(tmp_path / "forked", fork=True)
        again.proc.kill()
        assert again.proc.wait(10) == -signal.SIGKILL
    finally:
        fresh.stop()
        forked.stop()


def test_a_server_that_goes_away_takes_its_sidecars_with_it(tmp_path):
    server = forkserver.ForkServer()
    try:
        args = [sys.executable, "-m", "stagedoor_addons", "run", "--policies",
                str(tmp_path), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
        child = server.spawn(args, dict(os.environ), ROOT)
        assert child.poll() is None
    finally:
        server.close()
    # The worker's side closed: the server killed the child and exited.
    assert server.proc.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)


def test_only_the_stagedoor_commands_are_forked():
    server = forkserver.server()
    with pytest.raises(ValueError, match="runs 'python -m' one of"):
        server.spawn([sys.executable, "-c", "print(1)"], dict(os.environ), ROOT)


def test_a_forked_command_prints_and_exits_as_a_fresh_one(tmp_path):
    """``forkserver.run`` (the CLI tests' ``subprocess.run``) gives what a fresh interpreter
    running the same ``python -m`` command gives: exit code, stdout and stderr, byte for byte,
    for both entry points, on success, on a refused input and on a usage error."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "tiny.yaml").write_text("pluginId: tiny\nroutes:\n  - path: /things\n"
                                        "    auth: unauthenticated\n"
                                        "    upstream: http://127.0.0.1:9/things\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tiny.yaml").write_text("pluginId: tiny\nroutes:\n  - path: things\n")
    config = write_config(tmp_path / "app-config.yaml", """\
        backend:
          baseUrl: http://127.0.0.1:9
        stagedoor:
          auth: {userTokens: false, pluginTokens: false}
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(TEST_VARIED_PREFIXES)}
    commands = [
        ["stagedoor_addons", "check", "--config", str(config), "--policies", str(policies)],
        ["stagedoor_addons", "check", "--config", str(config), "--policies", str(broken)],
        ["stagedoor_addons", "token", "--no-such-flag"],
        ["stagedoor.cli", "explain", "--config", str(config), "--policies", str(policies),
         "GET", "/api/tiny/things"],
        ["stagedoor.cli", "explain", "--config", str(config), "--policies", str(policies),
         "GET", "/api/tiny/nothing"],
    ]
    codes = set()
    for command in commands:
        args = [sys.executable, "-m", *command]
        fresh = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, timeout=60,
                               stdin=subprocess.DEVNULL)
        forked = forkserver.run(args, env=env)
        assert (forked.returncode, forked.stdout, forked.stderr) == \
            (fresh.returncode, fresh.stdout, fresh.stderr), command
        codes.add(fresh.returncode)
        text = forkserver.run(args, env=env, text=True)
        assert text.stdout == fresh.stdout.decode() and text.stderr == fresh.stderr.decode()
    assert codes == {0, 1, 2}  # the commands above cover success, refusal and usage errors


def test_a_forked_command_that_outlives_its_timeout_is_killed(tmp_path):
    sidecar = _start(tmp_path, fork=True)  # writes a config and policies that serve
    sidecar.stop()
    args = [sys.executable, "-m", "stagedoor_addons", "run", "--policies",
            str(tmp_path / "policies"), "--config", str(tmp_path / "app-config.yaml"),
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run(args, timeout=3)
    # The server reaped it: none of its children is left running.
    pid = forkserver.server().proc.pid
    assert Path(f"/proc/{pid}/task/{pid}/children").read_text().split() == []
