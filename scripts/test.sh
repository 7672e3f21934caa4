#!/usr/bin/env bash
# Install (once) and run the test suite: the house rules first (import contracts of pyproject.toml,
# ruff lint + format check), then pytest. Integration tests start a real local Slurm cluster
# (tests/integration/slurm_cluster.sh, needs root + apt on first use). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
echo "[test] import contracts (lint-imports), ruff check, ruff format --check"
.venv/bin/lint-imports --no-cache
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export DS_ACCELERATOR=cpu
exec "$PY" -m pytest "$@"
