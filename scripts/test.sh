#!/usr/bin/env bash
# Install everything (the three packages with torch pinned to 2.13.0, the CPU build; the separate venv with
# PyPI's client-side sglang==0.5.2 for the compatibility tests) and run every test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ./gyges -e ./sgl-kernel -e "./python[test]"
(cd /tmp && python -m sgl_kernel)  # compile sgl-kernel's C++ extensions once, before the tests start servers
bash test/compat/setup_venv.sh >/dev/null
python -m pytest -q "$@"
