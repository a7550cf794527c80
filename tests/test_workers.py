"""``stagedoor run --workers N`` (stagedoor/supervisor.py): the pure helpers, the SO_REUSEPORT
listener, mitmproxy's own listeners sharing the port, and the supervisor end to end."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagedoor import supervisor
from stagedoor.devkeys import generate_dev_keys, mint_user_token

from .conftest import ROOT, RecordingServer, Sidecar, start_sidecar, write_config


# -- helpers -------------------------------------------------------------------------------------
def test_strip_option_removes_both_spellings_and_keeps_the_rest():
    argv = ["run", "--workers", "2", "--config", "a.yaml", "--workers=3", "--listen", "x:1"]
    assert supervisor.strip_option(argv, "--workers") == [
        "run", "--config", "a.yaml", "--listen", "x:1"]


def test_each_worker_gets_the_admin_port_plus_its_index():
    assert supervisor.worker_admin(("127.0.0.1", 9464), 0) == "127.0.0.1:9464"
    assert supervisor.worker_admin(("127.0.0.1", 9464), 3) == "127.0.0.1:9467"
    assert supervisor.worker_admin(("::1", 9464), 1) == "[::1]:9465"
    assert supervisor.worker_admin(("127.0.0.1", 0), 5) == "127.0.0.1:0"
    assert supervisor.worker_admin(None, 1) == "off"


def test_worker_command_overrides_listen_and_admin_and_drops_workers():
    command = supervisor.worker_command(
        ["run", "--workers", "2", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:9000"],
        "127.0.0.1", 4321, ("127.0.0.1", 9000))
    args = command(1, 7)
    assert "--workers" not in args
    assert args[-8:] == ["--listen", "127.0.0.1:4321", "--admin", "127.0.0.1:9001",
                         "--worker-index", "1", "--ready-fd", "7"]
    assert args[1:4] == ["-m", "stagedoor_addons", "run"]


def test_reserve_resolves_port_zero_and_does_not_accept_connections():
    reserved = supervisor.reserve("127.0.0.1", 0)
    try:
        port = reserved[0].getsockname()[1]
        assert port > 0
        with pytest.raises(OSError):  # bound, not listening: nobody is answering
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        for sock in reserved:
            sock.close()


def test_reserve_fails_when_a_plain_listener_holds_the_port():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(OSError):
            supervisor.reserve("127.0.0.1", holder.getsockname()[1])
    finally:
        holder.close()


def test_reuse_port_loop_lets_two_servers_share_the_reserved_port():
    reserved = supervisor.reserve("127.0.0.1", 0)
    port = reserved[0].getsockname()[1]

    async def main() -> tuple[int, int]:
        served = {"a": 0, "b": 0}

        def handler(name: str):
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                served[name] += 1
                writer.close()
            return handle

        first = await asyncio.start_server(handler("a"), "127.0.0.1", port)
        second = await asyncio.start_server(handler("b"), "127.0.0.1", port)
        assert first.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        for _ in range(60):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        await asyncio.sleep(0.2)
        first.close()
        second.close()
        return served["a"], served["b"]

    try:
        a, b = asyncio.run(main(), loop_factory=supervisor.worker_loop_factory(port))
    finally:
        for sock in reserved:
            sock.close()
    assert a + b == 60
    assert a > 0 and b > 0


def test_reuse_port_loop_leaves_other_ports_alone():
    async def main() -> int:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        value = server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        server.close()
        return value

    assert asyncio.run(main(), loop_factory=supervisor.worker_loop_factory(1)) == 0


class _NoConnections:
    """The connection registry a mitmproxy server instance reports to (none arrive here)."""

    connections: dict[object, object] = {}

    @contextlib.contextmanager
    def register_connection(self, connection_id: object, handler: object) -> Iterator[None]:
        yield


def test_mitmproxys_own_listeners_share_the_workers_port():
    """What ``--workers`` relies on: mitmproxy opens its listener through the running loop's
    ``create_server`` with the host and port, so the worker loop adds ``SO_REUSEPORT`` and N
    workers bind one port. Two of mitmproxy's reverse-mode servers (what two workers start)
    listen on the supervisor's reserved port, under the worker loop; if mitmproxy ever binds its
    socket some other way, they cannot (EADDRINUSE) and this fails before any worker does."""
    from mitmproxy.proxy import mode_servers
    from mitmproxy.test import taddons

    reserved = supervisor.reserve("127.0.0.1", 0)
    port = reserved[0].getsockname()[1]

    async def main() -> list[tuple[object, ...]]:
        with taddons.context():
            workers = [mode_servers.ServerInstance.make(
                f"reverse:http://127.0.0.1:9@127.0.0.1:{port}", _NoConnections())
                for _ in range(2)]
            try:
                for worker in workers:
                    await worker.start()
                for _ in range(4):  # the kernel queues them on one listener or the other
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                return [worker.listen_addrs for worker in workers]
            finally:
                for worker in workers:
                    if worker.is_running:
                        await worker.stop()

    try:
        addresses = asyncio.run(main(), loop_factory=supervisor.worker_loop_factory(port))
    finally:
        for sock in reserved:
            sock.close()
    assert addresses == [(("127.0.0.1", port),)] * 2


def test_describe_exit_codes():
    assert supervisor._describe(3) == "status 3"
    assert supervisor._describe(-signal.SIGKILL) == "signal SIGKILL"


# -- end to end ----------------------------------------------------------------------------------
_WORKER_READY = re.compile(r"worker (\d) \(pid (\d+)\) ready")
_PIDS = re.compile(r"\(2 workers, pids (\d+) (\d+);")


def _get(sidecar: Sidecar, path: str, token: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(sidecar.host, sidecar.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.e2e
def test_two_workers_serve_a_killed_worker_is_replaced_and_sigterm_stops_all(tmp_path: Path):
    upstream = RecordingServer("json")
    keys = generate_dev_keys(tmp_path / "keys")
    upstream.jwks = keys.user_jwks()
    token = mint_user_token(keys.user, issuer=f"{upstream.url}/api/auth")
    config = write_config(tmp_path / "app-config.yaml", f"""\
        backend:
          baseUrl: {upstream.url}
        insights:
          externalApiUrl: {upstream.url}
        stagedoor:
          shutdown:
            gracePeriod: 2s
        """)
    sidecar = start_sidecar([config], ROOT / "policies",
                            extra_args=["--workers", "2", "--admin", "127.0.0.1:0"])
    try:
        listening = next(line for line in sidecar.stderr_lines if "stagedoor listening" in line)
        pids = [int(p) for p in _PIDS.search(listening).groups()]
        assert all(_alive(pid) for pid in pids) and sidecar.proc.pid not in pids

        # Both workers answer, each through the full pipeline (token, params, upstream).
        for _ in range(20):
            status, body = _get(sidecar, "/api/insights/services/payments-api", token)
            assert status == 200, body
        assert _get(sidecar, "/api/insights/health") == (200, b'{"status":"ok"}')
        assert len(upstream.seen) >= 20

        # A worker that dies is replaced; the other one serves meanwhile. Connections that reach
        # the dying worker's socket before its last thread is gone are reset by the kernel, so
        # wait until the supervisor has reaped it (waitpid returns once every thread is gone).
        os.kill(pids[0], signal.SIGKILL)

        def reaped() -> bool:
            return any("worker 0" in line and "signal SIGKILL" in line
                       for line in list(sidecar.stderr_lines))

        assert _wait_for(reaped, 10), "\n".join(sidecar.stderr_lines)
        assert _get(sidecar, "/api/insights/health")[0] == 200

        def replaced() -> bool:
            return any(int(m.group(1)) == 0 and int(m.group(2)) not in pids
                       for line in list(sidecar.stderr_lines)
                       if (m := _WORKER_READY.search(line)))

        assert _wait_for(replaced, 30), "\n".join(sidecar.stderr_lines)
        new_pid = next(int(m.group(2)) for line in reversed(sidecar.stderr_lines)
                       if (m := _WORKER_READY.search(line)) and m.group(1) == "0")
        for _ in range(10):
            assert _get(sidecar, "/api/insights/services/payments-api", token)[0] == 200

        # SIGTERM reaches every worker; the supervisor exits 0 once they have.
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(20) == 0
        assert _wait_for(lambda: not _alive(new_pid) and not _alive(pids[1]), 10)
        assert any("all workers stopped" in line for line in sidecar.stderr_lines)
    finally:
        sidecar.stop()
        upstream.stop()
        for line in sidecar.stderr_lines:
            if m := _WORKER_READY.search(line):
                pid = int(m.group(2))
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
def test_workers_flag_is_validated():
    from stagedoor.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "--workers", "3"]).workers == 3
    assert parser.parse_args(["run"]).workers == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--workers", "0"])
