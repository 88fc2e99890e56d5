#!/usr/bin/env bash
# Set up the environment (first run only) and run the main job.
# Extra arguments go to the example, e.g. `bash scripts/lab.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh lab
exec "$PY" examples/quickstart.py "$@"
