"""Process-level helpers shared by the pretraining and GLUE scripts.

Distributed set-up (torchrun environment), seeding and RNG capture for exact resume, mixed-precision
contexts and a dllogger-compatible metric logger (checkpoint files, written atomically and read without
unpickling: checkpoints.py).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# ----------------------------------------------------------------------------- distributed


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather_object(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (`[obj]` on one process)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def finite_float(text: str) -> float:
    """argparse type of every float flag: a NaN or inf learning rate, λ or timeout would only show up
    as a diverged run many steps later, so it is refused at parse time."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def describe_json_value(value: Any) -> str:
    """A config value as the user wrote it in JSON: `the string "false"`, `NaN`, `[1, 2]`."""
    if isinstance(value, str):
        return f"the string {json.dumps(value)}"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_json_type(where: str, value: Any, expected: type) -> Any:
    """``value`` as ``expected`` (bool, int, float, str or dict), or a ValueError naming ``where``.

    JSON has one number type and Python's json reads NaN / Infinity, so: a bool field takes only
    true / false (bool("false") is True), an int field a whole number (768.0 passes as 768), a float
    field a finite number (ints widen)."""
    got = describe_json_value(value)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is bool and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {got}")
    if expected is int:
        if not is_number or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{where} must be integer (a whole number), got {got}")
        return int(value)
    if expected is float:
        if not is_number or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {got}")
        return float(value)
    if not isinstance(value, expected):
        noun = {str: "str (a JSON string)", dict: "dict (a JSON object)"}.get(expected, expected.__name__)
        raise ValueError(f"{where} must be {noun}, got {got}")
    return value


def add_local_rank_argument(parser: "argparse.ArgumentParser") -> None:
    """NVIDIA's --local_rank, also under the dashed spelling torch >= 2.0's torch.distributed.launch
    passes (--local-rank=N). The LOCAL_RANK variable, which torchrun sets, wins (init_distributed)."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                        default=int(os.environ.get("LOCAL_RANK", -1)),
                        help="this process's GPU (torch.distributed.launch sets it; torchrun's LOCAL_RANK wins)")


def init_distributed(local_rank: int = -1, no_cuda: bool = False, timeout_s: int = 1800) -> torch.device:
    """Initialise torch.distributed from torchrun's environment and return this rank's device.

    `local_rank` is the legacy `--local_rank` flag; the `LOCAL_RANK` variable torchrun sets wins.
    NCCL is used on CUDA, gloo on CPU. `timeout_s` bounds every collective, so a dead peer turns
    into an error instead of a hang.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and not no_cuda
    if use_cuda:
        device = torch.device("cuda", max(local_rank, 0))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return device


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all ranks (a no-op on one process)."""
    if get_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / get_world_size()


def format_step(step: Any) -> str:
    """dllogger's step formatter: strings pass through, tuples name epoch / iteration."""
    if isinstance(step, str):
        return step
    labels = ("Training Epoch", "Training Iteration", "Validation Iteration")
    if isinstance(step, (tuple, list)):
        return "".join(f"{label}: {value} " for label, value in zip(labels, step))
    return f"Step: {step} "


# ----------------------------------------------------------------------------- seeding / RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain data (checkpoint-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- precision


def precision_dtype(fp16: bool, bf16: bool) -> torch.dtype | None:
    """The autocast dtype for the precision flags (None = fp32)."""
    if fp16 and bf16:
        raise ValueError("--fp16/--amp and --bf16 are mutually exclusive: pick one")
    return torch.float16 if fp16 else torch.bfloat16 if bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- logging


class MetricLogger:
    """Logs metric records the way NVIDIA's scripts do.

    With dllogger importable (NGC container) it is used as is. Otherwise each record becomes a
    `DLLL {...}` JSON line in `json_path` (the format dllogger's JSONStreamBackend writes) and a
    short human line on stdout. Only the main process writes.
    """

    def __init__(self, json_path: str | os.PathLike | None, verbose: bool = True) -> None:
        self.enabled = is_main_process()
        self.verbose = verbose
        self._file = None
        self._dllogger = None
        if not self.enabled:
            return
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            import dllogger  # type: ignore
        except ImportError:
            if json_path:
                self._file = open(json_path, "a", encoding="utf-8")
            return
        backends = [dllogger.StdOutBackend(dllogger.Verbosity.DEFAULT, step_format=format_step)]
        if json_path:
            backends.append(_json_backend(dllogger, str(json_path)))
        dllogger.init(backends=backends)
        self._dllogger = dllogger

    def log(self, step: Any, data: dict[str, Any], echo: bool = True) -> None:
        """One record into the file; on stdout too when `echo` (and the logger is verbose)."""
        if not self.enabled:
            return
        data = {k: _plain(v) for k, v in data.items()}
        if self._dllogger is not None:
            # Its stdout backend shows DEFAULT-verbosity records only, the JSON backend every record.
            verbosity = self._dllogger.Verbosity.DEFAULT if echo else self._dllogger.Verbosity.VERBOSE
            self._dllogger.log(step=step, data=data, verbosity=verbosity)
            return
        record = {"timestamp": time.time(), "datetime": datetime.datetime.now().isoformat(),
                  "elapsedtime": time.perf_counter(), "type": "LOG",
                  "step": list(step) if isinstance(step, tuple) else step, "data": data}
        if self._file is not None:
            try:
                self._file.write("DLLL " + json.dumps(record) + "\n")
                self._file.flush()
            except OSError as exc:
                raise OSError(f"could not write the log {self._file.name} ({exc.strerror or exc}): "
                              f"free disk space, or pass another --json-summary") from None
        if self.verbose and echo:
            shown = " ".join(f"{k}: {_short(v)}" for k, v in data.items())
            tqdm.write(f"{format_step(step)}{shown}", file=sys.stdout)  # clears a progress bar first
            sys.stdout.flush()

    def close(self) -> None:
        if self._dllogger is not None:
            self._dllogger.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def _json_backend(dllogger: Any, path: str) -> Any:
    """dllogger's JSON backend in append mode, so a resumed run keeps the records before it
    (dllogger truncates by default; releases before `append` existed always truncate)."""
    try:
        return dllogger.JSONStreamBackend(dllogger.Verbosity.VERBOSE, path, append=True)
    except TypeError:
        return dllogger.JSONStreamBackend(dllogger.Verbosity.VERBOSE, path)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_dllogger_json(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a dllogger JSON-lines file (the `DLLL ` prefix is optional)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.removeprefix("DLLL ").strip()
        if line:
            records.append(json.loads(line))
    return records
