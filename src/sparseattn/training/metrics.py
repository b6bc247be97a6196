"""GLUE's official metrics, in numpy: accuracy; F1 of the positive class (MRPC, QQP); Matthews
correlation (CoLA); Pearson and Spearman correlation (STS-B). Values are fractions in [0, 1] (or
[-1, 1] for correlations); reports print them x100 as papers do."""

from __future__ import annotations

import numpy as np


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    _check(pred, gold)
    return float((pred == gold).mean())


def f1(pred, gold, positive: int = 1) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN); 0 when there is no positive at all."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    _check(pred, gold)
    tp = float(((pred == positive) & (gold == positive)).sum())
    fp = float(((pred == positive) & (gold != positive)).sum())
    fn = float(((pred != positive) & (gold == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred, gold) -> float:
    """Matthews correlation of binary labels: (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)),
    0 when a marginal is empty (a constant prediction), as in scikit-learn."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    _check(pred, gold)
    p, g = pred == 1, gold == 1
    tp, tn = float((p & g).sum()), float((~p & ~g).sum())
    fp, fn = float((p & ~g).sum()), float((~p & g).sum())
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if den == 0 else (tp * tn - fp * fn) / float(np.sqrt(den))


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _check(x, y)
    xc, yc = x - x.mean(), y - y.mean()
    den = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return 0.0 if den == 0 else float((xc * yc).sum() / den)


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values, and its average rank
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Pearson correlation of the ranks (ties averaged)."""
    x, y = np.asarray(x), np.asarray(y)
    _check(x, y)
    return pearson(rankdata(x), rankdata(y))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute_metrics(names, predictions, labels) -> dict[str, float]:
    """{metric: value} for the given metric names. predictions: class ids (classification) or scores
    (regression), labels: the gold values, both length n."""
    return {n: METRICS[n](predictions, labels) for n in names}


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"metrics need two 1-D arrays of equal length, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("metrics need at least one example")
