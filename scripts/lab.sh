#!/usr/bin/env bash
# Set up the environment (first run only) and run the main job.
# Without arguments: the FashionMNIST lab with its defaults into runs/lab (offline it uses
# scikit-learn's digits and says so). Arguments replace the defaults, e.g.
# `bash scripts/lab.sh --run-dir runs/q --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh lab
if [ "$#" -eq 0 ]; then set -- --run-dir runs/lab; fi
exec "$PY" examples/fashion_mnist.py "$@"
