"""The layering, read from the source: the core (``stagedoor/``) imports neither mitmproxy nor
the addons; no module imports itself back through others; the addons install as
``stagedoor_addons``, never as a generic top-level ``addons``."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"stagedoor": ROOT / "stagedoor", "stagedoor_addons": ROOT / "addons"}


def modules() -> dict[str, Path]:
    """Every module of both packages by dotted name (``addons/x.py`` -> ``stagedoor_addons.x``)."""
    found: dict[str, Path] = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(name: str, path: Path) -> set[str]:
    """What a module imports, wherever in it (functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in getattr(node, "orelse", []):
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {dep for dep in imports(name, path) if dep in known and dep != name}
            for name, path in known.items()}


def test_the_core_imports_neither_mitmproxy_nor_the_addons():
    offenders = []
    for name, path in modules().items():
        if not name.startswith("stagedoor."):
            continue
        for dep in imports(name, path):
            top = dep.split(".")[0]
            if top in ("mitmproxy", "addons", "stagedoor_addons"):
                offenders.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert not offenders, "\n".join(offenders)


def test_the_import_graph_has_no_circle():
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                walk(dep)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_check_finds_a_circle(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other are reported."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import b\n")
    b.write_text("def f():\n    from .a import x\n")
    assert "pkg.b" in imports("pkg.a", a) and "pkg.a" in imports("pkg.b", b)
    guarded = tmp_path / "c.py"
    guarded.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    assert "pkg.a" not in imports("pkg.c", guarded)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # -I: no current directory on sys.path (the repository's addons/ folder would be found)
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_addons_install_under_the_projects_name_only(tmp_path):
    missing = _python("import addons", tmp_path)
    assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr
    found = _python("import stagedoor_addons.gateway, stagedoor_addons.main, stagedoor.cli; "
                    "print(stagedoor_addons.gateway.__file__)", tmp_path)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == (ROOT / "addons" / "gateway.py").resolve()


def test_the_stagedoor_command_is_the_composition_root():
    [script] = [e for e in metadata.entry_points(group="console_scripts")
                if e.name == "stagedoor" and e.dist and e.dist.name == "stagedoor"]
    assert script.value == "stagedoor_addons.main:main"


def test_the_core_cli_alone_refuses_to_start_a_proxy(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stagedoor.cli", "run", "--listen",
                             "127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "python -m stagedoor_addons" in result.stderr
