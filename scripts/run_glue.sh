#!/usr/bin/env bash
# Fine-tune / evaluate / predict one GLUE task with NVIDIA's positional parameters plus a 17th for
# the attention mask; `bash scripts/run_glue.sh --help` lists them with their defaults. The GPU
# count and precision default to what this machine has: every visible GPU in fp16 (NVIDIA's
# default), or one CPU process in fp32 when there is none.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

# GPUs this run would see, without importing torch (seconds): nvidia-smi's count, capped by
# CUDA_VISIBLE_DEVICES when that is set.
visible_gpus() {
  local count=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    local commas=${CUDA_VISIBLE_DEVICES//[^,]/}
    local listed=$([ -n "$CUDA_VISIBLE_DEVICES" ] && echo $(( ${#commas} + 1 )) || echo 0)
    count=$(( listed < count ? listed : count ))
  fi
  echo "$count"
}

gpus=$(visible_gpus)
# The 17 positional parameters, in NVIDIA's order: name, default, note for --help.
names=(init_checkpoint data_dir vocab_file config_file out_dir task_name num_gpu batch_size
       gradient_accumulation_steps learning_rate warmup_proportion epochs max_steps precision seed mode mask)
defaults=("/workspace/bert/checkpoints/bert_uncased.pt"
          "${BERT_PREP_WORKING_DIR:-/workspace/bert/data}/download/glue/MRPC/"
          "$repo/vocab/vocab" "$repo/bert_config.json" "results/MRPC" "mrpc"
          "$(( gpus > 0 ? gpus : 1 ))" 16 1 2.4e-5 0.1 3 -1.0
          "$([ "$gpus" -gt 0 ] && echo fp16 || echo fp32)" 2 "train eval" "")
notes=("\"\" = random weights" "" "" "" "" "cola sst-2 mrpc sts-b qqp mnli qnli rte wnli"
       "the visible GPUs, or 1 without any; > 1 runs torchrun" "per GPU" "" "" "" "" "-1: every epoch"
       "fp16 | bf16 | anything else = fp32 (TF32 on Ampere and later)" ""
       "any mix of train, eval, prediction; eval alone runs on one GPU"
       "\"\" = the config's attention_mask_type; a mask type (dense, star, ...;
                                 dam_u / dam_s: the checkpoint's logits, binarised); or a *.safetensors
                                 mask file from a DAM search")

usage() {
  echo "usage: bash scripts/run_glue.sh [init_checkpoint] [data_dir] [vocab_file] [config_file] [out_dir]"
  echo "         [task_name] [num_gpu] [batch_size] [gradient_accumulation_steps] [learning_rate]"
  echo "         [warmup_proportion] [epochs] [max_steps] [precision] [seed] [mode] [mask]"
  echo
  echo "Positional, in NVIDIA's order; a missing or empty one takes its default (GPUs visible here: $gpus)."
  echo "An empty init_checkpoint is kept empty. Defaults, then notes:"
  for i in "${!names[@]}"; do
    printf '%3d %-28s %s\n' $((i + 1)) "${names[i]}" "${defaults[i]:-\"\"}"
    if [ -n "${notes[i]}" ]; then
      printf '%33s%s\n' "" "${notes[i]}"
    fi
  done
  echo "Environment: MAX_SEQ_LENGTH (128), EVAL_BATCH_SIZE (batch_size), BERT_PREP_WORKING_DIR (data root)."
  echo "Relative paths are taken from the caller's directory. Outputs: out_dir/results.txt, out_dir/logfile."
}

if [[ "${1-}" == "-h" || "${1-}" == "--help" ]]; then
  usage
  exit 0
fi
if [ "$#" -gt "${#names[@]}" ]; then
  echo "run_glue.sh: $# parameters given, at most ${#names[@]}; see bash scripts/run_glue.sh --help" >&2
  exit 2
fi

given=("$@")
for i in "${!names[@]}"; do
  if [ "$i" -eq 0 ] && [ "$#" -ge 1 ]; then
    value=$1  # an empty init_checkpoint means random weights, not the default checkpoint
  else
    value=${given[i]-}
    value=${value:-${defaults[i]}}
  fi
  printf -v "${names[i]}" '%s' "$value"
done
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
