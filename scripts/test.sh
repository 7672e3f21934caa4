#!/usr/bin/env bash
# Install (once) and run the test suite. Integration tests start a real local Slurm cluster
# (tests/integration/slurm_cluster.sh, needs root + apt on first use). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
export DS_ACCELERATOR=cpu
exec "$PY" -m pytest "$@"
