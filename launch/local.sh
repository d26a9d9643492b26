#!/usr/bin/env bash
# Run `ltsft train` on N ranks of this machine with the DeepSpeed launcher (N GPUs, or N CPU processes).
#
# Usage:
#   launch/local.sh N CONFIG.yaml [--set key=value ...]
# e.g. launch/local.sh 2 runs/demo/config.yaml --set phase1.steps=10
#
# The launcher sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for each rank. Environment:
#   VENV           virtual environment to run from (default: .venv in the repo)
#   MASTER_PORT    rendezvous port (default: a free one, so two runs on one machine do not collide)
#   LTSFT_DS_ARGS  extra deepspeed launcher options, e.g. "--include localhost:0,1" (word-split)
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CONFIG [--set key=value ...]   (N = number of local ranks)" >&2
  exit 2
fi
N=$1; shift
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
PORT=${MASTER_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
unset RANK WORLD_SIZE LOCAL_RANK
# shellcheck disable=SC2086
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$N" --master_port "$PORT" --no_local_rank ${LTSFT_DS_ARGS:-} \
  --module ltsft_dist.cli train "$@"
