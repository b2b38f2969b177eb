"""What every bench script reports beside its numbers: which code, which machine, and short errors."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from atomic_io import atomic_write_text  # noqa: E402
# Folders that hold no measured code (outputs, environments).
_NOT_SOURCE = {".git", ".venv", "results", "demo_output", "__pycache__", "data_prep"}


def git_commit() -> str:
    """The measured code (read before a run starts): the commit, "+uncommitted" when the tree differs
    from it, and a digest of the Python sources, which names the code even where a copied tree
    carries a stale .git (compare with `python bench/bench_common.py` in the checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.strip()
        commit = f"{commit}+uncommitted" if changed else commit
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{commit} (sources {source_digest()})"


def source_digest() -> str:
    """12 hex digits of SHA-256 over every .py file's path and bytes under the repository root."""
    digest = hashlib.sha256()
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if _NOT_SOURCE.isdisjoint(relative.parts):
            digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


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
    out = Path(json_path or ROOT / "results" / default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    print(git_commit())
