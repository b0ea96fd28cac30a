"""The nuisance-only baseline: what recording conditions alone score under a study's own folds.

On DementiaBank, how long a recording runs and how long the participant speaks differ between the groups
(impaired speakers describe the picture more slowly, with more and longer pauses), and so can how the
recordings were made (device, room, level: the groups were not always recorded alike). A model can therefore
score well above chance with no information about the voice or the words, and a study's best is only as
interesting as its margin over this number. Every study scores a model of these nuisances alone at creation:
recording length, speaking time and segment count; where extraction measured them, the recording's level,
noise floor, signal-to-noise ratio, clipping, sample rate and channels; and the manifest's own nuisance
columns (`nuisance_age`, `nuisance_site`, ...). It records the score and a permutation p-value, the search
summary, study note, export and report show it beside the best score, and it decides whether the study scores
its trials deconfounded (`deconfound.py`).
"""

from __future__ import annotations

import numpy as np

from adsearch.embed.cache import EmbeddingCache
from adsearch.search.objective import metrics
from adsearch.search.protocol import MMSE_RANGE, improvement, null_best, permute_labels, regression_metrics

NUISANCE_ATTR = "adsearch:duration_baseline"  # study system attribute (its name from when it held durations only)
DURATIONS = {"recording_seconds": "recording length (the audio file's header)",
             "speech_seconds": "speaking time (the participant speech extraction used)",
             "segments": "number of speech segments (the manifest's)"}
CONDITIONS = ("level_dbfs", "noise_floor_dbfs", "snr_db", "clipped_share", "sample_rate", "channels")
PERMUTATIONS = 49  # of the baseline's p-value (at least 0.02): labels permuted across speakers, the same folds


def nuisance_features(cache: EmbeddingCache, items: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One row per item of `items`: log durations, the recording conditions extraction measured (where every
    item has them), the manifest's nuisance columns (numbers as they are, categories one-hot, missing values the
    column's mean); columns that do not vary over `items` are left out."""
    duration, names = duration_features(cache, items)
    columns = list(np.log1p(np.maximum(duration, 0)).T)
    meta = [cache.meta["items"][i] for i in items]
    if all("conditions" in item for item in meta):
        for name in CONDITIONS:
            columns.append(np.array([float(item["conditions"][name]) for item in meta]))
            names.append(name)
    for name in sorted({key for item in meta for key in item.get("covariates", {})}):
        values = [item.get("covariates", {}).get(name, "") for item in meta]
        numbers = _numbers(values)
        if numbers is not None:
            columns.append(np.where(np.isnan(numbers), np.nanmean(numbers), numbers))
            names.append(f"nuisance_{name}")
        else:
            for level in sorted(set(values)):
                columns.append(np.array([value == level for value in values], np.float64))
                names.append(f"nuisance_{name}={level or '(missing)'}")
    X = np.column_stack(columns)
    varies = X.std(axis=0) > 0
    return X[:, varies], [name for name, keep in zip(names, varies, strict=True) if keep]


def _numbers(values: list[str]) -> np.ndarray | None:
    """The values as numbers (empty: NaN), or None when any is not a number (then the column is categories)."""
    try:
        numbers = np.array([float(value) if value else np.nan for value in values])
    except ValueError:
        return None
    return numbers if np.isfinite(numbers[~np.isnan(numbers)]).all() and not np.isnan(numbers).all() else None


def duration_features(cache: EmbeddingCache, items: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One row per item of `items`: the duration features this cache can tell (speaking time always;
    recording length where every audio file's header (or extraction) says it; segments where the cache or the
    manifest does)."""
    windows = cache.meta["windows"]
    owner = np.asarray(windows["item"], np.int64)
    samples = np.asarray(windows["end_sample"], np.float64) - np.asarray(windows["start_sample"], np.float64)
    speech = np.bincount(owner, samples, len(cache.ids)) / cache.meta.get("settings", {}).get("sample_rate", 16000)
    columns = {"speech_seconds": speech[items]}
    lengths = _recording_seconds(cache, items)
    if lengths is not None:
        columns["recording_seconds"] = lengths
    segments = _segment_counts(cache, items)
    if segments is not None:
        columns["segments"] = segments
    names = [name for name in DURATIONS if name in columns]
    return np.column_stack([columns[name] for name in names]), names


def _recording_seconds(cache: EmbeddingCache, items: np.ndarray) -> np.ndarray | None:
    from adsearch.io.audio import AudioError, audio_duration

    meta = [cache.meta["items"][i] for i in items]
    if all("conditions" in item for item in meta):
        return np.array([item["conditions"]["seconds"] for item in meta], np.float64)
    try:
        return np.array([audio_duration(cache.meta["items"][i]["path"]) for i in items])
    except (AudioError, OSError, KeyError, ValueError):
        return None  # moved, unreadable or synthetic: the baseline goes on without it


def _segment_counts(cache: EmbeddingCache, items: np.ndarray) -> np.ndarray | None:
    from adsearch.corpus import CorpusError, read_manifest

    meta = [cache.meta["items"][i] for i in items]
    if all("segments" in item.get("conditions", {}) for item in meta):
        return np.array([max(item["conditions"]["segments"], 1) for item in meta], np.float64)
    path = cache.meta.get("manifest", {}).get("path")
    if not path:
        return None
    try:
        counts = {rec.id: max(len(rec.segments), 1) for rec in read_manifest(path, check_files=False)}
        return np.array([counts[cache.ids[i]] for i in items], np.float64)
    except (CorpusError, OSError, KeyError):
        return None


def nuisance_baseline(cache: EmbeddingCache, folds: np.ndarray, metric: str, seed: int = 0,
                      task: str = "classification") -> dict:
    """The CV score (the study's folds and metric) of a standardised logistic regression on the nuisance
    features of the train recordings (`nuisance_features`); for an MMSE study a ridge regression on them, beside
    the floor every MMSE figure needs: predicting each training fold's mean score. `p_value`: how often the same
    model scores at least as well with the targets permuted across speakers (`PERMUTATIONS` times); for MMSE,
    "as well" is the gain over each fold's mean predictor, since permuted scores no longer fill the folds as
    evenly as the stratification filled them with the real ones (which alone made real scores look better)."""
    regression = task == "mmse"
    train = cache.splits == "train"
    train = np.flatnonzero(train & ~np.isnan(cache.mmse) if regression else train)
    targets = cache.targets(task)[train]
    X, names = nuisance_features(cache, train)
    scores, floor = _fold_scores(X, targets, folds, metric, seed, regression)
    mean = float(np.nanmean(scores))
    groups = cache.groups[train]

    def statistic(fold_scores: list[float], fold_floor: list[float]) -> float:
        return improvement(np.nanmean(fold_scores), np.nanmean(fold_floor), metric) if regression else \
            improvement(np.nanmean(fold_scores), 0.0, metric)

    real = statistic(scores, floor)
    nulls = [statistic(*_fold_scores(X, permute_labels(targets, groups, seed + 1 + i), folds, metric, seed,
                                     regression)) for i in range(PERMUTATIONS)]
    beaten = sum(null >= real for null in nulls)
    described = "durations" + (", recording conditions" if any(n in CONDITIONS for n in names) else "") + (
        ", the manifest's nuisance columns" if any(n.startswith("nuisance_") for n in names) else "")
    baseline = {"cv": mean, "std": float(np.nanstd(scores)), "metric": metric, "features": names,
                "model": (f"standardised {'ridge' if regression else 'logistic'} regression on {described}"),
                "fold_scores": scores, "p_value": (1 + beaten) / (1 + PERMUTATIONS), "permutations": PERMUTATIONS}
    if regression:
        baseline["mean_predictor"] = {"cv": float(np.nanmean(floor)), "std": float(np.nanstd(floor)),
                                      "fold_scores": floor}
    return baseline


def _fold_scores(X: np.ndarray, targets: np.ndarray, folds: np.ndarray, metric: str, seed: int, regression: bool
                 ) -> tuple[list[float], list[float]]:
    """Fold scores of the nuisance model, and (MMSE) of predicting the training part's mean."""
    from adsearch.search.deconfound import nuisance_model

    scores, floor = [], []
    for assignment in folds:
        for fold in range(int(folds.max()) + 1):
            valid = assignment == fold
            if not regression and len(np.unique(targets[~valid])) < 2:  # permuted labels of a tiny corpus
                scores.append(float("nan"))
                continue
            model = nuisance_model(regression, seed).fit(X[~valid], targets[~valid])
            if regression:
                predicted = np.clip(model.predict(X[valid]), *MMSE_RANGE)
                scores.append(regression_metrics(targets[valid], predicted)[metric])
                mean = np.full(int(valid.sum()), targets[~valid].mean())
                floor.append(regression_metrics(targets[valid], mean)[metric])
            else:
                scores.append(metrics(targets[valid], model.decision_function(X[valid]), 0.0)[metric])
    return scores, floor


def describe(baseline: dict) -> str:
    text = (f"{baseline['cv']:.4f} +/- {baseline['std']:.4f} ({baseline['model']}: "
            f"{', '.join(baseline['features'])}"
            + (f"; permutation p = {baseline['p_value']:.3f}" if "p_value" in baseline else "") + ")")
    if "mean_predictor" in baseline:
        text += f"; predicting the training folds' mean MMSE: {baseline['mean_predictor']['cv']:.4f}"
    return text


def chance_level(baseline: dict | None, metric: str) -> float | None:
    """What the metric scores with no information: the fixed chance level, or for RMSE and MAE the mean
    predictor's CV measured on the study's folds."""
    from adsearch.search.protocol import CHANCE

    if metric in CHANCE:
        return CHANCE[metric]
    return (baseline or {}).get("mean_predictor", {}).get("cv")


def nuisance_warning(best: float, baseline: dict, floor: dict | None = None) -> str | None:
    """A warning when the best score does not clear the nuisance baseline by more than a search over noise
    finds above chance (the noise floor's margin), or at all when no noise floor was measured."""
    metric = baseline["metric"]
    chance = chance_level(baseline, metric)
    margin = max(0.0, improvement(null_best(floor), chance, metric)) \
        if floor and floor.get("n") and chance is not None else 0.0
    if improvement(best, baseline["cv"], metric) > margin:
        return None
    how = (f"by more than the best label-permuted search got above chance ({margin:+.3f} {metric})" if margin
           else "at all")
    return (f"the best CV {best:.4f} does not beat the nuisance-only baseline {baseline['cv']:.4f} {how}: "
            "recording length, speaking time and how the recordings were made may explain the score")


def nuisance_gate(score: float, fold_scores: list[float], baseline: dict | None, floor: dict | None,
                  deconfounded: bool) -> str | None:
    """Why `export` stops (None: it goes on). A plain study's `score` must clear the nuisance-only baseline
    (`nuisance_warning`); a deconfounded study's must clear chance, where riding the nuisances scores, by the
    larger of two standard errors of its fold scores and the noise floor's margin."""
    if not baseline:
        return None
    if not deconfounded:
        return nuisance_warning(score, baseline, floor)
    metric = baseline["metric"]
    chance = chance_level(baseline, metric)
    if chance is None:
        return None
    folds = np.asarray(fold_scores, np.float64)
    error = float(folds.std() / np.sqrt(max(len(folds), 1)))
    noise = max(0.0, improvement(null_best(floor), chance, metric)) if floor and floor.get("n") else 0.0
    margin = max(2 * error, noise)
    if improvement(score, chance, metric) > margin:
        return None
    return (f"the deconfounded CV {score:.4f} is not above chance ({chance:.4f}) by more than {margin:.3f} ("
            + ("what the best label-permuted search got above chance" if noise >= 2 * error
               else "two standard errors of its fold scores")
            + "): with what recording length, speaking time and how the recordings were made say taken out of its "
              "predictions, it scores like chance, so its plain score rides those nuisances")


def load_nuisance_baseline(study) -> dict | None:
    """The baseline a study recorded at creation (None for null studies and studies made before it existed)."""
    return study._storage.get_study_system_attrs(study._study_id).get(NUISANCE_ATTR)
