"""What both entry scripts do before their first step: the flags they share, the config with its
command-line overrides, precision, logging, seeding and the distributed start."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm import tqdm

import attention_masks
import training
from modeling import CONFIG_NAMES, BertConfig
from utils import (MetricLogger, add_local_rank_argument, finite_float, get_rank, get_world_size, init_distributed,
                   precision_dtype, seed_everything)


# ============================================================================ flags


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default once, after its help: not where there is none to tell (unset, a switch),
    nor where the help already names it (a default that needs words, e.g. "default: beside the log")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or action.required or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class ScriptParser(argparse.ArgumentParser):
    """--help shows every flag's default once; a bad flag is one line naming it (and the flags it
    resembles), not the whole usage."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description, formatter_class=_DefaultsFormatter)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self.suggestions(message)} (see --help)\n")

    def suggestions(self, message: str) -> str:
        """"; did you mean --lamb / --dam_lambda?" for each unrecognized flag that resembles some of ours."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        ours = [flag for action in self._actions for flag in action.option_strings]
        hints = []
        for word in message.removeprefix("unrecognized arguments:").split():
            flag = word.split("=", 1)[0]
            close = difflib.get_close_matches(flag, ours, n=3, cutoff=0.75) if flag.startswith("-") else []
            if close:
                hints.append(f"; {flag}: did you mean {' / '.join(close)}?")
        return "".join(hints)


def add_shared_arguments(p: argparse.ArgumentParser) -> None:
    """The flags run_pretraining.py and run_glue.py both take, with the same meaning."""
    p.add_argument("--config_file", required=True,
                   help="bert_config.json (model + attention-mask fields), a Hugging Face config.json, or a model "
                        "folder holding either")
    p.add_argument("--config_overrides", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="config fields set on top of --config_file, each value read as JSON, e.g. "
                        "num_hidden_layers=2 (the checkpoint's first 2 layers) dam_share_across_layers=true; "
                        "--attention_mask_type and the other mask flags still win")
    p.add_argument("--output_dir", required=True, help="where this run's files go")
    p.add_argument("--init_checkpoint", default=None,
                   help="weights to start from: an NVIDIA / this project's checkpoint, a state dict or a "
                        "Hugging Face folder")
    p.add_argument("--max_seq_length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--train_batch_size", type=int, default=32,
                   help="sequences per GPU per optimizer step (after accumulation)")
    p.add_argument("--learning_rate", type=finite_float, default=5e-5, help="peak learning rate")
    p.add_argument("--warmup_proportion", type=finite_float, default=0.01, help="warm-up fraction of the steps")
    p.add_argument("--seed", type=int, default=42, help="random seed (each rank adds its rank)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step (must divide --train_batch_size)")
    p.add_argument("--fp16", action="store_true", help="fp16 autocast + dynamic loss scaling")
    p.add_argument("--amp", action="store_true", help="same as --fp16")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (no loss scaling)")
    p.add_argument("--loss_scale", type=finite_float, default=0.0,
                   help="fp16 loss scale: 0 = dynamic; > 0 = this scale, never grown")
    p.add_argument("--skip_checkpoint", action="store_true", help="write no checkpoint or saved model")
    p.add_argument("--no_cuda", action="store_true", help="run on the CPU even when a GPU is present")
    add_local_rank_argument(p)
    p.add_argument("--attention_mask_type", default=None, choices=attention_masks.MASK_TYPES,
                   help="override the config's attention_mask_type")
    p.add_argument("--max_bad_steps", type=int, default=25,
                   help="stop after this many consecutive non-finite (skipped) optimizer steps")
    p.add_argument("--dist_timeout", type=finite_float, default=1800,
                   help="seconds a collective waits for the other ranks before this one stops with an error "
                        "(a dead or stuck worker turns into an exit, not a hang)")
    p.add_argument("--json-summary", dest="json_summary", default=None,
                   help="dllogger JSON-lines file (default: <output_dir>/dllogger.json, so runs never share one)")
    p.add_argument("--verbose", action="store_true",
                   help="also print the PARAMETER record's Config (every flag, ~2 KB) at the start; the dllogger "
                        "file holds it either way")


def set_help(p: argparse.ArgumentParser, **helps: str) -> None:
    """A script's own wording for shared flags whose effect it shapes (keyed by flag name)."""
    for action in p._actions:
        if action.dest in helps:
            action.help = helps[action.dest]


def add_ignored_arguments(p: argparse.ArgumentParser, valued: tuple[str, ...] = (),
                          switches: tuple[str, ...] = ()) -> None:
    """NVIDIA's flags that this implementation has no use for: accepted, so their command lines
    run unchanged, and ignored (--help says so). `valued` take a value, `switches` do not."""
    group = p.add_argument_group("NVIDIA's flags, accepted and ignored")
    for flag in valued:
        group.add_argument(flag, default=None, help="ignored")
    for flag in switches:
        group.add_argument(flag, action="store_true", help="ignored")


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    args.fp16 = args.fp16 or args.amp
    args.max_steps = int(args.max_steps)
    return args


def validate_shared(args: argparse.Namespace) -> None:
    """The mistakes either script's shared flags can hold, caught before anything is read or written."""
    precision_dtype(args.fp16, args.bf16)  # refuses both at once
    if args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    if args.train_batch_size < 1 or args.train_batch_size % args.gradient_accumulation_steps:
        raise ValueError(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must divide --train_batch_size "
            f"{args.train_batch_size} (the per-GPU batch of one optimizer step)")
    if args.max_seq_length < 8:
        raise ValueError(f"--max_seq_length must be >= 8, got {args.max_seq_length}")
    if args.learning_rate < 0:
        raise ValueError(f"--learning_rate must be >= 0, got {args.learning_rate}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise ValueError(f"--warmup_proportion is a fraction of the training steps in [0, 1), got "
                         f"{args.warmup_proportion}")
    if args.max_bad_steps < 1:
        raise ValueError(f"--max_bad_steps must be >= 1, got {args.max_bad_steps}")
    if not args.dist_timeout > 0:
        raise ValueError(f"--dist_timeout must be a positive number of seconds, got {args.dist_timeout}")
    if not args.loss_scale >= 0:
        raise ValueError(f"--loss_scale must be 0 (dynamic) or > 0 (a static scale), got {args.loss_scale}")
    parse_config_overrides(args.config_overrides)  # a malformed override is refused before anything is read
    args.config_file = resolve_config_file(args.config_file)
    for flag in ("config_file", "vocab_file"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"--{flag} {value} does not exist")


# ============================================================================ config


def resolve_config_file(path: str) -> str:
    """--config_file itself, or a model folder's own config: its bert_config.json, else its (Hugging
    Face) config.json, whose extra keys are kept and ignored."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    for name in CONFIG_NAMES:
        if (folder / name).is_file():
            return str(folder / name)
    raise FileNotFoundError(f"--config_file {path} is a folder without {' or '.join(CONFIG_NAMES)}: pass the "
                            f"config file itself")


def parse_config_overrides(pairs: list[str]) -> dict[str, Any]:
    """--config_overrides FIELD=VALUE ... as {field: value}; a value that is not JSON (2, true, null,
    1e-4, "gelu") is taken as a string, so hidden_act=gelu needs no quotes."""
    known = {f.name for f in dataclasses.fields(BertConfig)} - {"extra"}
    overrides = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        if not equals or name not in known:
            raise ValueError(f"--config_overrides {pair}: expected FIELD=VALUE with FIELD a bert_config field, "
                             f"e.g. num_hidden_layers=2")
        try:
            overrides[name] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name] = text
    return overrides


def read_config(args: argparse.Namespace, **overrides: Any) -> BertConfig:
    """--config_file with --config_overrides, then --attention_mask_type and the script's own
    overrides, which win (None = keep)."""
    config = training.load_config(args.config_file)
    flags = {"attention_mask_type": args.attention_mask_type, **overrides}
    changes = {**parse_config_overrides(args.config_overrides),
               **{name: value for name, value in flags.items() if value is not None}}
    return config.replace(**changes) if changes else config


def check_config(config: BertConfig, args: argparse.Namespace) -> None:
    """The config against the sequence length and the vocab, and its mask built once, so a bad
    pattern parameter or mask file fails here, before anything is written."""
    if args.max_seq_length > config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings} of {args.config_file}")
    if config.attention_mask_type != "dense" and config.mask_seq_length < args.max_seq_length:
        raise ValueError(
            f"attention_mask_type '{config.attention_mask_type}' has mask_seq_length {config.mask_seq_length} < "
            f"--max_seq_length {args.max_seq_length}: pass --max_seq_length {config.mask_seq_length}, or set "
            f"mask_seq_length >= {args.max_seq_length} in {args.config_file} (a mask file: one made for longer inputs)")
    try:
        with torch.random.fork_rng(devices=[]):  # a DAM mask draws its logits: checking consumes no random number
            attention_masks.build_attention_mask(config)
    except ValueError as exc:
        raise ValueError(f"{args.config_file}: {exc}") from None
    if args.vocab_file:
        with open(args.vocab_file, encoding="utf-8") as f:
            vocab_lines = sum(1 for _ in f)
        if vocab_lines > config.vocab_size:
            raise ValueError(f"--vocab_file {args.vocab_file} has {vocab_lines} tokens but {args.config_file} has "
                             f"vocab_size {config.vocab_size}: use the vocab the model was made for, or fix vocab_size")


# ============================================================================ start


@dataclass
class Run:
    """Where and how this process runs."""

    device: torch.device
    rank: int
    world_size: int
    dtype: torch.dtype | None  # the autocast dtype; None = fp32


def start(args: argparse.Namespace) -> Run:
    """Join the process group (under torchrun), log from rank 0 only, seed every RNG (seed + rank)."""
    device = init_distributed(args.local_rank, no_cuda=args.no_cuda, timeout_s=args.dist_timeout)
    rank = get_rank()
    configure_logging(rank)
    seed_everything(args.seed + rank)
    return Run(device, rank, get_world_size(), precision_dtype(args.fp16, args.bf16))


class ProgressBarSafeHandler(logging.StreamHandler):
    """Writes each log line through tqdm.write: a progress bar on the same terminal is cleared first
    and redrawn after, so a line never starts where the bar's text ends."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's contract: a failing handler reports itself, never raises
            self.handleError(record)


def configure_logging(rank: int) -> None:
    """INFO from rank 0, WARNING from the others, through a progress-bar-safe handler (unless the
    process has configured logging itself)."""
    handler = ProgressBarSafeHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=[handler])


def open_metrics(args: argparse.Namespace, config: BertConfig, **parameters: Any) -> MetricLogger:
    """The run's dllogger log, opened with NVIDIA's PARAMETER record (every flag, the seed). The
    Config (every flag) goes to the file always, to stdout only with --verbose."""
    metrics = MetricLogger(args.json_summary or Path(args.output_dir) / "dllogger.json")
    metrics.log("PARAMETER", {"Config": json.dumps(vars(args), sort_keys=True, default=str)}, echo=args.verbose)
    metrics.log("PARAMETER", {"SEED": args.seed, "world_size": get_world_size(),
                              "attention_mask_type": config.attention_mask_type, **parameters})
    return metrics
