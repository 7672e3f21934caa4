#!/usr/bin/env bash
# Install (once) and run the whole SLADE pipeline on the built-in demo data, locally:
# demo data -> pretrain -> teacher -> 2 x (embed -> cluster -> student) -> eval, then print the
# metrics table and the TensorBoard command. Extra arguments are config overrides (key=value).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
"$PY" -m slade_dist demo-data --config configs/demo.yaml "$@"
exec "$PY" launch/submit.py --stage all --cluster local --config configs/demo.yaml "$@"
