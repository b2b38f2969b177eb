"""scripts/demo.py: the miniature pipeline end to end with its smallest settings, every artefact checked."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from attention_masks import load_mask_file

ROOT = Path(__file__).resolve().parent.parent


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
        assert (folder / "attention_mask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "pretrain" / "dense").exists()  # dense fine-tunes from the pretrained weights

    summary = (out / "summary.md").read_text()
    for row in ("dense", "dam_s", "dam_u", "star"):
        results = json.loads((out / "glue" / row / "results.txt").read_text())
        assert 0.0 <= results["acc"] <= 1.0
        assert (out / "glue" / row / "SST-2.tsv").is_file(), row
        assert f"| {row}" in summary
    assert summary.count("Main diagonal dropped in ") == 2 and summary.count(" of 72 layer-heads") == 2
    star = json.loads((out / "glue" / "star" / "results.txt").read_text())
    # star at n = 64, by hand: a band |i - j| <= 1 (64 + 2 * 63) plus row and column 0 beyond it (2 * 62)
    assert star["mask_sparsity"] == pytest.approx(1 - (64 + 2 * 63 + 2 * 62) / 64**2, abs=1e-9)
    assert "| mask | sparsity (%)" in first

    # A re-run finds every stage done and rebuilds the same summary without training again.
    second = run_demo(out)
    assert second.count("skipped") == 8
    assert (out / "summary.md").read_text() == summary
