"""The command line: check, the boot error, token minting and the demo, as a user runs them."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest

from . import forkserver
from .conftest import ROOT
from .httpraw import request

CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("INSIGHTS_", "BACKSTAGE_"))}


def stagedoor(*args: str, env: dict[str, str] | None = None, timeout: float = 30):
    return forkserver.run([sys.executable, "-m", "stagedoor_addons", *args],
                          env={**CLEAN_ENV, **(env or {})}, text=True, timeout=timeout)


def test_check_accepts_the_shipped_policies():
    result = stagedoor("check", env={"INSIGHTS_API_URL": "http://127.0.0.1:1",
                                     "BACKSTAGE_BASE_URL": "http://127.0.0.1:2"})
    assert result.returncode == 0, result.stderr
    assert "1 plugin(s)" in result.stdout


def test_check_lists_every_problem_as_file_line(tmp_path):
    (tmp_path / "broken.yaml").write_text(
        "pluginId: broken\nroutes:\n  - path: /x/{id}\n    params: {id: '('}\n"
        "    upstream: http://127.0.0.1:1/{nope}\n    colour: red\n")
    result = stagedoor("check", "--policies", str(tmp_path),
                       env={"INSIGHTS_API_URL": "http://x", "BACKSTAGE_BASE_URL": "http://y"})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "broken.yaml:" in line]
    assert len(lines) == 3, result.stderr
    assert all(re.match(rf"{re.escape(str(tmp_path))}/broken.yaml:\d+: ", line)
               for line in lines)
    assert any(":6: unknown key 'colour'" in line for line in lines)


def test_run_without_required_config_exits_1_naming_the_key():
    started = time.monotonic()
    result = stagedoor("run", "--listen", "127.0.0.1:0",
                       env={"BACKSTAGE_BASE_URL": "http://127.0.0.1:2"})
    assert result.returncode == 1
    assert ("Missing required config value at 'insights.externalApiUrl' in "
            "'config/app-config.yaml'") in result.stderr
    assert time.monotonic() - started < 10


def test_token_mints_a_backstage_shaped_user_token(tmp_path):
    result = stagedoor("token", "--user", "user:default/someone", "--dev-dir", str(tmp_path),
                       "--base-url", "http://127.0.0.1:7008")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["typ"] == "vnd.backstage.user" and header["alg"] == "ES256"
    assert claims["sub"] == "user:default/someone"
    assert claims["iss"] == "http://127.0.0.1:7008/api/auth"


def test_token_mints_a_plugin_token(tmp_path):
    result = stagedoor("token", "--plugin", "catalog", "--target", "insights", "--dev-dir",
                       str(tmp_path))
    claims = jwt.decode(result.stdout.strip(), options={"verify_signature": False})
    assert (claims["sub"], claims["aud"]) == ("catalog", "insights")


@pytest.mark.e2e
def test_demo_works_with_no_setup_and_its_curl_lines_do_what_they_say(tmp_path):
    proc = forkserver.popen(
        [sys.executable, "-m", "stagedoor_addons", "demo", "--listen", "127.0.0.1:0",
         "--upstream-port", "0", "--dev-dir", str(tmp_path / "dev")], env=CLEAN_ENV, text=True)
    try:
        assert proc.stdout is not None
        banner: list[str] = []
        reader = threading.Thread(target=lambda: banner.extend(iter(proc.stdout.readline, "")),
                                  daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("mint more" in b for b in banner):
            time.sleep(0.1)
        curls = [shlex.split(b.strip()) for b in banner if b.strip().startswith("curl ")]
        assert len(curls) == 11, "".join(banner) + (proc.stderr.read() if proc.poll() else "")
        # insights (policies/insights.yaml), then the notes example (examples/notes/notes.yaml)
        expected = [200, 401, 200, 400, 403, 200, 400, 201, 400, 415, 400]
        answers = []
        for argv, status in zip(curls, expected, strict=True):
            url = argv[-1]
            port = int(re.search(r":(\d+)/", url).group(1))
            target = url.split(f":{port}", 1)[1]
            headers: dict[str, str] = {}
            body = b""
            for flag, value in itertools.pairwise(argv):
                if flag == "-H":
                    name, _, text = value.partition(": ")
                    headers[name] = text
                elif flag == "-d":
                    body = value.encode()
                    headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
            resp = request(port, "POST" if body else "GET", target, headers, body=body)
            assert resp.status == status, (url, resp.body)
            answers.append(resp)
        assert answers[4].json()["error"]["message"] == \
            "This endpoint does not allow 'service' credentials"
        notes = answers[5]  # declared query only, the upstream's own token, a filtered answer
        assert notes.json()["upstreamSaw"] == \
            "/v1/services/payments-api/notes?tag=ops&source=stagedoor"
        assert notes.header("set-cookie") is None and notes.header("x-powered-by") is None
        assert answers[8].json()["error"]["message"] == \
            "Invalid request body: /text: '' is too short (minLength 1)"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_readme_quick_start_is_exactly_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["./run.sh demo", "./run.sh test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run.sh test" in ci


def test_core_package_never_imports_mitmproxy():
    # (tests/test_layering.py reads every import, in functions too)
    for path in (ROOT / "stagedoor").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) mitmproxy", text, re.M), path
        assert not {"addons", "stagedoor_addons"} & set(
            re.findall(r"^\s*(?:from|import) (\w+)", text, re.M)), path


def test_run_sh_finds_a_python_without_pyenv_shims(tmp_path):
    # With PATH holding only system dirs, run.sh must still find 3.12+ by itself.
    script = (ROOT / "run.sh").read_text()
    assert "versions/3.1[2-9]" in script and "python3.13" in script
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    probe = subprocess.run(["bash", "-c", f"source <(sed -n '/^python_ok()/,/^}}/p;"
                            f"/^find_python()/,/^}}/p' {ROOT / 'run.sh'}); find_python"],
                           env=env, capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    found = Path(probe.stdout.strip())
    version = subprocess.run([str(found), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30).stdout
    assert version.strip() >= "(3, 12)"
