"""Scoring one configuration: speaker-safe cross-validation on the train split, fold by fold.

The fold assignment is computed once per study (stratified by label, grouped by speaker) and stored with
it, so every worker scores against the same folds. Test items are never read: features are taken for the
train rows only. Window-level configurations train on the windows of the training recordings and
average the window scores of each validation recording, so windows of one recording never straddle folds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from adsearch.embed.cache import EmbeddingCache
from adsearch.search.classifiers import REGISTRY
from adsearch.search.space import TrialConfig


class ProtocolError(ValueError):
    pass


def assign_folds(labels: np.ndarray, groups: np.ndarray, folds: int, repeats: int, seed: int) -> np.ndarray:
    """(repeats, n) fold index per item; a speaker's recordings always share a fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    for label in (0, 1):
        speakers = len(set(groups[labels == label]))
        if speakers < folds:
            raise ProtocolError(f"only {speakers} speaker(s) with label {label} in the train split: "
                                f"lower cv.folds to at most {speakers}")
    assignment = np.empty((repeats, len(labels)), np.int64)
    for repeat in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            assignment[repeat, valid] = fold
    return assignment


def build_pipeline(config: TrialConfig, seed: int):
    """scale -> PCA -> L2 -> classifier, as an unfitted scikit-learn Pipeline."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    steps = []
    if config.scale == "standard":
        steps.append(("scale", StandardScaler()))
    if config.pca == "components":
        steps.append(("pca", PCA(n_components=config.pca_components, svd_solver="full", random_state=seed)))
    elif config.pca == "variance":
        steps.append(("pca", PCA(n_components=config.pca_variance, svd_solver="full")))
    if config.l2_normalize:
        steps.append(("l2", Normalizer()))
    steps.append(("classifier", REGISTRY[config.classifier].build(config.params, seed)))
    return Pipeline(steps)


def fit_pipeline(config: TrialConfig, X: np.ndarray, y: np.ndarray, seed: int):
    """Build and fit; settings the training data cannot support (more PCA components than samples, more
    neighbours than training points) are capped to what it allows."""
    if config.pca == "components" and config.pca_components > min(X.shape):
        config = config.model_copy(update={"pca_components": min(X.shape)})
    adapt = REGISTRY[config.classifier].fit_to_data
    if adapt is not None:
        config = config.model_copy(update={"params": adapt(config.params, len(X))})
    return build_pipeline(config, seed).fit(X, y)


def scores_of(model, X: np.ndarray) -> tuple[np.ndarray, float]:
    """Continuous scores for ROC AUC and the threshold that turns them into labels."""
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X)[:, 1], 0.5
    return model.decision_function(X), 0.0


def recording_scores(model, X: np.ndarray, owner: np.ndarray, n_items: int) -> tuple[np.ndarray, float]:
    """One score per recording (the mean of its window scores; one row per recording gives that row's
    score), and the threshold that makes a label of it. Recordings without a row get NaN."""
    score, threshold = scores_of(model, X)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(owner, score, n_items) / np.bincount(owner, minlength=n_items), threshold


def metrics(y_true: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, F1 and ROC AUC, as scikit-learn defines them, in plain numpy.

    scikit-learn's metric functions spend most of their time validating inputs: 40 ms a trial here,
    more than a logistic regression fit. tests/test_search.py checks these against scikit-learn.
    """
    from scipy.stats import rankdata

    truth = np.asarray(y_true).astype(bool)
    predicted = np.asarray(score) > threshold
    tp, fp = np.sum(predicted & truth), np.sum(predicted & ~truth)
    fn, tn = np.sum(~predicted & truth), np.sum(~predicted & ~truth)
    recalls = [r for r, n in ((tp / max(tp + fn, 1), tp + fn), (tn / max(tn + fp, 1), tn + fp)) if n]
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives and negatives:
        ranks = rankdata(score)  # ties get their average rank, as in the Mann-Whitney statistic
        auc = (ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    else:
        auc = float("nan")
    return {
        "balanced_accuracy": float(np.mean(recalls)),
        "accuracy": float((tp + tn) / len(truth)),
        "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0,
        "roc_auc": float(auc),
    }


class FeatureSource:
    """Train-split features of a cache, memoised per (layer, pooling, unit) within a byte budget."""

    def __init__(self, cache: EmbeddingCache, budget_bytes: int = 96 * 2**20):
        self.cache = cache
        self.train = np.flatnonzero(cache.splits == "train")
        if len(self.train) == 0:
            raise ProtocolError(f"{cache.path}: the cache has no train items")
        labels = cache.labels[self.train]
        if (labels < 0).any():
            raise ProtocolError(f"{cache.path}: some train items have no label")
        self.labels = labels
        self.groups = cache.groups[self.train]
        self.ids = [cache.ids[i] for i in self.train]
        # train-row index of each train window, in the order window_features(..., self.train) returns them
        self.window_owner = cache.window_owner(self.train)
        self._memo: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._budget = budget_bytes

    def get(self, layer: int, pooling: str, unit: str) -> np.ndarray:
        key = (layer, pooling, unit)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        # Only train rows are read from the cache: test items never enter a trial.
        if unit == "recording":
            features = self.cache.recording_features(layer, pooling, self.train)
        else:
            features = self.cache.window_features(layer, pooling, self.train)
        if features.nbytes <= self._budget // 2:  # huge window matrices are recomputed rather than kept
            self._memo[key] = features
            while sum(a.nbytes for a in self._memo.values()) > self._budget:
                self._memo.popitem(last=False)
        return features


@dataclass
class CVResult:
    fold_scores: list[float]  # the study metric, one per evaluated fold
    fold_metrics: list[dict[str, float]] = field(default_factory=list)
    fit_seconds: float = 0.0  # time inside fit and predict

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_scores))

    def summary(self) -> dict[str, float]:
        names = self.fold_metrics[0].keys() if self.fold_metrics else []
        return {name: float(np.nanmean([m[name] for m in self.fold_metrics])) for name in names}


def cross_validate(
    config: TrialConfig,
    source: FeatureSource,
    folds: np.ndarray,
    metric: str,
    seed: int,
    on_fold: Callable[[int, float], None] | None = None,
) -> CVResult:
    """Score `config` fold by fold; `on_fold(step, score)` may raise to stop early (pruning)."""
    X = source.get(config.layer, config.pooling, config.unit)
    y = source.labels
    result = CVResult([])
    n_folds = int(folds.max()) + 1
    for repeat, assignment in enumerate(folds):
        for fold in range(n_folds):
            valid = assignment == fold
            started = time.perf_counter()
            if config.unit == "recording":
                model = fit_pipeline(config, X[~valid], y[~valid], seed)
                score, threshold = scores_of(model, X[valid])
            else:
                owner = source.window_owner
                train_windows = ~valid[owner]
                model = fit_pipeline(config, X[train_windows], y[owner[train_windows]], seed)
                score, threshold = recording_scores(model, X[~train_windows], owner[~train_windows], len(y))
                score = score[valid]  # mean window score per validation recording
            result.fit_seconds += time.perf_counter() - started
            fold_metrics = metrics(y[valid], score, threshold)
            result.fold_metrics.append(fold_metrics)
            result.fold_scores.append(fold_metrics[metric])
            if on_fold:
                on_fold(repeat * n_folds + fold, fold_metrics[metric])
    return result
