"""`adsearch search`, `worker`, `null` and `compare`: running studies, and stopping their workers cleanly."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import TextColumn

from adsearch.cli.app import ARTIFACTS_HELP, PLUGINS_HELP, STORAGE_HELP, TRIALS_HELP, WORKERS_HELP, app
from adsearch.cli.console import bar, err, out, user_errors
from adsearch.search.budget import MAX_TRIALS


def _study_summary(study, budget: int) -> None:
    from adsearch.search import deconfound
    from adsearch.search.protocol import direction
    from adsearch.search.study import StudySetup, best_summary, describe_best, describe_config, fold_fits, trial_counts

    counts = trial_counts(study)
    setup = StudySetup.from_study(study)
    fits = fold_fits(study, setup)
    saved = f"; pruning ({setup.pruner}) saved {fits['saved']} of {fits['run'] + fits['saved']} fold fits" if (
        counts["pruned"]) else ""
    out.print(f"study {study.study_name}: {counts['finished']}/{budget} finished ({counts['complete']} complete, "
              f"{counts['pruned']} pruned), {counts['failed']} failed, {counts['running']} running{saved}",
              highlight=False)
    if setup.spec.task == "mmse":
        lower = ", lower is better" if direction(setup.spec.cv.metric) == "minimize" else ""
        out.print(f"task mmse ({setup.spec.cv.metric}{lower}): {len(setup.train_ids)} train recordings with an MMSE "
                  f"score, {setup.left_out} without one left out", highlight=False)
    from adsearch.search.null import NULL_ATTR, describe, stale_floor

    floor = study._storage.get_study_system_attrs(study._study_id).get(NULL_ATTR)
    best = best_summary(study, setup)
    if floor:
        out.print("noise floor: " + describe(floor), highlight=False)
        stale = stale_floor(floor, best["value"], counts["finished"], study.study_name) if best else None
        if stale:
            err.print(f"[yellow]warning:[/] {escape(stale)}", highlight=False)
    out.print("scoring: " + deconfound.describe(setup.deconfound), highlight=False)
    if best:
        out.print(f"best: trial {best['number']}, {describe_best(best)}: {describe_config(best['config'])}",
                  highlight=False)
    from adsearch.search.baseline import describe as describe_baseline
    from adsearch.search.baseline import load_nuisance_baseline, nuisance_gate

    baseline = load_nuisance_baseline(study)
    if baseline:
        out.print("nuisance-only baseline: CV " + describe_baseline(baseline), highlight=False)
        warning = nuisance_gate(best["value"], best["fold_scores"], baseline, floor, best["deconfounded"]) \
            if best else None
        if warning:
            err.print(f"[yellow]warning:[/] {escape(warning)}; `adsearch export` stops on it unless given "
                      "--despite-nuisance-baseline", highlight=False)


@app.command()
def search(
    cache: Annotated[list[str], typer.Option(help="Embedding cache from `adsearch extract`. Give it several "
                                                  "times (optionally as NAME=PATH) to search feature sources side by "
                                                  "side: pre-trained, fine-tuned, eGeMAPS, another model; `source` "
                                                  "is then a parameter, with each source's own layers.",
                                             envvar="ADSEARCH_CACHE")],
    study: Annotated[str, typer.Option(help="Study name; an existing study is resumed.")],
    space: Annotated[Path, typer.Option(help="Search-space YAML (the default is found from any working folder: "
                                             "here, else adsearch's own).")] = Path("studies/default.yaml"),
    storage: Annotated[str, typer.Option(help=STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    trials: Annotated[int, typer.Option(help=TRIALS_HELP, min=1,
                                        max=MAX_TRIALS)] = 100,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine (one core each); 0 creates or "
                                              "resumes the study and sets its budget without running a trial "
                                              "(workers join with `adsearch worker`).")] = 1,
    sampler: Annotated[str | None, typer.Option(help="Sampler of a new study instead of the space's: tpe, random, "
                                                     "layer-grid, gp (needs torch), qmc. Recorded on the study; "
                                                     "every worker that joins uses it.")] = None,
    pruner: Annotated[str | None, typer.Option(help="Pruner of a new study instead of the space's: none, wilcoxon, "
                                                    "median. Recorded on the study.")] = None,
    override_optimiser: Annotated[bool, typer.Option(
        help="Let --sampler/--pruner differ from what an existing study recorded (this command's workers only; "
             "warns).")] = False,
    heartbeat: Annotated[int, typer.Option(help="Seconds between worker heartbeats.")] = 10,
    grace: Annotated[int, typer.Option(help="Seconds without heartbeat before a trial counts as dead.")] = 30,
    artifacts: Annotated[Path | None, typer.Option(help=ARTIFACTS_HELP, envvar="ADSEARCH_ARTIFACTS")] = None,
    plugins: Annotated[list[str] | None, typer.Option(help=PLUGINS_HELP)] = None,
    task: Annotated[str | None, typer.Option(help="classification (AD vs control) or mmse (regression of the MMSE "
                                                  "score; recordings without one are left out) instead of the "
                                                  "space's `task:`. An mmse space lists regressors "
                                                  "(studies/mmse.yaml).")] = None,
) -> None:
    """Create or resume a study and run worker processes until it has --trials finished trials.

    One Optuna study searches layer, pooling, unit, preprocessing, classifier and its hyperparameters
    jointly, scoring each trial by speaker-grouped cross-validation on the train split. More workers can
    join from any shell or machine with `adsearch worker --study NAME --storage URL`.
    """
    import time as _time

    from adsearch.results.report import upload_screen
    from adsearch.search.space import load_spec
    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import (
        StudySetup,
        best_summary,
        create_or_resume,
        describe_config,
        name_sources,
        trial_counts,
    )
    from adsearch.search.worker import spawn_workers

    if workers < 0:
        err.print("[bold red]error:[/] --workers must be at least 0")
        raise typer.Exit(2)
    if re.fullmatch(r"sqlite:/{2,3}(:memory:)?(\?.*)?", storage.strip()):
        raise typer.BadParameter(f"{storage}: an in-memory SQLite database lives inside one process, so workers "
                                 "cannot share it and the study is lost when the command ends; name a file, e.g. "
                                 "sqlite:///adsearch.db", param_hint="--storage")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        spec = load_spec(space, plugins, task)
        opened = name_sources([_named_cache(value) for value in cache])
        the_study = create_or_resume(make_storage(storage, heartbeat, grace), study, opened, spec, str(space), trials,
                                     sampler, pruner, override_optimiser,
                                     log=lambda message: out.print(message, highlight=False),
                                     on_screen=lambda new, screened: upload_screen(new, screened, artifacts))
    counts = trial_counts(the_study)
    if workers == 0:
        out.print(f"study {study} is ready: {counts['finished']} of {trials} trials finished; start workers with "
                  f"`adsearch worker --study {study}` and the same storage", highlight=False)
        return
    if counts["finished"] >= trials:
        out.print(f"study {study} already has {counts['finished']} finished trials (budget {trials})")
    else:
        one_cache = None if isinstance(opened, dict) else str(opened.path)
        kwargs = {"study_name": study, "storage_url": storage, "cache_path": one_cache, "sampler": sampler,
                  "pruner": pruner, "override_optimiser": override_optimiser, "heartbeat_interval": heartbeat,
                  "grace_period": grace}
        processes = spawn_workers(workers, kwargs)
        setup = StudySetup.from_study(the_study)
        with _stopping_workers(processes, lambda: trial_counts(the_study)["finished"], trials), \
                bar(TextColumn("{task.fields[best]}")) as progress:
            task = progress.add_task(f"{study}: trials", total=trials, completed=counts["finished"], best="")
            while any(p.is_alive() for p in processes):
                _time.sleep(1.0)
                counts = trial_counts(the_study)
                best = best_summary(the_study, setup)
                text = (f"best {best['value']:.3f} (#{best['number']}): {describe_config(best['config'])}"
                        if best else "")
                progress.update(task, completed=counts["finished"], best=text[:100])
        _report_worker_exits(processes)
    _study_summary(the_study, trials)
    counts = trial_counts(the_study)
    if counts["finished"] < trials:
        err.print(f"[bold red]error:[/] the budget is not met: {counts['finished']} of {trials} trials finished. "
                  "Run the same command again to resume.", highlight=False)
        raise typer.Exit(1)
    if counts["complete"] == 0:
        err.print("[bold red]error:[/] no trial completed, so there is nothing to export; see the errors above "
                  "and the `error` attribute of the failed trials", highlight=False)
        raise typer.Exit(1)
    out.print(f"export it with: adsearch export --study {study} --storage {mask_url(storage)} -o {study}-best",
              highlight=False)


def _named_cache(value: str):
    """`PATH` or `NAME=PATH` (a path that exists as given is never split at '=')."""
    from adsearch.embed import open_cache

    name, sep, path = value.partition("=")
    if sep and not Path(value).exists():
        return name, open_cache(path)
    return None, open_cache(value)


@contextlib.contextmanager
def _stopping_workers(processes, finished, budget: int) -> Iterator[None]:
    """Ctrl-C or SIGTERM (a service manager's stop) ends this command and its workers together, with one
    line instead of every worker's traceback. A trial cut short stays RUNNING until its heartbeat is stale;
    then a resumed search fails it and runs its parameters again."""
    import signal

    def terminated(signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except KeyboardInterrupt:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        try:
            done = f": {finished()}/{budget} trials finished"
        except Exception:  # the database may be what failed
            done = ""
        err.print(f"interrupted{done}; run the same command again to resume (trials cut short are failed and "
                  "retried once their heartbeat is stale)", highlight=False)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_worker_exits(processes) -> None:
    """Say how each worker that did not end cleanly ended: its own message, if any, is above."""
    import signal

    for index, process in enumerate(processes):
        if process.exitcode and process.exitcode < 0:
            name = signal.Signals(-process.exitcode).name
            err.print(f"[yellow]warning:[/] worker {index} was killed by {name}"
                      + (" (out of memory?)" if name == "SIGKILL" else ""))
        elif process.exitcode:
            err.print(f"[yellow]warning:[/] worker {index} stopped with exit code {process.exitcode} (its message "
                      "is above)")


@app.command()
def compare(
    cache: Annotated[Path, typer.Option(help="Embedding cache every run searches.", envvar="ADSEARCH_CACHE")],
    output: Annotated[Path, typer.Option("-o", "--output", help="New (or empty) folder for the table, figures "
                                                                "and the runs' study databases.")],
    space: Annotated[Path, typer.Option(help="Search-space YAML (the same for every run; its seed fixes the "
                                             "folds).")] = Path("studies/default.yaml"),
    samplers: Annotated[str, typer.Option(help="Comma-separated samplers: tpe, random, layer-grid, gp, qmc.")] = (
        "tpe,random,layer-grid"),
    runs: Annotated[int, typer.Option("--runs", "--seeds", help="Studies per sampler (sampler seeds 0..N-1); "
                                                              "--seeds is the old name.", min=1, max=100)] = 5,
    trials: Annotated[int, typer.Option(help=TRIALS_HELP, min=1, max=MAX_TRIALS)] = 60,
    workers: Annotated[int, typer.Option(help=WORKERS_HELP, min=1)] = 1,
    target: Annotated[float | None, typer.Option(help="Score to reach (default: 95 % of the best score any run "
                                                      "found; for RMSE or MAE 5 % above the lowest).")] = None,
) -> None:
    """Compare optimisers honestly: every sampler x seed at the same budget, folds and cache.

    Writes compare.csv / compare.md (final best, trials and CPU seconds to the target, agreement on layer and
    pooling, pruning), runs.json and the best-so-far figures (vs trials and vs CPU seconds, median and
    quartiles across seeds). The same seeds give the same table, CPU-time columns aside.
    """
    import optuna

    from adsearch.embed import open_cache
    from adsearch.search.compare import default_target, run_all, summarise, write_outputs
    from adsearch.search.samplers import SAMPLERS
    from adsearch.search.space import check_layers, load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [name.strip() for name in samplers.split(",") if name.strip()]
    with user_errors(interrupted=f"the runs finished so far are in {output}; run again with a new -o"):
        unknown = [name for name in names if name not in SAMPLERS]
        if unknown or not names:
            raise ValueError(f"--samplers: {', '.join(unknown) or 'none given'}; choose from {', '.join(SAMPLERS)}")
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise ValueError(f"{output}: exists and is not an empty folder; name a new folder so no earlier "
                             "comparison is overwritten")
        spec = load_spec(space)
        opened = open_cache(cache)
        check_layers(spec, opened.n_layers, str(space))
        with bar() as progress:
            task = progress.add_task("runs", total=len(names) * runs)
            done = run_all(opened.path, spec, names, list(range(runs)), trials, output, workers,
                           on_done=lambda run: progress.advance(task))
        goal = target if target is not None else default_target(done)
        rows = summarise(done, goal)
        paths = write_outputs(done, rows, output, f"adsearch compare: {', '.join(names)} x {runs} seeds, "
                                                  f"{trials} trials, cache {opened.path.name}")
    out.print((output / "compare.md").read_text(), highlight=False)
    out.print("written: " + ", ".join(str(p) for p in paths), highlight=False)


@app.command()
def null(
    study: Annotated[str, typer.Option(help="The study whose noise floor to measure.")],
    storage: Annotated[str, typer.Option(help=STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    runs: Annotated[int, typer.Option(help="Null studies (label permutations); p can be no smaller than "
                                           "1 / (runs + 1).", min=1, max=1000)] = 10,
    trials: Annotated[int | None, typer.Option(help=TRIALS_HELP + " Default: as many as the study has finished; "
                                                    "fewer makes the floor too low and p optimistic.",
                                               min=1, max=MAX_TRIALS)] = None,
    workers: Annotated[int, typer.Option(help=WORKERS_HELP, min=1)] = 1,
) -> None:
    """Measure what the search finds when speech says nothing about the label.

    Runs the same search (cache, space, folds, sampler, screen) on train labels permuted across speakers,
    --runs times, as studies STUDY~null0, STUDY~null1, ... in the same storage (workers anywhere can join
    them), then prints the best real CV beside the best null CVs and the permutation p-value, and records
    them on the study (study note, report).
    """
    import time as _time

    import optuna
    import optuna_dashboard

    from adsearch.embed import open_cache
    from adsearch.search.baseline import load_nuisance_baseline
    from adsearch.search.null import create_null_studies, describe, record, summarise
    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import StudySetup, load_screen, open_study, study_note, trial_counts
    from adsearch.search.worker import spawn_workers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        store = make_storage(storage, create=False)
        main, _ = open_study(store, study, mask_url(storage))
        finished = trial_counts(main)["finished"]
        budget = trials or finished
        if budget < 1:
            raise ValueError(f"study {study!r} has no finished trial yet; pass --trials")
        if budget < finished:
            err.print(f"[yellow]warning:[/] {budget} trials per null study, the study has {finished}: the null "
                      "floor comes out weaker than a full null search would find, and p optimistic", highlight=False)
        names = create_null_studies(store, study, runs, budget)
        with bar() as progress:  # one bar over the null studies, one over the current study's trials
            task = progress.add_task("null studies", total=len(names))
            for name in names:
                null_study = optuna.load_study(study_name=name, storage=store)
                if trial_counts(null_study)["finished"] < budget:
                    trial_task = progress.add_task(f"{name}: trials", total=budget,
                                                   completed=trial_counts(null_study)["finished"])
                    processes = spawn_workers(workers, {"study_name": name, "storage_url": storage})
                    with _stopping_workers(processes, lambda s=null_study: trial_counts(s)["finished"], budget):
                        while any(p.is_alive() for p in processes):
                            _time.sleep(1.0)
                            progress.update(trial_task, completed=trial_counts(null_study)["finished"])
                    progress.update(trial_task, completed=trial_counts(null_study)["finished"])
                    _report_worker_exits(processes)
                progress.advance(task)
        summary = summarise(store, study)
        record(store, study, summary)
        setup = StudySetup.from_study(main)  # the study note gains the floor
        optuna_dashboard.save_note(main, study_note(open_cache(setup.cache_path), setup, load_screen(main),
                                                    load_nuisance_baseline(main))
                                   + "\n\n**Noise floor**: " + describe(summary) + ".")
    out.print(f"study {study}: " + describe(summary), highlight=False)
    if summary["unfinished"]:
        err.print(f"[yellow]warning:[/] not counted (budget not met): {', '.join(summary['unfinished'])}",
                  highlight=False)


@app.command()
def worker(
    study: Annotated[str, typer.Option(help="Name of an existing study.")],
    storage: Annotated[str, typer.Option(help=STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    cache: Annotated[Path | None, typer.Option(envvar="ADSEARCH_CACHE",
                                               help="The study's cache, if it lives elsewhere on this machine "
                                                    "(its content must match).")] = None,
    sampler: Annotated[str | None, typer.Option(help="Use another sampler than the study recorded (needs "
                                                     "--override-optimiser; the default is the study's own).")] = None,
    pruner: Annotated[str | None, typer.Option(help="Use another pruner than the study recorded (needs "
                                                    "--override-optimiser).")] = None,
    override_optimiser: Annotated[bool, typer.Option(help="Allow --sampler/--pruner to differ from the study's; "
                                                          "prints a warning and marks this worker's trials.")] = False,
    heartbeat: Annotated[int, typer.Option(help="Seconds between heartbeats.")] = 10,
    grace: Annotated[int, typer.Option(help="Seconds without heartbeat before a trial counts as dead.")] = 30,
    max_outage: Annotated[float, typer.Option(help="Seconds to keep retrying (with backoff) while the database is "
                                                   "unreachable before this worker stops.", min=0)] = 300.0,
) -> None:
    """Join an existing study from any shell or machine and run trials until its budget is met.

    The study supplies the cache, the search space, the CV folds and the budget; a worker refuses a cache
    whose content differs from the one the study was created with.
    """
    from adsearch.search.worker import run_worker

    with user_errors():
        report = run_worker(study, storage, str(cache) if cache else None, sampler, pruner, override_optimiser,
                            heartbeat_interval=heartbeat, grace_period=grace, max_outage_seconds=max_outage)
    out.print(f"worker done: ran {report.ran} trial(s), {report.failed} failed")
