"""Checkpoints: the one place that knows their file names, what they hold, and how they are written,
pruned, found, loaded and resumed from.

A training checkpoint is `<output_dir>/ckpt_<N>.pt`, a dict under NVIDIA's keys (the constants
below) written by `torch.save` and read back with `weights_only=True`, never unpickled. N is the
step, phase 2 continuing phase 1's numbers (`name_step`). Each component saves and loads its own
part: the model its weights (MODEL), `training.Optimization` the optimizer, schedule and loss scale
(OPTIMIZER, LR_SCHEDULER, GRAD_SCALER), the batches their position (DATA), every rank its RNG
streams (RNG); `assemble` puts them together with the step, the config and the binarised mask.

Only utils and atomic_io are imported here, so every module that reads checkpoints (modeling,
attention_masks, training, the scripts) can import this one.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from atomic_io import atomic_path, remove_stale_temps
from utils import all_gather_object, get_rank, get_world_size, is_main_process, rng_state, set_rng_state

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- names

NAME_PATTERN = r"ckpt_(\d+)\.pt"
NAME_RE = re.compile(NAME_PATTERN)

# ----------------------------------------------------------------------------- keys (NVIDIA's, then ours)

MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
GRAD_SCALER = "grad_scaler"
FILES = "files"  # NVIDIA's data position: [file index, the epoch's files...]; written, never read back
EPOCH = "epoch"
GLOBAL_STEP = "global_step"  # the step within its phase
PHASE2 = "phase2"
DATA = "data"  # the exact data position (pretraining_data.PretrainingBatches.state_dict)
RNG = "rng"  # every rank's RNG streams, in rank order
CONFIG = "config"  # the run's BertConfig as JSON, command-line overrides applied
ARGS = "args"  # the run's flags as JSON
MASK = "mask"  # the binarised attention mask, for readers that build no model
KEYS = (MODEL, OPTIMIZER, LR_SCHEDULER, GRAD_SCALER, FILES, EPOCH, GLOBAL_STEP, PHASE2, DATA, RNG, CONFIG, ARGS, MASK)

# The types the resume code reads each entry as (a wrong one would end in a traceback mid-resume).
ENTRY_TYPES = {MODEL: dict, OPTIMIZER: dict, LR_SCHEDULER: dict, GRAD_SCALER: dict, DATA: dict, RNG: list,
               GLOBAL_STEP: int}


class Found(NamedTuple):
    """A checkpoint found on disk: the N of its name, its path, its loaded state."""

    step: int
    path: Path
    state: dict[str, Any]


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"ckpt_{step}.pt"


def step_in_name(path: str | Path) -> int | None:
    """The N of a `ckpt_<N>.pt` file name, or None for any other name."""
    match = NAME_RE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def name_step(global_step: int, phase2: bool, phase1_end_step: int) -> int:
    """Phase-2 checkpoints continue phase 1's numbering (ckpt_<phase1_end_step + k>.pt)."""
    return global_step + (phase1_end_step if phase2 else 0)


def checkpoint_number(state: dict[str, Any], path: str | Path) -> int | None:
    """The N of ckpt_<N>.pt that run_pretraining.py gives a checkpoint (and its mask_<N> files): the
    step it records, plus the recorded --phase1_end_step for a phase-2 one; else the N in the file's
    name (a foreign checkpoint); else None."""
    step, phase2 = state.get(GLOBAL_STEP), state.get(PHASE2)
    if type(step) is int and phase2 is False:
        return step
    if type(step) is int and phase2 is True:
        try:
            offset = json.loads(state.get(ARGS, "")).get("phase1_end_step")
        except (TypeError, ValueError, AttributeError):
            offset = None
        if type(offset) is int:
            return name_step(step, True, offset)
    return step_in_name(path)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `ckpt_<step>.pt` in `output_dir`, oldest first.

    Temporary files of an interrupted write (`.ckpt_<step>.pt.*.tmp`) never match.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [(step, path) for path in directory.iterdir()
             if (step := step_in_name(path)) is not None and path.is_file()]
    return sorted(found)


def remove_interrupted_writes(output_dir: str | Path) -> list[Path]:
    """Delete the temporaries that killed checkpoint writes left in `output_dir`: repeated
    preemptions would otherwise fill the disk with checkpoint-sized files."""
    return remove_stale_temps(output_dir, NAME_PATTERN)


# ----------------------------------------------------------------------------- what a checkpoint holds


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states (dropout, DAM noise), gathered so rank 0 can checkpoint them all."""
    return all_gather_object(rng_state())


def restore_rng_states(states: list[dict[str, Any]] | None) -> bool:
    """This rank's saved RNG streams, restored last so that nothing drawn while setting up shifts
    them; False (the streams restart, which is logged) when the world size changed."""
    if states is None:
        return False
    if len(states) != get_world_size():
        logger.warning("checkpoint holds RNG states of %d ranks, this run has %d: RNG streams restart",
                       len(states), get_world_size())
        return False
    try:
        set_rng_state(states[get_rank()])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ValueError(f"the checkpoint's RNG state of rank {get_rank()} is damaged ({type(exc).__name__}: "
                         f"{exc}): resume from another checkpoint (--resume_step)") from None
    return True


def assemble(model: nn.Module, optimization: Any, batches: Any, global_step: int, phase2: bool,
             config_json: str, args: dict[str, Any], mask_module: nn.Module | None) -> dict[str, Any]:
    """Everything a resume needs, under NVIDIA's keys, plus the config, the flags and the binarised
    mask. `optimization` (training.Optimization) gives its own entries; `batches`
    (pretraining_data.PretrainingBatches) its position."""
    state = {MODEL: model.state_dict(), **optimization.state_dict(), DATA: batches.state_dict(),
             FILES: [batches.file_index, *batches.epoch_files(batches.epoch)], EPOCH: batches.epoch,
             GLOBAL_STEP: global_step, PHASE2: phase2, RNG: gather_rng_states(),
             CONFIG: config_json, ARGS: json.dumps(args, default=str)}
    if mask_module is not None:
        state[MASK] = mask_module.full_mask()
    return state


# ----------------------------------------------------------------------------- writing


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` that never leaves a half-written file under `path`.

    A failed write (a full disk) is an OSError naming `path`: torch reports it as a RuntimeError
    from its zip writer ("iostream error", "enforce fail at inline_container.cc"), which would
    otherwise end a run in a C++ traceback."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:  # its zip writer's only failures are failed writes
            raise OSError(f"writing {path} failed ({str(exc).strip().splitlines()[-1][:200]}): "
                          f"is the disk full?") from None


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, step: int, keep: int = 3) -> Path | None:
    """Write `ckpt_<step>.pt` atomically on rank 0 and delete all but the newest `keep`.

    A failed write (disk full, permissions) raises one clear error and leaves every earlier
    checkpoint as it was. Returns the path on rank 0, None elsewhere.
    """
    if not is_main_process():
        return None
    path = checkpoint_path(output_dir, step)
    try:
        atomic_save(state, path)
    except OSError as exc:
        previous = [p.name for _, p in list_checkpoints(output_dir) if p != path]
        raise OSError(
            f"could not write checkpoint {path} ({exc.strerror or exc}); free disk space or fix "
            f"permissions of {Path(output_dir)} — earlier checkpoints are intact: {previous or 'none'}"
        ) from None
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- reading


# torch.save writes a zip archive; files of torch < 1.6 (and _use_new_zipfile_serialization=False)
# are a bare pickle stream, protocol 2 or later.
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only.

    A file that needs arbitrary unpickling is refused with one line that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path} is an empty file (0 bytes), not a checkpoint: an interrupted copy? "
                         f"copy it again or point at another checkpoint")
    if not head.startswith(TORCH_FILE_MAGIC):
        raise ValueError(f"{path} is not a PyTorch checkpoint (it starts with {head!r}, not a torch.save "
                         f"archive): point at a .pt / .bin file written by torch.save, or a .safetensors file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError with long messages
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # torch's own refusal of objects weights_only cannot rebuild: the one case that is about pickle.
        if "Weights only load failed" in first_line:
            raise ValueError(
                f"{path} cannot be loaded safely ({first_line}); only tensor checkpoints without pickled "
                f"objects are accepted — re-save it with torch.save(state_dict) or as safetensors"
            ) from None
        raise ValueError(f"{path} is a damaged PyTorch checkpoint ({first_line}): copy it again or point at "
                         f"another checkpoint") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's dict, loaded without unpickling objects (`safe_torch_load`) and
    checked entry by entry."""
    state = safe_torch_load(path)
    if not isinstance(state, dict) or MODEL not in state:
        raise ValueError(f"{path} is not a training checkpoint (no '{MODEL}' entry); pass a ckpt_<step>.pt file")
    for key, expected in ENTRY_TYPES.items():
        if key in state and not isinstance(state[key], expected):
            raise ValueError(f"{path}: its '{key}' entry is a {type(state[key]).__name__}, not a "
                             f"{expected.__name__}: the file is damaged or not a training checkpoint")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state[MODEL].items()):
        raise ValueError(f"{path}: its '{MODEL}' entry is not a state dict (name → tensor): the file is damaged "
                         f"or not a training checkpoint")
    return state


def find_latest_checkpoint(output_dir: str | Path, step: int = -1) -> Found | None:
    """The newest checkpoint that loads (or exactly `ckpt_<step>.pt` when `step` >= 0).

    A newest file that cannot be read (corrupted outside our atomic writes) is reported and the
    next older one is used, so one bad file never costs the run.
    """
    candidates = list_checkpoints(output_dir)
    if step >= 0:
        path = checkpoint_path(output_dir, step)
        if not path.is_file():
            steps = [s for s, _ in candidates]
            raise FileNotFoundError(f"--resume_step {step}: {path} does not exist (available steps: {steps or 'none'})")
        return Found(step, path, load_checkpoint(path))
    for found_step, path in reversed(candidates):
        try:
            return Found(found_step, path, load_checkpoint(path))
        except (ValueError, RuntimeError, EOFError, OSError) as exc:
            logger.warning("skipping unreadable checkpoint %s: %s", path, exc)
    return None


def last_good_checkpoint(output_dir: str | Path) -> str:
    """Names the newest checkpoint in `output_dir` whose weights are all finite: a run whose every
    step is non-finite may have started from (or saved) weights that are already NaN."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            model = load_checkpoint(path)[MODEL]
        except (ValueError, OSError):
            continue
        if all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point()):
            return f"the last good checkpoint {path.name} is intact"
    return f"no checkpoint in {output_dir} is known good (none holds finite weights)"


# ----------------------------------------------------------------------------- resume


def find_resume(output_dir: str | Path, resume: bool, step: int = -1) -> Found | None:
    """The checkpoint to resume from (`resume`: --resume_from_checkpoint; `step`: --resume_step), or
    None for a fresh start; refuses to overwrite a run, or to start fresh over checkpoints that exist."""
    existing = list_checkpoints(output_dir)
    if not resume:
        if existing:
            raise ValueError(f"{output_dir} already holds checkpoints ({existing[-1][1].name}); pass "
                             f"--resume_from_checkpoint to continue that run, or use another --output_dir")
        return None
    found = find_latest_checkpoint(output_dir, step)
    if found is None and existing:  # never restart from scratch over checkpoints that exist
        raise ValueError(f"--resume_from_checkpoint: no checkpoint in {output_dir} loads "
                         f"({', '.join(p.name for _, p in existing)}; reasons logged above): restore a good "
                         f"ckpt_<step>.pt there, or move them away to start fresh")
    return found


def phase_step(found: Found, phase2: bool, phase1_end_step: int) -> tuple[int, bool]:
    """(step within this phase, continue-in-phase?) for a checkpoint, as NVIDIA's phase-2 rules.

    A phase-1 checkpoint loaded with --phase2 starts phase 2 at step 0 (schedule and optimizer
    step reset, moments kept); a phase-2 checkpoint continues phase 2.
    """
    check_numbering(found, phase2, phase1_end_step)
    saved_phase2 = found.state.get(PHASE2)
    if not phase2:
        return int(found.state.get(GLOBAL_STEP, found.step)), True
    if saved_phase2 is None:  # a foreign checkpoint: NVIDIA's arithmetic
        step = max(found.step - phase1_end_step, 0)
        return step, step > 0
    if saved_phase2:
        return int(found.state[GLOBAL_STEP]), True
    return 0, False


def check_numbering(found: Found, phase2: bool, phase1_end_step: int) -> None:
    """Refuse flags under which this run's ckpt_<n> would overwrite the earlier phase's files or sort
    below them (keep-last-3 would prune the new ones and a resume would pick the old phase)."""
    saved_phase2 = found.state.get(PHASE2)
    name = found.path.name
    if saved_phase2:
        offset = found.step - int(found.state[GLOBAL_STEP])
        if not phase2:
            raise ValueError(f"{name} is a phase-2 checkpoint: resume it with --phase2 --phase1_end_step {offset}")
        if offset != phase1_end_step:
            raise ValueError(f"{name} was numbered with --phase1_end_step {offset}, this run has "
                             f"{phase1_end_step}: pass --phase1_end_step {offset}")
    elif saved_phase2 is not None and phase2 and found.step > phase1_end_step:
        raise ValueError(f"phase-1 checkpoint {name} is past --phase1_end_step "
                         f"{phase1_end_step}: pass --phase1_end_step {found.step} (phase 1's last step)")


def restore(found: Found, optimization: Any, batches: Any, *, phase2: bool, phase1_end_step: int,
            fp16: bool, loss_scale: float) -> tuple[int, list[dict[str, Any]] | None]:
    """Optimizer, schedule, loss scale (`training.Optimization`) and data position (`batches`) from
    the checkpoint; returns (the phase's step, the saved RNG states to restore just before the
    first step, `restore_rng_states`).

    A new phase keeps only the moments. The saved fp16 loss scale is kept unless this run sets its
    own --loss_scale (e.g. to escape a collapsing dynamic scale); an fp32 / bf16 checkpoint saved
    none, so --fp16 then starts at --init_loss_scale.
    """
    global_step, continuing = phase_step(found, phase2, phase1_end_step)
    if fp16 and loss_scale > 0 and found.state.get(GRAD_SCALER):
        logger.info("--loss_scale %g replaces the checkpoint's loss scale", loss_scale)
    optimization.load_state_dict(found.state, new_phase=not continuing, keep_loss_scale=fp16 and not loss_scale)
    if continuing and DATA in found.state:
        batches.load_state_dict(found.state[DATA])
    logger.info("resumed from %s: phase step %d (%s)", found.path, global_step,
                "continuing" if continuing else "new phase: schedule reset")
    return global_step, found.state.get(RNG) if continuing else None
