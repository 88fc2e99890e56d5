#!/usr/bin/env bash
# Set up the environment (first run only) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh test
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec "$PY" -m pytest -q "$@"
