"""BERT pretraining (MLM + NSP) with SparseBERT's attention-mask search.

NVIDIA's HDF5-era command line and checkpoint layout, with LAMB, fp16 / bf16 autocast, DDP with
gradient sync only after accumulation, exact resume (data position, RNG, DAM noise included),
SIGTERM-safe stops and a bound on consecutive non-finite steps. The loss is the model's own:
MLM + NSP + its mask penalty (λ·ΣM of the sampled DAM mask, or a target search's Lagrangian on its
expected sparsity; 0 for other masks), each term logged by name.

    torchrun --nproc_per_node 8 run_pretraining.py --do_train --input_dir shards/ \
        --config_file bert_config.json --output_dir results/checkpoints --attention_mask_type dam_s --lamb 1e-3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import attention_masks
import checkpoints
import launch
import modeling
import pretraining_data
import training
from atomic_io import atomic_write_text
from modeling import BertConfig, BertForPreTraining
from optimization import build_lamb
from schedulers import PolyWarmUpScheduler
from utils import MetricLogger, all_gather_object, finite_float, get_rank, is_main_process

logger = logging.getLogger("run_pretraining")

# A target-sparsity search's mask logits, unless --mask_learning_rate says otherwise: the rate at
# which 300 warm-started steps settle the gates (docs/search.md, "Target sparsity").
TARGET_SEARCH_MASK_LR = 0.1


# ============================================================================ arguments


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = launch.ScriptParser("run_pretraining.py", __doc__.split("\n\n")[0])
    launch.add_shared_arguments(p)
    p.add_argument("--input_dir", required=True, help="folder of .hdf5 pretraining shards")
    p.add_argument("--vocab_file", default=None, help="WordPiece vocab; checked against the config's vocab_size")
    p.add_argument("--do_train", action="store_true", help="train (required, as in NVIDIA's script)")
    p.add_argument("--max_predictions_per_seq", type=int, default=20, help="masked tokens per sequence in the shards")
    p.add_argument("--max_steps", type=finite_float, default=1000, help="optimizer steps of this phase")
    p.add_argument("--steps_this_run", type=int, default=-1,
                   help="stop once the phase's step, resumed steps included, reaches this (NVIDIA's meaning)")
    p.add_argument("--mask_learning_rate", type=finite_float, default=None,
                   help="peak learning rate of the DAM mask logits (default: --learning_rate under the same "
                        f"schedule, as the released code; a target search: {TARGET_SEARCH_MASK_LR}, held after "
                        "warm-up); warm-started λ searches want it far higher, e.g. 0.05")
    p.add_argument("--lamb", "--dam_lambda", dest="lamb", type=finite_float, default=None,
                   help="λ of the mask penalty (overrides dam_lambda; unused by a target search)")
    p.add_argument("--target_sparsity", type=finite_float, default=None,
                   help="search the mask to this sparsity, e.g. 0.9 (overrides dam_target_sparsity): the λ penalty is "
                        "replaced by a constraint holding the expected sparsity at the target (ramped up over "
                        "dam_target_warmup), and the mask is binarised at the target; docs/search.md")
    p.add_argument("--init_loss_scale", type=finite_float, default=2.0**20, help="first dynamic fp16 loss scale")
    p.add_argument("--log_freq", type=finite_float, default=1.0, help="log every N optimizer steps")
    p.add_argument("--checkpoint_activations", action="store_true", help="recompute activations in the backward")
    p.add_argument("--resume_from_checkpoint", action="store_true", help="continue from a ckpt_<step>.pt in output_dir")
    p.add_argument("--resume_step", type=int, default=-1, help="the step to resume; -1 = the newest checkpoint")
    p.add_argument("--num_steps_per_checkpoint", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--phase2", action="store_true", help="phase 2: continue from phase 1's checkpoint")
    p.add_argument("--phase1_end_step", type=int, default=7038,
                   help="phase 1's last step: phase-2 checkpoints are numbered after it")
    p.add_argument("--allreduce_post_accumulation", action="store_true",
                   help="all-reduce gradients once per optimizer step (DDP no_sync on accumulation steps)")
    p.add_argument("--allreduce_post_accumulation_fp16", action="store_true",
                   help="all-reduce gradients in fp16 (bf16 under --bf16)")
    p.add_argument("--disable_progress_bar", action="store_true", help="no tqdm bar")
    p.add_argument("--export_mask", action="store_true", help="also write the binarised mask at every checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the model and its loss (static shapes)")
    p.add_argument("--check_only", action="store_true",
                   help="check the flags, config and shard headers, then exit without training or writing "
                        "anything (run_pretraining.sh checks phase 2 this way before phase 1 starts)")
    # --use_env: LOCAL_RANK is always read; --resume_phase2: a phase-2 checkpoint always continues
    # its phase; the MLM head always scores only the masked rows; the rest tune NVIDIA's own kernels.
    launch.add_ignored_arguments(p, valued=("--bert_model", "--num_train_epochs", "--num_workers", "--profile-start"),
                                 switches=("--use_env", "--resume_phase2", "--profile", "--no_dense_sequence_output",
                                           "--disable_jit_fusions", "--cuda_graphs"))
    launch.set_help(p, output_dir="where ckpt_<step>.pt, the mask files and dllogger.json go",
                    init_checkpoint="warm-start weights (NVIDIA ckpt, state dict, HF folder); mask logits start fresh, "
                                    "except under --phase2 (the phase-1 checkpoint: its mask search continues)")
    return launch.parse(p, argv)


def validate_arguments(args: argparse.Namespace) -> None:
    """Every mistake a user can make on the command line, caught before anything is written."""
    if not args.do_train:
        raise ValueError("nothing to do: pass --do_train")
    launch.validate_shared(args)
    if args.max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.log_freq <= 0 or args.num_steps_per_checkpoint < 1:
        raise ValueError("--log_freq and --num_steps_per_checkpoint must be positive")
    if args.steps_this_run == 0 or args.steps_this_run < -1:
        raise ValueError(f"--steps_this_run must be -1 (all of --max_steps) or >= 1, got {args.steps_this_run}")
    if not args.init_loss_scale > 0:
        raise ValueError(f"--init_loss_scale must be > 0 (the first fp16 loss scale), got {args.init_loss_scale}")
    if args.mask_learning_rate is not None and not args.mask_learning_rate > 0:
        raise ValueError(f"--mask_learning_rate must be > 0, got {args.mask_learning_rate}")
    if args.lamb is not None and args.lamb < 0:
        raise ValueError(f"--lamb (λ of the mask penalty) must be >= 0, got {args.lamb}")
    if args.target_sparsity is not None and not 0 < args.target_sparsity < 1:
        raise ValueError(f"--target_sparsity is the share of attention entries to drop, in (0, 1), "
                         f"got {args.target_sparsity}")
    if not Path(args.input_dir).is_dir():
        raise FileNotFoundError(f"--input_dir {args.input_dir} does not exist: point it at a folder of .hdf5 shards")
    if args.init_checkpoint:
        modeling.resolve_weights_file(args.init_checkpoint)  # one clear line when the path is wrong


def load_model_config(args: argparse.Namespace) -> BertConfig:
    """The config with command-line overrides, checked against the sequence length and vocab."""
    config = launch.read_config(args, dam_lambda=args.lamb, dam_target_sparsity=args.target_sparsity)
    if config.dam_target_sparsity is not None and config.attention_mask_type not in attention_masks.DAM_MODES:
        raise ValueError(f"a target sparsity ({config.dam_target_sparsity}) needs a mask search: pass "
                         f"--attention_mask_type dam_s or dam_u (or set it in {args.config_file})")
    if config.type_vocab_size < 2:  # NSP pairs: every shard's segment ids are 0 and 1
        raise ValueError(f"{args.config_file} has type_vocab_size {config.type_vocab_size}, but pretraining "
                         f"shards hold segment ids 0 and 1: set type_vocab_size to 2 (BERT's)")
    launch.check_config(config, args)
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


# ============================================================================ the model and its mask


def compile_for_training(model: torch.nn.Module) -> None:
    """What --compile does: `torch.compile` the model in place (its loss included, which fuses with
    the heads). Under DDP, pass the DDP module: compiling the wrapper lets dynamo split the graph at
    gradient buckets, so all-reduces overlap the backward. State-dict names are unchanged."""
    model.compile()


def search_mask(model: torch.nn.Module) -> attention_masks.DifferentiableMask | None:
    """The DAM mask being searched, if any (its temperature follows the run's progress)."""
    module = attention_masks.mask_module(model)
    return module if isinstance(module, attention_masks.DifferentiableMask) else None


def write_mask(model: torch.nn.Module, path: Path, step: int, print_table: bool) -> dict[str, Any] | None:
    """Export the binarised mask to `path` (main process only); returns the metadata written."""
    module = attention_masks.mask_module(model)
    if module is None or not is_main_process():
        return None
    metadata = attention_masks.export_mask(module, path, step=step)
    if print_table:
        print(f"attention-mask sparsity (%) at step {step}, written to {path}:\n"
              f"{attention_masks.sparsity_report(module.full_mask())}", flush=True)
    return metadata


def write_finding(mask: torch.Tensor, metadata: dict[str, Any], output_dir: Path) -> None:
    """Print a searched mask's finding and write it into the output folder: finding.md (the text)
    and finding.json (the numbers, per head included)."""
    finding = attention_masks.mask_finding(mask, metadata)
    text = attention_masks.finding_text(finding)
    atomic_write_text(output_dir / "finding.json", json.dumps(finding, indent=2) + "\n")
    atomic_write_text(output_dir / "finding.md", text + "\n")
    print(f"{text}\n(written to {output_dir / 'finding.md'} and finding.json)", flush=True)


# ============================================================================ set-up


def build_model(args: argparse.Namespace, config: BertConfig, device: torch.device,
                found: checkpoints.Found | None) -> BertForPreTraining:
    """The model with the resumed checkpoint's weights (all of them), or warm-started from
    --init_checkpoint. Weights load before anything is written: a checkpoint that does not fit
    leaves no trace."""
    model = BertForPreTraining(config)
    model.set_checkpoint_activations(args.checkpoint_activations)
    if found is not None:
        model.load_converted_state_dict(found.state[checkpoints.MODEL], source=str(found.path), strict=True)
    elif args.init_checkpoint:
        warm_start(model, args.init_checkpoint, keep_mask=args.phase2)
    return model.to(device)


def build_optimization(args: argparse.Namespace, model: BertForPreTraining,
                       device: torch.device) -> training.Optimization:
    """LAMB (the mask logits in their own group), NVIDIA's poly warm-up, the fp16 loss scaler. A
    target search's logits keep their rate after warm-up (and default to TARGET_SEARCH_MASK_LR)."""
    target_search = model.config.dam_target_sparsity is not None
    mask_lr = args.mask_learning_rate
    if mask_lr is None and target_search:
        mask_lr = TARGET_SEARCH_MASK_LR
    optimizer = build_lamb(model, lr=args.learning_rate, mask_lr=mask_lr)
    scheduler = PolyWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=args.max_steps,
                                    held_groups=("mask_logits",) if target_search else ())
    grad_scaler = training.make_grad_scaler(device, enabled=args.fp16,
                                            init_scale=args.loss_scale or args.init_loss_scale,
                                            static=args.loss_scale > 0)
    return training.Optimization(optimizer, scheduler, grad_scaler)


def warm_start(model: BertForPreTraining, path: str, keep_mask: bool = False) -> None:
    """Weights from another BERT checkpoint; the attention mask keeps its fresh initialisation
    unless ``keep_mask`` (phase 2 started from the phase-1 checkpoint continues its mask search)."""
    state, _ = modeling.read_warm_start(path, model)
    if not keep_mask:
        state = attention_masks.without_mask_state(state)
    report = model.load_converted_state_dict(state, source=str(path))
    logger.info("warm start from %s (missing %d keys, unexpected %d)", path,
                len(report.missing_keys), len(report.unexpected_keys))


def check_warm_start(args: argparse.Namespace, config: BertConfig) -> None:
    """What `warm_start` would refuse (no encoder, fewer layers, another architecture), checked on a
    model on the meta device, which holds shapes but no memory. A run that will resume a checkpoint
    in --output_dir ignores --init_checkpoint, so it is not checked then."""
    if not args.init_checkpoint or (args.resume_from_checkpoint and checkpoints.list_checkpoints(args.output_dir)):
        return
    with torch.device("meta"):
        model = BertForPreTraining(config)
    modeling.read_warm_start(args.init_checkpoint, model)


def resume_state(args: argparse.Namespace, config: BertConfig) -> checkpoints.Found | None:
    """The checkpoint to resume from, or None for a fresh start (`checkpoints.find_resume`); refuses
    to continue a run written under another model or mask (`check_resume_config`)."""
    found = checkpoints.find_resume(args.output_dir, args.resume_from_checkpoint, args.resume_step)
    if found is None and args.resume_from_checkpoint and args.phase2 and not args.init_checkpoint:
        raise FileNotFoundError(f"--phase2 needs a phase-1 checkpoint in {args.output_dir} (or --init_checkpoint)")
    if found is not None:
        check_resume_config(config, found.path, found.state)
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
    check_resume_search(recorded, config, path)


def check_resume_search(recorded: BertConfig, config: BertConfig, path: Path) -> None:
    """Refuse to resume a target search as a λ search or the other way round: the checkpoint's search
    state (attention_masks.SEARCH_STATE_NAMES) would be lost or missing, so the resume could not be
    exact. Another target value is a change of course, like another λ, and is allowed."""
    theirs, ours = recorded.dam_target_sparsity, config.dam_target_sparsity
    if config.attention_mask_type not in attention_masks.DAM_MODES or (theirs is None) == (ours is None):
        return
    if theirs is not None:
        raise ValueError(f"{path} was written by a target-sparsity search (dam_target_sparsity={theirs}) and this "
                         f"run has none: resume with --target_sparsity {theirs}, or use another --output_dir")
    raise ValueError(f"{path} was written by a λ search (dam_target_sparsity null) and this run sets "
                     f"dam_target_sparsity={ours}: resume without --target_sparsity (and with a config whose "
                     f"dam_target_sparsity is null), or use another --output_dir")


def name_step(args: argparse.Namespace, global_step: int) -> int:
    """The N of this run's ckpt_<N>.pt at `global_step` (`checkpoints.name_step`)."""
    return checkpoints.name_step(global_step, args.phase2, args.phase1_end_step)


def save_step(p: Pretraining, args: argparse.Namespace, step: int) -> None:
    """ckpt_<n>.pt (the last three kept) and, with --export_mask, mask_<n>.safetensors beside it."""
    number = name_step(args, step)
    state = checkpoints.assemble(p.raw_model, p.optimization, p.batches, step, args.phase2, p.config.to_json_string(),
                                 vars(args), attention_masks.mask_module(p.raw_model))
    checkpoints.save_checkpoint(state, args.output_dir, number)
    if args.export_mask:
        write_mask(p.raw_model, Path(args.output_dir) / f"mask_{number}.safetensors", number, print_table=False)
    p.metrics.log("PARAMETER", {"checkpoint_step": number})


def bad_steps_advice(output_dir: str) -> str:
    """What to do once too many steps in a row were non-finite: where to go back to, the usual causes."""
    return (f"stopping; {checkpoints.last_good_checkpoint(output_dir)}. Lower --learning_rate, use --bf16 or fp32, "
            f"check the data, or raise --max_bad_steps")


# ============================================================================ training


def checked_inputs(args: argparse.Namespace) -> tuple[BertConfig, list[str]]:
    """The run's config and shards, checked (shard headers only) before anything is built."""
    config = load_model_config(args)
    shards = pretraining_data.list_shards(args.input_dir)
    check_shards(shards, args.max_seq_length, args.max_predictions_per_seq)
    return config, shards


@dataclasses.dataclass
class Pretraining:
    """A run's components, built and restored, before its first step."""

    config: BertConfig
    run: launch.Run
    raw_model: BertForPreTraining
    model: torch.nn.Module  # raw_model under DDP / torch.compile
    optimization: training.Optimization
    batches: pretraining_data.PretrainingBatches
    metrics: MetricLogger
    step: training.TrainStep  # holds the run's throughput meter and bad-step bound
    global_step: int
    rng_states: list[dict[str, Any]] | None


def set_up(args: argparse.Namespace, lock: training.OutputDirLock) -> Pretraining:
    run = launch.start(args)
    config, shards = checked_inputs(args)
    check_same_shards(shards, args.input_dir)
    found = resume_state(args, config)
    raw_model = build_model(args, config, run.device, found)
    lock.acquire(exclusive=is_main_process())
    if is_main_process():
        # Each checkpoint write a kill interrupted left a checkpoint-sized temporary: repeated
        # preemptions would otherwise fill the disk.
        checkpoints.remove_interrupted_writes(args.output_dir)
    optimization = build_optimization(args, raw_model, run.device)
    batches = pretraining_data.PretrainingBatches(
        shards, batch_size=args.train_batch_size // args.gradient_accumulation_steps,
        max_pred_length=args.max_predictions_per_seq, seed=args.seed, rank=run.rank, world_size=run.world_size,
        vocab_size=config.vocab_size)
    global_step, rng_states = checkpoints.restore(
        found, optimization, batches, phase2=args.phase2, phase1_end_step=args.phase1_end_step, fp16=args.fp16,
        loss_scale=args.loss_scale) if found else (0, None)
    model = training.wrap_distributed(raw_model, run.device,
                                      compress_dtype=run.dtype if args.allreduce_post_accumulation_fp16 else None)
    if args.compile:
        compile_for_training(model)
    metrics = launch.open_metrics(args, config, batch_size_per_gpu=batches.batch_size,
                                  learning_rate=args.learning_rate, dam_lambda=config.dam_lambda, train_start=True)
    meter = training.ThroughputMeter(run.device, warmup_steps=10 if args.phase2 else 4)
    # The shards' validated bound on masked tokens gives the MLM head a static shape: no host sync,
    # and nothing for torch.compile to recompile.
    step = training.TrainStep(model, optimization, run.device, run.dtype, training.BadStepBound(args.max_bad_steps),
                              meter, sync_every_micro_step=not args.allreduce_post_accumulation,
                              model_kwargs={"max_predictions": args.max_predictions_per_seq})
    return Pretraining(config, run, raw_model, model, optimization, batches, metrics, step, global_step, rng_states)


def language_model_loss(losses: dict[str, float]) -> float:
    """NVIDIA's logged loss: MLM + NSP, without the mask penalty (logged apart)."""
    return losses["mlm_loss"] + losses["nsp_loss"]


def log_window(p: Pretraining, window: training.LossWindow, step: int) -> dict[str, float]:
    """One dllogger line: the losses (NVIDIA's average_loss and step_loss: MLM + NSP; each named term,
    the mask penalty among them, apart), rates, mask sparsity."""
    losses = window.means()
    learning_rate, mask_learning_rate = p.optimization.learning_rates()
    line = {"average_loss": language_model_loss(losses.mean), "step_loss": language_model_loss(losses.last),
            **{name: value for name, value in losses.mean.items() if name != "loss"},
            "learning_rate": learning_rate, "mask_learning_rate": mask_learning_rate,
            "mask_sparsity": p.raw_model.mask_sparsity(), "skipped_steps": p.step.bad_steps.skipped}
    search = search_mask(p.raw_model)
    if search is not None:
        line.update(search.search_state())
    p.metrics.log((p.batches.epoch, step), line)
    return line


def finish(args: argparse.Namespace, p: Pretraining, last_log: dict[str, float], e2e_time: float,
           global_step: int, stopped: bool) -> dict[str, Any]:
    """NVIDIA's summary line (final_loss: MLM + NSP of the last log window, as a dense run's; the
    mask penalty apart), then the end-of-run mask file and, for a search, its finding."""
    results = {"e2e_train_time": e2e_time, "training_sequences_per_second": p.step.meter.sequences_per_second(),
               "final_loss": last_log["average_loss"], "final_mask_penalty": last_log["mask_penalty"],
               "raw_train_time": p.step.meter.elapsed(), "global_step": global_step,
               "skipped_steps": p.step.bad_steps.skipped, "stopped_by_sigterm": stopped}
    p.metrics.log((p.batches.epoch, global_step), {"final_loss": results["final_loss"]})
    p.metrics.log((), {k: results[k] for k in ("e2e_train_time", "training_sequences_per_second",
                                               "final_loss", "final_mask_penalty", "raw_train_time")})
    p.metrics.close()
    if attention_masks.mask_module(p.raw_model) is not None:
        metadata = write_mask(p.raw_model, Path(args.output_dir) / "attention_mask.safetensors",
                              name_step(args, global_step), print_table=True)
        search = search_mask(p.raw_model)
        if search is not None and metadata is not None:
            write_finding(search.full_mask(), metadata, Path(args.output_dir))
    return results


def train(args: argparse.Namespace, lock: training.OutputDirLock) -> dict[str, Any]:
    validate_arguments(args)
    if args.check_only:
        config, _ = checked_inputs(args)
        check_warm_start(args, config)
        checked = f" and --init_checkpoint {args.init_checkpoint}" if args.init_checkpoint else ""
        print(f"run_pretraining.py: {args.input_dir}, {args.config_file}{checked} pass the checks", flush=True)
        return {}
    p = set_up(args, lock)
    global_step, search = p.global_step, search_mask(p.raw_model)
    target_step = min(args.max_steps, args.steps_this_run) if args.steps_this_run > 0 else args.max_steps
    if global_step >= target_step:
        logger.info("step %d already reaches --max_steps / --steps_this_run %d: nothing to train",
                    global_step, target_step)
    window, last_log = training.LossWindow(), {"average_loss": math.nan, "mask_penalty": math.nan}
    progress = tqdm(total=args.max_steps, initial=global_step, desc="pretraining", unit="step",
                    disable=not is_main_process() or args.disable_progress_bar)
    if search is not None:
        search.set_progress(global_step / args.max_steps)
    checkpoints.restore_rng_states(p.rng_states)
    start_time, data, stop = time.perf_counter(), iter(p.batches), False
    p.model.train()
    with training.SigtermFlag() as sigterm:
        while global_step < target_step and not stop:
            micro_batches = [next(data)[1] for _ in range(args.gradient_accumulation_steps)]
            outcome = p.step(micro_batches, global_step, lambda: bad_steps_advice(args.output_dir),
                             lambda: sigterm.requested)
            stop = outcome.stop_requested
            if outcome.applied:
                global_step += 1
                progress.update(1)
                window.add(outcome)
                if search is not None:
                    search.set_progress(global_step / args.max_steps)
                    search.after_step()  # holds the target of the step it is now at
            elif args.fp16:
                p.metrics.log("PARAMETER", {"loss_scale": p.optimization.grad_scaler.get_scale()})
            if window.steps and (global_step % max(int(args.log_freq), 1) == 0 or global_step == target_step or stop):
                last_log = log_window(p, window, global_step)
                progress.set_postfix(loss=f"{last_log['average_loss']:.4f}")
            if global_step == target_step or stop:
                p.step.meter.stop()  # the last checkpoint is not training time (NVIDIA stops its clock here too)
            due = outcome.applied and (global_step % args.num_steps_per_checkpoint == 0 or global_step == target_step)
            if not args.skip_checkpoint and (due or stop):
                save_step(p, args, global_step)
    progress.close()
    p.batches.close()
    return finish(args, p, last_log, time.perf_counter() - start_time, global_step, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return training.run_script_in(args.output_dir, "run_pretraining.py", lambda lock: train(args, lock))


if __name__ == "__main__":
    sys.exit(main())
