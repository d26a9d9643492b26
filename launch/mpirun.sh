#!/usr/bin/env bash
# Run `ltsft train` on N ranks started by MPI (mpiexec -n N). Each rank finds its place through the MPI
# environment (PMI_RANK/PMI_SIZE, OMPI_COMM_WORLD_*) and mpi4py, which also shares rank 0's address and a free
# port (ltsft_dist/launch_env.py).
#
# Usage:
#   launch/mpirun.sh N CONFIG.yaml [--set key=value ...]
# Across nodes, pass the hosts in LTSFT_MPIEXEC_ARGS, e.g. "-hosts node1,node2" (MPICH) or
# "--host node1:4,node2:4" (Open MPI). Environment:
#   VENV                virtual environment to run from (default: .venv in the repo)
#   MPIEXEC             the launcher (default: the venv's mpiexec from `pip install mpich`, else mpiexec/mpirun on
#                       PATH); it must belong to the MPI library mpi4py loads, or the ranks stop with an error
#   LTSFT_MPIEXEC_ARGS  extra launcher options (word-split)
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CONFIG [--set key=value ...]   (N = number of ranks)" >&2
  exit 2
fi
N=$1; shift
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
if [ -z "${MPIEXEC:-}" ]; then
  for candidate in "$VENV/bin/mpiexec" "$(command -v mpiexec || true)" "$(command -v mpirun || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then MPIEXEC=$candidate; break; fi
  done
fi
if [ -z "${MPIEXEC:-}" ]; then
  echo "$0: no mpiexec found: pip install mpich into $VENV (or install Open MPI/MPICH), or set MPIEXEC" >&2
  exit 2
fi
extra=()
if [ "$(id -u)" = 0 ] && "$MPIEXEC" --version 2>&1 | grep -q "Open MPI"; then
  extra+=(--allow-run-as-root)  # Open MPI refuses root without it
fi
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# MPICH unlinks its shared-memory segments (/dev/shm/mpich_shm_*) in MPI_Finalize, which a failing or killed
# rank never reaches: after mpiexec ends, remove the segments created since the start that no process maps any
# more (megabytes each, and they pile up). So mpiexec runs as a child, and the signals this shell gets (scancel,
# a batch script's trap) are passed on to it.
started=$(mktemp)
# shellcheck disable=SC2086
"$MPIEXEC" "${extra[@]}" -n "$N" ${LTSFT_MPIEXEC_ARGS:-} "$PY" -m ltsft_dist.cli train "$@" &
launcher=$!
for sig in TERM HUP USR1 USR2; do
  # shellcheck disable=SC2064  # the signal name is meant to be expanded now
  trap "kill -$sig $launcher 2>/dev/null" "$sig"
done
set +e
while true; do  # a trapped signal interrupts `wait`: wait until mpiexec has really ended
  wait "$launcher"
  rc=$?
  kill -0 "$launcher" 2>/dev/null || break
done
find /dev/shm -maxdepth 1 -name 'mpich_shm_*' -newer "$started" 2>/dev/null | while read -r segment; do
  grep -qsF "$segment" /proc/[0-9]*/maps || rm -f "$segment"
done
rm -f "$started"
exit "$rc"
