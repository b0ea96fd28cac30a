"""The study report: figures (PNG) and one HTML page, also uploaded to the study as artifacts.

Figures: the layer curve (best CV score per layer: which layer carries the signal), best score per pooling
and per classifier, the optimisation history, parameter importances and, when the test split is labelled,
the test confusion matrix.
"""

from __future__ import annotations

import html
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

DEFAULT_ARTIFACTS = "adsearch-artifacts"
ARTIFACTS_ATTR = "adsearch:artifacts"  # study system attribute: the absolute artifact store its figures went to


def artifact_store(study, given: Path | str | None = None) -> Path:
    """Where a study's figures go: `given`, else the store the study recorded when its first figure was
    uploaded (so `--artifacts` is given once, at `search`), else ./adsearch-artifacts."""
    if given is not None:
        return Path(given)
    recorded = study._storage.get_study_system_attrs(study._study_id).get(ARTIFACTS_ATTR)
    return Path(recorded) if recorded else Path(DEFAULT_ARTIFACTS)


def recorded_stores(storage) -> list[str]:
    """The distinct artifact stores the studies in `storage` recorded, sorted."""
    stores = (storage.get_study_system_attrs(study._study_id).get(ARTIFACTS_ATTR)
              for study in storage.get_all_studies())
    return sorted({store for store in stores if store})


def _best_by(trials, key, lower_is_better: bool = False) -> tuple[list, list]:
    best: dict = defaultdict(lambda: np.inf if lower_is_better else -np.inf)
    pick = min if lower_is_better else max
    for trial in trials:
        value = key(trial)
        if value is not None:
            best[value] = pick(best[value], trial.value)
    names = sorted(best)
    return names, [best[n] for n in names]


def _figures(study, setup, test: dict | None, out: Path, layer_label: str = "layer") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from optuna.trial import TrialState

    from adsearch.search.protocol import direction

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    metric = setup.spec.cv.metric
    lower = direction(metric) == "minimize"
    paths = []

    def save(fig, name: str) -> None:
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    sources = sorted({t.params["source"] for t in complete if "source" in t.params})
    for source in sources or [None]:  # a multi-source study: one curve per source
        mine = [t for t in complete if t.params.get("source") == source]
        key = "layer" if source is None else f"layer.{source}"
        default = None if source is None else 0  # a one-layer source (eGeMAPS) has no layer parameter
        layers, scores = _best_by(mine, lambda t, key=key, default=default: t.params.get(key, default), lower)
        ax.plot(layers, scores, marker="o", label=source)
    if sources:
        ax.legend(title="source", fontsize=8)
    ax.set(xlabel=layer_label if not sources else "layer (per source; one-layer sources at 0)",
           ylabel=f"best CV {metric}", title="Layer curve")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    save(fig, "layer_curve")

    for key, title in (("pooling", "Best CV score per pooling"), ("classifier", "Best CV score per classifier")):
        names, values = _best_by(complete, lambda t, k=key: t.params.get(k), lower)
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh(names, values)
        ax.set(xlabel=f"best CV {metric}" + (" (lower is better)" if lower else ""), title=title)
        if setup.spec.task != "mmse":
            ax.set_xlim(min(values + [0.5]) - 0.05, 1.0)
        save(fig, f"best_per_{key}")

    ordered = sorted(complete, key=lambda t: t.number)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.scatter([t.number for t in ordered], [t.value for t in ordered], s=10, alpha=0.6, label="trial")
    accumulate = np.minimum.accumulate if lower else np.maximum.accumulate
    ax.plot([t.number for t in ordered], accumulate([t.value for t in ordered]), color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel=f"CV {metric}", title="Optimisation history")
    ax.legend()
    save(fig, "history")

    try:
        import warnings

        import optuna

        with warnings.catch_warnings():  # "regimes with < 2 trials" for conditional parameters
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # too few or too uniform trials
        importances = {}
    if importances:
        names = list(importances)[:12][::-1]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (Optuna's default evaluator)", title="Parameter importances")
        save(fig, "importances")

    from adsearch.search.screen import heatmap
    from adsearch.search.study import load_screen

    screened = load_screen(study)
    if screened is not None:
        heatmap(screened, out / "layer_screen.png")
        paths.append(out / "layer_screen.png")

    if test and "predictions" in test and setup.spec.task == "mmse":
        true = [p["mmse"] for p in test["predictions"]]
        predicted = [p["predicted"] for p in test["predictions"]]
        fig, ax = plt.subplots(figsize=(4, 3.8))
        ax.plot([0, 30], [0, 30], color="grey", linestyle="--", linewidth=1, label="perfect")
        ax.axhline(test["mean_predictor"]["train_mean"], color="C3", linewidth=1, linestyle=":",
                   label="training mean")
        ax.scatter(true, predicted, s=14, alpha=0.7, label="test recording")
        ax.set(xlim=(0, 30.5), ylim=(0, 30.5), xlabel="true MMSE", ylabel="predicted MMSE",
               title=f"Test: RMSE {test['rmse']['value']:.2f}, r {test['pearson_r']['value']:.2f}")
        ax.legend(loc="upper left", fontsize=8)
        save(fig, "test_predicted_vs_true")
    elif test:
        matrix = np.array(test["confusion"]["matrix"])
        fig, ax = plt.subplots(figsize=(3.6, 3.2))
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):  # white on the dark cells, black on the light ones
            ax.text(j, i, str(count), ha="center", va="center", fontsize=14,
                    color="white" if count > matrix.max() / 2 else "black")
        labels = test["confusion"]["labels"]
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=labels, yticklabels=labels, xlabel="predicted",
               ylabel="true", title="Test confusion matrix")
        save(fig, "test_confusion")
    if test and test.get("calibration"):
        bins = test["calibration"]["bins"]
        fig, ax = plt.subplots(figsize=(3.8, 3.6))
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
        ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], marker="o", label="test")
        for b in bins:
            ax.annotate(str(b["n"]), (b["mean_predicted"], b["observed"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(AD) (bin mean)", ylabel="share AD",
               title=f"Test reliability (Brier {test['calibration']['brier']:.3f})")
        ax.legend(loc="upper left", fontsize=8)
        save(fig, "test_reliability")
    return paths


def _honesty_rows(exported, floor: dict | None, control: dict | None, baseline: dict | None = None) -> list[tuple]:
    """Every figure next to what it would be by chance and how it was obtained."""
    from adsearch.search.baseline import chance_level
    from adsearch.search.baseline import describe as describe_baseline
    from adsearch.search.null import describe
    from adsearch.search.protocol import direction

    metric = exported.cv.metric
    chance = chance_level(baseline, metric)
    if direction(metric) == "minimize":
        said = (f"{chance:.4f} ({metric} of predicting each training fold's mean MMSE, the study's folds)"
                if chance is not None else f"the {metric} of predicting the training mean (not recorded)")
    else:
        said = (f"{chance:g}" if chance is not None else "the majority-class rate") + f" ({metric})"
    rows = [("chance", said)]
    rows.append(("nuisance-only baseline", f"CV {describe_baseline(baseline)}, the study's folds" if baseline
                 else "not recorded (a study created before adsearch computed it)"))
    rows.append(("noise floor (`adsearch null`)", describe(floor) if floor else
                 "not measured: run `adsearch null --study " + exported.study.name + "` (the same search on "
                 "label-permuted train splits)"))
    if control:
        rows.append(("shortcut control", f"study {control['study']} (cache {control['cache']}): best CV "
                     f"{control['best']:.4f} after {control['trials']} trials"
                     + (f"; its noise floor median {control['floor']['null_median']:.4f}"
                        if (control.get("floor") or {}).get("n") else "")))
    else:
        rows.append(("shortcut control", "none given: see the README's recipe (`adsearch corpus adresso ... --keep "
                     "non-speech`, the same search, then `adsearch export --control-study`)"))
    return rows


def slug(name: str) -> str:
    """A study name as part of a file name: letters, digits, '.', '_' and '-' only, at most 60 characters,
    never '.' or '..' (the study id beside it keeps names that slug alike apart)."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:60]
    return text or "study"


SEGMENTATION_MEANING = {
    "participant": "participant speech from the corpus's speaker segmentation",
    "non-participant": "everything outside the participant's speech (a shortcut control)",
    "non-speech": "everything outside every speaker's speech (a shortcut control)",
    "vad": "speech found by voice activity detection (interviewer included)",
    "given": "segments given in the manifest",
    "whole": "the whole recording",
}


def describe_segmentation(meta: dict) -> str:
    """Which part of each recording the features came from, as the cache recorded it."""
    counts = meta.get("manifest", {}).get("segmentation")
    if not counts:
        return "not recorded (a cache extracted before adsearch recorded it)"
    return "; ".join(f"{count} recording(s): {SEGMENTATION_MEANING.get(kind, kind)}" for kind, count in counts.items())


def upload_screen(study, result, artifacts: Path | str | None = None) -> Path:
    """The layer screen's heat map, attached to the study as soon as the screen ran (dashboard artifact)."""
    from adsearch.search.screen import heatmap

    folder = artifact_store(study, artifacts)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"screen-{study._study_id}-{slug(study.study_name)}.png"
    heatmap(result, path)
    _upload(study, [path], artifacts)
    return path


def _cell(value) -> str:
    """A table cell as HTML: escaped, with `command` spans set as code (they are commands to copy)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(value)))


def html_table(rows: list[tuple]) -> str:
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{body}</table>"


def _calibration_paragraph(calibration: dict | None) -> str:
    if not calibration:
        return ("<p>Calibration: not measured; this classifier gives a margin (decision), not a probability.</p>")
    return (f"<p>Calibration of P(AD) on the test split: Brier score {calibration['brier']:.4f} (always saying 0.5 "
            f"scores 0.25), expected calibration error {calibration['ece']:.4f} over {calibration['n_bins']} "
            "equal-width bins (the reliability figure below; numbers beside the points are recordings per bin). "
            "With a few dozen recordings the bins are small: read it as a rough check.</p>")


def _confusion_table(confusion: dict) -> str:
    labels, matrix = confusion["labels"], confusion["matrix"]
    return html_table([("", *(f"predicted {label}" for label in labels))]
                  + [(f"true {label}", *row) for label, row in zip(labels, matrix, strict=True)])


def format_params(params: dict) -> str:
    """Hyperparameters as a person reads them: C=0.0123, not C=0.012345678901234567 (config.yaml keeps
    the exact values)."""
    def one(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{name}={one(value)}" for name, value in params.items()) or "(defaults)"


def layer_axis_label(cache) -> str:
    """What "layer" means on the layer curve: the cache's own first meaning (a speech model's input, an
    eGeMAPS or linguistic source's only layer)."""
    meaning = cache.meta.get("layers", {}).get("meaning", {}).get("0")
    if cache.n_layers == 1:
        return f"layer (one layer: {meaning})" if meaning else "layer (one-layer source)"
    return "layer (0 = input to the first layer)"


def write_report(study, setup, cache, exported, test: dict | None, top_k: list[dict], out_dir: Path,
                 artifacts: Path | str | None = None, floor: dict | None = None, control: dict | None = None,
                 warnings: list[str] | None = None, baseline: dict | None = None) -> list[Path]:
    """Write out_dir/report.html and out_dir/figures/*.png; upload the figures to the study."""
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(study, setup, test, figures_dir, layer_axis_label(cache)[:80])
    pipeline = exported.pipeline
    config_rows = [("trial", exported.study.trial), ("model", f"{exported.model.name} @ {exported.model.revision}"),
                   ("layer", exported.features.layer), ("pooling", exported.features.pooling),
                   ("unit", exported.features.unit), ("scale", pipeline.scale),
                   ("pca", pipeline.pca_components or pipeline.pca_variance or "none"),
                   ("l2 normalise", pipeline.l2_normalize), ("classifier", pipeline.classifier),
                   ("hyperparameters", format_params(pipeline.params)),
                   (f"{'deconfounded ' if exported.cv.deconfound else ''}CV {exported.cv.metric}",
                    f"{exported.cv.mean:.4f} +/- {exported.cv.std:.4f} ({exported.cv.folds} folds x "
                    f"{exported.cv.repeats})")]
    if exported.cv.deconfound:
        config_rows.append((f"plain CV {exported.cv.metric}", f"{exported.cv.deconfound.plain_mean:.4f} (the "
                            "deconfounded CV scores each fold's predictions with their linear dependence on "
                            f"{', '.join(exported.cv.deconfound.features)} at a fixed label removed)"))
    if exported.cv.selection:
        config_rows.append(("how it was chosen", describe_selection(exported.cv.selection)))
    config_rows.append(("segmentation of the recordings", describe_segmentation(cache.meta)))
    if exported.cv.calibration:
        config_rows.append(("calibration of P(AD), out-of-fold", f"Brier {exported.cv.calibration['brier']:.4f}, "
                            f"expected calibration error {exported.cv.calibration['ece']:.4f}"))
    fresh = exported.cv.fresh
    if fresh:
        config_rows.append((f"CV on {fresh.repeats} fresh fold assignments",
                            f"{fresh.mean:.4f} +/- {fresh.std:.4f}: selection optimism {fresh.optimism:+.4f}"))
    parts = ["<h1>adsearch report: study " + html.escape(exported.study.name) + "</h1>"]
    crossfit = cache.meta.get("crossfit")
    if crossfit and not crossfit.get("enabled"):
        warnings = ["CV optimistic: the features come from a model fine-tuned on every train recording "
                    "(adsearch finetune --no-crossfit)", *(warnings or [])]
    parts += [f"<p style='color:#a40'><b>Warning:</b> {html.escape(w)}</p>" for w in warnings or []]
    parts += ["<h2>Exported configuration</h2>", html_table(config_rows), "<h2>How good is this score?</h2>",
              html_table(_honesty_rows(exported, floor, control, baseline))]
    if test and exported.task == "mmse":
        parts += _mmse_test_parts(test, top_k)
    elif test:
        chance = test.get("chance", {})  # exports older than the chance column have none
        rows = [(name, f"{test[name]['value']:.4f}", f"[{test[name]['ci95'][0]:.3f}, {test[name]['ci95'][1]:.3f}]",
                 test[name]["method"], f"{chance[name]:.4f}" if name in chance else "")
                for name in ("accuracy", "balanced_accuracy", "f1", "roc_auc", "sensitivity", "specificity")]
        missing = (f", {len(test['unreadable'])} unreadable: "
                   + ", ".join(u["id"] for u in test["unreadable"])) if test.get("unreadable") else ""
        parts += [f"<h2>Held-out test ({test['n']} of {test.get('labelled', test['n'])} labelled recordings"
                  f"{html.escape(missing)}; evaluated once)</h2>",
                  html_table([("metric", "value", "95 % interval", "interval", "chance")] + rows),
                  f"<p>Chance: {html.escape(chance.get('how', 'not recorded'))}.</p>",
                  "<p>Confusion counts:</p>", _confusion_table(test["confusion"]),
                  _calibration_paragraph(test.get("calibration")),
                  f"<p>CV {html.escape(test['cv_metric'])} {test['cv_mean']:.4f} vs test "
                  f"{test[test['cv_metric']]['value']:.4f}: CV - test {test['cv_minus_test']:+.4f} (read like the "
                  "selection optimism, CV - fresh folds: positive means the CV was optimistic). A CV score after "
                  "a large search is optimistic; the test figure is the honest one.</p>"]
        if top_k:
            parts += ["<h2>Next configurations on the test split (exact McNemar test vs the exported one)</h2>",
                      html_table([("trial", "CV", "test accuracy", "test AUC", "p (McNemar)")] +
                             [(r["trial"], f"{r['cv_mean']:.4f}", f"{r['test']['accuracy']:.4f}",
                               f"{r['test']['roc_auc']:.4f}", f"{r['mcnemar']['p_value']:.3f}") for r in top_k])]
    else:
        parts.append("<p>No test labels: no held-out evaluation.</p>")
    if "feature_names" in cache.meta:
        parts += _feature_effects(cache)
    parts += [f"<h2>{html.escape(p.stem.replace('_', ' '))}</h2><img src='figures/{p.name}'>" for p in figures]
    style = ("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "td{padding:2px 10px;border-bottom:1px solid #ddd}</style>")
    (out_dir / "report.html").write_text(f"<!doctype html><meta charset='utf-8'>{style}" + "\n".join(parts))
    _upload(study, figures, artifacts)
    return figures


def _mmse_test_parts(test: dict, top_k: list[dict]) -> list[str]:
    """The held-out MMSE evaluation: every metric with its interval, beside predicting the training mean."""
    rows = [(name, f"{test[name]['value']:.4f}", f"[{test[name]['ci95'][0]:.3f}, {test[name]['ci95'][1]:.3f}]",
             test[name]["method"]) for name in ("rmse", "mae", "r2", "pearson_r")]
    floor = test["mean_predictor"]
    parts = [f"<h2>Held-out test ({test['n']} of {test.get('labelled', test['n'])} test recordings with an MMSE "
             "score; evaluated once)</h2>",
             html_table([("metric", "value", "95 % interval", "interval")] + rows),
             f"<p>Predicting the training mean ({floor['train_mean']:.2f}) for every test recording: RMSE "
             f"{floor['rmse']:.4f}, MAE {floor['mae']:.4f}: the floor. ADReSSo 2021's official baseline RMSE is 5.28, "
             "the best reported about 3.85 (on the full test split).</p>",
             f"<p>CV {html.escape(test['cv_metric'])} {test['cv_mean']:.4f} vs test "
             f"{test[test['cv_metric']]['value']:.4f}: CV better by {test['cv_minus_test']:+.4f} (positive means the "
             "CV was optimistic). The test figure is the honest one.</p>"]
    if top_k:
        parts += ["<h2>Next configurations on the test split (paired bootstrap vs the exported one)</h2>",
                  html_table([("trial", "CV", "test RMSE", "test R2", "exported better by", "95 % interval", "p")] +
                         [(r["trial"], f"{r['cv_mean']:.4f}", f"{r['test']['rmse']:.4f}", f"{r['test']['r2']:.4f}",
                           f"{r['paired']['improvement']:+.4f}",
                           f"[{r['paired']['ci95'][0]:+.3f}, {r['paired']['ci95'][1]:+.3f}]",
                           f"{r['paired']['p_value']:.3f}") for r in top_k])]
    return parts


def _feature_effects(cache) -> list[str]:
    """A named-feature source (linguistic): which features separate the groups on the labelled train split,
    Cohen's d with a 95 % bootstrap interval, strongest first. Descriptive: not a test of the classifier."""
    from adsearch.embed.linguistic import effect_sizes

    items = np.flatnonzero((cache.splits == "train") & (cache.labels >= 0))
    X, y = cache.recording_features(0, "mean", items), cache.labels[items]
    if min((y == 0).sum(), (y == 1).sum()) < 2:
        return []
    effects = effect_sizes(X, y)
    measured = cache.meta.get("feature_measured", {})
    order = sorted(range(len(effects)), key=lambda j: -abs(effects[j][0]))
    names = cache.meta["feature_names"]
    rows = [(names[j], f"{d:+.2f}", f"[{low:+.2f}, {high:+.2f}]", "yes" if low > 0 or high < 0 else "no",
             measured.get(names[j], "")) for j in order for d, low, high in [effects[j]]]
    return [f"<h2>Features that separate the groups (train split, {len(items)} recordings)</h2>",
            "<p>Cohen's d, AD minus control (pooled SD), with a 95 % bootstrap interval (recordings resampled "
            "within each group, 2,000 draws). With {n} features some intervals exclude 0 by chance alone; "
            "read it as a description of the data, not as evidence for the classifier.</p>".replace(
                "{n}", str(len(rows))),
            html_table([("feature", "d", "95 % interval", "excludes 0", "recordings measured")] + rows)]


def _upload(study, figures: list[Path], artifacts: Path | str | None) -> None:
    """Attach the figures to the study so the dashboard (started with the same store) shows them."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    base = artifact_store(study, artifacts)
    base.mkdir(parents=True, exist_ok=True)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    if ARTIFACTS_ATTR not in attrs:  # the first store a study's figures go to is the one its dashboard reads
        study._storage.set_study_system_attr(study._study_id, ARTIFACTS_ATTR, str(base.resolve()))
    store = FileSystemArtifactStore(str(base))
    for path in figures:
        upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study, mimetype="image/png")


def describe_selection(selection: dict) -> str:
    """One line: which trial, chosen how, and what the choice took away from the study's best value."""
    if selection.get("by") != "fresh folds":
        return f"trial {selection['trial']}, chosen by the user (--trial)"
    best = selection["candidates"][0]
    same = selection["chosen"] == selection["study_best"]
    return (f"chose trial {selection['chosen']} among the study's {selection['among']} best by fresh folds"
            + (" (also the study's best value)" if same else
               f" instead of trial {best['trial']} (study CV {best['cv']:.4f}, fresh {best['fresh']:.4f})")
            + f": {selection['optimism_removed']:+.4f} of selection optimism removed from the study's best value "
              "(the chosen one's fresh score is still the best of several: the held-out test is the unbiased check)")
