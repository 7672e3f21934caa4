#!/usr/bin/env bash
# Create (or reuse) .venv and install slade_dist with the exact tested versions (constraints.txt).
# Idempotent: re-running skips pip when pyproject.toml and constraints.txt have not changed.
# Source it (`. scripts/setup_env.sh`) to get $PY; EXTRAS (default "cpu,dev") picks the extras.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=${EXTRAS:-cpu,dev}
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$EXTRAS
if [[ "$(cat .venv/.install-stamp 2>/dev/null)" != "$stamp" ]]; then
  echo "[setup] installing slade_dist[$EXTRAS] (torch/torchvision come from local disk; first time ~2-3 min)"
  t0=$SECONDS
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$EXTRAS]"
  echo "$stamp" > .venv/.install-stamp
  echo "[setup] installed in $((SECONDS - t0)) s"
fi
PY="$PWD/.venv/bin/python"
export PY
