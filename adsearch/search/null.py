"""The noise floor of a search: the same search on label-permuted train splits.

A best CV score after hundreds of trials on 166 recordings is optimistic: on data with no signal at all
the best of 120 trials scores about 0.64 balanced accuracy (BENCHMARKS.md). A null study repeats the
search (same cache, space, folds, sampler and screen) with the train labels permuted across speakers: every
speaker keeps one label and the label counts stay the same, so only the link between speech and label is
broken. The best real CV is then compared with the best CVs of N null studies: p = (1 + #{null at least as
good as real}) / (1 + N) is the chance of a search this good when the speech says nothing about the label.

Null studies are ordinary studies named `STUDY~nullK` in the same storage (workers anywhere can join them);
the summary is recorded on the main study (system attribute `adsearch:null`) and shown by `search`, the
study note and the report.
"""

from __future__ import annotations

import numpy as np
import optuna

from adsearch.search.errors import StudyError
from adsearch.search.protocol import better, direction

NULL_ATTR = "adsearch:null"
SEPARATOR = "~null"


def null_name(study_name: str, index: int) -> str:
    return f"{study_name}{SEPARATOR}{index}"


def is_null(study_name: str) -> bool:
    return SEPARATOR in study_name


def create_null_studies(storage, study_name: str, runs: int, budget: int) -> list[str]:
    """Create (or resume) `runs` null studies of `study_name`, each with `budget` trials; return their names.
    Each copies the main study's setup (cache, space, folds, sampler) and records its permutation seed."""
    from adsearch.search.study import StudySetup, create_null_or_resume, load_caches_for

    main = optuna.load_study(study_name=study_name, storage=storage)
    setup = StudySetup.from_study(main)
    if setup.null_seed is not None:
        raise StudyError(f"{study_name!r} is itself a null study; run `adsearch null` on the main study")
    cache = load_caches_for(setup, study_name)  # every source of a multi-source study
    names = []
    for index in range(runs):
        name = null_name(study_name, index)
        create_null_or_resume(storage, name, cache, setup, null_seed=setup.spec.seed + 1 + index, budget=budget)
        names.append(name)
    return names


def summarise(storage, study_name: str) -> dict:
    """Best real CV beside the best CV of each finished null study, and the permutation p-value."""
    from adsearch.search.study import StudySetup, trial_counts

    main = optuna.load_study(study_name=study_name, storage=storage)
    metric = StudySetup.from_study(main).spec.cv.metric
    try:
        real = main.best_value
    except ValueError:
        raise StudyError(f"study {study_name!r} has no complete trial yet") from None
    nulls, unfinished = [], []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=True):
        name = summary.study_name
        if not name.startswith(study_name + SEPARATOR):
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        counts = trial_counts(study)
        budget_met = counts["running"] == 0 and counts["waiting"] == 0 and counts["finished"] > 0
        if summary.best_trial is None or not budget_met:
            unfinished.append(name)
            continue
        nulls.append({"study": name, "best": summary.best_trial.value, "trials": counts["finished"]})
    bests = [n["best"] for n in nulls]
    result = {"real_best": real, "real_trials": trial_counts(main)["finished"], "null": nulls,
              "unfinished": unfinished, "n": len(nulls), "metric": metric}
    if nulls:  # null_best: the best null search in the metric's direction (the highest, or for RMSE the lowest)
        result.update({"p_value": (1 + sum(better(b, real, metric) for b in bests)) / (1 + len(bests)),
                       "null_median": float(np.median(bests)), "null_max": max(bests),
                       "null_min": min(bests), "null_best": min(bests) if direction(metric) == "minimize"
                       else max(bests)})
    return result


def record(storage, study_name: str, summary: dict) -> None:
    main = optuna.load_study(study_name=study_name, storage=storage)
    storage.set_study_system_attr(main._study_id, NULL_ATTR, summary)


def describe(summary: dict) -> str:
    """One sentence for the CLI, the study note and the report."""
    if not summary.get("n"):
        return "no finished null study yet"
    return (f"best CV {summary['real_best']:.4f} ({summary['real_trials']} trials) vs the best CV of "
            f"{summary['n']} label-permuted searches: median {summary['null_median']:.4f}, range "
            f"{summary['null_min']:.4f}-{summary['null_max']:.4f}; permutation p = {summary['p_value']:.3f} "
            f"(the smallest possible with {summary['n']} null studies is {1 / (1 + summary['n']):.3f})")


def stale_floor(summary: dict, best: float, finished: int, study_name: str) -> str | None:
    """Why a recorded noise floor no longer matches its study (more trials since, a better best, null searches
    of a smaller budget), with the command that brings it up to date; None while it matches."""
    if not summary.get("n"):
        return None
    null_trials = min(n["trials"] for n in summary["null"])
    metric = summary.get("metric", "balanced_accuracy")  # floors recorded before MMSE studies: classification
    if finished <= summary["real_trials"] and null_trials >= finished and better(summary["real_best"], best, metric):
        return None
    return (f"the noise floor is out of date: it was measured when the study had {summary['real_trials']} finished "
            f"trials (best {summary['real_best']:.4f}), with null searches of {null_trials} trials; the study now "
            f"has {finished} (best {best:.4f}). Bring it up to date with `adsearch null --study {study_name} "
            f"--trials {finished}` (the null studies resume)")
