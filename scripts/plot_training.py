"""Training curves of one run_pretraining.py run from its dllogger JSON-lines log (--json-summary).

Four panels against the optimizer step: the MLM + NSP loss without the mask penalty (the window
mean and the last step of each log line), the mask penalty λ·ΣM, the deterministic mask's sparsity
(1[a > 0]: what the binarised mask would drop at that step), and the learning rates (model and mask
logits). A key the log lacks (an older log, or a dense run without mask keys) leaves its panel
saying so; a resumed run's redone steps replace the interrupted run's.

    python scripts/plot_training.py results/dllogger.json --out results/training_curves.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atomic_io import save_figure  # noqa: E402
from utils import read_dllogger_json  # noqa: E402

CURVE_KEYS = ("average_loss", "step_loss", "mask_penalty", "mask_sparsity", "learning_rate", "mask_learning_rate")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The log's records; a missing file or a line that is not JSON is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"log {path} not found (run_pretraining.py writes it with --json-summary)")
    try:
        records = read_dllogger_json(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} holds a line that is not JSON ({err.msg}): is it a dllogger log?") from None
    return [r for r in records if isinstance(r, dict)]


def training_series(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...] sorted by step} for the keys of CURVE_KEYS the records hold.

    Training lines are the records whose step is (epoch, step); the last record of a step wins, so a
    resumed run's redone steps replace the ones logged before the interruption."""
    by_key: dict[str, dict[int, float]] = {key: {} for key in CURVE_KEYS}
    for record in records:
        step, data = record.get("step"), record.get("data")
        if not (isinstance(step, list) and len(step) == 2 and isinstance(data, dict)):
            continue
        for key in CURVE_KEYS:
            value = data.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_key[key][int(step[1])] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items() if points}


def search_lambda(records: list[dict[str, Any]]) -> float | None:
    """λ from the run's logged command line (its PARAMETER record), when it passed --lamb."""
    for record in records:
        config = record.get("data", {}).get("Config") if record.get("step") == "PARAMETER" else None
        if isinstance(config, str):
            lam = json.loads(config).get("lamb")
            return float(lam) if isinstance(lam, (int, float)) else None
    return None


def _line(ax: plt.Axes, series: dict, key: str, **style: Any) -> bool:
    if key not in series:
        return False
    steps, values = zip(*series[key])
    ax.plot(steps, values, **style)
    return True


def _missing(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="dimgray", wrap=True)


def _draw_loss(ax: plt.Axes, series: dict) -> None:
    ax.set_title("MLM + NSP loss (without the mask penalty)", fontsize=10)
    drawn = _line(ax, series, "average_loss", marker="o", ms=3, lw=1.6, label="mean over the log window")
    drawn |= _line(ax, series, "step_loss", lw=0.8, alpha=0.6, label="the window's last step")
    if drawn:
        ax.legend(fontsize=8)
    else:
        _missing(ax, "no average_loss / step_loss in this log")


def _draw_penalty(ax: plt.Axes, series: dict) -> None:
    ax.set_title("mask penalty λ·ΣM", fontsize=10)
    if not _line(ax, series, "mask_penalty", color="tab:red", marker="o", ms=3):
        _missing(ax, "no mask_penalty in this log (an older log)")
    elif all(value == 0.0 for _, value in series["mask_penalty"]):
        _missing(ax, "0 throughout: no learnable mask (dense or a fixed pattern), or λ = 0")


def _draw_sparsity(ax: plt.Axes, series: dict) -> None:
    ax.set_title("deterministic mask sparsity (1[a > 0])", fontsize=10)
    if "mask_sparsity" not in series:
        _missing(ax, "no mask_sparsity in this log (an older log)")
        return
    steps, values = zip(*series["mask_sparsity"])
    ax.plot(steps, [100 * v for v in values], color="tab:purple", marker="o", ms=3)
    ax.set_ylabel("% of (query, key) pairs dropped", fontsize=8)


def _draw_rates(ax: plt.Axes, series: dict) -> None:
    ax.set_title("learning rates", fontsize=10)
    if not _line(ax, series, "learning_rate", color="tab:blue", label="model"):
        _missing(ax, "no learning_rate in this log")
    ax.set_ylabel("model learning rate", fontsize=8, color="tab:blue")
    if "mask_learning_rate" in series and series["mask_learning_rate"] != series.get("learning_rate"):
        right = ax.twinx()  # the mask logits' rate is typically ~50x the model's: its own axis
        _line(right, series, "mask_learning_rate", color="tab:orange", ls="--")
        right.set_ylabel("mask-logit learning rate (dashed)", fontsize=8, color="tab:orange")
        right.tick_params(labelsize=7)


def plot_training_log(log: str | Path, out: str | Path | None = None, dpi: int = 100) -> Path:
    """Write the four-panel PNG of `log` to `out` (default: training_curves.png beside the log)."""
    log = Path(log)
    records = read_log(log)
    series = training_series(records)
    if not series:
        raise ValueError(f"{log} has no training lines: none of {', '.join(CURVE_KEYS)} is logged against an "
                         f"(epoch, step); is it the --json-summary log of a run_pretraining.py run?")
    out = Path(out) if out else log.with_name("training_curves.png")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, layout="constrained")
    for ax, draw in zip(axes.flat, (_draw_loss, _draw_penalty, _draw_sparsity, _draw_rates)):
        draw(ax, series)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    last = max(step for points in series.values() for step, _ in points)
    lam = search_lambda(records)
    fig.suptitle(f"{log.parent.name}/{log.name}: {last} steps" + (f", λ = {lam:g}" if lam is not None else ""),
                 fontsize=11)
    return save_figure(fig, out, dpi)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loss, mask penalty, mask sparsity and learning rates of a "
                                                 "run_pretraining.py run, from its dllogger log.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("log", help="the run's --json-summary file (dllogger JSON lines)")
    parser.add_argument("--out", help="output PNG path (default: training_curves.png beside the log)")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        path = plot_training_log(args.log, args.out, args.dpi)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"plot_training.py: error: {err}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
