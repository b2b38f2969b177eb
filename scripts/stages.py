"""Resumable stages for the multi-run scripts (demo.py, reproduce.py).

A stage writes into its own folder and is trusted only once its marker exists: a re-run skips
finished stages and redoes an interrupted one from scratch. Each stage prints one progress line
when it starts and one when it ends (stage k of N, elapsed, estimated time left, once the script
has announced its stages with `Stages.plan`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from atomic_io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


def format_duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def remaining_seconds(elapsed: float, done_expected: float, left_expected: float) -> float:
    """Time the stages left still need: their expected seconds, scaled by how much slower (or faster)
    than expected the stages done so far ran (elapsed / their expected seconds), which carries a
    loaded machine's pace, and stages run side by side, over to the rest. Nothing done yet: the plan."""
    if done_expected <= 0:
        return left_expected
    return left_expected * elapsed / done_expected


class Stages:
    """Stage bookkeeping under `out/stages/`, the progress lines, and the project's scripts run as
    subprocesses. `stage` may be called from several threads (stages run side by side)."""

    def __init__(self, out: Path, label: str) -> None:
        self.out, self.label = out, label
        self.planned = False
        self.expected: dict[str, float] = {}  # planned stages not finished yet: their expected seconds
        self.done_expected = 0.0  # expected seconds of the planned stages finished in this run
        self.started = self.finished = 0
        self.clock = time.perf_counter()
        self.lock = threading.Lock()

    def plan(self, expected_seconds: dict[str, float]) -> None:
        """Announce every stage of the run (name: expected seconds on the reference machine, 2 cores);
        stages finished before are left out, so N and the estimate cover what this run does."""
        with self.lock:
            self.planned = True
            self.expected = {name: max(float(t), 0.0) for name, t in expected_seconds.items()
                             if not self.marker(name).exists()}
            self.done_expected, self.started, self.finished = 0.0, 0, 0
            self.clock = time.perf_counter()
        print(f"[{self.label}] {len(self.expected)} stages to run, about "
              f"{format_duration(sum(self.expected.values()))} as planned", flush=True)

    def marker(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.done"

    def stage(self, name: str, folder: Path, work: Callable[[], None]) -> None:
        marker = self.marker(name)
        if marker.exists():
            print(f"[{self.label}] {name}: done before, skipped", flush=True)
            return
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted attempt is redone from scratch
        folder.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self.started += 1
            self.report(f"stage {self.count(self.started)}: {name} ...")
        start = time.perf_counter()
        work()
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, f"{time.perf_counter() - start:.1f}\n")
        with self.lock:
            self.finished += 1
            self.done_expected += self.expected.pop(name, 0.0)
            self.report(f"{name} done in {format_duration(time.perf_counter() - start)}, "
                        f"{self.count(self.finished)} finished")

    def side_by_side(self, stages: list[tuple[str, Path, Callable[[], None]]], workers: int) -> None:
        """Run `stages` (name, folder, work) `workers` at a time. Every stage runs even after one fails (a
        finished stage keeps its marker); the first failure, in the given order, is raised at the end."""
        with ThreadPoolExecutor(max(1, min(workers, len(stages)))) as pool:
            futures = [pool.submit(self.stage, name, folder, work) for name, folder, work in stages]
            for future in futures:
                future.result()

    def count(self, k: int) -> str:
        """'k of N' once planned (N: the planned stages this run does), else 'k'."""
        return f"{k} of {max(len(self.expected) + self.finished, k)}" if self.planned else str(k)

    def report(self, what: str) -> None:
        """One progress line: what happened, the elapsed time and, once planned, the time left."""
        elapsed = time.perf_counter() - self.clock
        line = f"[{self.label}] {what} | elapsed {format_duration(elapsed)}"
        if self.planned:
            left = remaining_seconds(elapsed, self.done_expected, sum(self.expected.values()))
            line += f", about {format_duration(left)} left"
        print(line, flush=True)


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
