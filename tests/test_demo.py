"""scripts/demo.py: the miniature pipeline end to end with its smallest settings, every artefact checked."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from attention_masks import load_mask_file
from utils import read_dllogger_json

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo(monkeypatch):
    """scripts/demo.py as a module (it imports its neighbours in scripts/ as a script does)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo", module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def run_demo(out: Path) -> str:
    result = subprocess.run([sys.executable, "scripts/demo.py", "--smoke", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_demo_smoke_run_produces_every_artefact_and_resumes(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)

    shard = out / "data" / "shards" / "training_shard_0.hdf5"
    with h5py.File(shard, "r") as f:
        assert f["input_ids"].shape[1] == 64 and f["input_ids"].shape[0] > 100
    assert (out / "data" / "corpus" / "vocab.txt").is_file()

    for run in ("dam_s", "dam_u"):  # warm-started from the packaged MiniLM: 6 layers, 12 heads
        folder = out / "pretrain" / run
        assert (folder / "ckpt_4.pt").is_file() and (folder / "dllogger.json").is_file(), run
        mask, meta = load_mask_file(folder / "attention_mask.safetensors")
        assert tuple(mask.shape) == (6, 12, 64, 64) and mask.dtype.is_floating_point is False
        assert meta["mode"] == run
        for picture in ("attention_mask.png", "training_curves.png"):
            assert (folder / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (run, picture)
    assert not (out / "pretrain" / "dense").exists()  # dense fine-tunes from the pretrained weights

    summary = (out / "summary.md").read_text()
    for row in ("dense", "dam_s", "dam_u", "star"):
        results = json.loads((out / "glue" / row / "results.txt").read_text())
        assert 0.0 <= results["acc"] <= 1.0
        assert (out / "glue" / row / "SST-2.tsv").is_file(), row
        assert f"| {row}" in summary
    assert summary.count("Main diagonal dropped in ") == 2 and summary.count(" of 12 heads;") == 2
    star = json.loads((out / "glue" / "star" / "results.txt").read_text())
    # star at n = 64, by hand: a band |i - j| <= 1 (64 + 2 * 63) plus row and column 0 beyond it (2 * 62)
    assert star["mask_sparsity"] == pytest.approx(1 - (64 + 2 * 63 + 2 * 62) / 64**2, abs=1e-9)
    assert "| mask | sparsity (%)" in first

    # A re-run finds every stage done and rebuilds the same summary without training again.
    second = run_demo(out)
    assert second.count("skipped") == 8
    assert (out / "summary.md").read_text() == summary

    # A fresh run elsewhere redoes every stage and prints the same numbers: same masks, losses, accuracies.
    again = tmp_path / "again"
    run_demo(again)
    assert (again / "summary.md").read_text() == summary
    for run in ("dam_s", "dam_u"):
        first_mask, first_meta = load_mask_file(out / "pretrain" / run / "attention_mask.safetensors")
        mask, meta = load_mask_file(again / "pretrain" / run / "attention_mask.safetensors")
        assert torch.equal(mask, first_mask) and meta == first_meta, run
        losses = [[r["data"]["average_loss"] for r in read_dllogger_json(o / "pretrain" / run / "dllogger.json")
                   if "average_loss" in r.get("data", {})] for o in (out, again)]
        assert losses[0] == losses[1] and len(losses[0]) == 4, run
    numbers = ("acc", "eval:loss", "train:loss", "mask_sparsity", "global_step")
    for row in ("dense", "dam_s", "dam_u", "star"):
        before, fresh = ({k: json.loads((o / "glue" / row / "results.txt").read_text())[k] for k in numbers}
                         for o in (out, again))
        assert fresh == before, row


def test_every_training_run_gets_the_fixed_thread_count(demo, tmp_path, monkeypatch):
    """The numbers depend on the thread count (float rounding), so no training run may use the machine's."""
    calls = []
    monkeypatch.setattr(demo, "run_python", lambda *argv, threads=None: calls.append((argv[0], threads)))
    pipeline = demo.Pipeline(demo.parse_arguments(["--out", str(tmp_path), "--threads", "3"]))
    for run in pipeline.runs:
        pipeline.pretrain(run)
    for name, init, mask_args in pipeline.glue_runs():
        pipeline.finetune(name.split(" ")[0], init, mask_args)
    trainings = [threads for script, threads in calls if script in ("run_pretraining.py", "run_glue.py")]
    assert trainings == [3] * 6


def test_help_shows_the_real_defaults(demo, capsys):
    with pytest.raises(SystemExit):
        demo.parse_arguments(["--help"])
    options = " ".join(capsys.readouterr().out.split()).split("options:")[1]
    for option, default in (("--pretrain_steps", 80), ("--threads", 2), ("--glue_steps", 40), ("--lambda_s", 0.0001)):
        entry = re.search(rf"{option} [A-Z_]+ (.*?)(?= --[a-z]|$)", options).group(1)  # help text and default
        assert entry.endswith(f"(default: {default})"), (option, entry)
