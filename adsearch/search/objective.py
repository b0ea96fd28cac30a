"""Scoring one configuration: speaker-safe cross-validation on the train split, fold by fold, and the
`Objective` each trial of a study runs (suggest a configuration, cross-validate it, report every fold).

The fold assignment is computed once per study (stratified by label, grouped by speaker) and stored with
it, so every worker scores against the same folds. Test items are never read: features are taken for the
train rows only. Window-level configurations train on the windows of the training recordings and
average the window scores of each validation recording, so windows of one recording never straddle folds.
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import optuna

from adsearch.embed.cache import POOLINGS, EmbeddingCache
from adsearch.search.classifiers import REGISTRY
from adsearch.search.deconfound import adjusted_scores
from adsearch.search.protocol import MMSE_RANGE, ProtocolError, permute_labels, regression_metrics
from adsearch.search.space import TrialConfig, suggest

if TYPE_CHECKING:
    from adsearch.search.setup import StudySetup

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial: who ran it


CALIBRATION_FOLDS = 3  # inner stratified folds of CalibratedClassifierCV


def build_pipeline(config: TrialConfig, seed: int, in_place: bool = False, pca_by_covariance: bool = False):
    """scale (standardise, or TF-IDF-weigh counts) -> select (k best columns) -> PCA -> L2 -> classifier, as an
    unfitted Pipeline.
    `in_place=True` lets scaling
    and normalisation overwrite their input: for cross-validation, whose fold matrices are private copies,
    so a window-level fold does not hold a second full-size copy. `pca_by_covariance` suits more samples than
    features (see `CovariancePCA`)."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer

    from adsearch.search.estimators import BlockwiseStandardScaler, CovariancePCA, TfidfWeighting, UnivariateSelection

    steps = []
    if config.scale == "standard":
        steps.append(("scale", BlockwiseStandardScaler(copy=not in_place)))
    elif config.scale == "tfidf":
        steps.append(("scale", TfidfWeighting()))
    if config.select == "kbest":
        steps.append(("select", UnivariateSelection(k=config.select_k,
                                                    regression=REGISTRY[config.classifier].is_regressor)))
    if config.pca != "none":
        components = config.pca_components if config.pca == "components" else config.pca_variance
        pca = CovariancePCA(components) if pca_by_covariance else PCA(components, svd_solver="full")
        steps.append(("pca", pca))
    if config.l2_normalize:
        steps.append(("l2", Normalizer(copy=not in_place)))
    classifier = REGISTRY[config.classifier].build(config.params, seed)
    if config.calibration != "none":  # fitted on the training fold only: calibration never sees validation rows
        from sklearn.calibration import CalibratedClassifierCV

        classifier = CalibratedClassifierCV(classifier, method=config.calibration, cv=CALIBRATION_FOLDS)
    steps.append(("classifier", classifier))
    return Pipeline(steps)


def fit_pipeline(config: TrialConfig, X: np.ndarray, y: np.ndarray, seed: int, in_place: bool = False):
    """Build and fit; settings the training data cannot support (more PCA components than samples, more
    neighbours than training points) are capped to what it allows. With more samples than features
    (window-level), PCA diagonalises the d x d covariance: an SVD of the whole matrix takes several copies of
    it (800 MB on 6,400 windows x 3,072 features); with fewer (recording-level), the SVD is the cheap one."""
    if config.select == "kbest" and config.select_k > X.shape[1]:
        config = config.model_copy(update={"select_k": X.shape[1]})
    kept = config.select_k if config.select == "kbest" else X.shape[1]
    if config.pca == "components" and config.pca_components > min(X.shape[0], kept):
        config = config.model_copy(update={"pca_components": min(X.shape[0], kept)})
    adapt = REGISTRY[config.classifier].fit_to_data
    if adapt is not None:  # a calibrated classifier is fitted on the inner folds' training part
        n = len(X) if config.calibration == "none" else len(X) * (CALIBRATION_FOLDS - 1) // CALIBRATION_FOLDS
        config = config.model_copy(update={"params": adapt(config.params, n)})
    return build_pipeline(config, seed, in_place, pca_by_covariance=X.shape[0] > kept).fit(X, y)


def scores_of(model, X: np.ndarray) -> tuple[np.ndarray, float]:
    """Continuous scores for ROC AUC and the threshold that turns them into labels; for a regressor, its MMSE
    predictions clipped to 0-30 (threshold 0: no labels are made of them)."""
    from sklearn.base import is_regressor

    if is_regressor(model):
        return np.clip(model.predict(X), *MMSE_RANGE).astype(np.float64), 0.0
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
    score = np.asarray(score)
    predicted = score > threshold
    tp, fp = np.sum(predicted & truth), np.sum(predicted & ~truth)
    fn, tn = np.sum(~predicted & truth), np.sum(~predicted & ~truth)
    recalls = [r for r, n in ((tp / (tp + fn or 1), tp + fn), (tn / (tn + fp or 1), tn + fp)) if n]
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if not (positives and negatives):
        auc = float("nan")
    else:
        ranks = rankdata(score)  # ties get their average rank, as in the Mann-Whitney statistic
        auc = (ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    return {
        "balanced_accuracy": float(np.mean(recalls)),
        "accuracy": float((tp + tn) / (tp + tn + fp + fn)),
        "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0,
        "roc_auc": float(auc),
    }


def score_predictions(y_true: np.ndarray, score: np.ndarray, threshold: float, regression: bool) -> dict[str, float]:
    """Every metric of the task: classification metrics of scores, or regression metrics of MMSE predictions."""
    return regression_metrics(y_true, score) if regression else metrics(y_true, score, threshold)


def read_features(cache: EmbeddingCache, layer: int, pooling: str, unit: str, items: np.ndarray) -> np.ndarray:
    """The rows of `items` (sorted) for one unit: one per recording, or one per window in cache order."""
    if unit == "recording":
        return cache.recording_features(layer, pooling, items)
    return cache.window_features(layer, pooling, items)


class FeatureSource:
    """Train-split features of a cache, memoised per (layer, pooled statistic, unit) within a byte budget.

    A pooling is a concatenation of pooled statistics (mean+std+max = mean | std | max), so the memo keeps
    each statistic once and poolings that share one share its block: the recording-level statistics of all
    25 layers of an ADReSSo-sized cache (68 MB) fit, and a search that wanders across poolings stops
    re-reading the cache."""

    def __init__(self, cache: EmbeddingCache, null_seed: int | None = None, budget_bytes: int = 96 * 2**20,
                 task: str = "classification"):
        self.cache = cache
        self.task = task
        train = cache.splits == "train"
        if task == "mmse":  # recordings without a score are left out of an MMSE study (and counted)
            self.left_out = int(np.sum(train & np.isnan(cache.mmse)))
            train &= ~np.isnan(cache.mmse)
        else:
            self.left_out = 0
        self.train = np.flatnonzero(train)
        if len(self.train) == 0:
            raise ProtocolError(f"{cache.path}: the cache has no train items"
                                + (" with an MMSE score (the manifest's mmse column)" if task == "mmse" else ""))
        labels = cache.targets(task)[self.train]
        if task != "mmse" and (labels < 0).any():
            raise ProtocolError(f"{cache.path}: some train items have no label")
        self.groups = cache.groups[self.train]
        if null_seed is not None:  # a null study (adsearch/search/null.py): targets permuted across speakers
            labels = permute_labels(labels, self.groups, null_seed)
        self.labels = labels  # the targets: 0/1 labels, or MMSE scores for an MMSE study
        self.ids = [cache.ids[i] for i in self.train]
        # train-row index of each train window, in the order window_features(..., self.train) returns them
        self.window_owner = cache.window_owner(self.train)
        self._memo: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._budget = budget_bytes

    def get(self, layer: int, pooling: str, unit: str) -> np.ndarray:
        """All train rows (recordings, or the windows of the train recordings in cache order)."""
        return self.rows(layer, pooling, unit, np.ones(len(self.train), bool))

    def rows(self, layer: int, pooling: str, unit: str, chosen: np.ndarray) -> np.ndarray:
        """A private copy of the rows of the train recordings where `chosen` (a mask over them) is True, in
        `get`'s order (preprocessing may overwrite it in place). A matrix too large for the memo is read
        from the cache for these recordings only, so the whole of it never sits beside a fold's copy."""
        if not self._fits_memo(pooling, unit):
            self._memo.clear()  # the fold's matrices take the memo's place
            return self._read(layer, pooling, unit, self.train[chosen])
        picked = chosen if unit == "recording" else chosen[self.window_owner]
        statistics = POOLINGS[pooling]
        out = np.empty((int(picked.sum()), len(statistics) * self.cache.dim), np.float32)
        for i, statistic in enumerate(statistics):
            out[:, i * self.cache.dim:(i + 1) * self.cache.dim] = self.statistic(layer, statistic, unit)[picked]
        return out

    def statistic(self, layer: int, statistic: str, unit: str) -> np.ndarray:
        """One pooled statistic (mean, std, max, min) of all train rows, memoised (do not modify it)."""
        key = (layer, statistic, unit)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        features = self._read(layer, statistic, unit, self.train)
        self._memo[key] = features
        while sum(a.nbytes for a in self._memo.values()) > self._budget:
            self._memo.popitem(last=False)
        return features

    def _fits_memo(self, pooling: str, unit: str) -> bool:
        n_rows = len(self.train) if unit == "recording" else len(self.window_owner)
        return n_rows * len(POOLINGS[pooling]) * self.cache.dim * 4 <= self._budget // 2

    def _read(self, layer: int, pooling: str, unit: str, items: np.ndarray) -> np.ndarray:
        # Only train rows are read from the cache: test items never enter a trial.
        return read_features(self.cache, layer, pooling, unit, items)


class NonFiniteScores(ValueError):
    """A model's scores or predictions hold NaN or infinity: its trial fails with this reason instead of
    completing at a chance-like score."""


@dataclass
class CVResult:
    fold_scores: list[float]  # the study metric, one per evaluated fold (deconfounded, where nuisances were given)
    fold_metrics: list[dict[str, float]] = field(default_factory=list)  # plain: every metric, unweighted
    # of the predictions adjusted for the nuisances (`deconfound.adjusted`), where nuisances were given
    deconfounded_metrics: list[dict[str, float]] = field(default_factory=list)
    fit_seconds: float = 0.0  # time inside fit and predict (not reading or copying features)
    # out-of-fold score minus its threshold (> 0: AD; an MMSE study: the predicted score), one per repeat and
    # train recording; NaN where pruned
    oof: np.ndarray | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_scores))

    def summary(self, deconfounded: bool = False) -> dict[str, float]:
        folds = self.deconfounded_metrics if deconfounded else self.fold_metrics
        names = folds[0].keys() if folds else []
        return {name: float(np.nanmean([m[name] for m in folds])) for name in names}


def cross_validate(
    config: TrialConfig,
    source: FeatureSource,
    folds: np.ndarray,
    metric: str,
    seed: int,
    on_fold: Callable[[int, float], None] | None = None,
    nuisances: np.ndarray | None = None,
) -> CVResult:
    """Score `config` fold by fold; `on_fold(step, score)` may raise to stop early (pruning). `nuisances`
    (repeats, recordings: out-of-fold nuisance-model scores): deconfounded CV (`deconfound.py`): each fold is
    also scored on its predictions adjusted for the nuisances, and that score is the fold's (the plain one is
    kept beside it)."""
    features = config.layer, config.pooling, config.unit
    y, owner = source.labels, source.window_owner
    result = CVResult([], oof=np.full(folds.shape, np.nan, np.float32))
    regression = REGISTRY[config.classifier].is_regressor
    n_folds = int(folds.max()) + 1
    for repeat, assignment in enumerate(folds):
        for fold in range(n_folds):
            valid = assignment == fold
            valid_windows = valid[owner]
            train_labels = y[~valid] if config.unit == "recording" else y[owner[~valid_windows]]
            train_rows = source.rows(*features, ~valid)
            started = time.perf_counter()
            model = fit_pipeline(config, train_rows, train_labels, seed, in_place=True)
            result.fit_seconds += time.perf_counter() - started
            del train_rows  # the training and validation matrices never sit in memory together
            valid_rows = source.rows(*features, valid)
            started = time.perf_counter()
            if config.unit == "recording":
                score, threshold = scores_of(model, valid_rows)
            else:  # the mean window score of each validation recording
                score, threshold = recording_scores(model, valid_rows, owner[valid_windows], len(y))
                score = score[valid]
            result.fit_seconds += time.perf_counter() - started
            if not np.isfinite(score).all():
                bad = int(np.size(score) - np.count_nonzero(np.isfinite(score)))
                raise NonFiniteScores(f"repeat {repeat + 1}, fold {fold + 1}: {bad} of {np.size(score)} out-of-fold "
                                      f"{'predictions' if regression else 'scores'} are NaN or infinite; a trial is "
                                      "scored on numbers only")
            fold_metrics = score_predictions(y[valid], score, threshold, regression)
            result.oof[repeat, valid] = score - threshold
            result.fold_metrics.append(fold_metrics)
            if nuisances is not None:
                fair, fair_threshold = adjusted_scores(score, threshold, y[valid], nuisances[repeat, valid],
                                                       not regression and threshold == 0.5)
                fold_metrics = score_predictions(y[valid], fair, fair_threshold, regression)
                result.deconfounded_metrics.append(fold_metrics)
            result.fold_scores.append(fold_metrics[metric])
            if on_fold:
                on_fold(repeat * n_folds + fold, fold_metrics[metric])
    return result


OOF_ATTR = "adsearch:oof"  # trial system attribute: the out-of-fold scores of a completed trial


def encode_oof(oof: np.ndarray) -> dict:
    """float32 bytes in base64 (about 0.9 kB for 166 recordings and one repeat), not a JSON list of floats
    (three times that): thousands of trials stay small in a PostgreSQL study."""
    import base64

    data = np.ascontiguousarray(oof, dtype="<f4")
    return {"shape": list(data.shape), "float32_le_base64": base64.b64encode(data.tobytes()).decode("ascii")}


def oof_predictions(trial: optuna.trial.FrozenTrial) -> np.ndarray | None:
    """A completed trial's out-of-fold scores minus thresholds, (repeats, train recordings) in the study's
    train order; None for trials that kept none (pruned, failed, or run before adsearch stored them)."""
    import base64

    stored = trial.system_attrs.get(OOF_ATTR)
    if not stored:
        return None
    values = np.frombuffer(base64.b64decode(stored["float32_le_base64"]), dtype="<f4")
    return values.reshape(stored["shape"]).astype(np.float32)


class Objective:
    """Callable for `study.optimize`: suggest a config, cross-validate it, report each fold."""

    def __init__(self, setup: StudySetup, cache: EmbeddingCache | dict[str | None, EmbeddingCache],
                 on_sampled: Callable[[], None] | None = None, sampler_label: str | None = None):
        self.setup = setup
        self.on_sampled = on_sampled  # e.g. send the trial's waiting writes (its worker) once it is set up
        self.sampler_label = sampler_label  # recorded on each trial when it differs from the study's sampler
        caches = cache if isinstance(cache, dict) else {None: cache}
        # one FeatureSource per feature source (a study over one cache has the single key None)
        self.sources = {name: FeatureSource(one, setup.null_seed, task=setup.spec.task)
                        for name, one in caches.items()}
        self.source = next(iter(self.sources.values()))
        if any(source.ids != setup.train_ids for source in self.sources.values()):
            raise ProtocolError("the cache's train items differ from the study's fold assignment")
        self.layers = setup.layers

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", WORKER_ID)
        if self.sampler_label:
            trial.set_user_attr("sampler", self.sampler_label)
        try:
            return self._evaluate(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # kept on the trial: Optuna 5 records no reason for a failure
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            raise

    def _evaluate(self, trial: optuna.Trial) -> float:
        config = suggest(trial, self.setup.spec, self.layers, self.setup.source_layers, self.setup.one_vector_sources)
        if self.on_sampled is not None:
            self.on_sampled()
        spec = self.setup.spec

        scores: list[float] = []
        prunes = not isinstance(trial.study.pruner, optuna.pruners.NopPruner)
        n_steps = self.setup.folds.shape[0] * (int(self.setup.folds.max()) + 1)

        def report(step: int, score: float) -> None:
            scores.append(score)
            trial.report(score, step)
            # After the last fold nothing is left to save: the trial is complete, whatever a pruner says.
            if prunes and step + 1 < n_steps and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after fold {step + 1}")

        pruned = None
        try:
            result = cross_validate(config, self.sources[config.source], self.setup.folds, spec.cv.metric, spec.seed,
                                    report, self.setup.nuisances)
        except optuna.TrialPruned as exc:
            pruned, result = exc, None
        # Flat attributes read well as dashboard columns; per-fold scores are the intermediate values and
        # the trial's duration is the dashboard's own column (each attribute is one storage write).
        attrs = {"cv_std": round(float(np.std(scores)), 6), "folds_run": len(scores)}
        if result is not None:
            attrs.update({f"cv_{name}": round(value, 6) for name, value in result.summary().items()})
            attrs.update({f"deconfounded_{name}": round(value, 6)
                          for name, value in result.summary(deconfounded=True).items()})
            attrs["fit_seconds"] = round(result.fit_seconds, 4)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if pruned is not None:
            raise pruned
        # a system attribute: ensembles and calibration read it, the dashboard's attribute table does not
        trial.storage.set_trial_system_attr(trial._trial_id, OOF_ATTR, encode_oof(result.oof))
        return result.mean
