"""Fine-tune, evaluate and predict BERT on the nine GLUE tasks, with a frozen sparse attention mask.

NVIDIA's command line, e.g. on 8 GPUs:

    torchrun --nproc_per_node 8 run_glue.py --task_name mnli --data_dir glue_data/MNLI \
        --init_checkpoint ckpt_7038.pt --vocab_file vocab/vocab --config_file bert_config.json \
        --output_dir results/MNLI --do_train --do_eval --do_predict --do_lower_case --fp16

The attention mask comes from the config (overridable with --attention_mask_type /
--attention_mask_file): dense, a fixed pattern, a mask file exported from a DAM search, or a DAM
type whose logits are read from --init_checkpoint and binarised on load, no noise, by the rule the
search wrote its mask with (1[σ(a) > 0.5], or a target search's budget; dam_binarize_sparsity wins).
Whatever its source, the mask is frozen: it has no trainable parameter during fine-tuning.

Outputs in --output_dir: results.txt (JSON: metrics, throughput, latency percentiles),
dllogger.json, the fine-tuned model as a saved-model folder (model.safetensors + bert_config.json,
plus attention_mask.safetensors, a copy of a mask file, which bert_config.json names relative to
the folder), and with --do_predict predictions.json plus the GLUE server's submission files
(CoLA.tsv, MNLI-m.tsv, AX.tsv, ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

import attention_masks
import launch
import training
from atomic_io import atomic_write_text, refuse_overwriting_inputs
from batches import ClassificationBatch
from glue_metrics import compute_metrics
from modeling import (
    MASK_FILE,
    BertConfig,
    BertForSequenceClassification,
    check_warm_start,
    config_file_beside,
    mask_file_from_folder,
    read_warm_start_weights,
    resolve_weights_file,
)
from optimization import build_adamw
from processors.glue import (
    TASKS,
    Features,
    GlueTask,
    InputExample,
    convert_examples_to_features,
    format_prediction,
    get_task,
    read_run_examples,
    submission_text,
)
from schedulers import LinearWarmUpScheduler
from tokenization import BertTokenizer
from utils import MetricLogger, autocast, finite_float, get_world_size, is_main_process

logger = logging.getLogger("run_glue")

MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 0.01
DAM_TYPES = attention_masks.DAM_MODES
SAVED_MODEL_FILES = ("model.safetensors", "bert_config.json", MASK_FILE)  # what save_pretrained writes


# ============================================================================ arguments


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = launch.ScriptParser("run_glue.py", __doc__.split("\n\n")[0])
    launch.add_shared_arguments(p)
    p.add_argument("--task_name", required=True, help=f"the GLUE task: {', '.join(TASKS)}")
    p.add_argument("--data_dir", required=True, help="the task's folder of the GLUE download (train/dev/test .tsv)")
    p.add_argument("--vocab_file", default="vocab/vocab", help="WordPiece vocab the model was trained with")
    p.add_argument("--do_train", action="store_true", help="fine-tune on the train set")
    p.add_argument("--do_eval", action="store_true", help="score the dev set(s)")
    p.add_argument("--do_predict", action="store_true", help="label the test set(s): GLUE submission files")
    p.add_argument("--do_lower_case", action="store_true", help="lower-case the text (uncased vocabs)")
    p.add_argument("--eval_batch_size", type=int, default=8, help="sequences per evaluation batch")
    p.add_argument("--num_train_epochs", type=finite_float, default=3.0, help="epochs of fine-tuning")
    p.add_argument("--max_steps", type=finite_float, default=-1.0, help="> 0: optimizer steps, overriding the epochs")
    p.add_argument("--attention_mask_file", default=None, help="mask file for --attention_mask_type file")
    p.add_argument("--max_grad_norm", type=finite_float, default=MAX_GRAD_NORM,
                   help="global gradient-norm clip (0 = off)")
    p.add_argument("--drop_searched_mask", action="store_true",
                   help="fine-tune a DAM checkpoint under a dense config, leaving its searched mask unused "
                        "(refused without this flag)")
    launch.add_ignored_arguments(p, valued=("--bert_model", "--server_ip", "--server_port"))
    launch.set_help(p, output_dir="where results.txt, the fine-tuned model folder and the GLUE submission files go",
                    init_checkpoint="weights to start from: an NVIDIA / this project's checkpoint, a state dict, a "
                                    "saved-model or Hugging Face folder (without it the model starts from random "
                                    "weights)")
    p.set_defaults(seed=1, warmup_proportion=0.1)
    return launch.parse(p, argv)


def validate_arguments(args: argparse.Namespace) -> None:
    """Every command-line mistake, caught before anything is loaded or written."""
    if not (args.do_train or args.do_eval or args.do_predict):
        raise ValueError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    get_task(args.task_name)
    launch.validate_shared(args)
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.eval_batch_size < 1:
        raise ValueError(f"--eval_batch_size must be >= 1, got {args.eval_batch_size}")
    if args.do_train and args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise ValueError(f"--num_train_epochs must be > 0 (or set --max_steps), got {args.num_train_epochs}")
    if args.max_grad_norm < 0:
        raise ValueError(f"--max_grad_norm must be >= 0, got {args.max_grad_norm}")
    if args.attention_mask_file and args.attention_mask_type not in (None, "file"):
        raise ValueError(f"--attention_mask_file needs --attention_mask_type file (got {args.attention_mask_type})")
    if not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data_dir {args.data_dir} does not exist: point it at the task's GLUE folder")
    if args.attention_mask_file and not Path(args.attention_mask_file).is_file():
        raise FileNotFoundError(f"--attention_mask_file {args.attention_mask_file} does not exist")
    if args.init_checkpoint:
        resolve_weights_file(args.init_checkpoint)  # one clear line when the path is wrong
    if args.do_train and not args.skip_checkpoint:
        refuse_overwriting_fine_tuning_inputs(args)
    if args.do_train and not args.init_checkpoint:
        logger.warning("no --init_checkpoint: fine-tuning starts from random weights")
    if not args.do_train and not args.init_checkpoint:
        raise ValueError("--do_eval / --do_predict without --do_train and --init_checkpoint would score random "
                         "weights: pass --init_checkpoint fine-tuned on this task, or add --do_train")


def refuse_overwriting_fine_tuning_inputs(args: argparse.Namespace) -> None:
    """Training saves the model folder's files into --output_dir: none of them may be a file this run
    reads (fine-tuning 'in place' would replace the starting checkpoint)."""
    weights = resolve_weights_file(args.init_checkpoint) if args.init_checkpoint else None
    inputs = [("--init_checkpoint", weights), ("--config_file", args.config_file),
              ("--attention_mask_file", args.attention_mask_file), ("--vocab_file", args.vocab_file)]
    for name in SAVED_MODEL_FILES:
        refuse_overwriting_inputs(Path(args.output_dir) / name, inputs, f"--output_dir's {name}")


def load_model_config(args: argparse.Namespace) -> BertConfig:
    """The config with the command-line mask overrides, checked against sequence length and vocab."""
    overrides = {"attention_mask_type": "file", "attention_mask_file": args.attention_mask_file} \
        if args.attention_mask_file else {}
    config = launch.read_config(args, **overrides)
    folder = saved_model_folder(args)
    if folder is not None and not args.attention_mask_file:
        config = mask_file_from_folder(config, folder)
    launch.check_config(config, args)
    return config


def saved_model_folder(args: argparse.Namespace) -> Path | None:
    """The --init_checkpoint folder when --config_file is that folder's own config (e.g. a run_glue
    output): its relative attention_mask_file names the copy in that folder, not a path from here."""
    if not args.init_checkpoint:
        return None
    weights_file = resolve_weights_file(args.init_checkpoint)
    own_config = config_file_beside(weights_file)
    if own_config is not None and own_config.samefile(args.config_file):
        return weights_file.parent
    return None


def check_casing(tokenizer: BertTokenizer, args: argparse.Namespace) -> None:
    """Refuse an uncased vocab without --do_lower_case: each capitalised word would be [UNK].

    NVIDIA's flag defaults to off and its scripts always pass it, so forgetting it when calling
    the script directly silently ruins the scores. A vocab with no Latin letters says nothing.
    """
    if args.do_lower_case:
        return
    letters = {c for token in tokenizer.vocab if not (token.startswith("[") and token.endswith("]"))
               for c in token if c.isascii() and c.isalpha()}
    if letters and not any(c.isupper() for c in letters):
        raise ValueError(f"--vocab_file {args.vocab_file} is uncased (no upper-case token) but --do_lower_case "
                         f"is not set, so every capitalised word would become [UNK]: pass --do_lower_case")


# ============================================================================ model


def build_model(config: BertConfig, num_labels: int, init_checkpoint: str | None, allow_new_head: bool = True,
                drop_searched_mask: bool = False) -> BertForSequenceClassification:
    """The classifier with the checkpoint's weights and its attention mask frozen.

    A DAM config takes the mask logits from the checkpoint (`take_mask_logits`) and fixes them by
    the rule the search wrote its mask with (`attention_masks.frozen_mask_config`: 1[σ(a) > 0.5], or
    a target search's budget) unless the config sets its own dam_binarize_sparsity; the returned
    model's config records the rule. A pattern or mask-file config builds its fixed mask from the config. A
    checkpoint fine-tuned on a task with another label count keeps its body and gets a new head
    when `allow_new_head` (training), and is refused otherwise.
    """
    state, searched = read_warm_start_weights(init_checkpoint) if init_checkpoint else ({}, None)
    config = attention_masks.frozen_mask_config(config, searched)
    # A DAM mask's logits come from the checkpoint: building them leaves the global RNG untouched,
    # so a seed gives the same new head and dropout as with the mask file exported from it.
    model = BertForSequenceClassification(config, num_labels, mask_logits_from_checkpoint=True)
    if init_checkpoint:
        state = check_warm_start(model, state, str(init_checkpoint), searched)
        state = take_mask_logits(state, config, init_checkpoint, searched, drop_searched_mask)
        state = drop_foreign_head(state, num_labels, init_checkpoint, allow_new_head)
        model.load_converted_state_dict(state, source=str(init_checkpoint))
    elif config.attention_mask_type in DAM_TYPES:
        raise ValueError(f"attention_mask_type '{config.attention_mask_type}' needs --init_checkpoint holding the "
                         f"searched mask logits (fine-tuning never learns a mask)")
    mask = attention_masks.mask_module(model)
    if isinstance(mask, attention_masks.DifferentiableMask):
        mask.freeze()
    assert not model.mask_parameters(), "the attention mask must have no trainable parameter while fine-tuning"
    return model


def mask_binarization(model: BertForSequenceClassification) -> dict[str, Any]:
    """{"mask_binarization": rule} for a frozen DAM mask (threshold or budget), else nothing."""
    mask = attention_masks.mask_module(model)
    return {"mask_binarization": mask.binarization()} if isinstance(mask, attention_masks.DifferentiableMask) else {}


def log_frozen_mask(model: BertForSequenceClassification) -> None:
    """One log line saying which mask a searched DAM checkpoint was frozen at."""
    rule = mask_binarization(model)
    if rule:
        logger.info("frozen searched mask: sparsity %.4f, %s", model.mask_sparsity(),
                    attention_masks.describe_binarization(rule["mask_binarization"]))


def take_mask_logits(state: dict[str, torch.Tensor], config: BertConfig, source: str, searched: BertConfig | None,
                     drop_searched_mask: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's DAM logits go to a DAM config (its gate layout checked against the recorded
    search) and nowhere else. A dense config would silently fine-tune without the searched mask, so
    it is refused unless `drop_searched_mask`; a pattern or mask-file config names the logits it
    leaves unused."""
    logits = attention_masks.mask_logits_key(state)  # its name, or None
    kind = config.attention_mask_type
    if kind in DAM_TYPES:
        if logits is None:
            raise ValueError(
                f"attention_mask_type '{kind}' reads its mask logits from --init_checkpoint, but {source} has none: "
                f"pass the DAM pretraining checkpoint, or export its mask and use --attention_mask_type file "
                f"--attention_mask_file <mask.safetensors>")
        if searched is not None:
            check_gate_layout(searched, config, source)
        return state
    if logits is not None and kind == "dense" and not drop_searched_mask:
        mode = searched.attention_mask_type if searched is not None else "dam_u / dam_s (the search's)"
        raise ValueError(f"{source} holds a searched attention mask ({logits}) but attention_mask_type "
                         f"is 'dense', which would fine-tune without it: pass --attention_mask_type {mode} to use "
                         f"the searched mask, or --drop_searched_mask to fine-tune densely")
    if logits is not None:
        logger.warning("%s: not using its searched mask logits %s (attention_mask_type '%s')", source, logits, kind)
    return attention_masks.without_mask_state(state)


def check_gate_layout(searched: BertConfig, config: BertConfig, init_checkpoint: str) -> None:
    """Refuse DAM logits whose recorded search config lays its gates out otherwise than `config`:
    a shape check misses e.g. another mask_seq_length with another dam_block_size and as many gates."""
    differing = attention_masks.differing_fields(attention_masks.gate_layout(searched),
                                                 attention_masks.gate_layout(config), "search")
    if differing:
        raise ValueError(
            f"{init_checkpoint}: its mask logits were searched under another gate layout than this run's config "
            f"({', '.join(differing)}), so each would gate other attention entries: use the search's "
            f"bert_config.json and mask flags, or export its mask (python attention_masks.py export --checkpoint "
            f"{init_checkpoint} --out mask.safetensors) and pass --attention_mask_type file "
            f"--attention_mask_file mask.safetensors")


def drop_foreign_head(state: dict[str, torch.Tensor], num_labels: int, source: str,
                      allow_new_head: bool) -> dict[str, torch.Tensor]:
    """`state` without its classifier when that classifier has another number of outputs.

    Without `allow_new_head` (scoring only) the checkpoint must hold this task's classifier: a new
    head would be random, and so would every score.
    """
    head = {k: v for k, v in state.items() if k.split(".")[-2:-1] == ["classifier"]}
    outputs = {int(v.shape[0]) for v in head.values() if v.dim() >= 1}
    if outputs == {num_labels}:
        return state
    found = ", ".join(map(str, sorted(outputs)))
    if not allow_new_head:
        problem = (f"{source}: its classifier has {found} outputs but this task needs {num_labels}" if outputs
                   else f"{source} has no classifier (a pretraining checkpoint?), so every score would come "
                        f"from a random head")
        raise ValueError(f"{problem}: pass the checkpoint fine-tuned on this task, or add --do_train to train "
                         f"a new head")
    if outputs:
        logger.warning("%s: its classifier has %s outputs, this task needs %d: training a new classifier head",
                       source, found, num_labels)
    return {k: v for k, v in state.items() if k not in head}


# ============================================================================ data


def load_features(task: GlueTask, examples: list[InputExample], tokenizer: BertTokenizer,
                  max_seq_length: int) -> Features:
    return convert_examples_to_features(examples, tokenizer, max_seq_length, task.labels)


def batches_of(features: Features, batch_size: int, sampler: Sampler[int]) -> DataLoader:
    """`ClassificationBatch`es of the rows `sampler` picks."""
    def collate(rows: list[int]) -> ClassificationBatch:
        return ClassificationBatch(
            input_ids=torch.from_numpy(features.input_ids[rows]),
            segment_ids=torch.from_numpy(features.segment_ids[rows]),
            input_mask=torch.from_numpy(features.input_mask[rows]), labels=torch.from_numpy(features.label_ids[rows]))
    return DataLoader(range(len(features)), sampler=sampler, batch_size=batch_size, collate_fn=collate)


def shuffled(features: Features, seed: int) -> Sampler[int]:
    """This rank's share of the rows, in a new order each epoch (`set_epoch` under torchrun)."""
    rows = range(len(features))
    if get_world_size() > 1:
        return DistributedSampler(rows, shuffle=True, seed=seed, drop_last=False)
    return RandomSampler(rows, generator=torch.Generator().manual_seed(seed))


# ============================================================================ training


def total_optimizer_steps(args: argparse.Namespace, micro_batches_per_epoch: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = math.ceil(micro_batches_per_epoch / args.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * args.num_train_epochs))


def build_optimization(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
                       total_steps: int) -> training.Optimization:
    """AdamW, linear warm-up and decay, the fp16 loss scaler, clipped gradients."""
    optimizer = build_adamw(model, lr=args.learning_rate, weight_decay=WEIGHT_DECAY)
    scheduler = LinearWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=total_steps)
    grad_scaler = training.make_grad_scaler(device, enabled=args.fp16, init_scale=args.loss_scale or 2.0**16,
                                            static=args.loss_scale > 0)
    return training.Optimization(optimizer, scheduler, grad_scaler, max_grad_norm=args.max_grad_norm)


def train(args: argparse.Namespace, model: torch.nn.Module, features: Features, run: launch.Run,
          metrics: MetricLogger) -> dict[str, Any]:
    """Fine-tune with accumulation, DDP and mixed precision; one log line per optimizer step."""
    sampler = shuffled(features, args.seed)
    loader = batches_of(features, args.train_batch_size // args.gradient_accumulation_steps, sampler)
    total_steps = total_optimizer_steps(args, len(loader))
    optimization = build_optimization(args, model, run.device, total_steps)
    ddp = training.wrap_distributed(model, run.device)
    meter = training.ThroughputMeter(run.device, warmup_steps=min(4, total_steps // 2))
    step = training.TrainStep(ddp, optimization, run.device, run.dtype, training.BadStepBound(args.max_bad_steps),
                              meter)
    advice = lambda: "lower --learning_rate, use --bf16 or fp32, or raise --max_bad_steps"  # noqa: E731
    data = training.endless(loader, getattr(sampler, "set_epoch", None))
    window, global_step, epoch, logged = training.LossWindow(), 0, 0, {"step_loss": math.nan}
    start = time.perf_counter()
    ddp.train()
    while global_step < total_steps:
        micro_batches = []
        for _ in range(args.gradient_accumulation_steps):
            epoch, batch = next(data)
            micro_batches.append(batch)
        outcome = step(micro_batches, global_step, advice)
        if outcome.applied:
            global_step += 1
            window.add(outcome)
            logged = {"step_loss": window.means().last["loss"], "learning_rate": optimization.learning_rates()[0]}
            metrics.log((epoch, global_step), logged)
    train_time = time.perf_counter() - start
    return {"global_step": global_step, "train:loss": logged["step_loss"], "train:latency": train_time,
            "train:num_samples_per_gpu": meter.total_sequences // run.world_size, "train:num_steps": global_step,
            "train:throughput": meter.sequences_per_second(), "train:skipped_steps": step.bad_steps.skipped,
            "e2e_train_time": train_time, "training_sequences_per_second": meter.sequences_per_second()}


# ============================================================================ evaluation


@torch.no_grad()
def run_inference(model: torch.nn.Module, features: Features, batch_size: int, run: launch.Run,
                  with_loss: bool) -> tuple[np.ndarray, float, list[float]]:
    """Logits of every example (in order), the mean loss when `with_loss` (labelled splits), and
    per-batch latencies (ms)."""
    model.eval()
    outputs, latencies, loss_total = [], [], 0.0
    for batch in batches_of(features, batch_size, SequentialSampler(range(len(features)))):
        batch = batch.to(run.device)
        tick = time.perf_counter()
        with autocast(run.device, run.dtype):
            output = model(**batch.model_inputs(with_labels=with_loss))
        outputs.append(output.logits.float().cpu())
        latencies.append((time.perf_counter() - tick) * 1000.0)
        if with_loss:
            loss_total += output.loss.item() * len(batch)
    loss = loss_total / len(features) if with_loss and len(features) else math.nan
    return torch.cat(outputs).numpy(), loss, latencies


def predictions_from_logits(task: GlueTask, logits: np.ndarray) -> np.ndarray:
    return logits[:, 0] if task.is_regression else logits.argmax(axis=-1)


def latency_summary(latencies: list[float], num_samples: int) -> dict[str, float]:
    """NVIDIA's infer:latency(ms) percentiles and throughput over the timed batches."""
    values = np.asarray(latencies, dtype=np.float64)
    summary = {f"infer:latency(ms):{p}%": float(np.percentile(values, p)) for p in (50, 90, 95, 99, 100)}
    summary.update({"infer:latency(ms):avg": float(values.mean()), "infer:latency(ms):std": float(values.std()),
                    "infer:latency(ms):sum": float(values.sum()),
                    "infer:throughput(samples/s):avg": num_samples / (values.sum() / 1000.0) if values.sum() else 0.0})
    return summary


def evaluate(args: argparse.Namespace, task: GlueTask, model: torch.nn.Module, tokenizer: BertTokenizer,
             split_examples: dict[str, list[InputExample]], run: launch.Run) -> dict[str, Any]:
    """Score every dev split of the task (MNLI: matched, then mismatched with the "mm:" prefix)."""
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for split in task.dev:
        examples = split_examples[split.name]
        features = load_features(task, examples, tokenizer, args.max_seq_length)
        logits, loss, latencies = run_inference(model, features, args.eval_batch_size, run, with_loss=True)
        preds = predictions_from_logits(task, logits)
        metric_task = "mnli-mm" if split.metric_prefix == "mm:" else task.name
        prefix = split.metric_prefix
        results.update({prefix + k: v for k, v in compute_metrics(metric_task, preds, features.label_ids).items()})
        results[prefix + "eval:loss"] = loss
        results[prefix + "eval:num_samples_per_gpu"] = len(examples)
        results[prefix + "eval:num_steps"] = len(latencies)
        if not prefix:
            results.update(latency_summary(latencies, len(examples)))
    results["e2e_inference_time"] = time.perf_counter() - start
    results["inference_sequences_per_second"] = results.get("infer:throughput(samples/s):avg", 0.0)
    return results


def predict(args: argparse.Namespace, task: GlueTask, model: torch.nn.Module, tokenizer: BertTokenizer,
            split_examples: dict[str, list[InputExample]], run: launch.Run) -> None:
    """Label every test split read (AX only when present): the GLUE server's files, and
    predictions.json (guid -> label)."""
    predictions: dict[str, str] = {}
    for split in task.test:
        if split.name not in split_examples:
            continue
        examples = split_examples[split.name]
        features = load_features(task, examples, tokenizer, args.max_seq_length)
        logits, _, _ = run_inference(model, features, args.eval_batch_size, run, with_loss=False)
        labels = [format_prediction(task, split, p) for p in predictions_from_logits(task, logits)]
        atomic_write_text(Path(args.output_dir) / split.server_file,
                          submission_text([ex.index for ex in examples], labels))
        predictions.update({ex.guid: label for ex, label in zip(examples, labels)})
    atomic_write_text(Path(args.output_dir) / "predictions.json", json.dumps(predictions, indent=1) + "\n")


def write_results(args: argparse.Namespace, results: dict[str, Any], metrics: MetricLogger) -> None:
    """results.txt, and the summary line: every number of the run once, under the name results.txt gives it
    (NVIDIA's line repeated acc as exact_match)."""
    atomic_write_text(Path(args.output_dir) / "results.txt", json.dumps(results, indent=2, sort_keys=True) + "\n")
    metrics.log((), {k: v for k, v in results.items() if isinstance(v, float)})


# ============================================================================ main


def run_task(args: argparse.Namespace, lock: training.OutputDirLock) -> dict[str, Any]:
    validate_arguments(args)
    run = launch.start(args)
    task = get_task(args.task_name)
    config = load_model_config(args)
    tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
    check_casing(tokenizer, args)
    model = build_model(config, task.num_labels, args.init_checkpoint, allow_new_head=args.do_train,
                        drop_searched_mask=args.drop_searched_mask).to(run.device)
    config = model.config  # a searched mask frozen by the search's binarisation rule
    log_frozen_mask(model)
    # Every file of the run is read and checked before the first step: a bad dev or test row
    # must not surface after the fine-tuning time is spent.
    examples = read_run_examples(task, args.data_dir, args.do_train, args.do_eval, args.do_predict)
    train_features = load_features(task, examples["train"], tokenizer, args.max_seq_length) if args.do_train else None

    lock.acquire(exclusive=is_main_process())
    metrics = launch.open_metrics(args, config)
    results: dict[str, Any] = {"task": task.name, "attention_mask_type": config.attention_mask_type,
                               "mask_sparsity": model.mask_sparsity(args.max_seq_length), **mask_binarization(model)}
    if args.do_train:
        results.update(train(args, model, train_features, run, metrics))
        if is_main_process() and not args.skip_checkpoint:
            model.save_pretrained(args.output_dir)
    # Evaluation and prediction run on rank 0, as NVIDIA's script does. The others finish now and
    # torchrun waits for rank 0: a barrier would fail them once scoring outlasts --dist_timeout.
    if is_main_process():
        if args.do_eval:
            results.update(evaluate(args, task, model, tokenizer, examples, run))
        if args.do_predict:
            predict(args, task, model, tokenizer, examples, run)
        write_results(args, results, metrics)
    metrics.close()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return training.run_script_in(args.output_dir, "run_glue.py", lambda lock: run_task(args, lock))


if __name__ == "__main__":
    sys.exit(main())
