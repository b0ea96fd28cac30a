"""Layer screening: score every layer x pooling with two probes fitted in closed form, before the search.

A search over 25 layers x 6 poolings x classifiers spends many trials finding where the signal is. Two
cheap probes answer that first, on the study's own folds and train rows only:

* **linear**: ridge regression of the +-1 labels on the standardised features (kernel form, K = X X^T),
* **kernel**: the same ridge on an RBF kernel of those features, so that signals no linear model sees
  (a class that differs in spread, not in mean) still show.

Per layer and pooling there is one Gram matrix (166 x 166 on ADReSSo) and one eigendecomposition per probe;
every fold's held-out predictions, for every regularisation strength, follow from it in closed form. A probe's score is
the study metric of its fold predictions, at its best regularisation (and kernel width): a screen, not an
unbiased estimate. Features are standardised with the statistics of all train rows (no labels involved).

The study can start from the top combinations (`screen:` in the space YAML): they are enqueued as its first
trials, inside its budget, with a classifier that matches the probe that found them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from adsearch.embed.cache import POOLINGS
from adsearch.search.deconfound import adjusted
from adsearch.search.objective import FeatureSource
from adsearch.search.protocol import MMSE_RANGE, REGRESSION_METRICS, better, direction

RIDGE_GRID = np.logspace(-3, 3, 7)  # times the mean eigenvalue of the centred kernel
# Kernel widths: the median heuristic, gamma = 1 / median squared distance, and 3x it. On the realistic caches
# a grid (x0.25, x4) found no cell the median width missed; an interaction (the sign of a mean shift times the
# sign of a spread change) shows at 3x the median's gamma only (BENCHMARKS.md, hard kinds): one more
# eigendecomposition per cell.
KERNEL_WIDTHS = (1.0, 3.0)


@dataclass
class ScreenResult:
    """Probe scores per layer (rows) and pooling (columns)."""

    layers: list[int]
    poolings: list[str]
    metric: str
    linear: np.ndarray  # (layers, poolings): each probe's score at its best ridge
    kernel: np.ndarray
    gamma: np.ndarray  # (layers, poolings): the kernel width, for standardised features
    seconds: float = 0.0
    enqueued: list[dict] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)  # per row, for a multi-source study ([] = one cache)
    # (layers, poolings): each probe's best ridge penalty, in the units of scikit-learn's Ridge / KernelRidge
    # `alpha` on standardised features (empty for screens recorded before they were kept)
    linear_alpha: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    kernel_alpha: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def row_source(self, i: int) -> str | None:
        return self.sources[i] if self.sources else None

    def row_labels(self) -> list[str]:
        return [f"{self.row_source(i)}:{layer}" if self.sources else str(layer) for i, layer in enumerate(self.layers)]

    @classmethod
    def stacked(cls, results: dict[str, ScreenResult]) -> ScreenResult:
        """One result over several sources' rows (a multi-source study's screen)."""
        parts = list(results.values())
        return cls([layer for r in parts for layer in r.layers], parts[0].poolings, parts[0].metric,
                   np.concatenate([r.linear for r in parts]), np.concatenate([r.kernel for r in parts]),
                   np.concatenate([r.gamma for r in parts]), sum(r.seconds for r in parts), [],
                   [name for name, r in results.items() for _ in r.layers],
                   np.concatenate([r.linear_alpha for r in parts]), np.concatenate([r.kernel_alpha for r in parts]))

    @property
    def lower_is_better(self) -> bool:
        return direction(self.metric) == "minimize"

    def best(self) -> np.ndarray:
        return np.minimum(self.linear, self.kernel) if self.lower_is_better else np.maximum(self.linear, self.kernel)

    def top(self, n: int) -> list[dict]:
        """The n best cells by the better of the two probes, each with the probe that scored it."""
        best = self.best()
        order = np.argsort(best if self.lower_is_better else -best, axis=None, kind="stable")
        order = order[np.isfinite(best.ravel()[order])][:n]  # cells not probed (a one-vector source's) are NaN
        rows = []
        for flat in order:
            i, j = np.unravel_index(flat, best.shape)
            probe = "linear" if better(self.linear[i, j], self.kernel[i, j], self.metric) else "kernel"
            rows.append({"row": int(i), "source": self.row_source(i), "layer": self.layers[i],
                         "pooling": self.poolings[j], "probe": probe,
                         "score": float(best[i, j]), "linear": float(self.linear[i, j]),
                         "kernel": float(self.kernel[i, j]), "gamma": float(self.gamma[i, j]),
                         "alpha": float(self._alpha(probe)[i, j]) if self._alpha(probe).size else None})
        return rows

    def _alpha(self, probe: str) -> np.ndarray:
        return self.linear_alpha if probe == "linear" else self.kernel_alpha

    def to_attr(self) -> dict:
        return {"layers": self.layers, "poolings": self.poolings, "metric": self.metric,
                "linear": _json(np.round(self.linear, 4)), "kernel": _json(np.round(self.kernel, 4)),
                "gamma": _json(self.gamma), "seconds": round(self.seconds, 2), "enqueued": self.enqueued,
                "linear_alpha": _json(self.linear_alpha), "kernel_alpha": _json(self.kernel_alpha),
                "sources": self.sources}

    @classmethod
    def from_attr(cls, attr: dict) -> ScreenResult:
        def array(values) -> np.ndarray:  # None (a cell not probed) back to NaN
            return np.asarray(values, dtype=np.float64)

        return cls(list(attr["layers"]), list(attr["poolings"]), attr["metric"], array(attr["linear"]),
                   array(attr["kernel"]), array(attr["gamma"]), attr.get("seconds", 0.0),
                   list(attr.get("enqueued", [])), list(attr.get("sources") or []),
                   array(attr.get("linear_alpha", np.zeros((0, 0)))), array(attr.get("kernel_alpha", np.zeros((0, 0)))))


def _json(values: np.ndarray) -> list:
    """Nested lists for a study attribute, NaN (a cell not probed) as None: JSON has no NaN."""
    return np.where(np.isfinite(values), values, None).tolist()


def _standardised(X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float64)
    X -= X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    return X / scale


def kfold_predictions(K: np.ndarray, y: np.ndarray, folds: np.ndarray, ridges: np.ndarray
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out kernel ridge predictions (with an unpenalised intercept) for every fold of every repeat of
    `folds` and every ridge factor, from ONE eigendecomposition of the centred kernel.

    Ridge regression is a linear smoother with hat matrix H = 11'/n + U diag(s / (s + lambda)) U'; the model
    fitted without the rows V predicts them with residuals (I - H_VV)^-1 r_V, where r are the residuals of
    the fit on all rows (the exact K-fold identity for penalised least squares). The ridge is lambda =
    factor x the mean eigenvalue. Returns [(rows of the fold, predictions (rows x ridges))]."""
    n = len(y)
    mean_row = K.mean(axis=0)
    centred = K - mean_row[None, :] - mean_row[:, None] + mean_row.mean()
    values, vectors = np.linalg.eigh(centred)
    values = np.maximum(values, 0.0)
    scale = values.mean() if values.mean() > 0 else 1.0
    shrink = values[None, :] / (values[None, :] + scale * ridges[:, None])  # (ridges, n)
    fitted = y.mean() + (shrink * (vectors.T @ (y - y.mean()))[None, :]) @ vectors.T  # (ridges, n)
    residuals = y[None, :] - fitted
    out = []
    for assignment in folds:
        for fold in range(int(assignment.max()) + 1):
            rows = np.flatnonzero(assignment == fold)
            block = vectors[rows]
            hat = (block[None, :, :] * shrink[:, None, :]) @ block.T + 1.0 / n  # (ridges, v, v)
            eye = np.eye(len(rows))[None]
            held_out = np.linalg.solve(eye - hat, residuals[:, rows, None])[..., 0]  # (ridges, v)
            out.append((rows, (y[rows][None, :] - held_out).T))
    return out


def column_scores(labels: np.ndarray, predictions: np.ndarray, metric: str) -> np.ndarray:
    """`metrics(labels, column, 0.0)[metric]` for every column of `predictions` at once (the screen scores
    thousands of columns; tests/test_trust.py checks it against `metrics`); for a regression metric
    `regression_metrics(labels, clipped column)[metric]`, with `labels` the MMSE scores."""
    from scipy.stats import rankdata

    if metric in REGRESSION_METRICS:
        return _regression_column_scores(np.asarray(labels, np.float64), np.clip(predictions, *MMSE_RANGE), metric)

    truth = np.asarray(labels).astype(bool)[:, None]
    predicted = predictions > 0.0
    tp, fp = (predicted & truth).sum(0), (predicted & ~truth).sum(0)
    fn, tn = (~predicted & truth).sum(0), (~predicted & ~truth).sum(0)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if metric == "balanced_accuracy":
        recalls = [tp / (tp + fn)] if positives else []
        recalls += [tn / (tn + fp)] if negatives else []
        return np.mean(recalls, axis=0)
    if metric == "accuracy":
        return (tp + tn) / (tp + tn + fp + fn)
    if metric == "f1":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    if metric == "roc_auc":
        if not (positives and negatives):
            return np.full(predictions.shape[1], np.nan)
        ranks = rankdata(predictions, axis=0)
        return (ranks[truth[:, 0]].sum(0) - positives * (positives + 1) / 2) / (positives * negatives)
    raise ValueError(f"unknown metric {metric!r}")


def _regression_column_scores(y: np.ndarray, predictions: np.ndarray, metric: str) -> np.ndarray:
    error = predictions - y[:, None]
    if metric == "rmse":
        return np.sqrt(np.mean(error**2, axis=0))
    if metric == "mae":
        return np.mean(np.abs(error), axis=0)
    if metric == "r2":
        total = np.sum((y - y.mean()) ** 2)
        return 1.0 - np.sum(error**2, axis=0) / total if total > 0 else np.full(predictions.shape[1], np.nan)
    centred = predictions - predictions.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (centred.T @ (y - y.mean())) / (np.linalg.norm(centred, axis=0) * np.linalg.norm(y - y.mean()))


def _probe_scores(K: np.ndarray, y: np.ndarray, labels: np.ndarray, folds: np.ndarray, metric: str,
                  nuisances: np.ndarray | None = None) -> tuple[float, float]:
    """The mean fold score of the study metric at the best ridge factor (threshold 0 on +-1 targets, or the
    MMSE predictions themselves), and that ridge as an absolute penalty: factor x the centred kernel's mean
    eigenvalue (its trace over n), which is scikit-learn's `alpha` for a ridge on the same features. With
    `nuisances` (repeats, n: nuisance-model scores): each fold's predictions adjusted for them, as the study's
    trials are scored."""
    held_out = kfold_predictions(K, y, folds, RIDGE_GRID)
    repeats = np.repeat(np.arange(len(folds)), int(folds.max()) + 1)  # held_out runs fold by fold, repeat by repeat
    scores = np.mean([column_scores(labels[rows], predictions if nuisances is None else
                                    adjusted(predictions, labels[rows], nuisances[repeat, rows]), metric)
                      for (rows, predictions), repeat in zip(held_out, repeats, strict=True)], axis=0)
    scores = np.where(np.isnan(scores), np.inf if direction(metric) == "minimize" else -np.inf, scores)
    best = int(np.argmin(scores) if direction(metric) == "minimize" else np.argmax(scores))
    n = len(K)
    mean_eigenvalue = (np.trace(K) - K.sum() / n) / n
    return float(scores[best]), float(RIDGE_GRID[best] * (mean_eigenvalue if mean_eigenvalue > 0 else 1.0))


def screen(source: FeatureSource, folds: np.ndarray, layers: tuple[int, ...], poolings: list[str], metric: str,
           one_vector: bool = False, nuisances: np.ndarray | None = None) -> ScreenResult:
    """Both probes for every layer x pooling, on the train rows of `source` with the study's folds.

    A pooling concatenates statistics, each standardised column by column, so its Gram matrix is the sum of
    its statistics' Gram matrices: each statistic of a layer is read and multiplied once. A `one_vector`
    source (one vector per recording) is probed in one pooling column only, the others left NaN: every
    pooling of one vector is that vector (or zeros), and its trials do not choose one."""
    started = time.perf_counter()
    labels = source.labels
    y = labels.astype(np.float64) if metric in REGRESSION_METRICS else np.where(labels == 1, 1.0, -1.0)
    shape = (len(layers), len(poolings))
    linear, kernel, gamma = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    linear_alpha, kernel_alpha = np.zeros(shape), np.zeros(shape)
    columns = range(len(poolings))
    usable = [j for j, pooling in enumerate(poolings) if pooling != "std"]
    if one_vector and usable:
        columns = [poolings.index("mean") if "mean" in poolings else usable[0]]
        for values in (linear, kernel, gamma, linear_alpha, kernel_alpha):
            values[:] = np.nan
    for i, layer in enumerate(layers):
        grams: dict[str, np.ndarray] = {}
        for j in columns:
            pooling = poolings[j]
            for statistic in POOLINGS[pooling]:
                if statistic not in grams:
                    X = _standardised(source.statistic(layer, statistic, "recording"))
                    grams[statistic] = X @ X.T
            gram = sum(grams[statistic] for statistic in POOLINGS[pooling])
            linear[i, j], linear_alpha[i, j] = _probe_scores(gram, y, labels, folds, metric, nuisances)
            norms = np.diag(gram)
            distances = np.maximum(norms[:, None] + norms[None, :] - 2 * gram, 0.0)
            median = 1.0 / (float(np.median(distances[np.triu_indices(len(y), 1)])) or 1.0)
            probes = [(*_probe_scores(np.exp(-median * width * distances), y, labels, folds, metric, nuisances),
                       median * width) for width in KERNEL_WIDTHS]
            kernel[i, j], kernel_alpha[i, j], gamma[i, j] = (min if direction(metric) == "minimize" else max)(
                probes, key=lambda probe: probe[0])
    return ScreenResult(list(layers), list(poolings), metric, linear, kernel, gamma, time.perf_counter() - started,
                        linear_alpha=linear_alpha, kernel_alpha=kernel_alpha)


def heatmap(result: ScreenResult, path) -> None:
    """Layer x pooling heat maps of both probes, side by side, the top cells marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = result.best()
    finite = best[np.isfinite(best)]
    if result.metric in REGRESSION_METRICS:  # no fixed chance level: the cells' own range, best in yellow
        low, high = float(finite.min()), float(finite.max())
    else:
        low, high = min(0.5, float(finite.min())), max(0.5, float(finite.max()))
    cmap = "viridis_r" if result.lower_is_better else "viridis"
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.22 * len(result.layers) + 2), sharey=True)
    for ax, name, values in ((axes[0], "linear probe (ridge)", result.linear),
                             (axes[1], "kernel probe (RBF ridge)", result.kernel)):
        image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=low, vmax=high, origin="lower")
        ax.set(title=name, xticks=range(len(result.poolings)), xlabel="pooling")
        ax.set_xticklabels(result.poolings, rotation=40, ha="right")
    axes[0].set(yticks=range(len(result.layers)), yticklabels=result.row_labels(),
                ylabel="source:layer" if result.sources else "layer")
    for cell in result.top(5):
        i, j = cell["row"], result.poolings.index(cell["pooling"])
        axes[0 if cell["probe"] == "linear" else 1].scatter([j], [i], marker="*", color="red", s=40)
    chance = "" if result.metric in REGRESSION_METRICS else " (chance 0.5)"
    fig.colorbar(image, ax=axes, label=f"probe CV {result.metric}{chance}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# what an enqueued trial uses for a linear-probe cell, or a kernel-probe one (classifiers, then regressors)
LINEAR_CLASSIFIERS = ("logreg", "lda", "linear_svm", "ridge", "pls")
KERNEL_CLASSIFIERS = ("rbf_svm", "knn", "kernel_ridge", "svr", "knn_regressor")
WIDTHS = (0.3, 1.0, 3.0, 10.0)  # the kernel widths tried for the portfolio's kernel model, times the median's
# The portfolio after the best cell's probe model (auto-sklearn 2.0's idea, Feurer et al. 2022: start from
# pipelines that cover different kinds of data, not one default), each a kind of signal that model misses:
# (name, classification model and settings, MMSE model and settings, pooling, other settings)
PORTFOLIO = (
    ("sparse", ("sparse_logreg", {"C": 1.0, "l1_ratio": 1.0}), ("elastic_net", {"alpha": 0.1, "l1_ratio": 1.0}),
     None, {}),  # a few informative dimensions among many
    ("kernel", ("rbf_svm", {"C": 10.0}), ("svr", {"C": 10.0}), "mean+std", {}),  # an interaction; tuned width
    ("trees", ("extra_trees", {"n_estimators": 200, "max_depth": 8, "max_features": "sqrt", "min_samples_leaf": 2}),
     ("extra_trees_regressor", {"n_estimators": 200, "max_depth": 8, "max_features": "sqrt",
                                "min_samples_leaf": 2}), "mean+std+max", {}),  # thresholds on the statistics
    ("second cell", None, None, None, {}),
    ("windows", None, None, None, {"unit": "window"}),  # the probe's model on windows, averaged per recording
    ("select", ("logreg", {"C": 1.0}), ("ridge", {"alpha": 1.0}), None, {"select": "kbest", "select_k": 8}),
    ("maxima", None, None, "max", {}),  # extreme values that only max pooling keeps
)


def tune_width(source: FeatureSource, folds: np.ndarray, layer: int, pooling: str, metric: str,
               nuisances: np.ndarray | None = None) -> float:
    """The RBF width (gamma, for standardised features) whose kernel probe scores best at one cell, among
    WIDTHS times the median heuristic: the screen's single width found the right cells, but an interaction's
    best classifier wants another width (3x the median's in the planted one, BENCHMARKS.md)."""
    labels = source.labels
    y = labels.astype(np.float64) if metric in REGRESSION_METRICS else np.where(labels == 1, 1.0, -1.0)
    X = np.hstack([_standardised(source.statistic(layer, statistic, "recording")) for statistic in POOLINGS[pooling]])
    norms = np.sum(X**2, axis=1)
    distances = np.maximum(norms[:, None] + norms[None, :] - 2 * X @ X.T, 0.0)
    median = 1.0 / (float(np.median(distances[np.triu_indices(len(y), 1)])) or 1.0)
    scores = [_probe_scores(np.exp(-median * width * distances), y, labels, folds, metric, nuisances)[0]
              for width in WIDTHS]
    pick = np.argmin if direction(metric) == "minimize" else np.argmax
    return median * WIDTHS[int(pick(scores))]


def starting_points(result: ScreenResult, spec, n: int, source_layers: dict[str, tuple[int, ...]] | None = None,
                    one_vector: frozenset[str | None] = frozenset(), gamma: float | None = None) -> list[dict]:
    """Parameters for the study's first trials, a portfolio over the screen's best cells: the best cell with a
    model of its probe's kind (logistic regression with C = 1, or an RBF SVM with the probe's kernel width and
    C = 10; for MMSE the probe itself, ridge or RBF kernel ridge at the probe's penalty), then the same cell's
    layer with models for signals that model misses (`PORTFOLIO`: sparse, a kernel of the tuned width `gamma`,
    trees on the concatenated statistics, windows, selected columns, maxima), the second cell with its probe's
    model; then the next cells with theirs. Each entry needs what it names in the space (a model, a pooling, a
    unit) and is left out otherwise; settings outside the space's ranges are moved to their nearest end.
    (Measured on realistic caches: these C values were within a point of the best of a grid at the planted
    cell, while translating the probe's ridge into C was not: a large ridge ranks well but makes an SVM with
    C = 1 / ridge predict one class.) Only settings that are parameters of the space are fixed; the sampler
    fills in the rest."""
    cells = result.top(max(n, 1))
    if not cells:
        return []
    regression = spec.task == "mmse"
    first = cells[0]
    planned = [_point(first, spec, None, {}, None, source_layers, one_vector)]
    for name, classifier, regressor, pooling, settings in PORTFOLIO:
        if name == "second cell":
            planned += [_point(cell, spec, None, {}, None, source_layers, one_vector) for cell in cells[1:2]]
            continue
        model = regressor if regression else classifier
        if name == "kernel" and model is not None:
            model = (model[0], {**model[1], "gamma": gamma or first["gamma"]})
        planned.append(_point(first, spec, model, settings, pooling, source_layers, one_vector))
    planned += [_point(cell, spec, None, {}, None, source_layers, one_vector) for cell in cells[2:]]
    points, seen = [], set()
    for point in planned:  # each once (a kernel width tuned to the screen's own is the same point)
        key = tuple(sorted((k, float(f"{v:.2g}") if isinstance(v, float) else v) for k, v in (point or {}).items()))
        if point is not None and key not in seen:
            points.append(point)
            seen.add(key)
    return points[:n]


def _point(cell: dict, spec, model: tuple[str, dict] | None, settings: dict, pooling: str | None,
           source_layers: dict[str, tuple[int, ...]] | None, one_vector: frozenset[str | None]) -> dict | None:
    """One starting point at `cell` (its layer, and `pooling` or its own): `model` (name, settings), or the
    space's model of the probe's kind; None when the space lacks what it needs."""
    from adsearch.search.classifiers import IntRange
    from adsearch.search.space import IntSpan, classifier_params

    space = spec.space
    single = cell["source"] in one_vector
    pooling = pooling or cell["pooling"]
    if (pooling not in space.pooling and not single) or any(
            value not in getattr(space, key) for key, value in settings.items() if key in ("unit", "select")):
        return None
    if single and settings.get("unit", "recording") != "recording":
        return None
    params: dict = {"layer": cell["layer"]}
    if cell["source"] is not None:  # a multi-source study: the source, then its own layer parameter
        params = {"source": cell["source"]}
        if len((source_layers or {}).get(cell["source"], ())) > 1:
            params[f"layer.{cell['source']}"] = cell["layer"]
    fixed = {"pooling": pooling, "unit": "recording", "scale": "standard", "select": "none", "pca": "none",
             "l2_normalize": False, **{k: v for k, v in settings.items() if k != "select_k"}}
    for name, value in fixed.items():
        if name in ("pooling", "unit") and single:
            continue  # not parameters of a one-vector source's trials
        options = getattr(space, name)
        if len(options) > 1 and value in options:
            params[name] = value
    if settings.get("select") == "kbest" and len(space.select) > 1:
        params["select_k"] = int(min(max(settings["select_k"], space.select_k.low), space.select_k.high))
    if model is None:
        preferred = LINEAR_CLASSIFIERS if cell["probe"] == "linear" else KERNEL_CLASSIFIERS
        classifier = next((c for c in preferred if c in space.classifiers), None)
        alpha = cell["alpha"] or 1.0  # the probe's own penalty: a ridge regressor is that probe, refitted
        wanted = {"logreg": {"C": 1.0}, "rbf_svm": {"C": 10.0, "gamma": cell["gamma"]}, "ridge": {"alpha": alpha},
                  "kernel_ridge": {"alpha": alpha, "gamma": cell["gamma"]},
                  "svr": {"C": 10.0, "gamma": cell["gamma"]}}.get(classifier, {})
    else:
        classifier, wanted = model
        if classifier not in space.classifiers:
            return None
    if classifier is None:
        return params
    if len(space.classifiers) > 1:
        params["classifier"] = classifier
    for param, (kind, span) in classifier_params(spec, classifier).items():
        if param not in wanted:
            continue
        if kind == "range":
            value = min(max(wanted[param], span.low), span.high)
            whole = isinstance(span, IntSpan | IntRange)
            params[f"{classifier}.{param}"] = int(round(value)) if whole else float(value)
        elif kind == "choice" and wanted[param] in span:
            params[f"{classifier}.{param}"] = wanted[param]
    return params
