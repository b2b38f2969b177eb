#!/usr/bin/env bash
# Every GPU check in one call (about 8 minutes on an H100 / H200): the CUDA tests, then the
# attention and pretraining benches. Tables go to stdout, JSON to results/.
#   bash bench/run_gpu.sh            # all of it
#   bash bench/run_gpu.sh tests      # one part: tests | attention | pretraining | pretraining_no_dropout
set -uo pipefail
cd "$(dirname "$0")/.."
# Default order: most wanted first, so a run cut short by the device's time still has it.
parts=("${@:-tests pretraining pretraining_no_dropout attention}")
status=0
for part in ${parts[*]}; do
  echo "=== $part"
  case "$part" in
    tests) python -m pytest -q -m cuda -p no:cacheprovider tests/test_modeling.py tests/test_optimization.py \
             tests/test_sparse_attention.py || status=1 ;;
    attention) python bench/bench_attention.py --device cuda --quick || status=1 ;;
    pretraining) python bench/bench_pretraining.py --device cuda --quick || status=1 ;;
    # Without attention dropout the DAM search runs on FlexAttention (no [B, H, n, n] bias):
    # the compiled rows of dense and dam_s, side by side with HF at the same setting.
    pretraining_no_dropout)
      python bench/bench_pretraining.py --device cuda --quick --attn_dropout 0 --no_eager \
        --json results/bench_pretraining_cuda_no_dropout.json || status=1 ;;
    *) echo "unknown part $part (tests | attention | pretraining | pretraining_no_dropout)"; exit 2 ;;
  esac
done
exit $status
