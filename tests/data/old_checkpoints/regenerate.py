"""Write the files of this folder with the scripts of a given checkout (see README.md).

Usage: python regenerate.py CHECKOUT [OUT]   (OUT defaults to this folder)

Only the command lines of the checkout's scripts are used, so the files are what that version
of the code writes: a tiny dam_s pretraining run (shard, config, checkpoint, exported mask) and
a two-step SST-2-format fine-tuning from it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

WORDS = ("the cat dog sat on a mat and ran to house big small red blue green tree car road city river "
         "water fire king queen man woman child book paper pen table chair door window light dark sun "
         "moon star sky cloud rain snow wind good bad").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
SEQ = 32
CONFIG = dict(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=32, max_position_embeddings=SEQ, mask_seq_length=SEQ,
              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attention_mask_type="dam_s")
PRETRAIN_STEPS = 4


def write_corpus(path: Path, docs: int = 12) -> None:
    rng = random.Random(0)
    out = []
    for _ in range(docs):
        topic = rng.sample(WORDS, 8)
        out.append("\n".join(" ".join(rng.choice(topic) for _ in range(rng.randint(8, 14))) + " ."
                             for _ in range(8)))
    path.write_text("\n\n".join(out) + "\n", encoding="utf-8")


def write_sst2(folder: Path) -> None:
    """Label 1 iff the sentence holds "good" (0: "bad")."""
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 32), ("dev", 16)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.choices(WORDS[:-2], k=rng.randint(3, 8))
            words.insert(rng.randint(0, len(words)), "good" if label else "bad")
            rows.append(f"{' '.join(words)}\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def run(code: Path, out: Path, script: str, *argv: str) -> None:
    """`script` of `code` run inside `out`, so the paths the files record are relative to it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    subprocess.run([sys.executable, str(code / script), *argv], check=True, env=env, cwd=out)


def main(code: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (out / "bert_config.json").write_text(json.dumps(CONFIG, indent=2) + "\n", encoding="utf-8")
    for folder in ("shards", "pretraining", "glue", "SST-2"):
        shutil.rmtree(out / folder, ignore_errors=True)
    (out / "shards").mkdir()
    write_corpus(out / "corpus.txt")
    run(code, out, "data/create_pretraining_data.py", "--vocab_file", "vocab.txt",
        "--input_file", "corpus.txt", "--output_file", "shards/training_0.hdf5",
        "--max_seq_length", str(SEQ), "--max_predictions_per_seq", "3", "--dupe_factor", "1",
        "--short_seq_prob", "0", "--n_processes", "1", "--random_seed", "0", "--no_progress")
    (out / "corpus.txt").unlink()
    run(code, out, "run_pretraining.py", "--do_train", "--disable_progress_bar", "--input_dir", "shards",
        "--config_file", "bert_config.json", "--output_dir", "pretraining",
        "--max_seq_length", str(SEQ), "--max_predictions_per_seq", "3", "--train_batch_size", "8",
        "--learning_rate", "1e-2", "--max_steps", str(PRETRAIN_STEPS), "--warmup_proportion", "0.1",
        "--lamb", "1e-3", "--seed", "7", "--num_workers", "0", "--export_mask")
    write_sst2(out / "SST-2")
    run(code, out, "run_glue.py", "--task_name", "sst-2", "--data_dir", "SST-2",
        "--vocab_file", "vocab.txt", "--do_lower_case", "--config_file", "bert_config.json",
        "--init_checkpoint", f"pretraining/ckpt_{PRETRAIN_STEPS}.pt", "--attention_mask_type", "dam_s",
        "--output_dir", "glue", "--do_train", "--do_eval", "--max_steps", "2", "--max_seq_length", "16",
        "--train_batch_size", "8", "--eval_batch_size", "16", "--learning_rate", "2e-3", "--seed", "1")
    # Logs and locks are not inputs of any later run: keep only the files a user would reuse.
    for name in ("dllogger.json", ".lock", "attention_mask.safetensors", "attention_mask.json"):
        (out / "pretraining" / name).unlink(missing_ok=True)
    for name in (".lock", "dllogger.json"):
        (out / "glue" / name).unlink(missing_ok=True)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else here)
