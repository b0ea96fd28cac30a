"""Search benchmarks: overhead, scaling, search quality and worker memory (figures in BENCHMARKS.md).

    python benchmarks/search.py overhead   # ADReSSo/large-model-shaped cache, logreg only, 300 trials, SQLite
    python benchmarks/search.py scaling    # trials per minute with 1 and 2 workers
    python benchmarks/search.py quality    # TPE vs random vs layer-grid on planted-signal caches, 5 seeds
    python benchmarks/search.py memory     # peak worker RSS on a 25 x 1024 x 10,000-window cache
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
from adsearch.embed.synthetic import write_synthetic_cache
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


QUALITY_CACHES = {
    "mean, linear": dict(signal_pooling="mean", nonlinear=False, signal_layer=17, strength=1.5),
    "std, linear": dict(signal_pooling="std", nonlinear=False, signal_layer=6, strength=0.8),
    "max, non-linear": dict(signal_pooling="max", nonlinear=True, signal_layer=11, strength=2.0),
}
QUALITY_SPACE = {"cv": {"folds": 5}, "pruner": "none",
                 "space": {"pooling": ["mean", "std", "mean+std", "max", "min+max", "mean+std+max"],
                           "pca": ["none", "components"], "pca_components": {"low": 4, "high": 64, "log": True},
                           "classifiers": {"logreg": {}, "lda": {}, "knn": {}, "rbf_svm": {}}}}


def _quality_run(args: tuple) -> list[float]:
    work, cache_dir, sampler, seed, trials = args
    name = f"q-{Path(cache_dir).name}-{sampler}-{seed}"
    url = _study(Path(work), Path(cache_dir), name, {**QUALITY_SPACE, "seed": seed}, trials)
    run_worker(name, url, sampler=sampler, worker_index=0)
    values = [t.value for t in sorted(_trials(url, name), key=lambda t: t.number)]
    best, curve = float("-inf"), []
    for value in values:
        best = max(best, value if value is not None else float("-inf"))
        curve.append(best)
    return curve


def quality(work: Path, trials: int = 100, seeds: int = 5, dim: int = 64) -> dict:
    """Median trials to reach 98 % of the best CV score any run found on that cache."""
    from concurrent.futures import ProcessPoolExecutor

    samplers = ("tpe", "random", "layer-grid")
    jobs, keys = [], []
    for label, planted in QUALITY_CACHES.items():
        cache_dir = write_synthetic_cache(work / f"quality-{planted['signal_pooling']}", n_train=166, n_test=0,
                                          n_layers=25, dim=dim, windows_per_item=4, signal_dims=6, **planted)
        for sampler in samplers:
            for seed in range(seeds):
                jobs.append((str(work), str(cache_dir), sampler, seed, trials))
                keys.append((label, sampler))
    with ProcessPoolExecutor(2) as pool:
        curves = list(pool.map(_quality_run, jobs))
    result = {}
    for label in QUALITY_CACHES:
        best = max(c[-1] for c, (lab, _) in zip(curves, keys, strict=True) if lab == label)
        result[label] = {"best_cv": best}
        for sampler in samplers:
            needed = [next((i + 1 for i, v in enumerate(c) if v >= 0.98 * best), trials + 1)
                      for c, key in zip(curves, keys, strict=True) if key == (label, sampler)]
            result[label][sampler] = {"median_trials": statistics.median(needed), "runs": needed}
        row = ", ".join(f"{s} {result[label][s]['median_trials']:g}" for s in samplers)
        print(f"quality [{label}] best CV {best:.3f}; median trials to 98 %: {row}  "
              f"({trials + 1} = not reached in {trials})")
    return result


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
    parser.add_argument("part", choices=["overhead", "scaling", "quality", "memory", "all"])
    parser.add_argument("--trials", type=int, help="override the part's trial budget")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    parts = ["overhead", "scaling", "quality", "memory"] if args.part == "all" else [args.part]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            function = globals()[part]
            results[part] = function(Path(tmp), args.trials) if args.trials else function(Path(tmp))
    results["max_rss_mb_of_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
