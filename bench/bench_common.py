"""What every bench script reports beside its numbers: which code, which machine, and short errors."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """The measured code's commit (read before a run starts), or "unknown" outside a checkout."""
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()
        return f"{commit}+uncommitted" if changed else commit  # a copied tree may lag its .git
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def short_error(exc: BaseException) -> str:
    """One table-cell line for a path that failed."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:90]


def write_results(json_path: str | None, default_name: str, meta: dict, rows: list[dict]) -> Path:
    """Write {"meta", "rows"} atomically to `json_path`, or to results/<default_name> in the repo."""
    out = Path(json_path or Path(__file__).resolve().parent.parent / "results" / default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out
