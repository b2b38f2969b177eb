"""The pipeline that demo.py and reproduce.py share: the demo corpus and its HDF5 shards, bert_config.json
files written from the packaged pretrained MiniLM, and the command lines of run_pretraining.py and run_glue.py.

The two scripts decide what they run, in which order, and what they report; this module decides how
each step is spelled, so every flag is named once. Every folder comes from the caller, which names its
runs' folders explicitly: a folder name never derives from a table's display label.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atomic_io import atomic_write_text
from pretrained import bert_config_from_hf, minilm_folder
from stages import run_python

SHARD_FILE = "training_shard_0.hdf5"
SHARD_SEED = 12345  # create_pretraining_data.py's --random_seed, NVIDIA's
SHARD_PROCESSES = 2
WARMUP_PROPORTION = 0.1
GLUE_EVAL_BATCH = 64
LOG_LINES = 10  # log lines per pretraining run


@dataclass(frozen=True)
class Mask:
    """The attention mask of a run: a mode the scripts build (dense, a fixed pattern, dam_s, dam_u) or
    `file`, a frozen mask file."""

    type: str
    file: Path | None = None

    def flags(self) -> list[str]:
        """run_glue.py's (and run_pretraining.py's) mask flags."""
        return ["--attention_mask_type", self.type, *(["--attention_mask_file", str(self.file)] if self.file else [])]

    def config_fields(self) -> dict[str, str]:
        """The same mask as bert_config.json fields."""
        return {"attention_mask_type": self.type, **({"attention_mask_file": str(self.file)} if self.file else {})}


@dataclass(frozen=True)
class PretrainingSizes:
    """What every pretraining run of one script shares, and the shards it reads were cut to."""

    seq_len: int
    max_pred: int
    batch: int
    learning_rate: float


@dataclass(frozen=True)
class GlueSizes:
    """What every fine-tuning run of one script shares."""

    seq_len: int
    batch: int
    steps: int
    learning_rate: float


class Pipeline:
    """One script's output folder `out`: the data under `out/data` (corpus, vocab, shards), the pretrained
    weights every run starts from, and the commands of its runs."""

    def __init__(self, out: Path, sizes: PretrainingSizes, glue: GlueSizes) -> None:
        self.sizes, self.glue = sizes, glue
        self.data = out / "data"
        self.corpus = self.data / "corpus"
        self.vocab_file = self.corpus / "vocab.txt"
        self.shards = self.data / "shards"
        self.pretrained = minilm_folder()

    # -- data

    def build_corpus(self) -> None:
        """corpus.txt (Python's documentation), its vocab and the GLUE-format tasks under corpus/glue/."""
        run_python("data/demo_corpus.py", "--out", str(self.corpus), "--vocab", "auto")

    def build_shards(self, text: Path, folder: Path, dupe_factor: int, log: Path | None = None) -> None:
        """`folder`/training_shard_0.hdf5 from `text`, at the pretraining sizes' length and masked tokens."""
        run_python("data/create_pretraining_data.py", "--vocab_file", str(self.vocab_file),
                   "--input_file", str(text), "--output_file", str(folder / SHARD_FILE),
                   "--max_seq_length", str(self.sizes.seq_len), "--max_predictions_per_seq", str(self.sizes.max_pred),
                   "--dupe_factor", str(dupe_factor), "--random_seed", str(SHARD_SEED),
                   "--n_processes", str(SHARD_PROCESSES), log=log)

    # -- configs

    def config(self, **fields: Any) -> dict[str, Any]:
        """The pretrained model's architecture, masks of the pretraining length, then `fields` (mask settings)."""
        return bert_config_from_hf(self.pretrained, mask_seq_length=self.sizes.seq_len, **fields)

    def write_config(self, folder: Path, **fields: Any) -> Path:
        """`folder`/bert_config.json holding `config(**fields)`."""
        path = folder / "bert_config.json"
        atomic_write_text(path, json.dumps(self.config(**fields), indent=2, sort_keys=True) + "\n")
        return path

    # -- commands (argv for stages.run_python)

    def pretraining_command(self, folder: Path, *, config: Path, init: Path, steps: int, seed: int,
                            target_sparsity: float | None = None, lamb: float | None = None,
                            mask_learning_rate: float | None = None, progress_bar: bool = True) -> list[str]:
        """run_pretraining.py from `init` into `folder` (checkpoint, dllogger.json, mask files): one checkpoint,
        at the end (checkpoints.checkpoint_path(folder, steps)), LOG_LINES log lines. `target_sparsity`: a target search with
        run_pretraining's own mask learning rate; `lamb`: a λ search."""
        search = {"--target_sparsity": target_sparsity, "--lamb": lamb, "--mask_learning_rate": mask_learning_rate}
        return ["run_pretraining.py", "--do_train", "--input_dir", str(self.shards), "--init_checkpoint", str(init),
                "--config_file", str(config), "--vocab_file", str(self.vocab_file), "--output_dir", str(folder),
                "--max_seq_length", str(self.sizes.seq_len), "--max_predictions_per_seq", str(self.sizes.max_pred),
                "--train_batch_size", str(self.sizes.batch), "--max_steps", str(steps),
                "--learning_rate", str(self.sizes.learning_rate), "--warmup_proportion", str(WARMUP_PROPORTION),
                "--num_steps_per_checkpoint", str(steps), "--log_freq", str(max(steps // LOG_LINES, 1)),
                "--seed", str(seed), "--json-summary", str(folder / "dllogger.json"),
                *[part for flag, value in search.items() if value is not None for part in (flag, str(value))],
                *([] if progress_bar else ["--disable_progress_bar"])]

    def glue_command(self, folder: Path, *, task: str, task_folder: str, init: Path, config: Path, mask: Mask,
                     seed: int, predict: bool = False, keep_checkpoint: bool = True) -> list[str]:
        """run_glue.py: fine-tune `init` on the corpus's task (its folder under corpus/glue/) with `mask`
        frozen, then score the dev set into `folder`/results.txt; `predict`: also label the test set."""
        return ["run_glue.py", "--task_name", task, "--data_dir", str(self.corpus / "glue" / task_folder),
                "--init_checkpoint", str(init), "--config_file", str(config),
                "--vocab_file", str(self.vocab_file), "--do_lower_case",
                "--output_dir", str(folder), "--do_train", "--do_eval", *(["--do_predict"] if predict else []),
                *([] if keep_checkpoint else ["--skip_checkpoint"]),
                "--max_seq_length", str(self.glue.seq_len), "--train_batch_size", str(self.glue.batch),
                "--eval_batch_size", str(GLUE_EVAL_BATCH), "--learning_rate", str(self.glue.learning_rate),
                "--max_steps", str(self.glue.steps), "--warmup_proportion", str(WARMUP_PROPORTION),
                "--seed", str(seed), *mask.flags()]


def plot_mask_command(folder: Path) -> list[str]:
    """plot_masks.py: a search folder's attention_mask.safetensors drawn as attention_mask.png beside it."""
    return ["scripts/plot_masks.py", str(folder / "attention_mask.safetensors"),
            "--out", str(folder / "attention_mask.png")]


def plot_training_command(folder: Path) -> list[str]:
    """plot_training.py: a pretraining folder's dllogger.json drawn as training_curves.png beside it."""
    return ["scripts/plot_training.py", str(folder / "dllogger.json"), "--out", str(folder / "training_curves.png")]
