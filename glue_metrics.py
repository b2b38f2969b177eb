"""GLUE metrics, and the one-row summary of a nine-task run in the seed table's format.

Own numpy implementations (scikit-learn is only a test dependency; the tests check every function
against scikit-learn / scipy):
CoLA Matthews correlation; STS-B Pearson and Spearman; MRPC / QQP accuracy, F1 of the positive
class and their mean; accuracy for the rest. MNLI matched and mismatched are scored separately.

    python glue_metrics.py table OUT_ROOT [--sparsity S]

prints the table row for `OUT_ROOT/<TASK>/results.txt` files written by `run_glue.py`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def f1_binary(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1; 0.0 when there are no true and no predicted positives (scikit-learn's value)."""
    preds, labels = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp = float(np.sum(preds & labels))
    denom = float(preds.sum() + labels.sum())
    return 2.0 * tp / denom if denom > 0 else 0.0


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0.0 when undefined, as scikit-learn."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes, encoded = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k = len(classes)
    y_true, y_pred = encoded[: len(labels)], encoded[len(labels):]
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (y_true, y_pred), 1.0)
    t = confusion.sum(axis=1)  # true occurrences per class
    p = confusion.sum(axis=0)  # predicted occurrences per class
    c = np.trace(confusion)
    s = confusion.sum()
    cov_tp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_tt = s * s - t @ t
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_pp * cov_tt))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; nan when either side is constant (as scipy)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    # Constancy is tested on the values: the mean of a constant 0.1 is not exactly 0.1, so its
    # centred values (and the denominator) are tiny but not zero.
    if x.size == 0 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank (scipy.stats.rankdata's default)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values; each run gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def compute_metrics(task_name: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The GLUE metrics of one task on one split (NVIDIA's key names)."""
    task = task_name.lower()
    if task == "cola":
        return {"mcc": matthews_corrcoef(preds, labels)}
    if task in ("mrpc", "qqp"):
        acc, f1 = accuracy(preds, labels), f1_binary(preds, labels)
        return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2}
    if task == "sts-b":
        p, s = pearson(preds, labels), spearman(preds, labels)
        return {"pearson": p, "spearmanr": s, "corr": (p + s) / 2}
    if task in ("sst-2", "mnli", "mnli-mm", "qnli", "rte", "wnli"):
        return {"acc": accuracy(preds, labels)}
    raise KeyError(f"no GLUE metrics for task {task_name!r}")


# ----------------------------------------------------------------------------- the table row

# Columns of the seed table and the metric each reports (results.txt key). The table follows BERT's
# convention: F1 for MRPC, Spearman for STS-B, Matthews for CoLA, accuracy elsewhere (QQP's
# numbers, ~86-87, are accuracies: its F1 is far lower on the test server).
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("MNLI-m", "mnli", "acc"),
    ("MNLI-mm", "mnli", "mm:acc"),
    ("QQP", "qqp", "acc"),
    ("QNLI", "qnli", "acc"),
    ("SST-2", "sst-2", "acc"),
    ("CoLA", "cola", "mcc"),
    ("STS-B", "sts-b", "spearmanr"),
    ("MRPC", "mrpc", "f1"),
    ("RTE", "rte", "acc"),
)
TASK_DIRS = {"mnli": "MNLI", "qqp": "QQP", "qnli": "QNLI", "sst-2": "SST-2", "cola": "CoLA",
             "sts-b": "STS-B", "mrpc": "MRPC", "rte": "RTE"}


def table_row(results: dict[str, dict[str, float]], sparsity: float | None, name: str = "") -> str:
    """One markdown row: name | sparsity % | MNLI m/mm | QQP | QNLI | SST-2 | CoLA | STS-B | MRPC | RTE | average.

    `results` maps a task name to its results.txt dict. Scores are shown ×100 with one decimal; a
    missing task shows "-" and the average is then over the tasks present (marked with "*").
    """
    scores: dict[str, float | None] = {}
    for column, task, key in TABLE_COLUMNS:
        value = results.get(task, {}).get(key)
        scores[column] = None if value is None or not math.isfinite(value) else 100.0 * float(value)
    present = [v for v in scores.values() if v is not None]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    average = fmt(sum(present) / len(present)) if present else "-"
    if present and len(present) < len(scores):
        average += "*"
    cells = [
        name,
        fmt(None if sparsity is None else 100.0 * sparsity),
        f"{fmt(scores['MNLI-m'])}/{fmt(scores['MNLI-mm'])}",
        *(fmt(scores[c]) for c in ("QQP", "QNLI", "SST-2", "CoLA", "STS-B", "MRPC", "RTE")),
        average,
    ]
    return "|" + "|".join(cells) + "|"


def load_results(root: str | Path) -> tuple[dict[str, dict[str, float]], float | None]:
    """Read `root/<TASK>/results.txt` for every table task present; also return the mask sparsity."""
    results: dict[str, dict[str, float]] = {}
    sparsity = None
    for task, folder in TASK_DIRS.items():
        path = Path(root) / folder / "results.txt"
        if path.is_file():
            results[task] = json.loads(path.read_text(encoding="utf-8"))
            sparsity = results[task].get("mask_sparsity", sparsity)
    return results, sparsity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="print the seed-table row for OUT_ROOT/<TASK>/results.txt")
    table.add_argument("out_root")
    table.add_argument("--name", default="", help="first cell of the row (e.g. the mask's name)")
    table.add_argument("--sparsity", type=float, default=None, help="override the sparsity (fraction of zeros)")
    args = parser.parse_args(argv)
    results, sparsity = load_results(args.out_root)
    if not results:
        print(f"error: no <TASK>/results.txt under {args.out_root}; run scripts/run_glue_all.sh first", file=sys.stderr)
        return 1
    header = "|mask|Sparsity ratio|MNLI-(m/mm)|QQP|QNLI|SST-2|CoLA|STS-B|MRPC|RTE|Average|"
    print(header)
    print("|" + "|".join([":---"] + [":---:"] * 10) + "|")
    print(table_row(results, args.sparsity if args.sparsity is not None else sparsity, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
