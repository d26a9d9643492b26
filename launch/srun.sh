#!/usr/bin/env bash
# Start `ltsft train` (or `ltsft $LTSFT_COMMAND`, e.g. pipeline) on every task of a SLURM allocation: one rank per task.
#
# Usage, inside an sbatch script or a salloc shell (see slurm/ for ready-made sbatch scripts):
#   launch/srun.sh CONFIG.yaml [--set key=value ...]
#
# Each task's rank, world size and local rank come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the
# rendezvous host is the first node of the step (ltsft_dist/launch_env.py maps them). Stale RANK/WORLD_SIZE/
# LOCAL_RANK from the calling shell are unset so they cannot contradict SLURM; MASTER_ADDR/MASTER_PORT, if set,
# are kept as overrides. Environment:
#   VENV                  virtual environment to run from (default: .venv in the repo)
#   LTSFT_SRUN_ARGS       extra srun options, e.g. "--mpi=pmi2" or "--cpu-bind=cores" (word-split)
#   LTSFT_COMMAND         the ltsft subcommand to run (default: train)
#   LTSFT_RENDEZVOUS_TIMEOUT_S  how long ranks wait for each other to start (default 600 s)
#   LTSFT_COLLECTIVE_TIMEOUT_S  how long a collective waits for a rank that stopped answering (default 1800 s;
#                               longer than a rank 0 download or checkpoint write the others wait for)
# `exec` makes srun replace this shell, so signals sent to it (e.g. scancel --signal, --signal=B:USR1) go to
# srun, which forwards them to every task.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--set key=value ...]   (inside an sbatch/salloc allocation)" >&2
  exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "$0: not inside a SLURM allocation (no SLURM_JOB_ID): submit with sbatch (see slurm/) or use salloc" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE LOCAL_WORLD_SIZE
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# --kill-on-bad-exit: one failing rank ends the step instead of leaving the others waiting for it.
# shellcheck disable=SC2086
exec srun --kill-on-bad-exit=1 ${LTSFT_SRUN_ARGS:-} "$PY" -m ltsft_dist.cli "${LTSFT_COMMAND:-train}" "$@"
