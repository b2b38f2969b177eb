#!/usr/bin/env bash
# Install what the tests need (torch first, see install_torch.sh, so pip never pulls a CUDA build), then run
# the test suite. Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_torch.sh
python -m pip install --quiet -r requirements-dev.txt
python -m pytest -q "$@"
