#!/usr/bin/env bash
# Every GPU check in one call: the CUDA tests, the Triton kernel's tests on the GPU, the pretraining
# and attention benches (each stops at its time budget: 240 + 240 + 100 s), then one table of every
# bench row, the Triton rows among them. Tables go to stdout, JSON to results/.
#   bash bench/run_gpu.sh            # all of it
#   bash bench/run_gpu.sh triton     # some parts, of: tests triton pretraining pretraining_no_dropout attention summary
set -uo pipefail
cd "$(dirname "$0")/.."
# Default order: most wanted first, so a run cut short by the device's time still has it.
parts=("${@:-tests triton pretraining pretraining_no_dropout attention summary}")
status=0
for part in ${parts[*]}; do
  echo "=== $part"
  case "$part" in
    tests) python -m pytest -q -m cuda -p no:cacheprovider tests/test_modeling.py tests/test_optimization.py \
             tests/test_sparse_attention.py || status=1 ;;
    # All of them on the GPU (the same checks the CPU runs in Triton's interpreter, plus half precision).
    triton) python -m pytest -q -m triton -p no:cacheprovider tests/test_triton_attention.py || status=1 ;;
    attention) python bench/bench_attention.py --device cuda --quick || status=1 ;;
    pretraining) python bench/bench_pretraining.py --device cuda --quick || status=1 ;;
    # Without attention dropout the DAM search runs on FlexAttention (no [B, H, n, n] bias):
    # the compiled rows of dense and dam_s, side by side with HF at the same setting.
    pretraining_no_dropout)
      python bench/bench_pretraining.py --device cuda --quick --attn_dropout 0 --no_eager \
        --json results/bench_pretraining_cuda_no_dropout.json || status=1 ;;
    summary) python - <<'EOF' || status=1
import json
from pathlib import Path

print("| bench | config | path / mode | result | note |")
print("|---|---|---|---|---|")
for name in ("bench_attention_cuda", "bench_pretraining_cuda", "bench_pretraining_cuda_no_dropout"):
    path = Path("results") / f"{name}.json"
    if not path.exists():
        print(f"| {name} | - | - | - | no results (part not run) |")
        continue
    data = json.loads(path.read_text())
    bench = f"{name.split('_')[1]} @ {data['meta']['commit']}"
    for r in data["rows"]:
        if "path" in r:
            result = f"{r['ms']:.3f} ms fwd+bwd" if r["ms"] else "-"
            config = f"S={r['seq_len']} B={r['batch']} mask {r['mask']}"
            print(f"| {bench} | {config} | {r['path']} | {result} | {r['note']} |")
        else:
            ours = r["ours"]
            result = f"{ours['seq_per_s']:.1f} seq/s" if "seq_per_s" in ours else "-"
            config = f"{r['preset']} n={r['seq_len']} B={r['batch']} {'compile' if r['compiled'] else 'eager'}"
            dropout = f"attention dropout {data['meta']['attn_dropout']}"
            print(f"| {bench} | {config}, {dropout} | {r['mode']} | {result} | {ours.get('error', '')} |")
EOF
    ;;
    *) echo "unknown part $part (tests | triton | pretraining | pretraining_no_dropout | attention | summary)"
       exit 2 ;;
  esac
done
exit $status
