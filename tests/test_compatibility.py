"""Files written by an earlier version (tests/data/old_checkpoints, see its README) still work.

Only the scripts' command lines and torch are used, so the checks hold whatever the code behind
the command lines becomes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attention_masks
from modeling import BertForSequenceClassification

ROOT = Path(__file__).resolve().parent.parent
OLD = Path(__file__).resolve().parent / "data" / "old_checkpoints"
OLD_STEP = 4
OLD_CKPT = f"pretraining/ckpt_{OLD_STEP}.pt"
MASK_LOGITS = "bert.sparse_mask.mask_logits"
PRETRAINING = ["--do_train", "--disable_progress_bar", "--input_dir", "shards", "--config_file", "bert_config.json",
               "--max_seq_length", "32", "--max_predictions_per_seq", "3", "--train_batch_size", "8",
               "--lamb", "1e-3", "--seed", "7", "--num_workers", "0"]
GLUE_SEQ = 16  # the fine-tuning length: reported sparsities are those of the mask's 16 x 16 slice
GLUE = ["--task_name", "sst-2", "--data_dir", "SST-2", "--vocab_file", "vocab.txt", "--do_lower_case",
        "--max_seq_length", str(GLUE_SEQ), "--train_batch_size", "8", "--eval_batch_size", "16",
        "--learning_rate", "2e-3", "--seed", "1"]


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A copy of the old files (runs write next to them), the working directory of every run."""
    return Path(shutil.copytree(OLD, tmp_path / "old"))


def run(cwd: Path, script: str, *argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def logged_steps(log: Path) -> list[int]:
    """Optimizer steps of the per-step records in a dllogger file ("DLLL {json}" lines)."""
    steps = []
    for line in log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line.split(" ", 1)[1])
        if isinstance(record["step"], list) and "step_loss" in record["data"]:
            steps.append(record["step"][1])
    return steps


def old_mask_sparsity(seq_len: int | None = None) -> float:
    """The old exported mask's sparsity, of its top-left seq_len x seq_len slice when given (what a run
    at --max_seq_length seq_len reports), else the recorded whole-mask value."""
    if seq_len is None:
        return json.loads((OLD / f"pretraining/mask_{OLD_STEP}.json").read_text())["sparsity"]
    mask, _ = attention_masks.load_mask_file(OLD / f"pretraining/mask_{OLD_STEP}.safetensors")
    return attention_masks.sparsity(mask[..., :seq_len, :seq_len])


def results(out: Path) -> dict:
    return json.loads((out / "results.txt").read_text())


def test_old_pretraining_checkpoint_resumes(old: Path) -> None:
    run(old, "run_pretraining.py", *PRETRAINING, "--output_dir", "pretraining", "--resume_from_checkpoint",
        "--learning_rate", "1e-2", "--max_steps", str(OLD_STEP + 2))
    assert logged_steps(old / "pretraining/dllogger.json") == [OLD_STEP + 1, OLD_STEP + 2]
    before, after = checkpoint(old / OLD_CKPT), checkpoint(old / f"pretraining/ckpt_{OLD_STEP + 2}.pt")
    assert after["global_step"] == OLD_STEP + 2
    assert before["model"].keys() == after["model"].keys()
    moved = [k for k in before["model"] if not torch.equal(before["model"][k], after["model"][k])]
    assert MASK_LOGITS in moved and len(moved) > len(before["model"]) // 2
    assert all(torch.isfinite(t).all() for t in after["model"].values())


def test_old_pretraining_checkpoint_warm_starts_with_a_fresh_mask_search(old: Path) -> None:
    # Learning rate 0: the one step leaves the weights as loaded, so they must be the old ones.
    run(old, "run_pretraining.py", *PRETRAINING, "--output_dir", "warm", "--init_checkpoint", OLD_CKPT,
        "--learning_rate", "0", "--max_steps", "1")
    before, after = checkpoint(old / OLD_CKPT)["model"], checkpoint(old / "warm/ckpt_1.pt")
    assert after["global_step"] == 1
    assert after["model"].keys() == before.keys()
    for key, tensor in before.items():
        if key != MASK_LOGITS:
            assert torch.equal(after["model"][key], tensor), key
    # A warm start begins a new search: N(0, dam_init_std=1e-3) logits, not the searched ones.
    assert after["model"][MASK_LOGITS].abs().max() < 0.01 < before[MASK_LOGITS].abs().max()


def test_old_pretraining_checkpoint_fine_tunes_with_its_searched_mask(old: Path) -> None:
    run(old, "run_glue.py", *GLUE, "--config_file", "bert_config.json", "--init_checkpoint", OLD_CKPT,
        "--attention_mask_type", "dam_s", "--output_dir", "fine_tuned", "--do_train", "--do_eval",
        "--max_steps", "2")
    found = results(old / "fine_tuned")
    assert found["global_step"] == 2
    assert found["mask_sparsity"] == pytest.approx(old_mask_sparsity(GLUE_SEQ))  # the binarised old logits
    # Today's saved-model folder, which loads back with the mask it was fine-tuned under.
    saved = BertForSequenceClassification.from_pretrained(old / "fine_tuned", num_labels=2)
    assert attention_masks.sparsity(saved.bert.sparse_mask.binarize()) == pytest.approx(old_mask_sparsity())


def test_old_glue_output_folder_evaluates_to_its_recorded_metrics(old: Path) -> None:
    run(old, "run_glue.py", *GLUE, "--init_checkpoint", "glue", "--config_file", "glue/config.json",
        "--output_dir", "eval", "--do_eval")
    recorded, found = results(old / "glue"), results(old / "eval")
    assert found["acc"] == recorded["acc"]
    assert found["eval:loss"] == pytest.approx(recorded["eval:loss"], rel=1e-5)
    assert found["mask_sparsity"] == pytest.approx(old_mask_sparsity(GLUE_SEQ))


def test_old_exported_mask_loads_as_a_mask_file(old: Path) -> None:
    run(old, "run_glue.py", *GLUE, "--config_file", "bert_config.json", "--init_checkpoint", OLD_CKPT,
        "--attention_mask_type", "file", "--attention_mask_file", f"pretraining/mask_{OLD_STEP}.safetensors",
        "--output_dir", "with_file", "--do_train", "--do_eval", "--max_steps", "1")
    found = results(old / "with_file")
    assert found["global_step"] == 1
    assert found["mask_sparsity"] == pytest.approx(old_mask_sparsity(GLUE_SEQ))
