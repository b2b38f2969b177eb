"""glue_metrics.py against scikit-learn / scipy, and the seed-table row."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import glue_metrics as gm

labels_and_preds = st.integers(1, 60).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, 2), min_size=n, max_size=n),
                        st.lists(st.integers(0, 2), min_size=n, max_size=n)))
binary = st.integers(1, 60).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, 1), min_size=n, max_size=n),
                        st.lists(st.integers(0, 1), min_size=n, max_size=n)))


@settings(max_examples=100, deadline=None)
@given(labels_and_preds)
def test_mcc_and_accuracy_match_sklearn(pair) -> None:
    y, p = map(np.array, pair)
    assert gm.matthews_corrcoef(p, y) == pytest.approx(sklearn.metrics.matthews_corrcoef(y, p), abs=1e-12)
    assert gm.accuracy(p, y) == pytest.approx(sklearn.metrics.accuracy_score(y, p))


@settings(max_examples=100, deadline=None)
@given(binary)
def test_f1_matches_sklearn(pair) -> None:
    y, p = map(np.array, pair)
    assert gm.f1_binary(p, y) == pytest.approx(sklearn.metrics.f1_score(y, p, zero_division=0.0), abs=1e-12)


scores = st.integers(2, 50).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.5, 3.0, 5.0]) | st.floats(0, 5), min_size=n, max_size=n),
    st.lists(st.floats(-1, 6), min_size=n, max_size=n)))


@settings(max_examples=100, deadline=None)
@given(scores)
def test_pearson_and_spearman_match_scipy(pair) -> None:
    x, y = map(np.array, pair)
    assume(np.ptp(x) >= 1e-6 and np.ptp(y) >= 1e-6)  # constant input: the nan test below
    assert gm.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-9)
    assert gm.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-9)


@pytest.mark.parametrize("value", [2.0, 0.1])  # 0.1: its mean is not exactly 0.1 in floating point
def test_constant_side_gives_nan_correlations_as_scipy(value: float) -> None:
    constant, varying = np.full(3, value), np.arange(3.0) ** 1.5
    for x, y in ((constant, varying), (varying, constant)):
        assert math.isnan(gm.pearson(x, y)) and math.isnan(gm.spearman(x, y))
        assert math.isnan(gm.compute_metrics("sts-b", x, y)["corr"])


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40))
def test_average_ranks_match_scipy_rankdata(values) -> None:
    np.testing.assert_allclose(gm.average_ranks(np.array(values)), scipy.stats.rankdata(values))


def test_compute_metrics_keys_per_task() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0, 1, 0, 0, 1])
    m = gm.compute_metrics("mrpc", p, y)
    assert m["acc"] == pytest.approx(0.8) and m["f1"] == pytest.approx(0.8)
    assert m["acc_and_f1"] == pytest.approx(0.8)
    assert set(gm.compute_metrics("qqp", p, y)) == {"acc", "f1", "acc_and_f1"}
    assert set(gm.compute_metrics("cola", p, y)) == {"mcc"}
    for task in ("sst-2", "mnli", "mnli-mm", "qnli", "rte", "wnli"):
        assert gm.compute_metrics(task, p, y) == {"acc": pytest.approx(0.8)}
    sts = gm.compute_metrics("sts-b", np.array([0.1, 2.0, 4.0, 3.0]), np.array([0.0, 2.5, 5.0, 3.0]))
    assert sts["corr"] == pytest.approx((sts["pearson"] + sts["spearmanr"]) / 2)
    assert sts["spearmanr"] == pytest.approx(1.0)
    with pytest.raises(KeyError):
        gm.compute_metrics("squad", p, y)


def test_table_row_matches_the_seed_table_format(tmp_path: Path) -> None:
    # The Strided row of the seed table: 70.4 | 81.9/81.9 | 87.1 | 89.0 | 91.7 | 58.4 | 86.6 | 86.1 | 52.7 | 79.5
    results = {"mnli": {"acc": 0.819, "mm:acc": 0.819}, "qqp": {"acc": 0.871}, "qnli": {"acc": 0.890},
               "sst-2": {"acc": 0.917}, "cola": {"mcc": 0.584}, "sts-b": {"spearmanr": 0.866},
               "mrpc": {"f1": 0.861}, "rte": {"acc": 0.527}}
    row = gm.table_row(results, 0.70386, "Strided")
    assert row == "|Strided|70.4|81.9/81.9|87.1|89.0|91.7|58.4|86.6|86.1|52.7|79.5|"
    del results["rte"]
    assert gm.table_row(results, None).endswith("|-|82.8*|")
    for task, folder in gm.TASK_DIRS.items():
        if task in results:
            (tmp_path / folder).mkdir()
            (tmp_path / folder / "results.txt").write_text(json.dumps({**results[task], "mask_sparsity": 0.961}))
    loaded, sparsity = gm.load_results(tmp_path)
    assert {t: {k: v for k, v in r.items() if k != "mask_sparsity"} for t, r in loaded.items()} == results
    assert sparsity == 0.961


def test_table_cli(tmp_path: Path, capsys) -> None:
    assert gm.main(["table", str(tmp_path)]) == 1
    assert "no <TASK>/results.txt" in capsys.readouterr().err
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "results.txt").write_text(json.dumps({"acc": 0.5, "mask_sparsity": 0.5}))
    assert gm.main(["table", str(tmp_path), "--name", "Star"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("|mask|Sparsity ratio|MNLI-(m/mm)|")
    assert out[2] == "|Star|50.0|-/-|-|-|-|-|-|-|50.0|50.0*|"
