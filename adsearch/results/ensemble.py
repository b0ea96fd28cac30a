"""An ensemble of a study's trials as one exported model: export, held-out test, evaluate, predict.

The folder holds `config.yaml` (kind: ensemble: method, members with their weights and score scales, the
intercept, the nested CV) and one ordinary single-trial export per member under `members/trial-N/`, each
refitted once on the train split. So every member is loaded, checked and run by exactly the code a single
exported model uses, whatever its feature source: an ensemble over acoustic and linguistic sources predicts
new audio through both.

The test split is read once, here, after the ensemble is fixed: the ensemble beside the best single trial
(the one ranked first on all folds), compared on the same recordings with McNemar's exact test (AD vs
control) or a paired bootstrap of the metric (MMSE).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adsearch import __version__
from adsearch.io.outputs import check_new_folder, folder_written_whole
from adsearch.io.safeyaml import YamlError, load_yaml
from adsearch.results.export import cache_for, config_of_trial, fit_on, predict_items, reproduce_cv
from adsearch.results.model_files import save_model
from adsearch.results.schema import (
    CONFIG_FILE,
    MODEL_FILE,
    ExportError,
    StudyRef,
    check_export_digests,
    load_config,
    validation_details,
    write_digests,
)
from adsearch.results.statistics import mcnemar_exact, mmse_test_report, paired_bootstrap, test_report
from adsearch.search.ensemble import Combination, describe_left_out, ensemble_cv

MEMBERS_DIR = "members"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Member(_Strict):
    trial: int = Field(ge=0)
    weight: float
    scale: float = Field(gt=0)  # the member's out-of-fold score spread: scores are divided by it

    @property
    def folder(self) -> str:
        return f"{MEMBERS_DIR}/trial-{self.trial}"


class NestedCV(_Strict):
    mean: float
    std: float
    fold_scores: list[float]


class EnsembleRecord(_Strict):
    metric: str
    top: int
    rounds: int
    ensemble: NestedCV  # nested: members chosen and weighted on the other folds only
    best_single: NestedCV  # the best single trial chosen the same way


class EnsembleConfig(_Strict):
    """config.yaml of an exported ensemble."""

    kind: Literal["ensemble"]
    adsearch_version: str
    task: Literal["classification", "mmse"]
    study: StudyRef  # trial: the best single trial it is compared with
    method: Literal["caruana", "stack"]
    intercept: float
    members: list[Member] = Field(min_length=1)
    cv: EnsembleRecord

    def combination(self) -> Combination:
        return Combination(np.array([m.weight for m in self.members]), self.intercept)


def is_ensemble(path: Path | str) -> bool:
    """Whether an export folder (or its config.yaml) holds an ensemble."""
    path = Path(path)
    config = path / CONFIG_FILE if path.is_dir() else path
    try:
        data = load_yaml(config, "exported config") if config.is_file() else None
    except YamlError:
        return False
    return isinstance(data, dict) and data.get("kind") == "ensemble"


def load_ensemble(path: Path | str) -> tuple[EnsembleConfig, Path]:
    """The ensemble's config and folder; every member's folder must hold a valid single-trial export."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    check_export_digests(folder)
    try:
        data = load_yaml(folder / CONFIG_FILE, "exported config")
        config = EnsembleConfig(**data)
    except YamlError as exc:
        raise ExportError(str(exc)) from None
    except (ValidationError, TypeError) as exc:
        raise ExportError(f"{folder / CONFIG_FILE}: invalid ensemble config: {validation_details(exc)}") from None
    for member in config.members:
        single = load_config(folder / member.folder)
        if single.study.trial != member.trial or single.task != config.task:
            raise ExportError(f"{folder / member.folder}: holds trial {single.study.trial} ({single.task}), the "
                              f"ensemble lists trial {member.trial} ({config.task}); export the ensemble again")
    return config, folder


@dataclass
class EnsembleExport:
    out_dir: Path
    config: EnsembleConfig
    test: dict | None
    study_best: float  # the study's best CV: chosen on all folds, optimistic beside the nested figures


def export_ensemble(study_name: str, storage_url: str, out_dir: Path | str, method: str = "caruana",
                    top: int = 20, rounds: int = 20, log=print) -> EnsembleExport:
    """Build the ensemble on all train recordings, refit each member once, test it beside the best single
    trial, and write the folder whole (or not at all)."""
    import optuna

    from adsearch.search.baseline import load_nuisance_baseline
    from adsearch.search.objective import FeatureSource
    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import StudyError, describe_config, load_caches_for, open_study, trial_config

    out_dir = check_new_folder(out_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study, setup = open_study(make_storage(storage_url, create=False), study_name, mask_url(storage_url))
    except StudyError as exc:
        raise ExportError(str(exc)) from None
    if setup.null_seed is not None:
        raise ExportError(f"{study_name!r} is a null study (permuted labels): nothing to export")
    spec, task = setup.spec, setup.spec.task
    caches = load_caches_for(setup, study_name)
    first = next(iter(caches.values()))
    labels = FeatureSource(first, task=task).labels
    result = ensemble_cv(study, labels, setup.folds, spec.cv.metric, top, rounds, method)
    if left_out := describe_left_out(result.left_out):
        log(left_out)
    members = [Member(trial=t, weight=w, scale=s) for t, w, s in zip(result.trials, result.weights, result.scales,
                                                                    strict=True)]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    config = EnsembleConfig(
        kind="ensemble", adsearch_version=__version__, task=task,
        study=StudyRef(name=study_name, trial=result.best_single, storage=mask_url(storage_url)),
        method=method, intercept=result.intercept, members=members,
        cv=EnsembleRecord(metric=spec.cv.metric, top=top, rounds=rounds,
                          ensemble=_nested(result.ensemble_folds), best_single=_nested(result.single_folds)))
    test_ids = [first.ids[i] for i in first.with_target("test", task)]
    with folder_written_whole(out_dir) as work_dir:
        test_scores, described = {}, {}
        for number in dict.fromkeys([*result.trials, result.best_single]):
            chosen = trials[number]
            trial_cfg = trial_config(setup, chosen.params)
            described[number] = describe_config(trial_cfg.model_dump(mode="json"))
            cache = caches[trial_cfg.source]
            model = fit_on(cache, trial_cfg, cache.with_target("train", task), spec.seed, task)
            if number in result.trials:
                folder = work_dir / MEMBERS_DIR / f"trial-{number}"
                folder.mkdir(parents=True)
                exported = config_of_trial(study_name, storage_url, setup, chosen, cache, trial_cfg)
                (folder / CONFIG_FILE).write_text(yaml.safe_dump(exported.model_dump(mode="json"), sort_keys=False))
                save_model(model, folder / MODEL_FILE)
            if len(test_ids) >= 2:
                test_scores[number] = _test_scores(cache, trial_cfg, model, test_ids)
        log(f"refit {len(members)} member(s) on the train split; wrote {out_dir / CONFIG_FILE} and "
            f"{out_dir / MEMBERS_DIR}/")
        test = None
        if len(test_ids) >= 2:
            test = _evaluate(config, first, test_ids, test_scores, spec.seed)
            looks = study.user_attrs.get("adsearch_test_looks", [])
            study.set_user_attr("adsearch_test_looks", looks + [
                {"trial": result.best_single, "ensemble": result.trials, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}])
            (work_dir / "test.json").write_text(json.dumps(test, indent=1))
        else:
            log("no test targets in the cache: stopped after the refit (no held-out evaluation)")
        (work_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        (work_dir / "report.html").write_text(_report(config, test, described, load_nuisance_baseline(study)))
        write_digests(work_dir)
    return EnsembleExport(out_dir, config, test, study.best_value)


def _nested(folds: list[float]) -> NestedCV:
    return NestedCV(mean=float(np.mean(folds)), std=float(np.std(folds)), fold_scores=[float(f) for f in folds])


def _test_scores(cache, config, model, test_ids: list[str]) -> np.ndarray:
    """A refitted trial's test scores minus its threshold (MMSE: its predictions), in `test_ids` order."""
    position = {rec_id: i for i, rec_id in enumerate(cache.ids)}
    missing = [rec_id for rec_id in test_ids if rec_id not in position]
    if missing:
        raise ExportError(f"{cache.path}: lacks test recordings {missing[:3]} that another source has; the sources "
                          "of an ensemble must cover the same test split")
    score, threshold = predict_items(cache, config, model, np.array([position[rec_id] for rec_id in test_ids]))
    return score - threshold


def _evaluate(config: EnsembleConfig, cache, test_ids: list[str], scores: dict[int, np.ndarray], seed: int) -> dict:
    """The ensemble on the test split beside the best single trial, and their paired comparison."""
    regression = config.task == "mmse"
    items = np.array([cache.ids.index(rec_id) for rec_id in test_ids])
    scaled = np.array([scores[m.trial] / m.scale for m in config.members])
    combined = config.combination().apply(scaled, regression)
    single = scores[config.study.trial]
    if regression:
        y = cache.mmse[items]
        train_mean = float(cache.mmse[cache.with_target("train", "mmse")].mean())
        ensemble, best = mmse_test_report(y, combined, train_mean, seed), mmse_test_report(y, single, train_mean, seed)
        comparison = paired_bootstrap(y, combined, single, config.cv.metric, seed=seed)
    else:
        y = cache.labels[items]
        ensemble, best = test_report(y, combined, 0.0, seed), test_report(y, single, 0.0, seed)
        comparison = {**mcnemar_exact((combined > 0).astype(int) == y, (single > 0).astype(int) == y),
                      "method": "exact McNemar (only_best_right: only the ensemble right)"}
    return {"n": len(items), "metric": config.cv.metric, "ensemble": ensemble, "best_single": best,
            "chance": ensemble["chance"], "best_single_trial": config.study.trial, "comparison": comparison,
            "predictions": [{"id": rec_id, "ensemble": float(c), "best_single": float(s)}
                            for rec_id, c, s in zip(test_ids, combined, single, strict=True)]}


def _report(config: EnsembleConfig, test: dict | None, members: dict[int, str], baseline: dict | None) -> str:
    """One HTML page: the members (what each is), the nested CV beside the best single trial, chance and the
    nuisance-only baseline, and the test comparison with each figure's chance level."""
    import html

    from adsearch.results.report import html_table
    from adsearch.search.baseline import chance_level
    from adsearch.search.baseline import describe as describe_baseline

    metric = config.cv.metric
    rows = [(f"trial {m.trial}", html.escape(members.get(m.trial, "")), f"{m.weight:+.4f}", f"{m.scale:.4g}")
            for m in config.members]
    chance = chance_level(baseline, metric)
    parts = [f"<h1>adsearch ensemble: study {html.escape(config.study.name)} ({config.method})</h1>",
             f"<p>Combined score = {config.intercept:+.4f} + sum of weight x member score / scale"
             + (", clipped to 0-30" if config.task == "mmse" else ", AD above 0") + ".</p>",
             html_table([("member", "features and model", "weight", "scale")] + rows),
             "<h2>Nested CV (members chosen and weighted on the other folds only)</h2>",
             html_table([("", f"CV {metric}"),
                         ("ensemble", f"{config.cv.ensemble.mean:.4f} +/- {config.cv.ensemble.std:.4f}"),
                         ("best single trial, chosen the same way", f"{config.cv.best_single.mean:.4f} +/- "
                                                                     f"{config.cv.best_single.std:.4f}"),
                         ("chance", "not recorded" if chance is None else f"{chance:.4f}" + (
                             " (predicting each training fold's mean MMSE, the study's folds)"
                             if config.task == "mmse" else "")),
                         ("nuisance-only baseline", f"{describe_baseline(baseline)}, the study's folds" if baseline
                          else "not recorded")])]
    if test:
        names = ("rmse", "mae", "r2", "pearson_r") if config.task == "mmse" else (
            "accuracy", "balanced_accuracy", "f1", "roc_auc")
        header = ("metric", "ensemble", "95 % interval", f"best single (trial {test['best_single_trial']})",
                  "95 % interval", "chance")
        by_chance = test.get("chance", {})
        parts += [f"<h2>Held-out test ({test['n']} recordings; evaluated once)</h2>",
                  html_table([header] + [(name, f"{test['ensemble'][name]['value']:.4f}",
                                          "[{:.3f}, {:.3f}]".format(*test["ensemble"][name]["ci95"]),
                                          f"{test['best_single'][name]['value']:.4f}",
                                          "[{:.3f}, {:.3f}]".format(*test["best_single"][name]["ci95"]),
                                          f"{by_chance[name]:.4f}" if name in by_chance else "")
                                         for name in names]),
                  f"<p>Chance: {html.escape(by_chance.get('how', ''))}.</p>",
                  f"<p>{_comparison_sentence(test['comparison'], config.task)}</p>"]
    else:
        parts.append("<p>No test targets: no held-out evaluation.</p>")
    style = "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:2px 10px}</style>"
    return f"<!doctype html><meta charset='utf-8'>{style}" + "\n".join(parts)


def _comparison_sentence(comparison: dict, task: str) -> str:
    """The paired test of ensemble vs best single trial, in words."""
    import html

    p_value = comparison.get("p_value")
    method = html.escape(str(comparison.get("method", "")))
    if task != "mmse" and "only_best_right" in comparison:
        return (f"Paired comparison on the same recordings ({method}): the ensemble alone right on "
                f"{comparison['only_best_right']}, the best single trial alone right on "
                f"{comparison.get('only_other_right', '?')}; p = {p_value:.3f}.")
    return f"Paired comparison on the same recordings ({method}): p = {p_value:.3f}."


def reproduce_members(path: Path | str, cache: Path | str | None = None) -> list[tuple[int, bool]]:
    """Re-run every member's cross-validation; (trial, reproduced exactly) per member."""
    config, folder = load_ensemble(path)
    results = []
    for member in config.members:
        single = load_config(folder / member.folder)
        results.append((member.trial, reproduce_cv(single, cache_for(single, cache)) == single.cv.fold_scores))
    return results


class EnsemblePredictor:
    """Every member's own Predictor (its speech model, transcript source or eGeMAPS), combined. Members share
    what they have in common: a speech model is loaded once and run once per window for all its members'
    layers, a file is decoded, segmented and transcribed once."""

    def __init__(self, path: Path | str, device: str = "auto", vad: bool = True, threads: int | None = None):
        from adsearch.results.predict import Predictor
        from adsearch.results.shared import SharedModels

        self.config, folder = load_ensemble(path)
        self.shared = SharedModels()
        self.members = [Predictor(folder / member.folder, device, vad, self.shared, threads)
                        for member in self.config.members]
        self.shared.trim()

    def predict(self, path: Path | str, segments=None):
        regression = self.config.task == "mmse"
        try:
            predictions = [member.predict(path, segments) for member in self.members]
        finally:
            self.shared.forget()  # this file's audio and steps, whatever a member raised
        first = predictions[0]
        failed = next((p for p in predictions if p.error), None)
        if failed is not None:
            return failed
        raw = np.array([p.mmse if regression else p.prob_ad - 0.5 if p.prob_ad is not None else p.decision
                        for p in predictions])
        scaled = raw / np.array([m.scale for m in self.config.members])
        combined = float(self.config.combination().apply(scaled[:, None], regression)[0])
        first.prob_ad = None
        if regression:
            first.mmse = combined
        else:
            first.decision, first.label = combined, "AD" if combined > 0 else "control"
        return first
