"""Resumable stages for the multi-run scripts (demo.py, reproduce.py).

A stage writes into its own folder and is trusted only once its marker exists: a re-run skips
finished stages and redoes an interrupted one from scratch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atomic_io import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Stages:
    """Stage bookkeeping under `out/stages/`, and the project's scripts run as subprocesses."""

    def __init__(self, out: Path, label: str) -> None:
        self.out, self.label = out, label

    def stage(self, name: str, folder: Path, work: Callable[[], None]) -> None:
        marker = self.out / "stages" / f"{name}.done"
        if marker.exists():
            print(f"[{self.label}] {name}: done before, skipped", flush=True)
            return
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted attempt is redone from scratch
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[{self.label}] {name} ...", flush=True)
        start = time.perf_counter()
        work()
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, f"{time.perf_counter() - start:.1f}\n")


def run_python(*argv: str, threads: int | None = None, log: Path | None = None) -> None:
    """Run `python argv...` in the repository root; `threads` caps its intra-op threads (runs side
    by side each take a share of the cores); `log` takes its output instead of the terminal."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if log is None:
        subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True)
        return
    with open(log, "w", encoding="utf-8") as f:
        result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{argv[0]} failed (exit {result.returncode}); the end of {log}:\n" + "\n".join(tail))
