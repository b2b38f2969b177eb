"""The whole SparseBERT pipeline in miniature, on the built-in demo corpus, on CPU in minutes.

corpus + vocab → HDF5 shards → pretraining three ways (dense, DAM_s, DAM_u search) → binarised masks
(sparsity table, PNG pictures) → GLUE-format fine-tuning with each frozen mask plus one fixed pattern
→ a table in the shape of the paper's, in `<out>/summary.md`.

Every stage writes into its own folder and marks it done only when it finished; a re-run skips
finished stages and redoes an interrupted one from scratch (`--fresh` starts everything anew).
Usage: python scripts/demo.py [--out demo_output] [--pretrain_steps 200] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attention_masks import load_mask_file, sparsity_report  # noqa: E402
from atomic_io import atomic_write_text  # noqa: E402
from utils import read_dllogger_json  # noqa: E402


@dataclass(frozen=True)
class SearchRun:
    """One pretraining run of the demo and the mask the GLUE step uses after it."""

    name: str
    mask_type: str
    lam: float | None = None


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="folder for every artefact of the run")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    p.add_argument("--smoke", action="store_true", help="smallest settings (seconds, for tests)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--max_pred", type=int, default=20)
    p.add_argument("--dupe_factor", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="pretraining sequences per optimizer step")
    p.add_argument("--pretrain_steps", type=int, default=100)
    p.add_argument("--learning_rate", type=float, default=1e-2, help="LAMB peak learning rate")
    p.add_argument("--lambda_s", type=float, default=2e-5, help="λ of the DAM_s search")
    p.add_argument("--lambda_u", type=float, default=1e-4, help="λ of the DAM_u search")
    p.add_argument("--dam_block_size", type=int, default=1,
                   help="> 1: one DAM gate per block (pair / offset), the block-sparse-kernel friendly search")
    p.add_argument("--glue_steps", type=int, default=100)
    p.add_argument("--glue_seq_len", type=int, default=64, help="fine-tuning length (the mask's top-left slice)")
    p.add_argument("--glue_batch", type=int, default=32)
    p.add_argument("--glue_learning_rate", type=float, default=2e-3,
                   help="high for a tiny, briefly pretrained model (BERT-base uses 2e-5 ... 5e-5)")
    p.add_argument("--fixed_pattern", default="star", help="the fixed pattern fine-tuned beside the searches")
    p.add_argument("--vocab", default="train", help="'train' (small demo vocab, fast) or 'auto' (bert-base-uncased)")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.heads, args.seq_len, args.max_pred = 2, 64, 2, 64, 10
        args.dupe_factor, args.batch, args.pretrain_steps, args.glue_steps, args.glue_seq_len = 1, 16, 12, 12, 32
    return args


class Pipeline:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.data = self.out / "data"
        self.runs = [SearchRun("dense", "dense"), SearchRun("dam_s", "dam_s", args.lambda_s),
                     SearchRun("dam_u", "dam_u", args.lambda_u)]

    # -- stage bookkeeping: a stage's folder is trusted only once its marker exists

    def stage(self, name: str, folder: Path, work) -> None:
        marker = self.out / "stages" / f"{name}.done"
        if marker.exists():
            print(f"[demo] {name}: done before, skipped", flush=True)
            return
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted attempt is redone from scratch
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        work()
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, f"{time.perf_counter() - start:.1f}\n")

    def python(self, *argv: str) -> None:
        subprocess.run([sys.executable, *argv], cwd=ROOT, check=True)

    # -- stages

    def build_corpus(self) -> None:
        self.python("data/demo_corpus.py", "--out", str(self.data / "corpus"), "--vocab", self.args.vocab)

    def build_shards(self) -> None:
        a = self.args
        self.python("data/create_pretraining_data.py", "--vocab_file", str(self.vocab_file),
                    "--input_file", str(self.data / "corpus" / "corpus.txt"),
                    "--output_file", str(self.data / "shards" / "training_shard_0.hdf5"),
                    "--max_seq_length", str(a.seq_len), "--max_predictions_per_seq", str(a.max_pred),
                    "--dupe_factor", str(a.dupe_factor), "--random_seed", "12345", "--n_processes", "2")

    @property
    def vocab_file(self) -> Path:
        return self.data / "corpus" / "vocab.txt"

    def write_config(self) -> Path:
        a = self.args
        vocab_size = sum(1 for _ in open(self.vocab_file, encoding="utf-8"))
        config = {"vocab_size": vocab_size, "hidden_size": a.hidden, "num_hidden_layers": a.layers,
                  "num_attention_heads": a.heads, "intermediate_size": 4 * a.hidden,
                  "max_position_embeddings": max(512, a.seq_len), "mask_seq_length": a.seq_len,
                  "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                  "dam_block_size": a.dam_block_size}
        path = self.out / "bert_config.json"
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    def pretrain(self, run: SearchRun, config: Path) -> None:
        a = self.args
        folder = self.out / "pretrain" / run.name
        argv = ["run_pretraining.py", "--do_train", "--input_dir", str(self.data / "shards"),
                "--config_file", str(config), "--vocab_file", str(self.vocab_file), "--output_dir", str(folder),
                "--max_seq_length", str(a.seq_len), "--max_predictions_per_seq", str(a.max_pred),
                "--train_batch_size", str(a.batch), "--max_steps", str(a.pretrain_steps),
                "--learning_rate", str(a.learning_rate), "--warmup_proportion", "0.1",
                "--num_steps_per_checkpoint", str(a.pretrain_steps), "--log_freq", str(max(a.pretrain_steps // 10, 1)),
                "--seed", "42", "--num_workers", "0", "--attention_mask_type", run.mask_type,
                "--json-summary", str(folder / "dllogger.json")]
        if run.lam is not None:
            argv += ["--lamb", str(run.lam)]
        self.python(*argv)
        if run.lam is not None:
            self.python("scripts/plot_masks.py", str(folder / "attention_mask.safetensors"),
                        "--out", str(folder / "attention_mask.png"))

    def finetune(self, name: str, init: Path, config: Path, mask_args: list[str]) -> None:
        a = self.args
        self.python("run_glue.py", "--task_name", "sst-2", "--data_dir", str(self.data / "corpus" / "glue" / "SST-2"),
                    "--init_checkpoint", str(init), "--config_file", str(config),
                    "--vocab_file", str(self.vocab_file), "--do_lower_case",
                    "--output_dir", str(self.out / "glue" / name), "--do_train", "--do_eval", "--do_predict",
                    "--max_seq_length", str(a.glue_seq_len), "--train_batch_size", str(a.glue_batch),
                    "--eval_batch_size", "64", "--learning_rate", str(a.glue_learning_rate), "--max_steps", str(a.glue_steps),
                    "--warmup_proportion", "0.1", "--seed", "2", *mask_args)

    def glue_runs(self) -> list[tuple[str, str, list[str]]]:
        """(row name, pretraining run whose weights it starts from, mask arguments)."""
        rows = [("dense", "dense", ["--attention_mask_type", "dense"])]
        for run in self.runs[1:]:
            mask = self.out / "pretrain" / run.name / "attention_mask.safetensors"
            rows.append((f"{run.name} (λ={run.lam:g})", run.name,
                         ["--attention_mask_type", "file", "--attention_mask_file", str(mask)]))
        rows.append((self.args.fixed_pattern, "dense", ["--attention_mask_type", self.args.fixed_pattern]))
        return rows

    def checkpoint_of(self, run_name: str) -> Path:
        return self.out / "pretrain" / run_name / f"ckpt_{self.args.pretrain_steps}.pt"

    # -- the story

    def run(self) -> str:
        a = self.args
        if a.fresh:
            shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage("corpus", self.data / "corpus", self.build_corpus)
        self.stage("shards", self.data / "shards", self.build_shards)
        config = self.write_config()
        for run in self.runs:
            self.stage(f"pretrain_{run.name}", self.out / "pretrain" / run.name, lambda run=run: self.pretrain(run, config))
        for row, source, mask_args in self.glue_runs():
            folder_name = row.split(" ")[0]
            self.stage(f"glue_{folder_name}", self.out / "glue" / folder_name,
                       lambda f=folder_name, s=source, m=mask_args: self.finetune(f, self.checkpoint_of(s), config, m))
        summary = self.summary()
        atomic_write_text(self.out / "summary.md", summary)
        return summary

    def summary(self) -> str:
        lines = ["# SparseBERT demo summary", "",
                 f"Model: {self.args.layers} layers, hidden {self.args.hidden}, {self.args.heads} heads, seq {self.args.seq_len}; "
                 f"{self.args.pretrain_steps} pretraining steps of {self.args.batch} sequences; "
                 f"{self.args.glue_steps} fine-tuning steps on the demo SST-2-format task.", "",
                 "| mask | sparsity (%) | pretraining MLM+NSP loss | dev accuracy |", "|---|---:|---:|---:|"]
        for row, source, _ in self.glue_runs():
            results = json.loads((self.out / "glue" / row.split(" ")[0] / "results.txt").read_text())
            lines.append(f"| {row} | {100 * results['mask_sparsity']:.1f} | {self.final_loss(source):.3f} "
                         f"| {100 * results['acc']:.1f} |")
        for run in self.runs[1:]:
            mask, _ = load_mask_file(self.out / "pretrain" / run.name / "attention_mask.safetensors")
            lines += ["", f"## {run.name} searched mask (sparsity %, per layer × head)", "", "```",
                      sparsity_report(mask), "```",
                      f"Picture: pretrain/{run.name}/attention_mask.png"]
        return "\n".join(lines) + "\n"

    def final_loss(self, run_name: str) -> float:
        """MLM + NSP loss of the last logged window (the logged average also holds λ·ΣM)."""
        records = read_dllogger_json(self.out / "pretrain" / run_name / "dllogger.json")
        windows = [r["data"] for r in records if "average_loss" in r.get("data", {})]
        return windows[-1]["average_loss"] - windows[-1]["mask_penalty"] if windows else float("nan")


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    summary = Pipeline(parse_arguments(argv)).run()
    print("\n" + summary, flush=True)
    print(f"[demo] finished in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
