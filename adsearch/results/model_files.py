"""Model files: an exported pipeline written with skops, and read back trusting an exact list of types.

A model file can hold anything a pickle can; these are the only types adsearch lets one load."""

from __future__ import annotations

from pathlib import Path

from adsearch.results.schema import ExportError

# The exact types beyond skops' own safe defaults that a model adsearch exports can hold: measured with
# `skops.io.get_untrusted_types` over every registry classifier, every categorical option, every preprocessing
# (tests/test_hardening.py re-measures it). Never a module prefix: `builtins.`, `numpy.` or `scipy.` would
# admit eval, exec, numpy.load and the numpy.testing helpers, which run code when a model is loaded.
TRUSTED_TYPES = frozenset({
    "adsearch.search.estimators.BlockwiseStandardScaler",
    "adsearch.search.estimators.CenteredKernelRidge",  # MMSE regressors
    "adsearch.search.estimators.CovariancePCA",
    "adsearch.search.estimators.PLSRegressor",
    "adsearch.search.estimators.ShrinkageLDA",
    "adsearch.search.estimators.TfidfWeighting",
    "adsearch.search.estimators.UnivariateSelection",
    "catboost.core.CatBoostClassifier",
    "catboost.core.CatBoostRegressor",
    "sklearn.calibration._CalibratedClassifier",  # calibration inside the folds (space.calibration)
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",  # kNN's KD tree (few dims, euclidean)
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.tree._tree.Tree",
    "xgboost.core.Booster",
    "xgboost.sklearn.XGBClassifier",
    "xgboost.sklearn.XGBRegressor",
})


def save_model(model, path: Path) -> None:
    import skops.io as sio

    sio.dump(model, path)


def load_model(path: Path, plugins: dict[str, str] | None = None):
    """Load with skops, trusting its safe defaults, the exact types in TRUSTED_TYPES and the estimator classes
    the config's (already imported, hash-checked) `plugins` modules define themselves, nothing else."""
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # not a zip, no schema, a schema of another version ...
        raise ExportError(f"{path}: not a model file adsearch can read ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); export again") from None
    unexpected = sorted(set(untrusted) - TRUSTED_TYPES - plugin_estimator_types(untrusted, plugins or {}))
    if unexpected:
        listed = ", ".join(unexpected)[:500]
        raise ExportError(f"{path}: refused: the file holds types adsearch never exports ({listed}); it may run "
                          "code when loaded. Only load models written by `adsearch export`")
    try:
        return sio.load(path, trusted=sorted(untrusted))
    except Exception as exc:
        raise ExportError(f"{path}: cannot load the model ({type(exc).__name__}: {str(exc)[:200]}); export again"
                          ) from None


def plugin_estimator_types(names: list[str], plugins: dict[str, str]) -> set[str]:
    """Of the type names in a model file, those that are scikit-learn estimator classes defined in one of the
    plugin modules (not a function or class the module merely imports, such as os.system)."""
    import sys

    from sklearn.base import BaseEstimator

    trusted = set()
    for name in names:
        module, _, attribute = name.rpartition(".")
        found = getattr(sys.modules.get(module), attribute, None) if module in plugins else None
        if isinstance(found, type) and found.__module__ == module and issubclass(found, BaseEstimator):
            trusted.add(name)
    return trusted
