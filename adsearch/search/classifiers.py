"""The model registry: each entry is a name, its task, its default hyperparameter ranges and a builder.

Classifiers (AD vs control) are registered here, regressors (the MMSE score) in `regressors.py`, into the
same registry: a space lists the models of its study's task under `classifiers:`.

Adding a classifier is one `register(...)` call; a YAML space can then name it, restrict its ranges or fix
its values. Every builder is single-threaded and seeded, so a trial scores the same in any worker.
Trees and boosters are bounded (iteration caps, histogram binning) because on 1024-dim inputs they are
one to two orders of magnitude slower than the linear models; PCA in the space helps them further.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FloatRange:
    """The default search range, and the values the estimator accepts at all (`above` exclusive, `max`
    inclusive): a YAML space may widen the range, never leave the valid values."""

    low: float
    high: float
    log: bool = False
    above: float | None = None
    max: float | None = None
    min: float | None = None

    def invalid(self, value: float) -> str | None:
        """Why the estimator cannot take `value`, or None."""
        if self.min is not None and value < self.min:
            return f"must be at least {self.min:g}"
        if self.above is not None and not value > self.above:
            return f"must be above {self.above:g}"
        if self.max is not None and value > self.max:
            return f"must be at most {self.max:g}"
        return None


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False
    min: int = 1  # every integer hyperparameter here counts something
    max: int | None = None

    def invalid(self, value: float) -> str | None:
        if value < self.min:
            return f"must be at least {self.min}"
        if self.max is not None and value > self.max:
            return f"must be at most {self.max}"
        return None


@dataclass(frozen=True)
class Choice:
    options: tuple


Param = FloatRange | IntRange | Choice


@dataclass(frozen=True)
class ClassifierSpec:
    name: str
    description: str
    params: dict[str, Param]
    build: Callable[[dict[str, Any], int], Any]  # (hyperparameters, seed) -> unfitted estimator
    # (hyperparameters, n_training_samples) -> hyperparameters the data allows (e.g. k <= n for kNN)
    fit_to_data: Callable[[dict[str, Any], int], dict[str, Any]] | None = None
    task: str = "classification"  # or "mmse": a regressor of the MMSE score

    @property
    def is_regressor(self) -> bool:
        return self.task == "mmse"


REGISTRY: dict[str, ClassifierSpec] = {}
OWN_MODULES = ("adsearch.search.classifiers", "adsearch.search.regressors")  # the built-ins: no plugin replaces them


def register(name: str, description: str, params: dict[str, Param],
             fit_to_data: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
             task: str = "classification"):
    def decorator(build: Callable[[dict[str, Any], int], Any]) -> Callable[[dict[str, Any], int], Any]:
        owner = REGISTRY[name].build.__module__ if name in REGISTRY else None
        if owner in OWN_MODULES and build.__module__ not in OWN_MODULES:
            kind = "regressor" if task == "mmse" else "classifier"
            raise ValueError(f"the name {name!r} belongs to adsearch's own {kind} ({REGISTRY[name].description}); "
                             f"register yours under another name, such as 'my_{name}'")
        REGISTRY[name] = ClassifierSpec(name, description, params, build, fit_to_data, task)
        return build

    return decorator


def models_for(task: str) -> list[str]:
    """The registry's models of one task, in registration order."""
    return [name for name, spec in REGISTRY.items() if spec.task == task]


@register("logreg", "L2-regularised logistic regression", {"C": FloatRange(1e-4, 1e2, log=True, above=0)})
def _logreg(p, seed):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=p["C"], max_iter=2000, random_state=seed)


@register("sparse_logreg", "elastic-net logistic regression (l1_ratio 1: lasso), for signals in a few dimensions",
          {"C": FloatRange(1e-2, 1e2, log=True, above=0), "l1_ratio": FloatRange(0.2, 1.0, min=0, max=1)})
def _sparse_logreg(p, seed):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=p["C"], l1_ratio=p["l1_ratio"], solver="saga", tol=1e-3, max_iter=2000,
                              random_state=seed)


@register("linear_svm", "linear support vector machine (Platt-free: decision function)",
          {"C": FloatRange(1e-5, 1e1, log=True, above=0)})
def _linear_svm(p, seed):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=p["C"], max_iter=5000, random_state=seed)


@register("rbf_svm", "support vector machine with an RBF kernel",
          {"C": FloatRange(1e-2, 1e3, log=True, above=0), "gamma": FloatRange(1e-5, 1e-1, log=True, above=0)})
def _rbf_svm(p, seed):
    from sklearn.svm import SVC

    return SVC(C=p["C"], gamma=p["gamma"], kernel="rbf", random_state=seed)


@register("knn", "k nearest neighbours",
          {"n_neighbors": IntRange(1, 31), "weights": Choice(("uniform", "distance")),
           "metric": Choice(("euclidean", "cosine"))},
          fit_to_data=lambda p, n: {**p, "n_neighbors": min(p["n_neighbors"], n)})
def _knn(p, seed):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=p["n_neighbors"], weights=p["weights"], metric=p["metric"])


@register("lda", "linear discriminant analysis, covariance shrunk towards a scaled identity",
          {"shrinkage": FloatRange(1e-3, 1.0, log=True, above=0, max=1)})
def _lda(p, seed):
    from adsearch.search.estimators import ShrinkageLDA

    return ShrinkageLDA(shrinkage=p["shrinkage"])


FOREST = {"n_estimators": IntRange(50, 300, log=True), "max_depth": IntRange(2, 16),
           "max_features": Choice(("sqrt", "log2")), "min_samples_leaf": IntRange(1, 8)}


@register("random_forest", "random forest", FOREST)
def _random_forest(p, seed):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(**p, n_jobs=1, random_state=seed)


@register("extra_trees", "extremely randomised trees", FOREST)
def _extra_trees(p, seed):
    from sklearn.ensemble import ExtraTreesClassifier

    return ExtraTreesClassifier(**p, n_jobs=1, random_state=seed)


XGBOOST = {"n_estimators": IntRange(20, 200, log=True), "max_depth": IntRange(2, 6),
           "learning_rate": FloatRange(0.01, 0.3, log=True, above=0),
           "subsample": FloatRange(0.5, 1.0, above=0, max=1),
           "colsample_bytree": FloatRange(0.1, 1.0, above=0, max=1)}
CATBOOST = {"iterations": IntRange(20, 200, log=True), "depth": IntRange(2, 6, max=16),
            "learning_rate": FloatRange(0.01, 0.3, log=True, above=0),
            "l2_leaf_reg": FloatRange(1.0, 10.0, log=True, min=0)}


@register("xgboost", "gradient-boosted trees (XGBoost, histogram method, capped rounds)", XGBOOST)
def _xgboost(p, seed):
    from xgboost import XGBClassifier

    return XGBClassifier(**p, tree_method="hist", max_bin=64, n_jobs=1, random_state=seed, verbosity=0)


@register("catboost", "gradient-boosted oblivious trees (CatBoost, capped iterations)", CATBOOST)
def _catboost(p, seed):
    from catboost import CatBoostClassifier

    return CatBoostClassifier(**p, border_count=32, thread_count=1, random_seed=seed, verbose=False,
                              allow_writing_files=False)


@register("mlp", "small multilayer perceptron (one hidden layer, early stopping)",
          {"hidden_units": IntRange(16, 256, log=True), "alpha": FloatRange(1e-5, 1e-1, log=True, min=0),
           "learning_rate_init": FloatRange(1e-4, 1e-2, log=True, above=0)})
def _mlp(p, seed):
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(p["hidden_units"],), alpha=p["alpha"],
                         learning_rate_init=p["learning_rate_init"], max_iter=300, early_stopping=True,
                         n_iter_no_change=10, random_state=seed)
