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

from attention_masks import load_mask_file, save_mask_file
from utils import read_dllogger_json

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def summary_text(script_module):
    """scripts/demo_summary.py, the summary's wording."""
    return script_module("demo_summary")


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
    # One mask shared by the 6 layers: its 12 heads counted once, one sparsity row, not six identical ones.
    assert summary.count("Main diagonal dropped in ") == 2 and summary.count(" of 12 heads; ") == 2
    assert "layer-heads" not in summary and summary.count("| all 6 |") == 2
    assert summary.count("Search state at step 4: expected sparsity") == 2 and "one seed (2)" in summary
    assert "**Conclusion.**" in summary and "scored best" in summary
    assert summary.count("The mask is written at exactly 85.0 % sparsity") == 2
    assert "[demo] 8 stages to run" in first and "[demo] stage 8 of 8: glue_star ..." in first
    star = json.loads((out / "glue" / "star" / "results.txt").read_text())
    # star at the smoke's fine-tuning length n = 32 (the slice run_glue reports), by hand: a band
    # |i - j| <= 1 (32 + 2 * 31) plus row and column 0 beyond it (2 * 30)
    assert star["mask_sparsity"] == pytest.approx(1 - (32 + 2 * 31 + 2 * 30) / 32**2, abs=1e-9)
    assert "| mask | sparsity (%)" in first

    # A re-run finds every stage done and rebuilds the same summary without training again.
    second = run_demo(out)
    assert second.count("skipped") == 8 and "[demo] 0 stages to run" in second
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
    monkeypatch.setattr(demo, "run_python", lambda *argv, threads=None, log=None: calls.append((argv[0], threads)))
    runs = demo.Demo(demo.parse_arguments(["--out", str(tmp_path), "--threads", "3"]))
    for run in runs.runs:
        runs.pretrain(run)
    for run in runs.glue_runs():
        runs.finetune(run)
    trainings = [threads for script, threads in calls if script in ("run_pretraining.py", "run_glue.py")]
    assert trainings == [3] * 6


def test_help_shows_the_real_defaults(demo, capsys):
    with pytest.raises(SystemExit):
        demo.parse_arguments(["--help"])
    options = " ".join(capsys.readouterr().out.split()).split("options:")[1]
    for option, default in (("--pretrain_steps", 80), ("--threads", 1), ("--jobs", 2), ("--seq_len", 64),
                             ("--glue_steps", 30), ("--lambda_s", 0.0001), ("--target_s", 0.85)):
        entry = re.search(rf"{option} [A-Z_]+ (.*?)(?= --[a-z]|$)", options).group(1)  # help text and default
        assert entry.endswith(f"(default: {default})"), (option, entry)


def band_mask(layers: int, heads: int, n: int, diagonal_kept_in: int, vary_layers: bool = False) -> torch.Tensor:
    """A DAM_s-like mask: offsets 1-3 kept, the diagonal kept only in the first `diagonal_kept_in` heads."""
    offset = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    mask = ((offset >= 1) & (offset <= 3)).expand(layers, heads, n, n).clone()
    mask[:, :diagonal_kept_in] |= offset == 0
    if vary_layers:
        mask[1:, :, 0, 5] = True
    return mask


def test_a_shared_mask_counts_its_heads_once_and_prints_one_row(summary_text):
    mask = band_mask(6, 12, 16, diagonal_kept_in=2)
    assert summary_text.diagonal_counts(mask) == ("Main diagonal dropped in 10 of 12 heads; offset 1 kept in 12 of 12 "
                                                  "(one mask shared by all 6 layers).")
    rows = summary_text.head_sparsity(mask)
    assert len(rows) == 3 and rows[2].startswith("| all 6 | ")
    verdict = summary_text.diagonal_verdict(mask, summary_text.diagonal_gates(mask, "dam_s", 1))
    assert verdict.startswith("The diagonal is kept less often than offset 1 (0.17 against 1.00 at offset 1")
    assert verdict.endswith("the paper's finding.")


def test_per_layer_masks_are_counted_per_layer_and_head(summary_text):
    mask = band_mask(6, 12, 16, diagonal_kept_in=2, vary_layers=True)
    assert summary_text.diagonal_counts(mask) == ("Main diagonal dropped in 60 of 72 layer-heads; "
                                                  "offset 1 kept in 72 of 72.")
    assert len(summary_text.head_sparsity(mask)) == 2 + 6


def test_a_flat_profile_is_not_reported_as_a_finding(summary_text):
    """A random half-kept DAM_u mask: the diagonal kept about as often as offset 1, within the noise."""
    mask = torch.rand(1, 12, 128, 128, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = mask.expand(6, -1, -1, -1)
    assert summary_text.diagonal_gates(mask, "dam_u", 1) == 12 * 128
    verdict = summary_text.diagonal_verdict(mask, 12 * 128)
    assert verdict.startswith("The diagonal is kept about as often as offset 1 (0.")
    assert verdict.endswith("no diagonal finding from this search.")


def test_the_conclusion_names_the_best_mask_and_the_noise_it_cannot_resolve(summary_text):
    rows = [summary_text.Row("dense", 0.0, 0.87), summary_text.Row("dam_s (target 0.85)", 0.7, 0.83),
            summary_text.Row("dam_u (target 0.85)", 0.8, 0.76), summary_text.Row("star", 0.923, 0.84)]
    text = summary_text.conclusion(rows, examples=400, steps=40)
    # Mean accuracy 0.825 on 400 sentences: s.e. 0.0190; two s.e. of a difference: 2 * sqrt(2) * 0.0190 = 5.4 points.
    assert text.startswith("dense scored best (87.0 % at 0.0 % sparsity). One fine-tuning seed at 40 steps on 400 dev "
                           "sentences: differences below 5.4 points")
    assert text.endswith("dam_s (target 0.85), star are within it, so this run does not rank them.")
    spread = summary_text.conclusion(rows[:1] + rows[2:3], examples=400, steps=40)
    assert spread.endswith("Every other mask is below it by more than that, though not shown beyond the seed noise.")


def test_the_search_state_warns_when_most_gates_are_undecided(summary_text):
    state = {"expected_sparsity": 0.7, "deterministic_sparsity": 0.75, "decided_gates": 0.2}
    text = summary_text.search_state(state, 80)
    assert text.startswith("Search state at step 80: expected sparsity 0.700, deterministic 1[a > 0] 0.750, 20 % of "
                           "gates decided") and "Most gates are undecided" in text
    assert "undecided" not in summary_text.search_state({**state, "decided_gates": 0.8}, 80)


def test_a_target_search_leaves_the_mask_rate_to_run_pretraining_and_none_keeps_the_lambda_search(demo, tmp_path,
                                                                                                   monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_python", lambda *argv, threads=None, log=None: calls.append(argv))
    runs = demo.Demo(demo.parse_arguments(["--out", str(tmp_path), "--target_s", "0.9", "--target_u", "none"]))
    for run in runs.runs:
        runs.pretrain(run)
    searches = [argv for argv in calls if argv[0] == "run_pretraining.py"]

    def flag(argv: tuple[str, ...], name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else None

    assert flag(searches[0], "--target_sparsity") == "0.9" and flag(searches[0], "--mask_learning_rate") is None
    assert flag(searches[0], "--lamb") is None
    assert flag(searches[1], "--target_sparsity") is None and flag(searches[1], "--lamb") == "0.0001"
    assert flag(searches[1], "--mask_learning_rate") == "0.05"
    assert [run.label for run in runs.glue_runs()] == ["dense", "dam_s (target 0.9)", "dam_u (λ=0.0001)", "star"]
    assert [run.folder for run in runs.glue_runs()] == ["dense", "dam_s", "dam_u", "star"]
    with pytest.raises(SystemExit):
        demo.parse_arguments(["--target_s", "1.5"])


def test_the_table_reports_the_sparsity_of_the_slice_fine_tuning_used(demo, tmp_path):
    runs = demo.Demo(demo.parse_arguments(["--out", str(tmp_path), "--glue_seq_len", "32"]))
    # star at n = 32: the band |i - j| <= 1 (32 + 2 * 31) plus row and column 0 beyond it (2 * 30)
    assert runs.finetune_sparsity(demo.Mask("star")) == pytest.approx(1 - 154 / 32**2)
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[..., :32, :16] = True  # half of the 32 x 32 slice kept (an eighth of the whole mask)
    save_mask_file(tmp_path / "m.safetensors", mask)
    assert runs.finetune_sparsity(demo.Mask("file", tmp_path / "m.safetensors")) == pytest.approx(0.5)
