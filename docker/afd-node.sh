#!/usr/bin/env bash
# Entry point of the A3 image (docker/Dockerfile.a3), installed as /usr/local/bin/afd-node.
#
#   afd-node head                 the Ray head of an AFD cluster; hosts no FFN rank (0 CPUs)
#   afd-node ffn                  join the Ray head at RAY_HEAD_ADDRESS as an FFN node, with
#                                 AFD_FFN_SLOTS CPU slots (the FFN ranks it may host; default 16)
#   afd-node attention CMD...     join RAY_HEAD_ADDRESS with 0 CPUs (no FFN rank lands here),
#                                 then run CMD, the attention server:
#                                   vllm serve MODEL --afd-config '{"ray_address": "auto", ...}'
#   afd-node attention --as-head CMD...
#                                 the same on the head's host: start the head here instead
#   afd-node help                 this text
#   afd-node CMD...               any other command (vllm serve ..., npu-smi info, bash)
#
# Every command first loads the Ascend environment (CANN toolkit, NNAL/ATB), which the base
# image only sources from ~/.bashrc. Ray's token authentication stays on: the Ray roles
# refuse to start unless RAY_AUTH_MODE=token and a token is given, as RAY_AUTH_TOKEN or as
# the file RAY_AUTH_TOKEN_PATH (a mounted secret). Optional: NODE_IP (this host's address on
# the cluster network, passed to Ray as --node-ip-address), RAY_PORT (head, default 6379).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

die() {
  echo "afd-node: $*" >&2
  exit 2
}

load_ascend_env() {
  local script
  # Sourced as the base image's build does: they may read unset variables or end on a test.
  set +eu
  for script in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "$script" ]; then
      # shellcheck disable=SC1090  # the paths are the base image's, not in this repository
      source "$script"
    fi
  done
  set -eu
}

require_token() {
  if [ "${RAY_AUTH_MODE:-}" != "token" ]; then
    die "RAY_AUTH_MODE must be 'token' (it is '${RAY_AUTH_MODE:-unset}'); token auth stays on"
  fi
  if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    die "no Ray token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a non-empty file"
  fi
}

node_ip_args() {
  if [ -n "${NODE_IP:-}" ]; then
    printf '%s\n' "--node-ip-address=${NODE_IP}"
  fi
}

head_address() {
  if [ -z "${RAY_HEAD_ADDRESS:-}" ]; then
    die "set RAY_HEAD_ADDRESS to the Ray head, HOST:PORT (e.g. 10.0.0.1:6379)"
  fi
  printf '%s\n' "$RAY_HEAD_ADDRESS"
}

head_command() {
  mapfile -t ip_args < <(node_ip_args)
  head_cmd=(ray start --head --port="${RAY_PORT:-6379}" --num-cpus=0 \
    --dashboard-host=127.0.0.1 --disable-usage-stats "${ip_args[@]}")
}

role="${1:-help}"
load_ascend_env
case "$role" in
  help | -h | --help)
    usage
    ;;
  head)
    require_token
    head_command
    exec "${head_cmd[@]}" --block
    ;;
  ffn)
    require_token
    address="$(head_address)"
    mapfile -t ip_args < <(node_ip_args)
    exec ray start --address="$address" --num-cpus="${AFD_FFN_SLOTS:-16}" \
      --disable-usage-stats "${ip_args[@]}" --block
    ;;
  attention)
    shift
    require_token
    if [ "${1:-}" = "--as-head" ]; then
      shift
      head_command
      "${head_cmd[@]}"
    else
      address="$(head_address)"
      mapfile -t ip_args < <(node_ip_args)
      ray start --address="$address" --num-cpus=0 --disable-usage-stats "${ip_args[@]}"
    fi
    if [ $# -eq 0 ]; then
      die "attention: give the server command, e.g. vllm serve MODEL --afd-config '{...}'"
    fi
    exec "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
