#!/usr/bin/env bash
# Create test/.cache/compat-venv: a separate virtual environment holding PyPI's client-side SGLang
# (sglang==0.5.2; its core install is client-only and its import name is also `sglang`, hence the separate
# venv) plus what its frontend language and bench_serving import. test/test_compat_clients.py runs the
# programs in test/compat/ with this venv's python against a live server of this project.
#
# Usage: bash test/compat/setup_venv.sh          (idempotent; prints the venv's python path at the end)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${COMPAT_VENV:-$HERE/../.cache/compat-venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import sglang, pybase64, pydantic, transformers, openai" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "sglang==0.5.2" pybase64 pydantic transformers openai
fi
"$VENV/bin/python" -c "import sglang; print('compat venv ready:', sglang.__version__)" 1>&2
echo "$VENV/bin/python"
