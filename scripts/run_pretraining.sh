#!/usr/bin/env bash
# Two-phase BERT pretraining (NVIDIA's recipe) with SparseBERT's attention mask, through torchrun.
#
# Positional parameters follow NVIDIA's HDF5-era scripts/run_pretraining.sh (1-15, 17-25; 16 is
# unused as upstream), then the mask settings (26-28):
#   1 train_batch_size (per GPU, after accumulation)  2 learning_rate  3 precision (fp16|bf16|fp32|tf32)
#   4 num_gpus  5 warmup_proportion  6 train_steps  7 save_checkpoint_steps  8 resume_training (true|false)
#   9 create_logfile  10 accumulate_gradients  11 gradient_accumulation_steps  12 seed  13 job_name
#   14 allreduce_post_accumulation  15 allreduce_post_accumulation_fp16  16 (unused)
#   17 train_batch_size_phase2  18 learning_rate_phase2  19 warmup_proportion_phase2  20 train_steps_phase2
#   21 gradient_accumulation_steps_phase2  22 DATA_DIR_PHASE1  23 DATA_DIR_PHASE2  24 CODEDIR
#   25 init_checkpoint  26 attention_mask_type (config value if "config")  27 lamb (λ; config if "config")
#   28 run_phase2 (true|false: a mask other than dense needs mask_seq_length 512 in the config for
#      phase 2; phase 2's flags and data are checked before phase 1 starts)
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (torchrun's rendezvous), e.g. from SLURM.
# EXTRA_ARGS: more run_pretraining.py flags for both phases, e.g. EXTRA_ARGS="--compile".
# PYTHON: the interpreter of the phase-2 check (default: python).
# `bash scripts/run_pretraining.sh --help` lists the parameters with their defaults.
set -euo pipefail

show_help=false
if [[ "${1-}" == "-h" || "${1-}" == "--help" ]]; then
  show_help=true
  set --  # every parameter at its default, to list them
fi

train_batch_size=${1:-8192}
learning_rate=${2:-"6e-3"}
precision=${3:-"fp16"}
num_gpus=${4:-8}
warmup_proportion=${5:-"0.2843"}
train_steps=${6:-7038}
save_checkpoint_steps=${7:-200}
resume_training=${8:-"false"}
create_logfile=${9:-"true"}
accumulate_gradients=${10:-"true"}
gradient_accumulation_steps=${11:-128}
seed=${12:-12439}
job_name=${13:-"bert_lamb_pretraining"}
allreduce_post_accumulation=${14:-"true"}
allreduce_post_accumulation_fp16=${15:-"true"}
train_batch_size_phase2=${17:-4096}
learning_rate_phase2=${18:-"4e-3"}
warmup_proportion_phase2=${19:-"0.128"}
train_steps_phase2=${20:-1563}
gradient_accumulation_steps_phase2=${21:-512}
BERT_PREP_WORKING_DIR=${BERT_PREP_WORKING_DIR:-"data"}
DATA_DIR_PHASE1=${22:-"$BERT_PREP_WORKING_DIR/hdf5_lower_case_1_seq_len_128_max_pred_20_masked_lm_prob_0.15_random_seed_12345_dupe_factor_5/books_wiki_en_corpus/"}
DATA_DIR_PHASE2=${23:-"$BERT_PREP_WORKING_DIR/hdf5_lower_case_1_seq_len_512_max_pred_80_masked_lm_prob_0.15_random_seed_12345_dupe_factor_5/books_wiki_en_corpus/"}
CODEDIR=${24:-"$(cd "$(dirname "$0")/.." && pwd)"}
init_checkpoint=${25:-"None"}
attention_mask_type=${26:-"config"}
lamb=${27:-"config"}
run_phase2=${28:-"true"}

BERT_CONFIG=${BERT_CONFIG:-"$CODEDIR/bert_config.json"}
VOCAB_FILE=${VOCAB_FILE:-"$CODEDIR/vocab/vocab"}
RESULTS_DIR=${RESULTS_DIR:-"$CODEDIR/results"}
CHECKPOINTS_DIR=$RESULTS_DIR/checkpoints

names=(train_batch_size learning_rate precision num_gpus warmup_proportion train_steps save_checkpoint_steps
       resume_training create_logfile accumulate_gradients gradient_accumulation_steps seed job_name
       allreduce_post_accumulation allreduce_post_accumulation_fp16 "" train_batch_size_phase2 learning_rate_phase2
       warmup_proportion_phase2 train_steps_phase2 gradient_accumulation_steps_phase2 DATA_DIR_PHASE1 DATA_DIR_PHASE2
       CODEDIR init_checkpoint attention_mask_type lamb run_phase2)
declare -A notes=([precision]="fp16 | bf16 | fp32 | tf32" [train_batch_size]="per GPU, after accumulation"
  [DATA_DIR_PHASE1]="wiki_only data: .../wikicorpus_en/" [DATA_DIR_PHASE2]="wiki_only data: .../wikicorpus_en/"
  [init_checkpoint]="None = from random weights; else warm-start weights (NVIDIA / ours / a Hugging Face folder)"
  [attention_mask_type]="config = bert_config.json's; or dense, a pattern, dam_u, dam_s"
  [lamb]="λ of the mask penalty (run_pretraining.py --lamb / --dam_lambda); config = bert_config.json's"
  [run_phase2]="phase 2 runs at 512 tokens: a mask other than dense needs mask_seq_length 512 in the config")

usage() {
  echo "usage: bash scripts/run_pretraining.sh [1 train_batch_size] [2 learning_rate] ... [28 run_phase2]"
  echo
  echo "Two-phase BERT pretraining (NVIDIA's recipe) with SparseBERT's attention mask, through torchrun."
  echo "Positional, in NVIDIA's order; a missing one takes its default. Defaults, then notes:"
  for i in "${!names[@]}"; do
    local name=${names[i]}
    if [ -z "$name" ]; then
      printf '%3d %-36s %s\n' $((i + 1)) "(unused, as NVIDIA's)" ""
      continue
    fi
    printf '%3d %-36s %s\n' $((i + 1)) "$name" "${!name}"
    if [ -n "${notes[$name]-}" ]; then
      printf '%41s%s\n' "" "${notes[$name]}"
    fi
  done
  echo "Environment: BERT_PREP_WORKING_DIR (data root: $BERT_PREP_WORKING_DIR), BERT_CONFIG, VOCAB_FILE, RESULTS_DIR"
  echo "(checkpoints in RESULTS_DIR/checkpoints), EXTRA_ARGS (more run_pretraining.py flags for both phases),"
  echo "PYTHON (of the phase-2 check), NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT (multi-node)."
}

if $show_help; then
  usage
  exit 0
fi
mkdir -p "$CHECKPOINTS_DIR"

for dir in "$DATA_DIR_PHASE1" "$BERT_CONFIG"; do
  [ -e "$dir" ] || { echo "run_pretraining.sh: $dir does not exist (set the data folder / BERT_CONFIG)" >&2; exit 1; }
done

case "$precision" in
  fp16) PREC="--fp16" ;;
  bf16) PREC="--bf16" ;;
  fp32|tf32) PREC="" ;;
  *) echo "run_pretraining.sh: unknown precision '$precision' (fp16, bf16, fp32, tf32)" >&2; exit 1 ;;
esac

common_flags() {  # flags shared by both phases
  local flags="--config_file=$BERT_CONFIG --vocab_file=$VOCAB_FILE --output_dir=$CHECKPOINTS_DIR"
  flags+=" --bert_model=bert-large-uncased --seed=$seed --num_steps_per_checkpoint=$save_checkpoint_steps"
  flags+=" --do_train --json-summary=$RESULTS_DIR/dllogger.json --disable_progress_bar $PREC"
  [ "$allreduce_post_accumulation" == "true" ] && flags+=" --allreduce_post_accumulation"
  [ "$allreduce_post_accumulation_fp16" == "true" ] && flags+=" --allreduce_post_accumulation_fp16"
  [ "$attention_mask_type" != "config" ] && flags+=" --attention_mask_type=$attention_mask_type"
  [ "$lamb" != "config" ] && flags+=" --lamb=$lamb"
  flags+=" ${EXTRA_ARGS:-}"
  echo "$flags"
}

LAUNCH="torchrun --nproc_per_node=$num_gpus --nnodes=${NNODES:-1} --node_rank=${NODE_RANK:-0}"
LAUNCH+=" --master_addr=${MASTER_ADDR:-127.0.0.1} --master_port=${MASTER_PORT:-29500}"

run_logged() {  # $1 = log name, rest = command
  local log=$1; shift
  echo "$*"
  if [ "$create_logfile" == "true" ]; then
    "$@" 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
  fi
  "$@"
}

# Phase 2 (seq 512) resumes phase 1. Its flags are checked before phase 1 starts, so a phase-2
# mistake (its data folder, a mask built for fewer than 512 tokens) costs seconds, not phase 1's hours.
ga2=1; [ "$accumulate_gradients" == "true" ] && ga2=$gradient_accumulation_steps_phase2
PHASE2_ARGS="$(common_flags) --input_dir=$DATA_DIR_PHASE2"
PHASE2_ARGS+=" --train_batch_size=$train_batch_size_phase2 --learning_rate=$learning_rate_phase2"
PHASE2_ARGS+=" --warmup_proportion=$warmup_proportion_phase2 --max_steps=$train_steps_phase2"
PHASE2_ARGS+=" --max_seq_length=512 --max_predictions_per_seq=80 --gradient_accumulation_steps=$ga2"
PHASE2_ARGS+=" --phase2 --resume_from_checkpoint --phase1_end_step=$train_steps"
if [ "$run_phase2" == "true" ]; then
  ${PYTHON:-python} "$CODEDIR/run_pretraining.py" $PHASE2_ARGS --check_only || {
    echo "run_pretraining.sh: phase 2 would fail (above): fix it, or pass false as parameter 28 for phase 1 only" >&2
    exit 1
  }
fi

# ---------------------------------------------------------------- phase 1 (seq 128)
ga1=1; [ "$accumulate_gradients" == "true" ] && ga1=$gradient_accumulation_steps
CMD="$LAUNCH $CODEDIR/run_pretraining.py $(common_flags) --input_dir=$DATA_DIR_PHASE1"
CMD+=" --train_batch_size=$train_batch_size --learning_rate=$learning_rate --warmup_proportion=$warmup_proportion"
CMD+=" --max_steps=$train_steps --max_seq_length=128 --max_predictions_per_seq=20"
CMD+=" --gradient_accumulation_steps=$ga1"
[ "$resume_training" == "true" ] && CMD+=" --resume_from_checkpoint"
[ "$init_checkpoint" != "None" ] && CMD+=" --init_checkpoint=$init_checkpoint"
gbs=$((train_batch_size * num_gpus * ${NNODES:-1}))
stamp=$(date +%y%m%d%H%M%S)
run_logged "$RESULTS_DIR/$job_name.pyt_bert_pretraining_phase1_${precision}_gbs${gbs}.$stamp.log" $CMD
echo "finished pretraining phase 1"

[ "$run_phase2" == "true" ] || exit 0

# ---------------------------------------------------------------- phase 2 (seq 512), resumes phase 1
CMD="$LAUNCH $CODEDIR/run_pretraining.py $PHASE2_ARGS"
gbs=$((train_batch_size_phase2 * num_gpus * ${NNODES:-1}))
run_logged "$RESULTS_DIR/$job_name.pyt_bert_pretraining_phase2_${precision}_gbs${gbs}.$stamp.log" $CMD
echo "finished pretraining phase 2"
