"""Fine-tune, evaluate and predict BERT on the nine GLUE tasks, with a frozen sparse attention mask.

NVIDIA's command line, e.g. on 8 GPUs:

    torchrun --nproc_per_node 8 run_glue.py --task_name mnli --data_dir glue_data/MNLI \
        --init_checkpoint ckpt_7038.pt --vocab_file vocab/vocab --config_file bert_config.json \
        --output_dir results/MNLI --do_train --do_eval --do_predict --do_lower_case --fp16

The attention mask comes from the config (overridable with --attention_mask_type /
--attention_mask_file): dense, a fixed pattern, a mask file exported from a DAM search, or a DAM
type whose logits are read from --init_checkpoint and binarised on load (1[σ(a) > 0.5], no noise).
Whatever its source, the mask is frozen: it has no trainable parameter during fine-tuning.

Outputs in --output_dir: results.txt (JSON: metrics, throughput, latency percentiles),
dllogger.json, pytorch_model.bin ({"model": state_dict}) + config.json (+ attention_mask.safetensors,
a copy of a mask file, which config.json names relative to the folder), and with --do_predict
predictions.json plus the GLUE server's submission files (CoLA.tsv, MNLI-m.tsv, AX.tsv, ...).
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
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler, TensorDataset

import attention_masks
import training
from atomic_io import atomic_write_text, refuse_overwriting_inputs
from glue_metrics import compute_metrics
from modeling import (
    MASK_FILE,
    BertConfig,
    BertForSequenceClassification,
    config_file_beside,
    mask_file_from_folder,
    read_warm_start,
    resolve_weights_file,
    save_mask_into_folder,
)
from optimization import build_adamw
from processors.glue import (
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
from utils import (
    MetricLogger,
    add_local_rank_argument,
    atomic_save,
    autocast,
    finite_float,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    precision_dtype,
    seed_everything,
)

logger = logging.getLogger("run_glue")

MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 0.01
DAM_TYPES = attention_masks.DAM_MODES


# ============================================================================ arguments


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # -- NVIDIA's flags
    p.add_argument("--task_name", required=True, help="cola, sst-2, mrpc, sts-b, qqp, mnli, qnli, rte or wnli")
    p.add_argument("--data_dir", required=True, help="the task's folder of the GLUE download (train/dev/test .tsv)")
    p.add_argument("--bert_model", default="bert-base-uncased", help="informational, as in NVIDIA's script")
    p.add_argument("--init_checkpoint", default=None,
                   help="weights to start from: NVIDIA / this project's checkpoint, state dict, HF folder "
                        "(without it the model starts from random weights)")
    p.add_argument("--vocab_file", default="vocab/vocab")
    p.add_argument("--config_file", required=True, help="bert_config.json (model + attention-mask fields)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--do_train", action="store_true")
    p.add_argument("--do_eval", action="store_true", help="score the dev set(s)")
    p.add_argument("--do_predict", action="store_true", help="label the test set(s): GLUE submission files")
    p.add_argument("--do_lower_case", action="store_true")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--train_batch_size", type=int, default=32, help="per GPU per optimizer step (after accumulation)")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=finite_float, default=5e-5)
    p.add_argument("--num_train_epochs", type=finite_float, default=3.0)
    p.add_argument("--max_steps", type=finite_float, default=-1.0, help="> 0: optimizer steps, overriding the epochs")
    p.add_argument("--warmup_proportion", type=finite_float, default=0.1)
    p.add_argument("--no_cuda", action="store_true")
    add_local_rank_argument(p)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--fp16", action="store_true", help="fp16 autocast + loss scaling")
    p.add_argument("--amp", action="store_true", help="same as --fp16")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--loss_scale", type=finite_float, default=0.0, help="0 = dynamic; > 0 = this static scale")
    p.add_argument("--skip_checkpoint", action="store_true", help="do not write pytorch_model.bin")
    # -- this project
    p.add_argument("--attention_mask_type", default=None,
                   help="override the config: dense | a pattern | dam_u | dam_s (logits from --init_checkpoint) | file")
    p.add_argument("--attention_mask_file", default=None, help="mask file for --attention_mask_type file")
    p.add_argument("--max_grad_norm", type=finite_float, default=MAX_GRAD_NORM, help="global gradient-norm clip (0 = off)")
    p.add_argument("--max_bad_steps", type=int, default=25,
                   help="stop after this many consecutive non-finite (skipped) optimizer steps")
    p.add_argument("--dist_timeout", type=finite_float, default=1800,
                   help="seconds a collective may wait for a dead or stuck worker before the run stops")
    p.add_argument("--json-summary", dest="json_summary", default=None,
                   help="dllogger JSON file (default: <output_dir>/dllogger.json)")
    args = p.parse_args(argv)
    args.fp16 = args.fp16 or args.amp
    args.max_steps = int(args.max_steps)
    return args


def validate_arguments(args: argparse.Namespace) -> None:
    """Every command-line mistake, caught before anything is loaded or written."""
    if not (args.do_train or args.do_eval or args.do_predict):
        raise ValueError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    get_task(args.task_name)
    if args.fp16 and args.bf16:
        raise ValueError("--fp16/--amp and --bf16 are mutually exclusive: pick one")
    if args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    if args.train_batch_size < 1 or args.train_batch_size % args.gradient_accumulation_steps:
        raise ValueError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must divide "
                         f"--train_batch_size {args.train_batch_size} (the per-GPU batch of one optimizer step)")
    if args.eval_batch_size < 1:
        raise ValueError(f"--eval_batch_size must be >= 1, got {args.eval_batch_size}")
    if args.max_seq_length < 8:
        raise ValueError(f"--max_seq_length must be >= 8, got {args.max_seq_length}")
    if args.do_train and args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise ValueError(f"--num_train_epochs must be > 0 (or set --max_steps), got {args.num_train_epochs}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise ValueError(f"--warmup_proportion is a fraction of the training steps in [0, 1), got {args.warmup_proportion}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.max_bad_steps < 1 or args.max_grad_norm < 0:
        raise ValueError("--max_bad_steps must be >= 1 and --max_grad_norm >= 0")
    if not args.dist_timeout > 0:
        raise ValueError(f"--dist_timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.attention_mask_file and args.attention_mask_type not in (None, "file"):
        raise ValueError(f"--attention_mask_file needs --attention_mask_type file (got {args.attention_mask_type})")
    if not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data_dir {args.data_dir} does not exist: point it at the task's GLUE folder")
    for flag in ("vocab_file", "config_file", "attention_mask_file"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"--{flag} {value} does not exist")
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
    """Training saves pytorch_model.bin, config.json and a mask file into --output_dir: none of them
    may be a file this run reads (fine-tuning 'in place' would replace the starting checkpoint)."""
    weights = resolve_weights_file(args.init_checkpoint) if args.init_checkpoint else None
    inputs = [("--init_checkpoint", weights), ("--config_file", args.config_file),
              ("--attention_mask_file", args.attention_mask_file), ("--vocab_file", args.vocab_file)]
    for name in ("pytorch_model.bin", "config.json", MASK_FILE):
        refuse_overwriting_inputs(Path(args.output_dir) / name, inputs, f"--output_dir's {name}")


def load_model_config(args: argparse.Namespace) -> BertConfig:
    """The config with the command-line mask overrides, checked against sequence length and vocab."""
    overrides: dict[str, Any] = {"attention_mask_type": args.attention_mask_type}
    if args.attention_mask_file:
        overrides.update(attention_mask_type="file", attention_mask_file=args.attention_mask_file)
    config = training.load_config(args.config_file, **overrides)
    folder = saved_model_folder(args)
    if folder is not None and not args.attention_mask_file:
        config = mask_file_from_folder(config, folder)
    if args.max_seq_length > config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings} of {args.config_file}")
    if config.attention_mask_type != "dense" and config.mask_seq_length < args.max_seq_length:
        raise ValueError(
            f"attention_mask_type '{config.attention_mask_type}' has mask_seq_length {config.mask_seq_length} < "
            f"--max_seq_length {args.max_seq_length}: pass --max_seq_length {config.mask_seq_length} or a mask "
            f"made for longer inputs")
    if config.attention_mask_type == "file":  # its shape checks, before minutes of tokenizing
        attention_masks.build_attention_mask(config)
    with open(args.vocab_file, encoding="utf-8") as f:
        vocab_lines = sum(1 for _ in f)
    if vocab_lines > config.vocab_size:
        raise ValueError(f"--vocab_file {args.vocab_file} has {vocab_lines} tokens but {args.config_file} has "
                         f"vocab_size {config.vocab_size}: use the vocab the model was trained with")
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


def build_model(config: BertConfig, num_labels: int, init_checkpoint: str | None,
                allow_new_head: bool = True) -> BertForSequenceClassification:
    """The classifier with the checkpoint's weights and its attention mask frozen.

    A DAM config takes the mask logits from the checkpoint and fixes them at 1[σ(a) > 0.5], after
    checking its gate layout against the search config the checkpoint records (if any); a
    pattern or mask-file config builds its fixed mask from the config and ignores any logits in
    the checkpoint. A checkpoint fine-tuned on a task with another label count keeps its body and
    gets a new head when `allow_new_head` (training), and is refused otherwise.
    """
    # A DAM mask's logits come from the checkpoint: building them leaves the global RNG untouched,
    # so a seed gives the same new head and dropout as with the mask file exported from it.
    model = BertForSequenceClassification(config, num_labels, mask_logits_from_checkpoint=True)
    is_dam = config.attention_mask_type in DAM_TYPES
    if init_checkpoint:
        state, searched = read_warm_start(init_checkpoint, model)
        has_logits = any(key.endswith("sparse_mask.mask_logits") for key in state)
        if is_dam and not has_logits:
            raise ValueError(
                f"attention_mask_type '{config.attention_mask_type}' reads its mask logits from --init_checkpoint, "
                f"but {init_checkpoint} has none: pass the DAM pretraining checkpoint, or export its mask and use "
                f"--attention_mask_type file --attention_mask_file <mask.safetensors>")
        if is_dam and searched is not None:
            check_gate_layout(searched, config, init_checkpoint)
        if not is_dam:
            state = {k: v for k, v in state.items() if "sparse_mask" not in k}
        state = drop_foreign_head(state, num_labels, init_checkpoint, allow_new_head)
        model.load_converted_state_dict(state, source=str(init_checkpoint))
    elif is_dam:
        raise ValueError(f"attention_mask_type '{config.attention_mask_type}' needs --init_checkpoint holding the "
                         f"searched mask logits (fine-tuning never learns a mask)")
    mask = model.bert.sparse_mask
    if isinstance(mask, attention_masks.DifferentiableMask):
        mask.freeze()
    assert not model.mask_parameters(), "the attention mask must have no trainable parameter while fine-tuning"
    return model


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


def save_fine_tuned(model: BertForSequenceClassification, config: BertConfig, output_dir: Path) -> None:
    """pytorch_model.bin + config.json; a mask from a file is saved beside them and named relative to
    the folder, so the folder loads the same from any directory (modeling.save_mask_into_folder)."""
    atomic_save({"model": model.state_dict()}, output_dir / "pytorch_model.bin")
    save_mask_into_folder(config, model.bert.sparse_mask, output_dir).to_json_file(output_dir / "config.json")


def mask_sparsity(model: BertForSequenceClassification) -> float:
    """Sparsity (fraction of dropped pairs) of the mask in use, at mask_seq_length; 0 for dense."""
    mask = training.unwrap_model(model).bert.sparse_mask
    return attention_masks.sparsity(mask.binarize()) if mask is not None else 0.0


# ============================================================================ data


def load_features(task: GlueTask, examples: list[InputExample], tokenizer: BertTokenizer,
                  max_seq_length: int) -> Features:
    return convert_examples_to_features(examples, tokenizer, max_seq_length, task.labels)


def tensor_dataset(features: Features) -> TensorDataset:
    return TensorDataset(*(torch.from_numpy(a) for a in
                           (features.input_ids, features.input_mask, features.segment_ids, features.label_ids)))


def task_loss(task: GlueTask, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (classification) or mean squared error (STS-B), in fp32."""
    if task.is_regression:
        return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
    return F.cross_entropy(logits.float(), labels.view(-1))


# ============================================================================ training


def total_optimizer_steps(args: argparse.Namespace, micro_batches_per_epoch: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = math.ceil(micro_batches_per_epoch / args.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * args.num_train_epochs))


def train(args: argparse.Namespace, task: GlueTask, model: torch.nn.Module, features: Features,
          device: torch.device, metrics: MetricLogger) -> dict[str, Any]:
    """AdamW + linear warm-up, clipped gradients, accumulation, DDP, mixed precision."""
    world_size = get_world_size()
    dtype = precision_dtype(args.fp16, args.bf16)
    accumulation = args.gradient_accumulation_steps
    micro_batch = args.train_batch_size // accumulation
    dataset = tensor_dataset(features)
    if world_size > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=False)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
    loader = DataLoader(dataset, sampler=sampler, batch_size=micro_batch)
    total_steps = total_optimizer_steps(args, len(loader))

    raw_model = model
    optimizer = build_adamw(raw_model, lr=args.learning_rate, weight_decay=WEIGHT_DECAY)
    scheduler = LinearWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=total_steps)
    grad_scaler = training.make_grad_scaler(device, enabled=args.fp16, init_scale=args.loss_scale or 2.0**16,
                                            static=args.loss_scale > 0)
    model = training.wrap_distributed(model, device)
    model.train()

    meter = training.ThroughputMeter(device, warmup_steps=min(4, total_steps // 2))
    start = time.perf_counter()
    global_step = epoch = samples = 0
    bad_steps = training.BadStepBound(args.max_bad_steps)
    loss_sum = torch.zeros((), device=device)
    micro_step = 0
    while global_step < total_steps:
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        for input_ids, input_mask, segment_ids, label_ids in loader:
            batch = [t.to(device, non_blocking=True) for t in (input_ids, input_mask, segment_ids, label_ids)]
            sync = (micro_step + 1) % accumulation == 0
            with training.grad_sync(model, sync):
                with autocast(device, dtype):
                    logits = model(batch[0], batch[2], batch[1])
                loss = task_loss(task, logits, batch[3])
                grad_scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach() / accumulation
            micro_step += 1
            samples += input_ids.size(0)
            if not sync:
                continue
            finite = training.gradients_finite(optimizer, grad_scaler, loss_sum, max_grad_norm=args.max_grad_norm)
            (bad,) = training.any_rank(~finite, device=device)
            training.apply_optimizer_step(optimizer, grad_scaler, scheduler, ok=not bad)
            meter.update(args.train_batch_size * world_size)
            step_loss = loss_sum.item()
            loss_sum.zero_()
            bad_steps.record(bad, global_step,
                             lambda: "lower --learning_rate, use --bf16 or fp32, or raise --max_bad_steps")
            if bad:
                continue
            global_step += 1
            metrics.log((epoch, global_step), {"step_loss": step_loss, "learning_rate": optimizer.param_groups[0]["lr"]})
            if global_step >= total_steps:
                break
        epoch += 1
    train_time = time.perf_counter() - start
    return {
        "global_step": global_step,
        "train:loss": step_loss,
        "train:latency": train_time,
        "train:num_samples_per_gpu": samples,
        "train:num_steps": global_step,
        "train:throughput": meter.sequences_per_second(),
        "train:skipped_steps": bad_steps.skipped,
        "e2e_train_time": train_time,
        "training_sequences_per_second": meter.sequences_per_second(),
    }


# ============================================================================ evaluation


@torch.no_grad()
def run_inference(task: GlueTask, model: torch.nn.Module, features: Features, batch_size: int,
                  device: torch.device, dtype: torch.dtype | None) -> tuple[np.ndarray, float, list[float]]:
    """Logits of every example (in order), the mean loss where labels exist, per-batch latencies (ms)."""
    model.eval()
    dataset = tensor_dataset(features)
    loader = DataLoader(dataset, sampler=SequentialSampler(dataset), batch_size=batch_size)
    outputs, latencies = [], []
    loss_total, loss_count = 0.0, 0
    for input_ids, input_mask, segment_ids, label_ids in loader:
        input_ids, input_mask, segment_ids = (t.to(device) for t in (input_ids, input_mask, segment_ids))
        tick = time.perf_counter()
        with autocast(device, dtype):
            logits = model(input_ids, segment_ids, input_mask)
        logits = logits.float().cpu()
        latencies.append((time.perf_counter() - tick) * 1000.0)
        labeled = ~torch.isnan(label_ids) if task.is_regression else label_ids >= 0
        if labeled.any():
            count = int(labeled.sum())
            loss_total += task_loss(task, logits[labeled], label_ids[labeled]).item() * count
            loss_count += count
        outputs.append(logits)
    logits = torch.cat(outputs).numpy()
    return logits, (loss_total / loss_count if loss_count else math.nan), latencies


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
             split_examples: dict[str, list[InputExample]], device: torch.device) -> dict[str, Any]:
    """Score every dev split of the task (MNLI: matched, then mismatched with the "mm:" prefix)."""
    results: dict[str, Any] = {}
    dtype = precision_dtype(args.fp16, args.bf16)
    for split in task.dev:
        examples = split_examples[split.name]
        features = load_features(task, examples, tokenizer, args.max_seq_length)
        logits, loss, latencies = run_inference(task, model, features, args.eval_batch_size, device, dtype)
        preds = predictions_from_logits(task, logits)
        metric_task = "mnli-mm" if split.metric_prefix == "mm:" else task.name
        prefix = split.metric_prefix
        results.update({prefix + k: v for k, v in compute_metrics(metric_task, preds, features.label_ids).items()})
        results[prefix + "eval:loss"] = loss
        results[prefix + "eval:num_samples_per_gpu"] = len(examples)
        results[prefix + "eval:num_steps"] = len(latencies)
        if not prefix:
            results.update(latency_summary(latencies, len(examples)))
    return results


def predict(args: argparse.Namespace, task: GlueTask, model: torch.nn.Module, tokenizer: BertTokenizer,
            split_examples: dict[str, list[InputExample]], device: torch.device) -> dict[str, str]:
    """Label every test split read (AX only when present) and write the GLUE server's files;
    returns guid -> label (predictions.json)."""
    dtype = precision_dtype(args.fp16, args.bf16)
    predictions: dict[str, str] = {}
    for split in task.test:
        if split.name not in split_examples:
            continue
        examples = split_examples[split.name]
        features = load_features(task, examples, tokenizer, args.max_seq_length)
        logits, _, _ = run_inference(task, model, features, args.eval_batch_size, device, dtype)
        labels = [format_prediction(task, split, p) for p in predictions_from_logits(task, logits)]
        atomic_write_text(Path(args.output_dir) / split.server_file,
                          submission_text([ex.index for ex in examples], labels))
        predictions.update({ex.guid: label for ex, label in zip(examples, labels)})
    return predictions


# ============================================================================ main


def run(args: argparse.Namespace, lock: training.OutputDirLock) -> dict[str, Any]:
    validate_arguments(args)
    device = init_distributed(args.local_rank, no_cuda=args.no_cuda, timeout_s=args.dist_timeout)
    rank = get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    seed_everything(args.seed + rank)
    task = get_task(args.task_name)
    config = load_model_config(args)
    tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
    check_casing(tokenizer, args)
    model = build_model(config, task.num_labels, args.init_checkpoint, allow_new_head=args.do_train).to(device)
    # Every file of the run is read and checked before the first step: a bad dev or test row
    # must not surface after the fine-tuning time is spent.
    examples = read_run_examples(task, args.data_dir, args.do_train, args.do_eval, args.do_predict)
    train_features = None
    if args.do_train:
        train_features = load_features(task, examples["train"], tokenizer, args.max_seq_length)

    output_dir = Path(args.output_dir)
    lock.acquire(exclusive=is_main_process())
    metrics = MetricLogger(args.json_summary or output_dir / "dllogger.json")
    metrics.log("PARAMETER", {"Config": json.dumps(vars(args), sort_keys=True, default=str), "SEED": args.seed,
                              "world_size": get_world_size(), "attention_mask_type": config.attention_mask_type})
    results: dict[str, Any] = {"task": task.name, "attention_mask_type": config.attention_mask_type,
                               "mask_sparsity": mask_sparsity(model)}
    if args.do_train:
        results.update(train(args, task, model, train_features, device, metrics))
        if is_main_process() and not args.skip_checkpoint:
            save_fine_tuned(model, config, output_dir)
    # Evaluation and prediction run on rank 0, as NVIDIA's script does. The others finish now and
    # torchrun waits for rank 0: a barrier would fail them once scoring outlasts --dist_timeout.
    if is_main_process():
        if args.do_eval:
            eval_start = time.perf_counter()
            results.update(evaluate(args, task, model, tokenizer, examples, device))
            results["e2e_inference_time"] = time.perf_counter() - eval_start
            results["inference_sequences_per_second"] = results.get("infer:throughput(samples/s):avg", 0.0)
        if args.do_predict:
            predictions = predict(args, task, model, tokenizer, examples, device)
            atomic_write_text(output_dir / "predictions.json", json.dumps(predictions, indent=1) + "\n")
        atomic_write_text(output_dir / "results.txt", json.dumps(results, indent=2, sort_keys=True) + "\n")
        summary = {k: results[k] for k in ("e2e_train_time", "training_sequences_per_second",
                                            "e2e_inference_time", "inference_sequences_per_second") if k in results}
        if "acc" in results:
            summary["exact_match"] = results["acc"]
        if "f1" in results:
            summary["F1"] = results["f1"]
        metrics.log((), {**summary, **{k: v for k, v in results.items() if isinstance(v, float)}})
    metrics.close()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return training.run_script_in(args.output_dir, "run_glue.py", lambda lock: run(args, lock))


if __name__ == "__main__":
    sys.exit(main())
