#!/usr/bin/env bash
# Install what the tests need (torch first, see install_torch.sh, so pip never pulls a CUDA build), then run
# the test suite. Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"`.
# Each install step says what it installs first; pip itself stays quiet unless something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
# The package names a requirements file lists (versions, comments and -r lines left out).
package_names() { sed -e 's/#.*//' -e 's/[<>=!~;[ ].*//' -e '/^-/d' -e '/^$/d' "$1" | paste -sd' '; }
bash scripts/install_torch.sh
echo "[setup] installing requirements-dev.txt ($(package_names requirements-dev.txt), and requirements.txt) ..."
python -m pip install --quiet -r requirements-dev.txt
echo "[setup] ready after $((SECONDS - start)) s; running pytest"
python -m pytest -q "$@"
