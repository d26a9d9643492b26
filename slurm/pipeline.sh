#!/bin/bash
# A pipeline config (the file `ltsft pipeline` runs locally) as a SLURM dependency chain, submitted in one go from
# the login node; each job runs one stage with slurm/pipeline_stage.sbatch:
#   1. base           the tiny base model (only when the config builds one), one task
#   2. language SFTs  one array task per language                       (after 1 succeeds)
#   3. task SFT       multi-source, language SFTs swapped in per step   (after ALL of 2 succeed: afterok)
#   4. evaluation     zero-shot, with and without target language SFTs (after 3 succeeds)
#
# Usage, from the repo root:
#   slurm/pipeline.sh PIPELINE_CONFIG          e.g. slurm/pipeline.sh ltsft_dist/configs/paper_qa_xquad.yaml
# Edit (or export) the shape of each stage's jobs:
#   BASE_SBATCH_ARGS, LANG_SBATCH_ARGS, TASK_SBATCH_ARGS, EVAL_SBATCH_ARGS
#                    extra sbatch options per stage, e.g. TASK_SBATCH_ARGS="--nodes=4 --time=48:00:00"
# Stages that are already done finish at once, so resubmitting after a failure reruns only what is missing.
# Nothing is submitted when `ltsft pipeline --check` finds a problem at the config's `ranks` (make each stage's
# job run that many ranks). The jobs request GPUs (slurm/pipeline_stage.sbatch); for CPUs, export
# SBATCH_GRES=none before running this script: every sbatch here obeys it.
# A failed stage cancels the stages after it (--kill-on-invalid-dep=yes) instead of leaving them pending forever.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 PIPELINE_CONFIG   (run from the repo root)" >&2
  exit 2
fi
CONFIG=$1
here=$(dirname "$0")
source "$here/../launch/_venv.sh"
export LTSFT_REPO=${LTSFT_REPO:-$REPO}  # the jobs find launch/ here, wherever they were submitted from
if ! "$PY" -m ltsft_dist.cli pipeline --check "$CONFIG" >/dev/null; then
  echo "$0: the preflight above found problems in $CONFIG: nothing submitted" >&2
  exit 1
fi
stages=$("$PY" -c 'import sys
from ltsft_dist.pipeline import load_pipeline, plan
print(" ".join(s.name for s in plan(load_pipeline(sys.argv[1]))))' "$CONFIG")
read -r -a all <<< "$stages"
langs=()
for s in "${all[@]}"; do [[ $s == lang:* ]] && langs+=("$s"); done
after=()
if [[ " $stages " == *" base "* ]]; then
  # shellcheck disable=SC2086
  base_job=$(sbatch --parsable --job-name=ltsft-base --ntasks-per-node=1 ${BASE_SBATCH_ARGS:-} \
    "$here/pipeline_stage.sbatch" "$CONFIG" base)
  base_job=${base_job%%;*}
  after=(--dependency="afterok:$base_job" --kill-on-invalid-dep=yes)
  echo "base:          job $base_job"
fi
# shellcheck disable=SC2086
lang_job=$(sbatch --parsable --job-name=ltsft-lang "${after[@]}" --array="0-$(( ${#langs[@]} - 1 ))" \
  --export=ALL,STAGES="${langs[*]}" ${LANG_SBATCH_ARGS:-} "$here/pipeline_stage.sbatch" "$CONFIG")
lang_job=${lang_job%%;*}
# afterok on an array job waits for every one of its tasks to succeed.
# shellcheck disable=SC2086
task_job=$(sbatch --parsable --job-name=ltsft-task --dependency="afterok:$lang_job" --kill-on-invalid-dep=yes \
  ${TASK_SBATCH_ARGS:-} "$here/pipeline_stage.sbatch" "$CONFIG" task)
task_job=${task_job%%;*}
# shellcheck disable=SC2086
eval_job=$(sbatch --parsable --job-name=ltsft-eval --dependency="afterok:$task_job" --kill-on-invalid-dep=yes \
  ${EVAL_SBATCH_ARGS:-} "$here/pipeline_stage.sbatch" "$CONFIG" eval)
eval_job=${eval_job%%;*}
echo "language SFTs: job $lang_job (${#langs[@]} array tasks: ${langs[*]})"
echo "task SFT:      job $task_job (after $lang_job)"
echo "evaluation:    job $eval_job (after $task_job)"
echo "follow with: squeue -u ${USER:-$(id -un)}   cancel all with: scancel ${base_job:-} $lang_job $task_job $eval_job"
