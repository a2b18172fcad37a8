#!/usr/bin/env bash
# Install the two packages (torch pinned to 2.13.0, the CPU build) and run every test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ./gyges -e "./python[test]"
python -m pytest -q "$@"
