"""From a study to a usable classifier: exported config, refit, held-out test evaluation, top-k comparison.

The test split is read here and nowhere else, after the configuration is frozen. Every look at the test
labels is recorded on the study, so a reader of the results can tell how often the test set was consulted.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adsearch import __version__
from adsearch.embed.cache import POOLINGS, EmbeddingCache
from adsearch.io.outputs import check_new_folder, folder_written_whole
from adsearch.io.safeyaml import YamlError, load_yaml
from adsearch.results.calibration import calibration_report
from adsearch.search.baseline import duration_warning, load_duration_baseline
from adsearch.search.objective import (
    cross_validate,
    fit_pipeline,
    metrics,
    oof_predictions,
    read_features,
    recording_scores,
)
from adsearch.search.plugins import PluginError, check_digests, module_digest, plugin_of
from adsearch.search.protocol import (
    CHANCE,
    assign_folds,
    better,
    direction,
    improvement,
    null_best,
    regression_metrics,
)
from adsearch.search.space import PipelineSettings, TrialConfig, fixed_params_problems

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.skops"
# The exact types beyond skops' own safe defaults that a model adsearch exports can hold: measured with
# `skops.io.get_untrusted_types` over every registry classifier, every categorical option, every preprocessing
# (tests/test_hardening.py re-measures it). Never a module prefix: `builtins.`, `numpy.` or `scipy.` would
# admit eval, exec, numpy.load and the numpy.testing helpers, which run code when a model is loaded.
TRUSTED_TYPES = frozenset({
    "adsearch.search.estimators.BlockwiseStandardScaler",
    "adsearch.search.estimators.CenteredKernelRidge",  # MMSE regressors
    "adsearch.search.estimators.CovariancePCA",
    "adsearch.search.estimators.PLSRegressor",
    "adsearch.search.estimators.ShrinkageLDA",
    "adsearch.search.estimators.TfidfWeighting",
    "catboost.core.CatBoostClassifier",
    "catboost.core.CatBoostRegressor",
    "sklearn.calibration._CalibratedClassifier",  # calibration inside the folds (space.calibration)
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",  # kNN's KD tree (few dims, euclidean)
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.tree._tree.Tree",
    "xgboost.core.Booster",
    "xgboost.sklearn.XGBClassifier",
    "xgboost.sklearn.XGBRegressor",
})


class ExportError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    name: str  # as the study's user typed it (a hub id, or a folder relative to where they were)
    revision: str
    path: str | None = None  # the absolute folder it was loaded from: predict finds it from any directory


class Features(_Strict):
    source: str | None = None  # the feature source a multi-source study picked (its cache and model are below)
    layer: int = Field(ge=0)  # a negative index would silently pick another layer
    pooling: str
    unit: Literal["recording", "window"]
    window_s: float = Field(gt=0, le=600)
    min_window_s: float = Field(ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    sample_rate: Literal[16_000] = 16_000
    vocabulary: list[str] | None = None  # an n-gram source's columns: predict counts these in a new transcript


class CVRecord(_Strict):
    folds: int
    repeats: int
    metric: Literal["balanced_accuracy", "accuracy", "f1", "roc_auc", "rmse", "mae", "r2", "pearson_r"]
    seed: int
    mean: float
    std: float
    fold_scores: list[float]
    fresh: FreshCV | None = None
    # P(AD)'s calibration on the trial's out-of-fold predictions (probability classifiers only)
    calibration: dict | None = None


class FreshCV(_Strict):
    """The exported configuration re-scored on fold assignments the search never saw: the study's best CV
    was selected as a maximum over many trials on one assignment, this one was not."""

    repeats: int
    seed: int
    mean: float
    std: float  # across the repeats' means
    optimism: float  # how much better the study CV is than the fresh mean: what selecting the best trial added


class StudyRef(_Strict):
    name: str
    trial: int
    storage: str


class CacheRef(_Strict):
    path: str
    content_hash: str


class TranscriptsRef(_Strict):
    """The recogniser whose transcripts a linguistic or text source was computed from: predict runs it again
    on new audio (`backend` chat or csv: imported transcripts, which no recording can be turned into)."""

    backend: str
    name: str
    revision: str
    content_hash: str  # of the training transcripts


class ExportedConfig(_Strict):
    """config.yaml: everything needed to rebuild the classifier without the study."""

    adsearch_version: str
    task: Literal["classification", "mmse"] = "classification"  # mmse: the model predicts the MMSE score
    study: StudyRef
    model: ModelRef
    features: Features
    pipeline: PipelineSettings
    cv: CVRecord
    seed: int
    cache: CacheRef
    versions: dict[str, str]
    transcripts: TranscriptsRef | None = None
    plugins: dict[str, str] = {}  # the plugin module of the classifier -> SHA-256 of its source

    def trial_config(self) -> TrialConfig:
        # the exported cache is the chosen source's own: as a one-cache config, its source is None
        return TrialConfig(layer=self.features.layer, pooling=self.features.pooling, unit=self.features.unit,
                           **self.pipeline.model_dump())


def _transcripts_ref(meta: dict) -> TranscriptsRef | None:
    if "transcripts" not in meta:
        return None
    source = meta["transcripts"]["source"]
    return TranscriptsRef(backend=source["backend"], name=source["name"], revision=source["revision"],
                          content_hash=meta["transcripts"]["content_hash"])


def validation_details(exc: ValidationError | TypeError) -> str:
    """Each key of a hand-edited config that fails validation, with what is wrong with it."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return str(exc)


def load_config(path: Path | str) -> ExportedConfig:
    """Read and validate config.yaml; a hand edit that breaks it is reported by key."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path}: exported config not found (run `adsearch export` first)")
    try:
        data = load_yaml(path, "exported config")
        if not isinstance(data, dict):
            raise ExportError(f"{path}: the top level must be a mapping (an exported config.yaml)")
        config = ExportedConfig(**data)
    except YamlError as exc:
        raise ExportError(str(exc)) from None
    except (ValidationError, TypeError) as exc:
        raise ExportError(f"{path}: invalid config: {validation_details(exc)}") from None
    try:
        check_digests(config.plugins, str(path))  # the classifier's own code, as it was at export
    except PluginError as exc:
        raise ExportError(str(exc)) from None
    pipeline = config.pipeline
    problems = fixed_params_problems(pipeline.classifier, pipeline.params, "pipeline")
    if config.features.pooling not in POOLINGS:
        problems.append(f"features.pooling: {config.features.pooling!r} is not one of {list(POOLINGS)}")
    if pipeline.pca == "components" and not (pipeline.pca_components or 0) >= 1:
        problems.append("pipeline.pca_components: needs a positive integer when pca is 'components'")
    if pipeline.pca == "variance" and not 0 < (pipeline.pca_variance or 0) < 1:
        problems.append("pipeline.pca_variance: needs a share in (0, 1) when pca is 'variance'")
    if problems:
        raise ExportError(f"{path}: invalid config: " + "; ".join(problems))
    return config


# ----------------------------------------------------------------------------------------------------------
# Features and predictions


def item_features(cache: EmbeddingCache, config: TrialConfig, items: np.ndarray):
    """(X, owner): recording rows for `items` (sorted), or their windows with the index into `items` of each."""
    X = read_features(cache, config.layer, config.pooling, config.unit, items)
    return X, np.arange(len(items)) if config.unit == "recording" else cache.window_owner(items)


def predict_items(cache: EmbeddingCache, config: TrialConfig, model, items: np.ndarray) -> tuple[np.ndarray, float]:
    """One score per item of `items` (window scores averaged per recording) and the threshold that makes a
    label of it; MMSE predictions with threshold 0."""
    X, owner = item_features(cache, config, items)
    return recording_scores(model, X, owner, len(items))


def fit_on(cache: EmbeddingCache, config: TrialConfig, items: np.ndarray, seed: int, task: str = "classification"):
    X, owner = item_features(cache, config, items)
    return fit_pipeline(config, X, cache.targets(task)[items][owner], seed)


# ----------------------------------------------------------------------------------------------------------
# Statistics for a small test set


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


# ----------------------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    out_dir: Path
    config: ExportedConfig
    test: dict | None
    top_k: list[dict] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the score's honesty: noise floor, shortcut control


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "adsearch": __version__}
    for package in ("numpy", "scikit-learn", "xgboost", "catboost", "optuna", "torch", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def save_model(model, path: Path) -> None:
    import skops.io as sio

    sio.dump(model, path)


def load_model(path: Path, plugins: dict[str, str] | None = None):
    """Load with skops, trusting its safe defaults, the exact types in TRUSTED_TYPES and the estimator classes
    the config's (already imported, hash-checked) `plugins` modules define themselves, nothing else."""
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # not a zip, no schema, a schema of another version ...
        raise ExportError(f"{path}: not a model file adsearch can read ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); export again") from None
    unexpected = sorted(set(untrusted) - TRUSTED_TYPES - plugin_estimator_types(untrusted, plugins or {}))
    if unexpected:
        listed = ", ".join(unexpected)[:500]
        raise ExportError(f"{path}: refused: the file holds types adsearch never exports ({listed}); it may run "
                          "code when loaded. Only load models written by `adsearch export`")
    try:
        return sio.load(path, trusted=sorted(untrusted))
    except Exception as exc:
        raise ExportError(f"{path}: cannot load the model ({type(exc).__name__}: {str(exc)[:200]}); export again"
                          ) from None


def plugin_estimator_types(names: list[str], plugins: dict[str, str]) -> set[str]:
    """Of the type names in a model file, those that are scikit-learn estimator classes defined in one of the
    plugin modules (not a function or class the module merely imports, such as os.system)."""
    import sys

    from sklearn.base import BaseEstimator

    trusted = set()
    for name in names:
        module, _, attribute = name.rpartition(".")
        found = getattr(sys.modules.get(module), attribute, None) if module in plugins else None
        if isinstance(found, type) and found.__module__ == module and issubclass(found, BaseEstimator):
            trusted.add(name)
    return trusted


def export_trial(
    study_name: str,
    storage_url: str,
    out_dir: Path | str,
    trial_number: int | None = None,
    top_k: int = 0,
    cache_path: str | None = None,
    artifacts: Path | str | None = None,
    log=print,
    control_study: str | None = None,
) -> ExportResult:
    """Write config.yaml and model.skops; evaluate once on the held-out test split; write the report."""
    import optuna
    from optuna.trial import TrialState

    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import StudyError, load_caches_for, open_study, trial_config

    out_dir = check_new_folder(out_dir)
    if not 0 <= top_k <= 1000:
        raise ExportError(f"--top-k {top_k}: give 0 (the exported trial alone) up to 1000 other configurations to "
                          "test beside it")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(storage_url, create=False)
    try:
        study, setup = open_study(storage, study_name, mask_url(storage_url))
    except StudyError as exc:
        raise ExportError(str(exc)) from None
    if setup.null_seed is not None:
        raise ExportError(f"{study_name!r} is a null study (permuted labels): it measures the noise floor of its "
                          "main study and has nothing to export")
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: t.value, reverse=direction(setup.spec.cv.metric) == "maximize")
    if not complete:
        raise ExportError(f"study {study_name!r} has no complete trial yet")
    if trial_number is None:
        chosen = complete[0]
    else:
        trials = study.get_trials(deepcopy=False)
        if not 0 <= trial_number < len(trials):
            raise ExportError(f"study {study_name!r} has trials 0..{len(trials) - 1}, not {trial_number}")
        chosen = trials[trial_number]
        if chosen.state != TrialState.COMPLETE:
            raise ExportError(f"trial {trial_number} is {chosen.state.name}, not COMPLETE; "
                              "export a complete trial (leave --trial out for the best)")
    caches = load_caches_for(setup, study_name, cache_path)
    control = control_summary(storage, control_study, setup.spec.cv.metric) if control_study else None
    config = trial_config(setup, chosen.params)
    cache = caches[config.source]  # a multi-source study: the chosen source's cache and model
    spec = setup.spec
    exported = config_of_trial(study_name, storage_url, setup, chosen, cache, config)
    exported.cv.fresh = rescore_on_fresh_folds(cache, config, spec.cv.folds, spec.cv.metric, spec.seed,
                                               chosen.value, task=spec.task)
    fresh = exported.cv.fresh
    log(f"re-scored on {fresh.repeats} fresh fold assignments: {spec.cv.metric} {fresh.mean:.4f} +/- "
        f"{fresh.std:.4f} vs study CV {chosen.value:.4f} (selection optimism {fresh.optimism:+.4f})")
    # Everything is written into a private hidden folder that becomes OUT_DIR at the very end: an export
    # killed midway, or beaten by a concurrent one, leaves no half-written or mixed OUT_DIR.
    result = ExportResult(out_dir, exported, None)
    with folder_written_whole(out_dir) as work_dir:
        figures = _write_export(study, setup, caches, cache, config, chosen, complete, exported, work_dir, out_dir,
                                top_k, artifacts, control, log, result)
    result.figures = [out_dir / figure.relative_to(work_dir) for figure in figures]
    return result


def config_of_trial(study_name: str, storage_url: str, setup, chosen, cache: EmbeddingCache,
                    config: TrialConfig) -> ExportedConfig:
    """config.yaml of one completed trial: features, pipeline, CV record, cache, versions, plugin digests."""
    from adsearch.search.storage import mask_url

    spec = setup.spec
    scores = [chosen.intermediate_values[k] for k in sorted(chosen.intermediate_values)]
    return ExportedConfig(
        adsearch_version=__version__,
        task=spec.task,
        study=StudyRef(name=study_name, trial=chosen.number, storage=mask_url(storage_url)),
        model=ModelRef(name=cache.meta["model"]["name"], revision=cache.meta["model"]["revision"],
                       path=cache.meta["model"].get("path")),
        features=Features(source=config.source, layer=config.layer,
                          pooling=config.pooling, unit=config.unit,
                          window_s=cache.meta["settings"]["window_s"],
                          min_window_s=cache.meta["settings"]["min_window_s"],
                          dtype=cache.meta["settings"]["dtype"],
                          vocabulary=cache.meta["feature_names"] if cache.meta["model"]["name"] == "adsearch/ngrams"
                          else None),
        pipeline=PipelineSettings(**config.model_dump(exclude={"layer", "pooling", "unit", "source"})),
        cv=CVRecord(folds=spec.cv.folds, repeats=spec.cv.repeats, metric=spec.cv.metric, seed=spec.seed,
                    mean=chosen.value, std=float(np.std(scores)), fold_scores=scores),
        seed=spec.seed,
        cache=CacheRef(path=str(Path(cache.path).resolve()), content_hash=cache.content_hash),
        versions=_versions(),
        transcripts=_transcripts_ref(cache.meta),
        plugins={module: module_digest(module) for module in [plugin_of(config.classifier)] if module},
    )


def _write_export(study, setup, caches, cache, config: TrialConfig, chosen, complete, exported: ExportedConfig,
                  work_dir: Path, out_dir: Path, top_k: int, artifacts, control, log, result: ExportResult) -> list:
    """Config, refit model, one held-out test evaluation (with the top-k comparison) and the report, into
    `work_dir`; returns the report's figures."""
    from adsearch.results.report import write_report
    from adsearch.search.null import NULL_ATTR, stale_floor
    from adsearch.search.study import trial_config, trial_counts

    spec = setup.spec
    task = spec.task
    train = cache.with_target("train", task)
    model = fit_on(cache, config, train, spec.seed, task)
    oof = oof_predictions(chosen)
    if oof is not None and hasattr(model, "predict_proba"):  # out-of-fold P(AD) = score - 0.5 + 0.5
        exported.cv.calibration = calibration_report(np.tile(cache.labels[train], len(oof)), oof.ravel() + 0.5)
    (work_dir / CONFIG_FILE).write_text(yaml.safe_dump(exported.model_dump(mode="json"), sort_keys=False))
    save_model(model, work_dir / MODEL_FILE)
    log(f"refit on {len(train)} train recordings{' with an MMSE score' if task == 'mmse' else ''}; wrote "
        f"{out_dir / CONFIG_FILE} and {out_dir / MODEL_FILE}")

    test_items = cache.with_target("test", task)
    train_mean = float(cache.mmse[train].mean()) if task == "mmse" else None
    if len(test_items) < 2 or (task != "mmse" and len(set(cache.labels[test_items])) < 2):
        log(f"no test {'MMSE scores' if task == 'mmse' else 'labels'} in the cache: stopped after the refit (no "
            "held-out evaluation)")
    else:
        result.test, best_test = _evaluate_test(cache, config, model, test_items, spec.seed, task, train_mean)
        unreadable = unreadable_test_recordings(cache, task)
        result.test.update({"trial": chosen.number, "cv_mean": chosen.value, "cv_metric": spec.cv.metric,
                            # positive: the CV was better than the test, i.e. optimistic (any metric's direction)
                            "cv_minus_test": improvement(chosen.value, result.test[spec.cv.metric]["value"],
                                                         spec.cv.metric),
                            "labelled": len(test_items) + len(unreadable), "unreadable": unreadable})
        if unreadable:
            result.warnings.append(
                f"held-out test: {len(test_items)} of {len(test_items) + len(unreadable)} labelled test recordings "
                f"evaluated; {len(unreadable)} could not be read ("
                + "; ".join(f"{u['id']}: {u['reason'][:80]}" for u in unreadable[:3])
                + (", ..." if len(unreadable) > 3 else "") + "). Published results on the full test split are "
                "not comparable with this one")
        looks = study.user_attrs.get("adsearch_test_looks", [])
        if looks:
            log(f"note: the test set of this study was already evaluated {len(looks)} time(s) "
                f"(trials {sorted({look['trial'] for look in looks})})")
        study.set_user_attr("adsearch_test_looks", looks + [
            {"trial": chosen.number, "top_k": top_k, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}])
        for other in [t for t in complete if t.number != chosen.number][:top_k]:
            other_config = trial_config(setup, other.params)
            other_cache = caches[other_config.source]
            position = {rec_id: i for i, rec_id in enumerate(other_cache.ids)}
            test_ids = [cache.ids[i] for i in test_items]
            if any(rec_id not in position for rec_id in test_ids):
                log(f"trial {other.number}: its source lacks some test recordings; not compared")
                continue
            other_model = fit_on(other_cache, other_config, other_cache.with_target("train", task), spec.seed, task)
            other_test, other_output = _evaluate_test(other_cache, other_config, other_model,
                                                      np.array([position[i] for i in test_ids]), spec.seed, task,
                                                      train_mean)
            if task == "mmse":
                compared = {"test": {k: other_test[k]["value"] for k in ("rmse", "mae", "r2")},
                            "paired": paired_bootstrap(cache.mmse[test_items], best_test, other_output,
                                                       spec.cv.metric, seed=spec.seed)}
            else:
                compared = {"test": {k: other_test[k]["value"] for k in ("accuracy", "balanced_accuracy", "roc_auc")},
                            "mcnemar": mcnemar_exact(best_test, other_output)}
            result.top_k.append({"trial": other.number, "cv_mean": other.value, **compared})
        (work_dir / "test.json").write_text(json.dumps({**result.test, "top_k": result.top_k}, indent=1))
    floor = study._storage.get_study_system_attrs(study._study_id).get(NULL_ATTR)
    baseline = load_duration_baseline(study)
    result.warnings += honesty_warnings(exported, floor, control)
    if baseline and (weak := duration_warning(exported.cv.mean, baseline, floor)):
        result.warnings.append(weak)
    if floor and (stale := stale_floor(floor, study.best_value, trial_counts(study)["finished"], study.study_name)):
        result.warnings.append(stale)
    return write_report(study, setup, cache, exported, result.test, result.top_k, work_dir, artifacts,
                        floor=floor, control=control, warnings=result.warnings, baseline=baseline)


def unreadable_test_recordings(cache: EmbeddingCache, task: str = "classification") -> list[dict]:
    """Labelled test recordings (with an MMSE score, for an MMSE study) that extraction could not read: they
    are missing from the held-out test, and a reader comparing with published numbers on the whole test split
    must know it (ADReSSo: '70 of 71')."""
    target = "mmse" if task == "mmse" else "label"
    return [{"id": f["id"], "reason": f["reason"]} for f in cache.meta.get("failures", [])
            if f.get("split") == "test" and f.get(target) is not None]


def control_summary(storage, control_study: str, metric: str) -> dict:
    """The best CV of a shortcut-control study (same search on the parts of the recordings outside the
    participant's speech), with its own noise floor when `adsearch null` ran on it."""
    import optuna

    from adsearch.search.null import NULL_ATTR
    from adsearch.search.study import StudySetup, trial_counts

    try:
        control = optuna.load_study(study_name=control_study, storage=storage)
        best = control.best_value
    except KeyError:
        raise ExportError(f"--control-study: no study {control_study!r} in this storage") from None
    except ValueError:
        raise ExportError(f"--control-study: {control_study!r} has no complete trial yet") from None
    setup = StudySetup.from_study(control)
    if setup.spec.cv.metric != metric:
        raise ExportError(f"--control-study: {control_study!r} optimises {setup.spec.cv.metric}, this study {metric}; "
                          "run the control with the same space")
    return {"study": control_study, "best": best, "trials": trial_counts(control)["finished"],
            "floor": control._storage.get_study_system_attrs(control._study_id).get(NULL_ATTR),
            "cache": setup.cache_path}


def honesty_warnings(exported: ExportedConfig, floor: dict | None, control: dict | None) -> list[str]:
    """What a reader must not miss: a CV score inside its noise floor, a shortcut control well above chance."""
    warnings = []
    cv = exported.cv
    if floor and floor.get("n"):
        reached = sum(better(null["best"], floor["real_best"], cv.metric) for null in floor["null"])
        if reached:
            warnings.append(f"the best CV ({floor['real_best']:.4f}) is not better than the noise floor: {reached} of "
                            f"{floor['n']} label-permuted searches reached it (best {null_best(floor):.4f}; p = "
                            f"{floor['p_value']:.3f})")
        elif floor["p_value"] > 0.05:
            warnings.append(f"the best CV ({floor['real_best']:.4f}) is better than all {floor['n']} label-permuted "
                            f"searches (best {null_best(floor):.4f}), but with {floor['n']} of them p cannot go "
                            f"below {floor['p_value']:.3f}: run `adsearch null --runs 19` or more for p < 0.05")
    if control:
        reference = (control["floor"] or {}).get("null_median") or (floor or {}).get("null_median")
        chance = CHANCE.get(cv.metric)
        above = (improvement(control["best"], reference, cv.metric) > 0 if reference
                 else chance is not None and control["best"] > chance + 0.1)
        if above:
            warnings.append(f"the shortcut control {control['study']!r} (the same search without the participant's "
                            f"speech) reaches CV {control['best']:.4f}"
                            + (f", above the noise floor {reference:.4f}" if reference else "")
                            + ": the recordings carry label information outside the speech, and part of this "
                              "study's score may come from recording conditions")
    return warnings


FRESH_REPEATS = 5
FRESH_SEED_OFFSET = 10_000  # fold seeds no study uses: the study's own are seed .. seed + repeats - 1


def rescore_on_fresh_folds(cache: EmbeddingCache, config: TrialConfig, folds: int, metric: str, seed: int,
                           study_cv: float, repeats: int = FRESH_REPEATS, task: str = "classification") -> FreshCV:
    """Cross-validate `config` on `repeats` new speaker-grouped fold assignments (train split only)."""
    from adsearch.search.objective import FeatureSource

    source = FeatureSource(cache, task=task)
    fresh_seed = seed + FRESH_SEED_OFFSET
    assignment = assign_folds(source.labels, source.groups, folds, repeats, fresh_seed, task)
    scores = np.array(cross_validate(config, source, assignment, metric, seed).fold_scores)
    per_repeat = scores.reshape(repeats, folds).mean(axis=1)
    mean = float(per_repeat.mean())
    return FreshCV(repeats=repeats, seed=fresh_seed, mean=mean, std=float(per_repeat.std()),
                   optimism=float(improvement(study_cv, mean, metric)))


def _evaluate_test(cache: EmbeddingCache, config: TrialConfig, model, items: np.ndarray, seed: int,
                   task: str = "classification", train_mean: float | None = None):
    """The test report, and per recording what a comparison needs: correct or not (classification), or the
    predicted MMSE."""
    score, threshold = predict_items(cache, config, model, items)
    if task == "mmse":
        y = cache.mmse[items]
        report = mmse_test_report(y, score, train_mean, seed)
        report["predictions"] = [{"id": cache.ids[i], "mmse": float(true), "predicted": float(s)}
                                 for i, true, s in zip(items, y, score, strict=True)]
        return report, score
    y = cache.labels[items]
    report = test_report(y, score, threshold, seed)
    if hasattr(model, "predict_proba"):  # a margin classifier's scores are no probabilities to calibrate
        report["calibration"] = calibration_report(y, score)
    report["predictions"] = [{"id": cache.ids[i], "label": int(label), "score": float(s)}
                             for i, label, s in zip(items, y, score, strict=True)]
    return report, (score > threshold).astype(int) == y


def cache_for(config: ExportedConfig, given: Path | str | None = None) -> EmbeddingCache:
    """The cache an exported config was trained on: the recorded absolute path, or `given` (a moved copy, or a
    root holding several caches), chosen and checked by the recorded content hash."""
    from adsearch.embed.cache import META_FILE, CacheError, open_cache

    where = Path(given) if given is not None else Path(config.cache.path)
    if (where / META_FILE).is_file():  # one cache: its own errors (edited, damaged) say what is wrong with it
        cache = open_cache(where)
        if cache.content_hash != config.cache.content_hash:
            raise ExportError(f"{where}: content hash {cache.content_hash[:12]} differs from the exported config's "
                              f"cache ({config.cache.content_hash[:12]}); scores cannot be reproduced on it")
        return cache
    for candidate in sorted(p.parent for p in where.glob(f"*/{META_FILE}")):  # a root: the one with the hash
        try:
            cache = open_cache(candidate)
        except CacheError:
            continue
        if cache.content_hash == config.cache.content_hash:
            return cache
    what = f"--cache {given}" if given is not None else f"the recorded cache {config.cache.path}"
    raise ExportError(f"{what}: holds no cache with the exported config's content hash "
                      f"{config.cache.content_hash[:12]}; pass --cache with the cache the study used, or a folder "
                      "that holds it")


def reproduce_cv(config: ExportedConfig, cache: EmbeddingCache) -> list[float]:
    """Re-run the study's cross-validation for an exported config; the fold assignment is recomputed."""
    if cache.content_hash != config.cache.content_hash:
        raise ExportError(f"{cache.path}: content hash {cache.content_hash[:12]} differs from the exported "
                          f"config's cache ({config.cache.content_hash[:12]}); scores cannot be reproduced on it")
    from threadpoolctl import threadpool_limits

    from adsearch.search.objective import FeatureSource

    source = FeatureSource(cache, task=config.task)
    folds = assign_folds(source.labels, source.groups, config.cv.folds, config.cv.repeats, config.cv.seed,
                         config.task)
    with threadpool_limits(1):  # as the workers ran it: a multi-threaded BLAS solve differs in the last bits
        return cross_validate(config.trial_config(), source, folds, config.cv.metric, config.seed).fold_scores
