"""GLUE metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from sparseattn.training.metrics import accuracy, compute_metrics, f1, matthews, pearson, rankdata, spearman

PRED = [1, 1, 0, 1, 0, 0, 1, 0]
GOLD = [1, 0, 0, 1, 1, 0, 1, 0]  # TP=3, FP=1, FN=1, TN=3


def test_accuracy_f1_matthews_by_hand():
    assert accuracy(PRED, GOLD) == 6 / 8
    assert f1(PRED, GOLD) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    assert matthews(PRED, GOLD) == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))  # 0.5
    # asymmetric case: TP=2, FP=2, FN=1, TN=1
    p, g = [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0]
    assert f1(p, g) == pytest.approx(4 / 7)
    assert matthews(p, g) == pytest.approx((2 * 1 - 2 * 1) / math.sqrt(4 * 3 * 3 * 2))  # 0
    p, g = [1, 0, 0, 0, 1], [1, 0, 1, 0, 0]  # TP=1 FP=1 FN=1 TN=2
    assert matthews(p, g) == pytest.approx((1 * 2 - 1 * 1) / math.sqrt(2 * 2 * 3 * 3))  # 1/6


def test_degenerate_cases():
    assert matthews([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction
    assert f1([0, 0], [0, 0]) == 0.0
    assert matthews([1, 0], [1, 0]) == 1.0 and matthews([0, 1], [1, 0]) == -1.0
    with pytest.raises(ValueError, match="equal length"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="at least one"):
        pearson([], [])


def test_pearson_spearman_by_hand():
    x, y = [1.0, 2.0, 3.0], [2.0, 4.0, 7.0]
    # means 2 and 13/3; deviations (-1,0,1) and (-7/3,-1/3,8/3): cov 5, var 2 and 114/9
    assert pearson(x, y) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert spearman(x, y) == pytest.approx(1.0)  # monotone
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4)
    assert rankdata([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    assert spearman([10, 20, 20, 30], [1, 2, 3, 4]) == pytest.approx(pearson(rx, ry))
    assert pearson(rx, ry) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_compute_metrics_by_name():
    out = compute_metrics(("f1", "accuracy"), np.array(PRED), np.array(GOLD))
    assert out == {"f1": pytest.approx(0.75), "accuracy": 0.75}
