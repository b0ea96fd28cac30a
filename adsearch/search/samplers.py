"""Samplers and pruners by name, as a study's YAML or `--sampler` / `--pruner` choose them."""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import TrialState

from adsearch.search.errors import StudyError
from adsearch.search.space import StudySpec

# The TPE settings every `tpe` study uses; chosen from benchmarks/search.py quality (BENCHMARKS.md).
TPE_SETTINGS = {"n_startup_trials": 10, "multivariate": True, "group": True, "constant_liar": True}


class LayerGridSampler(optuna.samplers.BaseSampler):
    """The seed's baseline: score every layer with one reference setting, then tune on the best layer.

    Trials 0..L-1 walk the layers with the reference pooling, preprocessing and classifier; later trials
    keep the best grid layer (and its pooling) and let TPE tune everything else.
    """

    def __init__(self, spec: StudySpec, layers: tuple[int, ...], seed: int | None):
        self.layers = layers
        reference = spec.layer_grid
        self.reference = {"pooling": reference.pooling, "unit": reference.unit, "scale": reference.scale,
                          "select": "none", "pca": reference.pca, "l2_normalize": reference.l2_normalize,
                          "classifier": reference.classifier,
                          **{f"{reference.classifier}.{k}": v for k, v in reference.params.items()}}
        self.tuner = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        self._fixed: dict = {}  # best grid layer and pooling, looked up once per tuning trial

    def _grid_phase(self, trial) -> bool:
        return trial.number < len(self.layers)

    def _best_grid(self, study) -> dict:
        grid = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.number < len(self.layers)]
        pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max  # RMSE: the lowest
        best = pick(grid, key=lambda t: t.value) if grid else None
        # a space with one pooling has no pooling parameter (a constant): only the layer is fixed then
        return {key: best.params[key] for key in ("layer", "pooling") if key in best.params} if best else {}

    def infer_relative_search_space(self, study, trial):
        if self._grid_phase(trial):
            return {}
        space = self.tuner.infer_relative_search_space(study, trial)
        return {k: v for k, v in space.items() if k not in ("layer", "pooling")}

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        return self.tuner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if self._grid_phase(trial):
            if param_name == "layer":
                return self.layers[trial.number]
            if param_name in self.reference and param_distribution._contains(
                    param_distribution.to_internal_repr(self.reference[param_name])):
                return self.reference[param_name]
            return self.tuner.sample_independent(study, trial, param_name, param_distribution)
        if param_name in self._fixed:
            return self._fixed[param_name]
        return self.tuner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._fixed = {} if self._grid_phase(trial) else self._best_grid(study)
        self.tuner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.tuner.after_trial(study, trial, state, values)


SAMPLERS = ("tpe", "random", "layer-grid", "gp", "qmc")
PRUNERS = ("none", "wilcoxon", "median")


def make_sampler(name: str, spec: StudySpec, layers: tuple[int, ...], seed: int | None):
    """A sampler by name. `gp` (Optuna's GPSampler) needs torch, which search workers otherwise never import;
    it sends conditional parameters (a classifier's own) to random sampling. `qmc` is a scrambled Sobol
    sequence: space-filling, not adaptive."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **TPE_SETTINGS)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "layer-grid":
            return LayerGridSampler(spec, layers, seed)
        if name == "qmc":
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                              warn_independent_sampling=False)
        if name == "gp":
            try:
                import torch  # noqa: F401
            except ImportError:
                raise StudyError("the gp sampler needs torch: pip install torch==2.13.0 (the CPU wheel) on this "
                                 "worker, or choose another sampler") from None
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    raise StudyError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def make_pruner(name: str):
    """A pruner by name. Pruners only ever stop a trial between folds: after its last fold a trial is
    complete (see `Objective`)."""
    if name == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise StudyError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")
