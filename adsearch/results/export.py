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

import numpy as np
import yaml

from adsearch import __version__
from adsearch.embed.cache import EmbeddingCache
from adsearch.io.outputs import check_new_folder, folder_written_whole, shortened
from adsearch.results.calibration import calibration_report
from adsearch.results.model_files import save_model
from adsearch.results.schema import (
    CONFIG_FILE,
    MODEL_FILE,
    CacheRef,
    CVRecord,
    Deconfounded,
    ExportedConfig,
    ExportError,
    Features,
    FreshCV,
    ModelRef,
    StudyRef,
    transcripts_ref,
    write_digests,
)
from adsearch.results.statistics import mcnemar_exact, mmse_test_report, paired_bootstrap, test_report
from adsearch.search.baseline import load_nuisance_baseline, nuisance_gate, nuisance_warning
from adsearch.search.objective import cross_validate, fit_pipeline, oof_predictions, read_features, recording_scores
from adsearch.search.plugins import module_digest, plugin_of
from adsearch.search.protocol import CHANCE, assign_folds, better, direction, improvement, null_best
from adsearch.search.space import PipelineSettings, TrialConfig

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
    choose_from: int = 5,
    despite_nuisance_baseline: bool = False,
) -> ExportResult:
    """Write config.yaml and model.skops; evaluate once on the held-out test split; write the report.

    Without `trial_number`, the exported trial is the best of the study's `choose_from` best by their score on
    fresh fold assignments (deconfounded like the study): the study's best value is the maximum of many noisy
    estimates, and the fresh folds remove the part of it that was luck. A configuration that does not clear
    the nuisance-only baseline (`baseline.nuisance_gate`) stops the export unless `despite_nuisance_baseline`."""
    import optuna
    from optuna.trial import TrialState

    from adsearch.search.null import NULL_ATTR
    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import StudyError, load_caches_for, nuisance_cache, open_study, trial_config

    out_dir = check_new_folder(out_dir)
    if not 0 <= top_k <= 1000:
        raise ExportError(f"--top-k {top_k}: give 0 (the exported trial alone) up to 1000 other configurations to "
                          "test beside it")
    if not 1 <= choose_from <= 100:
        raise ExportError(f"--choose-from {choose_from}: give 1 (the study's best value) up to 100 best trials to "
                          "re-score on fresh folds")
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
    if control_study is not None and control_study == study_name:
        raise ExportError(f"--control-study {control_study!r} is the study itself; name the shortcut-control study "
                          "(the same search on a `--keep non-participant` or `--keep non-speech` cache)")
    if trial_number is not None:
        trials = study.get_trials(deepcopy=False)
        if not 0 <= trial_number < len(trials):
            raise ExportError(f"study {study_name!r} has trials 0..{len(trials) - 1}, not {trial_number}")
        if trials[trial_number].state != TrialState.COMPLETE:
            raise ExportError(f"trial {trial_number} is {trials[trial_number].state.name}, not COMPLETE; "
                              "export a complete trial (leave --trial out for the best)")
    caches = load_caches_for(setup, study_name, cache_path)
    control = control_summary(storage, control_study, setup.spec.cv.metric) if control_study else None
    spec = setup.spec
    nuisances = nuisance_cache(caches) if setup.nuisances is not None else None
    candidates = [trials[trial_number]] if trial_number is not None else complete[:choose_from]
    scored = []
    for candidate in candidates:
        candidate_config = trial_config(setup, candidate.params)
        fresh = rescore_on_fresh_folds(caches[candidate_config.source], candidate_config, spec.cv.folds,
                                       spec.cv.metric, spec.seed, candidate.value, task=spec.task,
                                       nuisances=nuisances)
        scored.append((candidate, candidate_config, fresh))
        if trial_number is None:
            log(f"trial {candidate.number}: study CV {candidate.value:.4f}, on {fresh.repeats} fresh fold "
                f"assignments {fresh.mean:.4f} +/- {fresh.std:.4f}")
    chosen, config, fresh = max(scored, key=lambda row: (improvement(row[2].mean, 0.0, spec.cv.metric), -row[2].std))
    cache = caches[config.source]  # a multi-source study: the chosen source's cache and model
    exported = config_of_trial(study_name, storage_url, setup, chosen, cache, config)
    exported.cv.fresh = fresh
    exported.cv.selection = selection_record(scored, chosen, fresh, trial_number, spec.cv.metric)
    log(f"re-scored on {fresh.repeats} fresh fold assignments: {spec.cv.metric} {fresh.mean:.4f} +/- "
        f"{fresh.std:.4f} vs study CV {chosen.value:.4f} (selection optimism {fresh.optimism:+.4f})")
    if trial_number is None:
        from adsearch.results.report import describe_selection

        log(describe_selection(exported.cv.selection))
    floor = study._storage.get_study_system_attrs(study._study_id).get(NULL_ATTR)
    baseline = load_nuisance_baseline(study)
    stop = nuisance_gate(fresh.mean, exported.cv.fold_scores, baseline, floor, nuisances is not None)
    if stop and not despite_nuisance_baseline:
        raise ExportError(f"trial {chosen.number}: {stop}. Nothing was exported. Look for configurations that "
                          "do (`adsearch search` with more trials, another space or source), or pass "
                          "--despite-nuisance-baseline to export it anyway (the report then says so)")
    # Everything is written into a private hidden folder that becomes OUT_DIR at the very end: an export
    # killed midway, or beaten by a concurrent one, leaves no half-written or mixed OUT_DIR.
    result = ExportResult(out_dir, exported, None)
    with folder_written_whole(out_dir) as work_dir:
        if stop:
            result.warnings.append(f"exported despite the nuisance-only baseline: {stop}")
        figures = _write_export(study, setup, caches, cache, config, chosen, complete, exported, work_dir, out_dir,
                                top_k, artifacts, control, log, result, floor, baseline)
        write_digests(work_dir)
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
                    mean=chosen.value, std=float(np.std(scores)), fold_scores=scores,
                    deconfound=Deconfounded(scheme="adjusted", features=setup.deconfound["features"],
                                            scores=setup.deconfound["scores"],
                                            plain_mean=chosen.user_attrs.get(f"cv_{spec.cv.metric}", chosen.value))
                    if setup.nuisances is not None else None),
        seed=spec.seed,
        cache=CacheRef(path=str(Path(cache.path).resolve()), content_hash=cache.content_hash),
        versions=_versions(),
        transcripts=transcripts_ref(cache.meta),
        plugins={module: module_digest(module) for module in [plugin_of(config.classifier)] if module},
    )


def selection_record(scored: list, chosen, fresh: FreshCV, trial_number: int | None, metric: str) -> dict:
    """How the exported trial was chosen, for config.yaml and the report: each candidate's study CV and fresh
    score, and how much of the study's best value the fresh folds took away (`optimism_removed`)."""
    if trial_number is not None:
        return {"by": "--trial", "trial": trial_number}
    raw_best = scored[0]
    return {"by": "fresh folds", "among": len(scored), "chosen": chosen.number, "study_best": raw_best[0].number,
            "candidates": [{"trial": trial.number, "cv": trial.value, "fresh": f.mean, "fresh_std": f.std}
                           for trial, _, f in scored],
            # the study's best value against the estimate exported instead: the chosen trial's fresh score
            "optimism_removed": float(improvement(raw_best[0].value, fresh.mean, metric))}


def _write_export(study, setup, caches, cache, config: TrialConfig, chosen, complete, exported: ExportedConfig,
                  work_dir: Path, out_dir: Path, top_k: int, artifacts, control, log, result: ExportResult,
                  floor: dict | None, baseline: dict | None) -> list:
    """Config, refit model, one held-out test evaluation (with the top-k comparison) and the report, into
    `work_dir`; returns the report's figures."""
    from adsearch.results.report import write_report
    from adsearch.search.null import stale_floor
    from adsearch.search.study import trial_config, trial_counts

    spec = setup.spec
    task = spec.task
    train = cache.with_target("train", task)
    model = fit_on(cache, config, train, spec.seed, task)
    refused = np.size(train) - np.count_nonzero(np.isfinite(predict_items(cache, config, model, train)[0]))
    if refused:
        raise ExportError(f"trial {chosen.number}: the refit model's {'predictions' if task == 'mmse' else 'scores'} "
                          f"of {refused} of {len(train)} train recordings are NaN or infinite; nothing was exported")
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
                + "; ".join(f"{u['id']}: {shortened(u['reason'], 80)}" for u in unreadable[:3])
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
    result.warnings += honesty_warnings(exported, floor, control)
    if baseline and (weak := nuisance_warning(exported.cv.deconfound.plain_mean if exported.cv.deconfound
                                              else exported.cv.mean, baseline, floor)):
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
                           study_cv: float, repeats: int = FRESH_REPEATS, task: str = "classification",
                           nuisances: EmbeddingCache | None = None) -> FreshCV:
    """Cross-validate `config` on `repeats` new speaker-grouped fold assignments (train split only); with
    `nuisances` (a deconfounded study's nuisance cache), deconfounded like the study."""
    from adsearch.search.baseline import nuisance_features
    from adsearch.search.objective import FeatureSource

    source = FeatureSource(cache, task=task)
    fresh_seed = seed + FRESH_SEED_OFFSET
    assignment = assign_folds(source.labels, source.groups, folds, repeats, fresh_seed, task)
    fair = None
    if nuisances is not None:  # the nuisance model refitted in the new folds' training parts
        from adsearch.search.deconfound import nuisance_scores

        fair = nuisance_scores(nuisance_features(nuisances, source.train)[0], source.labels, assignment,
                               task == "mmse", seed)
    scores = np.array(cross_validate(config, source, assignment, metric, seed, nuisances=fair).fold_scores)
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
    nuisances = np.asarray(config.cv.deconfound.scores) if config.cv.deconfound else None
    with threadpool_limits(1):  # as the workers ran it: a multi-threaded BLAS solve differs in the last bits
        return cross_validate(config.trial_config(), source, folds, config.cv.metric, config.seed,
                              nuisances=nuisances).fold_scores
