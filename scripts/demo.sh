#!/usr/bin/env bash
# Sets up .venv, then runs the main job: one MoE layer served through AFD, checked.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/afd-dispatch demo "$@"
