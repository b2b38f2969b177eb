"""BERT pretraining (MLM + NSP) with SparseBERT's attention-mask search.

NVIDIA's HDF5-era command line and checkpoint layout, with LAMB, fp16 / bf16 autocast, DDP with
gradient sync only after accumulation, exact resume (data position, RNG, DAM noise included),
SIGTERM-safe stops and a bound on consecutive non-finite steps. The loss is
MLM + NSP + model.mask_penalty() (λ·ΣM of the sampled DAM mask, 0 for other masks).

    torchrun --nproc_per_node 8 run_pretraining.py --do_train --input_dir shards/ \
        --config_file bert_config.json --output_dir results/checkpoints --attention_mask_type dam_s --lamb 1e-3
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

import attention_masks
import pretraining_data
import training
import modeling
from modeling import BertConfig, BertForPreTraining
from optimization import build_lamb
from schedulers import PolyWarmUpScheduler
from utils import (MetricLogger, add_local_rank_argument, all_gather_object, all_reduce_mean, autocast, finite_float,
                   get_rank, get_world_size, init_distributed, is_main_process, precision_dtype, seed_everything)

logger = logging.getLogger("run_pretraining")


# ============================================================================ arguments


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # -- NVIDIA's flags (SparseBERT's defaults where the fork changed them)
    p.add_argument("--input_dir", required=True, help="folder of .hdf5 pretraining shards")
    p.add_argument("--config_file", required=True, help="bert_config.json (model + attention-mask fields)")
    p.add_argument("--bert_model", default="bert-large-uncased", help="informational, as in NVIDIA's script")
    p.add_argument("--output_dir", required=True, help="where ckpt_<step>.pt and the mask file go")
    p.add_argument("--vocab_file", default=None, help="WordPiece vocab; checked against the config's vocab_size")
    p.add_argument("--init_checkpoint", default=None,
                   help="warm-start weights (NVIDIA ckpt, state dict, HF folder); mask logits start fresh, "
                        "except under --phase2 (the phase-1 checkpoint: its mask search continues)")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--max_predictions_per_seq", type=int, default=20)
    p.add_argument("--train_batch_size", type=int, default=32,
                   help="sequences per GPU per optimizer step (after accumulation)")
    p.add_argument("--learning_rate", type=finite_float, default=5e-5)
    p.add_argument("--mask_learning_rate", type=finite_float, default=None,
                   help="peak learning rate of the DAM mask logits, same schedule (default: --learning_rate, "
                        "as the released code); warm-started searches want it far higher, e.g. 0.05")
    p.add_argument("--num_train_epochs", type=finite_float, default=3.0, help="unused: the run is driven by steps")
    p.add_argument("--max_steps", type=finite_float, default=1000, help="optimizer steps of this phase")
    p.add_argument("--warmup_proportion", type=finite_float, default=0.01, help="warm-up fraction of max_steps")
    add_local_rank_argument(p)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--fp16", action="store_true", help="fp16 autocast + dynamic loss scaling")
    p.add_argument("--amp", action="store_true", help="same as --fp16")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (no loss scaling)")
    p.add_argument("--loss_scale", type=finite_float, default=0.0, help="0 = dynamic; > 0 = this scale, never grown")
    p.add_argument("--init_loss_scale", type=finite_float, default=2.0**20)
    p.add_argument("--log_freq", type=finite_float, default=1.0, help="log every N optimizer steps")
    p.add_argument("--checkpoint_activations", action="store_true")
    p.add_argument("--resume_from_checkpoint", action="store_true")
    p.add_argument("--resume_step", type=int, default=-1, help="-1 = newest ckpt in output_dir")
    p.add_argument("--num_steps_per_checkpoint", type=int, default=100)
    p.add_argument("--skip_checkpoint", action="store_true")
    p.add_argument("--phase2", action="store_true")
    p.add_argument("--allreduce_post_accumulation", action="store_true",
                   help="all-reduce gradients once per optimizer step (DDP no_sync on accumulation steps)")
    p.add_argument("--allreduce_post_accumulation_fp16", action="store_true",
                   help="all-reduce gradients in fp16 (bf16 under --bf16)")
    p.add_argument("--phase1_end_step", type=int, default=7038)
    p.add_argument("--do_train", action="store_true")
    p.add_argument("--json-summary", dest="json_summary", default=None,
                   help="dllogger JSON-lines file (default: <output_dir>/dllogger.json, so runs never share one)")
    p.add_argument("--use_env", action="store_true", help="accepted; LOCAL_RANK is always read from the environment")
    p.add_argument("--disable_progress_bar", action="store_true")
    p.add_argument("--steps_this_run", type=int, default=-1,
                   help="stop once the phase's step, resumed steps included, reaches this (NVIDIA's meaning)")
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers per rank")
    # -- SparseBERT and this project
    p.add_argument("--lamb", type=finite_float, default=None, help="λ of the mask penalty (overrides dam_lambda)")
    p.add_argument("--attention_mask_type", default=None,
                   help="override the config: dense | a pattern | dam_u | dam_s | file")
    p.add_argument("--export_mask", action="store_true", help="also write the binarised mask at every checkpoint")
    p.add_argument("--max_bad_steps", type=int, default=25,
                   help="stop after this many consecutive non-finite (skipped) optimizer steps")
    p.add_argument("--dist_timeout", type=finite_float, default=1800,
                   help="seconds a collective waits for the other ranks before this one stops with an error "
                        "(a dead or stuck worker turns into an exit, not a hang)")
    p.add_argument("--no_cuda", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model and the loss (static shapes)")
    p.add_argument("--check_only", action="store_true",
                   help="check the flags, config and shard headers, then exit without training or writing "
                        "anything (run_pretraining.sh checks phase 2 this way before phase 1 starts)")
    args = p.parse_args(argv)
    args.fp16 = args.fp16 or args.amp
    args.max_steps = int(args.max_steps)
    return args


def validate_arguments(args: argparse.Namespace) -> None:
    """Every mistake a user can make on the command line, caught before anything is written."""
    if not args.do_train:
        raise ValueError("nothing to do: pass --do_train")
    if args.fp16 and args.bf16:
        raise ValueError("--fp16/--amp and --bf16 are mutually exclusive: pick one")
    if args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    if args.train_batch_size < 1 or args.train_batch_size % args.gradient_accumulation_steps:
        raise ValueError(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must divide --train_batch_size "
            f"{args.train_batch_size} (the per-GPU batch after accumulation)")
    if args.max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1, got {args.max_steps}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise ValueError(f"--warmup_proportion is a fraction of --max_steps in [0, 1), got {args.warmup_proportion}")
    if args.log_freq <= 0 or args.num_steps_per_checkpoint < 1 or args.max_bad_steps < 1:
        raise ValueError("--log_freq, --num_steps_per_checkpoint and --max_bad_steps must be positive")
    if args.steps_this_run == 0 or args.steps_this_run < -1:
        raise ValueError(f"--steps_this_run must be -1 (all of --max_steps) or >= 1, got {args.steps_this_run}")
    if not args.dist_timeout > 0:
        raise ValueError(f"--dist_timeout must be a positive number of seconds, got {args.dist_timeout}")
    if not args.init_loss_scale > 0:
        raise ValueError(f"--init_loss_scale must be > 0 (the first fp16 loss scale), got {args.init_loss_scale}")
    if not args.loss_scale >= 0:
        raise ValueError(f"--loss_scale must be 0 (dynamic) or > 0 (a static scale), got {args.loss_scale}")
    if args.mask_learning_rate is not None and not args.mask_learning_rate > 0:
        raise ValueError(f"--mask_learning_rate must be > 0, got {args.mask_learning_rate}")
    if args.lamb is not None and args.lamb < 0:
        raise ValueError(f"--lamb (λ of the mask penalty) must be >= 0, got {args.lamb}")
    if not Path(args.input_dir).is_dir():
        raise FileNotFoundError(f"--input_dir {args.input_dir} does not exist: point it at a folder of .hdf5 shards")


def load_model_config(args: argparse.Namespace) -> BertConfig:
    """The config with command-line overrides, checked against the sequence length and vocab."""
    config = training.load_config(args.config_file, attention_mask_type=args.attention_mask_type, dam_lambda=args.lamb)
    if args.max_seq_length > config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings} of {args.config_file}")
    if config.attention_mask_type != "dense" and config.mask_seq_length < args.max_seq_length:
        raise ValueError(
            f"attention_mask_type '{config.attention_mask_type}' has mask_seq_length {config.mask_seq_length} < "
            f"--max_seq_length {args.max_seq_length}: set mask_seq_length >= {args.max_seq_length} in {args.config_file}")
    if config.type_vocab_size < 2:  # NSP pairs: every shard's segment ids are 0 and 1
        raise ValueError(f"{args.config_file} has type_vocab_size {config.type_vocab_size}, but pretraining "
                         f"shards hold segment ids 0 and 1: set type_vocab_size to 2 (BERT's)")
    try:  # a bad pattern parameter or mask file fails here, before anything is written
        attention_masks.build_attention_mask(config)
    except ValueError as exc:
        raise ValueError(f"{args.config_file}: {exc}") from None
    if args.vocab_file:
        path = Path(args.vocab_file)
        if not path.is_file():
            raise FileNotFoundError(f"--vocab_file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            vocab_lines = sum(1 for _ in f)
        if vocab_lines > config.vocab_size:
            raise ValueError(f"--vocab_file {path} has {vocab_lines} tokens but {args.config_file} has vocab_size "
                             f"{config.vocab_size}: use the vocab the config was made for, or fix vocab_size")
    return config


def check_shards(shards: list[str], max_seq_length: int, max_pred_length: int) -> None:
    """Every shard's layout, and a sequence length matching --max_seq_length (phase 1: 128, phase 2: 512).

    Only headers are read, so a truncated or foreign shard stops the run before its first step.
    """
    for shard in shards:
        width = pretraining_data.shard_sequence_length(shard, max_pred_length)
        if width != max_seq_length:
            raise ValueError(f"shard {shard} holds sequences of length {width} but --max_seq_length is "
                             f"{max_seq_length}: pass --max_seq_length {width} or the matching --input_dir")


def check_same_shards(shards: list[str], input_dir: str) -> None:
    """Every rank must list the same shards: rank r reads file (f_id*W + r) % n of one shuffled list,
    so a node whose copy lacks a file would silently read other data than its peers."""
    names = [Path(shard).name for shard in shards]
    for rank, theirs in enumerate(all_gather_object(names)):
        if theirs != names:
            which = "other names" if len(theirs) == len(names) else len(names)
            raise ValueError(f"rank {rank} finds {len(theirs)} shards in --input_dir {input_dir} but rank "
                             f"{get_rank()} finds {which}: give every node the same copy of the shards")


# ============================================================================ pieces of a step


def pretraining_loss(prediction_scores: torch.Tensor, seq_relationship_score: torch.Tensor,
                     masked_lm_labels: torch.Tensor, next_sentence_labels: torch.Tensor,
                     max_predictions: int | None = None) -> torch.Tensor:
    """MLM cross-entropy over the masked rows plus NSP cross-entropy, in fp32 (NVIDIA's criterion).

    ``prediction_scores`` holds the rows of `modeling.masked_lm_rows(masked_lm_labels, max_predictions)`."""
    labels = masked_lm_labels.reshape(-1)[modeling.masked_lm_rows(masked_lm_labels, max_predictions)]
    mlm = F.cross_entropy(prediction_scores.float(), labels, ignore_index=-1)
    nsp = F.cross_entropy(seq_relationship_score.float(), next_sentence_labels.view(-1))
    return mlm + nsp


def compile_for_training(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """What --compile does: `torch.compile` the model in place and return the compiled
    `pretraining_loss`. With --max_predictions_per_seq every shape in the step is static, so the
    heads and the fp32 cross-entropy fuse as well as the body. Under DDP, pass the DDP module:
    compiling the wrapper lets dynamo split the graph at gradient buckets, so all-reduces overlap
    the backward (a compiled inner module would hand DDP every gradient at once, at the end).
    State-dict names are unchanged (in-place compile adds no prefix)."""
    model.compile()
    return torch.compile(pretraining_loss)


def mask_module(model: torch.nn.Module) -> attention_masks.AttentionMask | None:
    return training.unwrap_model(model).bert.sparse_mask


def deterministic_sparsity(model: torch.nn.Module) -> float:
    """Sparsity of the mask used at evaluation (1[σ(a) > 0.5] for DAM), 0 for dense attention."""
    module = mask_module(model)
    return attention_masks.sparsity(module.binarize()) if module is not None else 0.0


def write_mask(model: torch.nn.Module, path: Path, step: int, print_table: bool) -> None:
    module = mask_module(model)
    if module is None or not is_main_process():
        return
    attention_masks.export_mask(module, path, step=step)
    if print_table:
        print(f"attention-mask sparsity (%) at step {step}, written to {path}:\n"
              f"{attention_masks.sparsity_report(module.full_mask())}", flush=True)


# ============================================================================ set-up


def build_model(args: argparse.Namespace, config, device: torch.device) -> BertForPreTraining:
    model = BertForPreTraining(config)
    if args.checkpoint_activations:
        model.set_checkpoint_activations(True)
    return model.to(device)


def warm_start(model: BertForPreTraining, path: str, keep_mask: bool = False) -> None:
    """Weights from another BERT checkpoint; the attention mask keeps its fresh initialisation
    unless ``keep_mask`` (phase 2 started from the phase-1 checkpoint continues its mask search)."""
    state, _ = modeling.read_warm_start(path, model)
    if not keep_mask:
        state = {k: v for k, v in state.items() if "sparse_mask" not in k}
    report = model.load_converted_state_dict(state, source=str(path))
    logger.info("warm start from %s (missing %d keys, unexpected %d)", path,
                len(report.missing_keys), len(report.unexpected_keys))


def resume_state(args: argparse.Namespace, config: BertConfig) -> tuple[int, Path, dict[str, Any]] | None:
    """The checkpoint to resume from, or None for a fresh start; refuses to overwrite a run, or to
    continue one written under another model or mask (`check_resume_config`)."""
    existing = training.list_checkpoints(args.output_dir)
    if not args.resume_from_checkpoint:
        if existing:
            raise ValueError(f"{args.output_dir} already holds checkpoints ({existing[-1][1].name}); pass "
                             f"--resume_from_checkpoint to continue that run, or use another --output_dir")
        return None
    found = training.find_latest_checkpoint(args.output_dir, args.resume_step)
    if found is None and existing:  # never restart from scratch over checkpoints that exist
        raise ValueError(f"--resume_from_checkpoint: no checkpoint in {args.output_dir} loads "
                         f"({', '.join(p.name for _, p in existing)}; reasons logged above): restore a good "
                         f"ckpt_<step>.pt there, or move them away to start fresh")
    if found is None and args.phase2 and not args.init_checkpoint:
        raise FileNotFoundError(f"--phase2 needs a phase-1 checkpoint in {args.output_dir} (or --init_checkpoint)")
    if found is not None:
        check_resume_config(config, found[1], found[2])
    return found


def check_resume_config(config: BertConfig, path: Path, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint whose recorded config (command-line overrides included) differs from this
    run's on a field that decides what its weights or mask logits mean (`modeling.weight_meaning`).

    Every other field may change on resume, because it changes how training goes on, not what the
    saved tensors are: dam_lambda and the temperatures (the search's schedule), dropout, init
    scales (only fresh tensors use them), dam_penalty_gradient and attention_backend (how gradients
    and kernels run). A checkpoint without a recorded config (NVIDIA's) is checked by keys and
    shapes alone, when the model loads it strictly.
    """
    recorded = modeling.recorded_config(checkpoint, str(path))
    if recorded is None:
        return
    differing = attention_masks.differing_fields(modeling.weight_meaning(recorded), modeling.weight_meaning(config),
                                                 "checkpoint")
    if differing:
        raise ValueError(f"{path} was written by another model or mask than this run's config and flags "
                         f"({', '.join(differing)}): resume with the same --config_file and mask flags "
                         f"(--attention_mask_type, ...) as that run, or use another --output_dir")


def phase_step(args: argparse.Namespace, resume_step: int, checkpoint: dict[str, Any]) -> tuple[int, bool]:
    """(step within this phase, continue-in-phase?) for a checkpoint, as NVIDIA's phase-2 rules.

    A phase-1 checkpoint loaded with --phase2 starts phase 2 at step 0 (schedule and optimizer
    step reset, moments kept); a phase-2 checkpoint continues phase 2.
    """
    check_checkpoint_numbering(args, resume_step, checkpoint)
    saved_phase2 = checkpoint.get("phase2")
    if not args.phase2:
        return int(checkpoint.get("global_step", resume_step)), True
    if saved_phase2 is None:  # a foreign checkpoint: NVIDIA's arithmetic
        step = max(resume_step - args.phase1_end_step, 0)
        return step, step > 0
    if saved_phase2:
        return int(checkpoint["global_step"]), True
    return 0, False


def check_checkpoint_numbering(args: argparse.Namespace, resume_step: int, checkpoint: dict[str, Any]) -> None:
    """Refuse flags under which this run's ckpt_<n> would overwrite the earlier phase's files or sort
    below them (keep-last-3 would prune the new ones and a resume would pick the old phase)."""
    saved_phase2 = checkpoint.get("phase2")
    if saved_phase2:
        offset = resume_step - int(checkpoint["global_step"])
        if not args.phase2:
            raise ValueError(f"ckpt_{resume_step}.pt is a phase-2 checkpoint: resume it with --phase2 "
                             f"--phase1_end_step {offset}")
        if offset != args.phase1_end_step:
            raise ValueError(f"ckpt_{resume_step}.pt was numbered with --phase1_end_step {offset}, this run has "
                             f"{args.phase1_end_step}: pass --phase1_end_step {offset}")
    elif saved_phase2 is not None and args.phase2 and resume_step > args.phase1_end_step:
        raise ValueError(f"phase-1 checkpoint ckpt_{resume_step}.pt is past --phase1_end_step "
                         f"{args.phase1_end_step}: pass --phase1_end_step {resume_step} (phase 1's last step)")


def restore_grad_scaler(args: argparse.Namespace, grad_scaler: torch.amp.GradScaler,
                        saved: dict[str, Any] | None) -> None:
    """The saved fp16 loss scale, unless this run set its own.

    An fp32 / bf16 run saved a disabled scaler ({}): --fp16 then starts at --init_loss_scale. A
    --loss_scale given on resume (e.g. to escape a collapsing dynamic scale) is used as given.
    """
    if not args.fp16 or not saved:
        return
    if args.loss_scale > 0:
        logger.info("--loss_scale %g replaces the checkpoint's loss scale %g", args.loss_scale, saved.get("scale"))
        return
    grad_scaler.load_state_dict(saved)


def last_good_checkpoint(output_dir: str) -> str:
    """Names the newest checkpoint in `output_dir` whose weights are all finite: a run whose every
    step is non-finite may have started from (or saved) weights that are already NaN."""
    for _, path in reversed(training.list_checkpoints(output_dir)):
        try:
            model = training.load_checkpoint(path)["model"]
        except (ValueError, OSError):
            continue
        if all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point()):
            return f"the last good checkpoint {path.name} is intact"
    return f"no checkpoint in {output_dir} is known good (none holds finite weights)"


def checkpoint_name_step(args: argparse.Namespace, global_step: int) -> int:
    """Phase-2 checkpoints continue phase 1's numbering (ckpt_<phase1_end_step + k>.pt)."""
    return global_step + (args.phase1_end_step if args.phase2 else 0)


# ============================================================================ training


def checked_inputs(args: argparse.Namespace) -> tuple[BertConfig, list[str]]:
    """The run's config and shards, checked (shard headers only) before anything is built."""
    config = load_model_config(args)
    shards = pretraining_data.list_shards(args.input_dir)
    check_shards(shards, args.max_seq_length, args.max_predictions_per_seq)
    return config, shards


def train(args: argparse.Namespace, lock: training.OutputDirLock) -> dict[str, Any]:
    validate_arguments(args)
    if args.check_only:
        checked_inputs(args)
        print(f"run_pretraining.py: {args.input_dir} and {args.config_file} pass the checks", flush=True)
        return {}
    device = init_distributed(args.local_rank, no_cuda=args.no_cuda, timeout_s=args.dist_timeout)
    rank, world_size = get_rank(), get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    seed_everything(args.seed + rank)
    config, shards = checked_inputs(args)
    check_same_shards(shards, args.input_dir)
    found = resume_state(args, config)
    model = build_model(args, config, device)
    # Weights load before anything is written: a checkpoint that does not fit leaves no trace.
    if found is not None:
        model.load_converted_state_dict(found[2]["model"], source=str(found[1]), strict=True)
    elif args.init_checkpoint:
        warm_start(model, args.init_checkpoint, keep_mask=args.phase2)
    lock.acquire(exclusive=is_main_process())
    if is_main_process():
        training.remove_stale_temp_files(args.output_dir)

    dtype = precision_dtype(args.fp16, args.bf16)
    micro_batch = args.train_batch_size // args.gradient_accumulation_steps
    accumulation = args.gradient_accumulation_steps

    optimizer = build_lamb(model, lr=args.learning_rate, mask_lr=args.mask_learning_rate)
    scheduler = PolyWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=args.max_steps)
    grad_scaler = training.make_grad_scaler(device, enabled=args.fp16,
                                            init_scale=args.loss_scale or args.init_loss_scale,
                                            static=args.loss_scale > 0)
    batches = pretraining_data.PretrainingBatches(
        shards, batch_size=micro_batch, max_pred_length=args.max_predictions_per_seq, seed=args.seed,
        rank=rank, world_size=world_size, vocab_size=config.vocab_size)

    global_step, rng_states = 0, None
    if found is not None:
        resume_step, path, checkpoint = found
        global_step, continuing = phase_step(args, resume_step, checkpoint)
        if "optimizer" in checkpoint and training.load_optimizer_state(optimizer, checkpoint["optimizer"]):
            if not continuing:  # a fresh phase: new schedule, bias correction restarts
                for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                    group["step"] = 0
                    group["lr"] = base_lr
        if continuing:
            restore_grad_scaler(args, grad_scaler, checkpoint.get("grad_scaler"))
            if "data" in checkpoint:
                batches.load_state_dict(checkpoint["data"])
            rng_states = checkpoint.get("rng")
        logger.info("resumed from %s: phase step %d (%s)", path, global_step,
                    "continuing" if continuing else "new phase: schedule reset")
        del checkpoint

    raw_model = model
    compress = dtype if args.allreduce_post_accumulation_fp16 and dtype is not None else None
    model = training.wrap_distributed(model, device, compress_dtype=compress)
    loss_fn = compile_for_training(model) if args.compile else pretraining_loss
    sync_every_micro_step = not args.allreduce_post_accumulation
    masks = mask_module(raw_model)
    if isinstance(masks, attention_masks.DifferentiableMask):
        masks.set_progress(global_step / args.max_steps)

    target_step = min(args.max_steps, args.steps_this_run) if args.steps_this_run > 0 else args.max_steps
    if global_step >= target_step:
        logger.info("step %d already reaches --max_steps / --steps_this_run %d: nothing to train",
                    global_step, target_step)

    metrics = MetricLogger(args.json_summary or Path(args.output_dir) / "dllogger.json")
    metrics.log("PARAMETER", {"Config": json.dumps(vars(args), sort_keys=True, default=str), "SEED": args.seed,
                              "batch_size_per_gpu": micro_batch, "learning_rate": args.learning_rate,
                              "world_size": world_size, "attention_mask_type": config.attention_mask_type,
                              "dam_lambda": config.dam_lambda, "train_start": True})
    if rng_states is not None and not training.restore_rng_states(rng_states):
        logger.warning("checkpoint holds RNG states of %d ranks, this run has %d: RNG streams restart",
                       len(rng_states), world_size)

    model.train()
    start_time = time.perf_counter()
    meter = training.ThroughputMeter(device, warmup_steps=4 if not args.phase2 else 10)
    progress = tqdm(total=args.max_steps, initial=global_step, desc="pretraining", unit="step",
                    disable=not is_main_process() or args.disable_progress_bar)
    zero = torch.zeros((), device=device)
    window_loss, window_penalty, window_steps = zero.clone(), zero.clone(), 0
    last_window_loss = float("nan")
    bad_steps = training.BadStepBound(args.max_bad_steps)
    log_every = max(int(args.log_freq), 1)
    data = iter(batches)

    def save(step: int) -> None:
        state = {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "grad_scaler": grad_scaler.state_dict(),
            "data": batches.state_dict(),
            "files": [batches.file_index, *batches.epoch_files(batches.epoch)],  # NVIDIA's layout
            "epoch": batches.epoch,
            "global_step": step,
            "phase2": args.phase2,
            "rng": training.gather_rng_states(),
            "config": config.to_json_string(),
            "args": json.dumps(vars(args), default=str),
        }
        if masks is not None:
            state["mask"] = masks.full_mask()
        name_step = checkpoint_name_step(args, step)
        training.save_checkpoint(state, args.output_dir, name_step)
        if args.export_mask:
            write_mask(raw_model, Path(args.output_dir) / f"mask_{name_step}.safetensors", name_step, print_table=False)
        metrics.log("PARAMETER", {"checkpoint_step": name_step})

    with training.SigtermFlag() as sigterm:
        stop_requested = False
        while global_step < target_step and not stop_requested:
            step_loss = zero.clone()
            step_penalty = zero.clone()
            for micro_step in range(accumulation):
                _, batch = next(data)
                batch = [t.to(device, non_blocking=True) for t in batch]
                input_ids, segment_ids, input_mask, masked_lm_labels, next_sentence_labels = batch
                sync = sync_every_micro_step or micro_step == accumulation - 1
                with training.grad_sync(model, sync):
                    with autocast(device, dtype):
                        scores, nsp_scores = model(input_ids, segment_ids, input_mask, masked_lm_labels,
                                                   max_predictions=args.max_predictions_per_seq)
                        penalty = raw_model.mask_penalty()
                        loss = loss_fn(scores, nsp_scores, masked_lm_labels, next_sentence_labels,
                                       args.max_predictions_per_seq) + penalty
                    grad_scaler.scale(loss / accumulation).backward()
                step_loss += loss.detach()
                step_penalty += penalty.detach()
            step_loss /= accumulation
            step_penalty /= accumulation

            finite = training.gradients_finite(optimizer, grad_scaler, step_loss)
            bad, stop_requested = training.any_rank(~finite, sigterm.requested, device=device)
            training.apply_optimizer_step(optimizer, grad_scaler, scheduler, ok=not bad)
            meter.update(args.train_batch_size * world_size)
            if bad and args.fp16:
                metrics.log("PARAMETER", {"loss_scale": grad_scaler.get_scale()})
            bad_steps.record(bad, global_step, lambda: (
                f"stopping; {last_good_checkpoint(args.output_dir)}. "
                f"Lower --learning_rate, use --bf16 or fp32, check the data, or raise --max_bad_steps"))
            if not bad:
                global_step += 1
                progress.update(1)
                if isinstance(masks, attention_masks.DifferentiableMask):
                    masks.set_progress(global_step / args.max_steps)
                window_loss += step_loss
                window_penalty += step_penalty
                window_steps += 1

            if window_steps and (global_step % log_every == 0 or global_step == target_step or stop_requested):
                # Means over every rank (one small all-reduce per log line, not per step).
                average, last_step, penalty_mean = all_reduce_mean(
                    torch.stack([window_loss / window_steps, step_loss, window_penalty / window_steps])).tolist()
                last_window_loss = average
                metrics.log((batches.epoch, global_step), {
                    "average_loss": average,
                    "step_loss": last_step,
                    "learning_rate": optimizer.param_groups[0]["lr"],
                    "mask_learning_rate": optimizer.param_groups[-1]["lr"],
                    "mask_penalty": penalty_mean,
                    "mask_sparsity": deterministic_sparsity(raw_model),
                    "skipped_steps": bad_steps.skipped,
                })
                progress.set_postfix(loss=f"{average:.4f}")
                window_loss, window_penalty, window_steps = zero.clone(), zero.clone(), 0

            if global_step == target_step or stop_requested:
                meter.stop()  # the last checkpoint is not training time (NVIDIA stops its clock here too)
            due = not bad and (global_step % args.num_steps_per_checkpoint == 0 or global_step == target_step)
            if not args.skip_checkpoint and (due or stop_requested):
                save(global_step)
    progress.close()

    final_loss = last_window_loss  # already the mean over ranks
    e2e = time.perf_counter() - start_time
    results = {"e2e_train_time": e2e, "training_sequences_per_second": meter.sequences_per_second(),
               "final_loss": final_loss, "raw_train_time": meter.elapsed(), "global_step": global_step,
               "skipped_steps": bad_steps.skipped, "stopped_by_sigterm": stop_requested}
    metrics.log((batches.epoch, global_step), {"final_loss": final_loss})
    metrics.log((), {k: results[k] for k in ("e2e_train_time", "training_sequences_per_second",
                                             "final_loss", "raw_train_time")})
    metrics.close()
    batches.close()
    if masks is not None:
        write_mask(raw_model, Path(args.output_dir) / "attention_mask.safetensors",
                   checkpoint_name_step(args, global_step), print_table=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return training.run_script_in(args.output_dir, "run_pretraining.py", lambda lock: train(args, lock))


if __name__ == "__main__":
    sys.exit(main())
