"""Statistics of a small held-out test split: intervals, paired comparisons, and chance beside every figure."""

from __future__ import annotations

import numpy as np

from adsearch.search.objective import metrics
from adsearch.search.protocol import improvement, regression_metrics


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson score interval for a proportion (good at n = 71 and near 0 or 1, unlike the normal one)."""
    if n == 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    interval = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def bootstrap_interval(y: np.ndarray, score: np.ndarray, threshold: float, metric: str, n: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over recordings (resamples lacking a class are redrawn)."""
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n:
        pick = rng.integers(0, len(y), len(y))
        if len(set(y[pick])) == 2:
            values.append(metrics(y[pick], score[pick], threshold)[metric])
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact (binomial) McNemar test on the recordings where exactly one system is right."""
    from scipy.stats import binomtest

    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_best_right": only_a, "only_other_right": only_b, "p_value": float(p)}


def regression_bootstrap(y: np.ndarray, predicted: np.ndarray, n: int = 2000, seed: int = 0
                         ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over recordings of every regression metric at once."""
    rng = np.random.default_rng(seed)
    values = [regression_metrics(y[pick], predicted[pick])
              for pick in (rng.integers(0, len(y), len(y)) for _ in range(n))]
    return {name: tuple(float(v) for v in np.nanpercentile([v[name] for v in values], [2.5, 97.5]))
            for name in values[0]}


def paired_bootstrap(y: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray, metric: str,
                     n: int = 2000, seed: int = 0) -> dict:
    """How much better system a is than b on the same recordings (`improvement` in the metric's units), with
    a percentile interval and a two-sided bootstrap p-value (twice the share of resamples on the other side
    of 0): the regression counterpart of McNemar's test."""
    rng = np.random.default_rng(seed)

    def gain(pick):
        return improvement(regression_metrics(y[pick], predicted_a[pick])[metric],
                           regression_metrics(y[pick], predicted_b[pick])[metric], metric)

    observed = gain(np.arange(len(y)))
    draws = np.array([gain(rng.integers(0, len(y), len(y))) for _ in range(n)])
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    side = np.mean(draws <= 0) if observed > 0 else np.mean(draws >= 0)
    return {"metric": metric, "improvement": float(observed), "ci95": (float(low), float(high)),
            "p_value": float(min(1.0, 2 * side)), "method": "paired bootstrap over recordings"}


def mmse_test_report(y: np.ndarray, predicted: np.ndarray, train_mean: float, seed: int) -> dict:
    """RMSE, MAE, R2 and Pearson r of MMSE predictions with bootstrap intervals, beside the floor: the same
    metrics for predicting the training mean for every recording."""
    values = regression_metrics(y, predicted)
    intervals = regression_bootstrap(y, predicted, seed=seed)
    floor = regression_metrics(y, np.full(len(y), train_mean))
    return {"n": len(y), **{name: {"value": values[name], "ci95": intervals[name], "method": "bootstrap"}
                            for name in values},
            "mean_predictor": {"train_mean": train_mean, "rmse": floor["rmse"], "mae": floor["mae"]},
            "chance": {**floor, "pearson_r": 0.0,  # a constant has no correlation (scipy: NaN)
                       "how": f"predicting the training split's mean MMSE ({train_mean:.2f}) for every recording"}}


def test_report(y: np.ndarray, score: np.ndarray, threshold: float, seed: int) -> dict:
    predicted = (score > threshold).astype(int)
    tp, tn = int(np.sum((predicted == 1) & (y == 1))), int(np.sum((predicted == 0) & (y == 0)))
    fp, fn = int(np.sum((predicted == 1) & (y == 0))), int(np.sum((predicted == 0) & (y == 1)))
    values = metrics(y, score, threshold)
    n = len(y)
    return {
        "n": n,
        "accuracy": {"value": values["accuracy"], "ci95": wilson(tp + tn, n), "method": "Wilson"},
        "sensitivity": {"value": tp / max(tp + fn, 1), "ci95": wilson(tp, tp + fn), "method": "Wilson"},
        "specificity": {"value": tn / max(tn + fp, 1), "ci95": wilson(tn, tn + fp), "method": "Wilson"},
        "balanced_accuracy": {"value": values["balanced_accuracy"],
                              "ci95": bootstrap_interval(y, score, threshold, "balanced_accuracy", seed=seed),
                              "method": "bootstrap"},
        "f1": {"value": values["f1"], "ci95": bootstrap_interval(y, score, threshold, "f1", seed=seed),
               "method": "bootstrap"},
        "roc_auc": {"value": values["roc_auc"], "ci95": bootstrap_interval(y, score, threshold, "roc_auc", seed=seed),
                    "method": "bootstrap"},
        "confusion": {"labels": ["control", "AD"], "matrix": [[tn, fp], [fn, tp]]},
        "chance": classification_chance(y),
    }


def classification_chance(y: np.ndarray) -> dict:
    """What the test metrics score with no information: the best constant prediction for each (the majority
    class for accuracy, AD for F1), 0.5 for the metrics no constant can move."""
    share = float(np.mean(y == 1))
    return {"accuracy": max(share, 1 - share), "balanced_accuracy": 0.5, "f1": 2 * share / (1 + share),
            "roc_auc": 0.5, "how": "a constant prediction: the majority class (accuracy), AD for every recording "
                                   "(F1); any constant (balanced accuracy, ROC AUC)"}
