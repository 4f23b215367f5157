#!/usr/bin/env bash
# Sets up .venv, then runs the main job: vllm serve of a tiny MoE model through AFD.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/afd-dispatch serve-demo "$@"
