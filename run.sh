#!/usr/bin/env bash
# stagedoor bootstrap: finds Python >= 3.12, keeps .venv in step with pyproject.toml, then runs
#   ./run.sh demo            sidecar on 127.0.0.1:7007 in front of a bundled demo upstream
#   ./run.sh test [ARGS]     the whole test suite (ruff + pytest)
#   ./run.sh bench           side-by-side benchmark (see bench/)
#   ./run.sh <subcommand>    any `stagedoor` subcommand: run, check, token, explain, ...
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(pwd)"
VENV="$ROOT/.venv"

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
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [[ -x "$VENV/bin/python" ]] && python_ok "$VENV/bin/python" \
        && [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    local py
    if ! py="$(find_python)"; then
        echo "run.sh: no Python >= 3.12 found (tried python3.1x on PATH, ~/.pyenv/versions, /usr/local/bin)." >&2
        echo "run.sh: install Python 3.12 or newer, or set STAGEDOOR_PYTHON=/path/to/python3.12." >&2
        exit 1
    fi
    if [[ ! -x "$VENV/bin/python" ]] || ! python_ok "$VENV/bin/python"; then
        echo "run.sh: creating .venv with $py ($("$py" --version 2>&1))" >&2
        rm -rf "$VENV"
        "$py" -m venv "$VENV"
    fi
    echo "run.sh: installing stagedoor and its test extras into .venv" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]" >&2
    echo "$want" > "$stamp"
}

ensure_venv
export PATH="$VENV/bin:$PATH"

cmd="${1:-run}"
[[ $# -gt 0 ]] && shift
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
