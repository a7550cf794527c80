"""Reproducible installs: the hash-locked requirements files agree with pyproject.toml, every
install path uses them, and the supported mitmproxy range is pinned and checked at start."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from stagedoor.versions import mitmproxy_version_problem, supported_mitmproxy_range

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEST_LOCK = ROOT / "requirements-test.lock"
RUNTIME_LOCK = ROOT / "requirements.lock"
REFRESH = "refresh the lock files with ./run.sh lock and commit them"

#: The platforms the lock files are for: Linux x86_64 and aarch64, CPython 3.12 and 3.13.
ENVIRONMENTS = [
    {"python_version": py, "python_full_version": f"{py}.0", "sys_platform": "linux",
     "platform_system": "Linux", "os_name": "posix", "platform_machine": machine,
     "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    for py in ("3.12", "3.13") for machine in ("x86_64", "aarch64")
]

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(?:\s*;\s*([^\\]+?))?\s*\\?$")


def read_lock(path: Path) -> dict[str, tuple[Version, str | None, int]]:
    """name -> (pinned version, marker, number of hashes) of a `pip-compile`-style lock."""
    pins: dict[str, tuple[Version, str | None, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            name, version, marker = match.groups()
            current = canonicalize_name(name)
            assert current not in pins, f"{path.name}: {name} pinned twice"
            pins[current] = (Version(version), marker, 0)
        elif line.strip().startswith("--hash=sha256:") and current is not None:
            version, marker, hashes = pins[current]
            pins[current] = (version, marker, hashes + 1)
        elif line and not line.startswith((" ", "#")):
            pytest.fail(f"{path.name}: unexpected line {line!r}")
    return pins


def declared(extras: bool) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"]) + list(PYPROJECT["build-system"]["requires"])
    if extras:
        lines += [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(line) for line in lines]


def drift(lock: Path, requirements: list[Requirement]) -> list[str]:
    pins = read_lock(lock)
    problems = []
    for requirement in requirements:
        for env in ENVIRONMENTS:
            if requirement.marker is not None and not requirement.marker.evaluate(env):
                continue
            pin = pins.get(canonicalize_name(requirement.name))
            if pin is None:
                problems.append(f"{requirement} is not in {lock.name}")
            elif not requirement.specifier.contains(pin[0], prereleases=True):
                problems.append(f"{requirement}: {lock.name} pins {pin[0]}")
            elif pin[1] is not None and not Marker(pin[1]).evaluate(env):
                problems.append(f"{requirement}: {lock.name} leaves it out on {env}")
            break
    return sorted(set(problems))


@pytest.mark.parametrize(("lock", "extras"), [(TEST_LOCK, True), (RUNTIME_LOCK, False)],
                         ids=["requirements-test.lock", "requirements.lock"])
def test_every_declared_dependency_is_pinned_in_the_lock_within_its_range(lock, extras):
    assert drift(lock, declared(extras)) == [], REFRESH


@pytest.mark.parametrize("lock", [TEST_LOCK, RUNTIME_LOCK], ids=lambda p: p.name)
def test_every_pin_carries_hashes(lock):
    pins = read_lock(lock)
    assert len(pins) > 20
    assert [name for name, (_, _, hashes) in pins.items() if hashes == 0] == []


def test_the_runtime_lock_pins_the_same_versions_as_the_test_lock():
    test_pins, runtime_pins = read_lock(TEST_LOCK), read_lock(RUNTIME_LOCK)
    assert set(runtime_pins) <= set(test_pins)
    assert {n: v for n, (v, _, _) in runtime_pins.items()} == \
        {n: test_pins[n][0] for n in runtime_pins}, REFRESH


def test_the_drift_check_sees_a_dependency_added_to_pyproject():
    # The check above must be able to fail: a new dependency, or a raised lower bound.
    added = [*declared(extras=False), Requirement("no-such-dependency>=1")]
    assert drift(RUNTIME_LOCK, added) == ["no-such-dependency>=1 is not in requirements.lock"]
    raised = [Requirement("httpx>=99")]
    assert drift(RUNTIME_LOCK, raised)[0].startswith("httpx>=99: requirements.lock pins ")


def test_run_sh_and_the_dockerfile_install_from_the_locks_with_hashes():
    run_sh = (ROOT / "run.sh").read_text()
    assert 'install --require-hashes --no-deps -r "$LOCK"' in run_sh
    assert 'LOCK="requirements-test.lock"' in run_sh
    assert "--no-deps --no-build-isolation -e ." in run_sh
    assert 'cat pyproject.toml "$LOCK" | sha256sum' in run_sh  # reinstall when either changes
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "-r requirements.lock" in dockerfile
    assert "--no-deps" in dockerfile
    assert "!requirements.lock" in (ROOT / ".dockerignore").read_text()


def test_the_installed_packages_are_the_locked_ones():
    from importlib import metadata

    pins = read_lock(TEST_LOCK)
    env = {**ENVIRONMENTS[0], "python_version": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    wrong = []
    for name, (version, marker, _) in pins.items():
        if marker is not None and not Marker(marker).evaluate(env):
            continue
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} not installed")
            continue
        if installed != version:
            wrong.append(f"{name} {installed} installed, {version} locked")
    assert wrong == [], "the .venv is not the locked set: ./run.sh reinstalls it"


# -- the supported mitmproxy range -----------------------------------------------------------


def test_pyproject_pins_a_closed_mitmproxy_range():
    [mitmproxy] = [r for r in declared(extras=False) if r.name == "mitmproxy"]
    upper = [s for s in mitmproxy.specifier if s.operator in ("<", "<=", "~=", "==")]
    lower = [s for s in mitmproxy.specifier if s.operator in (">=", ">", "~=", "==")]
    assert upper and lower, f"{mitmproxy}: the tested range needs both bounds"
    assert SpecifierSet(supported_mitmproxy_range()) == mitmproxy.specifier


def test_the_installed_mitmproxy_is_in_the_supported_range():
    assert mitmproxy_version_problem() is None


@pytest.mark.parametrize("version", ["11.0.2", "12.1.9", "13.0.0", "not-a-version"])
def test_a_mitmproxy_outside_the_range_is_named_with_the_range(version):
    problem = mitmproxy_version_problem(version, ">=12.2,<13")
    assert problem is not None
    assert f"mitmproxy {version} is installed" in problem
    assert "tested with mitmproxy >=12.2,<13 only" in problem


def test_stagedoor_run_refuses_an_unsupported_mitmproxy_before_listening(tmp_path):
    # The real CLI with the installed metadata read back as an unsupported release.
    script = ("import sys; from importlib import metadata; real = metadata.version\n"
              "metadata.version = lambda n: '99.0' if n == 'mitmproxy' else real(n)\n"
              "from stagedoor_addons.main import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, "run", "--listen", "127.0.0.1:0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "stagedoor: mitmproxy 99.0 is installed, but this stagedoor is tested with mitmproxy "
        f"{supported_mitmproxy_range()} only; install a release in that range (./run.sh does, "
        "from requirements-test.lock; pip install -r requirements.lock for an image)")


def test_every_package_directory_is_installed():
    # An explicit `packages` list must name each package (a subpackage left out installs in
    # editable mode and is missing from the image).
    setuptools = PYPROJECT["tool"]["setuptools"]
    listed = setuptools.get("packages")
    if not isinstance(listed, list):  # find: all of them by construction
        return
    # addons/ installs as stagedoor_addons ([tool.setuptools.package-dir])
    where = {folder: name for name, folder in setuptools.get("package-dir", {}).items()}
    found = sorted(".".join((where.get(top, top), *init.parent.relative_to(ROOT / top).parts))
                   for top in ("stagedoor", "addons") for init in (ROOT / top).rglob("__init__.py")
                   if "__pycache__" not in init.parts)
    missing = [name for name in found if name not in listed]
    assert missing == [], f"add {missing} to [tool.setuptools] packages"
