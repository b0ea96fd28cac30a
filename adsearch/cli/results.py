"""`adsearch export`, `evaluate`, `predict` and `ensemble`: results out of a study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.markup import escape

from adsearch.cli.app import ARTIFACTS_HELP, STORAGE_HELP, THREADS_HELP, app
from adsearch.cli.console import err, out, print_threads, user_errors

# ----------------------------------------------------------------------------------------------------------
# finishing a study


@app.command()
def export(
    study: Annotated[str, typer.Option(help="Study name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="New folder for config, model and report.")],
    storage: Annotated[str, typer.Option(help=STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    trial: Annotated[int | None, typer.Option(help="Trial number to export (default: the best of --choose-from "
                                                  "by fresh folds).")] = None,
    choose_from: Annotated[int, typer.Option(help="Re-score the study's K best trials on fresh fold assignments "
                                                  "(deconfounded like the study) and export the best of them: "
                                                  "the study's best value is partly luck. 1: its best value.",
                                             min=1, max=100)] = 5,
    despite_nuisance_baseline: Annotated[bool, typer.Option(
        "--despite-nuisance-baseline", help="Export even when the trial does not clear the nuisance-only baseline "
                                            "(recording length, speaking time, recording conditions; deconfounded "
                                            "studies: chance), which otherwise stops the export.")] = False,
    top_k: Annotated[int, typer.Option(help="Also test the next K configurations; exact McNemar vs the exported "
                                            "one (an MMSE study: paired bootstrap of the metric).", min=0,
                                       max=1000)] = 0,
    cache: Annotated[Path | None, typer.Option(help="The study's cache, if it moved (content must match).",
                                               envvar="ADSEARCH_CACHE")] = None,
    artifacts: Annotated[Path | None, typer.Option(help=ARTIFACTS_HELP, envvar="ADSEARCH_ARTIFACTS")] = None,
    control_study: Annotated[str | None, typer.Option(help="A shortcut-control study in the same storage (the same "
                                                           "search on a `--keep non-participant` or `--keep "
                                                           "non-speech` cache): its best CV goes in the report, "
                                                           "with a warning when it is well above chance.")] = None,
) -> None:
    """Freeze a trial: config.yaml, the refit pipeline (model.skops), one held-out test evaluation, report.

    The test split is read only here. Accuracy, sensitivity and specificity get Wilson intervals; balanced
    accuracy, F1 and ROC AUC bootstrap intervals; CV - test is printed beside them. An MMSE study: RMSE, MAE,
    R2 and Pearson r with bootstrap intervals, beside predicting the training mean. Without test
    labels (scores) the export stops after the refit.
    """
    from adsearch.results.export import export_trial

    with user_errors():
        result = export_trial(study, storage, output, trial, top_k, str(cache) if cache else None, artifacts,
                              log=lambda message: out.print(message, highlight=False), control_study=control_study,
                              choose_from=choose_from, despite_nuisance_baseline=despite_nuisance_baseline)
    cv = result.config.cv
    out.print(f"trial {result.config.study.trial}: {'deconfounded ' if cv.deconfound else ''}CV {cv.metric} "
              f"{cv.mean:.4f} +/- {cv.std:.4f}"
              + (f" (plain CV {cv.deconfound.plain_mean:.4f})" if cv.deconfound else "")
              + (f"; on {cv.fresh.repeats} fresh fold assignments {cv.fresh.mean:.4f} +/- {cv.fresh.std:.4f} "
                 f"(selection optimism, CV - fresh: {cv.fresh.optimism:+.4f})" if cv.fresh else ""))
    for line in result.warnings:
        err.print(f"[yellow]warning:[/] {line}", highlight=False)
    if result.test and result.config.task == "mmse":
        _print_mmse_test(result.test, cv.metric, result.top_k)
    elif result.test:
        test = result.test
        for name in ("accuracy", "balanced_accuracy", "f1", "roc_auc", "sensitivity", "specificity"):
            low, high = test[name]["ci95"]
            out.print(f"  test {name:<18} {test[name]['value']:.4f}  95 % [{low:.3f}, {high:.3f}] "
                      f"({test[name]['method']})")
        (tn, fp), (fn, tp) = test["confusion"]["matrix"]
        out.print(f"  confusion (rows true control/AD): [[{tn}, {fp}], [{fn}, {tp}]] on {test['n']} of "
                  f"{test['labelled']} labelled test recordings")
        if test.get("calibration"):
            out.print(f"  calibration of P(AD): Brier {test['calibration']['brier']:.4f} (0.25 = always 0.5), "
                      f"expected calibration error {test['calibration']['ece']:.4f}")
        out.print(f"  CV - test ({cv.metric}): {test['cv_minus_test']:+.4f} (positive: the CV was optimistic, as "
                  "is the selection optimism above)")
        for row in result.top_k:
            out.print(f"  trial {row['trial']}: CV {row['cv_mean']:.4f}, test accuracy {row['test']['accuracy']:.4f}, "
                      f"McNemar p = {row['mcnemar']['p_value']:.3f}")
    out.print(f"report: {result.out_dir / 'report.html'}", highlight=False)


def _print_mmse_test(test: dict, metric: str, top_k: list[dict]) -> None:
    for name in ("rmse", "mae", "r2", "pearson_r"):
        low, high = test[name]["ci95"]
        out.print(f"  test {name:<10} {test[name]['value']:.4f}  95 % [{low:.3f}, {high:.3f}] ({test[name]['method']})")
    floor = test["mean_predictor"]
    out.print(f"  predicting the training mean ({floor['train_mean']:.2f}) for every recording: RMSE "
              f"{floor['rmse']:.4f}, MAE {floor['mae']:.4f}, on {test['n']} of {test['labelled']} test recordings "
              "with an MMSE score")
    out.print(f"  CV - test ({metric}, as an improvement): {test['cv_minus_test']:+.4f} (positive: the CV was "
              "optimistic)")
    for row in top_k:
        paired = row["paired"]
        out.print(f"  trial {row['trial']}: CV {row['cv_mean']:.4f}, test RMSE {row['test']['rmse']:.4f}; the exported "
                  f"one better by {paired['improvement']:+.4f} {metric}, paired bootstrap p = {paired['p_value']:.3f}")


@app.command()
def evaluate(
    config: Annotated[Path, typer.Argument(help="config.yaml written by `adsearch export` (or its folder).")],
    cache: Annotated[Path | None, typer.Option(help="The cache the study used, or a folder holding it (default: "
                                                    "the path recorded at export); chosen by content hash.",
                                               envvar="ADSEARCH_CACHE")] = None,
) -> None:
    """Re-run the cross-validation of an exported config (of each member of an exported ensemble) and check it
    reproduces the study's score."""
    from adsearch.results.ensemble import is_ensemble, reproduce_members
    from adsearch.results.export import cache_for, reproduce_cv
    from adsearch.results.schema import load_config

    if is_ensemble(config):
        with user_errors():
            members = reproduce_members(config, cache)
        for trial, same in members:
            out.print(f"member trial {trial}: " + ("reproduced exactly" if same else "DIFFERS from the study"))
        if not all(same for _, same in members):
            raise typer.Exit(1)
        out.print(f"all {len(members)} members reproduced exactly")
        return
    with user_errors():
        exported = load_config(config)
        scores = reproduce_cv(exported, cache_for(exported, cache))
    mean = sum(scores) / len(scores)
    out.print(f"CV {exported.cv.metric}: {mean:.6f} over {len(scores)} folds "
              f"({', '.join(f'{s:.4f}' for s in scores)})")
    if scores == exported.cv.fold_scores:
        out.print("reproduced exactly: identical fold scores to the study's trial "
                  f"{exported.study.trial}")
    else:
        err.print(f"[yellow]differs from the study's {exported.cv.mean:.6f} "
                  f"({', '.join(f'{s:.4f}' for s in exported.cv.fold_scores)})[/]")
        raise typer.Exit(1)


@app.command()
def predict(
    export_dir: Annotated[Path, typer.Argument(help="Folder written by `adsearch export`.")],
    audio: Annotated[list[Path], typer.Argument(help="Recordings (any rate, mono or stereo, WAV/FLAC).")],
    segments: Annotated[Path | None, typer.Option(help="Participant speech: a CSV file,begin,end (seconds) or a "
                                                       "corpus manifest. Files not in it are segmented by voice "
                                                       "activity detection (see --vad).")] = None,
    vad: Annotated[bool, typer.Option("--vad/--no-vad", help="For files without --segments: keep the speech that "
                                                             "silero-vad finds (every speaker's: the interviewer's "
                                                             "cannot be told apart without a diarisation), or use "
                                                             "the whole recording.")] = True,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write predictions CSV here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, min=1, max=1024)] = None,
) -> None:
    """Probability of AD (or, from an MMSE model, the MMSE score) for new recordings, through the exported
    speech model layer, pooling and pipeline.

    Only as many transformer layers run as the chosen layer needs. A file that cannot be read gets an
    error row; the others are still predicted, every row is written, and the exit status is then 1. The
    `segmentation` column says which speech each file used; a score from voice activity detection or the
    whole recording is not comparable with the study's (the `note` column says so): pass --segments.
    """
    from adsearch.results.ensemble import EnsemblePredictor, is_ensemble
    from adsearch.results.predict import Predictor, check_output, read_segments, write_predictions
    from adsearch.vad import VAD_CAVEAT

    with user_errors():
        if output:
            check_output(output)
        spans = read_segments(segments) if segments else {}
        plan = print_threads(threads)
        predictor = (EnsemblePredictor(export_dir, device, vad, plan.threads) if is_ensemble(export_dir)
                     else Predictor(export_dir, device, vad, threads=plan.threads))
    unsegmented = [path for path in audio
                   if not spans.get(str(path), spans.get(str(path.resolve()), spans.get(path.name)))]
    if unsegmented:
        err.print(f"[yellow]note:[/] {len(unsegmented)} of {len(audio)} file(s) have no segmentation"
                  + (" (pass --segments)" if not segments else f" in {escape(str(segments))}") + ": "
                  + (escape(VAD_CAVEAT) if vad else "each is used whole, interviewer speech and pauses included"),
                  highlight=False)
    predictions = []
    for path in audio:
        found = spans.get(str(path), spans.get(str(path.resolve()), spans.get(path.name)))
        prediction = predictor.predict(path, found)
        predictions.append(prediction)
        if prediction.error:
            err.print(f"[red]{escape(prediction.file)}: {escape(prediction.error)}[/]", highlight=False)
        else:
            score = (f"MMSE {prediction.mmse:.1f} (predicted)" if prediction.mmse is not None
                     else f"P(AD) = {prediction.prob_ad:.3f}" if prediction.prob_ad is not None
                     else f"decision {prediction.decision:+.3f}")
            label = f" -> {prediction.label}" if prediction.label else ""
            out.print(f"{prediction.file}: {score}{label} "
                      f"({prediction.n_windows} windows, {prediction.speech_seconds:.1f} s of speech, "
                      f"segmentation: {prediction.segmentation})"
                      + (f"; {prediction.note}" if prediction.note else ""), highlight=False, markup=False)
    if output:
        with user_errors():
            write_predictions(predictions, output)
        out.print(f"wrote {output}", highlight=False)
    if failed := sum(1 for p in predictions if p.error):
        err.print(f"{failed} of {len(predictions)} file(s) could not be predicted (error rows)", highlight=False)
        raise typer.Exit(1)


@app.command()
def ensemble(
    study: Annotated[str, typer.Option(help="Study name.")],
    storage: Annotated[str, typer.Option(help=STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    method: Annotated[str, typer.Option(help="caruana: greedy selection with replacement, averaged; stack: a "
                                             "regularised logistic (MMSE: ridge) model on the members' scores. "
                                             "Across feature sources either is late fusion.")] = "caruana",
    top: Annotated[int, typer.Option(help="Candidates: the best N completed trials.", min=2, max=1000)] = 20,
    rounds: Annotated[int, typer.Option(help="Selection rounds of caruana (members, counted with repetition).",
                                        min=1, max=1000)] = 20,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Export the ensemble to this new folder: "
                                                                       "each member refitted once, the held-out "
                                                                       "test beside the best single trial; "
                                                                       "evaluate and predict take the folder.")
                      ] = None,
) -> None:
    """Ensemble the study's best trials (Caruana et al. 2004 selection, or stacking), with an honest CV.

    Built from the out-of-fold scores every completed trial keeps. The printed CV is nested: on each fold the
    candidates are ranked and the ensemble built on the other folds only, and the best single trial is chosen
    the same way, so the two compare like with like. With -o the ensemble is exported like a single model.
    """
    import optuna

    from adsearch.results.ensemble import export_ensemble
    from adsearch.search.ensemble import describe_left_out, ensemble_cv
    from adsearch.search.objective import FeatureSource
    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import load_cache_for, open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        if output is not None:
            exported = export_ensemble(study, storage, output, method, top, rounds,
                                       log=lambda message: out.print(message, highlight=False))
            record = exported.config.cv
            result = (record.metric, exported.study_best, record.ensemble.fold_scores, record.best_single.fold_scores,
                      [(m.trial, m.weight) for m in exported.config.members])
        else:
            loaded, setup = open_study(make_storage(storage, create=False), study, mask_url(storage))
            labels = FeatureSource(load_cache_for(setup, study), setup.null_seed, task=setup.spec.task).labels
            computed = ensemble_cv(loaded, labels, setup.folds, setup.spec.cv.metric, top, rounds, method)
            if left_out := describe_left_out(computed.left_out):
                out.print(left_out, highlight=False)
            result = (setup.spec.cv.metric, loaded.best_value, computed.ensemble_folds, computed.single_folds,
                      list(zip(computed.trials, computed.weights, strict=True)))
    metric, study_best, ensemble_folds, single_folds, members = result
    weights = ", ".join(f"trial {number} x{weight:.3g}" for number, weight in members)
    out.print(f"{method} ensemble of the best {top} trials, built on all train recordings: {weights}",
              highlight=False)
    out.print(f"nested CV {metric} on {len(ensemble_folds)} folds: ensemble {np.mean(ensemble_folds):.4f} +/- "
              f"{np.std(ensemble_folds):.4f}; best single trial chosen the same way {np.mean(single_folds):.4f} +/- "
              f"{np.std(single_folds):.4f} (the study's best CV, {study_best:.4f}, was chosen on "
              "all folds and is optimistic)", highlight=False)
    if output is not None and exported.test:
        test = exported.test
        out.print(f"held-out test {metric} ({test['n']} recordings): ensemble {test['ensemble'][metric]['value']:.4f} "
                  "[{:.3f}, {:.3f}]".format(*test["ensemble"][metric]["ci95"])
                  + f", best single trial {test['best_single_trial']} {test['best_single'][metric]['value']:.4f} "
                  "[{:.3f}, {:.3f}]".format(*test["best_single"][metric]["ci95"])
                  + f"; paired comparison p = {test['comparison']['p_value']:.3f} "
                  f"({test['comparison'].get('method', 'exact McNemar')})", highlight=False)
    if output is not None:
        out.print(f"report: {output / 'report.html'}", highlight=False)
