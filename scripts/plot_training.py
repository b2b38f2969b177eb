"""Training curves of one run_pretraining.py run from its dllogger JSON-lines log (--json-summary).

Six panels against the optimizer step, every line labelled:
  * the MLM + NSP loss without the mask penalty (the window mean and the last step of each log line);
  * the mask penalty (λ·ΣM, or a target search's price on density / Lagrangian);
  * the mask's sparsity: the binarised mask's, 1[a > 0]'s (one line when they agree), the expected
    one under the sampler and a target search's current target;
  * the share of decided gates (σ(a) < 0.1 or > 0.9);
  * the model's learning rate and the mask logits' learning rate, each in its own panel.
No axis zooms into a small range: sparsity and decided share span 0-100 %, and the loss, penalty
and rate axes include 0, so a change of 0.3 % reads as one. A key the log lacks (an older log, or a
dense run) leaves its panel saying so; a resumed run's redone steps replace the interrupted run's.

    python scripts/plot_training.py results/dllogger.json --out results/training_curves.png
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import launch  # noqa: E402
from atomic_io import save_figure  # noqa: E402
from utils import read_dllogger_json  # noqa: E402

SEARCH_KEYS = ("expected_sparsity", "deterministic_sparsity", "decided_gates", "target_sparsity")
CURVE_KEYS = ("average_loss", "step_loss", "mask_penalty", "mask_sparsity", "learning_rate", "mask_learning_rate",
              *SEARCH_KEYS)
# (key, label, style) of the sparsity panel's lines, drawn when logged.
SPARSITY_LINES = (
    ("mask_sparsity", "binarised mask (what fine-tuning uses)", dict(color="tab:purple", lw=2.2, marker="o", ms=3)),
    ("deterministic_sparsity", "1[a > 0] (before any budget)", dict(color="tab:green", lw=1.4, ls="--")),
    ("expected_sparsity", "expected under the sampler (mean of 1 - σ(a))", dict(color="tab:orange", lw=1.4)),
    ("target_sparsity", "target (warmed up)", dict(color="black", lw=1.2, ls=":")),
)


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


def axis_from_zero(ax: plt.Axes, values: list[float]) -> None:
    """y from 0 (or the lowest negative value) to the highest: a difference of 0.3 % looks like one.
    An all-zero series gets [0, 1], not matplotlib's ±0.05 around it."""
    low, high = min(0.0, *values), max(0.0, *values)
    pad = 0.05 * (high - low) or 1.0
    ax.set_ylim(low - pad if low < 0 else 0.0, high + pad if high > 0 else (0.0 if low < 0 else 1.0))


def _line(ax: plt.Axes, series: dict, key: str, scale: float = 1.0, **style: Any) -> list[float]:
    """Draw `key` (times `scale`) if logged; its values, [] when absent."""
    if key not in series:
        return []
    steps, values = zip(*series[key])
    values = [scale * v for v in values]
    ax.plot(steps, values, **style)
    return values


def _missing(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="dimgray", wrap=True)


def _draw_loss(ax: plt.Axes, series: dict) -> None:
    ax.set_title("MLM + NSP loss (without the mask penalty)", fontsize=10)
    values = _line(ax, series, "average_loss", marker="o", ms=3, lw=1.6, label="mean over the log window")
    values += _line(ax, series, "step_loss", lw=0.8, alpha=0.6, label="the window's last step")
    if not values:
        _missing(ax, "no average_loss / step_loss in this log")
        return
    axis_from_zero(ax, values)
    ax.legend(fontsize=8, loc="lower left")


def _draw_penalty(ax: plt.Axes, series: dict) -> None:
    target_search = "target_sparsity" in series
    ax.set_title("mask penalty: " + ("the target search's price on density (or Lagrangian)" if target_search else "λ·ΣM"),
                 fontsize=10)
    values = _line(ax, series, "mask_penalty", color="tab:red", marker="o", ms=3, label="mask_penalty")
    if not values:
        _missing(ax, "no mask_penalty in this log (an older log)")
        return
    axis_from_zero(ax, values)
    if all(value == 0.0 for value in values):
        _missing(ax, "0 throughout: no learnable mask (dense or a fixed pattern), or λ = 0")


def _sparsity_lines(series: dict) -> list[tuple[str, str, dict]]:
    """SPARSITY_LINES, with 1[a > 0] folded into the binarised mask's line where they are the same
    (a λ search binarises at 1[a > 0]): one labelled line, not one hidden under the other."""
    if series.get("deterministic_sparsity") != series.get("mask_sparsity"):
        return list(SPARSITY_LINES)
    key, _, style = SPARSITY_LINES[0]
    return [(key, "binarised mask = 1[a > 0] (what fine-tuning uses)", style), *SPARSITY_LINES[2:]]


def _draw_sparsity(ax: plt.Axes, series: dict) -> None:
    ax.set_title("mask sparsity (% of (query, key) pairs dropped)", fontsize=10)
    drawn = [key for key, label, style in _sparsity_lines(series)
             if _line(ax, series, key, 100.0, label=label, **style)]
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter())
    if not drawn:
        _missing(ax, "no mask_sparsity in this log (an older log)")
        return
    ax.legend(fontsize=7, loc="lower right")


def _draw_decided(ax: plt.Axes, series: dict) -> None:
    ax.set_title("decided gates (σ(a) < 0.1 or > 0.9)", fontsize=10)
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter())
    if not _line(ax, series, "decided_gates", 100.0, color="tab:brown", marker="o", ms=3, label="decided_gates"):
        _missing(ax, "no decided_gates in this log (no mask search, or an older log)")
        return
    ax.axhline(50, color="gray", lw=0.8, ls=":")
    ax.text(0.01, 51, " half the gates", fontsize=7, color="gray", transform=ax.get_yaxis_transform())


def _draw_rate(ax: plt.Axes, series: dict, key: str, title: str, colour: str) -> None:
    ax.set_title(title, fontsize=10)
    values = _line(ax, series, key, color=colour, label=key)
    if not values:
        _missing(ax, f"no {key} in this log")
        return
    axis_from_zero(ax, values)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _draw_model_rate(ax: plt.Axes, series: dict) -> None:
    _draw_rate(ax, series, "learning_rate", "learning rate of the model's weights", "tab:blue")


def _draw_mask_rate(ax: plt.Axes, series: dict) -> None:
    _draw_rate(ax, series, "mask_learning_rate", "learning rate of the mask logits", "tab:orange")


PANELS = (_draw_loss, _draw_penalty, _draw_sparsity, _draw_decided, _draw_model_rate, _draw_mask_rate)


def plot_training_log(log: str | Path, out: str | Path | None = None, dpi: int = 100) -> Path:
    """Write the six-panel PNG of `log` to `out` (default: training_curves.png beside the log)."""
    log = Path(log)
    records = read_log(log)
    series = training_series(records)
    if not series:
        raise ValueError(f"{log} has no training lines: none of {', '.join(CURVE_KEYS)} is logged against an "
                         f"(epoch, step); is it the --json-summary log of a run_pretraining.py run?")
    out = Path(out) if out else log.with_name("training_curves.png")
    lam = search_lambda(records)
    name = f"{log.parent.name}/{log.name}" + (f", λ = {lam:g}" if lam is not None else "")
    return save_figure(training_figure(series, name), out, dpi)


def training_figure(series: dict[str, list[tuple[int, float]]], name: str) -> plt.Figure:
    """The six panels of `series` (`training_series`), titled with `name`."""
    fig, axes = plt.subplots(3, 2, figsize=(11, 10), sharex=True, layout="constrained")
    for ax, draw in zip(axes.flat, PANELS):
        draw(ax, series)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    last = max(step for points in series.values() for step, _ in points)
    fig.suptitle(f"{name}: {last} steps\nno axis zooms in: every y-axis includes 0 (sparsity and decided share "
                 f"span 0-100 %)", fontsize=11)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = launch.ScriptParser("plot_training.py", "Loss, mask penalty, mask sparsity, decided gates and the "
                                                     "two learning rates of a run_pretraining.py run, from its "
                                                     "dllogger log.")
    parser.add_argument("log", help="the run's --json-summary file (dllogger JSON lines)")
    parser.add_argument("--out", help="output PNG path (default: training_curves.png beside the log)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNG (the figure is 11 x 10 in)")
    args = parser.parse_args(argv)
    try:
        path = plot_training_log(args.log, args.out, args.dpi)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"plot_training.py: error: {err}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
