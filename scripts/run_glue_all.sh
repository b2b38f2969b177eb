#!/usr/bin/env bash
# Fine-tune one checkpoint on the nine GLUE tasks and print its row of the seed table
# (sparsity, MNLI m/mm, QQP, QNLI, SST-2, CoLA, STS-B, MRPC, RTE, average).
#
#   bash scripts/run_glue_all.sh <init_checkpoint> <glue_dir> [config_file] [out_root] [mask] [num_gpu]
#        [precision] [seed] [name]
#
#   init_checkpoint: "" starts from random weights (smoke tests only)
#   glue_dir: the unpacked GLUE download (CoLA/, SST-2/, MRPC/, STS-B/, QQP/, MNLI/, QNLI/, RTE/,
#             WNLI/, diagnostic/)
#   mask:     as run_glue.sh's 17th parameter ("" = the config's mask)
#   num_gpu, precision: "" (the default) = run_glue.sh's: every visible GPU in fp16, else 1 CPU process in fp32
#
# Environment: BATCH_SIZE (32 per GPU), LEARNING_RATE (2e-5), EPOCHS (3), MAX_STEPS (-1),
# MODE ("train eval prediction"), TASKS (all nine), VOCAB_FILE (vocab/vocab), MAX_SEQ_LENGTH (128).
# WNLI is fine-tuned and predicted for the GLUE server but, as in the seed table, not averaged.
set -euo pipefail
cd "$(dirname "$0")/.."

init_checkpoint=${1?usage: run_glue_all.sh <init_checkpoint> <glue_dir> [config_file] [out_root] [mask] [num_gpu] [precision] [seed] [name]}
glue_dir=${2:?usage: run_glue_all.sh <init_checkpoint> <glue_dir> ...}
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
