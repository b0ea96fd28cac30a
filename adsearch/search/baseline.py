"""The duration-only baseline: what recording length and speaking time alone score under a study's own folds.

On DementiaBank, how long a recording runs and how long the participant speaks differ between the groups
(impaired speakers describe the picture more slowly, with more and longer pauses). A model can therefore
score well above chance with no information about the voice or the words, and a study's best is only as
interesting as its margin over this number. Every study computes it at creation, records it, and the search
summary, the study note and the report show it beside the best score.
"""

from __future__ import annotations

import numpy as np

from adsearch.embed.cache import EmbeddingCache
from adsearch.search.objective import metrics
from adsearch.search.protocol import MMSE_RANGE, improvement, null_best, regression_metrics

DURATION_ATTR = "adsearch:duration_baseline"  # study system attribute
FEATURES = {"recording_seconds": "recording length (the audio file's header)",
            "speech_seconds": "speaking time (the participant speech extraction used)",
            "segments": "number of speech segments (the manifest's)"}


def duration_features(cache: EmbeddingCache, items: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One row per item of `items`: the duration features this cache can tell (speaking time always;
    recording length where every audio file is readable; segments where the manifest is)."""
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
    names = [name for name in FEATURES if name in columns]
    return np.column_stack([columns[name] for name in names]), names


def _recording_seconds(cache: EmbeddingCache, items: np.ndarray) -> np.ndarray | None:
    from adsearch.io.audio import AudioError, audio_duration

    try:
        return np.array([audio_duration(cache.meta["items"][i]["path"]) for i in items])
    except (AudioError, OSError, KeyError, ValueError):
        return None  # moved, unreadable or synthetic: the baseline goes on without it


def _segment_counts(cache: EmbeddingCache, items: np.ndarray) -> np.ndarray | None:
    from adsearch.corpus import CorpusError, read_manifest

    path = cache.meta.get("manifest", {}).get("path")
    if not path:
        return None
    try:
        counts = {rec.id: max(len(rec.segments), 1) for rec in read_manifest(path, check_files=False)}
        return np.array([counts[cache.ids[i]] for i in items], np.float64)
    except (CorpusError, OSError, KeyError):
        return None


def duration_baseline(cache: EmbeddingCache, folds: np.ndarray, metric: str, seed: int = 0,
                      task: str = "classification") -> dict:
    """The CV score (the study's folds and metric) of a standardised logistic regression on the log of the
    duration features of the train recordings; for an MMSE study a ridge regression on them, beside the
    floor every MMSE figure needs: predicting each training fold's mean score."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    regression = task == "mmse"
    train = cache.splits == "train"
    train = np.flatnonzero(train & ~np.isnan(cache.mmse) if regression else train)
    targets = cache.targets(task)[train]
    X, names = duration_features(cache, train)
    X = np.log1p(np.maximum(X, 0))
    scores, floor = [], []
    for assignment in folds:
        for fold in range(int(folds.max()) + 1):
            valid = assignment == fold
            model = make_pipeline(StandardScaler(), Ridge(alpha=1.0) if regression
                                  else LogisticRegression(random_state=seed))
            model.fit(X[~valid], targets[~valid])
            if regression:
                predicted = np.clip(model.predict(X[valid]), *MMSE_RANGE)
                scores.append(regression_metrics(targets[valid], predicted)[metric])
                mean = np.full(int(valid.sum()), targets[~valid].mean())
                floor.append(regression_metrics(targets[valid], mean)[metric])
            else:
                scores.append(metrics(targets[valid], model.decision_function(X[valid]), 0.0)[metric])
    baseline = {"cv": float(np.mean(scores)), "std": float(np.std(scores)), "metric": metric, "features": names,
                "model": ("standardised ridge regression on log durations" if regression
                          else "standardised logistic regression on log durations"), "fold_scores": scores}
    if regression:
        baseline["mean_predictor"] = {"cv": float(np.nanmean(floor)), "std": float(np.nanstd(floor)),
                                      "fold_scores": floor}
    return baseline


def describe(baseline: dict) -> str:
    text = (f"{baseline['cv']:.4f} +/- {baseline['std']:.4f} ({baseline['model']}: "
            f"{', '.join(baseline['features'])})")
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


def duration_warning(best: float, baseline: dict, floor: dict | None = None) -> str | None:
    """A warning when the best score does not clear the duration baseline by more than a search over noise
    finds above chance (the noise floor's margin), or at all when no noise floor was measured."""
    metric = baseline["metric"]
    chance = chance_level(baseline, metric)
    margin = max(0.0, improvement(null_best(floor), chance, metric)) \
        if floor and floor.get("n") and chance is not None else 0.0
    if improvement(best, baseline["cv"], metric) > margin:
        return None
    how = f"by more than the noise floor's margin ({margin:.3f})" if margin else "at all"
    return (f"the best CV {best:.4f} does not beat the duration-only baseline {baseline['cv']:.4f} {how}: "
            "recording length and speaking time may explain the score")


def load_duration_baseline(study) -> dict | None:
    """The baseline a study recorded at creation (None for null studies and studies made before it existed)."""
    return study._storage.get_study_system_attrs(study._study_id).get(DURATION_ATTR)
