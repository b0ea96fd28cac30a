"""The search space: a YAML file under `studies/`, validated, turned into one define-by-run Optuna space.

One trial picks, in order: layer, pooling, unit (recording vectors, or window vectors classified and then
averaged per recording), scaling, univariate feature selection (none, or the k best columns), PCA (none, a
number of components, or a share of explained variance), L2 normalisation, classifier, and that
classifier's own hyperparameters (named `classifier.param`, so the conditional parameters of different
classifiers never share a distribution).

In YAML a hyperparameter is a range (`{low: 0.01, high: 100, log: true}`), a list of choices, or a single
fixed value; a classifier listed with `{}` keeps the registry's default ranges.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adsearch.embed.cache import POOLINGS
from adsearch.io.safeyaml import YamlError, load_yaml, short
from adsearch.search import regressors  # noqa: F401  (registers the MMSE regressors)
from adsearch.search.classifiers import REGISTRY, Choice, FloatRange, IntRange, models_for
from adsearch.search.plugins import PluginError, installed_plugins, load_plugins, plugin_of
from adsearch.search.protocol import CLASSIFICATION_METRICS, DEFAULT_METRIC, REGRESSION_METRICS

METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


class SpaceError(ValueError):
    """A space file that cannot be used; the message names the file, the key and what is allowed."""


class _Strict(BaseModel):
    # NaN and infinity are no range bounds: a NaN range once crashed `search` after the study was created.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class IntSpan(_Strict):
    low: int
    high: int | None = None  # layers only: None = the cache's last layer
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if self.high is not None and self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class FloatSpan(_Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class CVSpec(_Strict):
    folds: int = Field(5, ge=2, le=20, description="stratified, speaker-grouped folds")
    repeats: int = Field(1, ge=1, le=10, description="repetitions with different fold assignments")
    # classification: balanced_accuracy (default), accuracy, f1, roc_auc; mmse: rmse (default), mae, r2, pearson_r
    metric: Literal["balanced_accuracy", "accuracy", "f1", "roc_auc", "rmse", "mae", "r2", "pearson_r"] = \
        "balanced_accuracy"


class Reference(_Strict):
    """The fixed settings the layer-grid sampler scores every layer with (the seed's baseline)."""

    pooling: str = "mean"
    unit: Literal["recording", "window"] = "recording"
    scale: Literal["standard", "none", "tfidf"] = "standard"
    pca: Literal["none", "components", "variance"] = "none"
    l2_normalize: bool = False
    classifier: str = "logreg"
    params: dict[str, Any] = Field(default_factory=lambda: {"C": 1.0})


class SearchSpace(_Strict):
    layers: IntSpan | list[int] = IntSpan(low=0)
    pooling: list[Literal["mean", "std", "mean+std", "max", "min+max", "mean+std+max"]] = list(POOLINGS)
    unit: list[Literal["recording", "window"]] = ["recording"]
    scale: list[Literal["standard", "none", "tfidf"]] = ["standard"]  # tfidf: n-gram count sources only
    # kbest: the k columns that separate the classes (or follow the score) best, one at a time, in each fold
    select: list[Literal["none", "kbest"]] = ["none"]
    select_k: IntSpan = IntSpan(low=2, high=64, log=True)
    pca: list[Literal["none", "components", "variance"]] = ["none"]
    pca_components: IntSpan = IntSpan(low=4, high=128, log=True)
    pca_variance: FloatSpan = FloatSpan(low=0.8, high=0.99)
    l2_normalize: list[bool] = [False]
    # probability calibration inside each training fold (Platt's sigmoid or isotonic, 3 inner folds)
    calibration: list[Literal["none", "sigmoid", "isotonic"]] = ["none"]
    classifiers: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"logreg": {}})

    @field_validator("pooling", "unit", "scale", "select", "pca", "l2_normalize", "calibration", "classifiers")
    @classmethod
    def _not_empty(cls, value):
        if not value:
            raise ValueError("needs at least one entry")
        return value

    @field_validator("pca_variance")
    @classmethod
    def _share(cls, value: FloatSpan):
        if not (0 < value.low and value.high < 1):
            raise ValueError("explained variance must lie strictly between 0 and 1")
        return value


class ScreenSpec(_Strict):
    """Layer screening before the search (see adsearch/search/screen.py)."""

    enabled: bool = Field(True, description="score every layer x pooling with closed-form probes first")
    top: int = Field(10, ge=0, le=100, description="first trials: a portfolio over the best cells (0: none)")


class StudySpec(_Strict):
    # classification: AD vs control (ADReSSo task 1); mmse: regression of the MMSE score (task 2)
    task: Literal["classification", "mmse"] = "classification"
    # Python modules that register classifiers (adsearch/search/plugins.py); the ones installed packages
    # declare are added when the space names one of their classifiers, so the study records every one.
    plugins: list[str] = Field(default_factory=list)
    cv: CVSpec = CVSpec()
    screen: ScreenSpec = ScreenSpec()
    seed: int = 0
    sampler: Literal["tpe", "random", "layer-grid", "gp", "qmc"] = "tpe"
    # No pruning by default: on realistic caches neither pruner reached 95 % of the oracle in fewer trials or
    # less CPU time, and a pruned trial keeps no CV score (BENCHMARKS.md, search quality).
    pruner: Literal["none", "wilcoxon", "median"] = "none"
    # deconfounded CV (adsearch/search/deconfound.py): auto = where the nuisance-only baseline beats chance
    deconfound: Literal["auto", "on", "off"] = "auto"
    space: SearchSpace = SearchSpace()
    layer_grid: Reference = Reference()

    @model_validator(mode="before")
    @classmethod
    def _task_metric(cls, data):
        """An MMSE study's defaults are the regression ones: RMSE, and ridge regression where a classification
        space would use logistic regression (the model list, the layer-grid reference)."""
        if not (isinstance(data, dict) and data.get("task") == "mmse"):
            return data
        data = dict(data)
        cv, space, grid = data.get("cv"), data.get("space"), data.get("layer_grid")
        if cv is None or (isinstance(cv, dict) and "metric" not in cv):
            data["cv"] = {**(cv or {}), "metric": DEFAULT_METRIC["mmse"]}
        if space is None or (isinstance(space, dict) and "classifiers" not in space):
            data["space"] = {**(space or {}), "classifiers": {"ridge": {}}}
        if grid is None or (isinstance(grid, dict) and "classifier" not in grid and "params" not in grid):
            data["layer_grid"] = {**(grid or {}), "classifier": "ridge", "params": {"alpha": 1.0}}
        return data

    @model_validator(mode="after")
    def _task_fits(self):
        allowed = REGRESSION_METRICS if self.task == "mmse" else CLASSIFICATION_METRICS
        if self.cv.metric not in allowed:
            raise ValueError(f"cv.metric {self.cv.metric} does not score task {self.task}; use one of {list(allowed)}")
        if self.task == "mmse" and self.space.calibration != ["none"]:
            raise ValueError("space.calibration calibrates P(AD); an mmse study has none (leave it out)")
        return self

    def digest(self) -> str:
        """Hash of the validated content: formatting and comments in the file do not matter."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Loading and validation


def _format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _resolve_param(where: str, name: str, default, value) -> tuple[str, Any]:
    """Validate one YAML hyperparameter against the registry's default and valid values; return (kind, spec)."""
    numeric = isinstance(default, FloatRange | IntRange)
    if isinstance(value, dict):
        if not numeric:
            raise SpaceError(f"{where}: {name} is categorical; give a list of {list(default.options)} or one value")
        span_type = IntSpan if isinstance(default, IntRange) else FloatSpan
        try:
            span = span_type(**value)
        except ValidationError as exc:
            detail = "; ".join(f"{_format_loc(e['loc']) or 'range'}: {e['msg']}" for e in exc.errors())
            raise SpaceError(f"{where}: {detail} (a range is {{low: .., high: .., log: true|false}})") from None
        except TypeError:
            raise SpaceError(f"{where}: a range is {{low: .., high: .., log: true|false}}") from None
        for bound in (span.low, span.high):
            if (problem := default.invalid(bound)) is not None:
                raise SpaceError(f"{where}: {name} {problem}; {bound:g} is not (the default range is "
                                 f"{default.low:g}..{default.high:g})")
        return "range", span
    values = value if isinstance(value, list) else [value]
    if not values:
        raise SpaceError(f"{where}: an empty list of choices")
    for item in values:
        if isinstance(default, Choice) and item not in default.options:
            raise SpaceError(f"{where}: {short(item)} is not one of {list(default.options)}")
        if numeric and (isinstance(item, bool) or not isinstance(item, int | float)):
            raise SpaceError(f"{where}: {short(item)} is not a number")
        if numeric and not math.isfinite(item):
            raise SpaceError(f"{where}: {item} is not a finite number")
        if isinstance(default, IntRange) and not float(item).is_integer():
            raise SpaceError(f"{where}: {short(item)} is not an integer")
        if numeric and (problem := default.invalid(item)) is not None:
            raise SpaceError(f"{where}: {name} {problem}; {item:g} is not")
    values = [int(v) if isinstance(default, IntRange) else v for v in values]
    return ("fixed", values[0]) if len(values) == 1 else ("choice", tuple(values))


def classifier_params(spec: StudySpec, name: str) -> dict[str, tuple[str, Any]]:
    """The effective hyperparameter space of one classifier: registry defaults overridden by the YAML."""
    overrides = spec.space.classifiers.get(name) or {}
    resolved = {}
    for param, default in REGISTRY[name].params.items():
        if param in overrides:
            resolved[param] = _resolve_param(f"space.classifiers.{name}.{param}", param, default, overrides[param])
        elif isinstance(default, Choice):
            resolved[param] = ("choice", default.options)
        else:
            resolved[param] = ("range", default)
    return resolved


def _check_registry(spec: StudySpec) -> None:
    available = models_for(spec.task)
    for name, overrides in spec.space.classifiers.items():
        if name not in REGISTRY:
            raise SpaceError(f"space.classifiers.{str(name)[:60]}: unknown model; available for task {spec.task}: "
                             f"{', '.join(available)}")
        if REGISTRY[name].task != spec.task:
            raise SpaceError(f"space.classifiers.{name}: a model for task {REGISTRY[name].task}, and this space's "
                             f"task is {spec.task}; available: {', '.join(available)}")
        if not isinstance(overrides, dict | None):
            raise SpaceError(f"space.classifiers.{name}: give a mapping of hyperparameters (or {{}} for defaults)")
        unknown = set(overrides or {}) - set(REGISTRY[name].params)
        if unknown:
            raise SpaceError(f"space.classifiers.{name}: unknown hyperparameter(s) {sorted(unknown)}; "
                             f"{name} has {sorted(REGISTRY[name].params)}")
        classifier_params(spec, name)
    reference = spec.layer_grid
    if reference.pooling not in POOLINGS:
        raise SpaceError(f"layer_grid.pooling: {short(reference.pooling)} is not one of {list(POOLINGS)}")
    problems = fixed_params_problems(reference.classifier, reference.params, "layer_grid")
    if not problems and REGISTRY[reference.classifier].task != spec.task:
        problems = [f"layer_grid.classifier: {reference.classifier} is a model for task "
                    f"{REGISTRY[reference.classifier].task}, this space's task is {spec.task}"]
    if problems:
        raise SpaceError("; ".join(problems))


def fixed_params_problems(classifier: str, params: dict[str, Any], where: str) -> list[str]:
    """What is wrong with one fixed setting of a classifier (a layer-grid reference, an exported config)."""
    if classifier not in REGISTRY:
        return [f"{where}.classifier: unknown classifier {short(classifier)}; available: {', '.join(REGISTRY)}"]
    expected = REGISTRY[classifier].params
    if set(params) != set(expected):
        return [f"{where}.params: {classifier} needs exactly {sorted(expected)} (fixed values)"]
    problems = []
    for name, value in params.items():
        try:
            if isinstance(value, list | dict) or _resolve_param(f"{where}.params.{name}", name, expected[name],
                                                                 value)[0] != "fixed":
                problems.append(f"{where}.params.{name}: one fixed value, not {short(value)}")
        except SpaceError as exc:
            problems.append(str(exc))
    return problems


def parse_spec(data: Any, source: str = "<space>") -> StudySpec:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: the top level must be a mapping with keys cv, seed, sampler, pruner, space")
    try:
        spec = StudySpec(**data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            allowed = error.get("ctx", {}).get("expected")
            where = f"{_format_loc(error['loc'])}: " if error["loc"] else ""
            message = error["msg"].removeprefix("Value error, ")
            line = (f"{source}: {where}{message}"
                    + (f" (allowed: {allowed})" if allowed and allowed not in message else ""))
            lines.append(line if len(line) <= 300 else line[:300] + "...")
            if len(lines) == 20:
                lines.append(f"... and {len(exc.errors()) - 20} more")
                break
        raise SpaceError("\n".join(lines)) from None
    try:
        load_plugins(spec.plugins)
        named = [*spec.space.classifiers, spec.layer_grid.classifier]
        if any(name not in REGISTRY for name in named):  # installed plugins are imported only when needed,
            load_plugins(installed_plugins())  # so a broken one stops only the spaces that look for a model
        _check_registry(spec)
    except (SpaceError, PluginError) as exc:
        raise SpaceError(f"{source}: {exc}") from None
    used = [plugin_of(name) for name in [*spec.space.classifiers, spec.layer_grid.classifier]]
    return spec.model_copy(update={"plugins": sorted({*spec.plugins, *(module for module in used if module)})})


DEFAULT_SPACE = Path("studies/default.yaml")


def load_spec(path: Path | str, plugins: list[str] | None = None, task: str | None = None) -> StudySpec:
    """Read and validate a space file, with `plugins` (`--plugins`) added to its own and `task` (`--task`)
    instead of its own. adsearch's own spaces (`studies/default.yaml`, `studies/mmse.yaml`, ...) are also
    found outside the working folder: a relative `studies/NAME.yaml` that is not here is read from adsearch's
    copy (beside the package in a checkout)."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and path.parts[:1] == (DEFAULT_SPACE.parts[0],):
        own = Path(__file__).resolve().parents[2] / path
        path = own if own.is_file() else path
    if not path.exists():
        raise SpaceError(f"{path}: space file not found; pass --space FILE (adsearch's own spaces are "
                         "studies/default.yaml and studies/mmse.yaml in its repository)")
    try:
        data = load_yaml(path, "search-space file")
    except YamlError as exc:
        raise SpaceError(str(exc)) from None
    if plugins and isinstance(data, dict | None):
        data = {**(data or {})}
        data["plugins"] = [*(data.get("plugins") or []), *plugins]
    if task is not None and isinstance(data, dict | None):
        data = {**(data or {}), "task": task}
    return parse_spec(data, f"{path}" + (f" with --task {task}" if task is not None else ""))


def source_layers(spec: StudySpec, n_layers: int, source: str = "space") -> tuple[int, ...]:
    """The layers of one feature source: the space's layers, or its only one for a one-layer source such as
    eGeMAPS (a space written for 25 speech-model layers still searches it)."""
    return (0,) if n_layers == 1 else check_layers(spec, n_layers, source)


def check_layers(spec: StudySpec, n_layers: int, source: str = "space") -> tuple[int, ...]:
    """The layers this space may pick, checked against a cache with `n_layers` hidden states."""
    layers = spec.space.layers
    last = n_layers - 1
    if isinstance(layers, list):
        bad = [layer for layer in layers if not 0 <= layer <= last]
        if bad or not layers:
            raise SpaceError(f"{source}: space.layers: {bad or 'empty'} outside the cache's layers 0..{last}")
        return tuple(sorted(set(layers)))
    high = last if layers.high is None else layers.high
    if not 0 <= layers.low <= high <= last:
        raise SpaceError(f"{source}: space.layers: {layers.low}..{high} is outside the cache's layers 0..{last}")
    return tuple(range(layers.low, high + 1))


# ----------------------------------------------------------------------------------------------------------
# Define-by-run


class PipelineSettings(_Strict):
    """Preprocessing and classifier: what is fitted on the pooled features."""

    scale: Literal["standard", "none", "tfidf"]
    select: Literal["none", "kbest"] = "none"
    select_k: int | None = None
    pca: Literal["none", "components", "variance"]
    pca_components: int | None = None
    pca_variance: float | None = None
    l2_normalize: bool
    classifier: str
    params: dict[str, Any]
    calibration: Literal["none", "sigmoid", "isotonic"] = "none"


class TrialConfig(PipelineSettings):
    """One point of the space: which features (source, layer, pooling, unit) and which pipeline."""

    layer: int
    pooling: str
    unit: Literal["recording", "window"]
    source: str | None = None  # the feature source (cache) of a study over several; None: its only cache


def _suggest_span(trial, name: str, span) -> Any:
    if isinstance(span, IntSpan | IntRange):
        return trial.suggest_int(name, span.low, span.high, log=span.log)
    return trial.suggest_float(name, span.low, span.high, log=span.log)


def suggest(trial, spec: StudySpec, layers: tuple[int, ...], sources: dict[str, tuple[int, ...]] | None = None,
            one_vector: frozenset[str | None] = frozenset()) -> TrialConfig:
    """Ask `trial` for one configuration; conditional parameters are only asked when they apply.

    With several feature sources (`sources`: name -> its layers) the trial first picks `source`, then that
    source's own layer (`layer.NAME`: sources differ in depth, and TPE models each one's layers apart). A
    source in `one_vector` (None: the study's only cache) holds one vector per recording: its trials take
    pooling mean and unit recording (every other choice would give the same vector, or zeros)."""
    space = spec.space
    source, name = None, "layer"
    if sources and len(sources) > 1:
        source = trial.suggest_categorical("source", list(sources))
        layers, name = sources[source], f"layer.{source}"
    if source is not None and len(layers) == 1:
        layer = layers[0]  # a one-layer source (eGeMAPS): a constant, not a parameter
    elif isinstance(space.layers, list):
        layer = trial.suggest_categorical(name, list(layers))
    else:
        layer = trial.suggest_int(name, layers[0], layers[-1])
    def choice(name: str, options: list) -> Any:
        # A setting with one option is a constant, not a parameter: asking for it would cost a storage
        # write per trial and add a column that never varies. The full config records it all the same.
        return options[0] if len(options) == 1 else trial.suggest_categorical(name, options)

    single = source in one_vector
    pooling = "mean" if single else choice("pooling", list(space.pooling))
    unit = "recording" if single else choice("unit", list(space.unit))
    scale = choice("scale", list(space.scale))
    select = choice("select", list(space.select))
    select_k = _suggest_span(trial, "select_k", space.select_k) if select == "kbest" else None
    pca = choice("pca", list(space.pca))
    components = _suggest_span(trial, "pca_components", space.pca_components) if pca == "components" else None
    variance = _suggest_span(trial, "pca_variance", space.pca_variance) if pca == "variance" else None
    l2 = choice("l2_normalize", list(space.l2_normalize))
    calibration = choice("calibration", list(space.calibration))
    classifier = choice("classifier", list(space.classifiers))
    params = {}
    for name, (kind, value) in classifier_params(spec, classifier).items():
        key = f"{classifier}.{name}"
        if kind == "fixed":
            params[name] = value
        elif kind == "choice":
            params[name] = choice(key, list(value))
        else:
            params[name] = _suggest_span(trial, key, value)
    return TrialConfig(layer=layer, pooling=pooling, unit=unit, scale=scale, select=select, select_k=select_k,
                       pca=pca, pca_components=components,
                       pca_variance=variance, l2_normalize=l2, classifier=classifier, params=params, source=source,
                       calibration=calibration)
