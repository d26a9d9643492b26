#!/bin/bash
# The paper's pipeline as a SLURM dependency chain, submitted in one go from the login node:
#   1. language SFTs, one array task per language          (slurm/language_sfts.sbatch)
#   2. the multi-source task SFT, after ALL of them succeed (slurm/train_multinode.sbatch, --dependency=afterok)
#   3. zero-shot evaluation, after the task SFT succeeds    (slurm/evaluate.sbatch,       --dependency=afterok)
#
# Usage, from the repo root:
#   slurm/pipeline.sh LANGUAGE_CONFIG TASK_CONFIG EVAL_CONFIG
# Edit (or export) these:
#   LANGUAGES        every language that needs a language SFT: the task's source languages and the targets
#   TRAIN_FILE       each language's text, {lang} replaced (default data/{lang}.txt)
#   OUT_DIR          root of all outputs (default runs/pipeline): OUT_DIR/lang/xx/sft, OUT_DIR/task/sft
#   LANG_SBATCH_ARGS, TASK_SBATCH_ARGS, EVAL_SBATCH_ARGS
#                    extra sbatch options per stage, e.g. TASK_SBATCH_ARGS="--nodes=4 --time=48:00:00"
# The task config must name the language SFTs of stage 1 (OUT_DIR/lang/<xx>/sft) and the eval config (YAML of
# `ltsft eval` options) the task SFT (task_sft: OUT_DIR/task/sft), the target languages' SFTs (lang_sft: {xx: ...}),
# their evaluation files (data: {xx: ...}), the base and the output directory (out).
# A failed stage cancels the stages after it (--kill-on-invalid-dep=yes) instead of leaving them pending forever.
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: $0 LANGUAGE_CONFIG TASK_CONFIG EVAL_CONFIG   (run from the repo root)" >&2
  exit 2
fi
LANG_CONFIG=$1 TASK_CONFIG=$2 EVAL_CONFIG=$3
export LANGUAGES=${LANGUAGES:-"en sw ht qu"}
export TRAIN_FILE=${TRAIN_FILE:-"data/{lang}.txt"}
OUT_DIR=${OUT_DIR:-runs/pipeline}
read -r -a langs <<< "$LANGUAGES"
here=$(dirname "$0")

# shellcheck disable=SC2086
lang_job=$(OUT_DIR="$OUT_DIR/lang" sbatch --parsable --export=ALL --array="0-$(( ${#langs[@]} - 1 ))" \
  ${LANG_SBATCH_ARGS:-} "$here/language_sfts.sbatch" "$LANG_CONFIG")
lang_job=${lang_job%%;*}
# afterok on an array job waits for every one of its tasks to succeed.
# shellcheck disable=SC2086
task_job=$(sbatch --parsable --job-name=ltsft-task --dependency="afterok:$lang_job" --kill-on-invalid-dep=yes \
  ${TASK_SBATCH_ARGS:-} "$here/train_multinode.sbatch" "$TASK_CONFIG" --set "output_dir=$OUT_DIR/task")
task_job=${task_job%%;*}
# shellcheck disable=SC2086
eval_job=$(sbatch --parsable --dependency="afterok:$task_job" --kill-on-invalid-dep=yes \
  ${EVAL_SBATCH_ARGS:-} "$here/evaluate.sbatch" "$EVAL_CONFIG")
eval_job=${eval_job%%;*}
echo "language SFTs: job $lang_job (${#langs[@]} array tasks: $LANGUAGES)"
echo "task SFT:      job $task_job (after $lang_job)"
echo "evaluation:    job $eval_job (after $task_job)"
echo "follow with: squeue -u ${USER:-$(id -un)}   cancel all with: scancel $lang_job $task_job $eval_job"
