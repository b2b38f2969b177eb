#!/usr/bin/env bash
# Fine-tune one checkpoint on the nine GLUE tasks and print its row of the seed table;
# `bash scripts/run_glue_all.sh --help` lists the parameters, their defaults and the environment.
set -euo pipefail

usage() {
  echo "usage: bash scripts/run_glue_all.sh <init_checkpoint> <glue_dir> [config_file] [out_root] [mask] [num_gpu]"
  echo "         [precision] [seed] [name]"
  echo
  echo "Fine-tune one checkpoint on the nine GLUE tasks (scripts/run_glue.sh each) and print its row of the"
  echo "seed table (sparsity, MNLI m/mm, QQP, QNLI, SST-2, CoLA, STS-B, MRPC, RTE, average)."
  echo
  echo "  init_checkpoint  required; \"\" starts from random weights (smoke tests only)"
  echo "  glue_dir         required; the unpacked GLUE download (CoLA/, SST-2/, ..., WNLI/, diagnostic/)"
  echo "  config_file      bert_config.json"
  echo "  out_root         results/glue (one folder per task)"
  echo "  mask             \"\" = the config's; a mask type (dense, star, ...; dam_u / dam_s: the checkpoint's"
  echo "                   logits) or a *.safetensors mask file (run_glue.sh's 17th parameter)"
  echo "  num_gpu          \"\" = every visible GPU, else 1 CPU process"
  echo "  precision        \"\" = fp16 with GPUs, else fp32"
  echo "  seed             2"
  echo "  name             the row's name: mask, else the checkpoint's file name"
  echo
  echo "Environment: BATCH_SIZE (32 per GPU), LEARNING_RATE (2e-5), EPOCHS (3), MAX_STEPS (-1: every epoch),"
  echo "MODE (\"train eval prediction\"), TASKS (all nine), VOCAB_FILE (vocab/vocab), MAX_SEQ_LENGTH (128)."
  echo "WNLI is fine-tuned and predicted for the GLUE server but, as in the seed table, not averaged."
}

if [[ "${1-}" == "-h" || "${1-}" == "--help" ]]; then
  usage
  exit 0
fi
if [ $# -lt 2 ]; then
  echo "run_glue_all.sh: error: needs <init_checkpoint> and <glue_dir> (see --help)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."

init_checkpoint=$1
glue_dir=$2
config_file=${3:-"bert_config.json"}
out_root=${4:-"results/glue"}
mask=${5:-""}
num_gpu=${6:-""}
precision=${7:-""}
seed=${8:-"2"}
name=${9:-"${mask:-$(basename "$init_checkpoint")}"}

declare -A folder=([cola]=CoLA [sst-2]=SST-2 [mrpc]=MRPC [sts-b]=STS-B [qqp]=QQP [mnli]=MNLI [qnli]=QNLI
                   [rte]=RTE [wnli]=WNLI)
tasks=${TASKS:-"mnli qqp qnli sst-2 cola sts-b mrpc rte wnli"}

for task in $tasks; do
  dir=${folder[$task]:?unknown task $task in TASKS}
  bash scripts/run_glue.sh "$init_checkpoint" "$glue_dir/$dir" "${VOCAB_FILE:-vocab/vocab}" "$config_file" \
    "$out_root/$dir" "$task" "$num_gpu" "${BATCH_SIZE:-32}" 1 "${LEARNING_RATE:-2e-5}" 0.1 "${EPOCHS:-3}" \
    "${MAX_STEPS:--1}" "$precision" "$seed" "${MODE:-train eval prediction}" "$mask"
done

python glue_metrics.py table "$out_root" --name "$name"
