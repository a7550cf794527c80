#!/usr/bin/env bash
# stagedoor bootstrap: finds Python >= 3.12, keeps .venv in step with the lock file, then runs
#   ./run.sh demo            sidecar on 127.0.0.1:7007 in front of a bundled demo upstream
#   ./run.sh test [ARGS]     the whole test suite (ruff + pytest)
#   ./run.sh bench           side-by-side benchmark (see bench/)
#   ./run.sh lock            refresh requirements*.lock from pyproject.toml (needs the network)
#   ./run.sh <subcommand>    any `stagedoor` subcommand: run, check, token, explain, ...
#
# .venv is installed from requirements-test.lock with `pip --require-hashes` (every package
# pinned and hash-checked), then stagedoor itself with --no-deps; it is reinstalled whenever
# pyproject.toml or the lock changes. The Dockerfile installs requirements.lock the same way.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(pwd)"
VENV="$ROOT/.venv"
LOCK="requirements-test.lock"      # runtime + test and bench extras + build backend, for .venv and CI
RUNTIME_LOCK="requirements.lock"   # runtime + build backend, for the image
UV_VERSION="0.13.9"                # the resolver ./run.sh lock uses (in .venv-lock)

python_ok() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local cand
    if [[ -n "${STAGEDOOR_PYTHON:-}" ]] && python_ok "$STAGEDOOR_PYTHON"; then
        echo "$STAGEDOOR_PYTHON"; return 0
    fi
    for cand in python3.14 python3.13 python3.12 python3; do
        if command -v "$cand" >/dev/null 2>&1 && python_ok "$cand"; then
            command -v "$cand"; return 0
        fi
    done
    # pyenv shims refuse versions that are not "global"; look at the installs themselves,
    # then at the usual system locations.
    for cand in \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 \
        /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] /opt/python*/bin/python3 \
        /opt/homebrew/bin/python3.1[2-9] /usr/local/opt/python@3.1[2-9]/bin/python3; do
        if [[ -x "$cand" ]] && python_ok "$cand"; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

ensure_venv() {
    local stamp="$VENV/.stagedoor-installed" want
    want="$(cat pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1)"
    # -P: not from the current directory; an editable install whose source directory is gone
    # (made from a copy of the repository that shared this .venv) does not count.
    if [[ -x "$VENV/bin/python" ]] && python_ok "$VENV/bin/python" \
        && [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]] \
        && "$VENV/bin/python" -P -c 'import stagedoor' >/dev/null 2>&1; then
        return 0
    fi
    local py
    py="$(require_python)"
    if [[ ! -x "$VENV/bin/python" ]] || ! python_ok "$VENV/bin/python"; then
        echo "run.sh: creating .venv with $py ($("$py" --version 2>&1))" >&2
        rm -rf "$VENV"
        "$py" -m venv "$VENV"
    fi
    echo "run.sh: installing $LOCK (hash-checked) and stagedoor into .venv" >&2
    local pip=("$VENV/bin/python" -m pip -qq --disable-pip-version-check)
    "${pip[@]}" install --require-hashes --no-deps -r "$LOCK" >&2
    "${pip[@]}" install --no-deps --no-build-isolation -e . >&2
    if ! "${pip[@]}" check >&2; then
        echo "run.sh: $LOCK does not satisfy pyproject.toml any more: refresh it with" \
             "'./run.sh lock' and commit both lock files." >&2
        exit 1
    fi
    echo "$want" > "$stamp"
}

require_python() {
    if ! find_python; then
        echo "run.sh: no Python >= 3.12 found (tried python3.1x on PATH, ~/.pyenv/versions, /usr/local/bin)." >&2
        echo "run.sh: install Python 3.12 or newer, or set STAGEDOOR_PYTHON=/path/to/python3.12." >&2
        exit 1
    fi
}

# Resolve pyproject.toml again (universal: every Python >= 3.12 and platform, markers kept),
# with sha256 hashes. Pins already in the lock files are kept unless pyproject.toml rules them
# out; delete a lock file first to upgrade everything.
lock() {
    local tools="$ROOT/.venv-lock" py
    if [[ ! -x "$tools/bin/uv" ]] || [[ "$("$tools/bin/uv" --version)" != "uv $UV_VERSION"* ]]; then
        py="$(require_python)"
        rm -rf "$tools"
        "$py" -m venv "$tools"
        "$tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
    fi
    local build_backend
    build_backend="$("$tools/bin/python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')"
    local compile=("$tools/bin/uv" pip compile --quiet --universal --python-version 3.12
                   --generate-hashes --custom-compile-command "./run.sh lock")
    "${compile[@]}" pyproject.toml - --extra test --extra bench -o "$LOCK" <<< "$build_backend"
    "${compile[@]}" pyproject.toml - -c "$LOCK" -o "$RUNTIME_LOCK" <<< "$build_backend"
    echo "run.sh: wrote $LOCK and $RUNTIME_LOCK; commit them with pyproject.toml" >&2
}

cmd="${1:-run}"
[[ $# -gt 0 ]] && shift
if [[ "$cmd" == lock ]]; then
    lock
    exit 0
fi

ensure_venv
export PATH="$VENV/bin:$PATH"
case "$cmd" in
    test)
        ruff check stagedoor addons tests bench
        exec python -m pytest "$@"
        ;;
    demo)
        exec stagedoor demo "$@"
        ;;
    bench)
        exec python -m bench "$@"
        ;;
    *)
        exec stagedoor "$cmd" "$@"
        ;;
esac
