#!/usr/bin/env bash
# torch for the other scripts: the pinned CPU build, installed only when no torch is importable (so
# NVIDIA's container keeps its own CUDA torch), and never unpinned, so pip cannot resolve `torch`
# to a multi-GB CUDA build.
set -euo pipefail
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
