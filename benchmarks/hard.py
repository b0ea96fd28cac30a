"""Hard planted kinds (`python benchmarks/search.py hard`): where single-cell screening and choosing by one CV
value fail. Realistic caches (166 train / 71 test recordings, 25 layers x 256 dims, correlated low-rank
features, outlier dimensions; `adsearch.embed.synthetic.write_realistic_cache`) of five kinds:

* shortcut: labels follow recording length in the train split only (AD 3x longer), early layers encode length
  strongly, a weaker genuine signal sits in a middle layer;
* interaction: the label is the sign of a mean shift times a change of spread at one layer;
* sparse: the signal sits in 3 of 256 dimensions;
* extreme: short bursts that only max pooling keeps;
* mmse-nonlinear: the MMSE score, planted with a random sign per recording (only non-linear models see it).

Per kind and seed, three searches of the same budget: the default (studies/default.yaml, studies/mmse.yaml),
the random sampler without the screen, and the previous default (the code and spaces of `--before`, a
checkout of the commit before this work). Each is exported as a user would (`export`, which now chooses among
the 5 best by fresh folds; the previous code takes the best value) and its choice scored once on the test
split. The oracle: an exhaustive grid within the project's own space at the planted cell (the planted layer;
the planted pooling and mean+std+max; logreg, sparse_logreg, rbf_svm with three widths, extra_trees, logreg
on k selected columns; for MMSE ridge, kernel_ridge, svr, extra_trees' regressor), scored on the study's folds
(plain CV), its best refit and scored on the test split. "Trials to 95 % of the oracle": the first trial whose
running best reaches 0.95 x the oracle's CV (MMSE: an RMSE within 1 / 0.95 of the oracle's); the shortcut kind
has none (its shortcut's CV is above any genuine oracle): its figure is the test score of the exported choice.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KINDS = {"shortcut": {"kind": "shortcut"}, "interaction": {"kind": "interaction"}, "sparse": {"kind": "sparse"},
         "extreme": {"kind": "extreme"}, "mmse-nonlinear": {"kind": "nonlinear", "target": "mmse"}}
# the easy kinds of `search.py quality`, to measure what the portfolio costs there (--kinds mean,spread,nonlinear)
EASY = {"mean": {"kind": "mean"}, "spread": {"kind": "spread"}, "nonlinear": {"kind": "nonlinear"}}
ROOT = Path(__file__).resolve().parents[1]


def write_cache(work: Path, name: str, seed: int) -> Path:
    from adsearch.embed.synthetic import write_realistic_cache

    options = dict({**KINDS, **EASY}[name])
    if name == "mmse-nonlinear":
        options["strength"] = 0.9
    return write_realistic_cache(work / f"{name}-{seed}", n_train=166, n_test=71, seed=7000 + 31 * seed,
                                 **options)


def _grid(task: str, gamma: float) -> list[tuple[str, dict, dict]]:
    """(classifier, params, pipeline settings) of the oracle's grid."""
    if task == "mmse":
        return ([("ridge", {"alpha": a}, {}) for a in (1.0, 10.0, 100.0, 1000.0)]
                + [("kernel_ridge", {"alpha": a, "gamma": gamma * w}, {}) for a in (0.1, 1.0) for w in (0.3, 1, 3)]
                + [("svr", {"C": c, "gamma": gamma * w, "epsilon": 1.0}, {}) for c in (10.0, 100.0)
                   for w in (0.3, 1, 3)]
                + [("extra_trees_regressor", {"n_estimators": 200, "max_depth": 16, "min_samples_leaf": 2,
                                              "max_features": f}, {}) for f in ("sqrt", "log2")])
    return ([("logreg", {"C": c}, {}) for c in (0.01, 0.1, 1.0, 10.0)]
            + [("sparse_logreg", {"C": c, "l1_ratio": r}, {}) for c in (0.1, 1.0, 10.0) for r in (0.5, 1.0)]
            + [("rbf_svm", {"C": c, "gamma": gamma * w}, {}) for c in (1.0, 10.0) for w in (0.3, 1, 3)]
            + [("extra_trees", {"n_estimators": 200, "max_depth": 16, "min_samples_leaf": 2, "max_features": f},
                {}) for f in ("sqrt", "log2")]
            + [("logreg", {"C": 1.0}, {"select": "kbest", "select_k": k}) for k in (3, 8, 32)])


def oracle(cache_dir: Path, task: str, metric: str) -> dict:
    """The best of the grid at the planted cell (plain CV on the study's folds) and its test score."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from adsearch.embed import open_cache
    from adsearch.results.export import fit_on, predict_items
    from adsearch.search.objective import FeatureSource, cross_validate, score_predictions
    from adsearch.search.protocol import assign_folds, better
    from adsearch.search.space import TrialConfig

    cache = open_cache(cache_dir)
    planted = cache.meta["synthetic"]
    source = FeatureSource(cache, task=task)
    folds = assign_folds(source.labels, source.groups, 5, 1, 0, task)
    best = None
    with threadpool_limits(1):
        for pooling in dict.fromkeys([planted["signal_pooling"], "mean+std+max"]):
            X = np.hstack([source.statistic(planted["signal_layer"], s, "recording") for s in pooling.split("+")])
            X = (X - X.mean(0)) / (X.std(0) + 1e-12)
            squared = np.sum(X**2, 1)
            distances = squared[:, None] + squared[None, :] - 2 * X @ X.T
            gamma = 1.0 / float(np.median(distances[np.triu_indices(len(X), 1)]))
            for classifier, params, settings in _grid(task, gamma):
                config = TrialConfig(layer=planted["signal_layer"], pooling=pooling, unit="recording",
                                     scale="standard", pca="none", l2_normalize=False, classifier=classifier,
                                     params=params, **settings)
                cv = cross_validate(config, source, folds, metric, 0).mean
                if best is None or better(cv, best[0], metric):
                    best = (cv, config)
        cv, config = best
        train, test = cache.with_target("train", task), cache.with_target("test", task)
        if len(test) == 0:
            return {"cv": cv, "test": None, "config": config.model_dump(mode="json")}
        model = fit_on(cache, config, train, 0, task)
        score, threshold = predict_items(cache, config, model, test)
        target = cache.targets(task)[test]
        tested = score_predictions(target, score, threshold, task == "mmse")[metric]
    return {"cv": cv, "test": tested, "config": config.model_dump(mode="json")}


def run_job(job: dict) -> dict:
    """One search and its export, in this process (the code on sys.path: this tree's or --before's)."""
    import optuna

    from adsearch.results.export import export_trial
    from adsearch.search.compare import run_one

    run = run_one(job["cache"], job["spec"], job["sampler"], job["seed"], job["trials"], job["folder"])
    url = f"sqlite:///{Path(job['folder']) / (job['sampler'] + '-seed' + str(job['seed']) + '.db')}"
    name = f"{job['sampler']}-seed{job['seed']}"
    messages: list[str] = []
    options = {"despite_nuisance_baseline": True} if job["current"] else {}
    exported = export_trial(name, url, Path(job["folder"]) / "best", log=messages.append, **options)
    study = optuna.load_study(study_name=name, storage=url)
    metric = job["metric"]
    return {**run, "exported_trial": exported.config.study.trial, "exported_cv": exported.config.cv.mean,
            "exported_layer": exported.config.features.layer, "exported_pooling": exported.config.features.pooling,
            "exported_classifier": exported.config.pipeline.classifier,
            "exported_test": exported.test[metric]["value"] if exported.test else None,
            "gated": any("exported despite" in w for w in exported.warnings),
            "deconfounded": bool(getattr(exported.config.cv, "deconfound", None)),
            "trial_layers": [t.params.get("layer") for t in sorted(study.trials, key=lambda t: t.number)]}


def _spawn(job: dict, before: Path | None) -> dict:
    """Run `run_job` in a fresh interpreter with this tree's code, or with `before`'s for the previous default."""
    env = dict(os.environ, PYTHONPATH=str(before if job["previous"] else ROOT), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, "job", json.dumps(job)], env=env, capture_output=True,
                          text=True, cwd=job["folder_root"])
    if done.returncode:
        raise RuntimeError(f"{job['kind']} {job['config']} seed {job['seed']}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _saved(job: dict, before: Path | None) -> dict:
    """`_spawn`'s result, also written beside the run (a later failure does not lose finished runs)."""
    run = {**job, **_spawn(job, before)}
    (Path(job["folder"]) / "run.json").write_text(json.dumps(run))
    print(f"hard: {job['kind']} {job['config']} seed {job['seed']} done", flush=True)
    return run


def _space(tree: Path, task: str) -> dict:
    import yaml

    return yaml.safe_load((tree / "studies" / ("mmse.yaml" if task == "mmse" else "default.yaml")).read_text())


def hard(work: Path, trials: int = 30, seeds: int = 2, workers: int | None = None, before: Path | None = None,
         kinds: tuple[str, ...] = tuple(KINDS)) -> dict:
    """Every kind x seed x search; figures per kind (see the module docstring)."""
    from adsearch.search.protocol import better

    work.mkdir(parents=True, exist_ok=True)
    configs = {"default": (ROOT, "tpe", {}), "random": (ROOT, "random", {"screen": {"enabled": False}})}
    if before is not None:
        configs["previous default"] = (before, "tpe", {})
    caches, oracles, jobs = {}, {}, []
    for kind in kinds:
        task = "mmse" if kind.startswith("mmse") else "classification"
        for seed in range(seeds):
            caches[kind, seed] = write_cache(work, kind, seed)
            for config, (tree, sampler, changes) in configs.items():
                spec = {**_space(tree, task), **changes}
                metric = spec["cv"]["metric"]
                folder = work / f"{kind}-{seed}-{config.replace(' ', '_')}"
                folder.mkdir(parents=True, exist_ok=True)
                jobs.append({"kind": kind, "config": config, "seed": seed, "cache": str(caches[kind, seed]),
                             "spec": spec, "sampler": sampler, "trials": trials, "folder": str(folder),
                             "folder_root": str(folder), "metric": metric, "previous": config == "previous default",
                             "current": config != "previous default"})
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:  # oracles first: they fail fast
        oracle_futures = {key: pool.submit(oracle, path, "mmse" if key[0].startswith("mmse") else "classification",
                                           "rmse" if key[0].startswith("mmse") else "balanced_accuracy")
                          for key, path in caches.items()}
        oracles = {key: future.result() for key, future in oracle_futures.items()}
        runs = list(pool.map(lambda job: _saved(job, before), jobs))
    result: dict = {"trials": trials, "seeds": seeds, "oracle": {f"{k}-{s}": v for (k, s), v in oracles.items()}}
    for kind in kinds:
        result[kind] = {}
        for config in configs:
            mine = sorted((r for r in runs if r["kind"] == kind and r["config"] == config), key=lambda r: r["seed"])
            needed, tests, oracle_tests, layers = [], [], [], []
            for run in mine:
                planted = oracles[kind, run["seed"]]
                metric = run["metric"]
                target = planted["cv"] / 0.95 if metric == "rmse" else 0.95 * planted["cv"]
                first = next((i for i, b in enumerate(run["best"]) if b is not None and (
                    b <= target if metric == "rmse" else b >= target)), None)
                needed.append(first + 1 if first is not None else trials + 1)
                tests.append(run["exported_test"])
                oracle_tests.append(planted["test"])
                signal = json.loads((caches[kind, run["seed"]] / "cache.json").read_text())["synthetic"]["signal_layer"]
                layers.append(f"{run['exported_layer']}/{signal}")
            row = result[kind][config] = {
                "trials_to_95pct_oracle": needed if kind != "shortcut" else None,
                "median_trials_to_95pct_oracle": statistics.median(needed) if kind != "shortcut" else None,
                "exported_test": tests, "oracle_test": oracle_tests,
                "exported_layer_vs_planted": layers,
                "exported": [f"{r['exported_classifier']} {r['exported_pooling']}" for r in mine],
                "deconfounded": [r["deconfounded"] for r in mine], "gated": [r["gated"] for r in mine],
                "exported_beats_or_ties_oracle_test": sum(
                    t is not None and not better(o, t, mine[0]["metric"]) for t, o in zip(tests, oracle_tests,
                                                                                         strict=True))}
            print(f"hard [{kind}] {config:<16} trials to 95 % oracle: {row['trials_to_95pct_oracle']}; exported test "
                  f"{[round(t, 3) if t is not None else None for t in tests]} vs oracle test "
                  f"{[round(t, 3) for t in oracle_tests]}; layer {layers}; {row['exported']}; deconfounded "
                  f"{row['deconfounded']}; gated {row['gated']}", flush=True)
    return result


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "job":
    print(json.dumps(run_job(json.loads(sys.argv[2]))))
