"""Record what a λ search gives with a checkout's run_pretraining.py (see README.md).

Usage: python regenerate.py CHECKOUT [OUT]   (OUT defaults to this folder)

Runs the tiny dam_s and dam_u λ searches of tests/test_target_search.py on the shard of
../old_checkpoints with the checkout's own command line, and keeps each run's final mask logits
and per-step losses as `<mode>.safetensors` / `<mode>.json`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
INPUTS = HERE.parent / "old_checkpoints"
MODES = ("dam_s", "dam_u")
STEPS = 6


def argv(mode: str, out: Path) -> list[str]:
    """The search's flags, shared with the test that compares against the recording."""
    return ["--do_train", "--disable_progress_bar", "--input_dir", str(INPUTS / "shards"),
            "--config_file", str(INPUTS / "bert_config.json"), "--output_dir", str(out),
            "--max_seq_length", "32", "--max_predictions_per_seq", "3", "--train_batch_size", "8",
            "--learning_rate", "1e-2", "--mask_learning_rate", "0.1", "--max_steps", str(STEPS),
            "--warmup_proportion", "0.1", "--attention_mask_type", mode, "--lamb", "1e-3", "--seed", "7",
            "--log_freq", "1", "--num_steps_per_checkpoint", "100"]


def losses(out: Path) -> dict[str, float]:
    """{step: average_loss} of a run's dllogger lines."""
    found = {}
    for line in (out / "dllogger.json").read_text().splitlines():
        record = json.loads(line.split("DLLL ", 1)[-1])
        if isinstance(record["step"], list) and "average_loss" in record["data"]:
            found[str(record["step"][1])] = record["data"]["average_loss"]
    return found


def main(checkout: str, folder: str = str(HERE)) -> None:
    from safetensors.torch import save_file
    import torch

    for mode in MODES:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            subprocess.run([sys.executable, "run_pretraining.py", *argv(mode, out)], cwd=checkout, check=True,
                           stdout=subprocess.DEVNULL)
            state = torch.load(out / f"ckpt_{STEPS}.pt", weights_only=True)["model"]
            save_file({"mask_logits": state["bert.sparse_mask.mask_logits"].contiguous()},
                      str(Path(folder) / f"{mode}.safetensors"))
            (Path(folder) / f"{mode}.json").write_text(json.dumps(losses(out), indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
