#!/usr/bin/env bash
# Fine-tune / evaluate / predict one GLUE task with NVIDIA's positional parameters
# plus a 17th for the attention mask:
#
#   bash scripts/run_glue.sh [init_checkpoint] [data_dir] [vocab_file] [config_file] [out_dir]
#        [task_name] [num_gpu] [batch_size] [gradient_accumulation_steps] [learning_rate]
#        [warmup_proportion] [epochs] [max_steps] [precision] [seed] [mode] [mask]
#
#   precision: fp16 | bf16 | anything else = fp32 (TF32 on Ampere)
#   mode:      any mix of "train", "eval", "prediction" (mode=eval alone uses one GPU)
#   mask:      "" = the config's attention_mask_type; a mask type (dense, star, ..., dam_u, dam_s:
#              logits from the checkpoint, binarised); or a mask file (*.safetensors) from a DAM search
#
# MAX_SEQ_LENGTH (default 128) and EVAL_BATCH_SIZE (default: batch_size) may be set in the environment.
# Relative paths are taken from the caller's directory; the defaults below from this repository.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

init_checkpoint=${1-"/workspace/bert/checkpoints/bert_uncased.pt"}  # "" = random weights
data_dir=${2:-"${BERT_PREP_WORKING_DIR:-/workspace/bert/data}/download/glue/MRPC/"}
vocab_file=${3:-"$repo/vocab/vocab"}
config_file=${4:-"$repo/bert_config.json"}
out_dir=${5:-"results/MRPC"}
task_name=${6:-"mrpc"}
num_gpu=${7:-"8"}
batch_size=${8:-"16"}
gradient_accumulation_steps=${9:-"1"}
learning_rate=${10:-"2.4e-5"}
warmup_proportion=${11:-"0.1"}
epochs=${12:-"3"}
max_steps=${13:-"-1.0"}
precision=${14:-"fp16"}
seed=${15:-"2"}
mode=${16:-"train eval"}
mask=${17:-""}
max_seq_length=${MAX_SEQ_LENGTH:-128}
eval_batch_size=${EVAL_BATCH_SIZE:-$batch_size}

mkdir -p "$out_dir"

args=(--task_name "$task_name" --data_dir "$data_dir" --vocab_file "$vocab_file" --config_file "$config_file"
      --output_dir "$out_dir" --bert_model bert-base-uncased --do_lower_case --max_seq_length "$max_seq_length"
      --train_batch_size "$batch_size" --eval_batch_size "$eval_batch_size"
      --gradient_accumulation_steps "$gradient_accumulation_steps" --learning_rate "$learning_rate"
      --warmup_proportion "$warmup_proportion" --num_train_epochs "$epochs" --max_steps "$max_steps"
      --seed "$seed")
[ -n "$init_checkpoint" ] && args+=(--init_checkpoint "$init_checkpoint")
case "$precision" in
  fp16) args+=(--fp16) ;;
  bf16) args+=(--bf16) ;;
esac
case "$mask" in
  "") ;;
  *.safetensors) args+=(--attention_mask_type file --attention_mask_file "$mask") ;;
  *) args+=(--attention_mask_type "$mask") ;;
esac
[[ "$mode" == *train* ]] && args+=(--do_train)
[[ "$mode" == *eval* ]] && args+=(--do_eval)
[[ "$mode" == *predict* ]] && args+=(--do_predict)
if [ "$mode" = "eval" ]; then
  num_gpu=1
fi

if [ "$num_gpu" -gt 1 ]; then
  launcher=(torchrun --standalone --nproc_per_node "$num_gpu")
else
  launcher=(python)
fi

echo "${launcher[*]} $repo/run_glue.py ${args[*]}"
"${launcher[@]}" "$repo/run_glue.py" "${args[@]}" 2>&1 | tee "$out_dir/logfile"
exit "${PIPESTATUS[0]}"
