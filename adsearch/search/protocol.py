"""The evaluation protocol's shared pieces: the task (AD vs control, or the MMSE score), its metrics and
which way each one is better, speaker-grouped folds, targets permuted across speakers (the noise floor) and
the chance level of each metric. The search, its null studies, export and the report all use them, so they
live below all of those.
"""

from __future__ import annotations

import numpy as np

from adsearch.search.errors import StudyError

# What a metric scores when the features say nothing about the label. (For MMSE the floor depends on the
# data: the RMSE of predicting the training mean, measured on the study's folds by `search/baseline.py`.)
CHANCE = {"balanced_accuracy": 0.5, "roc_auc": 0.5, "r2": 0.0, "pearson_r": 0.0}

TASKS = ("classification", "mmse")  # ADReSSo task 1 (AD vs control) and task 2 (the MMSE score)
CLASSIFICATION_METRICS = ("balanced_accuracy", "accuracy", "f1", "roc_auc")
REGRESSION_METRICS = ("rmse", "mae", "r2", "pearson_r")
DEFAULT_METRIC = {"classification": "balanced_accuracy", "mmse": "rmse"}
LOWER_IS_BETTER = frozenset({"rmse", "mae"})
MMSE_RANGE = (0.0, 30.0)  # predictions are clipped to it


def direction(metric: str) -> str:
    """Optuna's study direction for a metric."""
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


def better(a: float, b: float, metric: str) -> bool:
    """Whether score `a` is at least as good as `b` under `metric` (ties count: a null search that equals the
    real best has reached it)."""
    return a <= b if metric in LOWER_IS_BETTER else a >= b


def improvement(a: float, b: float, metric: str) -> float:
    """How much better `a` is than `b` (positive: better), in the metric's own units."""
    return b - a if metric in LOWER_IS_BETTER else a - b


def null_best(floor: dict) -> float:
    """The best label-permuted search of a recorded noise floor, in its metric's direction (floors recorded
    before MMSE studies have no `null_best`: their metric was maximised)."""
    return floor.get("null_best", floor["null_max"])


def regression_metrics(y_true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, R2 and Pearson r, as scikit-learn and scipy define them, in plain numpy (tests compare)."""
    y, p = np.asarray(y_true, np.float64), np.asarray(predicted, np.float64)
    error = p - y
    total = float(np.sum((y - y.mean()) ** 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = float(np.corrcoef(y, p)[0, 1]) if len(y) > 1 and y.std() > 0 and p.std() > 0 else float("nan")
    return {"rmse": float(np.sqrt(np.mean(error**2))), "mae": float(np.mean(np.abs(error))),
            "r2": 1.0 - float(np.sum(error**2)) / total if total > 0 else float("nan"), "pearson_r": r}


def mmse_strata(mmse: np.ndarray, groups: np.ndarray, folds: int) -> np.ndarray:
    """MMSE bins for stratified folds: as many quantile bins (at most 5) as leave every bin at least `folds`
    speakers, so each fold spans the score range (severe cases are few: an unstratified fold may get none)."""
    speakers = len(set(groups))
    for n_bins in range(min(5, speakers // folds), 1, -1):
        edges = np.quantile(mmse, np.linspace(0, 1, n_bins + 1)[1:-1])
        bins = np.searchsorted(edges, mmse, side="right")
        if all(len(set(groups[bins == b])) >= folds for b in np.unique(bins)) and len(np.unique(bins)) == n_bins:
            return bins
    return np.zeros(len(mmse), np.int64)


class ProtocolError(ValueError):
    """Train data the CV protocol cannot work with (too few speakers per class, missing labels)."""


def assign_folds(labels: np.ndarray, groups: np.ndarray, folds: int, repeats: int, seed: int,
                 task: str = "classification") -> np.ndarray:
    """(repeats, n) fold index per item; a speaker's recordings always share a fold. Folds are stratified by
    label, or for an MMSE study (`labels` = the scores) by MMSE bins."""
    from sklearn.model_selection import StratifiedGroupKFold

    if task == "mmse":
        speakers = len(set(groups))
        if speakers < folds:
            raise ProtocolError(f"only {speakers} speaker(s) with an MMSE score in the train split: lower cv.folds "
                                f"to at most {speakers}")
        labels = mmse_strata(labels, groups, folds)
    for label in np.unique(labels) if task == "mmse" else (0, 1):
        speakers = len(set(groups[labels == label]))
        if speakers < 2 and task != "mmse":
            name = "AD (1)" if label == 1 else "control (0)"
            raise ProtocolError(f"the train split has {speakers} speaker(s) labelled {name}: a classifier needs "
                                "both classes, each from at least two speakers; check the manifest's labels")
        if speakers < folds:
            raise ProtocolError(f"only {speakers} speaker(s) with label {label} in the train split: "
                                f"lower cv.folds to at most {speakers}")
    assignment = np.empty((repeats, len(labels)), np.int64)
    for repeat in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            assignment[repeat, valid] = fold
    return assignment


def permute_labels(labels: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Labels permuted across speakers: each speaker's recordings share the label of another speaker."""
    speakers, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    per_speaker = labels[first]
    for speaker, label in zip(inverse, labels, strict=True):
        if per_speaker[speaker] != label:
            raise StudyError(f"speaker {str(speakers[speaker])!r} has recordings with different labels; a label "
                             "permutation across speakers needs one label per speaker")
    shuffled = np.random.default_rng(seed).permutation(per_speaker)
    return shuffled[inverse]
