"""Classifiers from the user's own code, without editing adsearch.

A plugin is a Python module that registers classifiers the way the built-ins do (`classifiers.register`). It
is named in the space YAML (`plugins: [my_lab.classifiers]`), on the command line (`--plugins`), or installed
by a package as an entry point in the group `adsearch.classifiers`. On import, each classifier it registers
passes a smoke test of scikit-learn's estimator contract (build, clone, fit returns self, predictions and
scores of the right shape) before any study can use it. A study records its plugin modules (in its space) and
a hash of each module's source, so every worker, `export` and `predict` load the same code and refuse code
that changed.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from adsearch.search.classifiers import OWN_MODULES, REGISTRY, Choice, ClassifierSpec, FloatRange, IntRange

ENTRY_POINT_GROUP = "adsearch.classifiers"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class PluginError(ValueError):
    """A plugin module that cannot be loaded, or a classifier in it that breaks the estimator contract."""


def installed_plugins() -> list[str]:
    """The modules installed packages declare in the `adsearch.classifiers` entry point group."""
    return sorted({entry.module for entry in entry_points(group=ENTRY_POINT_GROUP)})


def load_plugins(modules: list[str]) -> dict[str, str]:
    """Import each plugin module (once), smoke-test the classifiers it registered; return module -> digest."""
    for module in modules:
        if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module):
            raise PluginError(f"plugins: {str(module)[:80]!r} is not a Python module name (like my_lab.classifiers)")
    digests = {}
    for module in modules:
        if module not in sys.modules:
            before = set(REGISTRY)
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise PluginError(f"plugins: cannot import {module!r} ({exc}); install it, or put the folder that "
                                  "holds it on PYTHONPATH (on every machine that runs workers)") from None
            except Exception as exc:
                raise PluginError(f"plugins: importing {module!r} failed: {type(exc).__name__}: {exc}") from None
            finally:  # a failed import leaves none of its classifiers behind (adsearch's own, first imported
                for name in set(REGISTRY) - before:  # on the way, stay)
                    if sys.modules.get(module) is None and REGISTRY[name].build.__module__ not in OWN_MODULES:
                        del REGISTRY[name]
            for name in sorted(set(REGISTRY) - before):
                try:
                    check_classifier(REGISTRY[name])
                except PluginError:
                    del REGISTRY[name]
                    raise
        digests[module] = module_digest(module)
    return digests


DIGEST_VERSION = "files:"  # digests of every source file of the plugin's package; older ones: its file alone


def module_digest(module: str, legacy: bool = False) -> str:
    """SHA-256 over the source of a plugin module and of every module of its own code: the whole top-level
    package it belongs to, or, for a module outside any package, the modules of its folder that it imported.
    A study refuses a plugin whose code changed since it was created, also in a helper it imports.
    `legacy`: the module's own file only (how studies made before recorded it)."""
    path = getattr(sys.modules[module], "__file__", None)
    if path is None:
        raise PluginError(f"plugins: {module!r} has no source file (a namespace package?); name the module that "
                          "calls register()")
    if legacy:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for name, source in sorted(_own_sources(module, Path(path))):
        digest.update(name.encode() + b"\0" + source.read_bytes() + b"\0")
    return DIGEST_VERSION + digest.hexdigest()


def _own_sources(module: str, path: Path) -> list[tuple[str, Path]]:
    top = sys.modules.get(module.split(".")[0])
    top_file = getattr(top, "__file__", None)
    if "." in module and top_file and Path(top_file).name == "__init__.py":  # a package: all of its files
        root = Path(top_file).parent
        return [(str(p.relative_to(root)), p) for p in sorted(root.rglob("*.py"))[:5000]]
    folder = path.resolve().parent  # a lone module: itself and what it imported from its own folder
    found = [(path.name, path)]
    for other in list(sys.modules.values()):
        other_file = getattr(other, "__file__", None)
        if other_file and other_file != str(path) and Path(other_file).resolve().parent == folder:
            found.append((Path(other_file).name, Path(other_file)))
    return found


def plugin_of(classifier: str) -> str | None:
    """The plugin module that registered `classifier`, or None for adsearch's own."""
    module = REGISTRY[classifier].build.__module__
    return None if module in OWN_MODULES else module


def check_digests(recorded: dict[str, str], where: str) -> None:
    """Refuse plugin code that differs from what `where` (a study, an exported model) was made with."""
    load_plugins(sorted(recorded))
    changed = sorted(module for module in recorded if module_digest(
        module, legacy=not recorded[module].startswith(DIGEST_VERSION)) != recorded[module])
    if changed:
        raise PluginError(f"{where} was made with other code of the plugin module(s) {', '.join(changed)} (source "
                          "hash recorded); install the same version on this machine, or start a new study")


def _sample(param: FloatRange | IntRange | Choice, end: int) -> Any:
    if isinstance(param, Choice):
        return param.options[end % len(param.options)]
    return (param.low, param.high)[end]


def check_classifier(spec: ClassifierSpec) -> None:
    """A smoke test of scikit-learn's estimator contract at both ends of every range: what the search, the
    pipeline, `clone` in cross-validation and skops export rely on. Slower, complete checks: run
    `sklearn.utils.estimator_checks.check_estimator` on the estimator in the plugin's own tests."""
    import numpy as np
    from sklearn.base import clone, is_classifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6))
    y = np.repeat([0, 1], 12)
    x[y == 1] += 1.0
    where = f"plugin classifier {spec.name!r} ({spec.build.__module__})"
    if spec.is_regressor:
        scores = 18.0 + 8.0 * y + rng.normal(size=len(y))  # MMSE-like targets
        return _check_regressor(spec, x, scores, where.replace("classifier", "regressor"))
    for end in (0, 1):
        params = {name: _sample(param, end) for name, param in spec.params.items()}
        try:
            estimator = spec.build(params, 0)
        except Exception as exc:
            raise PluginError(f"{where}: building it with {params} failed: {type(exc).__name__}: {exc}") from None
        missing = [method for method in ("fit", "predict", "get_params", "set_params")
                   if not callable(getattr(estimator, method, None))]
        if missing:
            raise PluginError(f"{where}: the estimator has no {', '.join(missing)}; subclass "
                              "sklearn.base.BaseEstimator and ClassifierMixin and keep parameters in __init__")
        if not is_classifier(estimator):
            raise PluginError(f"{where}: not a scikit-learn classifier (inherit sklearn.base.ClassifierMixin)")
        try:
            copy = clone(estimator)
            fitted = copy.fit(x, y)
            predicted = np.asarray(copy.predict(x))
            scores = _scores(copy, x)
        except Exception as exc:
            raise PluginError(f"{where}: clone, fit or predict failed on a small two-class problem: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from None
        if fitted is not copy:
            raise PluginError(f"{where}: fit() must return self")
        if predicted.shape != (len(y),) or not set(predicted.tolist()) <= {0, 1}:
            raise PluginError(f"{where}: predict() must return one label of the training classes per row")
        if scores is None:
            raise PluginError(f"{where}: needs predict_proba or decision_function (ROC AUC and P(AD) read them)")
        if scores.shape != (len(y),) or not np.all(np.isfinite(scores)):
            raise PluginError(f"{where}: predict_proba / decision_function gave no finite score per row")


def _check_regressor(spec: ClassifierSpec, x, y, where: str) -> None:
    """The regressor's side of the smoke test: a scikit-learn regressor that clones, fits and predicts one
    finite number per row at both ends of its ranges."""
    import numpy as np
    from sklearn.base import clone, is_regressor

    for end in (0, 1):
        params = {name: _sample(param, end) for name, param in spec.params.items()}
        try:
            estimator = clone(spec.build(params, 0))
            if not is_regressor(estimator):
                raise PluginError(f"{where}: not a scikit-learn regressor (inherit sklearn.base.RegressorMixin)")
            fitted = estimator.fit(x, y)
            predicted = np.asarray(estimator.predict(x), dtype=float)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"{where}: building, cloning, fitting or predicting with {params} failed: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from None
        if fitted is not estimator:
            raise PluginError(f"{where}: fit() must return self")
        if predicted.shape != (len(y),) or not np.all(np.isfinite(predicted)):
            raise PluginError(f"{where}: predict() must return one finite number per row")


def _scores(estimator, x):
    import numpy as np

    if hasattr(estimator, "predict_proba"):
        probabilities = np.asarray(estimator.predict_proba(x))
        return probabilities[:, 1] if probabilities.ndim == 2 and probabilities.shape[1] == 2 else probabilities
    if hasattr(estimator, "decision_function"):
        return np.asarray(estimator.decision_function(x)).ravel()
    return None
