"""How far a classifier's probabilities can be read as probabilities: the Brier score, the expected calibration
error and the reliability table behind a reliability diagram.

A screening tool reports P(AD), and a clinician reads 0.8 as "eight in ten". Classifiers chosen for balanced
accuracy need not be calibrated at all, so the report shows how far the held-out test's probabilities are
from the observed frequencies. Bins are scikit-learn's `calibration_curve(strategy="uniform")` bins.
"""

from __future__ import annotations

import numpy as np


def reliability_bins(y: np.ndarray, probability: np.ndarray, n_bins: int = 10) -> list[dict]:
    """The non-empty bins of equal width over [0, 1]: how many recordings, their mean predicted probability
    and the share that is AD."""
    y, probability = np.asarray(y, float), np.asarray(probability, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges[1:-1], probability)  # as calibration_curve bins them (an edge: the lower bin)
    rows = []
    for b in range(n_bins):
        chosen = index == b
        if chosen.any():
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(chosen.sum()),
                         "mean_predicted": float(probability[chosen].mean()), "observed": float(y[chosen].mean())})
    return rows


def calibration_report(y: np.ndarray, probability: np.ndarray, n_bins: int = 10) -> dict:
    """Brier score (mean squared error of the probabilities: 0.25 is what always saying 0.5 scores), expected
    calibration error (the bins' |mean predicted - observed|, weighted by their size) and the bins."""
    y, probability = np.asarray(y, float), np.asarray(probability, float)
    bins = reliability_bins(y, probability, n_bins)
    ece = sum(row["n"] * abs(row["mean_predicted"] - row["observed"]) for row in bins) / len(y)
    return {"brier": float(np.mean((probability - y) ** 2)), "ece": float(ece), "n_bins": n_bins, "bins": bins}
