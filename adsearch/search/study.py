"""A study: creating or resuming it, checking what joins it (cache, space, optimiser), its screen and note.

The study records its cache (path and content hash), its space (validated content and hash), the CV
protocol and the fold assignment (`setup.py`). A worker loads all of it from the study and refuses a
different cache or space. The storage lives in `storage.py`, the budget in `budget.py`, the worker loop in
`worker.py`.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.trial import TrialState

from adsearch.embed.cache import EmbeddingCache, open_cache
from adsearch.search.baseline import describe as describe_baseline
from adsearch.search.budget import TrialBudget, check_budget
from adsearch.search.errors import StudyError
from adsearch.search.objective import FeatureSource
from adsearch.search.protocol import assign_folds, direction
from adsearch.search.setup import ATTR, StudySetup
from adsearch.search.space import StudySpec, TrialConfig, source_layers, suggest

if TYPE_CHECKING:
    from adsearch.search.screen import ScreenResult

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

__all__ = [
    "ATTR",
    "FINISHED",
    "StudyError",
    "StudySetup",
    "best_summary",
    "describe_best",
    "check_compatible",
    "chosen_optimiser",
    "create_null_or_resume",
    "create_or_resume",
    "describe_config",
    "fold_fits",
    "load_cache_for",
    "load_caches_for",
    "list_studies",
    "load_screen",
    "missing_study",
    "name_sources",
    "new_setup",
    "open_study",
    "study_note",
    "trial_config",
    "trial_counts",
]


# ----------------------------------------------------------------------------------------------------------
# Study setup


Caches = EmbeddingCache | dict[str, EmbeddingCache]


def new_setup(cache: Caches, spec: StudySpec, space_file: str, sampler: str | None = None,
              pruner: str | None = None, sampler_seed: int | None = None) -> StudySetup:
    """A study's setup over one cache, or over several (name -> cache) searched jointly as `source`."""
    from adsearch.search.samplers import PRUNERS, SAMPLERS

    if sampler is not None and sampler not in SAMPLERS:
        raise StudyError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if pruner is not None and pruner not in PRUNERS:
        raise StudyError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNERS)}")
    caches = cache if isinstance(cache, dict) else {"": cache}
    primary = next(iter(caches.values()))
    train = {name: FeatureSource(one, task=spec.task) for name, one in caches.items()}  # each source's train split
    reference = next(iter(train.values()))
    assignments = []
    for name, one in caches.items():
        source_layers(spec, one.n_layers, f"{space_file} (source {name or one.path})")
        source = train[name]
        if (source.ids, source.labels.tolist(), source.groups.tolist()) != (
                reference.ids, reference.labels.tolist(), reference.groups.tolist()):
            raise StudyError(f"source {name!r} ({one.path}) holds other train recordings, labels or speakers than "
                             f"{primary.path}; sources of one study must cover the same train split")
        folds = crossfit_folds(one, source.ids, spec, space_file)
        if folds is not None:
            assignments.append((name, folds))
    if any((folds != assignments[0][1]).any() for _, folds in assignments[1:]):
        raise StudyError(f"sources {', '.join(n for n, _ in assignments)} were fine-tuned with cross-fitting on "
                         "different fold assignments; one study can use only one (fine-tune with --folds-from)")
    folds = assignments[0][1] if assignments else assign_folds(reference.labels, reference.groups, spec.cv.folds,
                                                               spec.cv.repeats, spec.seed, spec.task)
    sources = {} if len(caches) == 1 and "" in caches else {
        name: {"path": str(one.path.resolve()), "content_hash": one.content_hash, "n_layers": one.n_layers,
               "one_vector": one.one_vector}
        for name, one in caches.items()}
    return StudySetup(str(primary.path.resolve()), primary.content_hash, primary.n_layers, spec, space_file,
                      reference.ids, folds, sampler or "", pruner or "", sampler_seed, sources=sources,
                      left_out=reference.left_out, one_vector=not sources and primary.one_vector,
                      **deconfounding(nuisance_cache(caches), spec, folds))


def nuisance_cache(caches: Caches) -> EmbeddingCache:
    """The source whose recordings tell the most nuisances (extraction measured conditions; a transcript source
    did not), so a study's baseline and deconfounding see them: all sources cover the same recordings."""
    found = list(caches.values()) if isinstance(caches, dict) else [caches]
    return max(found, key=lambda one: all("conditions" in item for item in one.meta["items"]))


def deconfounding(cache: EmbeddingCache, spec: StudySpec, folds: np.ndarray, null_seed: int | None = None,
                   main_scheme: str = "none") -> dict:
    """{"deconfound": whether (and on which nuisances) the study's trials are scored deconfounded
    (`deconfound.plan`), "baseline": the nuisance-only baseline of its folds}; a null study is deconfounded
    as its main study is (`main_scheme`) and has no baseline (its labels are noise)."""
    from adsearch.search import deconfound
    from adsearch.search.baseline import chance_level, nuisance_baseline, nuisance_features

    source = FeatureSource(cache, null_seed, task=spec.task)
    baseline = None if null_seed is not None else nuisance_baseline(cache, folds, spec.cv.metric, spec.seed, spec.task)
    Z, names = nuisance_features(cache, source.train)
    mode = spec.deconfound if null_seed is None else "on" if main_scheme == "adjusted" else "off"
    plan = deconfound.plan(mode, baseline, Z, names, chance_level(baseline, spec.cv.metric), source.labels, folds,
                           spec.task == "mmse", spec.seed)
    return {"deconfound": plan, "baseline": baseline}


def crossfit_folds(cache: EmbeddingCache, train_ids: list[str], spec: StudySpec, space_file: str
                   ) -> np.ndarray | None:
    """The fold assignment a cross-fitted cache was made with (`adsearch finetune`), which its study must
    use: every fold's features come from a model that never saw that fold, under these folds only."""
    crossfit = cache.meta.get("crossfit")
    if not crossfit or not crossfit.get("enabled"):
        return None
    fold_of = dict(zip(crossfit["folds"]["train_ids"], crossfit["folds"]["assignment"][0], strict=True))
    missing = [i for i in train_ids if i not in fold_of]
    if missing:
        raise StudyError(f"{cache.path}: train items {missing[:5]} have no cross-fitting fold; extract again")
    n_folds = max(fold_of.values()) + 1
    if spec.cv.folds != n_folds or spec.cv.repeats != 1:
        raise StudyError(f"{space_file}: the cache {cache.path} was fine-tuned with cross-fitting on {n_folds} folds, "
                         f"and a study on it must use exactly those folds; set cv.folds: {n_folds} and cv.repeats: 1 "
                         f"(the space asks for {spec.cv.folds} x {spec.cv.repeats})")
    return np.array([[fold_of[i] for i in train_ids]])


def chosen_optimiser(setup: StudySetup, study_name: str, sampler: str | None, pruner: str | None,
                     override: bool) -> tuple[str, str, list[str]]:
    """The sampler and pruner a worker runs: the study's own, unless an explicit override asks otherwise
    (then with a warning, since the study's trials no longer come from one optimiser)."""
    chosen, warnings_ = [], []
    for kind, asked, recorded in (("sampler", sampler, setup.sampler), ("pruner", pruner, setup.pruner)):
        if asked is None or asked == recorded:
            chosen.append(recorded)
            continue
        if not override:
            raise StudyError(f"study {study_name!r} was created with {kind} {recorded!r}; leave --{kind} out to use "
                             f"it, or add --override-optimiser to run this worker's trials with {asked!r}")
        warnings_.append(f"study {study_name!r} was created with {kind} {recorded!r}; this worker uses {asked!r} "
                         "(--override-optimiser): its trials no longer all come from one optimiser")
        chosen.append(asked)
    return chosen[0], chosen[1], warnings_


def check_compatible(setup: StudySetup, study_name: str, cache: Caches | None = None,
                     spec: StudySpec | None = None) -> None:
    """Refuse to mix caches or spaces within one study."""
    if isinstance(cache, dict) and (len(cache) > 1 or setup.sources):
        given = {name: one.content_hash for name, one in cache.items()}
        recorded = {name: source["content_hash"] for name, source in setup.sources.items()}
        if given != recorded:
            raise StudyError(f"study {study_name!r} was created with the sources {sorted(recorded)} (content hashes "
                             f"recorded); given: {sorted(given)} with other names or content. Pass the same "
                             "caches under the same names, or start a new study with another --study name.")
        cache = None
    elif isinstance(cache, dict):
        cache = next(iter(cache.values()))
    if cache is not None and cache.content_hash != setup.cache_hash:
        raise StudyError(
            f"study {study_name!r} was created with the cache {setup.cache_path} (content hash "
            f"{setup.cache_hash[:12]}); {cache.path} has hash {cache.content_hash[:12]}. Use that cache, "
            "or start a new study with another --study name."
        )
    if spec is not None and spec.digest() != setup.spec.digest():
        raise StudyError(
            f"study {study_name!r} was created with a different search space ({setup.space_file}, hash "
            f"{setup.spec.digest()}; given: {spec.digest()}). Leave --space out to use the study's own, "
            "or start a new study with another --study name."
        )


def load_cache_for(setup: StudySetup, study_name: str, cache_path: str | Path | None = None) -> EmbeddingCache:
    try:
        cache = open_cache(cache_path or setup.cache_path)
    except Exception as exc:
        raise StudyError(f"study {study_name!r}: cannot open its cache ({exc}); pass --cache with a copy of it"
                         ) from exc
    check_compatible(setup, study_name, cache=cache)
    return cache


def load_caches_for(setup: StudySetup, study_name: str, cache_path: str | Path | None = None
                    ) -> dict[str | None, EmbeddingCache]:
    """The study's caches by source name (None for a one-cache study), each checked against its hash."""
    if not setup.sources:
        return {None: load_cache_for(setup, study_name, cache_path)}
    if cache_path is not None:
        raise StudyError(f"study {study_name!r} searches {len(setup.sources)} feature sources; --cache can only "
                         "point a one-cache study elsewhere (the sources are read from their recorded paths)")
    caches = {}
    for name, source in setup.sources.items():
        try:
            caches[name] = open_cache(source["path"])
        except Exception as exc:
            raise StudyError(f"study {study_name!r}: cannot open source {name!r} ({exc})") from exc
        if caches[name].content_hash != source["content_hash"]:
            raise StudyError(f"study {study_name!r}: source {name!r} at {source['path']} has other content than when "
                             "the study was created")
    return caches


def list_studies(storage) -> list[dict]:
    """Every study in a storage (null studies too): name, finished trials, budget, best value."""
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=True):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        try:
            budget = TrialBudget(storage.url, summary.study_name).get()[0]
        except StudyError:
            budget = None  # not created by adsearch
        rows.append({"name": summary.study_name, "finished": trial_counts(study)["finished"], "budget": budget,
                     "best": summary.best_trial.value if summary.best_trial else None})
    return rows


def missing_study(storage, study_name: str, where: str) -> StudyError:
    """The error for a study name this storage lacks, listing the names it holds (a forgotten --storage
    or a typo is then plain to see)."""
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    held = f"it holds {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else "it holds no study"
    return StudyError(f"no study {study_name!r} in {where}; {held} (`adsearch studies --storage URL` lists them). "
                      "Create one with `adsearch search`, or pass the --storage it uses")


def open_study(storage, study_name: str, where: str) -> tuple[optuna.Study, StudySetup]:
    """An existing adsearch study in `storage` and its setup, for the commands that read one (null, ensemble,
    export); a missing name is reported with the names the storage (`where`, its masked URL) holds."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise missing_study(storage, study_name, where) from None
    return study, StudySetup.from_study(study)


STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_study_name(study_name: str) -> str:
    """A new study's name: 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit. It
    names files (figures), appears in commands and URLs, and must fit every database's name column;
    null studies add `~nullK` to it."""
    if not STUDY_NAME.fullmatch(study_name):
        shown = study_name if len(study_name) <= 60 else study_name[:60] + "..."
        raise StudyError(f"--study {shown!r}: a study name has 1 to 100 characters (here {len(study_name)}): "
                         "letters, digits, '.', '_' and '-', starting with a letter or digit, e.g. adresso-xlsr-1")
    return study_name


def create_or_resume(storage, study_name: str, cache: Caches, spec: StudySpec, space_file: str,
                     budget: int, sampler: str | None = None, pruner: str | None = None,
                     override: bool = False, sampler_seed: int | None = None,
                     log: Callable[[str], None] | None = None,
                     on_screen: Callable[[optuna.Study, ScreenResult], None] | None = None) -> optuna.Study:
    """Create the study (recording its setup and optimiser) or resume it after checking cache, space and
    optimiser; set the budget. `sampler`/`pruner` choose the optimiser of a new study; on an existing one
    they must match what it recorded unless `override` (which only the workers of this command use)."""
    url = storage.url
    check_budget(budget)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        # every check runs before anything is written
        check_study_name(study_name)
        setup = new_setup(cache, spec, space_file, sampler, pruner, sampler_seed)
        study = _create(storage, study_name, cache, setup, budget, log, on_screen)
    setup = _wait_for_setup(study)
    check_compatible(setup, study_name, cache, spec)
    chosen_optimiser(setup, study_name, sampler, pruner, override)
    counts = trial_counts(study)
    TrialBudget(url, study_name).set(budget, counts["finished"] + counts["running"])
    return study


def create_null_or_resume(storage, study_name: str, cache: Caches, main: StudySetup, null_seed: int,
                          budget: int) -> optuna.Study:
    """A null study of `main`: its setup (cache, space, folds, optimiser) with permuted train labels."""
    from dataclasses import replace

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        null = deconfounding(nuisance_cache(cache), main.spec, main.folds, null_seed, main.deconfound["scheme"])
        study = _create(storage, study_name, cache, replace(main, null_seed=null_seed, **null), budget, None, None)
    setup = _wait_for_setup(study)
    if setup.null_seed != null_seed or setup.cache_hash != main.cache_hash:
        raise StudyError(f"study {study_name!r} exists and is not this study's null study {null_seed}")
    counts = trial_counts(study)
    TrialBudget(storage.url, study_name).set(budget, counts["finished"] + counts["running"])
    return study


def _create(storage, study_name: str, cache: Caches, setup: StudySetup, budget: int,
            log: Callable[[str], None] | None,
            on_screen: Callable[[optuna.Study, ScreenResult], None] | None) -> optuna.Study:
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, direction=direction(setup.spec.cv.metric))
    except optuna.exceptions.DuplicatedStudyError:  # another `search` created it a moment ago
        return optuna.load_study(study_name=study_name, storage=storage)
    # A system attribute: workers need it, the dashboard's user-attribute table does not.
    storage.set_study_system_attr(study._study_id, ATTR, setup.to_attr())
    with warnings.catch_warnings():  # experimental since Optuna 3.2, still in 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([setup.spec.cv.metric])  # the dashboard says balanced_accuracy, not Objective 0
    if log and setup.spec.task == "mmse":
        log(f"MMSE study: {len(setup.train_ids)} train recordings with an MMSE score"
            + (f"; {setup.left_out} without one left out" if setup.left_out else ""))
    baseline = _record_nuisance_baseline(study, setup, log)  # (before the screen, which scores as it decides)
    screened = _screen_and_enqueue(study, cache, setup, budget, log)
    cache = next(iter(cache.values())) if isinstance(cache, dict) else cache  # the first source, for the note
    if screened is not None and on_screen is not None:
        on_screen(study, screened)
    import optuna_dashboard

    optuna_dashboard.save_note(study, study_note(cache, setup, screened, baseline))
    return study


def _record_nuisance_baseline(study: optuna.Study, setup: StudySetup, log: Callable[[str], None] | None
                              ) -> dict | None:
    """What the nuisances alone score on the study's folds (measured with its setup; none for null studies,
    whose labels are noise), and whether its trials are scored deconfounded."""
    from adsearch.search import deconfound
    from adsearch.search.baseline import NUISANCE_ATTR, describe

    if setup.baseline is None:
        return None
    study._storage.set_study_system_attr(study._study_id, NUISANCE_ATTR, setup.baseline)
    if log:
        log("nuisance-only baseline: CV " + describe(setup.baseline))
        log(deconfound.describe(setup.deconfound))
    return setup.baseline


SCREEN_ATTR = "adsearch:screen"  # study system attribute holding the layer screen


def _screen_and_enqueue(study: optuna.Study, cache: Caches, setup: StudySetup, budget: int,
                        log: Callable[[str], None] | None) -> ScreenResult | None:
    """Run the layer screen of a new study (if its space asks for one), record it on the study and enqueue
    the top cells as its first trials: at most the budget, so the budget stays exact. A multi-source study
    screens every source's layers and ranks all cells together."""
    from adsearch.search.screen import ScreenResult, screen, starting_points, tune_width

    spec = setup.spec
    if not spec.screen.enabled or setup.sampler == "layer-grid":  # layer-grid walks the layers itself
        return None
    caches = cache if isinstance(cache, dict) else {None: cache}
    layers = setup.source_layers or {None: setup.layers}
    if log:
        rows = sum(len(layers[name]) for name in caches)
        log(f"screening {rows} {'source layers' if setup.sources else 'layers'} x {len(spec.space.pooling)} poolings "
            "with a linear and a kernel probe (closed form, the study's folds, train rows only)")
    results = {name: screen(FeatureSource(one, setup.null_seed, task=spec.task), setup.folds, layers[name],
                            list(spec.space.pooling), spec.cv.metric, name in setup.one_vector_sources,
                            setup.nuisances)
               for name, one in caches.items()}
    result = ScreenResult.stacked(results) if setup.sources else results[None]
    best = result.top(1)
    gamma = None
    if best and best[0]["source"] not in setup.one_vector_sources and "mean+std" in spec.space.pooling:
        name = best[0]["source"]  # the portfolio's kernel model: a width tuned at the best cell's layer
        gamma = tune_width(FeatureSource(caches[name], setup.null_seed, task=spec.task), setup.folds,
                           best[0]["layer"], "mean+std", spec.cv.metric, setup.nuisances)
    result.enqueued = starting_points(result, spec, min(spec.screen.top, budget), setup.source_layers,
                                      setup.one_vector_sources, gamma)
    for params in result.enqueued:
        study.enqueue_trial(params, user_attrs={"origin": "screen"})
    study._storage.set_study_system_attr(study._study_id, SCREEN_ATTR, result.to_attr())
    if log:
        top = ", ".join(f"{c['source'] + ' ' if c['source'] else ''}layer {c['layer']} {c['pooling']} {c['score']:.3f} "
                        f"({c['probe']})" for c in result.top(5))
        log(f"screen ({result.seconds:.1f} s): best {top}; {len(result.enqueued)} enqueued as the first trials")
    return result


def load_screen(study: optuna.Study) -> ScreenResult | None:
    from adsearch.search.screen import ScreenResult

    attr = study._storage.get_study_system_attrs(study._study_id).get(SCREEN_ATTR)
    return ScreenResult.from_attr(attr) if attr else None


def _wait_for_setup(study: optuna.Study, timeout_s: float = 30.0) -> StudySetup:
    """The study's setup; a study created by another process this instant gets its setup a moment later."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return StudySetup.from_study(study)
        except StudyError:
            if time.monotonic() > deadline or study.get_trials(deepcopy=False):
                raise
            time.sleep(0.2)


def study_note(cache: EmbeddingCache, setup: StudySetup, screened: ScreenResult | None = None,
               baseline: dict | None = None) -> str:
    """The markdown the dashboard shows on the study page: what data, which model, which protocol."""
    meta, spec = cache.meta, setup.spec
    train = cache.labels[cache.splits == "train"]
    n_test = int((cache.splits == "test").sum())
    model = meta.get("model", {})
    crossfit = meta.get("crossfit")
    tuned = []
    if crossfit and crossfit["enabled"]:
        tuned = [f"**Fine-tuned features, cross-fitted**: each fold's train items come from a model fine-tuned on "
                 f"the other folds ({crossfit['finetuned']}); the study uses those folds."]
    elif crossfit:
        tuned = ["**CV optimistic**: the features come from a model fine-tuned on every train recording "
                 "(`--no-crossfit`), so cross-validation on them has seen the labels."]
    if setup.null_seed is not None:
        tuned.append(f"**Null study**: train labels permuted across speakers (seed {setup.null_seed}); its best "
                     "score is what this search finds when speech says nothing about the label.")
    return "\n".join(tuned + [
        "## adsearch study",
        f"**Corpus**: {code_span(meta.get('manifest', {}).get('path', '?'))}: {len(train)} train recordings "
        f"(AD {(train == 1).sum()}, control {(train == 0).sum()}), {n_test} test recordings (never read here).",
        f"**Cache**: {code_span(setup.cache_path)} (content {setup.cache_hash[:12]}); model "
        f"{code_span(model.get('name'))} @ {code_span(model.get('revision'))}, {cache.n_layers} hidden states x "
        f"{cache.dim} dims, windows of "
        f"{meta.get('settings', {}).get('window_s')} s.",
        *(["**Feature sources** (searched jointly as `source`, each with its own `layer.NAME`): " + "; ".join(
            f"{code_span(name)} = {code_span(source['path'])} ({source['n_layers']} layers)"
            for name, source in setup.sources.items())]
          if setup.sources else []),
        f"**Space**: {code_span(setup.space_file)} (hash {spec.digest()}); sampler {setup.sampler} (seed "
        f"{setup.sampler_seed}), pruner {setup.pruner}, seed {spec.seed}; classifiers "
        f"{', '.join(spec.space.classifiers)}. Every worker uses this sampler and pruner.",
        *([f"**Task: MMSE regression** (ADReSSo task 2): {len(setup.train_ids)} train recordings with a score"
           + (f", {setup.left_out} without one left out" if setup.left_out else "")
           + "; predictions clipped to 0-30."] if spec.task == "mmse" else []),
        f"**CV**: {spec.cv.folds} folds x {spec.cv.repeats} repeat(s), stratified by "
        f"{'MMSE bins' if spec.task == 'mmse' else 'label'}, grouped by speaker; "
        f"metric {spec.cv.metric}. Intermediate values are the per-fold scores.",
        "Trial columns: `cv_*` are fold means of each metric, `cv_std` the spread of the study metric, "
        "`fit_seconds` the time in fit/predict, `folds_run` how many folds ran before any pruning, `worker` "
        "the host:pid that ran it; `deconfounded_*` the same means on predictions adjusted for the nuisances.",
        f"**Scoring**: {_deconfounding_note(setup)}",
    ] + ([f"**Layer screen** ({screened.seconds:.1f} s, linear and RBF ridge probes on the same folds; a screen, "
          "optimistic like any maximum): best " + ", ".join(
              f"{c['source'] + ' ' if c['source'] else ''}layer {c['layer']} {c['pooling']} {c['score']:.3f} "
              f"({c['probe']})" for c in screened.top(5))
          + f". The first {len(screened.enqueued)} trials (user attribute `origin: screen`) start there."]
         if screened else [])
       + ([f"**Nuisance-only baseline**: CV {describe_baseline(baseline)} on the same folds: what recording "
           "length, speaking time and recording conditions alone score; read the best score beside it."]
          if baseline else []))


def trial_counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = sum(s in FINISHED for s in states)
    return {"finished": finished, "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED), "running": states.count(TrialState.RUNNING),
            "waiting": states.count(TrialState.WAITING), "failed": states.count(TrialState.FAIL)}



def fold_fits(study: optuna.Study, setup: StudySetup) -> dict[str, int]:
    """How many fold fits the study's finished trials ran, and how many pruning saved (what the pruned
    trials would have needed to finish): the number that says whether a pruner earns its keep."""
    n_steps = setup.folds.shape[0] * (int(setup.folds.max()) + 1)
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    run = sum(int(t.user_attrs.get("folds_run", n_steps)) for t in trials)
    return {"run": run, "saved": len(trials) * n_steps - run}


def trial_config(setup: StudySetup, params: dict) -> TrialConfig:
    """Rebuild a trial's full configuration (fixed values included) by replaying the space on its params."""
    return suggest(optuna.trial.FixedTrial(params), setup.spec, setup.layers, setup.source_layers,
                   setup.one_vector_sources)


def _deconfounding_note(setup: StudySetup) -> str:
    from adsearch.search import deconfound

    text = deconfound.describe(setup.deconfound)
    if setup.deconfound.get("scheme") == "adjusted":
        text += (". A trial's value is its deconfounded CV: a configuration that rides the nuisances scores near "
                 "chance and is not chosen; `cv_*` keeps its plain CV")
    return text


def code_span(value: object) -> str:
    """`value` as a Markdown code span that nothing in it can end (a fence longer than its longest run of
    backticks, CommonMark 6.1): a folder named with backticks cannot put markup (an external image) into
    the study note the dashboard renders."""
    text = " ".join(str(value).split("\n")) or "(none)"
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") else text
    return f"{fence}{padded}{fence}"


def describe_best(best: dict) -> str:
    """`CV 0.81` or, in a deconfounded study, `deconfounded CV 0.74 (plain CV 0.81)`."""
    if best.get("deconfounded"):
        return f"deconfounded CV {best['value']:.4f} (plain CV {best['plain']:.4f})"
    return f"CV {best['value']:.4f}"


def best_summary(study: optuna.Study, setup: StudySetup) -> dict | None:
    try:
        best = study.best_trial
    except ValueError:
        return None
    plain = best.user_attrs.get(f"cv_{setup.spec.cv.metric}", best.value)  # a deconfounded study's plain CV
    return {"number": best.number, "value": best.value, "plain": plain,
            "fold_scores": [best.intermediate_values[k] for k in sorted(best.intermediate_values)],
            "deconfounded": setup.deconfound.get("scheme") == "adjusted",
            "config": trial_config(setup, best.params).model_dump(mode="json")}


def describe_config(config: dict) -> str:
    parts = [f"layer {config.get('layer')}", str(config.get("pooling")), str(config.get("unit"))]
    if config.get("source"):
        parts.insert(0, f"source {config['source']}")
    if config.get("pca") == "components":
        parts.append(f"pca {config.get('pca_components')}")
    elif config.get("pca") == "variance":
        parts.append(f"pca {config.get('pca_variance'):.0%} var")
    if config.get("l2_normalize"):
        parts.append("l2")
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (config.get("params") or {}).items())
    parts.append(f"{config.get('classifier')}({params})")
    return ", ".join(parts)


SOURCE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}"


def name_sources(caches: list[tuple[str | None, EmbeddingCache]]) -> EmbeddingCache | dict[str, EmbeddingCache]:
    """One cache as is, named or not (a study over one source has no `source` parameter, whatever it is
    called); several as name -> cache, named as given (NAME=PATH) or after what produced them (the model's
    last path component, `egemaps`, `finetuned`), made unique with -2, -3 ..."""
    import re

    for given, _ in caches:
        if given is not None and not re.fullmatch(SOURCE_NAME, given):
            raise StudyError(f"--cache {given}=...: a source name is 1-40 letters, digits, '_', '-' or '.', "
                             "starting with a letter or digit")
    if len(caches) == 1:
        return caches[0][1]
    named: dict[str, EmbeddingCache] = {}
    for given, cache in caches:
        model = cache.meta.get("model", {}).get("name", "cache")
        default = "finetuned" if cache.meta.get("crossfit") else model.rstrip("/").split("/")[-1]
        name = given or re.sub(r"[^A-Za-z0-9_.-]", "-", default)[:40] or "cache"
        if given is not None and given in named:
            raise StudyError(f"--cache {given}=...: the name is given twice")
        unique, suffix = name, 2
        while unique in named:
            unique, suffix = f"{name}-{suffix}", suffix + 1
        named[unique] = cache
    return named
