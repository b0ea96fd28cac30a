"""Optimisers side by side: several samplers x several seeds at an equal trial budget on one cache.

Every run is a study of its own (its own SQLite file under the output folder) with the same space, the same
cache and the same fold assignment (the space's seed); only the sampler and the sampler's seed differ. Runs
go in parallel, one worker each, so a run's trials follow one another exactly as with one worker: the same
seeds give the same trials and the same table (CPU-time columns aside, which the machine decides).

Outputs: `compare.csv` / `compare.md` (one row per optimiser), `runs.json` (every run's best-so-far curve),
`best_vs_trials.png`, `best_vs_cpu.png`.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from adsearch.search.protocol import better, direction
from adsearch.search.space import StudySpec


@dataclass
class Run:
    """One study of the comparison: its best-so-far curve by trial and by CPU seconds."""

    sampler: str
    seed: int
    values: list[float | None]  # per trial in order; None for a pruned or failed trial
    best: list[float]  # best complete value so far, after each trial (-inf, or inf for RMSE, before the first)
    cpu_seconds: list[float]  # cumulative: screening, then each trial's duration
    best_layer: int
    best_pooling: str
    pruned: int
    fold_fits_saved: int
    metric: str = "balanced_accuracy"  # the space's metric: which way "best" goes (RMSE: the lowest)


def run_one(cache_path: str, spec_data: dict, sampler: str, seed: int, trials: int, folder: str) -> dict:
    """One run in its own SQLite study (called in a worker process)."""
    import optuna
    from threadpoolctl import threadpool_limits

    from adsearch.embed import open_cache
    from adsearch.search.space import parse_spec
    from adsearch.search.storage import make_storage
    from adsearch.search.study import StudySetup, create_or_resume, fold_fits, load_screen, trial_config
    from adsearch.search.worker import run_worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"{sampler}-seed{seed}"
    url = f"sqlite:///{Path(folder) / (name + '.db')}"
    spec = parse_spec(spec_data)
    with threadpool_limits(1):  # one core per run, the layer screen included, as for the trials
        create_or_resume(make_storage(url), name, open_cache(cache_path), spec, "compare", trials,
                         sampler=sampler, sampler_seed=seed)
    run_worker(name, url, worker_index=0)
    study = optuna.load_study(study_name=name, storage=url)
    ordered = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    screened = load_screen(study)
    spent = screened.seconds if screened else 0.0
    values, best, cpu = [], [], []
    metric = spec.cv.metric
    so_far = float("inf") if direction(metric) == "minimize" else float("-inf")
    for trial in ordered:
        value = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None
        so_far = value if value is not None and better(value, so_far, metric) else so_far
        spent += (trial.datetime_complete - trial.datetime_start).total_seconds()
        values.append(value)
        best.append(so_far)
        cpu.append(spent)
    setup = StudySetup.from_study(study)
    top = trial_config(setup, study.best_trial.params)  # fixed settings (a one-option pooling) included
    return asdict(Run(sampler, seed, values, best, cpu, top.layer, top.pooling,
                      sum(t.state == optuna.trial.TrialState.PRUNED for t in ordered),
                      fold_fits(study, setup)["saved"], metric))


def run_all(cache_path: Path, spec: StudySpec, samplers: list[str], seeds: list[int], trials: int, out: Path,
            workers: int = 1, on_done: Callable[[Run], None] | None = None) -> list[Run]:
    """Every sampler x seed, `workers` runs at a time; the runs' databases stay in `out/runs/`."""
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(cache_path), spec.model_dump(mode="json"), sampler, seed, trials, str(folder))
            for sampler in samplers for seed in seeds]
    import multiprocessing

    runs = []
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            results = (run_one(*job) for job in jobs)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(run_one, *zip(*jobs, strict=True))
        for result in results:
            runs.append(Run(**result))
            if on_done is not None:
                on_done(runs[-1])
    return runs


def _first(curve: list[float], target: float, metric: str) -> int | None:
    return next((i + 1 for i, value in enumerate(curve) if better(value, target, metric)), None)


def default_target(runs: list[Run]) -> float:
    """95 % of the best score any run found (for RMSE and MAE: 5 % above the lowest)."""
    metric = runs[0].metric
    if direction(metric) == "minimize":
        return 1.05 * min(run.best[-1] for run in runs)
    return 0.95 * max(run.best[-1] for run in runs)


def summarise(runs: list[Run], target: float) -> list[dict]:
    """One row per sampler: final best (median, spread), trials and CPU seconds to reach `target` (median
    over runs; a run that never reaches it counts as budget + 1 trials and infinite seconds), and how often
    the runs agree on the layer and pooling of their best trial."""
    rows = []
    for sampler in dict.fromkeys(run.sampler for run in runs):
        mine = [run for run in runs if run.sampler == sampler]
        finals = [run.best[-1] for run in mine]
        budget = len(mine[0].best)
        to_target = [_first(run.best, target, run.metric) for run in mine]
        trials_needed = [n if n is not None else budget + 1 for n in to_target]
        seconds = [run.cpu_seconds[n - 1] if n is not None else float("inf") for run, n in zip(mine, to_target,
                                                                                             strict=True)]
        picks = Counter((run.best_layer, run.best_pooling) for run in mine)
        (layer, pooling), count = picks.most_common(1)[0]
        rows.append({
            "sampler": sampler, "runs": len(mine), "trials": budget,
            "best_median": round(statistics.median(finals), 4),
            "best_min": round(min(finals), 4), "best_max": round(max(finals), 4),
            "target": round(target, 4),
            "reached": sum(n is not None for n in to_target),
            "median_trials_to_target": statistics.median(trials_needed),
            "median_cpu_s_to_target": round(statistics.median(seconds), 1),
            "median_cpu_s_total": round(statistics.median(run.cpu_seconds[-1] for run in mine), 1),
            "modal_best": f"layer {layer} {pooling}", "agree": f"{count}/{len(mine)}",
            "pruned_share": round(sum(run.pruned for run in mine) / (budget * len(mine)), 3),
            "fold_fits_saved": sum(run.fold_fits_saved for run in mine),
        })
    return rows


DETERMINISTIC = ("sampler", "runs", "trials", "best_median", "best_min", "best_max", "target", "reached",
                 "median_trials_to_target", "modal_best", "agree", "pruned_share", "fold_fits_saved")


def write_outputs(runs: list[Run], rows: list[dict], out: Path, title: str) -> list[Path]:
    """compare.csv, compare.md, runs.json and the two best-so-far figures."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = list(rows[0])
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    lines += ["", "Target: the score a run must reach; trials to target count a run that never reaches it as "
              "budget + 1. CPU seconds are trial durations (plus the layer screen where it ran), one worker per "
              "run. `agree`: runs whose best trial has the modal layer and pooling."]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "runs.json").write_text(json.dumps([asdict(run) for run in runs]))
    return [out / "compare.csv", out / "compare.md", out / "runs.json", *_plots(runs, rows, out)]


def _plots(runs: list[Run], rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = rows[0]["target"]
    paths = []
    for axis, name in (("trials", "best_vs_trials"), ("cpu", "best_vs_cpu")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for colour, sampler in enumerate(dict.fromkeys(run.sampler for run in runs)):
            mine = [run for run in runs if run.sampler == sampler]
            if axis == "trials":
                x = np.arange(1, len(mine[0].best) + 1)
                curves = np.array([run.best for run in mine])
            else:  # resample each run's curve on a common CPU-seconds grid
                x = np.linspace(0, max(run.cpu_seconds[-1] for run in mine), 200)
                pick = min if direction(mine[0].metric) == "minimize" else max
                curves = np.array([[pick([b for b, c in zip(run.best, run.cpu_seconds, strict=True) if c <= t],
                                         default=np.nan) for t in x] for run in mine])
            curves = np.where(np.isfinite(curves), curves, np.nan)
            with np.errstate(all="ignore"), warnings.catch_warnings():  # all-NaN columns before the first trial
                warnings.simplefilter("ignore", RuntimeWarning)
                median = np.nanmedian(curves, axis=0)
                low, high = np.nanpercentile(curves, 25, axis=0), np.nanpercentile(curves, 75, axis=0)
            ax.plot(x, median, color=f"C{colour}", label=f"{sampler} (median of {len(mine)})")
            ax.fill_between(x, low, high, color=f"C{colour}", alpha=0.2)
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        ax.set(xlabel="trials" if axis == "trials" else "CPU seconds", ylabel="best CV so far",
               title="Best so far (median, quartiles across seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

