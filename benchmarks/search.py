"""Search benchmarks: overhead, scaling, search quality, worker memory, MMSE regression and ensembles (figures in
BENCHMARKS.md).

    python benchmarks/search.py overhead   # ADReSSo/large-model-shaped cache, logreg only, 300 trials, SQLite
    python benchmarks/search.py scaling    # trials per minute with 1 and 2 workers
    python benchmarks/search.py quality    # default vs random vs layer-grid, pruners, null floor: realistic caches
    python benchmarks/search.py quality --seeds 2 --trials 40 --workers 2   # a quick look
    python benchmarks/search.py memory     # peak worker RSS on a 25 x 1024 x 10,000-window cache
    python benchmarks/search.py mmse       # MMSE regression: default vs random to 95 % of the oracle's R2
    python benchmarks/search.py ensemble   # two sources with independent signals: ensemble vs best single trial
    python benchmarks/search.py mmse-stack # the MMSE stack's ridge penalty: adsearch's alpha = 1 vs leave-one-out
    python benchmarks/search.py hard --before /tmp/prev   # hard planted kinds (benchmarks/hard.py): default vs
                                                          # random vs the code before (a checkout given by --before)
    python benchmarks/search.py all --json benchmarks/results/search-cpu.json

Every part runs the real worker (`adsearch.search.worker.run_worker`) against an SQLite file.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adsearch.embed import open_cache
from adsearch.embed.synthetic import REALISTIC_KINDS, write_synthetic_cache
from adsearch.search.space import check_layers, parse_spec, suggest
from adsearch.search.storage import make_storage
from adsearch.search.study import create_or_resume
from adsearch.search.worker import run_worker

ADRESSO_LARGE = dict(n_train=166, n_test=71, n_layers=25, dim=1024, windows_per_item=4)
LOGREG_ONLY = {"cv": {"folds": 5}, "pruner": "none",
               "space": {"pooling": ["mean", "std", "mean+std", "max", "min+max", "mean+std+max"],
                         "classifiers": {"logreg": {}}}}


def _study(work: Path, cache_dir: Path, name: str, spec: dict, trials: int) -> str:
    url = f"sqlite:///{work / (name + '.db')}"
    create_or_resume(make_storage(url), name, open_cache(cache_dir), parse_spec(spec), "benchmark", trials)
    return url


def _trials(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


class _ConstantModel:
    """Stands in for a fitted pipeline: what is left of a trial is the search framework's own cost."""

    def predict_proba(self, X):
        import numpy as np

        return np.full((len(X), 2), 0.5)


def _in_memory_without_fits(url: str, name: str, cache_dir: Path, trials: int) -> float:
    """Seconds for `trials` trials of the same objective and sampler on Optuna's in-memory storage, every
    fit replaced by a constant model: what a trial costs when the database costs nothing."""
    import optuna

    from adsearch.search.objective import Objective
    from adsearch.search.samplers import make_pruner, make_sampler
    from adsearch.search.study import StudySetup
    from adsearch.search.worker import trial_conditions

    setup = StudySetup.from_study(optuna.load_study(study_name=name, storage=url))
    objective = Objective(setup, open_cache(cache_dir))
    study = optuna.create_study(direction="maximize", pruner=make_pruner(setup.spec.pruner),
                                sampler=make_sampler(setup.spec.sampler, setup.spec, objective.layers, 0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with trial_conditions():  # as in a worker
        started = time.perf_counter()
        study.optimize(objective, n_trials=trials)
        return time.perf_counter() - started


def overhead(work: Path, trials: int = 300) -> dict:
    """Share of one worker's wall time spent outside classifier fit/predict; the framework's cost per trial
    measured directly (the same run with every fit replaced by a constant model); and the part of that
    cost which is not the database's (the same again on Optuna's in-memory storage)."""
    import adsearch.search.objective as objective

    cache_dir = write_synthetic_cache(work / "adresso-large", **ADRESSO_LARGE, signal_layer=12)
    url = _study(work, cache_dir, "overhead", LOGREG_ONLY, trials)
    started = time.perf_counter()
    run_worker("overhead", url, worker_index=0)
    wall = time.perf_counter() - started
    fit = sum(t.user_attrs["fit_seconds"] for t in _trials(url, "overhead"))
    real_fit = objective.fit_pipeline
    objective.fit_pipeline = lambda *args, **kwargs: _ConstantModel()
    try:
        url = _study(work, cache_dir, "no-fit", LOGREG_ONLY, trials)
        started = time.perf_counter()
        run_worker("no-fit", url, worker_index=0)
        framework = time.perf_counter() - started
        in_memory = _in_memory_without_fits(url, "no-fit", cache_dir, trials)
    finally:
        objective.fit_pipeline = real_fit
    result = {"trials": trials, "wall_s": wall, "fit_predict_s": fit, "overhead_share": 1 - fit / wall,
              "ms_per_trial_outside_fit": 1000 * (wall - fit) / trials,
              "ms_per_trial_fit": 1000 * fit / trials,
              "ms_per_trial_without_any_fit": 1000 * framework / trials,
              "ms_per_trial_without_any_fit_in_memory": 1000 * in_memory / trials,
              "overhead_share_if_the_database_cost_nothing": in_memory / (in_memory + fit)}
    print(f"overhead: {trials} trials in {wall:.1f} s, {fit:.1f} s in fit/predict -> "
          f"{100 * result['overhead_share']:.1f} % outside ({result['ms_per_trial_outside_fit']:.0f} ms/trial "
          f"outside, {result['ms_per_trial_fit']:.0f} ms/trial in fit/predict); the same trials without any fit: "
          f"{result['ms_per_trial_without_any_fit']:.0f} ms/trial, of which "
          f"{result['ms_per_trial_without_any_fit_in_memory']:.0f} ms/trial remain on in-memory storage "
          f"({100 * result['overhead_share_if_the_database_cost_nothing']:.0f} % outside fit/predict even if the "
          "database cost nothing)")
    return result


def _throughput(url: str, name: str) -> float:
    trials = _trials(url, name)
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return 60 * len(trials) / (end - start).total_seconds()


def _timeline(url: str, name: str) -> list[dict]:
    """Per trial: who ran it, when it started (s after the first start), how long it took, its state."""
    trials = sorted(_trials(url, name), key=lambda t: t.datetime_start)
    first = trials[0].datetime_start
    return [{"number": t.number, "worker": t.user_attrs.get("worker"), "state": t.state.name,
             "start_s": round((t.datetime_start - first).total_seconds(), 3),
             "seconds": round((t.datetime_complete - t.datetime_start).total_seconds(), 3),
             "fit_seconds": t.user_attrs.get("fit_seconds")} for t in trials]


HEAVIER = {"cv": {"folds": 5}, "pruner": "none",
           "space": {"pooling": ["mean", "mean+std"], "pca": ["none", "components"],
                     "classifiers": {"rbf_svm": {}, "knn": {},
                                     "random_forest": {"n_estimators": {"low": 30, "high": 100}}}}}


def scaling(work: Path, trials: int = 80) -> dict:
    """Trials per minute (first start to last completion) with 1 and with 2 worker processes running the
    same enqueued configurations, for logistic-regression-only trials and heavier ones (RBF SVM, kNN,
    forests)."""
    from adsearch.search.worker import spawn_workers

    cache_dir = work / "adresso-large"
    if not cache_dir.exists():
        write_synthetic_cache(cache_dir, **ADRESSO_LARGE, signal_layer=12)
    import optuna

    result = {}
    for label, spec in (("logreg", LOGREG_ONLY), ("heavier", HEAVIER)):
        # The same enqueued configurations for 1 and 2 workers: equal work, so the rates compare.
        sampled = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        layers = check_layers(parse_spec(spec), ADRESSO_LARGE["n_layers"])
        workload = []
        for _ in range(trials):
            trial = sampled.ask()
            suggest(trial, parse_spec(spec), layers)
            workload.append(trial.params)
            sampled.tell(trial, 0.0)
        rates, timelines = {}, {}
        for workers in (1, 2):
            name = f"scaling-{label}-{workers}"
            url = _study(work, cache_dir, name, spec, trials)
            study = optuna.load_study(study_name=name, storage=url)
            for params in workload:
                study.enqueue_trial(params)
            processes = spawn_workers(workers, {"study_name": name, "storage_url": url})
            for process in processes:
                process.join()
            rates[workers] = _throughput(url, name)
            timelines[workers] = _timeline(url, name)
        result[label] = {"trials": trials, "per_minute_1": rates[1], "per_minute_2": rates[2],
                         "speedup": rates[2] / rates[1], "timeline_1": timelines[1], "timeline_2": timelines[2]}
        print(f"scaling [{label}]: 1 worker {rates[1]:.1f} trials/min, 2 workers {rates[2]:.1f} trials/min "
              f"-> {rates[2] / rates[1]:.2f}x")
    return result


QUALITY_KINDS = ("mean", "spread", "nonlinear")
# Pooled statistics that see each planted kind (a spread difference also moves max and min).
SEEN_BY = {"mean": {"mean"}, "spread": {"std", "max", "min"}, "nonlinear": {"mean"}}
QUALITY_SPACE = {"cv": {"folds": 5},
                 "space": {"pooling": ["mean", "std", "mean+std", "max", "min+max", "mean+std+max"],
                           "pca": ["none", "components"], "pca_components": {"low": 4, "high": 64, "log": True},
                           "l2_normalize": [False, True],
                           "classifiers": {"logreg": {}, "lda": {}, "knn": {}, "rbf_svm": {}}}}
# name -> (sampler, changes to the space): "default" is what a user gets without choosing anything.
QUALITY_CONFIGS = {
    "default": ("tpe", {}),
    "tpe, no screen": ("tpe", {"screen": {"enabled": False}}),
    "random": ("random", {"screen": {"enabled": False}}),
    "layer-grid": ("layer-grid", {}),
}
# The default has no pruner (measured here): these are the pruners it was measured against.
PRUNER_CONFIGS = {
    **{f"default, pruner {name}": ("tpe", {"pruner": name}) for name in ("wilcoxon", "median")},
    **{f"tpe, no screen, pruner {name}": ("tpe", {"pruner": name, "screen": {"enabled": False}})
       for name in ("wilcoxon", "median")},
}
# TPE settings measured against the defaults (samplers.TPE_SETTINGS), without the screen so the sampler matters.
TPE_VARIANTS = {
    "tpe, no screen, 5 startup": {"n_startup_trials": 5},
    "tpe, no screen, 20 startup": {"n_startup_trials": 20},
    "tpe, no screen, independent": {"multivariate": False, "group": False},
}


def oracle_score(cache_dir: Path, spec: dict) -> float:
    """The planted configuration's CV score: the planted layer and pooling with the best of a small grid of
    classifier settings, on the study's folds. What a search that knew the answer would report."""
    from adsearch.embed.synthetic import PLANTED_POOLING
    from adsearch.search.objective import FeatureSource, cross_validate
    from adsearch.search.protocol import assign_folds
    from adsearch.search.space import TrialConfig
    from adsearch.search.worker import trial_conditions

    cache = open_cache(cache_dir)
    planted = cache.meta["synthetic"]
    source = FeatureSource(cache)
    folds = assign_folds(source.labels, source.groups, spec["cv"]["folds"], 1, spec.get("seed", 0))
    grid = ([("logreg", {"C": c}) for c in (0.01, 0.1, 1.0, 10.0)]
            + [("rbf_svm", {"C": c, "gamma": g}) for c in (1.0, 10.0, 100.0) for g in (5e-4, 2e-3, 8e-3)])
    scores = []
    with trial_conditions():
        for classifier, params in grid:
            config = TrialConfig(layer=planted["signal_layer"], pooling=PLANTED_POOLING[planted["kind"]],
                                 unit="recording", scale="standard", pca="none", l2_normalize=False,
                                 classifier=classifier, params=params)
            scores.append(cross_validate(config, source, folds, "balanced_accuracy", 0).mean)
    return max(scores)


def _quality_job(args: tuple) -> dict:
    from adsearch.search import samplers
    from adsearch.search.compare import run_one

    kind, cache_dir, config, sampler, changes, seed, trials, folder = args
    # A pool process runs one job at a time and may run several: start each from the defaults.
    defaults = samplers.__dict__.setdefault("_benchmark_defaults", dict(samplers.TPE_SETTINGS))
    samplers.TPE_SETTINGS.clear()
    samplers.TPE_SETTINGS.update({**defaults, **TPE_VARIANTS.get(config, {})})
    Path(folder).mkdir(parents=True, exist_ok=True)
    run = run_one(cache_dir, {**QUALITY_SPACE, **changes}, sampler, seed, trials, folder)
    return {"kind": kind, "config": config, **run}


def _realistic_runs(work: Path, kinds: tuple[str, ...], configs: dict, trials: int, seeds: int,
                    workers: int | None) -> tuple[dict, dict, list[dict]]:
    """Write one realistic cache per kind and seed, run every configuration on each (and its oracle), in
    parallel; return (cache folders, oracle scores, runs)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from adsearch.embed.synthetic import write_realistic_cache

    caches, jobs = {}, []
    for kind in kinds:
        for seed in range(seeds):
            cache_dir = write_realistic_cache(work / f"{kind}-{seed}", kind=kind, n_test=0,
                                              seed=1000 * REALISTIC_KINDS.index(kind) + seed)
            caches[kind, seed] = cache_dir
            for config, (sampler, changes) in configs.items():
                folder = work / f"runs-{kind}-{seed}" / config.replace(", ", "-").replace(" ", "_")
                jobs.append((kind, str(cache_dir), config, sampler, changes, seed, trials, str(folder)))
    with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        oracle_futures = {key: pool.submit(oracle_score, path, QUALITY_SPACE) for key, path in caches.items()}
        runs = list(pool.map(_quality_job, jobs))
        oracles = {key: future.result() for key, future in oracle_futures.items()}
    return caches, oracles, runs


def quality(work: Path, trials: int = 120, seeds: int = 5, workers: int | None = None) -> dict:
    """Per planted kind and seed a realistic cache (166 train recordings, 25 layers x 256 dims, oracle about
    0.80): median trials and CPU seconds to 95 % of the oracle, and how often the best trial sits on the
    planted layer (+-2) with a pooling that sees the planted statistic, per search configuration; the
    default pruner against the others; the best score the default finds on caches without any signal."""
    from adsearch.embed.cache import POOLINGS

    configs = {**QUALITY_CONFIGS, **PRUNER_CONFIGS,
               **{name: ("tpe", {"screen": {"enabled": False}}) for name in TPE_VARIANTS}}
    caches, oracles, runs = _realistic_runs(work, QUALITY_KINDS, configs, trials, seeds, workers)
    result: dict = {"trials": trials, "seeds": seeds, "space": QUALITY_SPACE,
                    "oracle": {f"{k}-{s}": v for (k, s), v in oracles.items()}}
    for kind in QUALITY_KINDS:
        result[kind] = {}
        for config in configs:
            needed, seconds, hits, finals = [], [], 0, []
            mine = sorted((r for r in runs if r["kind"] == kind and r["config"] == config), key=lambda r: r["seed"])
            for run in mine:
                oracle = oracles[kind, run["seed"]]
                first = next((i for i, best in enumerate(run["best"]) if best >= 0.95 * oracle), None)
                needed.append(first + 1 if first is not None else trials + 1)
                seconds.append(round(run["cpu_seconds"][first], 1) if first is not None else float("inf"))
                planted = json.loads((caches[kind, run["seed"]] / "cache.json").read_text())["synthetic"]
                hits += (abs(run["best_layer"] - planted["signal_layer"]) <= 2
                         and bool(set(POOLINGS[run["best_pooling"]]) & SEEN_BY[kind]))
                finals.append(run["best"][-1] / oracle)
            row = result[kind][config] = {
                "median_trials_to_95pct_oracle": statistics.median(needed), "trials_to_target": needed,
                "median_cpu_s_to_target": statistics.median(seconds), "cpu_s_to_target": seconds,
                "median_cpu_s_total": statistics.median(r["cpu_seconds"][-1] for r in mine),
                "planted_layer_and_statistic": f"{hits}/{len(mine)}",
                "pruned_share": sum(r["pruned"] for r in mine) / (trials * len(mine)),
                "fold_fits_saved": sum(r["fold_fits_saved"] for r in mine),
                "fold_fits_total": trials * len(mine) * QUALITY_SPACE["cv"]["folds"],
                "final_best_over_oracle_median": statistics.median(finals)}
            print(f"quality [{kind}] {config:<24} trials to 95 % oracle: median {row['median_trials_to_95pct_oracle']}"
                  f" {needed}; CPU s to target: median {row['median_cpu_s_to_target']} (total "
                  f"{row['median_cpu_s_total']:.0f}); planted {row['planted_layer_and_statistic']}; pruned "
                  f"{100 * row['pruned_share']:.0f} %, fold fits saved {row['fold_fits_saved']}/"
                  f"{row['fold_fits_total']}; final/oracle {row['final_best_over_oracle_median']:.3f}", flush=True)
    _, _, null_runs = _realistic_runs(work / "null", ("none",), {"default": QUALITY_CONFIGS["default"]}, trials,
                                      seeds, workers)
    finals = sorted(run["best"][-1] for run in null_runs)
    result["null"] = {"best_cv_per_run": finals, "median": statistics.median(finals)}
    print(f"quality [no signal] default: best CV after {trials} trials {finals} (median "
          f"{statistics.median(finals):.3f}): the floor a real score must clear", flush=True)
    return result


MMSE_SPACE = {"task": "mmse", "cv": {"folds": 5, "metric": "r2"},
              "space": {"pooling": ["mean", "std", "mean+std", "max", "min+max", "mean+std+max"],
                        "pca": ["none", "components"], "pca_components": {"low": 4, "high": 64, "log": True},
                        "l2_normalize": [False, True],
                        "classifiers": {"ridge": {}, "kernel_ridge": {}, "svr": {}, "knn_regressor": {}, "pls": {}}}}
MMSE_CONFIGS = {"default": ("tpe", {}), "random": ("random", {"screen": {"enabled": False}})}


def mmse_oracle(cache_dir: Path) -> dict:
    """The planted configuration's CV (R2 and RMSE) with the best ridge of a small grid: the planted layer and
    mean pooling, on the benchmark's folds."""
    from adsearch.search.objective import FeatureSource, cross_validate
    from adsearch.search.protocol import assign_folds
    from adsearch.search.space import TrialConfig
    from adsearch.search.worker import trial_conditions

    cache = open_cache(cache_dir)
    source = FeatureSource(cache, task="mmse")
    folds = assign_folds(source.labels, source.groups, 5, 1, 0, "mmse")
    best = None
    with trial_conditions():
        for alpha in (1.0, 10.0, 100.0, 1e3, 1e4):
            config = TrialConfig(layer=cache.meta["synthetic"]["signal_layer"], pooling="mean", unit="recording",
                                 scale="standard", pca="none", l2_normalize=False, classifier="ridge",
                                 params={"alpha": alpha})
            result = cross_validate(config, source, folds, "r2", 0)
            if best is None or result.mean > best["r2"]:
                best = {"r2": result.mean, "rmse": result.summary()["rmse"], "alpha": alpha}
    return best


def _mmse_job(args: tuple) -> dict:
    from adsearch.search.compare import run_one

    cache_dir, config, sampler, changes, seed, trials, folder = args
    Path(folder).mkdir(parents=True, exist_ok=True)
    return {"config": config, **run_one(cache_dir, {**MMSE_SPACE, **changes}, sampler, seed, trials, folder)}


def mmse(work: Path, trials: int = 60, seeds: int = 3, workers: int | None = None) -> dict:
    """Realistic caches whose features carry the MMSE score (R2 of the planted ridge about 0.45): trials and CPU
    seconds to 95 % of the oracle's R2 for the default search and random sampling (the study optimises R2
    here so the target is in its own units), and the best R2 on caches whose scores are permuted."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from adsearch.embed.synthetic import CALIBRATED_MMSE_STRENGTH, write_realistic_cache

    caches, jobs = {}, []
    for seed in range(seeds):
        caches[seed] = write_realistic_cache(work / f"mmse-{seed}", kind="mean", target="mmse", n_test=0,
                                             strength=CALIBRATED_MMSE_STRENGTH, seed=7000 + seed)
        for config, (sampler, changes) in MMSE_CONFIGS.items():
            folder = work / f"runs-mmse-{seed}-{config}"
            jobs.append((str(caches[seed]), config, sampler, changes, seed, trials, str(folder)))
    with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        oracle_futures = {seed: pool.submit(mmse_oracle, path) for seed, path in caches.items()}
        runs = list(pool.map(_mmse_job, jobs))
        oracles = {seed: future.result() for seed, future in oracle_futures.items()}
    result: dict = {"trials": trials, "seeds": seeds, "space": MMSE_SPACE, "oracle": oracles}
    for config in MMSE_CONFIGS:
        needed, seconds, finals = [], [], []
        for run in sorted((r for r in runs if r["config"] == config), key=lambda r: r["seed"]):
            target = 0.95 * oracles[run["seed"]]["r2"]
            first = next((i for i, best in enumerate(run["best"]) if best >= target), None)
            needed.append(first + 1 if first is not None else trials + 1)
            seconds.append(round(run["cpu_seconds"][first], 1) if first is not None else float("inf"))
            finals.append(round(run["best"][-1], 4))
        result[config] = {"trials_to_95pct_oracle_r2": needed, "median_trials": statistics.median(needed),
                          "cpu_s_to_target": seconds, "median_cpu_s": statistics.median(seconds),
                          "final_best_r2": finals}
        oracle_r2 = [round(o["r2"], 3) for o in oracles.values()]
        oracle_rmse = [round(o["rmse"], 2) for o in oracles.values()]
        print(f"mmse {config:<8} trials to 95 % of the oracle's R2: {needed} (median {statistics.median(needed)}); "
              f"CPU s {seconds}; final best R2 {finals}; oracle R2 {oracle_r2} (RMSE {oracle_rmse})", flush=True)
    return result


def _fusion_caches(work: Path, seed: int) -> tuple[Path, Path]:
    """Two feature sources over the same 166 + 71 recordings and labels, each with its own planted signal
    (independent directions, layers and noise) a little weaker than the quality benchmark's."""
    import numpy as np

    from adsearch.embed.synthetic import CALIBRATED_STRENGTH, write_realistic_cache

    labels = np.random.default_rng(seed).permutation(np.arange(237) % 2)
    strength = 0.8 * CALIBRATED_STRENGTH["mean"]
    return (write_realistic_cache(work / f"acoustic-{seed}", kind="mean", strength=strength, seed=8000 + seed,
                                  labels=labels),
            write_realistic_cache(work / f"second-{seed}", kind="mean", strength=strength, seed=9000 + seed,
                                  labels=labels))


def ensemble(work: Path, trials: int = 60, seeds: int = 3) -> dict:
    """Late fusion: a study over two sources with independent planted signals, then `adsearch ensemble -o`
    (caruana and stack): the nested CV of the ensemble beside the best single trial chosen the same way, and
    both on the 71 test recordings with McNemar's test."""
    import optuna

    from adsearch.results.ensemble import export_ensemble
    from adsearch.results.schema import load_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for seed in range(seeds):
        first, second = _fusion_caches(work / f"fusion-{seed}", seed)
        url = f"sqlite:///{work / f'fusion-{seed}.db'}"
        spec = parse_spec({**QUALITY_SPACE, "seed": seed})
        create_or_resume(make_storage(url), "fusion", {"a": open_cache(first), "b": open_cache(second)}, spec,
                         "fusion", trials)
        run_worker("fusion", url, worker_index=0)
        for method in ("caruana", "stack"):
            exported = export_ensemble("fusion", url, work / f"fusion-{seed}-{method}", method, top=20,
                                       log=lambda _: None)
            test, cv = exported.test, exported.config.cv
            sources = sorted(load_config(exported.out_dir / m.folder).features.source for m in exported.config.members)
            row = {"seed": seed, "method": method, "members": len(exported.config.members),
                   "nested_cv_ensemble": round(cv.ensemble.mean, 4), "nested_cv_single": round(cv.best_single.mean, 4),
                   "test_ensemble": round(test["ensemble"]["balanced_accuracy"]["value"], 4),
                   "test_single": round(test["best_single"]["balanced_accuracy"]["value"], 4),
                   "mcnemar_p": round(test["comparison"]["p_value"], 3), "member_sources": sources}
            rows.append(row)
            print(f"ensemble seed {seed} {method:<8}: {row['members']} members; nested CV {row['nested_cv_ensemble']} "
                  f"vs single {row['nested_cv_single']}; test BA {row['test_ensemble']} vs {row['test_single']} "
                  f"(McNemar p {row['mcnemar_p']}); member sources {sources}", flush=True)
    return {"trials": trials, "seeds": seeds, "rows": rows}


def mmse_stack(work: Path, trials: int = 40, seeds: int = 3) -> dict:
    """The MMSE stack's ridge penalty: adsearch's fixed alpha = 1 against one chosen by leave-one-out
    (RidgeCV), on joint MMSE studies over two sources carrying the same planted score; nested CV RMSE beside
    the best single trial chosen the same way and Caruana's selection, and each stack's most negative weight."""
    import numpy as np
    import optuna
    from sklearn.linear_model import RidgeCV

    import adsearch.search.ensemble as ensemble_module
    from adsearch.embed.synthetic import planted_mmse, write_realistic_cache
    from adsearch.search.objective import FeatureSource
    from adsearch.search.study import open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    adsearch_stack = ensemble_module.stack

    def leave_one_out(scores, y, regression, seed=0):
        model = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit(scores.T, y)
        return ensemble_module.Combination(np.asarray(model.coef_, np.float64), float(model.intercept_))

    rows = []
    for seed in range(seeds):
        labels = np.random.default_rng(seed).permutation(np.arange(237) % 2)
        scores = planted_mmse(labels, seed)
        caches = {name: open_cache(write_realistic_cache(work / f"mmse-stack-{seed}-{name}", target="mmse",
                                                         n_train=166, n_test=71, n_layers=4, dim=64, strength=0.4,
                                                         seed=offset + 10 * seed, labels=labels, mmse=scores))
                  for name, offset in (("a", 1), ("b", 2))}
        url = f"sqlite:///{work / f'mmse-stack-{seed}.db'}"
        spec = parse_spec({"task": "mmse", "seed": seed,
                           "space": {"pooling": ["mean"], "classifiers": {"ridge": {}, "pls": {}, "svr": {}}}})
        create_or_resume(make_storage(url), "fused", caches, spec, "mmse-stack", trials)
        run_worker("fused", url, worker_index=0)
        study, setup = open_study(make_storage(url), "fused", url)
        y = FeatureSource(caches["a"], task="mmse").labels
        row = {"seed": seed}
        for name, stack in (("alpha_1", adsearch_stack), ("leave_one_out", leave_one_out)):
            ensemble_module.stack = stack
            try:
                result = ensemble_module.ensemble_cv(study, y, setup.folds, "rmse", 20, 20, "stack")
            finally:
                ensemble_module.stack = adsearch_stack
            row[name] = round(float(np.mean(result.ensemble_folds)), 3)
            row[f"{name}_most_negative_weight"] = round(float(np.min(result.weights)), 3)
        row["best_single"] = round(float(np.mean(result.single_folds)), 3)
        caruana = ensemble_module.ensemble_cv(study, y, setup.folds, "rmse", 20, 20, "caruana")
        row["caruana"] = round(float(np.mean(caruana.ensemble_folds)), 3)
        rows.append(row)
        print(f"mmse stack seed {seed}: nested CV RMSE alpha=1 {row['alpha_1']}, leave-one-out "
              f"{row['leave_one_out']}; best single {row['best_single']}, caruana {row['caruana']}", flush=True)
    return {"trials": trials, "seeds": seeds, "rows": rows}


# ru_maxrss survives fork and exec on Linux (a child would report its parent's peak, here the parent that
# wrote a 4 GB cache), so the child resets its high-water mark first and reads VmHWM at the end. It also
# resets the mark around every trial's cross-validation, to tell which configurations need the most.
MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
import adsearch.search.objective as objective_module
import adsearch.search.study as study_module
import adsearch.search.worker as worker_module

def high_water_mb(reset=False):
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return int(hwm.split()[1]) / 1024

high_water_mb(reset=True)
peaks, per_trial = [], []
real_cv = objective_module.cross_validate

def measured_cv(config, *args, **kwargs):
    peaks.append(high_water_mb(reset=True))
    try:
        return real_cv(config, *args, **kwargs)
    finally:
        per_trial.append({"peak_rss_mb": high_water_mb(reset=True), "config": study_module.describe_config(
            config.model_dump())})

objective_module.cross_validate = measured_cv
worker_module.run_worker(sys.argv[1], sys.argv[2], worker_index=0)
peaks.append(high_water_mb())
print(json.dumps({"peak_rss_mb": max(peaks + [t["peak_rss_mb"] for t in per_trial]), "per_trial": per_trial}))
"""


def memory(work: Path, trials: int = 20) -> dict:
    """Peak RSS of one worker process on a cache of 25 layers x 1024 dims x 10,000 windows (8,000 of them in
    the train split), over trials of the memory-hungry kinds: window-level units, wide poolings, PCA, LDA."""
    shape = dict(n_train=2000, n_test=500, n_layers=25, dim=1024, windows_per_item=4)  # 10,000 windows
    cache_dir = write_synthetic_cache(work / "big", **shape, signal_layer=12)
    spec = {"cv": {"folds": 5}, "pruner": "none",
            "space": {"pooling": ["mean", "mean+std+max"], "unit": ["recording", "window"],
                      "pca": ["none", "components", "variance"], "classifiers": {"logreg": {}, "lda": {}}}}
    url = _study(work, cache_dir, "memory", spec, trials)
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "memory", url], capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    units = [t.params["unit"] for t in _trials(url, "memory")]
    result.update({"trials": trials, "window_trials": units.count("window"), "windows": 10_000})
    worst = max(result["per_trial"], key=lambda t: t["peak_rss_mb"])
    print(f"memory: peak worker RSS {result['peak_rss_mb']:.0f} MB over {trials} trials "
          f"({result['window_trials']} window-level) on 25 x 1024 x 10,000 windows; "
          f"largest trial {worst['peak_rss_mb']:.0f} MB: {worst['config']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["overhead", "scaling", "quality", "memory", "mmse", "ensemble", "mmse-stack",
                                         "hard", "all"])
    parser.add_argument("--trials", type=int, help="override the part's trial budget")
    parser.add_argument("--seeds", type=int, help="quality, mmse, ensemble: caches (and runs) per planted kind")
    parser.add_argument("--workers", type=int, help="quality, mmse: runs at a time (default: every core)")
    parser.add_argument("--before", type=Path, help="hard: a checkout of the code before, run as 'previous default'")
    parser.add_argument("--kinds", help="hard: comma-separated kinds (default: the five hard ones; also mean, spread, "
                                        "nonlinear: the easy kinds of quality)")
    parser.add_argument("--work", type=Path, help="hard: keep the caches, studies and each run's run.json here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    parts = ["overhead", "scaling", "quality", "memory", "mmse", "ensemble"] if args.part == "all" else [args.part]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            options = {"trials": args.trials} if args.trials else {}
            if part == "hard":
                from hard import KINDS, hard

                results[part] = hard(args.work or Path(tmp) / "hard", **options, **{k: v for k, v in (
                    ("seeds", args.seeds), ("workers", args.workers), ("before", args.before)) if v},
                    kinds=tuple(args.kinds.split(",")) if args.kinds else tuple(KINDS))
                continue
            if part in ("quality", "mmse"):
                options.update({k: v for k, v in (("seeds", args.seeds), ("workers", args.workers)) if v})
            elif part in ("ensemble", "mmse-stack") and args.seeds:
                options["seeds"] = args.seeds
            results[part] = globals()[part.replace("-", "_")](Path(tmp), **options)
    results["max_rss_mb_of_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
