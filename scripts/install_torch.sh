#!/usr/bin/env bash
# torch for the other scripts: the pinned CPU build, installed only when no torch is importable (so
# NVIDIA's container keeps its own CUDA torch), and never unpinned, so pip cannot resolve `torch`
# to a multi-GB CUDA build. One line says which it is, since the install takes a while.
set -euo pipefail
if version=$(python -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "[setup] torch $version is already installed: using it"
else
  echo "[setup] installing torch 2.13.0 (CPU build, a ~190 MB download; a minute or two) ..."
  python -m pip install --quiet torch==2.13.0
fi
