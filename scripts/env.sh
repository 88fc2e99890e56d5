#!/usr/bin/env bash
# Create (once) and reuse the project's virtual environment in .venv.
# Usage: source scripts/env.sh EXTRAS   (EXTRAS: lab | test)
# Reinstalls only when pyproject.toml or the extras changed, so a second run starts at once.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ENGINE_KIT_VENV:-$root/.venv}"
extras="$1"
stamp="$venv/.engine-kit-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $extras"
if [ ! -x "$venv/bin/python" ]; then
  echo "engine_kit: creating $venv (first run installs PyTorch: a few minutes)"
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "torch>=2.10,<=2.14.1" "torchvision<=0.29.1" -e "$root[$extras]"
  echo "$want" > "$stamp"
fi
PY="$venv/bin/python"
export PY
